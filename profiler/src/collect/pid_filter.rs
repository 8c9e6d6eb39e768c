//! The process filter: a mark (`filter::*`) per tgid, read by the programs at every sample and
//! every context switch, written by user space and by the programs that follow forks and exits.
//!
//! The marks are kept twice. `PID_FILTER`, a hash, lists every mark, so that user space can read
//! them back, and holds those of tgids past `pid_max` as it was at load. `PID_MARKS` holds the
//! same marks one byte per tgid, so that the programs read one with an array load instead of a
//! hash lookup. The hash is written first and cleared last: a byte the hash lacks could
//! never be listed, and so never cleared.

use std::os::fd::AsFd as _;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData, MapError};
use profiler_common::id_bytes;

use super::mapped::ArrayWindow;

pub(super) struct Filter {
    list: HashMap<MapData, u32, u8>,
    /// All of `PID_MARKS`, mapped shared; pages become resident as marks are written.
    marks: ArrayWindow,
    /// Tgids with a byte: `0..ids`.
    ids: u32,
    /// Kept open for as long as it is mapped.
    _marks_map: MapData,
}

impl Filter {
    /// Takes over the filter's maps; `marks_map` is `PID_MARKS`, loaded with `entries` entries.
    pub(super) fn new(
        list: HashMap<MapData, u32, u8>,
        marks_map: MapData,
        entries: u32,
    ) -> Result<Self> {
        let ids = entries.saturating_mul(id_bytes::PER_ENTRY);
        let marks = ArrayWindow::map(marks_map.fd().as_fd(), 0, ids as usize)
            .context("mapping the filter's marks into memory")?;
        Ok(Self {
            list,
            marks,
            ids,
            _marks_map: marks_map,
        })
    }

    /// Marks `pid`; fails when the hash is full, and then the programs see no mark either.
    pub(super) fn set(&mut self, pid: u32, mark: u8) -> Result<(), MapError> {
        self.list.insert(pid, mark, 0)?;
        self.write_byte(pid, mark);
        Ok(())
    }

    /// Removes `pid`'s mark.
    pub(super) fn clear(&mut self, pid: u32) {
        self.write_byte(pid, 0);
        let _ = self.list.remove(&pid);
    }

    /// The tgids marked `mark`, the marks the programs wrote included.
    pub(super) fn marked(&self, mark: u8) -> Vec<u32> {
        self.list
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(_, marked)| *marked == mark)
            .map(|(pid, _)| pid)
            .collect()
    }

    fn byte(&self, pid: u32) -> Option<*mut u8> {
        match pid < self.ids {
            true => self.marks.at(pid as usize, 1),
            false => None,
        }
    }

    fn write_byte(&self, pid: u32, mark: u8) {
        if let Some(at) = self.byte(pid) {
            // SAFETY: a byte of the mapping; a single-byte store leaves its neighbours, which
            // the programs may be writing, as they are.
            unsafe { std::ptr::write_volatile(at, mark) };
        }
    }
}
