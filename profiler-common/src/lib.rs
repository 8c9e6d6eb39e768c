//! Types shared by the kernel side (`profiler-ebpf`) and the user side (`profiler`).
//!
//! Everything here is `#[repr(C)]` and defined once, so both sides agree on the layout of every
//! map key, value and event without a second definition to keep in sync.
#![no_std]

pub mod proc_maps;
pub mod unwind;

/// Deepest stack the kernel side records. Matches the kernel's `PERF_MAX_STACK_DEPTH` default.
pub const MAX_STACK_DEPTH: usize = 127;

/// Stack id meaning "no stack" (a kernel thread has no user stack, `--no-kernel` drops kernel ones).
pub const NO_STACK: u64 = 0;

/// Names of the kernel maps, so the loader never spells one differently from the program.
pub mod maps {
    /// Sample counts of generation 0, keyed by [`super::SampleKey`].
    pub const COUNTS_0: &str = "COUNTS_0";
    /// Sample counts of generation 1.
    pub const COUNTS_1: &str = "COUNTS_1";
    /// Stacks of generation 0, keyed by stack id.
    pub const STACKS_0: &str = "STACKS_0";
    /// Stacks of generation 1.
    pub const STACKS_1: &str = "STACKS_1";
    /// One `u32`: the generation the kernel writes into now is its low bit; the rest counts
    /// flips, so that a value never comes back.
    pub const GENERATION: &str = "GENERATION";
    /// Per-CPU counters indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Process filter: tgid to a `filter::*` value. The list of every mark, for user space to
    /// read back and for tgids past `PID_MARKS`.
    pub const PID_FILTER: &str = "PID_FILTER";
    /// The marks of `PID_FILTER` again, one byte per tgid below `pid_max` ([`super::id_bytes`],
    /// `BPF_F_MMAPABLE`): the programs read a mark with an array load instead of a hash
    /// lookup, which is most of what a context switch that records nothing costs.
    pub const PID_MARKS: &str = "PID_MARKS";
    /// What the kernel knows of each sampled process: tgid to [`super::ProcessState`] (LRU).
    pub const PROCESSES: &str = "PROCESSES";
    /// Ring buffer of [`super::ProcessEvent`]s.
    pub const PROCESS_EVENTS: &str = "PROCESS_EVENTS";
    /// Every loaded unwind table's rows, one array (`BPF_F_MMAPABLE`, written through mmap).
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    /// Table slot to [`super::unwind::TableInfo`]: where its rows are.
    pub const UNWIND_TABLES: &str = "UNWIND_TABLES";
    /// tgid to [`super::unwind::ProcessMappings`]: which table covers which addresses.
    pub const UNWIND_MAPPINGS: &str = "UNWIND_MAPPINGS";
    /// Program array holding the walker's continuation (`walk`), for tail calls.
    pub const WALK_PROGRAMS: &str = "WALK_PROGRAMS";
    /// Off-CPU nanoseconds of generation 0, keyed by [`super::SampleKey`].
    pub const OFFCPU_COUNTS_0: &str = "OFFCPU_COUNTS_0";
    /// Off-CPU nanoseconds of generation 1.
    pub const OFFCPU_COUNTS_1: &str = "OFFCPU_COUNTS_1";
    /// Threads off CPU now: tid to [`super::OffCpuBlock`].
    pub const OFFCPU_BLOCKED: &str = "OFFCPU_BLOCKED";
    /// One byte per tid ([`super::id_bytes`]): set while the tid may
    /// have a block in `OFFCPU_BLOCKED`, so that the switch-ins of all other threads skip the
    /// hash lookup.
    pub const OFFCPU_MAYBE_BLOCKED: &str = "OFFCPU_MAYBE_BLOCKED";
    /// `u64`s: [`super::offcpu::FLIP_0`], [`super::offcpu::FLIP_1`], [`super::offcpu::SPLITTING`].
    pub const OFFCPU_FLIPS: &str = "OFFCPU_FLIPS";
    /// Program array holding the off-CPU walker's continuation (`walk_offcpu`).
    pub const OFFCPU_WALK_PROGRAMS: &str = "OFFCPU_WALK_PROGRAMS";
}

