//! CPython's perf trampolines (3.12+, `-X perf` or `PYTHONPERFSUPPORT=1`): each Python function
//! runs through a copy of a four-instruction trampoline in anonymous executable memory, which
//! keeps no frame pointer and has no CFI, so without a table the walk stops at the innermost
//! Python call. The trampoline's layout is fixed (`Python/asm_trampoline.S`):
//!
//! ```text
//! [endbr64]            ; with CET
//! sub  $8, %rsp        ; CFA = rsp + 8 before, rsp + 16 after
//! call *%rcx           ; the evaluator returns here
//! add  $8, %rsp        ; CFA = rsp + 8 after
//! ret
//! ```
//!
//! CPython copies it back to back, `code_size` bytes apart, over arenas of 16 pages it maps
//! one at a time (`Python/perf_trampoline.c`); adjacent arenas merge into one mapping. So an
//! arena that starts with the code, and has it again `code_size` bytes further, gets a
//! synthetic table: three rows per copy. The loader gives each arena of a mapping to the kernel
//! as a mapping of its own ([`arenas`]), so one arena's table serves them all.

use profiler_common::unwind::{kind, rbp, UnwindRow};

use crate::{TableStats, UnwindTable};

/// CPython's arena size: 16 pages of 4 KiB.
pub const ARENA_BYTES: u64 = 16 * 4096;

/// Bytes to read at the start of a mapping (and of each arena) to recognize the trampolines:
/// two copies of the longest form.
pub const PROBE_BYTES: usize = 2 * 15;

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
const SUB_8_RSP: [u8; 4] = [0x48, 0x83, 0xec, 0x08];
const CALL_RCX: [u8; 2] = [0xff, 0xd1];
const ADD_8_RSP: [u8; 4] = [0x48, 0x83, 0xc4, 0x08];
const RET: [u8; 1] = [0xc3];

/// One trampoline's layout: where its stack changes, and the distance between copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Layout {
    /// Bytes from one copy to the next.
    pub code_size: u32,
    /// Offset of the instruction after `sub` (the CFA is rsp + 16 from here).
    pub pushed_at: u32,
    /// Offset of `ret` (the CFA is rsp + 8 again from here).
    pub popped_at: u32,
}

/// The trampoline layout of memory starting with `probe` (the first [`PROBE_BYTES`] of a
/// mapping or arena), when it holds two consecutive copies of CPython's trampoline.
pub fn recognize(probe: &[u8]) -> Option<Layout> {
    let start = if probe.starts_with(&ENDBR64) { 4 } else { 0 };
    let code = probe.get(start..)?;
    let mut at = 0;
    for part in [&SUB_8_RSP[..], &CALL_RCX[..], &ADD_8_RSP[..], &RET[..]] {
        if !code.get(at..)?.starts_with(part) {
            return None;
        }
        at += part.len();
    }
    let code_size = start + at;
    let first = &probe[..code_size];
    (probe.get(code_size..2 * code_size)? == first).then_some(Layout {
        code_size: code_size as u32,
        pushed_at: (start + SUB_8_RSP.len()) as u32,
        popped_at: (code_size - 1) as u32,
    })
}

/// The table of one arena of `len` bytes (at most 4 GiB are described): copies packed from its
/// start, then its unused tail. Row pc 0 is the arena's start.
pub fn table(layout: Layout, len: u64) -> UnwindTable {
    let len = len.min(u64::from(u32::MAX));
    let copies = len / u64::from(layout.code_size);
    let row = |pc: u64, kind: u8, cfa_offset: i32| UnwindRow {
        pc: pc as u32,
        kind,
        rbp_rule: rbp::UNCHANGED,
        rbp_offset: 0,
        cfa_offset,
    };
    let mut rows = Vec::with_capacity(copies as usize * 3 + 1);
    for copy in 0..copies {
        let at = copy * u64::from(layout.code_size);
        rows.push(row(at, kind::CFA_RSP, 8));
        rows.push(row(at + u64::from(layout.pushed_at), kind::CFA_RSP, 16));
        rows.push(row(at + u64::from(layout.popped_at), kind::CFA_RSP, 8));
    }
    // The tail holds no copy.
    rows.push(row(copies * u64::from(layout.code_size), kind::NO_CFI, 0));
    UnwindTable {
        base: 0,
        rows,
        stats: TableStats::default(),
    }
}

/// The arena size of a `len`-byte trampoline mapping: CPython's when `len` is a multiple of it
/// (adjacent arenas merged into one mapping), else the whole mapping.
pub fn arena_bytes(len: u64) -> u64 {
    match len.is_multiple_of(ARENA_BYTES) {
        true => ARENA_BYTES,
        false => len,
    }
}

