//! Collect: loads and attaches the kernel programs, keeps the process filter, and drains the
//! in-kernel counts into [`RawSample`]s, counting every sample that was lost on the way.

mod batch;
mod btf;
mod mapped;
mod pid_filter;
mod unwind;

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        BtfTracePoint, PerfEvent,
    },
    Btf, Ebpf, EbpfLoader,
};
use profiler_common::{
    filter, globals, id_bytes, maps, offcpu, unwinder, Counter, OffCpuBlock, ProcessEvent,
    SampleKey, Stack, EVENT_EXIT, EVENT_NEW_PROCESS, EVENT_UNWIND_MISS, NO_STACK,
};
use tokio::io::{unix::AsyncFd, Interest};

pub use btf::{require_btf, require_btf_tracepoint};
use pid_filter::Filter;
pub use unwind::UnwindCounters;
use unwind::{UnwindLoader, ROW_BYTES};

/// How user stacks are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unwinder {
    /// Unwind tables from `.eh_frame`/`.debug_frame` wherever a pc is covered by one, a
    /// frame-pointer step elsewhere.
    #[default]
    Auto,
    /// Frame pointers only (`bpf_get_stack`).
    Fp,
}

/// Which processes to sample.
#[derive(Clone, Debug)]
pub enum Targets {
    /// Every process but the profiler itself.
    All,
    /// Only these processes and what they fork (more can be added while sampling).
    Pids(Vec<u32>),
}

/// Which switch-outs start an off-CPU block, by the state the thread leaves the CPU in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffCpuState {
    /// Every switch-out: waits, sleeps, and preemption (time on the run queue).
    #[default]
    Any,
    /// Waits and sleeps (interruptible or not), not preemption.
    Blocked,
    /// Uninterruptible waits only (`D` state: disk I/O, some locks).
    Uninterruptible,
}

impl OffCpuState {
    /// The kernel's `prev_state` bits that select a switch-out (0: all).
    fn mask(self) -> u32 {
        match self {
            OffCpuState::Any => 0,
            OffCpuState::Blocked => u32::MAX,
            // TASK_UNINTERRUPTIBLE
            OffCpuState::Uninterruptible => 0x2,
        }
    }
}

/// Off-CPU profiling settings (`--off-cpu`).
#[derive(Clone, Debug)]
pub struct OffCpuConfig {
    /// Blocks shorter than this are left out (and counted).
    pub min_block: Duration,
    pub state: OffCpuState,
    /// Most switch-outs recorded per second on each CPU; the rest are counted and dropped.
    pub max_rate: u64,
}

/// Default `--off-cpu-min-block`; see docs/design/0006-off-cpu.md for the measurement.
pub const DEFAULT_OFF_CPU_MIN_BLOCK: Duration = Duration::from_micros(1);

/// Default `--off-cpu-max-rate`: switch-outs recorded per second per CPU.
pub const DEFAULT_OFF_CPU_MAX_RATE: u64 = 2_000;

impl Default for OffCpuConfig {
    fn default() -> Self {
        Self {
            min_block: DEFAULT_OFF_CPU_MIN_BLOCK,
            state: OffCpuState::Any,
            max_rate: DEFAULT_OFF_CPU_MAX_RATE,
        }
    }
}

/// How the kernel side samples.
#[derive(Clone, Debug)]
pub struct CollectConfig {
    pub targets: Targets,
    /// Samples per second per CPU.
    pub frequency: u64,
    /// Record kernel stacks as well as user stacks.
    pub kernel_stacks: bool,
    /// Distinct (pid, tid, stacks) per drain interval before samples are lost.
    pub counts_capacity: u32,
    /// Distinct stacks per drain interval before samples are lost.
    pub stacks_capacity: u32,
    pub unwinder: Unwinder,
    /// Kernel memory for unwind tables, in bytes (`--unwind-table-memory`).
    pub unwind_table_memory: u64,
    /// Where separate debug files (with `.debug_frame`) are looked for.
    pub debug_dirs: Vec<PathBuf>,
    /// Longest a binary's unwind table may take to build (`--parse-timeout`).
    pub parse_timeout: std::time::Duration,
    /// Off-CPU time too, when set.
    pub off_cpu: Option<OffCpuConfig>,
}

/// Default `--unwind-table-memory`: libc, python3.11 and a large Rust binary take 0.45, 1.0 and
/// 4.7 MiB at 16 bytes a row, so this holds a few dozen typical binaries.
pub const DEFAULT_UNWIND_TABLE_MEMORY: u64 = 16 << 20;

