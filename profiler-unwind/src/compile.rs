//! Compiling CFI (gimli's per-FDE rows) into one sorted, deduplicated [`UnwindTable`].

use std::borrow::Cow;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gimli::{
    CfaRule, EndianSlice, LittleEndian, Operation, Register, RegisterRule, UnwindContext,
    UnwindSection, UnwindTableRow,
};
use object::{Architecture, Object, ObjectSection};
use profiler_common::unwind::{kind, rbp, UnwindRow, MAX_TABLE_ROWS, SIGCONTEXT_OFFSET};

use crate::debug_file::{self, DebugSearch};
use crate::elf::{self, CodeSegment, SIGRETURN_CODE};
use crate::{Error, TableStats, UnwindTable};

type Slice<'a> = EndianSlice<'a, LittleEndian>;

const RBP: Register = gimli::X86_64::RBP;
const RSP: Register = gimli::X86_64::RSP;
const RA: Register = gimli::X86_64::RA;

/// binutils' `.plt` CFA expression: `rsp + 8 + ((rip & 15) >= 11) << 3`.
const PLT_EXPRESSION: [u8; 11] = [
    0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22,
];
/// The same for `.plt.sec`/IBT PLTs, which compare with 10.
const PLT_SEC_EXPRESSION: [u8; 11] = [
    0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3a, 0x2a, 0x33, 0x24, 0x22,
];

/// Below this share of the executable bytes covered by `.eh_frame`, `.debug_frame` is read too.
const MIN_EH_FRAME_COVERAGE: f64 = 0.5;

/// How tables are built.
#[derive(Clone, Debug)]
pub struct Options {
    /// The user's own directories of separate debug files (`--debug-dir`), searched before
    /// the process root's own ([`ROOT_DEBUG_DIRS`](crate::debug_file::ROOT_DEBUG_DIRS)).
    pub debug_dirs: Vec<PathBuf>,
    /// Rows (before merging equal neighbours) beyond which building stops with
    /// [`Error::TooLarge`]: a table that cannot fit the kernel's budget is not worth the
    /// memory of compiling it (librustc_driver's would take about 200 MiB).
    pub max_rows: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            debug_dirs: Vec::new(),
            max_rows: usize::MAX,
        }
    }
}

/// The rows of one FDE (or one synthetic range), with absolute addresses.
struct Function {
    start: u64,
    end: u64,
    /// `(address, rule)`, in address order, the first at `start`.
    rows: Vec<(u64, UnwindRow)>,
}

/// Compiles the table of the ELF file at `path`, reading `.debug_frame` from it or from its
/// separate debug file when `.eh_frame` covers less than half of its code. The file is taken as
/// the host's own: its debug file is looked for on the host.
pub fn build_from_path(path: &Path, options: &Options) -> Result<UnwindTable, Error> {
    let io = |e| Error::Io(path.to_path_buf(), e);
    let file = debug_file::open_regular(path).map_err(io)?;
    // SAFETY: read-only map, dropped before returning.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    build(&map, Some(&on_host(path, &file, options)), options)
}

/// The search for the debug file of `file`, the host's own file at `path`.
pub(crate) fn on_host<'a>(
    path: &'a Path,
    file: &std::fs::File,
    options: &'a Options,
) -> DebugSearch<'a> {
    DebugSearch {
        path,
        open_in_root: &debug_file::open_regular,
        own_dirs: &options.debug_dirs,
        binary: file.metadata().ok().map(|meta| (meta.dev(), meta.ino())),
    }
}

