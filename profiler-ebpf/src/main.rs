//! Kernel side of the profiler: on-CPU stack sampling on the software cpu-clock event.
//!
//! Samples are counted in the kernel per (process, thread, user stack, kernel stack). The counts
//! and stacks live in two generations of maps: user space flips `GENERATION`, then reads and
//! clears the generation that was flipped away one whole drain interval earlier. A program that
//! read the old generation number has long finished by then, so no sample taken during a read
//! is lost or half-written. Double-buffered maps were chosen over a ring buffer of samples because
//! aggregation in the kernel keeps the data volume proportional to distinct stacks, not to the
//! sampling rate.
#![no_std]
#![no_main]
// `atomic_xadd`: bpfel has no `fetch_add`, and an exec count must not lose an add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod walk;

use core::intrinsics::AtomicOrdering;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_prandom_u32,
        bpf_get_stack, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map, perf_event},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{BtfTracePointContext, PerfEventContext},
    EbpfContext, Global,
};
use profiler_common::{
    filter, id_bytes, offcpu,
    unwind::{ProcessMappings, TableInfo, UnwindRow},
    unwinder, Counter, OffCpuBlock, ProcessEvent, ProcessKey, ProcessState, RateWindow, SampleKey,
    Stack, COMM_LEN, EVENT_EXIT, EVENT_NEW_PROCESS, EVENT_UNWIND_MISS, MAX_STACK_DEPTH, NO_STACK,
    UNWIND_MISS_INTERVAL_NS,
};

#[unsafe(no_mangle)]
static FILTER_MODE: Global<u32> = Global::new(filter::MODE_ALL);
#[unsafe(no_mangle)]
static KERNEL_STACKS: Global<u32> = Global::new(1);
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_GROUP_LEADER_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_START_BOOTTIME_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static UNWINDER: Global<u32> = Global::new(unwinder::FRAME_POINTERS);
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFFCPU_MIN_BLOCK_NS: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static OFFCPU_STATE_MASK: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFFCPU_MAX_PER_WINDOW: Global<u32> = Global::new(u32::MAX);

// Sizes here are defaults; user space sets the real ones at load time. The sample and stack
// maps are not preallocated: a stack is 1 KiB, and kernel memory (charged to the agent's memory
// cgroup) should follow the stacks of one drain interval, not the worst case.
#[map]
static COUNTS_0: HashMap<SampleKey, u64> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
#[map]
static COUNTS_1: HashMap<SampleKey, u64> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
#[map]
static STACKS_0: HashMap<u64, Stack> = HashMap::with_max_entries(8192, BPF_F_NO_PREALLOC);
#[map]
static STACKS_1: HashMap<u64, Stack> = HashMap::with_max_entries(8192, BPF_F_NO_PREALLOC);
#[map]
static GENERATION: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
/// Entries go when their process exits (`sched_process_exit`), so a long `record -- CMD` that
/// forks without end keeps room for the children still alive.
#[map]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
/// `PID_FILTER`'s marks by tgid, for tgids below `pid_max` (sized by user space, which writes
/// it through mmap): every sample and every context switch reads a mark.
#[map]
static PID_MARKS: Array<IdBytes> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
static PROCESSES: LruHashMap<u32, ProcessState> = LruHashMap::with_max_entries(16384, 0);
/// The process `track` last found announced on this CPU, and the `EXECS` count it was found
/// under: a thread that blocks again and again, or a CPU sampling one busy process, skips the
/// LRU lookup.
#[map]
static LAST_TRACKED: PerCpuArray<Tracked> = PerCpuArray::with_max_entries(1, 0);
/// Execs so far, of any process: an exec moves its process's `exec_seq`, so it makes every
/// CPU's `LAST_TRACKED` stale.
#[map]
static EXECS: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);
/// Stacks each CPU stored lately, by id modulo their number (`store_stack`).
#[map]
static RECENT_STACKS: PerCpuArray<[RecentStack; RECENT_STACK_SLOTS]> =
    PerCpuArray::with_max_entries(1, 0);
/// Scratch space for one stack: too large for the 512-byte BPF stack.
#[map]
static SCRATCH: PerCpuArray<Stack> = PerCpuArray::with_max_entries(1, 0);
/// Rows of every loaded unwind table (docs/design/0002). Sized by `--unwind-table-memory`;
/// mmapable so that user space copies a table in rather than making a syscall per row.
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
static UNWIND_TABLES: Array<TableInfo> = Array::with_max_entries(4096, 0);
/// Removed by the exec and exit tracepoints: a new image has other mappings.
#[map]
static UNWIND_MAPPINGS: HashMap<u32, ProcessMappings> =
    HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);