/// Off-CPU profiling (docs/design/0006-off-cpu.md).
pub mod offcpu {
    /// Slot of `OFFCPU_FLIPS`: when generation 0 last became active (CLOCK_MONOTONIC ns).
    pub const FLIP_0: u32 = 0;
    /// Slot of `OFFCPU_FLIPS`: when generation 1 last became active.
    pub const FLIP_1: u32 = 1;
    /// Slot of `OFFCPU_FLIPS`: 1 while user space splits the blocks that span the last flip.
    pub const SPLITTING: u32 = 2;
    /// Width of the window the per-CPU rate bound counts switches in.
    pub const RATE_WINDOW_NS: u64 = 10_000_000;
    /// A switch-out not recorded reads the clock (to see a window end) once in this many:
    /// a clock read costs as much as the rest of that path. So a CPU whose storm has ended
    /// records at its old period for at most this many switch-outs.
    pub const CLOCK_EVERY: u32 = 16;
    /// Longest sampling period of the rate bound: one switch-out in this many.
    pub const MAX_PERIOD: u32 = 1 << 16;

    /// The sampling period for the next window, from the last one's: it halves after a window
    /// that recorded a quarter of the bound or less, and a CPU that recorded nothing for two
    /// windows starts again at 1 (the period doubles within a window, as soon as it reaches the
    /// bound). So a switch storm is sampled and every switch-out of a quiet CPU is recorded.
    #[inline(always)]
    pub fn next_period(period: u32, recorded: u32, max: u32, idle_windows: u64) -> u32 {
        if idle_windows >= 2 {
            1
        } else if recorded <= max / 4 {
            (period / 2).max(1)
        } else {
            period.max(1)
        }
    }

    /// `prev_state` bit of a task that is exiting: its last switch is no block.
    pub const TASK_DEAD: u32 = 0x80;

    /// The blocked time a recorded block stands for: `from..to` times the switch-outs it
    /// represents (`weight`, at least 1). The kernel, when the thread comes back, and user
    /// space, when it splits a block at a flip, must weigh alike.
    #[inline(always)]
    pub fn weighted(from: u64, to: u64, weight: u32) -> u64 {
        // Both factors are clamped so that the product fits: a checked or saturating multiply
        // lowers to a 128-bit one, which BPF lacks. 2^48 ns is 78 hours in one block.
        let blocked = to.saturating_sub(from).min((1 << 48) - 1);
        blocked * u64::from(weight.clamp(1, MAX_PERIOD))
    }

    /// Where the part of a block that started at `start` and is still going at `flip` ends up
    /// accounted: user space splits a block at a flip once it has lasted `min_block`, so the
    /// time before `flip` is counted there and only the rest remains. The kernel and user
    /// space both use this, so they never count the same nanoseconds twice.
    #[inline(always)]
    pub fn accounted_until(start: u64, flip: u64, min_block: u64) -> u64 {
        if flip > start && flip - start >= min_block {
            flip
        } else {
            start
        }
    }
}

/// Arrays of one byte per process or thread id (`PID_MARKS`, `OFFCPU_MAYBE_BLOCKED`), an index
/// in front of a hash: a byte store needs no atomics, and an array load no hashing. Id `n` is
/// byte `n % PER_ENTRY` of entry `n / PER_ENTRY`, which is byte `n` of the array's memory.
pub mod id_bytes {
    /// Ids per array entry.
    pub const PER_ENTRY: u32 = 64;

    /// Entries that cover every id below `pid_max`. An id past them (pid_max raised after the
    /// load) is looked up in the hash behind the array.
    pub fn entries(pid_max: u32) -> u32 {
        pid_max.div_ceil(PER_ENTRY).max(1)
    }
}

