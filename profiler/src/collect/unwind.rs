//! Loads unwind tables into the kernel's maps for the walker (docs/design/0002): one row array
//! for every table (its size is the memory budget), a slot per table saying where its rows
//! are, and per process the executable mappings with their table and load bias.
//!
//! Tables are compiled (`profiler-unwind`) when a process is announced, for every executable
//! file mapping and the vDSO, once per binary (by [`BinaryId`]) while it stays loaded. When a
//! new table does not fit, the least recently used ones are evicted; a process whose samples
//! need an evicted table gets it back at the next drain. Mappings are reread at a drain when a
//! process's stacks hold addresses none of its known mappings cover (a library loaded since).

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    os::{
        fd::AsFd as _,
        unix::fs::{FileExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, MapData, ProgramArray};
use profiler_common::{
    unwind::{ExecMapping, ProcessMappings, TableInfo, UnwindRow, MAX_PROCESS_MAPPINGS, NO_TABLE},
    ProcessKey,
};
use profiler_unwind::{
    build, load_bias, simulate::read_maps, trampoline, BinaryId, DebugSearch, Options, UnwindTable,
};

use super::mapped::ArrayWindow;
use crate::{
    deadline::{self, Outcome},
    in_root::{self, ProcessRoot},
    truncation,
};

/// Kernel bytes per row: array map elements are rounded up to 8 bytes.
pub const ROW_BYTES: u64 = 16;
/// Table slots in `UNWIND_TABLES` (the kernel map's size).
pub const TABLE_SLOTS: u32 = 4096;
/// The soonest a process's mappings are reread for addresses none of them covers.
const REREAD_INTERVAL: Duration = Duration::from_secs(1);
/// Its first few rereads come sooner: the first read often lands between exec and ld.so
/// mapping the libraries, and until the reread every stack stops at the first library frame.
const QUICK_REREADS: u32 = 3;
const QUICK_REREAD_INTERVAL: Duration = Duration::from_millis(10);

/// What the loader did, for the summary and `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnwindCounters {
    /// Tables copied into the kernel.
    pub loads: u64,
    /// Tables evicted to make room (least recently used first).
    pub evictions: u64,
    /// Binaries whose table could not be built (no CFI, unreadable, not x86-64 ELF).
    pub build_errors: u64,
    /// Binaries whose table building panicked (caught; the binary is not tried again).
    pub build_panics: u64,
    /// Binaries truncated while their table was built (see [`crate::truncation`]).
    pub build_truncated: u64,
    /// Binaries whose table took longer than `--parse-timeout` to build (abandoned).
    pub build_timeouts: u64,
    /// Tables larger than the whole budget, or with no free slot: their code is walked with
    /// frame pointers only.
    pub not_loaded: u64,
    /// Executable mappings beyond the per-process limit, left out.
    pub mappings_dropped: u64,
    /// Bytes of rows in the kernel now.
    pub bytes_loaded: u64,
    /// Mappings read again for addresses none of them covered.
    pub rereads: u64,
}

/// A table in the kernel's row array.
struct Loaded {
    slot: u32,
    seq: u32,
    first_row: u32,
    len: u32,
    /// ELF virtual address of row pc 0.
    base: u64,
    last_used: u64,
}

/// One executable mapping of a process and the binary behind it.
#[derive(Clone)]
struct Mapped {
    start: u64,
    end: u64,
    /// Runtime address minus ELF virtual address; `None` when the file's segments could not
    /// be read (then its table is never built, and that is counted once).
    load_bias: Option<u64>,
    id: Option<BinaryId>,
    /// As /proc/PID/maps names it (`[vdso]` for the vDSO).
    path: String,
}

struct Process {
    key: ProcessKey,
    mappings: Vec<Mapped>,
    read_at: Instant,
    rereads: u32,
}

