//! What is known about one process: its name, its threads' names and its executable mappings,
//! read from /proc when the process is first seen and kept after it exits.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use procfs::process::Process as ProcProcess;

/// A file on disk as every process that maps it sees it: device and inode, plus size and
/// modification time, so that a rebuilt binary given a recycled inode is not taken for the old
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

impl FileKey {
    /// The key of the file `path` leads to (links followed); `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<FileKey> {
        Some(Self::of_metadata(&std::fs::metadata(path).ok()?))
    }

    /// The key of a file from its metadata.
    pub fn of_metadata(meta: &std::fs::Metadata) -> FileKey {
        use std::os::unix::fs::MetadataExt as _;
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        }
    }
}

/// One executable mapping of a process.
#[derive(Debug)]
pub struct Mapping {
    /// The same for every mapping of one binary (by build ID, else by [`FileKey`]), so that a
    /// profile holds one mapping per binary however many processes map it; unique otherwise.
    pub id: u64,
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// The path the process sees (as in /proc/PID/maps, without " (deleted)").
    pub path: String,
    /// The file, or `None` for anonymous memory (JIT code) and the vdso.
    pub file: Option<FileKey>,
    /// Hex build ID, when the file has one.
    pub build_id: String,
    /// True for the process's main executable (/proc/PID/exe).
    pub is_main: bool,
    /// Runtime address minus ELF virtual address (what `addr2line` takes) in this mapping;
    /// 0 when not known or not a file.
    pub load_bias: u64,
}

/// [`Mapping::id`] of the kernel's one mapping.
pub const KERNEL_MAPPING_ID: u64 = 1;

impl Mapping {
    /// True for the kernel's mapping (`[kernel.kallsyms]`).
    pub fn is_kernel(&self) -> bool {
        self.id == KERNEL_MAPPING_ID
    }

    /// True for the vDSO's mapping.
    pub fn is_vdso(&self) -> bool {
        self.file.is_none() && self.path == "[vdso]"
    }
}

/// A process's metadata.
#[derive(Debug)]
pub struct ProcessInfo {
    pub comm: Arc<str>,
    /// Executable mappings, sorted by start address.
    pub mappings: Vec<Arc<Mapping>>,
    pub threads: HashMap<u32, Arc<str>>,
    /// When /proc/PID/maps was last read, to bound rereads.
    pub read_at: Instant,
    /// How long after `read_at` addresses outside every mapping may cause a reread: none at
    /// first (a process read while its loader still maps libraries needs one soon), doubling
    /// each time a reread finds no new mapping (a JIT's stray addresses), back to none when one
    /// does.
    pub reread_wait: std::time::Duration,
    /// The generation flip at which the process was seen to end (exit, exec, reused tgid).
    pub ended_at: Option<u64>,
    /// Names of its JIT code, from its perf-map file.
    pub perf_map: super::perfmap::PerfMap,
}

impl ProcessInfo {
    /// The mapping that holds `addr`, if any.
    pub fn mapping_for(&self, addr: u64) -> Option<&Arc<Mapping>> {
        let index = self.mappings.partition_point(|m| m.start <= addr);
        let mapping = self.mappings.get(index.checked_sub(1)?)?;
        (addr < mapping.end).then_some(mapping)
    }
}

/// A raw executable mapping as /proc lists it, before files are opened.
pub struct RawMapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub path: Option<PathBuf>,
    pub is_vdso: bool,
    /// True for a file mapping (an inode); its [`FileKey`] comes from the file itself.
    pub has_file: bool,
    pub deleted: bool,
    pub is_main: bool,
}

/// Nanoseconds per clock tick of /proc/PID/stat's start time.
fn ns_per_tick() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Whether a process that started at `start_ns` (the kernel's `start_boottime`) is the one
/// whose /proc/PID/stat says it started at `start_ticks`.
pub fn same_start(start_ns: u64, start_ticks: u64) -> bool {
    start_ns / ns_per_tick() == start_ticks
}

/// Reads the name and executable mappings of the process `pid` that started at `start_ns`;
/// `None` once it has exited or its pid belongs to another process.
pub fn read_process(pid: u32, start_ns: u64) -> Option<(String, Vec<RawMapping>)> {
    let process = ProcProcess::new(pid as i32).ok()?;
    let stat = process.stat().ok()?;
    if !same_start(start_ns, stat.starttime) {
        return None;
    }
    let comm = stat.comm;
    let maps = std::fs::read(format!("/proc/{pid}/maps")).ok()?;
    let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok();
    Some((comm, executable_mappings(&maps, exe.as_ref())))
}

/// The executable mappings in `/proc/PID/maps` text; `exe` is the metadata of the process's
/// main executable, which names its mappings as the main ones.
pub fn executable_mappings(maps: &[u8], exe: Option<&std::fs::Metadata>) -> Vec<RawMapping> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::MetadataExt as _;
    let mut mappings = Vec::new();
    for line in maps.split(|b| *b == b'\n') {
        let Some(map) = profiler_common::proc_maps::parse_line(line) else {
            continue;
        };
        if !map.executable {
            continue;
        }
        let is_vdso = map.path == b"[vdso]";
        let (path, deleted) = if map.path.is_empty() || map.is_special() {
            (None, false)
        } else {
            match map.path.strip_suffix(b" (deleted)") {
                Some(stripped) => (Some(stripped), true),
                None => (Some(map.path), false),
            }
        };
        let path = path.map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p)));
        let is_main = path.is_some() && exe.is_some_and(|exe| exe.ino() == map.inode);
        mappings.push(RawMapping {
            start: map.start,
            end: map.end,
            offset: map.offset,
            path,
            is_vdso,
            has_file: map.inode != 0,
            deleted,
            is_main,
        });
    }
    mappings
}

/// The pid of process `pid` in its own (innermost) pid namespace, if it is still the process
/// that started at `start_ns`.
pub fn namespace_pid(pid: u32, start_ns: u64) -> Option<u32> {
    let process = ProcProcess::new(pid as i32).ok()?;
    let status = process.status().ok()?;
    let ns_pid = match status.nstgid {
        Some(list) => u32::try_from(*list.last()?).ok()?,
        None => pid,
    };
    // Read after the status: had the pid been reused before, the start time tells.
    let stat = process.stat().ok()?;
    same_start(start_ns, stat.starttime).then_some(ns_pid)
}

/// The name of one thread, if it still exists.
pub fn thread_name(pid: u32, tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .ok()
        .map(|name| name.trim_end().to_owned())
}

/// True while `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match ProcProcess::new(pid as i32).and_then(|p| p.stat()) {
        Ok(stat) => stat.state != 'Z' && stat.state != 'X',
        Err(_) => false,
    }
}

/// True while the process `pid` that started at `start_ns` runs (its pid not reused).
pub fn is_running(pid: u32, start_ns: u64) -> bool {
    match ProcProcess::new(pid as i32).and_then(|p| p.stat()) {
        Ok(stat) => stat.state != 'Z' && stat.state != 'X' && same_start(start_ns, stat.starttime),
        Err(_) => false,
    }
}