/// Names of the load-time constants (`.rodata`) that user space sets.
pub mod globals {
    /// `u32`: one of `filter::MODE_*`.
    pub const FILTER_MODE: &str = "FILTER_MODE";
    /// `u32`: 1 to record kernel stacks.
    pub const KERNEL_STACKS: &str = "KERNEL_STACKS";
    /// `u32`: byte offset of `tgid` in `struct task_struct`, read from the kernel's BTF.
    pub const TASK_TGID_OFFSET: &str = "TASK_TGID_OFFSET";
    /// `u32`: byte offset of `group_leader` in `struct task_struct`.
    pub const TASK_GROUP_LEADER_OFFSET: &str = "TASK_GROUP_LEADER_OFFSET";
    /// `u32`: byte offset of `start_boottime` in `struct task_struct`.
    pub const TASK_START_BOOTTIME_OFFSET: &str = "TASK_START_BOOTTIME_OFFSET";
    /// `u32`: one of `unwinder::*`.
    pub const UNWINDER: &str = "UNWINDER";
    /// `u32`: byte offset of `pid` in `struct task_struct`.
    pub const TASK_PID_OFFSET: &str = "TASK_PID_OFFSET";
    /// `u64`: blocks shorter than this (ns) are left out (`--off-cpu-min-block`).
    pub const OFFCPU_MIN_BLOCK_NS: &str = "OFFCPU_MIN_BLOCK_NS";
    /// `u32`: 0 for every switch-out, else only those whose `prev_state` has one of these bits.
    pub const OFFCPU_STATE_MASK: &str = "OFFCPU_STATE_MASK";
    /// `u32`: most switch-outs recorded per CPU per [`super::offcpu::RATE_WINDOW_NS`].
    pub const OFFCPU_MAX_PER_WINDOW: &str = "OFFCPU_MAX_PER_WINDOW";
}

/// Values of the `UNWINDER` global: how the kernel side reads user stacks.
pub mod unwinder {
    /// Frame pointers only, with `bpf_get_stack`.
    pub const FRAME_POINTERS: u32 = 0;
    /// The unwind tables wherever a pc is covered, a frame-pointer step elsewhere.
    pub const TABLES: u32 = 1;
}

/// Values of the process filter and the modes that read it.
pub mod filter {
    /// Sample every process except those marked [`EXCLUDE`].
    pub const MODE_ALL: u32 = 0;
    /// Sample only processes marked [`INCLUDE`].
    pub const MODE_INCLUDED: u32 = 1;

    /// Sample this process and add the processes it forks.
    pub const INCLUDE: u8 = 1;
    /// Never sample this process.
    pub const EXCLUDE: u8 = 2;
    /// Do not sample this process, but include the processes it forks (the profiler itself while
    /// it starts `-- CMD`, so that no fork of CMD's can race the filter update).
    pub const FOLLOW_ONLY: u8 = 3;
}

/// One process incarnation: a tgid is reused once its process is gone, and an exec gives the
/// same tgid a new image, so neither the tgid alone nor the start time alone says whose
/// mappings and labels a sample needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessKey {
    /// The thread group id: what user space calls the pid.
    pub tgid: u32,
    /// Execs since the kernel side first saw this process (0 before the first one it saw).
    pub exec_seq: u32,
    /// The thread group leader's `start_boottime` in nanoseconds: field 22 of /proc/PID/stat,
    /// in clock ticks there.
    pub start_ns: u64,
}

/// Key of the in-kernel sample counts: one entry per (process, thread, user stack, kernel stack).
///
/// A thread runs on one CPU at a time, so two CPUs never update the same key at once; that is
/// what lets the kernel side increment counts without atomics.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    pub process: ProcessKey,
    /// The sampled thread's id.
    pub tid: u32,
    pub _pad: u32,
    /// Id of the user stack in the stacks map, or [`NO_STACK`].
    pub user_stack: u64,
    /// Id of the kernel stack in the stacks map, or [`NO_STACK`].
    pub kernel_stack: u64,
}

/// The kernel's record of a sampled process, in the `PROCESSES` map keyed by tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessState {
    /// Matches [`ProcessKey::start_ns`]; a different one means the tgid was reused.
    pub start_ns: u64,
    /// Matches [`ProcessKey::exec_seq`]; the exec tracepoint moves it on.
    pub exec_seq: u32,
    /// 1 once user space was told of this incarnation.
    pub announced: u32,
    /// CLOCK_MONOTONIC ns of the last [`EVENT_UNWIND_MISS`] sent for it (0: none yet).
    pub miss_reported_ns: u64,
}

/// A stack as the kernel side stores it: instruction pointers, leaf first.
///
/// Stacks are address arrays keyed by a hash of their content rather than `bpf_get_stackid`
/// ids, so that a second unwinder (.eh_frame tables for binaries without frame pointers) can
/// fill the same map and user space never notices which unwinder produced a stack.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Stack {
    /// Number of valid entries in `addrs`.
    pub len: u64,
    /// Bit `i` set: `addrs[i]` is an exact pc (the leaf, or a frame a signal interrupted),
    /// symbolized as is. Clear: a return address, symbolized one byte earlier (inside the call).
    pub exact: [u64; 2],
    pub addrs: [u64; MAX_STACK_DEPTH],
}