impl Process {
    /// Rereads the mappings if the last read is old enough; true if it did.
    fn reread(&mut self, counters: &mut UnwindCounters) -> bool {
        let wait = match self.rereads < QUICK_REREADS {
            true => QUICK_REREAD_INTERVAL,
            false => REREAD_INTERVAL,
        };
        if self.read_at.elapsed() < wait {
            return false;
        }
        self.read_at = Instant::now();
        self.rereads += 1;
        counters.rereads += 1;
        if let Some(mappings) = read_mappings(self.key.tgid, counters) {
            self.mappings = mappings;
        }
        true
    }
}

/// The tables and mappings the kernel walker reads, kept in step with the processes sampled.
pub struct UnwindLoader {
    /// The `UNWIND_ROWS` array; tables are copied in through windows of it, mapped while they
    /// are written: mapping the whole array for good would make all of it (16 MiB by default)
    /// resident in our RSS, on top of the same pages counted as the map's kernel memory.
    rows_map: MapData,
    /// Rows the array holds.
    capacity: u32,
    tables_map: Array<MapData, TableInfo>,
    mappings_map: HashMap<MapData, u32, ProcessMappings>,
    /// Kept open: the tail-call map must outlive the programs' use of it.
    _programs: ProgramArray<MapData>,
    options: Options,
    /// Longest a table may take to build (`--parse-timeout`).
    parse_timeout: Duration,
    loaded: StdHashMap<BinaryId, Loaded>,
    /// Binaries whose table cannot be built: not tried again.
    failed: StdHashMap<BinaryId, ()>,
    free_slots: Vec<u32>,
    next_seq: u32,
    clock: u64,
    processes: StdHashMap<u32, Process>,
    counters: UnwindCounters,
}

impl UnwindLoader {
    /// Takes over the walker's maps. `rows_map` must be the mmapable `UNWIND_ROWS` array.
    pub fn new(
        rows_map: MapData,
        tables_map: Array<MapData, TableInfo>,
        mappings_map: HashMap<MapData, u32, ProcessMappings>,
        capacity: u32,
        debug_dirs: Vec<PathBuf>,
        parse_timeout: Duration,
        programs: ProgramArray<MapData>,
    ) -> Result<Self> {
        // Fails here, not at the first table, if the array cannot be mapped.
        ArrayWindow::map(rows_map.fd().as_fd(), 0, ROW_BYTES as usize)
            .context("mapping the unwind rows into memory")?;
        Ok(Self {
            rows_map,
            capacity,
            tables_map,
            mappings_map,
            _programs: programs,
            options: Options {
                debug_dirs,
                max_rows: capacity as usize,
            },
            parse_timeout,
            loaded: StdHashMap::new(),
            failed: StdHashMap::new(),
            free_slots: (0..TABLE_SLOTS).rev().collect(),
            next_seq: 1,
            clock: 0,
            processes: StdHashMap::new(),
            counters: UnwindCounters::default(),
        })
    }

    pub fn counters(&self) -> UnwindCounters {
        UnwindCounters {
            bytes_loaded: self.loaded.values().map(|t| t.len as u64 * ROW_BYTES).sum(),
            ..self.counters
        }
    }

    /// A new incarnation (or one after exec): reads its mappings, loads their tables and tells
    /// the kernel. A process already gone is skipped: its samples walk with frame pointers.
    pub fn started(&mut self, process: ProcessKey) {
        let Some(mappings) = read_mappings(process.tgid, &mut self.counters) else {
            return;
        };
        self.processes.insert(
            process.tgid,
            Process {
                key: process,
                mappings,
                read_at: Instant::now(),
                rereads: 0,
            },
        );
        self.publish(process.tgid);
    }

    /// The kernel's walker met a pc in none of the mappings known for `process`: they are
    /// read again (see [`Process::reread`] for how often) and published.
    pub fn missed(&mut self, process: ProcessKey) {
        match self.processes.get_mut(&process.tgid) {
            Some(known) if known.key == process => {
                if known.reread(&mut self.counters) {
                    self.publish(process.tgid);
                }
            }
            Some(_) => {}
            // Its first read failed or has not happened: this is it.
            None => self.started(process),
        }
    }

