//! Compact unwind rows compiled from `.eh_frame`/`.debug_frame`, and the step that walks one frame.
//!
//! User space (`profiler-unwind`) compiles the rows; the kernel walker and the userspace simulator
//! both find a row with [`find_row`] and apply it with [`step`], so what the tests check is what
//! the kernel runs. Everything here is bounded: a fixed number of search iterations, no recursion,
//! no loop that depends on the data, as the BPF verifier requires. x86-64 only.

/// One row of an unwind table: from `pc` up to the next row's `pc`, how to find the caller.
///
/// 12 bytes, sorted by `pc`. Kinds and rules are plain bytes rather than Rust enums because the
/// kernel reads them out of a map, where an out-of-range enum value would be undefined behaviour.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// Offset of the first instruction the row covers from the table's base address.
    pub pc: u32,
    /// How to compute the CFA, or why there is none: one of [`kind`].
    pub kind: u8,
    /// Where the caller's rbp is: one of [`rbp`].
    pub rbp_rule: u8,
    /// Operand of `rbp_rule`.
    pub rbp_offset: i16,
    /// Operand of `kind`: an offset, or for the deref kinds [`UnwindRow::deref_operands`].
    pub cfa_offset: i32,
}

/// Row kinds. The caller's return address is always at CFA-8 (x86-64 `call`), except for
/// [`kind::SIGNAL`], whose registers come from the signal frame.
pub mod kind {
    /// CFA = rsp + `cfa_offset`.
    pub const CFA_RSP: u8 = 0;
    /// CFA = rbp + `cfa_offset`.
    pub const CFA_RBP: u8 = 1;
    /// CFA = *(rsp + off) + add, `(off, add)` packed in `cfa_offset` (stack realignment, OCaml).
    pub const CFA_DEREF_RSP: u8 = 2;
    /// CFA = *(rbp + off) + add (gcc's realigned functions: `*(rbp-8)`).
    pub const CFA_DEREF_RBP: u8 = 3;
    /// A PLT stub: CFA = rsp + 8, plus 8 more when `(rip & 15) >= cfa_offset` (the lazy-binding
    /// push), the one expression binutils emits for `.plt` (11 for `.plt`, 10 for `.plt.sec`).
    pub const PLT: u8 = 4;
    /// A signal trampoline (`__restore_rt`): rsp points at the `ucontext`, and the interrupted
    /// rip, rsp and rbp are in its `sigcontext` at rsp + `cfa_offset`.
    pub const SIGNAL: u8 = 5;
    /// No FDE covers this pc: the table cannot say. Distinct from [`END_OF_STACK`] so that a
    /// missing table is never mistaken for a clean end.
    pub const NO_CFI: u8 = 6;
    /// The CFI marks the return address undefined (`_start`, thread entry): the stack ends here.
    pub const END_OF_STACK: u8 = 7;
    /// A CFA or return-address rule the step does not implement (another register, another
    /// expression, an offset that does not fit).
    pub const UNSUPPORTED: u8 = 8;
}

/// Rules for the caller's rbp.
pub mod rbp {
    /// rbp is the same in the caller (callee-saved and not yet saved, or never touched).
    pub const UNCHANGED: u8 = 0;
    /// The caller's rbp is saved at CFA + `rbp_offset`.
    pub const AT_CFA: u8 = 1;
    /// The caller's rbp is saved at rbp + `rbp_offset` (gcc's realigned functions).
    pub const AT_RBP: u8 = 2;
    /// The caller's rbp cannot be recovered (undefined, or a rule the step does not implement):
    /// it becomes [`super::RBP_UNKNOWN`], and a later rule that needs it stops the walk.
    pub const UNKNOWN: u8 = 3;
}

/// Value of [`Regs::rbp`] once the caller's rbp could not be recovered. No rbp-based rule is ever
/// applied to it: such a frame stops with [`StopReason::Unsupported`].
pub const RBP_UNKNOWN: u64 = u64::MAX;

/// Offset of `struct sigcontext` from rsp when a handler has returned into `__restore_rt`
/// (x86-64 `rt_sigframe` without `pretcode`: `uc_flags`, `uc_link`, `uc_stack`, then mcontext).
pub const SIGCONTEXT_OFFSET: i32 = 40;
/// Offsets of the saved registers in `struct sigcontext` (x86-64).
const SIGCONTEXT_RBP: u64 = 10 * 8;
const SIGCONTEXT_RSP: u64 = 15 * 8;
const SIGCONTEXT_RIP: u64 = 16 * 8;

