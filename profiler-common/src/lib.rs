//! Types shared by the kernel side (`profiler-ebpf`) and the user side (`profiler`).
//!
//! Everything here is `#[repr(C)]` and defined once, so both sides agree on the layout of every
//! map key, value and event without a second definition to keep in sync.
#![no_std]

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
    /// One `u32`: the generation the kernel writes into now.
    pub const GENERATION: &str = "GENERATION";
    /// Per-CPU counters indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Process filter: tgid to a `filter::*` value.
    pub const PID_FILTER: &str = "PID_FILTER";
    /// Processes already announced to user space (LRU).
    pub const KNOWN_PIDS: &str = "KNOWN_PIDS";
    /// Ring buffer of [`super::ProcessEvent`]s.
    pub const PROCESS_EVENTS: &str = "PROCESS_EVENTS";
}

/// Names of the load-time constants (`.rodata`) that user space sets.
pub mod globals {
    /// `u32`: one of `filter::MODE_*`.
    pub const FILTER_MODE: &str = "FILTER_MODE";
    /// `u32`: 1 to record kernel stacks.
    pub const KERNEL_STACKS: &str = "KERNEL_STACKS";
    /// `u32`: byte offset of `tgid` in `struct task_struct`, read from the kernel's BTF.
    pub const TASK_TGID_OFFSET: &str = "TASK_TGID_OFFSET";
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

/// Key of the in-kernel sample counts: one entry per (process, thread, user stack, kernel stack).
///
/// A thread runs on one CPU at a time, so two CPUs never update the same key at once; that is
/// what lets the kernel side increment counts without atomics.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    pub pid: u32,
    pub tid: u32,
    /// Id of the user stack in the stacks map, or [`NO_STACK`].
    pub user_stack: u64,
    /// Id of the kernel stack in the stacks map, or [`NO_STACK`].
    pub kernel_stack: u64,
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
    pub addrs: [u64; MAX_STACK_DEPTH],
}

impl Stack {
    /// The valid addresses, leaf first.
    pub fn frames(&self) -> &[u64] {
        let len = (self.len as usize).min(MAX_STACK_DEPTH);
        &self.addrs[..len]
    }
}

/// A process user space should look at now (its mappings), sent once per process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    pub pid: u32,
    pub kind: u32,
}

/// [`ProcessEvent::kind`]: the process was sampled for the first time (or first since exec).
pub const EVENT_NEW_PROCESS: u32 = 1;

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
}

impl Counter {
    /// Number of counters: the length of the `COUNTERS` array.
    pub const COUNT: u32 = 11;

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
        }
    }

    /// True for counters that count samples missing from the profile.
    pub const fn is_loss(self) -> bool {
        matches!(
            self,
            Counter::LostCountsMapFull
                | Counter::LostStacksMapFull
                | Counter::LostStackReadError
                | Counter::LostStackHashCollision
        )
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with no padding-dependent invariants.
    unsafe impl aya::Pod for super::SampleKey {}
    unsafe impl aya::Pod for super::Stack {}
    unsafe impl aya::Pod for super::ProcessEvent {}
}
