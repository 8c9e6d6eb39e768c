//! Unwind tables for binaries without frame pointers.
//!
//! Reads an ELF file's CFI (`.eh_frame`, found through `PT_GNU_EH_FRAME` when section headers
//! are gone, and `.debug_frame` from the file or its separate debug file when `.eh_frame` covers
//! little of the code) with gimli, and compiles it into the sorted [`UnwindRow`]s of
//! `profiler_common::unwind`, which the kernel walker searches and applies with the same
//! [`step`](profiler_common::unwind::step) the [`simulate`] module runs here.
//!
//! x86-64 only. See docs/design/0002-unwind-tables.md.

mod cache;
mod compile;
pub mod debug_file;
mod elf;
mod id;
pub mod simulate;
pub mod trampoline;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use cache::DiskCache;
pub use compile::{build, build_from_path, Options};
pub use debug_file::{DebugFile, DebugSearch};
pub use elf::{load_bias, virtual_addresses};
pub use id::BinaryId;
use profiler_common::unwind::{find_row_in, kind, UnwindRow};

/// Why a table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("not a usable ELF file: {0}")]
    Malformed(String),
    #[error("not an x86-64 ELF file")]
    UnsupportedArchitecture,
    #[error("no CFI: neither .eh_frame nor .debug_frame describes any function")]
    NoCfi,
    #[error("the table spans more than 4 GiB or has too many rows")]
    TooLarge,
}

/// One binary's unwind table: rows sorted by pc, the first at `base`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnwindTable {
    /// ELF virtual address of row pc 0.
    pub base: u64,
    /// Sorted by `pc`; the last is a [`kind::NO_CFI`] row past the last function.
    pub rows: Vec<UnwindRow>,
    pub stats: TableStats,
}

/// What went into a table and what it cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub eh_frame_bytes: u64,
    pub eh_frame_fdes: u64,
    pub debug_frame_bytes: u64,
    pub debug_frame_fdes: u64,
    /// The separate debug file `.debug_frame` came from, if any.
    pub debug_file: Option<PathBuf>,
    /// Bytes of executable segments.
    pub code_bytes: u64,
    /// Bytes some FDE (or a recognised signal restorer) covers.
    pub covered_bytes: u64,
    /// Rows before adjacent equal rules were merged.
    pub rows_before_dedup: u64,
    pub build_time: Duration,
    /// Read from a [`DiskCache`] rather than compiled (the other stats are then zero).
    pub from_cache: bool,
}

impl UnwindTable {
    /// The row covering ELF virtual address `vaddr`, `None` before the first function. Past the
    /// last function (and beyond 4 GiB of it) this is the final [`kind::NO_CFI`] row.
    pub fn row_for(&self, vaddr: u64) -> Option<&UnwindRow> {
        let offset = vaddr.checked_sub(self.base)?;
        find_row_in(&self.rows, u32::try_from(offset).unwrap_or(u32::MAX))
    }

    /// Bytes the rows take in a kernel map.
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of_val(&self.rows[..])
    }

    /// How many rows have each kind, indexed by kind.
    pub fn kind_counts(&self) -> [usize; kind::UNSUPPORTED as usize + 1] {
        let mut counts = [0; kind::UNSUPPORTED as usize + 1];
        for row in &self.rows {
            if let Some(count) = counts.get_mut(row.kind as usize) {
                *count += 1;
            }
        }
        counts
    }
}

/// Tables by [`BinaryId`]: a binary mapped by many processes is compiled once, and with a
/// [`DiskCache`] once per machine rather than once per agent start.
#[derive(Default)]
pub struct Tables {
    options: Options,
    by_id: HashMap<BinaryId, Arc<UnwindTable>>,
    disk: Option<DiskCache>,
    disk_write_errors: u64,
}

impl Tables {
    pub fn new(options: Options) -> Tables {
        Tables {
            options,
            ..Default::default()
        }
    }

    /// Also keeps tables in `cache`, and looks there before compiling.
    pub fn with_disk_cache(mut self, cache: DiskCache) -> Tables {
        self.disk = Some(cache);
        self
    }

    /// The table of the file at `path`: from memory, else from the disk cache, else compiled
    /// (and then stored in the disk cache).
    pub fn get_or_build(&mut self, path: &Path) -> Result<(BinaryId, Arc<UnwindTable>), Error> {
        let io = |e| Error::Io(path.to_path_buf(), e);
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: read-only map, dropped before returning.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let id = BinaryId::of_file(&file, &map).map_err(io)?;
        if let Some(table) = self.by_id.get(&id) {
            return Ok((id, table.clone()));
        }
        let cached = self.disk.as_ref().and_then(|disk| disk.load(&id));
        let table = match cached {
            Some(table) => table,
            None => {
                let search = compile::on_host(path, &file, &self.options);
                let table = build(&map, Some(&search), &self.options)?;
                if let Some(disk) = &self.disk {
                    // A cache that cannot be written costs a rebuild next time, nothing more.
                    if disk.store(&id, &table).is_err() {
                        self.disk_write_errors += 1;
                    }
                }
                table
            }
        };
        let table = Arc::new(table);
        self.by_id.insert(id.clone(), table.clone());
        Ok((id, table))
    }

    /// Tables the disk cache could not store.
    pub fn disk_write_errors(&self) -> u64 {
        self.disk_write_errors
    }

    /// The table of an image already in memory (the vDSO). Images without a build ID are
    /// compiled every time.
    pub fn get_or_build_image(&mut self, data: &[u8]) -> Result<Arc<UnwindTable>, Error> {
        let id = BinaryId::of_image(data);
        if let Some(table) = id.as_ref().and_then(|id| self.by_id.get(id)) {
            return Ok(table.clone());
        }
        let table = Arc::new(build(data, None, &self.options)?);
        if let Some(id) = id {
            self.by_id.insert(id, table.clone());
        }
        Ok(table)
    }

    /// How many distinct tables are held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}