/// Compiles the table of an ELF image in memory (a file's bytes, or the vDSO read out of a
/// process). With `debug`, a separate debug file may be looked up for it.
pub fn build(
    data: &[u8],
    debug: Option<&DebugSearch<'_>>,
    options: &Options,
) -> Result<UnwindTable, Error> {
    let started = Instant::now();
    let file = object::File::parse(data).map_err(|e| Error::Malformed(e.to_string()))?;
    if file.architecture() != Architecture::X86_64 {
        return Err(Error::UnsupportedArchitecture);
    }
    let segments = elf::code_segments(&file);
    let code_bytes: u64 = segments.iter().map(|s| s.size).sum();
    let mut stats = TableStats::default();
    let mut functions = Vec::new();

    if let Some(eh_frame) = elf::eh_frame(&file, data)? {
        stats.eh_frame_bytes = eh_frame.data.len() as u64;
        let mut section = gimli::EhFrame::new(&eh_frame.data, LittleEndian);
        section.set_address_size(8);
        let mut bases = gimli::BaseAddresses::default().set_eh_frame(eh_frame.address);
        if let Some(text) = file.section_by_name(".text") {
            bases = bases.set_text(text.address());
        } else if let Some(first) = segments.first() {
            bases = bases.set_text(first.address);
        }
        if let Some(got) = file.section_by_name(".got") {
            bases = bases.set_got(got.address());
        }
        stats.eh_frame_fdes = read_functions(&section, &bases, &mut functions, options)?;
    }

    let covered = |functions: &[Function]| functions.iter().map(|f| f.end - f.start).sum::<u64>();
    if (covered(&functions) as f64) < MIN_EH_FRAME_COVERAGE * code_bytes as f64 {
        if let Some(DebugFrame { data, debug_file }) = debug_frame(&file, debug)? {
            stats.debug_frame_bytes = data.len() as u64;
            stats.debug_file = debug_file;
            let mut section = gimli::DebugFrame::new(&data, LittleEndian);
            section.set_address_size(8);
            let bases = gimli::BaseAddresses::default();
            stats.debug_frame_fdes = read_functions(&section, &bases, &mut functions, options)?;
        }
    }
    functions.extend(restorers_without_cfi(&segments, &functions));
    stats.covered_bytes = covered(&functions);
    stats.code_bytes = code_bytes;

    let (base, rows, rows_before_dedup) = assemble(functions)?;
    stats.rows_before_dedup = rows_before_dedup;
    stats.build_time = started.elapsed();
    Ok(UnwindTable { base, rows, stats })
}

/// `.debug_frame` bytes and the separate debug file they came from, if any.
struct DebugFrame<'data> {
    data: Cow<'data, [u8]>,
    debug_file: Option<PathBuf>,
}

/// `.debug_frame` from the file itself, else from its separate debug file. `None` when neither
/// has one.
fn debug_frame<'data>(
    file: &object::File<'data>,
    debug: Option<&DebugSearch<'_>>,
) -> Result<Option<DebugFrame<'data>>, Error> {
    if let Some(data) = elf::debug_frame(file)? {
        return Ok(Some(DebugFrame {
            data,
            debug_file: None,
        }));
    }
    let Some(found) = debug.and_then(|search| debug_file::find(file, search)) else {
        return Ok(None);
    };
    // SAFETY: read-only map, dropped before returning (the section is copied out).
    let debug_map =
        unsafe { memmap2::Mmap::map(&found.file) }.map_err(|e| Error::Io(found.path.clone(), e))?;
    let debug_elf = object::File::parse(&debug_map[..])
        .map_err(|e| Error::Malformed(format!("{}: {e}", found.path.display())))?;
    Ok(elf::debug_frame(&debug_elf)?.map(|data| DebugFrame {
        data: Cow::Owned(data.into_owned()),
        debug_file: Some(found.path),
    }))
}

/// Appends the rows of every FDE in `section` to `functions`; returns how many FDEs it read.
/// An FDE whose CFI cannot be parsed becomes one [`kind::UNSUPPORTED`] row: there is CFI, we
/// just cannot use it, and that is not the same as having none.
fn read_functions<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    bases: &gimli::BaseAddresses,
    functions: &mut Vec<Function>,
    options: &Options,
) -> Result<u64, Error> {
    let mut total_rows: usize = functions.iter().map(|f| f.rows.len()).sum();
    let mut ctx = Box::new(UnwindContext::new());
    let mut entries = section.entries(bases);
    let mut cies: std::collections::HashMap<usize, gimli::CommonInformationEntry<Slice<'a>>> =
        std::collections::HashMap::new();
    let mut fdes = 0;
    // A malformed entry ends the section: its length field can no longer be trusted.
    while let Ok(Some(entry)) = entries.next() {
        let gimli::CieOrFde::Fde(partial) = entry else {
            continue;
        };
        // FDEs share a handful of CIEs: parse each once.
        let fde = partial.parse(|section, bases, offset| {
            let key: usize = gimli::UnwindOffset::into(offset);
            if let Some(cie) = cies.get(&key) {
                return Ok(cie.clone());
            }
            let cie = section.cie_from_offset(bases, offset)?;
            cies.insert(key, cie.clone());
            Ok(cie)
        });
        let Ok(fde) = fde else {
            continue;
        };
        let (start, end) = (fde.initial_address(), fde.end_address());
        if end <= start {
            continue;
        }
        fdes += 1;
        let mut rows = Vec::new();
        if fde.is_signal_trampoline() {
            rows.push((start, signal_row()));
        } else {
            if let Ok(mut table) = fde.rows(section, bases, &mut ctx) {
                loop {
                    match table.next_row() {
                        Ok(Some(row)) => rows.push((row.start_address(), convert(row, section))),
                        Ok(None) => break,
                        Err(_) => {
                            rows.clear();
                            break;
                        }
                    }
                }
            }
            if rows.is_empty() {
                rows.push((start, unsupported()));
            }
        }
        total_rows += rows.len();
        if total_rows > options.max_rows {
            return Err(Error::TooLarge);
        }
        functions.push(Function { start, end, rows });
    }
    Ok(fdes)
}