/// Iterations of [`find_row`]: enough for [`MAX_TABLE_ROWS`] rows.
pub const SEARCH_ITERATIONS: u32 = 21;
/// Most rows one table may hold (2^21 - 1, 24 MiB), so that [`find_row`] always converges.
pub const MAX_TABLE_ROWS: u32 = (1 << SEARCH_ITERATIONS) - 1;

impl UnwindRow {
    /// Packs `*(reg + off) + add` operands into `cfa_offset`: `off` in the low 16 bits, `add` in
    /// the high 16. `None` when either does not fit.
    pub fn pack_deref(off: i64, add: u64) -> Option<i32> {
        let off = i16::try_from(off).ok()?;
        let add = u16::try_from(add).ok()?;
        Some(((add as u32) << 16 | off as u16 as u32) as i32)
    }

    /// The `(off, add)` of a deref kind, as packed by [`UnwindRow::pack_deref`].
    pub fn deref_operands(&self) -> (i64, u64) {
        let raw = self.cfa_offset as u32;
        (raw as u16 as i16 as i64, (raw >> 16) as u64)
    }

    /// Whether two rows give the same rule (their pcs aside): adjacent equal rows are merged.
    pub fn same_rule(&self, other: &UnwindRow) -> bool {
        self.kind == other.kind
            && self.rbp_rule == other.rbp_rule
            && self.rbp_offset == other.rbp_offset
            && self.cfa_offset == other.cfa_offset
    }
}

/// The registers the walk tracks: enough for every rule above.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub rip: u64,
    pub rsp: u64,
    /// [`RBP_UNKNOWN`] once a frame lost it.
    pub rbp: u64,
}

/// Why a walk stopped before reaching the end of the stack, or that it did reach it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StopReason {
    /// The CFI says the stack ends here: a complete stack.
    EndOfStack = 0,
    /// The executable has a table, but no FDE covers the pc.
    NoCfi,
    /// The row's rule is one the step does not implement.
    Unsupported,
    /// Reading the stack failed (unmapped, paged out, or a corrupt frame).
    ReadFault,
    /// The computed frame is impossible: the CFA is not above rsp.
    BadFrame,
    /// No table is loaded for the pc's executable (yet). Set by the walker, not by [`step`].
    NoTable,
    /// The walk reached the frame limit. Set by the walker, not by [`step`].
    FrameLimit,
    /// The pc is in no file mapping the walker knows of. Set by the walker, not by [`step`].
    Unmapped,
}

/// What [`step`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepResult {
    /// `regs` now hold the caller's registers; `rip` is a return address (look it up at rip-1).
    Caller,
    /// `regs` now hold the registers a signal interrupted; `rip` is exact (look it up as is).
    Interrupted,
    /// The walk ends; `regs` are unchanged.
    Stop(StopReason),
}

/// Index of the row covering `pc` (the last row whose pc is `<= pc`) among `len` sorted rows,
/// reading row pcs with `pc_at`. `None` when `pc` precedes every row, when `len` exceeds
/// [`MAX_TABLE_ROWS`] or when `pc_at` fails.
///
/// `pc_at` is a closure so that the kernel can read rows out of a map and the simulator out of a
/// slice with the same search; the loop runs at most [`SEARCH_ITERATIONS`] times.
#[inline(always)]
pub fn find_row(len: u32, pc: u32, mut pc_at: impl FnMut(u32) -> Option<u32>) -> Option<u32> {
    if len > MAX_TABLE_ROWS {
        return None;
    }
    // Invariant: rows below `lo` start at or before pc, rows from `hi` on start after it.
    let mut lo = 0u32;
    let mut hi = len;
    for _ in 0..SEARCH_ITERATIONS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        if pc_at(mid)? <= pc {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        None
    } else {
        Some(lo - 1)
    }
}

/// [`find_row`] over a slice.
pub fn find_row_in(rows: &[UnwindRow], pc: u32) -> Option<&UnwindRow> {
    let len = u32::try_from(rows.len()).ok()?;
    let index = find_row(len, pc, |i| rows.get(i as usize).map(|row| row.pc))?;
    rows.get(index as usize)
}

/// The pc to look a frame up at: a return address points after the `call`, which may be the
/// first byte of the next function, so it is looked up one byte earlier. The leaf and a frame a
/// signal interrupted hold exact pcs.
#[inline(always)]
pub fn lookup_pc(rip: u64, is_return_address: bool) -> u64 {
    if is_return_address {
        rip.wrapping_sub(1)
    } else {
        rip
    }
}