    /// The process ended: the kernel removed its mappings itself (exit tracepoint).
    pub fn exited(&mut self, process: ProcessKey) {
        if self
            .processes
            .get(&process.tgid)
            .is_some_and(|p| p.key == process)
        {
            self.processes.remove(&process.tgid);
        }
    }

    /// After a drain: marks the tables the samples used as recently used, reloads evicted ones
    /// they need, and rereads the mappings of processes with addresses outside all of them.
    pub fn sampled<'a>(&mut self, samples: impl Iterator<Item = (ProcessKey, &'a [u64])>) {
        self.clock += 1;
        let mut dirty: Vec<u32> = Vec::new();
        for (key, user) in samples {
            let Some(process) = self.processes.get_mut(&key.tgid) else {
                continue;
            };
            if process.key != key {
                continue;
            }
            let mut outside = false;
            for addr in user {
                let at = process.mappings.partition_point(|m| m.start <= *addr);
                match at.checked_sub(1).map(|i| &process.mappings[i]) {
                    Some(m) if *addr < m.end => {
                        if let Some(id) = &m.id {
                            match self.loaded.get_mut(id) {
                                Some(table) => table.last_used = self.clock,
                                None if !self.failed.contains_key(id) => dirty.push(key.tgid),
                                None => {}
                            }
                        }
                    }
                    _ => outside = true,
                }
            }
            if outside && process.reread(&mut self.counters) {
                dirty.push(key.tgid);
            }
        }
        dirty.sort_unstable();
        dirty.dedup();
        for tgid in dirty {
            self.publish(tgid);
        }
    }

    /// Loads the tables of a process's mappings and writes its mappings into the kernel.
    fn publish(&mut self, tgid: u32) {
        let Some(process) = self.processes.get(&tgid) else {
            return;
        };
        let key = process.key;
        let mapped = process.mappings.clone();
        let mut value = Box::<ProcessMappings>::default();
        value.process = key;
        let mut len = 0;
        for m in &mapped {
            // Tables first, so that loading one (and evicting others) cannot invalidate the
            // slots written below for this process.
            if let Some(id) = &m.id {
                self.ensure_loaded(tgid, m, id);
            }
        }
        for m in &mapped {
            if len >= MAX_PROCESS_MAPPINGS {
                break;
            }
            let table = m.id.as_ref().and_then(|id| self.loaded.get(id));
            value.mappings[len] = ExecMapping {
                start: m.start,
                end: m.end,
                bias: table.map_or(0, |t| m.load_bias.unwrap_or(0).wrapping_add(t.base)),
                table: table.map_or(NO_TABLE, |t| t.slot),
                table_seq: table.map_or(0, |t| t.seq),
            };
            len += 1;
        }
        value.len = len as u32;
        // A full map only costs this process its tables: its samples walk with frame pointers.
        let _ = self.mappings_map.insert(tgid, *value, 0);
    }

    /// Compiles and copies in the table of `id` unless it is loaded already.
    fn ensure_loaded(&mut self, tgid: u32, mapping: &Mapped, id: &BinaryId) {
        if let Some(table) = self.loaded.get_mut(id) {
            table.last_used = self.clock;
            return;
        }
        if self.failed.contains_key(id) {
            return;
        }
        if deadline::saturated() {
            // Put off, not failed: tried again when its code is next sampled.
            return;
        }
        if mapping.load_bias.is_none() {
            // Its segments cannot be read: not an ELF file we can use.
            self.counters.build_errors += 1;
            self.failed.insert(id.clone(), ());
            return;
        }
        // A parser panic (ours or gimli's) or a build past the deadline costs this binary its
        // table, never the profiler.
        let watch = truncation::Watch::start();
        let (pid, entry, options) = (tgid, mapping.clone(), self.options.clone());
        let outcome = deadline::run(self.parse_timeout, move || {
            build_table(pid, &entry, &options)
        });
        let built = match outcome {
            _ if watch.truncated() => Err((
                &mut self.counters.build_truncated,
                "it was truncated while being read",
            )),
            Outcome::Panicked => Err((&mut self.counters.build_panics, "a parser panicked on it")),
            Outcome::TimedOut => Err((
                &mut self.counters.build_timeouts,
                "it took longer than --parse-timeout",
            )),
            Outcome::Done(built) => Ok(built),
        };
        let built = match built {
            Ok(built) => built,
            Err((counter, why)) => {
                *counter += 1;
                self.failed.insert(id.clone(), ());
                eprintln!(
                    "warning: no unwind table for {}: {why}; its code is walked with frame pointers",
                    mapping.path
                );
                return;
            }
        };
        let table = match built {
            Some(Ok(table)) => table,
            Some(Err(profiler_unwind::Error::TooLarge)) => {
                self.counters.not_loaded += 1;
                self.failed.insert(id.clone(), ());
                return;
            }
            Some(Err(_)) => {
                self.counters.build_errors += 1;
                self.failed.insert(id.clone(), ());
                return;
            }
            None => return,
        };
        let len = table.rows.len() as u32;
        let Some(first_row) = self.allocate(len) else {
            self.counters.not_loaded += 1;
            self.failed.insert(id.clone(), ());
            return;
        };
        let Some(slot) = self.free_slots.pop() else {
            self.counters.not_loaded += 1;
            return;
        };
        if let Err(err) = self.write_rows(first_row, &table.rows) {
            eprintln!("warning: copying an unwind table into the kernel: {err}");
            self.free_slots.push(slot);
            self.counters.not_loaded += 1;
            return;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        let info = TableInfo {
            first_row,
            len,
            seq,
            _pad: 0,
        };
        if self.tables_map.set(slot, info, 0).is_err() {
            self.free_slots.push(slot);
            self.counters.not_loaded += 1;
            return;
        }
        self.counters.loads += 1;
        self.loaded.insert(
            id.clone(),
            Loaded {
                slot,
                seq,
                first_row,
                len,
                base: table.base,
                last_used: self.clock,
            },
        );
    }

    /// The first row of a free run of `len` rows, evicting least recently used tables until
    /// one exists. `None` when the table is larger than the whole budget.
    fn allocate(&mut self, len: u32) -> Option<u32> {
        if len == 0 || len > self.capacity {
            return None;
        }
        loop {
            let mut used: Vec<(u32, u32)> = self
                .loaded
                .values()
                .map(|t| (t.first_row, t.first_row + t.len))
                .collect();
            used.sort_unstable();
            let mut at = 0u32;
            for (start, end) in used {
                if start - at >= len {
                    return Some(at);
                }
                at = at.max(end);
            }
            if self.capacity - at >= len {
                return Some(at);
            }
            self.evict_oldest()?;
        }
    }

    fn evict_oldest(&mut self) -> Option<()> {
        let id = self
            .loaded
            .iter()
            .min_by_key(|(_, t)| t.last_used)
            .map(|(id, _)| id.clone())?;
        let table = self.loaded.remove(&id)?;
        // The slot's next table gets another seq: mappings still naming this one see none.
        let _ = self.tables_map.set(table.slot, TableInfo::default(), 0);
        self.free_slots.push(table.slot);
        self.counters.evictions += 1;
        Some(())
    }

    fn write_rows(&mut self, first_row: u32, rows: &[UnwindRow]) -> std::io::Result<()> {
        let end_row = (first_row as usize + rows.len()).min(self.capacity as usize);
        if end_row <= first_row as usize {
            return Ok(());
        }
        let row_bytes = ROW_BYTES as usize;
        let window = ArrayWindow::map(
            self.rows_map.fd().as_fd(),
            first_row as usize * row_bytes,
            end_row * row_bytes,
        )?;
        for (index, row) in (first_row as usize..end_row).zip(rows) {
            if let Some(at) = window.at(index * row_bytes, row_bytes) {
                // SAFETY: `at` holds a whole row of the mapped array.
                unsafe { std::ptr::write_unaligned(at.cast::<UnwindRow>(), *row) };
            }
        }
        Ok(())
    }
}