fn unsupported() -> UnwindRow {
    UnwindRow {
        kind: kind::UNSUPPORTED,
        ..Default::default()
    }
}

fn signal_row() -> UnwindRow {
    UnwindRow {
        kind: kind::SIGNAL,
        cfa_offset: SIGCONTEXT_OFFSET,
        ..Default::default()
    }
}

/// One gimli row to our rule (pc left 0).
fn convert<'a, S: UnwindSection<Slice<'a>>>(row: &UnwindTableRow<usize>, section: &S) -> UnwindRow {
    let mut out = UnwindRow::default();
    match row.register(RA) {
        Some(RegisterRule::Offset(-8)) => {}
        Some(RegisterRule::Undefined) => {
            out.kind = kind::END_OF_STACK;
            return out;
        }
        _ => return unsupported(),
    }
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let kind = match *register {
                RSP => kind::CFA_RSP,
                RBP => kind::CFA_RBP,
                _ => return unsupported(),
            };
            i32::try_from(*offset).ok().map(|offset| (kind, offset))
        }
        CfaRule::Expression(expression) => expression
            .get(section)
            .ok()
            .and_then(|expression| cfa_expression(expression.0)),
    };
    let Some((kind, cfa_offset)) = cfa else {
        return unsupported();
    };
    out.kind = kind;
    out.cfa_offset = cfa_offset;
    let (rule, offset) = match row.register(RBP) {
        None | Some(RegisterRule::SameValue) => (rbp::UNCHANGED, Some(0)),
        Some(RegisterRule::Offset(offset)) => (rbp::AT_CFA, i16::try_from(offset).ok()),
        Some(RegisterRule::Expression(expression)) => {
            let offset = expression
                .get(section)
                .ok()
                .and_then(|e| register_offset(e.0, RBP));
            (rbp::AT_RBP, offset)
        }
        Some(_) => (rbp::UNKNOWN, Some(0)),
    };
    match offset {
        Some(offset) => (out.rbp_rule, out.rbp_offset) = (rule, offset),
        None => (out.rbp_rule, out.rbp_offset) = (rbp::UNKNOWN, 0),
    }
    out
}

/// A CFA expression we implement: the PLT forms, or `*(rsp|rbp + off) + add…`.
fn cfa_expression(expression: Slice<'_>) -> Option<(u8, i32)> {
    let bytes = expression.slice();
    if bytes == PLT_EXPRESSION {
        return Some((kind::PLT, 11));
    }
    if bytes == PLT_SEC_EXPRESSION {
        return Some((kind::PLT, 10));
    }
    let mut ops = gimli::Expression(expression).operations(encoding());
    let Ok(Some(Operation::RegisterOffset {
        register, offset, ..
    })) = ops.next()
    else {
        return None;
    };
    let kind = match register {
        RSP => kind::CFA_DEREF_RSP,
        RBP => kind::CFA_DEREF_RBP,
        _ => return None,
    };
    let Ok(Some(Operation::Deref {
        size: 8,
        space: false,
        ..
    })) = ops.next()
    else {
        return None;
    };
    // OCaml leaves two additions unfolded; any number of them is one addition.
    let mut add = 0u64;
    loop {
        match ops.next() {
            Ok(None) => break,
            Ok(Some(Operation::PlusConstant { value })) => add = add.checked_add(value)?,
            _ => return None,
        }
    }
    Some((kind, UnwindRow::pack_deref(offset, add)?))
}

/// `off` when the expression is exactly `DW_OP_breg<register> off`.
fn register_offset(expression: Slice<'_>, expected: Register) -> Option<i16> {
    let mut ops = gimli::Expression(expression).operations(encoding());
    match (ops.next(), ops.next()) {
        (
            Ok(Some(Operation::RegisterOffset {
                register, offset, ..
            })),
            Ok(None),
        ) if register == expected => i16::try_from(offset).ok(),
        _ => None,
    }
}

fn encoding() -> gimli::Encoding {
    gimli::Encoding {
        format: gimli::Format::Dwarf32,
        version: 4,
        address_size: 8,
    }
}