/// Applies `row` (the row covering `regs.rip`) to `regs`, turning them into the caller's.
/// `read` reads a u64 of the unwound process's memory, `None` on a fault.
#[inline(always)]
pub fn step(
    row: &UnwindRow,
    regs: &mut Regs,
    mut read: impl FnMut(u64) -> Option<u64>,
) -> StepResult {
    let off = row.cfa_offset as i64 as u64;
    let cfa = match row.kind {
        kind::CFA_RSP => regs.rsp.wrapping_add(off),
        kind::CFA_RBP => {
            if regs.rbp == RBP_UNKNOWN {
                return StepResult::Stop(StopReason::Unsupported);
            }
            regs.rbp.wrapping_add(off)
        }
        kind::CFA_DEREF_RSP | kind::CFA_DEREF_RBP => {
            let base = if row.kind == kind::CFA_DEREF_RSP {
                regs.rsp
            } else {
                regs.rbp
            };
            if base == RBP_UNKNOWN {
                return StepResult::Stop(StopReason::Unsupported);
            }
            let (off, add) = row.deref_operands();
            match read(base.wrapping_add(off as u64)) {
                Some(value) => value.wrapping_add(add),
                None => return StepResult::Stop(StopReason::ReadFault),
            }
        }
        kind::PLT => {
            let pushed = if (regs.rip & 15) >= off { 8 } else { 0 };
            regs.rsp.wrapping_add(8 + pushed)
        }
        kind::SIGNAL => {
            let context = regs.rsp.wrapping_add(off);
            let (Some(rip), Some(rsp), Some(rbp)) = (
                read(context.wrapping_add(SIGCONTEXT_RIP)),
                read(context.wrapping_add(SIGCONTEXT_RSP)),
                read(context.wrapping_add(SIGCONTEXT_RBP)),
            ) else {
                return StepResult::Stop(StopReason::ReadFault);
            };
            *regs = Regs { rip, rsp, rbp };
            return StepResult::Interrupted;
        }
        kind::NO_CFI => return StepResult::Stop(StopReason::NoCfi),
        kind::END_OF_STACK => return StepResult::Stop(StopReason::EndOfStack),
        _ => return StepResult::Stop(StopReason::Unsupported),
    };
    // The return address was pushed at or above rsp, so the CFA lies above it.
    if cfa <= regs.rsp {
        return StepResult::Stop(StopReason::BadFrame);
    }
    let rbp_slot = row.rbp_offset as i64 as u64;
    let rbp = match row.rbp_rule {
        rbp::UNCHANGED => Some(regs.rbp),
        rbp::AT_CFA => read(cfa.wrapping_add(rbp_slot)),
        rbp::AT_RBP if regs.rbp != RBP_UNKNOWN => read(regs.rbp.wrapping_add(rbp_slot)),
        _ => Some(RBP_UNKNOWN),
    };
    let (Some(rip), Some(rbp)) = (read(cfa.wrapping_sub(8)), rbp) else {
        return StepResult::Stop(StopReason::ReadFault);
    };
    if rip == 0 {
        // Thread entry points that clear the return address instead of marking it undefined.
        return StepResult::Stop(StopReason::EndOfStack);
    }
    *regs = Regs { rip, rsp: cfa, rbp };
    StepResult::Caller
}

/// One frame-pointer step, for code no table covers but built with frame pointers (JIT code:
/// V8, HotSpot with `-XX:+PreserveFramePointer`, Python 3.12's perf trampolines): the caller's
/// rbp is at rbp, its return address at rbp+8, its rsp is rbp+16. Stops with
/// [`StopReason::BadFrame`] unless rbp is an aligned address above rsp; the walker then reports
/// why it needed the fallback instead.
#[inline(always)]
pub fn frame_pointer_step(regs: &mut Regs, mut read: impl FnMut(u64) -> Option<u64>) -> StepResult {
    let frame = regs.rbp;
    if frame == RBP_UNKNOWN || frame < regs.rsp || frame & 7 != 0 {
        return StepResult::Stop(StopReason::BadFrame);
    }
    let (Some(rbp), Some(rip)) = (read(frame), read(frame.wrapping_add(8))) else {
        return StepResult::Stop(StopReason::ReadFault);
    };
    if rip == 0 {
        return StepResult::Stop(StopReason::EndOfStack);
    }
    *regs = Regs {
        rip,
        rsp: frame.wrapping_add(16),
        rbp,
    };
    StepResult::Caller
}

/// [`ExecMapping::table`] of a mapping without a loaded table.
pub const NO_TABLE: u32 = u32::MAX;