/// Offsets of the arenas of a `len`-byte trampoline mapping (each [`arena_bytes`] long), whose
/// first bytes must each hold the same layout for [`table`] to describe them.
pub fn arenas(len: u64) -> impl Iterator<Item = u64> {
    let arena = arena_bytes(len);
    (0..len / arena.max(1)).map(move |i| i * arena)
}

#[cfg(test)]
mod tests {
    use profiler_common::unwind::{find_row_in, lookup_pc, step, Regs, StepResult};

    use super::*;

    /// CPython 3.12's trampoline as pyenv builds it (no CET): 11 bytes.
    const PLAIN: [u8; 11] = [
        0x48, 0x83, 0xec, 0x08, 0xff, 0xd1, 0x48, 0x83, 0xc4, 0x08, 0xc3,
    ];

    fn copies(code: &[u8], n: usize) -> Vec<u8> {
        code.iter().copied().cycle().take(code.len() * n).collect()
    }

    #[test]
    fn recognizes_both_forms_and_nothing_else() {
        assert_eq!(
            recognize(&copies(&PLAIN, 3)),
            Some(Layout {
                code_size: 11,
                pushed_at: 4,
                popped_at: 10
            })
        );
        let mut cet = ENDBR64.to_vec();
        cet.extend_from_slice(&PLAIN);
        assert_eq!(
            recognize(&copies(&cet, 2)),
            Some(Layout {
                code_size: 15,
                pushed_at: 8,
                popped_at: 14
            })
        );
        // One copy only (the next bytes differ), another instruction, or too few bytes.
        let mut once = PLAIN.to_vec();
        once.extend_from_slice(&[0x90; 11]);
        assert_eq!(recognize(&once), None);
        let mut other = copies(&PLAIN, 2);
        other[5] = 0xd0; // call *%rax
        assert_eq!(recognize(&other), None);
        assert_eq!(recognize(&PLAIN), None);
        assert_eq!(recognize(&[]), None);
    }

    /// Walks one frame out of copy `copy` of a 64 KiB arena at `base`, from the return address
    /// the evaluator's call left (or an exact pc), on a stack laid out as the trampoline makes it.
    fn step_out(pc_in_copy: u64, copy: u64, exact: bool) -> (StepResult, Regs) {
        let layout = recognize(&copies(&PLAIN, 2)).unwrap();
        let table = table(layout, ARENA_BYTES);
        let base = 0x7f00_0001_0000u64;
        let rip = base + copy * 11 + pc_in_copy;
        let rsp = 0x7ffc_0000_1000u64;
        let pushed = u64::from((4..10).contains(&pc_in_copy)) * 8;
        let caller_ret = 0x5555_0000_1234u64;
        let memory = |addr: u64| (addr == rsp + pushed).then_some(caller_ret);
        let mut regs = Regs {
            rip,
            rsp,
            rbp: 0xdead,
        };
        let pc = lookup_pc(rip, !exact) - base;
        let row = find_row_in(&table.rows, pc as u32).unwrap();
        (step(row, &mut regs, memory), regs)
    }

    #[test]
    fn steps_out_of_any_copy() {
        let rsp = 0x7ffc_0000_1000u64;
        for copy in [0, 1, 2000, 5956] {
            // The return address after `call *%rcx`, as every caller frame has it.
            let (result, regs) = step_out(6, copy, false);
            assert_eq!(result, StepResult::Caller, "copy {copy}");
            assert_eq!(
                (regs.rip, regs.rsp, regs.rbp),
                (0x5555_0000_1234, rsp + 16, 0xdead)
            );
            // Interrupted at its first instruction, or at `ret`: nothing pushed.
            for exact_pc in [0, 10] {
                let (result, regs) = step_out(exact_pc, copy, true);
                assert_eq!(result, StepResult::Caller);
                assert_eq!(regs.rsp, rsp + 8, "copy {copy} pc {exact_pc}");
            }
        }
    }

    #[test]
    fn an_arena_tail_has_no_cfi_and_a_mapping_splits_into_arenas() {
        let layout = recognize(&copies(&PLAIN, 2)).unwrap();
        let table = table(layout, ARENA_BYTES);
        assert_eq!(table.rows.len(), 5957 * 3 + 1);
        let tail = find_row_in(&table.rows, 5957 * 11).unwrap();
        assert_eq!(tail.kind, kind::NO_CFI);
        let last = find_row_in(&table.rows, ARENA_BYTES as u32 - 1).unwrap();
        assert_eq!(last.kind, kind::NO_CFI, "the table ends with its arena");
        assert_eq!(
            arenas(2 * ARENA_BYTES).collect::<Vec<_>>(),
            [0, ARENA_BYTES]
        );
        assert_eq!(arenas(100).collect::<Vec<_>>(), [0]);
    }
}