/// Signal restorers no FDE covers (musl's `__restore_rt` has none), as signal rows.
fn restorers_without_cfi(segments: &[CodeSegment<'_>], functions: &[Function]) -> Vec<Function> {
    elf::sigreturn_addresses(segments)
        .into_iter()
        .filter(|&at| !functions.iter().any(|f| f.start <= at && at < f.end))
        .map(|start| Function {
            start,
            end: start + SIGRETURN_CODE.len() as u64,
            rows: vec![(start, signal_row())],
        })
        .collect()
}

/// Sorts the functions, resolves overlaps in favour of the earlier (`.eh_frame` before
/// `.debug_frame`), fills the gaps between them with [`kind::NO_CFI`], and merges adjacent equal
/// rules. Returns the base address, the rows, and the row count before merging.
fn assemble(mut functions: Vec<Function>) -> Result<(u64, Vec<UnwindRow>, u64), Error> {
    // Stable: among FDEs at the same address, the one read first (`.eh_frame`) wins.
    functions.sort_by_key(|f| f.start);
    let mut absolute: Vec<(u64, UnwindRow)> = Vec::new();
    let mut covered_end = 0u64;
    let no_cfi = UnwindRow {
        kind: kind::NO_CFI,
        ..Default::default()
    };
    for function in functions {
        if function.end <= covered_end {
            continue;
        }
        if function.start > covered_end && !absolute.is_empty() {
            absolute.push((covered_end, no_cfi));
        }
        // Rows before the part not yet covered are dropped, but the last of them still rules
        // from `covered_end` on.
        let from = function.start.max(covered_end);
        let mut carried = None;
        for &(pc, row) in &function.rows {
            if pc >= function.end {
                break;
            }
            if pc <= from {
                carried = Some(row);
            } else {
                if let Some(row) = carried.take() {
                    absolute.push((from, row));
                }
                absolute.push((pc, row));
            }
        }
        if let Some(row) = carried {
            absolute.push((from, row));
        }
        covered_end = function.end;
    }
    if absolute.is_empty() {
        return Err(Error::NoCfi);
    }
    absolute.push((covered_end, no_cfi));

    let base = absolute[0].0;
    let rows_before_dedup = absolute.len() as u64;
    let mut rows: Vec<UnwindRow> = Vec::with_capacity(absolute.len());
    for (pc, mut row) in absolute {
        row.pc = u32::try_from(pc - base).map_err(|_| Error::TooLarge)?;
        match rows.last_mut() {
            // An empty range: the later row replaces it.
            Some(last) if last.pc == row.pc => *last = row,
            Some(last) if last.same_rule(&row) => {}
            _ => rows.push(row),
        }
    }
    // Replacing an empty row can leave two equal neighbours; one more pass merges them.
    rows.dedup_by(|later, earlier| earlier.same_rule(later));
    if rows.len() > MAX_TABLE_ROWS as usize {
        return Err(Error::TooLarge);
    }
    Ok((base, rows, rows_before_dedup))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(kind: u8, cfa_offset: i32) -> UnwindRow {
        UnwindRow {
            kind,
            cfa_offset,
            ..Default::default()
        }
    }

    #[test]
    fn gaps_become_no_cfi_and_equal_neighbours_merge() {
        let functions = vec![
            Function {
                start: 0x1010,
                end: 0x1020,
                rows: vec![
                    (0x1010, rule(kind::CFA_RSP, 8)),
                    (0x1014, rule(kind::CFA_RSP, 16)),
                ],
            },
            Function {
                start: 0x1000,
                end: 0x1010,
                rows: vec![(0x1000, rule(kind::CFA_RSP, 8))],
            },
            // Overlaps the first: only its tail past 0x1020 counts.
            Function {
                start: 0x1018,
                end: 0x1028,
                rows: vec![(0x1018, rule(kind::CFA_RSP, 24))],
            },
            Function {
                start: 0x1040,
                end: 0x1050,
                rows: vec![(0x1040, rule(kind::END_OF_STACK, 0))],
            },
        ];
        let (base, rows, before) = assemble(functions).unwrap();
        assert_eq!(base, 0x1000);
        let got: Vec<_> = rows.iter().map(|r| (r.pc, r.kind, r.cfa_offset)).collect();
        assert_eq!(
            got,
            [
                (0x00, kind::CFA_RSP, 8),
                (0x14, kind::CFA_RSP, 16),
                (0x20, kind::CFA_RSP, 24),
                (0x28, kind::NO_CFI, 0),
                (0x40, kind::END_OF_STACK, 0),
                (0x50, kind::NO_CFI, 0),
            ]
        );
        assert_eq!(before, 7);
    }

    #[test]
    fn no_functions_is_an_error() {
        assert!(matches!(assemble(Vec::new()), Err(Error::NoCfi)));
    }
}
