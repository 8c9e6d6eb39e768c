//! Tables against gimli's own unwind rules, for every pc of real binaries, and the edge cases.

mod common;

use std::path::Path;

use common::*;
use gimli::{
    CfaRule, EndianSlice, EvaluationResult, LittleEndian, Location, Register, RegisterRule,
    UnwindSection, Value,
};
use object::{Object, ObjectSection};
use profiler_common::unwind::{kind, step, Regs, StepResult, StopReason, RBP_UNKNOWN};
use profiler_unwind::{build_from_path, BinaryId, Options, UnwindTable};

type Slice<'a> = EndianSlice<'a, LittleEndian>;

const RSP: Register = gimli::X86_64::RSP;
const RBP: Register = gimli::X86_64::RBP;
const RA: Register = gimli::X86_64::RA;

/// A memory where every address holds a different plausible stack address, above any rsp the
/// test uses, so that dereferencing CFA rules yields a valid frame and every location read
/// shows in the result.
fn memory(address: u64) -> Option<u64> {
    let mut x = address.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    Some(0x7ff2_0000_0000 + ((x ^ (x >> 31)) & 0xffff_fff8))
}

/// gimli's answer: the caller's registers, `None` when the return address is undefined.
fn gimli_caller<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    row: &gimli::UnwindTableRow<usize>,
    regs: Regs,
) -> Result<Option<(u64, u64, Option<u64>)>, String> {
    let eval = |expression: &gimli::UnwindExpression<usize>| -> Result<u64, String> {
        let expression = expression.get(section).map_err(|e| e.to_string())?;
        let encoding = gimli::Encoding {
            format: gimli::Format::Dwarf32,
            version: 4,
            address_size: 8,
        };
        let mut evaluation = expression.evaluation(encoding);
        let mut result = evaluation.evaluate().map_err(|e| e.to_string())?;
        loop {
            result = match result {
                EvaluationResult::Complete => break,
                EvaluationResult::RequiresRegister { register, .. } => {
                    let value = match register {
                        RSP => regs.rsp,
                        RBP => regs.rbp,
                        RA => regs.rip,
                        other => return Err(format!("register {other:?}")),
                    };
                    evaluation.resume_with_register(Value::Generic(value))
                }
                EvaluationResult::RequiresMemory { address, .. } => {
                    evaluation.resume_with_memory(Value::Generic(memory(address).unwrap()))
                }
                other => return Err(format!("{other:?}")),
            }
            .map_err(|e| e.to_string())?;
        }
        match evaluation.as_result() {
            [piece] => match piece.location {
                Location::Address { address } => Ok(address),
                ref other => Err(format!("{other:?}")),
            },
            other => Err(format!("{} pieces", other.len())),
        }
    };
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => match *register {
            RSP => regs.rsp.wrapping_add(*offset as u64),
            RBP => regs.rbp.wrapping_add(*offset as u64),
            other => return Err(format!("CFA register {other:?}")),
        },
        CfaRule::Expression(expression) => eval(expression)?,
    };
    let saved = |rule: Option<RegisterRule<usize>>, same: u64| -> Result<Option<u64>, String> {
        Ok(match rule {
            None | Some(RegisterRule::SameValue) => Some(same),
            Some(RegisterRule::Undefined) => None,
            Some(RegisterRule::Offset(offset)) => memory(cfa.wrapping_add(offset as u64)),
            Some(RegisterRule::Expression(expression)) => memory(eval(&expression)?),
            Some(other) => return Err(format!("rule {other:?}")),
        })
    };
    let Some(rip) = saved(row.register(RA), regs.rip)? else {
        return Ok(None);
    };
    Ok(Some((
        rip,
        cfa,
        saved(row.register(RBP), regs.rbp).unwrap_or(None),
    )))
}