impl Default for CollectConfig {
    fn default() -> Self {
        Self {
            targets: Targets::All,
            frequency: 99,
            kernel_stacks: true,
            counts_capacity: 32 * 1024,
            stacks_capacity: 16 * 1024,
            unwinder: Unwinder::default(),
            unwind_table_memory: DEFAULT_UNWIND_TABLE_MEMORY,
            debug_dirs: Vec::new(),
            parse_timeout: crate::deadline::DEFAULT,
            off_cpu: None,
        }
    }
}

pub use profiler_common::ProcessKey;

/// One (process, thread, stack) and how many times it was sampled. Stacks are leaf first.
#[derive(Clone, Debug)]
pub struct RawSample {
    /// The process incarnation the sample was taken in.
    pub process: ProcessKey,
    pub tid: u32,
    pub user: Arc<[u64]>,
    /// Bit `i` set: `user[i]` is an exact pc (see [`profiler_common::is_exact_pc`]), else a
    /// return address.
    pub user_exact: [u64; 2],
    pub kernel: Arc<[u64]>,
    /// Times sampled on CPU, or for an off-CPU sample, nanoseconds off CPU.
    pub count: u64,
    /// True for off-CPU time.
    pub off_cpu: bool,
}

/// What the kernel said about a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessChange {
    /// Sampled for the first time, or first since a reuse of its tgid or an exec.
    Started {
        process: ProcessKey,
        /// Its name then, for a process gone before /proc could be read.
        comm: String,
    },
    /// Its whole thread group exited; samples may still wait in the maps for two drains.
    Exited(ProcessKey),
}

/// Kernel-side counters summed over CPUs, plus what user space lost while draining.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    kernel: [u64; Counter::COUNT as usize],
    /// Samples whose stack vanished before it could be read (should stay 0).
    pub lost_stack_missing: u64,
    /// Filter updates from user space that failed (the filter was full).
    pub filter_updates_failed: u64,
    /// The unwind-table loader's counters (zero with `--unwinder fp`).
    pub unwind: UnwindCounters,
}

impl Counters {
    /// The value of one kernel-side counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.kernel[counter as usize]
    }

    /// Every counter as (name, value, is a loss), for reports and metrics.
    pub fn all(&self) -> Vec<(&'static str, u64, bool)> {
        let mut all: Vec<_> = Counter::ALL
            .iter()
            .map(|c| (c.name(), self.get(*c), c.is_loss()))
            .collect();
        all.push(("stack_missing_at_drain", self.lost_stack_missing, true));
        all.push(("filter_updates_failed", self.filter_updates_failed, false));
        all.push(("unwind_tables_loaded", self.unwind.loads, false));
        all.push(("unwind_tables_evicted", self.unwind.evictions, false));
        all.push(("unwind_table_build_errors", self.unwind.build_errors, false));
        all.push(("unwind_table_build_panics", self.unwind.build_panics, false));
        all.push((
            "unwind_table_build_timeouts",
            self.unwind.build_timeouts,
            false,
        ));
        all.push((
            "unwind_table_build_truncated",
            self.unwind.build_truncated,
            false,
        ));
        all.push(("unwind_tables_not_loaded", self.unwind.not_loaded, false));
        all.push((
            "unwind_mappings_dropped",
            self.unwind.mappings_dropped,
            false,
        ));
        all.push(("unwind_mappings_reread", self.unwind.rereads, false));
        all
    }

    /// Counters that are not losses of samples but say something went missing; a summary
    /// shows them beside the losses when they are not zero.
    pub fn warnings(&self) -> Vec<(&'static str, u64)> {
        let mut warnings: Vec<_> = Counter::ALL
            .iter()
            .filter(|c| c.is_warning())
            .map(|c| (c.name(), self.get(*c)))
            .collect();
        warnings.push(("filter_updates_failed", self.filter_updates_failed));
        warnings.push(("unwind_tables_evicted", self.unwind.evictions));
        warnings.push(("unwind_table_build_errors", self.unwind.build_errors));
        warnings.push(("unwind_table_build_panics", self.unwind.build_panics));
        warnings.push(("unwind_table_build_truncated", self.unwind.build_truncated));
        warnings.push(("unwind_table_build_timeouts", self.unwind.build_timeouts));
        warnings.push(("unwind_tables_not_loaded", self.unwind.not_loaded));
        warnings.push(("unwind_mappings_dropped", self.unwind.mappings_dropped));
        warnings
    }

    /// Samples missing from the profile, all reasons together.
    pub fn lost(&self) -> u64 {
        self.all().iter().filter(|c| c.2).map(|c| c.1).sum()
    }
}

