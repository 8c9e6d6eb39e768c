//! Resolve: turns raw samples (pids and instruction pointers) into named processes, threads,
//! mappings and functions.

mod demangle;
mod process;
mod symbols;
mod targets;

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    path::PathBuf,
    sync::Arc,
};

pub use demangle::demangle;
pub use process::{is_alive, FileKey, Mapping};
pub use symbols::{basename, Line, Lines, Symbols};
pub use targets::{Change, Decision, Labels, TargetKey, Targets, POD_GRACE, PROFILE_NAME};

use crate::collect::RawSample;
use process::{read_process, thread_name, ProcessInfo, RawMapping};
use symbols::kernel_build_id;

/// One frame of a resolved stack.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The instruction pointer as sampled (a return address for every frame but the leaf).
    pub address: u64,
    /// The mapping that holds `address`, when one does.
    pub mapping: Option<Arc<Mapping>>,
    /// Functions at `address`, innermost inlined first; empty when unknown.
    pub lines: Lines,
}

/// A sample with names: process, thread, and frames leaf first (kernel frames, then user ones).
#[derive(Debug, Clone)]
pub struct ResolvedSample {
    pub pid: u32,
    pub tid: u32,
    pub comm: Arc<str>,
    pub thread: Arc<str>,
    pub frames: Vec<Frame>,
    pub count: u64,
}

/// Resolver statistics, for reports and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResolveStats {
    pub processes: usize,
    pub binaries: usize,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

/// Process metadata and symbol caches.
pub struct Resolver {
    processes: HashMap<u32, ProcessInfo>,
    symbols: Symbols,
    kernel: Arc<Mapping>,
    next_mapping_id: u64,
}

const UNKNOWN_PROCESS: &str = "[unknown]";

/// File name of the kernel's mapping, as perf names it.
pub const KERNEL_MAPPING_NAME: &str = "[kernel.kallsyms]";

impl Resolver {
    /// `debug_dirs` hold separate debug info (`.build-id/xx/rest.debug` or debug-link targets).
    pub fn new(debug_dirs: &[PathBuf]) -> Self {
        let kernel = Arc::new(Mapping {
            id: process::KERNEL_MAPPING_ID,
            start: 0xffff_8000_0000_0000,
            end: u64::MAX,
            offset: 0,
            path: KERNEL_MAPPING_NAME.into(),
            file: None,
            build_id: kernel_build_id(),
            is_main: false,
        });
        Self {
            processes: HashMap::new(),
            symbols: Symbols::new(debug_dirs),
            kernel,
            next_mapping_id: 2,
        }
    }

    /// Reads (or rereads, after an exec) a process's name and mappings and opens its binaries
    /// while it still exists. Does nothing once the process has gone.
    pub fn observe(&mut self, pid: u32) {
        let Some((comm, raw)) = read_process(pid) else {
            return;
        };
        let mut mappings = Vec::with_capacity(raw.len());
        for raw in raw {
            let file = raw.file.filter(|key| self.open_binary(pid, *key, &raw));
            let build_id = file
                .map(|key| self.symbols.build_id(&key))
                .unwrap_or_default();
            let path = match (&raw.path, raw.is_vdso) {
                (Some(path), _) => path.to_string_lossy().into_owned(),
                (None, true) => "[vdso]".to_owned(),
                (None, false) => "[anon]".to_owned(),
            };
            self.next_mapping_id += 1;
            mappings.push(Arc::new(Mapping {
                id: self.next_mapping_id,
                start: raw.start,
                end: raw.end,
                offset: raw.offset,
                path,
                file,
                build_id,
                is_main: raw.is_main,
            }));
        }
        mappings.sort_by_key(|m| m.start);
        let threads = self
            .processes
            .remove(&pid)
            .map(|p| p.threads)
            .unwrap_or_default();
        self.processes.insert(
            pid,
            ProcessInfo {
                comm: Arc::from(comm),
                mappings,
                threads,
            },
        );
    }

    /// Forgets a process (once its samples are out).
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Forgets every process that has exited, and closes binaries no remaining process maps,
    /// so that memory stays bounded however many processes come and go. Returns the pids
    /// forgotten.
    pub fn forget_exited(&mut self) -> Vec<u32> {
        let gone: Vec<u32> = self
            .processes
            .keys()
            .copied()
            .filter(|pid| !is_alive(*pid))
            .collect();
        for pid in &gone {
            self.processes.remove(pid);
        }
        let in_use: HashSet<FileKey> = self
            .processes
            .values()
            .flat_map(|p| p.mappings.iter().filter_map(|m| m.file))
            .collect();
        self.symbols.retain_objects(&in_use);
        gone
    }

    /// The name of a known process.
    pub fn comm(&self, pid: u32) -> Option<Arc<str>> {
        self.processes.get(&pid).map(|p| p.comm.clone())
    }

    /// Processes known, live or exited.
    pub fn known_pids(&self) -> Vec<u32> {
        self.processes.keys().copied().collect()
    }

    /// Cache and table sizes.
    pub fn stats(&self) -> ResolveStats {
        ResolveStats {
            processes: self.processes.len(),
            binaries: self.symbols.objects(),
            cache_hits: self.symbols.hits,
            cache_misses: self.symbols.misses,
        }
    }

