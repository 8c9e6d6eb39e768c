//! Resolve: turns raw samples (pids and instruction pointers) into named processes, threads,
//! mappings and functions.

mod demangle;
pub mod gopclntab;
mod kallsyms;
mod perfmap;
mod process;
mod symbols;
mod targets;

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

pub use demangle::demangle;
pub use perfmap::{
    parse_line as parse_perf_map_line, PerfMap, PerfMapStats, MAX_LINE as PERF_MAP_MAX_LINE,
};
pub use process::{executable_mappings, is_alive, is_running, FileKey, Mapping};
pub use symbols::{basename, Line, Lines, SkippedBinaries, Symbols};
pub use targets::{Change, Decision, Labels, TargetKey, Targets, POD_GRACE, PROFILE_NAME};

use crate::collect::{ProcessChange, ProcessKey, RawSample};
use crate::deadline::{self, Outcome};
use crate::in_root::ProcessRoot;
use process::{read_process, thread_name, ProcessInfo, RawMapping};
use profiler_common::is_exact_pc;
use symbols::kernel_build_id;

/// Bounds of the wait before a process's mappings are read again for addresses none of them
/// covers: a stray address (a JIT, a stack read mid-update) must not cost a reread every drain.
const MAPS_REREAD_MIN: Duration = Duration::from_millis(250);
const MAPS_REREAD_MAX: Duration = Duration::from_secs(30);

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
    /// The process incarnation (its `tgid` is the pid).
    pub process: ProcessKey,
    pub pid: u32,
    pub tid: u32,
    pub comm: Arc<str>,
    pub thread: Arc<str>,
    pub frames: Vec<Frame>,
    /// Times sampled on CPU, or for an off-CPU sample, nanoseconds off CPU.
    pub count: u64,
    /// True for off-CPU time.
    pub off_cpu: bool,
}

/// Resolver statistics, for reports and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResolveStats {
    pub processes: usize,
    pub binaries: usize,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Reads of /proc/PID/maps, first ones included.
    pub maps_reads: u64,
    /// Process incarnations seen since the start.
    pub processes_seen: u64,
    /// Corrupt Go function tables (`.gopclntab`), and look-ups they left unnamed.
    pub gopclntab_errors: u64,
    /// Binaries' parsed symbols dropped after going unused (see `DEFAULT_SYMBOLS_IDLE`).
    pub parses_released: u64,
    /// Binaries the symbolizer skipped, by reason.
    pub skipped_binaries: SkippedBinaries,
    /// JIT code named from perf-map files.
    pub perf_maps: PerfMapStats,
}

/// What makes two mappings the same binary for a profile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BinaryIdentity {
    BuildId(String),
    File(FileKey),
    Vdso,
}

/// Process metadata and symbol caches.
pub struct Resolver {
    processes: HashMap<ProcessKey, ProcessInfo>,
    /// The newest incarnation of each tgid.
    current: HashMap<u32, ProcessKey>,
    symbols: Symbols,
    kernel: Arc<Mapping>,
    binary_ids: HashMap<BinaryIdentity, u64>,
    next_mapping_id: u64,
    maps_reads: u64,
    processes_seen: u64,
    perf_maps: PerfMapStats,
    /// Longest one perf-map read may take (`--parse-timeout`).
    parse_timeout: Duration,
    /// When `/proc` was last read for the ends the kernel failed to report.
    swept_at: Option<Instant>,
}