#[derive(Default, Debug)]
struct Comparison {
    pcs: u64,
    matched: u64,
    end_of_stack: u64,
    /// Rows we mark unsupported where gimli has an answer.
    unsupported: u64,
    /// Caller rbp gimli knows and we gave up on.
    rbp_lost: u64,
    /// Pcs between FDEs, all checked to be "no CFI".
    gap_pcs: u64,
    mismatches: Vec<String>,
}

/// Compares the table with gimli at every pc of every FDE in `.eh_frame`.
/// Compares the table with gimli at every pc of every FDE in `.eh_frame`, or in `.debug_frame`
/// (inflated here with flate2 when compressed, as Go writes it) when there is no `.eh_frame`.
fn compare(path: &Path, table: &UnwindTable) -> Comparison {
    let data = std::fs::read(path).unwrap();
    let elf = object::File::parse(&data[..]).unwrap();
    if let Some(eh_frame) = elf.section_by_name(".eh_frame") {
        let mut section = gimli::EhFrame::new(eh_frame.data().unwrap(), LittleEndian);
        section.set_address_size(8);
        let mut bases = gimli::BaseAddresses::default().set_eh_frame(eh_frame.address());
        if let Some(text) = elf.section_by_name(".text") {
            bases = bases.set_text(text.address());
        }
        return compare_section(&section, &bases, table);
    }
    let debug_frame = elf.section_by_name(".debug_frame").expect("CFI");
    let compressed = debug_frame.compressed_data().unwrap();
    let bytes = match compressed.format {
        object::CompressionFormat::None => compressed.data.to_vec(),
        object::CompressionFormat::Zlib => {
            let mut out = Vec::new();
            std::io::Read::read_to_end(
                &mut flate2::read::ZlibDecoder::new(compressed.data),
                &mut out,
            )
            .unwrap();
            out
        }
        other => panic!("{other:?}"),
    };
    let mut section = gimli::DebugFrame::new(&bytes, LittleEndian);
    section.set_address_size(8);
    compare_section(&section, &gimli::BaseAddresses::default(), table)
}

fn compare_section<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    bases: &gimli::BaseAddresses,
    table: &UnwindTable,
) -> Comparison {
    let mut ctx = Box::new(gimli::UnwindContext::new());
    let mut out = Comparison::default();
    let mut ranges = Vec::new();
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next().unwrap() {
        let gimli::CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let fde = partial.parse(S::cie_from_offset).unwrap();
        ranges.push(fde.initial_address()..fde.end_address());
        let mut rows = fde.rows(section, bases, &mut ctx).unwrap();
        while let Some(row) = rows.next_row().unwrap() {
            for pc in row.start_address()..row.end_address() {
                out.pcs += 1;
                let regs = Regs {
                    rip: pc,
                    rsp: 0x7ff0_0000_0000 + ((pc << 4) & 0xfff_fff0),
                    rbp: 0x7ff1_0000_0000 + ((pc << 3) & 0xfff_fff8),
                };
                let expected = gimli_caller(section, row, regs);
                let ours = table.row_for(pc).expect("a row for every pc of an FDE");
                let mut got = regs;
                let result = step(ours, &mut got, memory);
                let mut mismatch = |what: String| {
                    if out.mismatches.len() < 10 {
                        out.mismatches
                            .push(format!("pc {pc:#x}: {what}; row {ours:?}"));
                    } else {
                        out.mismatches.push(String::new());
                    }
                };
                match (expected, result) {
                    (_, StepResult::Stop(StopReason::Unsupported)) => out.unsupported += 1,
                    (Ok(None), StepResult::Stop(StopReason::EndOfStack)) => out.end_of_stack += 1,
                    (Ok(Some((rip, rsp, rbp))), StepResult::Caller | StepResult::Interrupted) => {
                        if (got.rip, got.rsp) != (rip, rsp) {
                            mismatch(format!(
                                "rip/rsp {:#x}/{:#x}, gimli {rip:#x}/{rsp:#x}",
                                got.rip, got.rsp
                            ));
                        } else if got.rbp == RBP_UNKNOWN && rbp.is_some() {
                            out.rbp_lost += 1;
                        } else if got.rbp != RBP_UNKNOWN && Some(got.rbp) != rbp {
                            mismatch(format!("rbp {:#x}, gimli {rbp:x?}", got.rbp));
                        } else {
                            out.matched += 1;
                        }
                    }
                    (expected, result) => mismatch(format!("{result:?}, gimli {expected:x?}")),
                }
            }
        }
    }
    // Between FDEs the table must say "no CFI" (or "signal restorer", found by its code), never
    // a rule borrowed from a neighbour, nor the end of the stack.
    ranges.sort_by_key(|r| r.start);
    for pair in ranges.windows(2) {
        for pc in pair[0].end..pair[1].start {
            let kind = table.row_for(pc).unwrap().kind;
            if kind != kind::NO_CFI && kind != kind::SIGNAL {
                out.mismatches.push(format!("gap pc {pc:#x}: kind {kind}"));
            }
            out.gap_pcs += 1;
        }
    }
    out
}

