//! What is known about one process: its name, its threads' names and its executable mappings,
//! read from /proc when the process is first seen and kept after it exits.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use procfs::process::{MMapPath, Process as ProcProcess};

/// Key of a file on disk: device and inode, the same for every process that maps it.
pub type FileKey = (i32, i32, u64);

/// One executable mapping of a process.
#[derive(Debug)]
pub struct Mapping {
    /// Unique for the life of the resolver; aggregate keys pprof mappings by it.
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
}

/// [`Mapping::id`] of the kernel's one mapping.
pub const KERNEL_MAPPING_ID: u64 = 1;

impl Mapping {
    /// True for the kernel's mapping (`[kernel.kallsyms]`).
    pub fn is_kernel(&self) -> bool {
        self.id == KERNEL_MAPPING_ID
    }
}

/// A process's metadata.
#[derive(Debug)]
pub struct ProcessInfo {
    pub comm: Arc<str>,
    /// Executable mappings, sorted by start address.
    pub mappings: Vec<Arc<Mapping>>,
    pub threads: HashMap<u32, Arc<str>>,
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
    pub file: Option<FileKey>,
    pub deleted: bool,
    pub is_main: bool,
}

/// Reads the process's name and executable mappings; `None` once it has exited.
pub fn read_process(pid: u32) -> Option<(String, Vec<RawMapping>)> {
    let process = ProcProcess::new(pid as i32).ok()?;
    let comm = process.stat().ok()?.comm;
    let maps = process.maps().ok()?;
    let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok();
    let mut mappings = Vec::new();
    for map in maps {
        if !map.perms.contains(procfs::process::MMPermissions::EXECUTE) {
            continue;
        }
        let (path, is_vdso, deleted) = match &map.pathname {
            MMapPath::Path(path) => {
                let text = path.to_string_lossy();
                match text.strip_suffix(" (deleted)") {
                    Some(stripped) => (Some(PathBuf::from(stripped)), false, true),
                    None => (Some(path.clone()), false, false),
                }
            }
            MMapPath::Vdso => (None, true, false),
            _ => (None, false, false),
        };
        let file = (map.inode != 0).then_some((map.dev.0, map.dev.1, map.inode));
        let is_main = exe.as_ref().is_some_and(|exe| {
            use std::os::unix::fs::MetadataExt as _;
            exe.ino() == map.inode && path.is_some()
        });
        mappings.push(RawMapping {
            start: map.address.0,
            end: map.address.1,
            offset: map.offset,
            path,
            is_vdso,
            file,
            deleted,
            is_main,
        });
    }
    Some((comm, mappings))
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