/// How often `forget_ended` looks in `/proc` for processes whose exit event was lost. The
/// kernel reports every exit it can; reading every known process's stat at each drain cost
/// half the agent's steady CPU with 200 processes, for an event that is rarely lost.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

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
            load_bias: 0,
        });
        Self {
            processes: HashMap::new(),
            current: HashMap::new(),
            symbols: Symbols::new(debug_dirs),
            kernel,
            binary_ids: HashMap::new(),
            next_mapping_id: 2,
            maps_reads: 0,
            processes_seen: 0,
            perf_maps: PerfMapStats::default(),
            parse_timeout: crate::deadline::DEFAULT,
            swept_at: None,
        }
    }

    /// Takes in what the kernel said: a new incarnation is read from /proc at once (and ends
    /// the tgid's previous one); an exit marks the process ended at generation flip `flips`.
    pub fn apply(&mut self, change: &ProcessChange, flips: u64) {
        match change {
            ProcessChange::Started { process, comm } => {
                if let Some(previous) = self.current.insert(process.tgid, *process) {
                    if previous != *process {
                        self.end(&previous, flips);
                    }
                }
                self.observe(*process, comm);
            }
            ProcessChange::Exited(process) => self.end(process, flips),
        }
    }

    fn end(&mut self, process: &ProcessKey, flips: u64) {
        if let Some(info) = self.processes.get_mut(process) {
            info.ended_at.get_or_insert(flips);
        }
    }

    /// Reads (or rereads) a process's name and mappings and opens its binaries while it still
    /// exists. When it is gone (or its pid already belongs to another process), it is known
    /// by `comm` alone.
    pub fn observe(&mut self, process: ProcessKey, comm: &str) {
        self.maps_reads += 1;
        let (comm, raw) = match read_process(process.tgid, process.start_ns) {
            Some((comm, raw)) => (comm, raw),
            None => {
                if let Some(known) = self.processes.get_mut(&process) {
                    known.read_at = Instant::now();
                    known.reread_wait =
                        (known.reread_wait * 2).clamp(MAPS_REREAD_MIN, MAPS_REREAD_MAX);
                    return;
                }
                let comm = if comm.is_empty() {
                    UNKNOWN_PROCESS
                } else {
                    comm
                };
                (comm.to_owned(), Vec::new())
            }
        };
        let mappings = self.mappings_of(process.tgid, raw);
        let previous = self.processes.remove(&process);
        if previous.is_none() {
            self.processes_seen += 1;
        }
        let (threads, ended_at, reread_wait, perf_map) = match previous {
            Some(p) => {
                let found_new = mappings.len() != p.mappings.len()
                    || mappings
                        .iter()
                        .zip(&p.mappings)
                        .any(|(a, b)| a.start != b.start);
                let wait = if found_new {
                    Duration::ZERO
                } else {
                    (p.reread_wait * 2).clamp(MAPS_REREAD_MIN, MAPS_REREAD_MAX)
                };
                (p.threads, p.ended_at, wait, p.perf_map)
            }
            None => Default::default(),
        };
        self.processes.insert(
            process,
            ProcessInfo {
                comm: Arc::from(comm),
                mappings,
                threads,
                read_at: Instant::now(),
                reread_wait,
                ended_at,
                perf_map,
            },
        );
    }

    /// Opens the binaries of `raw` and gives each mapping its binary's id.
    fn mappings_of(&mut self, pid: u32, raw: Vec<RawMapping>) -> Vec<Arc<Mapping>> {
        let mut mappings = Vec::with_capacity(raw.len());
        for raw in raw {
            let file = raw.has_file.then(|| self.open_binary(pid, &raw)).flatten();
            let build_id = file
                .map(|key| self.symbols.build_id(&key))
                .unwrap_or_default();
            let path = match (&raw.path, raw.is_vdso) {
                (Some(path), _) => path.to_string_lossy().into_owned(),
                (None, true) => "[vdso]".to_owned(),
                (None, false) => "[anon]".to_owned(),
            };
            let identity = match (file, raw.is_vdso) {
                (Some(_), _) if !build_id.is_empty() => {
                    Some(BinaryIdentity::BuildId(build_id.clone()))
                }
                (Some(key), _) => Some(BinaryIdentity::File(key)),
                (None, true) => Some(BinaryIdentity::Vdso),
                (None, false) => None,
            };
            let id = match identity {
                Some(identity) => match self.binary_ids.get(&identity) {
                    Some(id) => *id,
                    None => {
                        self.next_mapping_id += 1;
                        self.binary_ids.insert(identity, self.next_mapping_id);
                        self.next_mapping_id
                    }
                },
                None => {
                    self.next_mapping_id += 1;
                    self.next_mapping_id
                }
            };
            let load_bias = file
                .and_then(|key| self.symbols.load_bias(&key, raw.start, raw.offset))
                .unwrap_or(0);
            mappings.push(Arc::new(Mapping {
                id,
                start: raw.start,
                end: raw.end,
                offset: raw.offset,
                path,
                file,
                build_id,
                is_main: raw.is_main,
                load_bias,
            }));
        }
        mappings.sort_by_key(|m| m.start);
        mappings
    }

    /// Forgets the processes that ended at least two generation flips before `flips`: by then
    /// every sample they left in the kernel's maps has been drained and resolved. Processes
    /// whose end the kernel could not report (its event lost) are found here too, by a look in
    /// `/proc` at most every `SWEEP_EVERY`.
    /// Binaries no remaining process maps are closed, so that memory stays bounded however many
    /// processes come and go. Returns the processes forgotten.
    pub fn forget_ended(&mut self, flips: u64) -> Vec<ProcessKey> {
        let sweep = self.swept_at.is_none_or(|at| at.elapsed() >= SWEEP_EVERY);
        if sweep {
            self.swept_at = Some(Instant::now());
        }
        let mut gone = Vec::new();
        for (key, info) in &mut self.processes {
            match info.ended_at {
                Some(at) if at + 2 <= flips => gone.push(*key),
                Some(_) => {}
                None => {
                    if sweep && !is_running(key.tgid, key.start_ns) {
                        info.ended_at = Some(flips);
                    }
                }
            }
        }
        for key in &gone {
            self.processes.remove(key);
            if self.current.get(&key.tgid) == Some(key) {
                self.current.remove(&key.tgid);
            }
        }
        if !gone.is_empty() {
            let in_use: HashSet<FileKey> = self
                .processes
                .values()
                .flat_map(|p| p.mappings.iter().filter_map(|m| m.file))
                .collect();
            self.symbols.retain_objects(&in_use);
            let symbols = &self.symbols;
            self.binary_ids.retain(|identity, _| match identity {
                BinaryIdentity::File(key) => in_use.contains(key),
                BinaryIdentity::BuildId(id) => symbols.has_build_id(id),
                BinaryIdentity::Vdso => true,
            });
        }
        gone
    }

    /// The name of a known process.
    pub fn comm(&self, process: &ProcessKey) -> Option<Arc<str>> {
        self.processes.get(process).map(|p| p.comm.clone())
    }

    /// Processes known, live or ended but not forgotten yet.
    pub fn known(&self) -> Vec<ProcessKey> {
        self.processes.keys().copied().collect()
    }

    /// Cache and table sizes.
    pub fn stats(&self) -> ResolveStats {
        ResolveStats {
            processes: self.processes.len(),
            binaries: self.symbols.objects(),
            cache_hits: self.symbols.hits,
            cache_misses: self.symbols.misses,
            maps_reads: self.maps_reads,
            processes_seen: self.processes_seen,
            gopclntab_errors: self.symbols.go_errors,
            parses_released: self.symbols.released,
            skipped_binaries: self.symbols.skipped,
            perf_maps: PerfMapStats {
                entries: self.perf_map_entries(),
                ..self.perf_maps
            },
        }
    }

    /// Opens the binary behind a mapping once per [`FileKey`]: through /proc/PID/map_files
    /// (works for deleted and replaced files and other mount namespaces), else by its path
    /// inside the process's root, resolved there (`openat2(RESOLVE_IN_ROOT)`), so that a
    /// container's symlinks never lead to a host file. `None` when neither can be read.
    fn open_binary(&mut self, pid: u32, raw: &RawMapping) -> Option<FileKey> {
        let name = raw.path.as_deref().unwrap_or(Path::new("[anonymous]"));
        let by_map_files = PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            raw.start, raw.end
        ));
        if let Some(key) = FileKey::of(&by_map_files) {
            if self.symbols.has_object(&key) {
                return Some(key);
            }
            if let Ok(file) = File::open(&by_map_files) {
                let root = ProcessRoot::open(pid).ok();
                self.symbols.add_object(key, file, name, root);
                return Some(key);
            }
        }
        let (Some(path), false) = (&raw.path, raw.deleted) else {
            return None;
        };
        let root = ProcessRoot::open(pid).ok()?;
        let file = root.open_regular(path).ok()?;
        let key = FileKey::of_metadata(&file.metadata().ok()?);
        if !self.symbols.has_object(&key) {
            self.symbols.add_object(key, file, path, Some(root));
        }
        Some(key)
    }

    /// Parses of one binary taking longer than `timeout` are abandoned and the binary skipped.
    pub fn set_parse_timeout(&mut self, timeout: Duration) {
        self.parse_timeout = timeout;
        self.symbols.set_parse_timeout(timeout);
    }

    /// Names every frame of every sample.
    pub fn resolve(&mut self, samples: &[RawSample]) -> Vec<ResolvedSample> {
        for process in samples.iter().map(|s| s.process).collect::<HashSet<_>>() {
            if !self.processes.contains_key(&process) {
                // Its announcement is still on the way, or was lost.
                self.observe(process, "");
            }
        }
        self.refresh_stale_mappings(samples);
        self.refresh_perf_maps(samples);
        self.load_symbols(samples);
        samples.iter().map(|s| self.resolve_one(s)).collect()
    }

    /// Rereads the mappings of live processes with addresses no mapping covers (a library
    /// loaded since the process was first seen), with a backoff per process (see
    /// [`ProcessInfo::reread_wait`]).
    fn refresh_stale_mappings(&mut self, samples: &[RawSample]) {
        let stale = self.live_processes_with(samples, |p, addr| {
            p.read_at.elapsed() >= p.reread_wait && p.mapping_for(addr).is_none()
        });
        for process in stale {
            self.observe(process, "");
        }
    }

    /// The live processes of `samples` with a user address for which `wanted` holds.
    fn live_processes_with(
        &self,
        samples: &[RawSample],
        wanted: impl Fn(&ProcessInfo, u64) -> bool,
    ) -> HashSet<ProcessKey> {
        samples
            .iter()
            .filter(|s| {
                self.processes.get(&s.process).is_some_and(|p| {
                    p.ended_at.is_none() && s.user.iter().any(|addr| wanted(p, *addr))
                })
            })
            .map(|s| s.process)
            .collect()
    }

    /// Entries held in perf maps, over all processes.
    fn perf_map_entries(&self) -> usize {
        self.processes.values().map(|p| p.perf_map.len()).sum()
    }

    /// Reads what live processes with samples in anonymous memory (JIT code) appended to their
    /// perf maps. Entries of ended processes stay until they are forgotten.
    fn refresh_perf_maps(&mut self, samples: &[RawSample]) {
        let jitted = self.live_processes_with(samples, |p, addr| {
            p.mapping_for(addr)
                .is_none_or(|m| m.file.is_none() && !m.is_vdso())
        });
        let mut total = self.perf_map_entries();
        for process in jitted {
            let Some(info) = self.processes.get_mut(&process) else {
                continue;
            };
            if !info.perf_map.due() || deadline::saturated() {
                continue;
            }
            let before = info.perf_map.len();
            let room = perfmap::MAX_ENTRIES_PER_PROCESS
                .saturating_sub(before)
                .min(perfmap::MAX_ENTRIES_TOTAL.saturating_sub(total));
            // On a thread of its own with the binaries' deadline, like their parses.
            let mut map = std::mem::take(&mut info.perf_map);
            let mut stats = self.perf_maps;
            let outcome = deadline::run(self.parse_timeout, move || {
                map.refresh(process.tgid, process.start_ns, room, &mut stats);
                (map, stats)
            });
            match outcome {
                Outcome::Done((map, stats)) => {
                    info.perf_map = map;
                    self.perf_maps = stats;
                }
                Outcome::Panicked | Outcome::TimedOut => {
                    self.perf_maps.abandoned += 1;
                    info.perf_map = PerfMap::given_up();
                    eprintln!(
                        "warning: not reading the perf map of process {} again: reading it \
                         panicked or took longer than --parse-timeout",
                        process.tgid
                    );
                }
            }
            total = total.saturating_sub(before) + info.perf_map.len();
        }
    }

    /// Symbolizes, in one batch per binary, every address not cached yet.
    fn load_symbols(&mut self, samples: &[RawSample]) {
        let mut files: HashMap<FileKey, Vec<u64>> = HashMap::new();
        let mut kernel: Vec<u64> = Vec::new();
        let mut seen_kernel: HashSet<u64> = HashSet::new();
        // Keyed as the cache is: by what is looked up, not by the raw address, since one
        // address is looked up as itself as a leaf and one byte earlier as a return address.
        let mut seen: HashSet<(FileKey, u64)> = HashSet::new();
        for sample in samples {
            for (depth, addr) in sample.kernel.iter().enumerate() {
                let addr = lookup_address(*addr, depth == 0);
                if seen_kernel.insert(addr) && !self.symbols.is_kernel_cached(addr) {
                    kernel.push(addr);
                }
            }
            let Some(process) = self.processes.get(&sample.process) else {
                continue;
            };
            for (depth, addr) in sample.user.iter().enumerate() {
                let Some(mapping) = process.mapping_for(*addr) else {
                    continue;
                };
                let Some(key) = mapping.file else { continue };
                let exact = is_exact_pc(&sample.user_exact, depth);
                let offset = file_offset(mapping, lookup_address(*addr, exact));
                if seen.insert((key, offset)) && !self.symbols.is_cached(&key, offset) {
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
        self.symbols.release_idle();
    }

    fn resolve_one(&mut self, sample: &RawSample) -> ResolvedSample {
        let mut frames = Vec::with_capacity(sample.kernel.len() + sample.user.len());
        for (depth, addr) in sample.kernel.iter().enumerate() {
            frames.push(Frame {
                address: *addr,
                mapping: Some(self.kernel.clone()),
                lines: self.symbols.kernel_lines(lookup_address(*addr, depth == 0)),
            });
        }
        let pid = sample.process.tgid;
        let process = self.processes.get_mut(&sample.process);
        let (comm, thread) = match process {
            Some(process) => {
                let thread = process
                    .threads
                    .entry(sample.tid)
                    .or_insert_with(|| {
                        thread_name(pid, sample.tid)
                            .map(Arc::from)
                            .unwrap_or_else(|| process.comm.clone())
                    })
                    .clone();
                (process.comm.clone(), thread)
            }
            None => (Arc::from(UNKNOWN_PROCESS), Arc::from(UNKNOWN_PROCESS)),
        };
        let process = self.processes.get(&sample.process);
        for (depth, addr) in sample.user.iter().enumerate() {
            let exact = is_exact_pc(&sample.user_exact, depth);
            let mapping = process.and_then(|p| p.mapping_for(*addr)).cloned();
            let lines = match mapping.as_ref().and_then(|m| m.file.map(|key| (m, key))) {
                Some((m, key)) => self
                    .symbols
                    .file_lines(&key, file_offset(m, lookup_address(*addr, exact))),
                None => Lines::from(Vec::new()),
            };
            // JIT code: anonymous memory (or memory mapped since /proc was read) that the
            // process's perf map names.
            let jit = || process?.perf_map.lookup(lookup_address(*addr, exact));
            let lines = match lines.is_empty().then(jit).flatten() {
                Some(name) => Lines::from(vec![Line {
                    function: name.clone(),
                    file: None,
                    line: 0,
                }]),
                None => lines,
            };
            frames.push(Frame {
                address: *addr,
                mapping,
                lines,
            });
        }
        ResolvedSample {
            process: sample.process,
            pid,
            tid: sample.tid,
            comm,
            thread,
            frames,
            count: sample.count,
            off_cpu: sample.off_cpu,
        }
    }
}

/// The address to look up: a return address points after its call, possibly into the next
/// function or line, so the byte before is looked up instead. Exact pcs (the leaf, a frame a
/// signal interrupted) are looked up as they are.
fn lookup_address(addr: u64, exact: bool) -> u64 {
    if exact {
        addr
    } else {
        addr.saturating_sub(1)
    }
}

/// The offset in the mapped file of `addr`, which `mapping` holds.
pub fn file_offset(mapping: &Mapping, addr: u64) -> u64 {
    addr - mapping.start + mapping.offset
}