#[map]
static WALK_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// Off-CPU nanoseconds, in generations like `COUNTS_*` and with their stacks in `STACKS_*`.
#[map]
static OFFCPU_COUNTS_0: HashMap<SampleKey, u64> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
#[map]
static OFFCPU_COUNTS_1: HashMap<SampleKey, u64> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
/// Threads off CPU now, by tid. Preallocated: a switch-out must not allocate.
#[map]
static OFFCPU_BLOCKED: HashMap<u32, OffCpuBlock> = HashMap::with_max_entries(16384, 0);
/// Sized by user space from `pid_max`.
#[map]
static OFFCPU_MAYBE_BLOCKED: Array<IdBytes> = Array::with_max_entries(1, 0);
/// When each generation last became active, and whether user space is splitting blocks.
#[map]
static OFFCPU_FLIPS: Array<u64> = Array::with_max_entries(3, 0);
#[map]
static OFFCPU_RATE: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(1, 0);
#[map]
static OFFCPU_WALK_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Tracked {
    process: ProcessKey,
    execs: u64,
}

/// Slots of `RECENT_STACKS` per CPU.
const RECENT_STACK_SLOTS: usize = 64;

/// A stack a CPU stored, and in which generation.
#[repr(C)]
#[derive(Clone, Copy)]
struct RecentStack {
    id: u64,
    generation: u32,
    _pad: u32,
    /// The cheap parts compared for a hash collision, as `intern_hashed` does.
    len: u64,
    leaf: u64,
    root: u64,
}

/// An entry of a byte-per-id array (`id_bytes`).
type IdBytes = [u8; id_bytes::PER_ENTRY as usize];

const EEXIST: i32 = 17;
const E2BIG: i32 = 7;
/// Kernel frames `bpf_get_stack` skips in `sched_switch` (its low 8 flag bits).
const SCHED_SWITCH_SKIP: u64 = 2;

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot, and perf-event programs do not nest on one CPU: a plain add is exact.
        unsafe { *slot += 1 };
    }
}

#[perf_event]
pub fn sample(ctx: PerfEventContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if tid == 0 {
        count(Counter::Idle);
        return 0;
    }
    if !wanted(tgid) {
        count(Counter::FilteredOut);
        return 0;
    }
    let process = track(tgid, process_start_ns());

    let generation = generation();
    let (counts, stacks) = generation_maps(generation);

    let key = match key_with_kernel_stack(&ctx, stacks, generation, process, tid, 0) {
        Ok(key) => key,
        Err(counter) => {
            count(counter);
            return 0;
        }
    };
    // The walk finishes the sample, in this program or in a tail call.
    if UNWINDER.load() == unwinder::TABLES
        && walk::start(
            &ctx,
            walk::sampled_user_regs(&ctx),
            key,
            generation,
            walk::Finish::Sample,
            &WALK_PROGRAMS,
        )
    {
        return 0;
    }
    let user_stack = match user_stack(&ctx, stacks, generation) {
        Ok(id) => id,
        Err(counter) => {
            count(counter);
            return 0;
        }
    };
    count_sample(counts, &SampleKey { user_stack, ..key });
    0
}

/// The key of a sample (or block) of thread `tid` with the current kernel stack (skipping
/// `skip` innermost frames) unless kernel stacks are off; its user stack is still to come.
#[inline(always)]
fn key_with_kernel_stack<C: EbpfContext>(
    ctx: &C,
    stacks: &HashMap<u64, Stack>,
    generation: u32,
    process: ProcessKey,
    tid: u32,
    skip: u64,
) -> Result<SampleKey, Counter> {
    let kernel_stack = if KERNEL_STACKS.load() != 0 {
        store_stack(ctx, stacks, generation, skip)?
    } else {
        NO_STACK
    };
    Ok(SampleKey {
        process,
        tid,
        _pad: 0,
        user_stack: NO_STACK,
        kernel_stack,
    })
}