fn check_every_pc(path: &Path) {
    let table = build_from_path(path, &Options::default()).unwrap();
    let c = compare(path, &table);
    let stats = &table.stats;
    eprintln!(
        "{}: {} rows ({} before merging), {} KiB, {} FDEs, {} KiB of CFI, built in {:?}; \
         {} pcs: {} match, {} end of stack, {} unsupported, {} rbp lost, {} mismatches; \
         {} pcs between FDEs",
        path.display(),
        table.rows.len(),
        stats.rows_before_dedup,
        table.size_bytes() / 1024,
        stats.eh_frame_fdes + stats.debug_frame_fdes,
        (stats.eh_frame_bytes + stats.debug_frame_bytes) / 1024,
        stats.build_time,
        c.pcs,
        c.matched,
        c.end_of_stack,
        c.unsupported,
        c.rbp_lost,
        c.mismatches.len(),
        c.gap_pcs
    );
    assert!(
        c.mismatches.is_empty(),
        "{}: {:#?}",
        path.display(),
        &c.mismatches[..c.mismatches.len().min(10)]
    );
    assert!(c.pcs > 500, "{}: only {} pcs", path.display(), c.pcs);
    // What we cannot unwind must stay a rounding error: CFA in a register other than rsp/rbp,
    // for a few instructions of `setcontext` (rdi, rdx) in libc and of ring's perlasm
    // prologues (rax, rsi, r11) in the profiler: 0.01% and 0.1% of their pcs.
    assert!(
        c.unsupported * 200 <= c.pcs,
        "{}: {} of {} pcs unsupported",
        path.display(),
        c.unsupported,
        c.pcs
    );
    assert!(
        c.rbp_lost * 1000 <= c.pcs,
        "{}: rbp lost at {} of {} pcs",
        path.display(),
        c.rbp_lost,
        c.pcs
    );
}

#[test]
fn rows_match_gimli_at_every_pc_of_libc() {
    if let Some(libc) = required(LIBC) {
        check_every_pc(&libc);
    }
}

#[test]
fn rows_match_gimli_at_every_pc_of_python() {
    if let Some(python) = required(PYTHON) {
        check_every_pc(&python);
    }
}

#[test]
fn rows_match_gimli_at_every_pc_of_rust_release_binaries() {
    for binary in rust_binaries() {
        check_every_pc(&binary);
    }
}

#[test]
fn rows_match_gimli_at_every_pc_of_a_frameless_c_binary() {
    check_every_pc(&frames());
}

#[test]
fn rows_match_gimli_at_every_pc_of_a_go_binary() {
    // Go writes no .eh_frame, only a zlib-compressed .debug_frame.
    let go = go_binary();
    assert!(section(&go, ".eh_frame").is_none());
    let table = build_from_path(&go, &Options::default()).unwrap();
    assert!(table.stats.debug_frame_fdes > 100, "{:?}", table.stats);
    check_every_pc(&go);
}

