//! The user-stack walker: the unwind tables wherever a pc is covered by one, a frame-pointer step
//! elsewhere (docs/design/0002).
//!
//! A program walks [`FRAMES_PER_PROGRAM`] frames, then tail-calls its continuation (itself:
//! `walk` for samples, `walk_offcpu` for switch-outs, as a tail call stays within one program
//! type) to go on; the state between programs is in the per-CPU `WALK_STATE`. The program that
//! ends the walk stores the stack and counts the sample or records the block, so a walk cut
//! short for any reason still counts, with the frames it has.

use aya_ebpf::{
    bindings::{bpf_perf_event_data, pt_regs, BPF_F_USER_STACK},
    helpers::{
        bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_task_pt_regs,
    },
    macros::{btf_tracepoint, map, perf_event},
    maps::{PerCpuArray, ProgramArray},
    programs::{BtfTracePointContext, PerfEventContext},
    EbpfContext,
};
use profiler_common::{
    unwind::{
        find_mapping, find_row, frame_pointer_step, lookup_pc, step, ProcessMappings, Regs,
        StepResult, StopReason, NO_TABLE,
    },
    Counter, SampleKey, Stack, MAX_STACK_DEPTH, NO_STACK,
};

use crate::{
    count, count_sample, generation_maps, intern_stack, record_block, report_unwind_miss,
    OFFCPU_WALK_PROGRAMS, UNWIND_MAPPINGS, UNWIND_ROWS, UNWIND_TABLES, WALK_PROGRAMS,
};

/// Frames per program: the verifier explores every path of each one, and 8 frames went past
/// its million instructions; 127 frames take 32 tail calls of the 33 allowed.
const FRAMES_PER_PROGRAM: usize = 4;

/// What the end of a walk does with the stack.
#[derive(Clone, Copy)]
pub enum Finish {
    /// Counts one on-CPU sample.
    Sample,
    /// Records an off-CPU block with this weight (at least 1).
    Block(u32),
}

/// A walk in progress, carried from one program to the next.
#[repr(C)]
pub struct WalkState {
    stack: Stack,
    regs: Regs,
    key: SampleKey,
    generation: u32,
    /// 1 when `regs.rip` is a return address.
    is_return_address: u32,
    /// Weight of the off-CPU block (see `OffCpuBlock::weight`); 0 for an on-CPU sample. A
    /// u64 where the walk's layout had its start time: the walker verifies near the
    /// verifier's limit, and a new layout took it past.
    block_weight: u64,
}

/// One state per CPU serves both walks: the cpu-clock sampler runs from a timer interrupt and
/// sched_switch with interrupts off, so neither walk can interrupt the other on one CPU.
#[map]
static WALK_STATE: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(1, 0);

/// Starts the walk of the current task's user stack from `regs` (None: a kernel thread) for
/// `key` (its user stack still to be filled in); `programs` holds the continuation of the
/// program type of `ctx`. False when the continuation is not installed yet (`record` starts
/// sampling while the verifier still checks it): the caller then takes the frame-pointer path,
/// and nothing has been recorded.
#[inline(always)]
pub fn start<C: EbpfContext>(
    ctx: &C,
    regs: Option<Regs>,
    key: SampleKey,
    generation: u32,
    finish_as: Finish,
    programs: &ProgramArray,
) -> bool {
    let Some(state) = WALK_STATE.get_ptr_mut(0) else {
        count(Counter::LostStackReadError);
        return true;
    };
    let state = unsafe { &mut *state };
    state.key = key;
    state.generation = generation;
    state.stack.len = 0;
    state.stack.exact = [0, 0];
    state.is_return_address = 0;
    state.block_weight = match finish_as {
        Finish::Sample => 0,
        Finish::Block(weight) => u64::from(weight.max(1)),
    };
    let Some(regs) = regs else {
        // A kernel thread: no user stack, as with frame pointers.
        count(Counter::UserStackMissing);
        finish(state, None, matches!(finish_as, Finish::Block(_)));
        return true;
    };
    state.regs = regs;
    // The caller's own checks leave no room for frames under the verifier's limit: every
    // frame is walked in the continuation.
    // SAFETY: `programs` holds the continuation, a program of the same type as this one.
    unsafe { programs.tail_call(ctx, 0) };
    // The first tail call of a chain cannot hit the kernel's limit: the slot is empty.
    false
}