/// The current task's user stack by frame pointers (`bpf_get_stack`), its absence counted.
#[inline(always)]
fn user_stack<C: EbpfContext>(
    ctx: &C,
    stacks: &HashMap<u64, Stack>,
    generation: u32,
) -> Result<u64, Counter> {
    let id = store_stack(ctx, stacks, generation, BPF_F_USER_STACK as u64)?;
    if id == NO_STACK {
        count(Counter::UserStackMissing);
    }
    Ok(id)
}

/// Adds one to a sample's count (a cut stack is still a sample).
#[inline(always)]
fn count_sample(counts: &HashMap<SampleKey, u64>, key: &SampleKey) {
    add_to(counts, key, 1, Counter::Samples);
}

/// Adds `amount` to `key`'s value in `counts` and counts one `counted`, or one lost sample
/// when the map is full.
#[inline(always)]
fn add_to(counts: &HashMap<SampleKey, u64>, key: &SampleKey, amount: u64, counted: Counter) {
    if let Some(value) = counts.get_ptr_mut(key) {
        // The key holds the thread id and a thread is on one CPU at a time: no racing writer.
        unsafe { *value += amount };
    } else {
        match counts.insert(key, &amount, BPF_NOEXIST as u64) {
            Ok(()) => {}
            Err(err) if err == -EEXIST => {
                if let Some(value) = counts.get_ptr_mut(key) {
                    unsafe { *value += amount };
                }
            }
            Err(err) => {
                count(insert_loss(err, Counter::LostCountsMapFull));
                return;
            }
        }
    }
    count(counted);
}

/// The loss an insert that failed with `err` stands for: `full` when the map was full, else no
/// element was at hand (maps not preallocated allocate as the program runs).
#[inline(always)]
fn insert_loss(err: i32, full: Counter) -> Counter {
    match err == -E2BIG {
        true => full,
        false => Counter::LostMapInsertFailed,
    }
}

/// The generation programs write into now: a count of flips, whose low bit chooses the maps.
#[inline(always)]
fn generation() -> u32 {
    match GENERATION.get_ptr(0) {
        Some(generation) => unsafe { core::ptr::read_volatile(generation) },
        None => 0,
    }
}

/// The off-CPU counts of a generation.
#[inline(always)]
fn offcpu_counts(generation: u32) -> &'static HashMap<SampleKey, u64> {
    if generation & 1 == 0 {
        &OFFCPU_COUNTS_0
    } else {
        &OFFCPU_COUNTS_1
    }
}

/// The maps of a generation.
#[inline(always)]
fn generation_maps(
    generation: u32,
) -> (
    &'static HashMap<SampleKey, u64>,
    &'static HashMap<u64, Stack>,
) {
    if generation & 1 == 0 {
        (&COUNTS_0, &STACKS_0)
    } else {
        (&COUNTS_1, &STACKS_1)
    }
}

#[inline(always)]
fn wanted(tgid: u32) -> bool {
    let mark = mark(tgid);
    if FILTER_MODE.load() == filter::MODE_INCLUDED {
        mark == filter::INCLUDE
    } else {
        mark != filter::EXCLUDE && mark != filter::FOLLOW_ONLY
    }
}

/// The filter mark of `tgid` (0 for none): its byte, or past the bytes its hash entry.
#[inline(always)]
fn mark(tgid: u32) -> u8 {
    match id_byte(&PID_MARKS, tgid) {
        Some(mark) => *mark,
        None => unsafe { PID_FILTER.get(&tgid) }.copied().unwrap_or(0),
    }
}