/// One generation of the double-buffered maps.
struct Generation {
    counts: HashMap<MapData, SampleKey, u64>,
    stacks: HashMap<MapData, u64, Stack>,
}

/// The off-CPU maps and what user space keeps between drains.
struct OffCpu {
    counts: [HashMap<MapData, SampleKey, u64>; 2],
    blocked: HashMap<MapData, u32, OffCpuBlock>,
    flips: Array<MapData, u64>,
    min_block_ns: u64,
    /// CLOCK_MONOTONIC ns of the last flip (0 before the first).
    last_flip_ns: u64,
    /// The parts before the last flip of the blocks still going then: they belong to the
    /// window of the generation now inactive, and are returned when it is drained.
    pending: Vec<RawSample>,
    /// Kept open: the tail-call map must outlive the programs' use of it.
    _walk_programs: Option<ProgramArray<MapData>>,
}

/// The loaded and attached kernel programs and their maps.
pub struct Collector {
    // Kept alive: dropping it detaches the programs.
    _ebpf: Ebpf,
    generations: [Generation; 2],
    active: u32,
    /// `GENERATION`: a count of flips, its low bit the active generation.
    generation: Array<MapData, u32>,
    written_generation: u32,
    counters: PerCpuArray<MapData, u64>,
    filter: Filter,
    events: RingBuf<MapData>,
    lost_stack_missing: u64,
    filter_updates_failed: u64,
    /// Generation flips so far: samples taken before a process exit noticed at flip `n` have all
    /// been read once this reaches `n + 2`.
    flips: u64,
    /// When the active generation became active.
    active_since: SystemTime,
    /// When the inactive generation was last the active one: the time its samples were taken.
    inactive_window: (SystemTime, SystemTime),
    /// The window of the samples the last drain returned.
    drained_window: (SystemTime, SystemTime),
    /// Keeps the walker's tables in the kernel (`--unwinder auto`).
    unwind: Option<UnwindLoader>,
    off_cpu: Option<OffCpu>,
}

/// Blocks the stop signals (SIGINT, SIGTERM, SIGHUP, SIGQUIT) in this thread until dropped.
/// Another thread, or this one once they are unblocked, takes them: none is lost.
struct StopSignalsHeld {
    previous: libc::sigset_t,
}

impl StopSignalsHeld {
    fn new() -> Self {
        // SAFETY: sigset_t is plain data that sigemptyset initializes; pthread_sigmask only
        // changes this thread's mask and writes the old one into `previous`.
        unsafe {
            let mut stop: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut stop);
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::sigaddset(&mut stop, signal);
            }
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &stop, &mut previous);
            StopSignalsHeld { previous }
        }
    }
}