/// The continuation: the next frames of the walk `sample` (or an earlier `walk`) began.
#[perf_event]
pub fn walk(ctx: PerfEventContext) -> u32 {
    if let Some(state) = WALK_STATE.get_ptr_mut(0) {
        step_frames(&ctx, unsafe { &mut *state }, &WALK_PROGRAMS, false);
    }
    0
}

/// The continuation of a switch-out's walk (`sched_switch`, or an earlier `walk_offcpu`).
#[btf_tracepoint(function = "sched_switch")]
pub fn walk_offcpu(ctx: BtfTracePointContext) -> i32 {
    if let Some(state) = WALK_STATE.get_ptr_mut(0) {
        step_frames(&ctx, unsafe { &mut *state }, &OFFCPU_WALK_PROGRAMS, true);
    }
    0
}

/// Walks up to [`FRAMES_PER_PROGRAM`] frames; then finishes the sample (the block, when
/// `off_cpu`) or hands on. `off_cpu` is a constant of each program, so that neither holds the
/// other's finish: the walker verifies near the verifier's instruction limit.
#[inline(always)]
fn step_frames<C: EbpfContext>(
    ctx: &C,
    state: &mut WalkState,
    programs: &ProgramArray,
    off_cpu: bool,
) {
    let tgid = state.key.process.tgid;
    let mappings = unsafe { UNWIND_MAPPINGS.get(&tgid) }.filter(|m| m.process == state.key.process);
    for _ in 0..FRAMES_PER_PROGRAM {
        let n = state.stack.len as usize;
        if n >= MAX_STACK_DEPTH {
            count(Counter::StacksTruncated);
            finish(state, Some(StopReason::FrameLimit), off_cpu);
            return;
        }
        state.stack.addrs[n] = state.regs.rip;
        if state.is_return_address == 0 {
            state.stack.exact[n >> 6] |= 1 << (n & 63);
        }
        state.stack.len = n as u64 + 1;
        match unwind_one(&mut state.regs, state.is_return_address != 0, mappings) {
            StepResult::Caller => state.is_return_address = 1,
            StepResult::Interrupted => state.is_return_address = 0,
            StepResult::Stop(reason) => {
                finish(state, Some(reason), off_cpu);
                return;
            }
        }
    }
    // SAFETY: `programs` holds this program's own continuation.
    unsafe { programs.tail_call(ctx, 0) };
    // Only reached when the tail call failed (its limit, or no program): keep what we have.
    finish(state, Some(StopReason::FrameLimit), off_cpu);
}

/// One frame: the table's rule where one covers the pc; else, where the frame pointer looks
/// valid, a frame-pointer step.
#[inline(always)]
fn unwind_one(
    regs: &mut Regs,
    is_return_address: bool,
    mappings: Option<&ProcessMappings>,
) -> StepResult {
    let pc = lookup_pc(regs.rip, is_return_address);
    match table_step(pc, regs, mappings) {
        StepResult::Stop(
            reason @ (StopReason::NoTable | StopReason::NoCfi | StopReason::Unmapped),
        ) => match frame_pointer_step(regs, read_user) {
            StepResult::Stop(StopReason::BadFrame) => StepResult::Stop(reason),
            other => {
                count(Counter::UnwindFramePointerSteps);
                other
            }
        },
        other => other,
    }
}

#[inline(always)]
fn table_step(pc: u64, regs: &mut Regs, mappings: Option<&ProcessMappings>) -> StepResult {
    let Some(mappings) = mappings else {
        return StepResult::Stop(StopReason::NoTable);
    };
    let Some(index) = find_mapping(mappings.len, pc, |i| {
        mappings
            .mappings
            .get(opaque(i) as usize)
            .map(|m| (m.start, m.end))
    }) else {
        return StepResult::Stop(StopReason::Unmapped);
    };
    let Some(mapping) = mappings.mappings.get(opaque(index) as usize) else {
        return StepResult::Stop(StopReason::Unmapped);
    };
    if mapping.table == NO_TABLE {
        return StepResult::Stop(StopReason::NoTable);
    }
    let Some(table) = UNWIND_TABLES.get(mapping.table) else {
        return StepResult::Stop(StopReason::NoTable);
    };
    if table.seq != mapping.table_seq || table.len == 0 {
        return StepResult::Stop(StopReason::NoTable);
    }
    let offset = pc.wrapping_sub(mapping.bias);
    if offset > u32::MAX as u64 {
        return StepResult::Stop(StopReason::NoCfi);
    }
    let first = table.first_row;
    let Some(row) = find_row(table.len, offset as u32, |i| {
        UNWIND_ROWS.get(first.wrapping_add(i)).map(|row| row.pc)
    }) else {
        return StepResult::Stop(StopReason::NoCfi);
    };
    let Some(row) = UNWIND_ROWS.get(first.wrapping_add(row)) else {
        return StepResult::Stop(StopReason::NoCfi);
    };
    step(row, regs, read_user)
}