impl Stack {
    /// The valid addresses, leaf first.
    pub fn frames(&self) -> &[u64] {
        let len = (self.len as usize).min(MAX_STACK_DEPTH);
        &self.addrs[..len]
    }
}

/// Whether frame `i` of a stack with these [`Stack::exact`] bits is an exact pc.
pub fn is_exact_pc(exact: &[u64; 2], i: usize) -> bool {
    i < MAX_STACK_DEPTH && exact[i >> 6] & (1 << (i & 63)) != 0
}

/// A thread off CPU: when it went, and the key its blocked time will be counted under.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OffCpuBlock {
    /// CLOCK_MONOTONIC ns at the switch-out.
    pub start_ns: u64,
    /// Process, thread and stacks at the switch-out.
    pub key: SampleKey,
    /// The generation whose stacks map holds the stacks.
    pub generation: u32,
    /// Switch-outs this one stands for: its CPU's sampling period when it was recorded (0 is
    /// read as 1). Its blocked time counts this many times over.
    pub weight: u32,
}

/// Per-CPU state of the off-CPU rate bound.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RateWindow {
    /// Start of the current window (CLOCK_MONOTONIC ns).
    pub start_ns: u64,
    /// Switch-outs recorded in it.
    pub recorded: u32,
    /// One switch-out in `period` (a power of two; 0 is read as 1) is recorded, at random.
    pub period: u32,
    /// Wanted switch-outs seen, which times the clock reads of those not recorded.
    pub seen: u32,
    pub _pad: u32,
    /// State of the CPU's random draws (0 until seeded).
    pub rng: u64,
}

/// Length of a task's `comm`.
pub const COMM_LEN: usize = 16;

/// A process event for user space: a new incarnation to read /proc of while it lives, or the
/// end of one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    pub process: ProcessKey,
    /// [`EVENT_NEW_PROCESS`] or [`EVENT_EXIT`].
    pub kind: u32,
    pub _pad: u32,
    /// The process's name when the event was sent, NUL-padded: names a process that exits
    /// before user space reads /proc.
    pub comm: [u8; COMM_LEN],
}

/// [`ProcessEvent::kind`]: the process was sampled for the first time (or first since exec).
pub const EVENT_NEW_PROCESS: u32 = 1;

/// [`ProcessEvent::kind`]: the whole thread group exited; its last samples are still in the maps.
pub const EVENT_EXIT: u32 = 2;

/// [`ProcessEvent::kind`]: the walker met a pc in none of the process's known mappings (a
/// library mapped after user space read /proc/PID/maps: at exec, ld.so maps them a moment
/// later), so user space should read them again. At most one per process per
/// [`UNWIND_MISS_INTERVAL_NS`].
pub const EVENT_UNWIND_MISS: u32 = 3;

/// The least time between two [`EVENT_UNWIND_MISS`] of one process.
pub const UNWIND_MISS_INTERVAL_NS: u64 = 10_000_000;