/// The executable file mappings (and the vDSO) of `pid` with their binaries' identities, sorted
/// by start; `None` when the process is gone.
fn read_mappings(pid: u32, counters: &mut UnwindCounters) -> Option<Vec<Mapped>> {
    let maps = read_maps(pid as i32).ok()?;
    let mut mapped = Vec::new();
    let mut mem = ProcessMemory::new(pid);
    for entry in maps.iter().filter(|m| m.executable) {
        let (id, bias) = if entry.path == "[vdso]" {
            let image = mem
                .get()
                .and_then(|mem| read_vdso(mem, entry.start, entry.end));
            let id = image.as_deref().and_then(BinaryId::of_image);
            let bias = image
                .as_deref()
                .and_then(|data| load_bias(data, entry.start, entry.offset));
            (id.zip(bias).map(|(id, _)| id), bias)
        } else if entry.path.starts_with('/') {
            let path = map_file(pid, entry.start, entry.end);
            identify(&path, entry.start, entry.offset)
        } else if entry.path.is_empty() {
            // Anonymous code: JIT code walks with frame pointers, but CPython's perf
            // trampolines keep none; their fixed layout makes a table.
            let trampolines = mem
                .get()
                .and_then(|mem| cpython_trampolines(mem, entry.start, entry.end));
            let Some(layout) = trampolines else {
                continue;
            };
            mapped.extend(trampoline_arenas(entry.start, entry.end, layout));
            continue;
        } else {
            continue;
        };
        mapped.push(Mapped {
            start: entry.start,
            end: entry.end,
            load_bias: bias,
            id,
            path: entry.path.clone(),
        });
    }
    mapped.sort_by_key(|m| m.start);
    if mapped.len() > MAX_PROCESS_MAPPINGS {
        counters.mappings_dropped += (mapped.len() - MAX_PROCESS_MAPPINGS) as u64;
    }
    Some(mapped)
}