/// `value`, hidden from the optimizer: the search's own logic proves its indexes in bounds, so
/// LLVM drops the bounds checks, but the verifier cannot follow that proof and needs them.
#[inline(always)]
fn opaque(value: u32) -> u32 {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&value) }
}

#[inline(always)]
fn read_user(address: u64) -> Option<u64> {
    unsafe { bpf_probe_read_user(address as *const u64) }.ok()
}

/// The user-mode registers of the sampled task: the sample's own when it interrupted user
/// code, else those the task saved on entering the kernel. `None` for kernel threads.
#[inline(always)]
pub fn sampled_user_regs(ctx: &PerfEventContext) -> Option<Regs> {
    let data = ctx.as_ptr() as *const bpf_perf_event_data;
    let sampled = unsafe { &(*data).regs };
    if sampled.cs & 3 == 3 {
        return Some(Regs {
            rip: sampled.rip,
            rsp: sampled.rsp,
            rbp: sampled.rbp,
        });
    }
    task_user_regs()
}

/// The user-mode registers the current task saved on entering the kernel. `None` for kernel
/// threads.
#[inline(always)]
pub fn task_user_regs() -> Option<Regs> {
    let task = unsafe { bpf_get_current_task_btf() };
    let saved = unsafe { bpf_task_pt_regs(task) } as *const pt_regs;
    if saved.is_null() {
        return None;
    }
    let read = |field: *const u64| unsafe { bpf_probe_read_kernel(field) }.ok();
    let cs = read(unsafe { &raw const (*saved).cs })?;
    if cs & 3 != 3 {
        return None;
    }
    let rip = read(unsafe { &raw const (*saved).rip })?;
    let rsp = read(unsafe { &raw const (*saved).rsp })?;
    let rbp = read(unsafe { &raw const (*saved).rbp })?;
    (rip != 0).then_some(Regs { rip, rsp, rbp })
}

/// Counts why the walk stopped, stores the stack and counts the sample (records the block,
/// when `off_cpu`).
#[inline(always)]
fn finish(state: &mut WalkState, stop: Option<StopReason>, off_cpu: bool) {
    let counter = match stop {
        None | Some(StopReason::EndOfStack) => None,
        Some(StopReason::NoTable) => Some(Counter::UnwindNoTable),
        Some(StopReason::NoCfi) => Some(Counter::UnwindNoCfi),
        Some(StopReason::Unsupported) => Some(Counter::UnwindUnsupported),
        Some(StopReason::ReadFault) => Some(Counter::UnwindReadFault),
        Some(StopReason::BadFrame) => Some(Counter::UnwindBadFrame),
        Some(StopReason::Unmapped) => Some(Counter::UnwindPcUnmapped),
        Some(StopReason::FrameLimit) => Some(Counter::UnwindFrameLimit),
    };
    if let Some(counter) = counter {
        count(counter);
    }
    if stop == Some(StopReason::Unmapped) {
        report_unwind_miss(state.key.process);
    }
    let (counts, stacks) = generation_maps(state.generation);
    let user_stack = if state.stack.len == 0 {
        NO_STACK
    } else {
        match intern_stack(stacks, &state.stack, BPF_F_USER_STACK as u64) {
            Ok(id) => id,
            Err(counter) => {
                count(counter);
                return;
            }
        }
    };
    let key = SampleKey {
        user_stack,
        ..state.key
    };
    if off_cpu {
        let now = unsafe { bpf_ktime_get_ns() };
        record_block(&key, state.generation, state.block_weight as u32, now);
    } else {
        count_sample(counts, &key);
    }
}