/// Kernel-side counters, one slot each in the per-CPU `COUNTERS` array.
///
/// Each counter is declared here once with its name and meaning; user space reports them all
/// by iterating [`Counter::ALL`], so a new way to lose a sample cannot go unreported.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Samples counted into the profile.
    Samples = 0,
    /// Samples of the idle task (no process was on the CPU).
    Idle,
    /// Samples of processes outside the filter.
    FilteredOut,
    /// Samples lost because the counts map was full.
    LostCountsMapFull,
    /// Samples lost because the stacks map was full.
    LostStacksMapFull,
    /// Samples lost because the kernel could not read the stack.
    LostStackReadError,
    /// Samples whose user stack was unavailable (kept, without user frames).
    UserStackMissing,
    /// Stacks cut at [`MAX_STACK_DEPTH`] frames (kept, truncated).
    StacksTruncated,
    /// Process announcements lost because the ring buffer was full.
    LostProcessEvents,
    /// Processes added to the filter because a filtered process forked them.
    ForksFollowed,
    /// Samples lost because a different stack already had the same hash.
    LostStackHashCollision,
    /// Forked processes of a filtered process that could not be added: the filter was full.
    ForksNotFollowed,
    /// Processes that exited with all their threads (the kernel forgot their filter entries).
    ProcessesExited,
    /// User stacks whose walk stopped at a pc of a mapping with no table loaded (yet).
    UnwindNoTable,
    /// User stacks whose walk stopped at a pc no FDE of its binary covers.
    UnwindNoCfi,
    /// User stacks whose walk stopped at a rule the kernel step does not implement.
    UnwindUnsupported,
    /// User stacks whose walk stopped because the stack could not be read.
    UnwindReadFault,
    /// User stacks whose walk stopped at an impossible frame (CFA not above rsp).
    UnwindBadFrame,
    /// User stacks whose walk stopped at a pc in no file mapping known to the kernel (JIT,
    /// anonymous memory, a library loaded since the process's mappings were read).
    UnwindPcUnmapped,
    /// User stacks whose walk stopped at the frame limit (also counted in `stacks_truncated`).
    UnwindFrameLimit,
    /// Frame-pointer steps taken where no table covered a pc.
    UnwindFramePointerSteps,
    /// Off-CPU blocks (or parts of one, split at a drain) counted into the profile.
    OffCpuBlocks,
    /// Off-CPU blocks shorter than `--off-cpu-min-block`, left out.
    OffCpuShortBlocks,
    /// Switch-outs not recorded because their CPU hit the off-CPU rate bound at the longest
    /// sampling period.
    OffCpuRateLimited,
    /// Switch-outs left out by sampling while their CPU switched faster than the rate bound:
    /// the recorded ones count for them (their weight), so their time is estimated, not lost.
    OffCpuSampledOut,
    /// Switch-outs not recorded because the map of blocked threads was full.
    OffCpuBlockedMapFull,
    /// Blocks that ended while user space was splitting them at a drain: their time before
    /// the drain may be counted twice (in both intervals).
    OffCpuSplitRaces,
    /// Samples (or blocks) lost because an insert into a map that was not full failed: maps
    /// that are not preallocated allocate as the program runs, and `sched_switch`, which runs
    /// with interrupts off, cannot wait for the allocator's refill (or the bucket was busy on
    /// this CPU).
    LostMapInsertFailed,
}

impl Counter {
    /// Number of counters: the length of the `COUNTERS` array.
    pub const COUNT: u32 = 28;

    /// Every counter, in slot order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Samples,
        Counter::Idle,
        Counter::FilteredOut,
        Counter::LostCountsMapFull,
        Counter::LostStacksMapFull,
        Counter::LostStackReadError,
        Counter::UserStackMissing,
        Counter::StacksTruncated,
        Counter::LostProcessEvents,
        Counter::ForksFollowed,
        Counter::LostStackHashCollision,
        Counter::ForksNotFollowed,
        Counter::ProcessesExited,
        Counter::UnwindNoTable,
        Counter::UnwindNoCfi,
        Counter::UnwindUnsupported,
        Counter::UnwindReadFault,
        Counter::UnwindBadFrame,
        Counter::UnwindPcUnmapped,
        Counter::UnwindFrameLimit,
        Counter::UnwindFramePointerSteps,
        Counter::OffCpuBlocks,
        Counter::OffCpuShortBlocks,
        Counter::OffCpuRateLimited,
        Counter::OffCpuBlockedMapFull,
        Counter::OffCpuSplitRaces,
        Counter::OffCpuSampledOut,
        Counter::LostMapInsertFailed,
    ];

    /// Stable snake_case name, used in reports and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Samples => "samples",
            Counter::Idle => "idle",
            Counter::FilteredOut => "filtered_out",
            Counter::LostCountsMapFull => "counts_map_full",
            Counter::LostStacksMapFull => "stacks_map_full",
            Counter::LostStackReadError => "stack_read_error",
            Counter::UserStackMissing => "user_stack_missing",
            Counter::StacksTruncated => "stacks_truncated",
            Counter::LostProcessEvents => "process_events_lost",
            Counter::ForksFollowed => "forks_followed",
            Counter::LostStackHashCollision => "stack_hash_collision",
            Counter::ForksNotFollowed => "forks_not_followed",
            Counter::ProcessesExited => "processes_exited",
            Counter::UnwindNoTable => "unwind_stop_no_table",
            Counter::UnwindNoCfi => "unwind_stop_no_cfi",
            Counter::UnwindUnsupported => "unwind_stop_unsupported_rule",
            Counter::UnwindReadFault => "unwind_stop_read_fault",
            Counter::UnwindBadFrame => "unwind_stop_bad_frame",
            Counter::UnwindPcUnmapped => "unwind_stop_pc_unmapped",
            Counter::UnwindFrameLimit => "unwind_stop_frame_limit",
            Counter::UnwindFramePointerSteps => "unwind_frame_pointer_steps",
            Counter::OffCpuBlocks => "offcpu_blocks",
            Counter::OffCpuShortBlocks => "offcpu_short_blocks",
            Counter::OffCpuRateLimited => "offcpu_rate_limited",
            Counter::OffCpuBlockedMapFull => "offcpu_blocked_map_full",
            Counter::OffCpuSplitRaces => "offcpu_split_races",
            Counter::OffCpuSampledOut => "offcpu_sampled_out",
            Counter::LostMapInsertFailed => "map_insert_failed",
        }
    }

    /// True for counters that say something went missing without being a number of samples
    /// (frames of a stack cut short included): they belong in every summary beside the losses
    /// when they are not zero.
    pub const fn is_warning(self) -> bool {
        matches!(
            self,
            Counter::LostProcessEvents
                | Counter::ForksNotFollowed
                | Counter::UnwindNoTable
                | Counter::UnwindNoCfi
                | Counter::UnwindUnsupported
                | Counter::UnwindReadFault
                | Counter::UnwindBadFrame
                | Counter::UnwindPcUnmapped
                | Counter::UnwindFrameLimit
                | Counter::OffCpuSplitRaces
        )
    }

    /// True for counters that count samples missing from the profile.
    pub const fn is_loss(self) -> bool {
        matches!(
            self,
            Counter::LostCountsMapFull
                | Counter::LostStacksMapFull
                | Counter::LostStackReadError
                | Counter::LostStackHashCollision
                | Counter::OffCpuRateLimited
                | Counter::OffCpuBlockedMapFull
                | Counter::LostMapInsertFailed
        )
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with no padding-dependent invariants.
    unsafe impl aya::Pod for super::SampleKey {}
    unsafe impl aya::Pod for super::ProcessKey {}
    unsafe impl aya::Pod for super::ProcessState {}
    unsafe impl aya::Pod for super::Stack {}
    unsafe impl aya::Pod for super::ProcessEvent {}
    unsafe impl aya::Pod for super::OffCpuBlock {}
}