/// A mapping's file as the process sees it, whatever mount namespace it is in, deleted or not.
fn map_file(pid: u32, start: u64, end: u64) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"))
}

/// The identity and load bias of the file behind a mapping, from one open of it. A file that
/// is not a usable ELF still has an identity, so that its failure is counted once.
fn identify(path: &Path, start: u64, offset: u64) -> (Option<BinaryId>, Option<u64>) {
    let Ok(file) = File::open(path) else {
        return (None, None);
    };
    // SAFETY: read-only map, dropped before returning.
    let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return (None, None);
    };
    (
        BinaryId::of_file(&file, &map).ok(),
        load_bias(&map, start, offset),
    )
}

/// A mapping of CPython's trampolines as the walker is given it: one mapping per arena, all
/// sharing the one-arena table. CPython's arenas merge into one mapping when they are adjacent,
/// and a table per merged length would be built anew as each is added (and kept until evicted).
fn trampoline_arenas(start: u64, end: u64, layout: trampoline::Layout) -> Vec<Mapped> {
    let len = end - start;
    let arena = trampoline::arena_bytes(len);
    trampoline::arenas(len)
        .map(|offset| Mapped {
            start: start + offset,
            end: start + offset + arena,
            load_bias: Some(start + offset),
            id: Some(BinaryId::CpythonTrampolines { layout, len: arena }),
            path: "[CPython perf trampolines]".into(),
        })
        .collect()
}

/// A process's memory (`/proc/PID/mem`), opened when first read: the vDSO and CPython's
/// trampolines are read from it, and most processes have no trampolines.
struct ProcessMemory {
    pid: u32,
    file: Option<Option<File>>,
}

impl ProcessMemory {
    fn new(pid: u32) -> ProcessMemory {
        ProcessMemory { pid, file: None }
    }