/// Most executable file mappings of one process the kernel walker knows (a power of two, so
/// that [`find_mapping`] converges in [`MAPPING_SEARCH_ITERATIONS`]).
pub const MAX_PROCESS_MAPPINGS: usize = 128;
/// Iterations of [`find_mapping`].
pub const MAPPING_SEARCH_ITERATIONS: u32 = 8;

/// Where one table's rows are in the kernel's row array (`UNWIND_TABLES`, by table slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableInfo {
    /// Index of the table's first row in `UNWIND_ROWS`.
    pub first_row: u32,
    /// Rows; 0 for a free slot.
    pub len: u32,
    /// Changes whenever the slot gets another table, so that a mapping still naming an evicted
    /// table is seen as having none.
    pub seq: u32,
    pub _pad: u32,
}

/// One executable file mapping of a process, as the kernel walker sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecMapping {
    pub start: u64,
    pub end: u64,
    /// Runtime address of the table's row pc 0: pc - `bias` is the offset to search for.
    pub bias: u64,
    /// Table slot, or [`NO_TABLE`].
    pub table: u32,
    /// The [`TableInfo::seq`] the slot had when this mapping was written.
    pub table_seq: u32,
}

/// A process's executable file mappings (`UNWIND_MAPPINGS`, by tgid), sorted by start.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessMappings {
    /// The incarnation these mappings belong to: another one's samples must not use them.
    pub process: crate::ProcessKey,
    pub len: u32,
    pub _pad: u32,
    pub mappings: [ExecMapping; MAX_PROCESS_MAPPINGS],
}

impl Default for ProcessMappings {
    fn default() -> Self {
        Self {
            process: Default::default(),
            len: 0,
            _pad: 0,
            mappings: [ExecMapping::default(); MAX_PROCESS_MAPPINGS],
        }
    }
}