#[cfg(test)]
mod tests {
    use super::id_bytes::{entries, PER_ENTRY};
    use super::offcpu::{next_period, weighted, MAX_PERIOD};

    #[test]
    fn the_id_bytes_cover_every_id_below_pid_max() {
        for pid_max in [1, 63, 64, 65, 32_768, 4_194_304] {
            let entries = entries(pid_max);
            // The highest id, pid_max - 1, has its byte; a whole spare entry is waste.
            assert!((pid_max - 1) / PER_ENTRY < entries, "{pid_max}");
            assert!(
                entries == 1 || (entries - 1) * PER_ENTRY < pid_max,
                "{pid_max}"
            );
        }
        assert_eq!(entries(0), 1, "an array map needs an entry");
        assert_eq!(entries(4_194_304), 65_536);
    }

    #[test]
    fn a_weighted_block_stands_for_its_weight_in_switch_outs() {
        assert_eq!(weighted(100, 350, 1), 250);
        // Weight 0 (a block recorded before weights existed) counts once, not never.
        assert_eq!(weighted(100, 350, 0), 250);
        assert_eq!(weighted(100, 350, 4), 1_000);
        // A clock that went backwards is no block; a huge product is clamped, never wraps.
        assert_eq!(weighted(350, 100, 4), 0);
        assert_eq!(weighted(0, u64::MAX, u32::MAX), ((1 << 48) - 1) << 16);
    }

    #[test]
    fn the_sampling_period_halves_under_a_quarter_and_resets_after_idle_windows() {
        // Well under the bound: halves, down to 1.
        assert_eq!(next_period(8, 5, 20, 1), 4);
        assert_eq!(next_period(1, 0, 20, 1), 1);
        // Between a quarter of it and the bound: stays.
        assert_eq!(next_period(8, 6, 20, 1), 8);
        assert_eq!(next_period(8, 20, 20, 1), 8);
        // A CPU quiet for two windows records everything again.
        assert_eq!(next_period(MAX_PERIOD, 20, 20, 2), 1);
        // A zeroed per-CPU slot reads as 1.
        assert_eq!(next_period(0, 10, 20, 1), 1);
    }
}