#[test]
fn finds_eh_frame_through_pt_gnu_eh_frame_without_section_headers() {
    let mut binaries = vec![(frames(), "frames-noshdr")];
    if let Some(libc) = required(LIBC) {
        binaries.push((libc, "libc-noshdr"));
    }
    for (path, name) in binaries {
        let stripped = without_section_headers(&path, name);
        let with = build_from_path(&path, &Options::default()).unwrap();
        let without = build_from_path(&stripped, &Options::default()).unwrap();
        assert_eq!(
            (with.base, &with.rows),
            (without.base, &without.rows),
            "{name}"
        );
        assert!(without.rows.len() > 20);
    }
}

#[test]
fn plt_stubs_get_plt_rows() {
    let path = frames();
    let table = build_from_path(&path, &Options::default()).unwrap();
    let (plt, size) = section(&path, ".plt").expect(".plt");
    // The first 16 bytes (PLT0, the resolver trampoline) have plain rsp rows.
    for pc in plt + 16..plt + size {
        assert_eq!(table.row_for(pc).unwrap().kind, kind::PLT, "pc {pc:#x}");
    }
    // The first stub pushes once more at offset 11 of each 16 bytes (the lazy-binding push).
    let row = table.row_for(plt + 16).unwrap();
    let read = |a: u64| Some(a + 0x100);
    for (offset, cfa) in [(0, 8), (10, 8), (11, 16), (15, 16)] {
        let mut regs = Regs {
            rip: plt + 16 + offset,
            rsp: 0x7000,
            rbp: 0,
        };
        assert_eq!(step(row, &mut regs, read), StepResult::Caller);
        assert_eq!(regs.rsp, 0x7000 + cfa, "offset {offset}");
    }
    if let Some(libc) = required(LIBC) {
        let table = build_from_path(&libc, &Options::default()).unwrap();
        let (plt, _) = section(&libc, ".plt").expect("libc .plt");
        assert_eq!(table.row_for(plt + 16 + 4).unwrap().kind, kind::PLT);
    }
}

#[test]
fn forty_kib_frame_keeps_its_offset() {
    let path = frames();
    let table = build_from_path(&path, &Options::default()).unwrap();
    let (start, size) = Symbols::of(&path).find("big_frame").unwrap();
    let offsets: Vec<i32> = (start..start + size)
        .map(|pc| table.row_for(pc).unwrap())
        .filter(|row| row.kind == kind::CFA_RSP)
        .map(|row| row.cfa_offset)
        .collect();
    let largest = offsets.iter().max().copied().unwrap();
    assert!(
        largest > 40 * 1024,
        "largest CFA offset in big_frame: {largest}"
    );
}

#[test]
fn signal_restorers_get_signal_rows() {
    // Without CFI (musl's shape): found by its code.
    let path = frames();
    let table = build_from_path(&path, &Options::default()).unwrap();
    let (restorer, _) = Symbols::of(&path).find("bare_restorer").unwrap();
    for pc in restorer..restorer + 9 {
        assert_eq!(table.row_for(pc).unwrap().kind, kind::SIGNAL, "pc {pc:#x}");
    }
    assert_ne!(table.row_for(restorer + 9).unwrap().kind, kind::SIGNAL);
    // glibc's __restore_rt has an `S` FDE starting one byte early, so a return address that
    // points at it (looked up at pc-1) still finds it.
    if let Some(libc) = required(LIBC) {
        let data = std::fs::read(&libc).unwrap();
        let code = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];
        let offset = data
            .windows(9)
            .position(|w| w == code)
            .expect("__restore_rt") as u64;
        let elf = object::File::parse(&data[..]).unwrap();
        let text = elf.section_by_name(".text").unwrap();
        let vaddr = offset - text.file_range().unwrap().0 + text.address();
        let table = build_from_path(&libc, &Options::default()).unwrap();
        assert_eq!(table.row_for(vaddr).unwrap().kind, kind::SIGNAL);
        assert_eq!(table.row_for(vaddr - 1).unwrap().kind, kind::SIGNAL);
    }
}