/// Byte `id` of a byte-per-id array; None past its end (pid_max raised after the load).
#[inline(always)]
fn id_byte(bytes: &'static Array<IdBytes>, id: u32) -> Option<&'static mut u8> {
    let per_entry = id_bytes::PER_ENTRY;
    let entry = bytes.get_ptr_mut(id / per_entry)?;
    Some(unsafe { &mut (*entry)[(id % per_entry) as usize] })
}

/// `start_boottime` of the current thread group's leader: with the tgid, it names one process
/// for its whole life (threads and an exec'ing thread share it, a reused tgid does not).
#[inline(always)]
fn process_start_ns() -> u64 {
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let leader_at = TASK_GROUP_LEADER_OFFSET.load() as usize;
    let start_at = TASK_START_BOOTTIME_OFFSET.load() as usize;
    let Ok(leader) = (unsafe { bpf_probe_read_kernel(task.add(leader_at).cast::<*const u8>()) })
    else {
        return 0;
    };
    if leader.is_null() {
        return 0;
    }
    unsafe { bpf_probe_read_kernel(leader.add(start_at).cast::<u64>()) }.unwrap_or(0)
}

/// The sampled process's identity. Tells user space about an incarnation the first time it is
/// sampled, so that it reads the process's mappings while the process still exists.
#[inline(always)]
fn track(tgid: u32, start_ns: u64) -> ProcessKey {
    // Read before the state: an exec that moves the state on counts after it (a store each,
    // in that order), so a state read too early is cached under a count already stale.
    let execs = match EXECS.get_ptr(0) {
        Some(execs) => unsafe { core::ptr::read_volatile(execs) },
        None => 0,
    };
    let last = LAST_TRACKED.get_ptr_mut(0);
    if let Some(last) = last {
        let last = unsafe { &*last };
        if last.process.tgid == tgid && last.process.start_ns == start_ns && last.execs == execs {
            return last.process;
        }
    }
    let mut process = ProcessKey {
        tgid,
        exec_seq: 0,
        start_ns,
    };
    let state = match PROCESSES.get_ptr_mut(&tgid) {
        Some(state) if unsafe { (*state).start_ns } == start_ns => state,
        // First sample, or a reused tgid: a new incarnation.
        _ => {
            let fresh = ProcessState {
                start_ns,
                exec_seq: 0,
                announced: 0,
                miss_reported_ns: 0,
            };
            if PROCESSES.insert(&tgid, &fresh, 0).is_err() {
                return process;
            }
            match PROCESSES.get_ptr_mut(&tgid) {
                Some(state) => state,
                None => return process,
            }
        }
    };
    let state = unsafe { &mut *state };
    process.exec_seq = state.exec_seq;
    if state.announced == 0 {
        let event = ProcessEvent {
            process,
            kind: EVENT_NEW_PROCESS,
            _pad: 0,
            comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        };
        if PROCESS_EVENTS.output::<ProcessEvent>(&event, 0).is_ok() {
            state.announced = 1;
        } else {
            // The next sample tries again.
            count(Counter::LostProcessEvents);
            return process;
        }
    }
    if let Some(last) = last {
        unsafe { *last = Tracked { process, execs } };
    }
    process
}

/// Tells user space that a walk of `process` met a pc in none of its known mappings, unless
/// it was told less than [`UNWIND_MISS_INTERVAL_NS`] ago.
#[inline(always)]
fn report_unwind_miss(process: ProcessKey) {
    let Some(state) = PROCESSES.get_ptr_mut(&process.tgid) else {
        return;
    };
    let state = unsafe { &mut *state };
    if state.start_ns != process.start_ns {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if state.miss_reported_ns != 0
        && now.wrapping_sub(state.miss_reported_ns) < UNWIND_MISS_INTERVAL_NS
    {
        return;
    }
    let event = ProcessEvent {
        process,
        kind: EVENT_UNWIND_MISS,
        _pad: 0,
        comm: [0; COMM_LEN],
    };
    if PROCESS_EVENTS.output::<ProcessEvent>(&event, 0).is_ok() {
        state.miss_reported_ns = now;
    } else {
        count(Counter::LostProcessEvents);
    }
}

/// Reads one stack into the stacks map and returns its id: a hash of its addresses.
#[inline(always)]
fn store_stack<C: EbpfContext>(
    ctx: &C,
    stacks: &HashMap<u64, Stack>,
    generation: u32,
    flags: u64,
) -> Result<u64, Counter> {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return Err(Counter::LostStackReadError);
    };
    let buf = unsafe { &mut *buf };
    let size = core::mem::size_of::<[u64; MAX_STACK_DEPTH]>() as u32;
    let read = unsafe { bpf_get_stack(ctx.as_ptr(), buf.addrs.as_mut_ptr().cast(), size, flags) };
    if read < 0 {
        // A kernel thread, or a task in exit, has no user stack: not a lost sample.
        if flags & BPF_F_USER_STACK as u64 != 0 {
            return Ok(NO_STACK);
        }
        return Err(Counter::LostStackReadError);
    }
    let len = (read as usize / 8).min(MAX_STACK_DEPTH);
    if len == 0 {
        return Ok(NO_STACK);
    }
    if len == MAX_STACK_DEPTH {
        count(Counter::StacksTruncated);
    }
    buf.len = len as u64;
    // Only the leaf is an exact pc: every other address is a return address.
    buf.exact = [1, 0];
    let hash = stack_hash(buf, len, flags);
    // A stack this CPU stored lately in this generation: threads that block again where they
    // blocked before (a pool, a ping-pong) skip the map.
    let slot = (hash % RECENT_STACK_SLOTS as u64) as usize;
    let (leaf, root) = (buf.addrs[0], buf.addrs[len - 1]);
    let recent = RECENT_STACKS.get_ptr_mut(0);
    if let Some(recent) = recent {
        let seen = unsafe { &(*recent)[slot] };
        if seen.id == hash
            && seen.generation == generation
            && seen.len == len as u64
            && seen.leaf == leaf
            && seen.root == root
        {
            return Ok(hash);
        }
    }
    intern_hashed(stacks, buf, len, hash)?;
    if let Some(recent) = recent {
        unsafe {
            (*recent)[slot] = RecentStack {
                id: hash,
                generation,
                _pad: 0,
                len: len as u64,
                leaf,
                root,
            }
        };
    }
    Ok(hash)
}

/// Stores `buf` in the stacks map unless it is there already, and returns its id (see
/// [`stack_hash`]).
#[inline(always)]
fn intern_stack(stacks: &HashMap<u64, Stack>, buf: &Stack, seed: u64) -> Result<u64, Counter> {
    let len = buf.len as usize;
    if len == 0 || len > MAX_STACK_DEPTH {
        return Ok(NO_STACK);
    }
    let hash = stack_hash(buf, len, seed);
    intern_hashed(stacks, buf, len, hash)?;
    Ok(hash)
}

/// The id of `buf`, whose first `len` (1 to `MAX_STACK_DEPTH`) addresses are valid: an FNV-1a
/// hash of its addresses (and exact-pc bits) from a seed that tells user and kernel stacks
/// apart; never `NO_STACK`.
#[inline(always)]
fn stack_hash(buf: &Stack, len: usize, seed: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for i in 0..MAX_STACK_DEPTH {
        if i >= len {
            break;
        }
        hash ^= buf.addrs[i];
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= buf.exact[0];
    hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    hash ^= buf.exact[1];
    hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    if hash == NO_STACK {
        hash = 1;
    }
    hash
}

/// Stores `buf` (`len` addresses) under id `hash` unless it is there already.
#[inline(always)]
fn intern_hashed(
    stacks: &HashMap<u64, Stack>,
    buf: &Stack,
    len: usize,
    hash: u64,
) -> Result<(), Counter> {
    match stacks.get_ptr(&hash) {
        // Already stored: check the cheap parts (length, leaf, root) to catch a hash collision
        // rather than count this sample against another stack.
        Some(existing) => {
            let existing = unsafe { &*existing };
            let last = len.wrapping_sub(1);
            if last >= MAX_STACK_DEPTH
                || existing.len != buf.len
                || existing.addrs[0] != buf.addrs[0]
                || existing.addrs[last] != buf.addrs[last]
            {
                return Err(Counter::LostStackHashCollision);
            }
        }
        None => match stacks.insert(&hash, buf, BPF_NOEXIST as u64) {
            Ok(()) => {}
            Err(err) if err == -EEXIST => {}
            Err(err) => return Err(insert_loss(err, Counter::LostStacksMapFull)),
        },
    }
    Ok(())
}

/// Off-CPU time (docs/design/0006-off-cpu.md). `current` is still `prev` here, so its stacks
/// are read as the sampler reads them; the thread switched in gets the time since its own
/// switch-out added to its key.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    // Most switches record nothing: this path stays clear of hash lookups and clock reads
    // where it can (a storm of them is the workload that pays).
    let next: *const u8 = ctx.arg(2);
    switch_in(next);
    let prev: *const u8 = ctx.arg(1);
    let prev_state: u64 = ctx.arg(3);
    switch_out(&ctx, prev, prev_state as u32);
    0
}

/// Reads a field of a task the tracepoint passed (a BTF pointer) at a load-time constant
/// offset. The verifier checks the load against the kernel's own type, so it needs no
/// probe-read helper call: a helper call costs as much as the rest of a switch that records
/// nothing.
#[inline(always)]
fn task_field<T>(task: *const u8, offset: u32) -> T {
    unsafe { core::ptr::read_volatile(task.add(offset as usize).cast::<T>()) }
}

/// Ends the block of `next`, if it was recorded: adds its time since the last drain's flip
/// (the time before was counted by user space when it split the block) to its key.
#[inline(always)]
fn switch_in(next: *const u8) {
    let tid = task_field::<i32>(next, TASK_PID_OFFSET.load()) as u32;
    if !take_blocked_flag(tid) {
        return;
    }
    let Some(block) = (unsafe { OFFCPU_BLOCKED.get(&tid) }).copied() else {
        return;
    };
    let _ = OFFCPU_BLOCKED.remove(&tid);
    let now = unsafe { bpf_ktime_get_ns() };
    let min_block = OFFCPU_MIN_BLOCK_NS.load();
    if now.saturating_sub(block.start_ns) < min_block {
        count(Counter::OffCpuShortBlocks);
        return;
    }
    let generation = generation();
    let flip = OFFCPU_FLIPS.get(generation & 1).copied().unwrap_or(0);
    let mut from = offcpu::accounted_until(block.start_ns, flip, min_block);
    if block.start_ns < flip && OFFCPU_FLIPS.get(offcpu::SPLITTING).copied() == Some(1) {
        // User space may or may not have split this block yet: count it all here rather than
        // lose the part before the flip, and say so.
        count(Counter::OffCpuSplitRaces);
        let previous = OFFCPU_FLIPS.get(1 - (generation & 1)).copied().unwrap_or(0);
        from = offcpu::accounted_until(block.start_ns, previous, min_block);
    }
    let mut key = block.key;
    if block.generation & 1 != generation & 1 {
        // The stacks were stored before a flip: user space kept them in the older
        // generation's map while the block lasted; the count needs them in this one.
        let (_, from_stacks) = generation_maps(block.generation);
        let (_, to_stacks) = generation_maps(generation);
        for id in [&mut key.user_stack, &mut key.kernel_stack] {
            if let Err(counter) = copy_stack(*id, from_stacks, to_stacks) {
                count(counter);
                return;
            }
        }
    }
    add_to(
        offcpu_counts(generation),
        &key,
        offcpu::weighted(from, now, block.weight),
        Counter::OffCpuBlocks,
    );
}

/// Whether `tid` may have a recorded block, clearing its flag: only a thread's own switch-out
/// sets it, and that is over before the thread can be switched in anywhere. A tid past the
/// flags may, and is looked up.
#[inline(always)]
fn take_blocked_flag(tid: u32) -> bool {
    let Some(flag) = id_byte(&OFFCPU_MAYBE_BLOCKED, tid) else {
        return true;
    };
    if *flag == 0 {
        return false;
    }
    *flag = 0;
    true
}

/// Makes stack `id` present in `to` as well as in `from`.
#[inline(always)]
fn copy_stack(
    id: u64,
    from: &HashMap<u64, Stack>,
    to: &HashMap<u64, Stack>,
) -> Result<(), Counter> {
    if id == NO_STACK || unsafe { to.get(&id) }.is_some() {
        return Ok(());
    }
    let Some(stack) = from.get_ptr(&id) else {
        return Err(Counter::LostStackReadError);
    };
    match to.insert(&id, unsafe { &*stack }, BPF_NOEXIST as u64) {
        Ok(()) => Ok(()),
        Err(err) if err == -EEXIST => Ok(()),
        Err(err) => Err(insert_loss(err, Counter::LostStacksMapFull)),
    }
}

/// Starts a block of the task going off CPU (`current`) when it is wanted: its stacks now,
/// its time when it comes back.
#[inline(always)]
fn switch_out(ctx: &BtfTracePointContext, prev: *const u8, prev_state: u32) {
    let mask = OFFCPU_STATE_MASK.load();
    if (mask != 0 && prev_state & mask == 0) || prev_state & offcpu::TASK_DEAD != 0 {
        return;
    }
    // `prev` is `current`.
    let tid = task_field::<i32>(prev, TASK_PID_OFFSET.load()) as u32;
    let tgid = task_field::<i32>(prev, TASK_TGID_OFFSET.load()) as u32;
    if tid == 0 || !wanted(tgid) {
        return;
    }
    let Some(weight) = sampled() else {
        return;
    };
    let leader = task_field::<*const u8>(prev, TASK_GROUP_LEADER_OFFSET.load());
    let start_ns = match leader.is_null() {
        true => 0,
        false => task_field::<u64>(leader, TASK_START_BOOTTIME_OFFSET.load()),
    };
    let process = track(tgid, start_ns);
    let generation = generation();
    let (_, stacks) = generation_maps(generation);
    // The two innermost kernel frames are this program and `bpf_trace_run4`.
    let key = match key_with_kernel_stack(ctx, stacks, generation, process, tid, SCHED_SWITCH_SKIP)
    {
        Ok(key) => key,
        Err(counter) => {
            count(counter);
            return;
        }
    };
    if UNWINDER.load() == unwinder::TABLES
        && walk::start(
            ctx,
            walk::task_user_regs(),
            key,
            generation,
            walk::Finish::Block(weight),
            &OFFCPU_WALK_PROGRAMS,
        )
    {
        return;
    }
    match user_stack(ctx, stacks, generation) {
        Ok(user_stack) => {
            let now = unsafe { bpf_ktime_get_ns() };
            // A new window may set a new period, for later switch-outs; rolled here, where the
            // clock is read anyway (see `sampled`).
            if let Some(window) = OFFCPU_RATE.get_ptr_mut(0) {
                let max = OFFCPU_MAX_PER_WINDOW.load();
                if max != u32::MAX {
                    roll_window(unsafe { &mut *window }, max, now);
                }
            }
            record_block(&SampleKey { user_stack, ..key }, generation, weight, now);
        }
        Err(counter) => count(counter),
    }
}

/// Remembers that the thread of `key` went off CPU at `now`, standing for `weight` switch-outs.
/// The block starts when its stacks are stored, not when the switch began: the walk delays
/// whatever runs next on this CPU, and a block timed from before it would count the
/// profiler's own cost (a quarter of a pipe ping-pong's blocks, and so a bias in sampled
/// totals, whose recorded blocks alone pay it).
#[inline(always)]
fn record_block(key: &SampleKey, generation: u32, weight: u32, now: u64) {
    let block = OffCpuBlock {
        start_ns: now,
        key: *key,
        generation,
        weight,
    };
    if OFFCPU_BLOCKED.insert(&key.tid, &block, 0).is_err() {
        count(Counter::OffCpuBlockedMapFull);
        return;
    }
    if let Some(flag) = id_byte(&OFFCPU_MAYBE_BLOCKED, key.tid) {
        *flag = 1;
    }
}

/// Whether to record this switch-out, and the weight it then carries: every one while the CPU
/// stays under the rate bound; past it one in its sampling period, chosen at random, so that
/// the recorded blocks, weighted, estimate all of them without bias. The period doubles as soon
/// as a window reaches the bound and halves in a window that stays well under it.
#[inline(always)]
fn sampled() -> Option<u32> {
    let max = OFFCPU_MAX_PER_WINDOW.load();
    if max == u32::MAX {
        return Some(1);
    }
    let Some(window) = OFFCPU_RATE.get_ptr_mut(0) else {
        return Some(1);
    };
    // Per-CPU, and sched_switch runs with interrupts off: nothing else writes it meanwhile.
    let window = unsafe { &mut *window };
    window.seen = window.seen.wrapping_add(1);
    let timed = window.seen % offcpu::CLOCK_EVERY == 0;
    if timed {
        roll_window(window, max, unsafe { bpf_ktime_get_ns() });
    }
    // The low 16 bits choose within the period (at most 2^16), bit 31 when it doubles.
    let random = next_random(window);
    let picked_under = window.period.max(1);
    if random & (picked_under - 1) != 0 {
        count(Counter::OffCpuSampledOut);
        return None;
    }
    // A window that has ended must be rolled before later switch-outs are picked. With frame
    // pointers that happens when this block is recorded, which reads the clock anyway; the
    // table walker has no room for it (the verifier's limit), so here. Either way the bound
    // below applies the period this switch-out was picked under, which keeps the estimate
    // unbiased, and a new window has recorded nothing, so it never doubles another period.
    if !timed && UNWINDER.load() == unwinder::TABLES {
        roll_window(window, max, unsafe { bpf_ktime_get_ns() });
    }
    let mut weight = picked_under;
    if window.recorded >= max {
        if picked_under >= offcpu::MAX_PERIOD {
            count(Counter::OffCpuRateLimited);
            return None;
        }
        // Half as many from now on, this one included: it stays with probability 1/2.
        weight = picked_under * 2;
        window.period = weight;
        window.recorded = max / 2;
        if random >> 31 != 0 {
            count(Counter::OffCpuSampledOut);
            return None;
        }
    }
    window.recorded += 1;
    Some(weight)
}

/// A per-CPU xorshift64* draw (a helper call per switch costs more than the arithmetic),
/// seeded from the kernel's generator.
#[inline(always)]
fn next_random(window: &mut RateWindow) -> u32 {
    let mut x = window.rng;
    if x == 0 {
        x = u64::from(unsafe { bpf_get_prandom_u32() }) << 32 | 1;
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    window.rng = x;
    // The high half of the product is the well-mixed one.
    (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
}

/// Starts the window that holds now, if the current one is over, with the period the last
/// one earned.
#[inline(always)]
fn roll_window(window: &mut RateWindow, max: u32, now: u64) {
    let elapsed = now.wrapping_sub(window.start_ns);
    if elapsed >= offcpu::RATE_WINDOW_NS {
        let idle_windows = elapsed / offcpu::RATE_WINDOW_NS;
        window.period = offcpu::next_period(window.period, window.recorded, max, idle_windows);
        // Windows keep their phase: one started only at the next clock read would be late.
        window.start_ns = now - elapsed % offcpu::RATE_WINDOW_NS;
        window.recorded = 0;
    }
}

/// Follows forks: a child of a filtered process joins the filter before it can run.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let mark = mark(parent);
    if mark != filter::INCLUDE && mark != filter::FOLLOW_ONLY {
        return 0;
    }
    let child: *const u8 = ctx.arg(1);
    let offset = TASK_TGID_OFFSET.load() as usize;
    let Ok(child_tgid) = (unsafe { bpf_probe_read_kernel(child.add(offset).cast::<i32>()) }) else {
        return 0;
    };
    let child_tgid = child_tgid as u32;
    // A new thread shares its parent's tgid and is already covered.
    if child_tgid == parent {
        return 0;
    }
    // The hash first: a mark the hash lacks would outlive the process, which user space
    // cannot list and so never clears.
    match PID_FILTER.insert(&child_tgid, &filter::INCLUDE, 0) {
        Ok(()) => {
            if let Some(byte) = id_byte(&PID_MARKS, child_tgid) {
                *byte = filter::INCLUDE;
            }
            count(Counter::ForksFollowed);
        }
        Err(_) => count(Counter::ForksNotFollowed),
    }
    0
}

/// After exec a process has new mappings: its samples from now on carry the next exec number,
/// and its next sample announces it again so that user space reads the new mappings, while
/// samples from before the exec keep resolving against the old ones.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(_ctx: BtfTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(state) = PROCESSES.get_ptr_mut(&tgid) {
        let state = unsafe { &mut *state };
        state.exec_seq = state.exec_seq.wrapping_add(1);
        state.announced = 0;
    }
    if let Some(execs) = EXECS.get_ptr_mut(0) {
        // CPUs exec at once: an add that loses one would leave a stale cache valid.
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(execs, 1) };
    }
    let _ = UNWIND_MAPPINGS.remove(&tgid);
    0
}

/// When the last thread of a process exits (`group_dead`), its tgid may be reused at once:
/// forget its filter mark and what the kernel knew of it, and tell user space, which still
/// holds its mappings for the samples left in the maps.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let group_dead: u64 = ctx.arg(1);
    if group_dead & 0xff == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = PID_FILTER.remove(&tgid);
    if let Some(byte) = id_byte(&PID_MARKS, tgid) {
        *byte = 0;
    }
    let _ = UNWIND_MAPPINGS.remove(&tgid);
    count(Counter::ProcessesExited);
    let Some(state) = (unsafe { PROCESSES.get(&tgid) }).copied() else {
        return 0;
    };
    let _ = PROCESSES.remove(&tgid);
    if state.announced == 0 {
        return 0;
    }
    let event = ProcessEvent {
        process: ProcessKey {
            tgid,
            exec_seq: state.exec_seq,
            start_ns: state.start_ns,
        },
        kind: EVENT_EXIT,
        _pad: 0,
        comm: [0; COMM_LEN],
    };
    if PROCESS_EVENTS.output::<ProcessEvent>(&event, 0).is_err() {
        count(Counter::LostProcessEvents);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