    /// The open memory file; `None` when it cannot be opened (the process is gone).
    fn get(&mut self) -> Option<&File> {
        let pid = self.pid;
        self.file
            .get_or_insert_with(|| File::open(format!("/proc/{pid}/mem")).ok())
            .as_ref()
    }
}

/// The trampoline layout of anonymous code at `start..end` of the process whose memory is
/// `mem`, when every arena of it starts with CPython's perf trampolines.
fn cpython_trampolines(mem: &File, start: u64, end: u64) -> Option<trampoline::Layout> {
    let mut layout = None;
    for arena in trampoline::arenas(end.checked_sub(start)?) {
        let mut probe = [0u8; trampoline::PROBE_BYTES];
        mem.read_exact_at(&mut probe, start + arena).ok()?;
        let found = trampoline::recognize(&probe)?;
        if layout.is_some_and(|l| l != found) {
            return None;
        }
        layout = Some(found);
    }
    layout
}

/// The vDSO image at `start..end` of the process whose memory is `mem`.
fn read_vdso(mem: &File, start: u64, end: u64) -> Option<Vec<u8>> {
    let mut image = vec![0; usize::try_from(end.checked_sub(start)?).ok()?];
    mem.read_exact_at(&mut image, start).ok()?;
    Some(image)
}

/// Compiles the table of the binary behind `entry` in `pid`; `None` when the mapping is gone.
fn build_table(
    pid: u32,
    entry: &Mapped,
    options: &Options,
) -> Option<Result<UnwindTable, profiler_unwind::Error>> {
    if let Some(BinaryId::CpythonTrampolines { layout, len }) = &entry.id {
        return Some(Ok(trampoline::table(*layout, *len)));
    }
    if entry.path == "[vdso]" {
        let image = read_vdso(ProcessMemory::new(pid).get()?, entry.start, entry.end)?;
        return Some(build(&image, None, options));
    }
    let file = File::open(map_file(pid, entry.start, entry.end)).ok()?;
    let meta = file.metadata().ok()?;
    // SAFETY: read-only map, dropped before returning.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    // Its debug file is looked for beside the path the process names, inside its own root.
    let open_in_root = in_root::opener(ProcessRoot::open(pid).ok());
    let search = DebugSearch {
        path: Path::new(&entry.path),
        open_in_root: &open_in_root,
        own_dirs: &options.debug_dirs,
        binary: Some((meta.dev(), meta.ino())),
    };
    Some(build(&map, Some(&search), options))
}

#[cfg(test)]
mod tests {
    use profiler_unwind::trampoline::{recognize, Layout, ARENA_BYTES};

    use super::{trampoline_arenas, BinaryId};

    fn layout() -> Layout {
        let code = [
            0x48, 0x83, 0xec, 0x08, 0xff, 0xd1, 0x48, 0x83, 0xc4, 0x08, 0xc3,
        ];
        recognize(&[code, code].concat()).unwrap()
    }

    #[test]
    fn merged_trampoline_arenas_are_split_and_share_one_table() {
        let start = 0x7f00_0000_0000;
        let mapped = trampoline_arenas(start, start + 3 * ARENA_BYTES, layout());
        assert_eq!(mapped.len(), 3);
        for (i, m) in mapped.iter().enumerate() {
            let at = start + i as u64 * ARENA_BYTES;
            assert_eq!(
                (m.start, m.end, m.load_bias),
                (at, at + ARENA_BYTES, Some(at))
            );
            let one_arena = BinaryId::CpythonTrampolines {
                layout: layout(),
                len: ARENA_BYTES,
            };
            assert_eq!(m.id.as_ref(), Some(&one_arena));
        }
        // A mapping that is not whole arenas is one packing of its own length.
        let odd = trampoline_arenas(start, start + 4096, layout());
        assert_eq!(odd.len(), 1);
        assert_eq!((odd[0].end, odd[0].load_bias), (start + 4096, Some(start)));
    }
}