#[test]
fn gaps_are_no_cfi_and_start_is_end_of_stack() {
    let path = frames();
    let table = build_from_path(&path, &Options::default()).unwrap();
    let symbols = Symbols::of(&path);
    let (start, _) = symbols.find("_start").unwrap();
    assert_eq!(table.row_for(start + 1).unwrap().kind, kind::END_OF_STACK);
    assert_eq!(table.rows.last().unwrap().kind, kind::NO_CFI);
    assert!(table.row_for(table.base - 1).is_none());
    // Every adjacent pair differs: merging left nothing to merge.
    assert!(table
        .rows
        .windows(2)
        .all(|w| w[0].pc < w[1].pc && !w[0].same_rule(&w[1])));
}

#[test]
fn debug_frame_serves_when_eh_frame_covers_little() {
    let flags = ["-fno-asynchronous-unwind-tables", "-fno-unwind-tables"];
    let path = frames_binary("frames-debug-frame", &flags);
    let symbols = Symbols::of(&path);
    let (level2, _) = symbols.find("level2").unwrap();
    let table = build_from_path(&path, &Options::default()).unwrap();
    assert!(table.stats.debug_frame_fdes > 5, "{:?}", table.stats);
    assert_eq!(table.row_for(level2).unwrap().kind, kind::CFA_RSP);

    // The same CFI from a separate debug file, found through the debug link.
    let stripped = scratch().join("frames-stripped");
    let debug = scratch().join("frames-stripped.debug");
    run(std::process::Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&path)
        .arg(&debug));
    run(std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(format!("--add-gnu-debuglink={}", debug.display()))
        .arg(&path)
        .arg(&stripped));
    assert!(section(&stripped, ".debug_frame").is_none());
    let from_debug_file = build_from_path(&stripped, &Options::default()).unwrap();
    assert_eq!(
        from_debug_file.stats.debug_file.as_deref(),
        Some(debug.as_path())
    );
    assert_eq!(from_debug_file.rows, table.rows);

    // A stale debug file (another build under the linked name) is not used.
    let other = frames_binary("frames-debug-frame-O1", &[&flags[..], &["-O1"]].concat());
    run(std::process::Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&other)
        .arg(&debug));
    let stale = build_from_path(&stripped, &Options::default()).unwrap();
    assert_eq!(stale.stats.debug_file, None);
    assert_eq!(stale.row_for(level2).unwrap().kind, kind::NO_CFI);
}

#[test]
fn binary_id_is_the_build_id_else_the_file() {
    let path = frames();
    let data = std::fs::read(&path).unwrap();
    let build_id = object::File::parse(&data[..])
        .unwrap()
        .build_id()
        .unwrap()
        .unwrap()
        .to_vec();
    assert_eq!(
        BinaryId::of_path(&path).unwrap(),
        BinaryId::BuildId(build_id.clone().into())
    );
    // The same build ID when the section headers are gone (read from PT_NOTE).
    let stripped = without_section_headers(&path, "frames-noshdr-id");
    assert_eq!(
        BinaryId::of_path(&stripped).unwrap(),
        BinaryId::BuildId(build_id.into())
    );

    let anonymous = frames_binary("frames-no-build-id", &["-Wl,--build-id=none"]);
    let id = BinaryId::of_path(&anonymous).unwrap();
    assert!(matches!(id, BinaryId::File { .. }), "{id}");
    // Rewriting the file in place changes the identity.
    let copy = scratch().join("frames-no-build-id-copy");
    std::fs::copy(&anonymous, &copy).unwrap();
    let before = BinaryId::of_path(&copy).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(10));
    std::fs::write(&copy, std::fs::read(&anonymous).unwrap()).unwrap();
    assert_ne!(before, BinaryId::of_path(&copy).unwrap());
}