/// Index of the mapping holding `pc` among the first `len` of `mappings` (sorted by start),
/// reading them through `at`. Bounded: [`MAPPING_SEARCH_ITERATIONS`] probes.
#[inline(always)]
pub fn find_mapping(
    len: u32,
    pc: u64,
    mut at: impl FnMut(u32) -> Option<(u64, u64)>,
) -> Option<u32> {
    let len = if (len as usize) > MAX_PROCESS_MAPPINGS {
        MAX_PROCESS_MAPPINGS as u32
    } else {
        len
    };
    let mut lo = 0u32;
    let mut hi = len;
    for _ in 0..MAPPING_SEARCH_ITERATIONS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        if at(mid)?.0 <= pc {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let index = lo.checked_sub(1)?;
    let (_, end) = at(index)?;
    (pc < end).then_some(index)
}

// SAFETY: plain `#[repr(C)]` integers with no padding (12 bytes: 4 + 1 + 1 + 2 + 4), valid for
// any bit pattern, as aya requires of map values.
#[cfg(feature = "user")]
unsafe impl aya::Pod for UnwindRow {}
// SAFETY: `#[repr(C)]` integers laid out without padding (16, 32 and 16 + 8 + 32n bytes).
#[cfg(feature = "user")]
unsafe impl aya::Pod for TableInfo {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ProcessMappings {}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pc: u32, kind: u8, cfa_offset: i32) -> UnwindRow {
        UnwindRow {
            pc,
            kind,
            cfa_offset,
            ..Default::default()
        }
    }

    #[test]
    fn layout_is_twelve_bytes() {
        assert_eq!(core::mem::size_of::<UnwindRow>(), 12);
        assert_eq!(core::mem::align_of::<UnwindRow>(), 4);
    }

    #[test]
    fn finds_the_last_row_at_or_before_pc() {
        let rows = [row(10, 0, 8), row(20, 0, 16), row(30, kind::NO_CFI, 0)];
        assert_eq!(find_row_in(&rows, 9), None);
        assert_eq!(find_row_in(&rows, 10).unwrap().pc, 10);
        assert_eq!(find_row_in(&rows, 19).unwrap().pc, 10);
        assert_eq!(find_row_in(&rows, 20).unwrap().pc, 20);
        assert_eq!(find_row_in(&rows, u32::MAX).unwrap().pc, 30);
        assert_eq!(find_row_in(&[], 5), None);
    }

    #[test]
    fn search_converges_at_the_largest_table() {
        // Every probe answers "row index", so row i starts at pc i.
        for pc in [
            0,
            1,
            MAX_TABLE_ROWS / 2,
            MAX_TABLE_ROWS - 1,
            MAX_TABLE_ROWS + 5,
        ] {
            let found = find_row(MAX_TABLE_ROWS, pc, Some).unwrap();
            assert_eq!(found, pc.min(MAX_TABLE_ROWS - 1));
        }
        assert_eq!(find_row(MAX_TABLE_ROWS + 1, 3, Some), None);
    }

    #[test]
    fn finds_the_mapping_holding_a_pc() {
        let maps = [(0x1000u64, 0x2000u64), (0x3000, 0x4000), (0x4000, 0x5000)];
        let at = |i: u32| maps.get(i as usize).copied();
        assert_eq!(find_mapping(3, 0x0fff, at), None);
        assert_eq!(find_mapping(3, 0x1000, at), Some(0));
        assert_eq!(find_mapping(3, 0x2000, at), None);
        assert_eq!(find_mapping(3, 0x3fff, at), Some(1));
        assert_eq!(find_mapping(3, 0x4000, at), Some(2));
        assert_eq!(find_mapping(3, 0x5000, at), None);
        assert_eq!(find_mapping(0, 0x1000, at), None);
        let many: [(u64, u64); MAX_PROCESS_MAPPINGS] =
            core::array::from_fn(|i| (i as u64 * 16, i as u64 * 16 + 8));
        for i in 0..MAX_PROCESS_MAPPINGS {
            let found = find_mapping(MAX_PROCESS_MAPPINGS as u32, i as u64 * 16 + 7, |j| {
                many.get(j as usize).copied()
            });
            assert_eq!(found, Some(i as u32));
        }
    }

    #[test]
    fn deref_operands_round_trip() {
        for (off, add) in [(0, 0), (-8, 0), (8, 16), (-32768, 65535), (32767, 1)] {
            let packed = UnwindRow::pack_deref(off, add).unwrap();
            let row = row(0, kind::CFA_DEREF_RSP, packed);
            assert_eq!(row.deref_operands(), (off, add));
        }
        assert_eq!(UnwindRow::pack_deref(40000, 0), None);
        assert_eq!(UnwindRow::pack_deref(0, 70000), None);
    }

    #[test]
    fn plt_adds_the_lazy_binding_push() {
        let plt = row(0, kind::PLT, 11);
        let read = |addr: u64| Some(addr ^ 0xabc);
        let mut regs = Regs {
            rip: 0x1020,
            rsp: 0x7000,
            rbp: 1,
        };
        assert_eq!(step(&plt, &mut regs, read), StepResult::Caller);
        assert_eq!(regs.rsp, 0x7008);
        let mut regs = Regs {
            rip: 0x102b,
            rsp: 0x7000,
            rbp: 1,
        };
        step(&plt, &mut regs, read);
        assert_eq!((regs.rsp, regs.rip), (0x7010, 0x7008 ^ 0xabc));
    }

    #[test]
    fn stops_are_distinct_and_leave_registers_alone() {
        let regs0 = Regs {
            rip: 5,
            rsp: 0x7000,
            rbp: RBP_UNKNOWN,
        };
        for (kind, reason) in [
            (kind::NO_CFI, StopReason::NoCfi),
            (kind::END_OF_STACK, StopReason::EndOfStack),
            (kind::UNSUPPORTED, StopReason::Unsupported),
            (kind::CFA_RBP, StopReason::Unsupported),
            (200, StopReason::Unsupported),
        ] {
            let mut regs = regs0;
            let result = step(&row(0, kind, 16), &mut regs, |_| Some(1));
            assert_eq!(result, StepResult::Stop(reason));
            assert_eq!(regs, regs0);
        }
        let mut regs = regs0;
        let fault = step(&row(0, kind::CFA_RSP, 16), &mut regs, |_| None);
        assert_eq!(fault, StepResult::Stop(StopReason::ReadFault));
        let bad = step(&row(0, kind::CFA_RSP, -8), &mut regs, |_| Some(1));
        assert_eq!(bad, StepResult::Stop(StopReason::BadFrame));
    }

    #[test]
    fn frame_pointer_step_follows_the_chain_and_rejects_bad_frames() {
        let mut regs = Regs {
            rip: 1,
            rsp: 0x7000,
            rbp: 0x7100,
        };
        let read = |addr: u64| Some(if addr == 0x7100 { 0x7200 } else { 0x4242 });
        assert_eq!(frame_pointer_step(&mut regs, read), StepResult::Caller);
        assert_eq!(
            regs,
            Regs {
                rip: 0x4242,
                rsp: 0x7110,
                rbp: 0x7200
            }
        );
        for rbp in [0x6000, 0x7101, RBP_UNKNOWN] {
            let mut regs = Regs {
                rip: 1,
                rsp: 0x7000,
                rbp,
            };
            let result = frame_pointer_step(&mut regs, read);
            assert_eq!(result, StepResult::Stop(StopReason::BadFrame));
        }
    }
}