impl Drop for StopSignalsHeld {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new` on this same thread.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut());
        }
    }
}

/// The kernel's `pid_max`, or its default when unreadable: tids above the off-CPU flags are
/// only slower to switch in, never lost.
fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(32_768)
}

const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler-ebpf"));

impl Collector {
    /// Loads the programs, fills the filter and attaches to the cpu-clock event on every online
    /// CPU. Samples flow from the moment this returns.
    pub fn start(config: &CollectConfig) -> Result<Self> {
        // A stop signal during verification makes the kernel abandon it (EAGAIN), and aya then
        // verifies again with the verifier's log on, 8 s a time for the walker: a Ctrl-C in
        // start-up cost 25 s. Held here, the signal reaches the program once it can act on it.
        let _held = StopSignalsHeld::new();
        if EBPF_OBJECT.is_empty() {
            anyhow::bail!("this profiler was built without its eBPF programs (AYA_BUILD_SKIP); rebuild it without that variable");
        }
        let btf_bytes = btf::read(&require_btf()?)?;
        let offsets = btf::member_offsets(
            &btf_bytes,
            "task_struct",
            &["tgid", "group_leader", "start_boottime", "pid"],
        )?;
        let (tgid_offset, leader_offset, start_offset, pid_offset) =
            (offsets[0], offsets[1], offsets[2], offsets[3]);
        if config.off_cpu.is_some() {
            require_btf_tracepoint(&btf_bytes, "sched_switch", "--off-cpu")?;
        }
        let off_cpu = config.off_cpu.clone().unwrap_or_default();
        let min_block_ns = off_cpu.min_block.as_nanos().min(u128::from(u64::MAX)) as u64;
        let state_mask = off_cpu.state.mask();
        let max_per_window =
            u32::try_from(off_cpu.max_rate.saturating_mul(offcpu::RATE_WINDOW_NS) / 1_000_000_000)
                .unwrap_or(u32::MAX - 1)
                .max(1);
        let pid_bytes = id_bytes::entries(pid_max());
        let blocked_flags = match config.off_cpu {
            Some(_) => pid_bytes,
            None => 1,
        };
        let btf = Btf::parse(&btf_bytes, aya::Endianness::default())
            .context("parsing the kernel's BTF")?;
        let mode = match config.targets {
            Targets::All => filter::MODE_ALL,
            Targets::Pids(_) => filter::MODE_INCLUDED,
        };
        let kernel_stacks = u32::from(config.kernel_stacks);
        let tables = config.unwinder == Unwinder::Auto;
        let unwinder = if tables {
            unwinder::TABLES
        } else {
            unwinder::FRAME_POINTERS
        };
        let row_capacity = if tables {
            u32::try_from((config.unwind_table_memory / ROW_BYTES).max(1)).unwrap_or(u32::MAX)
        } else {
            1
        };
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global(globals::FILTER_MODE, &mode, true)
            .override_global(globals::KERNEL_STACKS, &kernel_stacks, true)
            .override_global(globals::TASK_TGID_OFFSET, &tgid_offset, true)
            .override_global(globals::TASK_GROUP_LEADER_OFFSET, &leader_offset, true)
            .override_global(globals::TASK_START_BOOTTIME_OFFSET, &start_offset, true)
            .override_global(globals::UNWINDER, &unwinder, true)
            .override_global(globals::TASK_PID_OFFSET, &pid_offset, true)
            .override_global(globals::OFFCPU_MIN_BLOCK_NS, &min_block_ns, true)
            .override_global(globals::OFFCPU_STATE_MASK, &state_mask, true)
            .override_global(globals::OFFCPU_MAX_PER_WINDOW, &max_per_window, true)
            .map_max_entries(maps::UNWIND_ROWS, row_capacity)
            .map_max_entries(maps::COUNTS_0, config.counts_capacity)
            .map_max_entries(maps::COUNTS_1, config.counts_capacity)
            .map_max_entries(maps::STACKS_0, config.stacks_capacity)
            .map_max_entries(maps::STACKS_1, config.stacks_capacity)
            .map_max_entries(maps::OFFCPU_COUNTS_0, config.counts_capacity)
            .map_max_entries(maps::OFFCPU_COUNTS_1, config.counts_capacity)
            .map_max_entries(maps::OFFCPU_MAYBE_BLOCKED, blocked_flags)
            .map_max_entries(maps::PID_MARKS, pid_bytes)
            .load(EBPF_OBJECT)
            .map_err(explain)
            .context("loading the eBPF programs")?;

        let marks = take_mmapable_array(&mut ebpf, maps::PID_MARKS)?;
        let mut filter = Filter::new(take_map(&mut ebpf, maps::PID_FILTER)?, marks, pid_bytes)?;
        filter.set(std::process::id(), filter::EXCLUDE)?;
        let cpus =
            aya::util::online_cpus().map_err(|(path, err)| anyhow!("reading {path}: {err}"))?;
        let mut generations = [
            Generation {
                counts: take_map(&mut ebpf, maps::COUNTS_0)?,
                stacks: take_map(&mut ebpf, maps::STACKS_0)?,
            },
            Generation {
                counts: take_map(&mut ebpf, maps::COUNTS_1)?,
                stacks: take_map(&mut ebpf, maps::STACKS_1)?,
            },
        ];
        // Before any program that stores stacks is attached.
        warm_stack_caches(&mut generations, &cpus);
        if let Targets::Pids(pids) = &config.targets {
            for pid in pids {
                filter.set(*pid, filter::INCLUDE)?;
            }
        }

        for tracepoint in [
            "sched_process_fork",
            "sched_process_exec",
            "sched_process_exit",
        ] {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(tracepoint)
                .ok_or_else(|| anyhow!("program {tracepoint} missing from the eBPF object"))?
                .try_into()?;
            program
                .load(tracepoint, &btf)
                .map_err(explain)
                .with_context(|| format!("loading {tracepoint}"))?;
            program
                .attach()
                .with_context(|| format!("attaching to tracepoint {tracepoint}"))?;
        }

        let generation = take_map(&mut ebpf, maps::GENERATION)?;
        let counters = take_map(&mut ebpf, maps::COUNTERS)?;
        let events = take_map(&mut ebpf, maps::PROCESS_EVENTS)?;
        let unwind = if tables {
            let program: &mut PerfEvent = ebpf
                .program_mut("walk")
                .ok_or_else(|| anyhow!("program `walk` missing from the eBPF object"))?
                .try_into()?;
            program
                .load()
                .map_err(explain)
                .context("loading the stack walker")?;
            let walk = program.fd()?.try_clone()?;
            let mut programs: ProgramArray<MapData> = take_map(&mut ebpf, maps::WALK_PROGRAMS)?;
            programs
                .set(0, &walk, 0)
                .context("installing the stack walker's tail call")?;
            let rows = take_mmapable_array(&mut ebpf, maps::UNWIND_ROWS)?;
            Some(UnwindLoader::new(
                rows,
                take_map(&mut ebpf, maps::UNWIND_TABLES)?,
                take_map(&mut ebpf, maps::UNWIND_MAPPINGS)?,
                row_capacity,
                config.debug_dirs.clone(),
                config.parse_timeout,
                programs,
            )?)
        } else {
            None
        };

        let off_cpu = match config.off_cpu {
            Some(_) => Some(attach_off_cpu(&mut ebpf, &btf, tables, min_block_ns)?),
            None => None,
        };

        let program: &mut PerfEvent = ebpf
            .program_mut("sample")
            .ok_or_else(|| anyhow!("program `sample` missing from the eBPF object"))?
            .try_into()?;
        program
            .load()
            .map_err(explain)
            .context("loading the sampling program")?;
        let started = SystemTime::now();
        for cpu in cpus {
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(config.frequency),
                    false,
                )
                .with_context(|| format!("attaching to the cpu-clock event on CPU {cpu}"))?;
        }

        Ok(Self {
            _ebpf: ebpf,
            generations,
            active: 0,
            written_generation: 0,
            generation,
            counters,
            filter,
            events,
            lost_stack_missing: 0,
            filter_updates_failed: 0,
            flips: 0,
            active_since: started,
            inactive_window: (started, started),
            drained_window: (started, started),
            unwind,
            off_cpu,
        })
    }

    /// Adds a process (and, from now on, what it forks) to the filter.
    pub fn include(&mut self, pid: u32) -> Result<()> {
        Ok(self.filter.set(pid, filter::INCLUDE)?)
    }

    /// Follows what `pid` forks from now on without sampling `pid` itself.
    pub fn follow_children_of(&mut self, pid: u32) -> Result<()> {
        Ok(self.filter.set(pid, filter::FOLLOW_ONLY)?)
    }

    /// Stops following or sampling `pid`; the profiler marks itself excluded again. A full
    /// filter is counted (`filter_updates_failed`) and reported as an error.
    pub fn exclude(&mut self, pid: u32) -> Result<()> {
        self.filter
            .set(pid, filter::EXCLUDE)
            .inspect_err(|_| self.filter_updates_failed += 1)
            .with_context(|| format!("excluding process {pid} from sampling"))
    }

    /// Removes a process's mark from the filter (the kernel removes it by itself when the
    /// process exits).
    pub fn forget(&mut self, pid: u32) {
        self.filter.clear(pid);
    }

    /// Generation flips so far: see [`ProcessChange::Exited`].
    pub fn flips(&self) -> u64 {
        self.flips
    }

    /// Processes currently marked for sampling, forks followed by the kernel included.
    pub fn included(&self) -> Vec<u32> {
        self.filter.marked(filter::INCLUDE)
    }

    /// Becomes readable when processes are announced (then call [`Collector::process_changes`]).
    /// Must be called inside a tokio runtime.
    pub fn events(&self) -> Result<AsyncFd<OwnedFd>> {
        let fd = self
            .events
            .as_fd()
            .try_clone_to_owned()
            .context("watching the process events")?;
        // SAFETY: the descriptor is our own duplicate, owned by the AsyncFd until it is dropped.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| anyhow!("watching the process events: {e}"))
    }

    /// What the kernel said about processes since the last call, in order.
    pub fn process_changes(&mut self) -> Vec<ProcessChange> {
        let mut changes = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() < std::mem::size_of::<ProcessEvent>() {
                continue;
            }
            // SAFETY: the kernel side writes whole `ProcessEvent`s; read_unaligned copes with
            // the ring buffer's 8-byte alignment.
            let event: ProcessEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            match event.kind {
                EVENT_NEW_PROCESS => {
                    if let Some(unwind) = &mut self.unwind {
                        unwind.started(event.process);
                    }
                    let len = event.comm.iter().position(|b| *b == 0).unwrap_or(16);
                    changes.push(ProcessChange::Started {
                        process: event.process,
                        comm: String::from_utf8_lossy(&event.comm[..len]).into_owned(),
                    });
                }
                EVENT_UNWIND_MISS => {
                    if let Some(unwind) = &mut self.unwind {
                        unwind.missed(event.process);
                    }
                }
                EVENT_EXIT => {
                    if let Some(unwind) = &mut self.unwind {
                        unwind.exited(event.process);
                    }
                    changes.push(ProcessChange::Exited(event.process));
                }
                _ => {}
            }
        }
        changes
    }

    /// Reads and clears the generation that has been inactive since the previous drain, then
    /// makes it the active one. Samples reach user space one drain interval after they are
    /// taken; [`Collector::drained_window`] says when.
    pub fn drain(&mut self) -> Result<Vec<RawSample>> {
        let inactive = 1 - self.active;
        let mut samples = self.read_generation(inactive)?;
        let flip_ns = monotonic_ns();
        if let Some(off_cpu) = &mut self.off_cpu {
            off_cpu.flips.set(inactive, flip_ns, 0)?;
            off_cpu.flips.set(offcpu::SPLITTING, 1, 0)?;
        }
        // Never a value written before: the kernel keeps, per CPU, the last stack it stored
        // under the whole value, and the maps of an old value may have been cleared since.
        let written = (((self.written_generation >> 1) + 1) << 1) | inactive;
        self.generation.set(0, written, 0)?;
        self.written_generation = written;
        if let Some(off_cpu) = &mut self.off_cpu {
            let split = off_cpu.split(flip_ns, &self.generations, &mut self.lost_stack_missing);
            off_cpu.flips.set(offcpu::SPLITTING, 0, 0)?;
            samples.append(&mut std::mem::replace(&mut off_cpu.pending, split?));
        }
        if let Some(unwind) = &mut self.unwind {
            unwind.sampled(samples.iter().map(|s| (s.process, &s.user[..])));
        }
        let now = SystemTime::now();
        self.drained_window = self.inactive_window;
        self.inactive_window = (self.active_since, now);
        self.active_since = now;
        self.active = inactive;
        self.flips += 1;
        Ok(samples)
    }

    /// Drains both generations: for the end of a recording.
    pub fn drain_all(&mut self) -> Result<Vec<RawSample>> {
        let mut samples = self.drain()?;
        let first = self.drained_window;
        // Programs that read the old generation number finish within microseconds.
        std::thread::sleep(Duration::from_millis(20));
        samples.extend(self.drain()?);
        self.drained_window.0 = first.0;
        // Threads still off CPU at the last flip: their time up to it, which the window
        // then reaches.
        if let Some(off_cpu) = &mut self.off_cpu {
            samples.append(&mut off_cpu.pending);
            self.drained_window.1 = self.inactive_window.1;
        }
        Ok(samples)
    }

    /// When the samples of the last drain were taken: from the start of the generation it read
    /// to the flip that ended it.
    pub fn drained_window(&self) -> (SystemTime, SystemTime) {
        self.drained_window
    }

    fn read_generation(&mut self, index: u32) -> Result<Vec<RawSample>> {
        // Stacks of threads still off CPU stay: their blocks will be counted with them.
        let mut keep = HashSet::new();
        if let Some(off_cpu) = &self.off_cpu {
            for block in off_cpu.blocks()? {
                if block.generation & 1 == index {
                    keep.extend([block.key.user_stack, block.key.kernel_stack]);
                }
            }
        }
        let generation = &mut self.generations[index as usize];
        let mut stacks = StackReader::new(&generation.stacks);
        let stack_ids = stacks.read_all()?;
        let mut samples = read_counts(
            &generation.counts,
            &mut stacks,
            false,
            &mut self.lost_stack_missing,
        )?;
        if let Some(off_cpu) = &mut self.off_cpu {
            samples.extend(read_counts(
                &off_cpu.counts[index as usize],
                &mut stacks,
                true,
                &mut self.lost_stack_missing,
            )?);
        }
        let gone: Vec<u64> = stack_ids
            .into_iter()
            .filter(|id| !keep.contains(id))
            .collect();
        batch::delete(&generation.stacks, &gone).context("clearing a stacks map")?;
        Ok(samples)
    }

    /// Current totals of every counter.
    pub fn counters(&self) -> Result<Counters> {
        let mut counters = Counters {
            lost_stack_missing: self.lost_stack_missing,
            filter_updates_failed: self.filter_updates_failed,
            unwind: self
                .unwind
                .as_ref()
                .map(|u| u.counters())
                .unwrap_or_default(),
            ..Default::default()
        };
        for counter in Counter::ALL {
            let per_cpu = self.counters.get(&(counter as u32), 0)?;
            counters.kernel[counter as usize] = per_cpu.iter().sum();
        }
        Ok(counters)
    }
}

/// Reads stacks of one generation's map, each once.
struct StackReader<'a> {
    map: &'a HashMap<MapData, u64, Stack>,
    read: StdHashMap<u64, (Arc<[u64]>, [u64; 2])>,
    /// Set by [`StackReader::read_all`]: a stack not in `read` is not in the map either, and
    /// looking it up would only cost a system call per lost sample.
    whole: bool,
}

impl<'a> StackReader<'a> {
    fn new(map: &'a HashMap<MapData, u64, Stack>) -> Self {
        let mut read = StdHashMap::new();
        read.insert(NO_STACK, (Arc::from(Vec::new()), [0; 2]));
        Self {
            map,
            read,
            whole: false,
        }
    }

    /// Reads every stack of the map at once (a few system calls, not one per stack) and
    /// returns their ids.
    fn read_all(&mut self) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        batch::for_each(self.map, false, |id, stack| {
            self.read
                .insert(*id, (Arc::from(stack.frames()), stack.exact));
            ids.push(*id);
        })
        .context("reading a stacks map")?;
        self.whole = true;
        Ok(ids)
    }

    /// Stack `id` (addresses, exact-pc bits), or None when it is not in the map.
    fn get(&mut self, id: u64) -> Option<(Arc<[u64]>, [u64; 2])> {
        if let Some(stack) = self.read.get(&id) {
            return Some(stack.clone());
        }
        if self.whole {
            return None;
        }
        let stack = self.map.get(&id, 0).ok()?;
        let stack = (Arc::from(stack.frames()), stack.exact);
        self.read.insert(id, stack.clone());
        Some(stack)
    }

    /// The sample of `key` with its stacks, or None (counted in `lost`) when one is missing.
    fn sample(&mut self, key: &SampleKey, count: u64, off_cpu: bool) -> Option<RawSample> {
        match (self.get(key.user_stack), self.get(key.kernel_stack)) {
            (Some((user, user_exact)), Some((kernel, _))) => Some(RawSample {
                process: key.process,
                tid: key.tid,
                user,
                user_exact,
                kernel,
                count,
                off_cpu,
            }),
            _ => None,
        }
    }
}

/// Reads and clears one counts map; samples whose stacks are missing are counted in `lost`.
fn read_counts(
    counts: &HashMap<MapData, SampleKey, u64>,
    stacks: &mut StackReader<'_>,
    off_cpu: bool,
    lost: &mut u64,
) -> Result<Vec<RawSample>> {
    let mut samples = Vec::new();
    batch::for_each(counts, true, |key, count| {
        match stacks.sample(key, *count, off_cpu) {
            Some(sample) => samples.push(sample),
            // Off-CPU values are nanoseconds: a lost block counts once.
            None => *lost += if off_cpu { 1 } else { *count },
        }
    })
    .context("reading a counts map")?;
    Ok(samples)
}

impl OffCpu {
    /// The threads off CPU now.
    fn blocks(&self) -> Result<Vec<OffCpuBlock>> {
        let mut blocks = Vec::new();
        batch::for_each(&self.blocked, false, |_, block| blocks.push(*block))
            .context("reading the off-CPU blocks map")?;
        Ok(blocks)
    }

    /// Splits the blocks still going at the flip at `flip_ns`: returns their time before it
    /// (since the previous flip, or their start), which the window that just ended holds.
    fn split(
        &mut self,
        flip_ns: u64,
        generations: &[Generation; 2],
        lost: &mut u64,
    ) -> Result<Vec<RawSample>> {
        let blocks = self.blocks()?;
        let mut readers = [
            StackReader::new(&generations[0].stacks),
            StackReader::new(&generations[1].stacks),
        ];
        let mut split = Vec::new();
        for block in blocks {
            let start = block.start_ns;
            if start >= flip_ns || flip_ns - start < self.min_block_ns {
                continue;
            }
            let from = offcpu::accounted_until(start, self.last_flip_ns, self.min_block_ns);
            let reader = &mut readers[(block.generation & 1) as usize];
            let blocked = offcpu::weighted(from, flip_ns, block.weight);
            match reader.sample(&block.key, blocked, true) {
                Some(sample) => split.push(sample),
                None => *lost += 1,
            }
        }
        self.last_flip_ns = flip_ns;
        Ok(split)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the kernel's `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes `now` only.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Loads and attaches the off-CPU programs: the walker's continuation first (`--unwinder
/// auto`), so that no switch-out runs without it.
fn attach_off_cpu(ebpf: &mut Ebpf, btf: &Btf, tables: bool, min_block_ns: u64) -> Result<OffCpu> {
    let walk_programs = if tables {
        let program: &mut BtfTracePoint = ebpf
            .program_mut("walk_offcpu")
            .ok_or_else(|| anyhow!("program `walk_offcpu` missing from the eBPF object"))?
            .try_into()?;
        program
            .load("sched_switch", btf)
            .map_err(explain)
            .context("loading the off-CPU stack walker")?;
        let walk = program.fd()?.try_clone()?;
        let mut programs: ProgramArray<MapData> = take_map(ebpf, maps::OFFCPU_WALK_PROGRAMS)?;
        programs
            .set(0, &walk, 0)
            .context("installing the off-CPU stack walker's tail call")?;
        Some(programs)
    } else {
        None
    };
    let off_cpu = OffCpu {
        counts: [
            take_map(ebpf, maps::OFFCPU_COUNTS_0)?,
            take_map(ebpf, maps::OFFCPU_COUNTS_1)?,
        ],
        blocked: take_map(ebpf, maps::OFFCPU_BLOCKED)?,
        flips: take_map(ebpf, maps::OFFCPU_FLIPS)?,
        min_block_ns,
        last_flip_ns: 0,
        pending: Vec::new(),
        _walk_programs: walk_programs,
    };
    let program: &mut BtfTracePoint = ebpf
        .program_mut("sched_switch")
        .ok_or_else(|| anyhow!("program `sched_switch` missing from the eBPF object"))?
        .try_into()?;
    program
        .load("sched_switch", btf)
        .map_err(explain)
        .context("loading the off-CPU program (tp_btf/sched_switch)")?;
    program
        .attach()
        .context("attaching to the BTF tracepoint sched_switch")?;
    Ok(off_cpu)
}

/// Stacks inserted on each CPU at start-up to fill its element cache: more than a switch-out
/// or a sample stores (two stacks) before interrupts are back on.
const WARM_STACKS: u64 = 4;

/// Fills each CPU's cache of free elements for the stack maps before a program stores one.
/// Maps that are not preallocated take elements from a per-CPU cache that the kernel refills
/// only once interrupts are back on (`bpf_mem_alloc`, by irq_work), and a new map's cache holds
/// one element of a stack's size: the first switch-out or sample on each CPU, which stores
/// two stacks with interrupts off, found it empty (`map_insert_failed`, one per CPU, in every
/// recording). Inserts from a thread on that CPU start the refill there, and removing them
/// gives their elements back to that CPU's cache. Best effort: a CPU this process may not run
/// on is skipped, and whatever is still lost is counted.
fn warm_stack_caches(generations: &mut [Generation], cpus: &[u32]) {
    let empty = Stack {
        len: 0,
        exact: [0; 2],
        addrs: [0; profiler_common::MAX_STACK_DEPTH],
    };
    // A thread of its own: the pinning goes with it.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for &cpu in cpus {
                let cpu = cpu as usize;
                if cpu >= rustix::thread::CpuSet::MAX_CPU {
                    // Past what this affinity mask can name: left cold, its losses counted.
                    continue;
                }
                let mut set = rustix::thread::CpuSet::new();
                set.set(cpu);
                if rustix::thread::sched_setaffinity(None, &set).is_err() {
                    continue;
                }
                for generation in generations.iter_mut() {
                    // No program runs yet: these ids meet no stack of theirs.
                    for id in 0..WARM_STACKS {
                        let _ = generation.stacks.insert(id, empty, 0);
                    }
                    for id in 0..WARM_STACKS {
                        let _ = generation.stacks.remove(&id);
                    }
                }
            }
        });
    });
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// An array map's data itself, for the maps user space mmaps rather than reads through aya.
fn take_mmapable_array(ebpf: &mut Ebpf, name: &str) -> Result<MapData> {
    match ebpf.take_map(name) {
        Some(Map::Array(data)) => Ok(data),
        _ => Err(anyhow!("map {name} missing or not an array")),
    }
}

/// Names the cause of the kernel errors users can act on: no BPF at all, or no permission.
fn explain(err: impl std::error::Error + Send + Sync + 'static) -> anyhow::Error {
    let text = format!("{:#}", anyhow::Error::new(err));
    if text.contains("Function not implemented") {
        anyhow!(
            "this kernel has no BPF support (the bpf system call is not implemented; \
             CONFIG_BPF_SYSCALL=y is needed): {text}"
        )
    } else if text.contains("Operation not permitted") {
        anyhow!(
            "{text}: loading BPF programs needs root or the CAP_BPF and CAP_PERFMON capabilities"
        )
    } else {
        anyhow!(text)
    }
}