#[test]
fn disk_cache_serves_a_second_agent_the_same_table() {
    let dir = scratch().join("cache");
    let path = frames();
    let cache = profiler_unwind::DiskCache::new(&dir).unwrap();
    let mut first = profiler_unwind::Tables::new(Options::default()).with_disk_cache(cache.clone());
    let (id, built) = first.get_or_build(&path).unwrap();
    assert!(!built.stats.from_cache);
    assert!(dir.join(format!("{id}.rows")).exists());

    let mut second = profiler_unwind::Tables::new(Options::default()).with_disk_cache(cache);
    let (_, loaded) = second.get_or_build(&path).unwrap();
    assert!(loaded.stats.from_cache);
    assert_eq!((loaded.base, &loaded.rows), (built.base, &built.rows));
    assert_eq!(first.disk_write_errors() + second.disk_write_errors(), 0);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let text = scratch().join("not-elf");
    std::fs::write(&text, "#!/bin/sh\necho hi\n").unwrap();
    let err = build_from_path(&text, &Options::default()).unwrap_err();
    assert!(
        err.to_string().starts_with("not a usable ELF file"),
        "{err}"
    );
    let missing = scratch().join("missing");
    let err = build_from_path(&missing, &Options::default()).unwrap_err();
    assert!(err.to_string().contains("No such file"), "{err}");
    // Truncated in the middle of .eh_frame: an error or a shorter table, never a panic.
    let data = std::fs::read(frames()).unwrap();
    let (eh_frame, _) = section(&frames(), ".eh_frame").unwrap();
    for cut in [64, 4096, eh_frame as usize + 40] {
        let _ = profiler_unwind::build(&data[..cut.min(data.len())], None, &Options::default());
    }
}

#[test]
fn a_table_beyond_max_rows_stops_building_with_too_large() {
    let Some(libc) = required(LIBC) else { return };
    let full = build_from_path(&libc, &Options::default()).unwrap();
    let limit = full.stats.rows_before_dedup as usize;
    let options = |max_rows| Options {
        max_rows,
        ..Options::default()
    };
    let err = build_from_path(&libc, &options(limit / 2)).unwrap_err();
    assert!(matches!(err, profiler_unwind::Error::TooLarge), "{err}");
    let again = build_from_path(&libc, &options(limit)).unwrap();
    assert_eq!(again.rows, full.rows);
}

/// lld (rustc's default linker for x86_64-unknown-linux-gnu) puts the code segment a page
/// higher in memory than in the file, in the same file page where the read-only segment ends:
/// every segment's mapping must still give the bias it was loaded with. The binary is built
/// here, since this test binary may be linked otherwise (the suite builds for musl, through
/// gcc's ld).
#[test]
fn load_bias_is_right_for_every_segment_of_an_lld_binary() {
    use object::ObjectSegment as _;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("main.rs");
    std::fs::write(&source, "fn main() { println!(\"hi\"); }\n").unwrap();
    let path = dir.path().join("lld-binary");
    let status = std::process::Command::new("rustc")
        .args(["-O", "--target", "x86_64-unknown-linux-gnu", "-o"])
        .arg(&path)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success(), "rustc failed: {status}");
    let data = std::fs::read(&path).unwrap();
    let file = object::File::parse(&data[..]).unwrap();
    let bias = 0x5555_0000_0000u64;
    let mut shifted = 0;
    for segment in file.segments() {
        let (offset, _) = segment.file_range();
        let (start, map_offset) = (bias + (segment.address() & !0xfff), offset & !0xfff);
        shifted += usize::from(segment.address() & !0xfff != map_offset);
        assert_eq!(
            profiler_unwind::load_bias(&data, start, map_offset),
            Some(bias),
            "segment at {:#x} (file offset {offset:#x})",
            segment.address()
        );
    }
    assert!(
        shifted > 0,
        "{} has vaddr == offset everywhere",
        path.display()
    );
}