    /// Opens the binary behind a mapping once per (device, inode): through
    /// /proc/PID/map_files (works for deleted and replaced files and other mount namespaces),
    /// else through /proc/PID/root.
    fn open_binary(&mut self, pid: u32, key: FileKey, raw: &RawMapping) -> bool {
        if self.symbols.has_object(&key) {
            return true;
        }
        let by_map_files = format!("/proc/{pid}/map_files/{:x}-{:x}", raw.start, raw.end);
        let file = File::open(&by_map_files).or_else(|err| match (&raw.path, raw.deleted) {
            (Some(path), false) => {
                let rooted = PathBuf::from(format!("/proc/{pid}/root"))
                    .join(path.strip_prefix("/").unwrap_or(path));
                File::open(rooted)
            }
            _ => Err(err),
        });
        match file {
            Ok(file) => {
                self.symbols.add_object(key, file);
                true
            }
            Err(_) => false,
        }
    }

    /// Names every frame of every sample.
    pub fn resolve(&mut self, samples: &[RawSample]) -> Vec<ResolvedSample> {
        for pid in samples.iter().map(|s| s.pid).collect::<HashSet<_>>() {
            if !self.processes.contains_key(&pid) {
                self.observe(pid);
            }
        }
        self.refresh_stale_mappings(samples);
        self.load_symbols(samples);
        samples.iter().map(|s| self.resolve_one(s)).collect()
    }

    /// Rereads the mappings of live processes with addresses no mapping covers (a library
    /// loaded since the process was first seen).
    fn refresh_stale_mappings(&mut self, samples: &[RawSample]) {
        let stale: HashSet<u32> = samples
            .iter()
            .filter(|s| {
                self.processes
                    .get(&s.pid)
                    .is_some_and(|p| s.user.iter().any(|addr| p.mapping_for(*addr).is_none()))
            })
            .map(|s| s.pid)
            .collect();
        for pid in stale {
            if is_alive(pid) {
                self.observe(pid);
            }
        }
    }

    /// Symbolizes, in one batch per binary, every address not cached yet.
    fn load_symbols(&mut self, samples: &[RawSample]) {
        let mut files: HashMap<FileKey, Vec<u64>> = HashMap::new();
        let mut kernel: Vec<u64> = Vec::new();
        let mut seen: HashSet<(u32, u64)> = HashSet::new();
        for sample in samples {
            for (depth, addr) in sample.kernel.iter().enumerate() {
                let addr = lookup_address(*addr, depth);
                if seen.insert((0, addr)) && !self.symbols.is_kernel_cached(addr) {
                    kernel.push(addr);
                }
            }
            let Some(process) = self.processes.get(&sample.pid) else {
                continue;
            };
            for (depth, addr) in sample.user.iter().enumerate() {
                let Some(mapping) = process.mapping_for(*addr) else {
                    continue;
                };
                let Some(key) = mapping.file else { continue };
                let offset = file_offset(mapping, lookup_address(*addr, depth));
                if seen.insert((sample.pid, *addr)) && !self.symbols.is_cached(&key, offset) {
                    files.entry(key).or_default().push(offset);
                }
            }
        }
        if !kernel.is_empty() {
            self.symbols.load_kernel(&kernel);
        }
        for (key, mut offsets) in files {
            offsets.sort_unstable();
            offsets.dedup();
            self.symbols.load_file_offsets(&key, &offsets);
        }
    }

    fn resolve_one(&mut self, sample: &RawSample) -> ResolvedSample {
        let mut frames = Vec::with_capacity(sample.kernel.len() + sample.user.len());
        for (depth, addr) in sample.kernel.iter().enumerate() {
            frames.push(Frame {
                address: *addr,
                mapping: Some(self.kernel.clone()),
                lines: self.symbols.kernel_lines(lookup_address(*addr, depth)),
            });
        }
        let process = self.processes.get_mut(&sample.pid);
        let (comm, thread) = match process {
            Some(process) => {
                let thread = process
                    .threads
                    .entry(sample.tid)
                    .or_insert_with(|| {
                        thread_name(sample.pid, sample.tid)
                            .map(Arc::from)
                            .unwrap_or_else(|| process.comm.clone())
                    })
                    .clone();
                (process.comm.clone(), thread)
            }
            None => (Arc::from(UNKNOWN_PROCESS), Arc::from(UNKNOWN_PROCESS)),
        };
        let process = self.processes.get(&sample.pid);
        for (depth, addr) in sample.user.iter().enumerate() {
            let mapping = process.and_then(|p| p.mapping_for(*addr)).cloned();
            let lines = match mapping.as_ref().and_then(|m| m.file.map(|key| (m, key))) {
                Some((m, key)) => self
                    .symbols
                    .file_lines(&key, file_offset(m, lookup_address(*addr, depth))),
                None => Lines::from(Vec::new()),
            };
            frames.push(Frame {
                address: *addr,
                mapping,
                lines,
            });
        }
        ResolvedSample {
            pid: sample.pid,
            tid: sample.tid,
            comm,
            thread,
            frames,
            count: sample.count,
        }
    }
}

/// The address to look up: return addresses (every frame but the leaf) point after the call,
/// possibly into the next function or line, so the byte before is looked up instead.
fn lookup_address(addr: u64, depth: usize) -> u64 {
    if depth == 0 {
        addr
    } else {
        addr.saturating_sub(1)
    }
}

fn file_offset(mapping: &Mapping, addr: u64) -> u64 {
    addr - mapping.start + mapping.offset
}
