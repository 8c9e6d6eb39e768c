//! Go's own function table (`.gopclntab`), which names functions, files, lines and inlined
//! calls in Go binaries even when `-ldflags=-s -w` or `strip` removed the symbol table and
//! DWARF. Go 1.18+ layouts (header magic 0xfffffff0 for 1.18/1.19, 0xfffffff1 for 1.20+).
//!
//! No crate reads it for look-ups (blazesym does not; the crates that parse it are reverse
//! engineering tools that dump every symbol), so this is a small reader of our own. Every
//! read is bounds-checked and every walk is bounded: corrupt tables give [`Corrupt`], never a
//! panic or an endless loop.

use std::ops::Range;

use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// The table is not what its header says: a read out of bounds, a walk too long, a bad name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt;

type Result<T> = std::result::Result<T, Corrupt>;

/// Steps of one pc-value table walk: a function's table has one step per change of value,
/// far fewer than its bytes of code.
const MAX_STEPS: usize = 1 << 20;
/// Inlined calls followed at one pc.
const MAX_INLINE_DEPTH: usize = 64;
/// Longest function or file name read.
const MAX_NAME: usize = 64 * 1024;

const PCDATA_INL_TREE_INDEX: usize = 2;
const FUNCDATA_INL_TREE: usize = 3;

/// Which layout of `_func`, `inlinedCall` and `moduledata`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// Go 1.18 and 1.19.
    Go118,
    /// Go 1.20 and later: `_func.startLine`, a smaller `inlinedCall`, `moduledata.covctrs`.
    Go120,
}

/// One function at a pc: the innermost inlined call first, the real function last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoLine<'a> {
    pub function: &'a str,
    pub file: Option<&'a str>,
    /// 0 when unknown.
    pub line: u32,
}

/// A Go binary's function table, as offsets into the binary's bytes (which each look-up is
/// given, so the table holds no borrow).
#[derive(Debug, Clone)]
pub struct GoTable {
    version: Version,
    /// The section's bytes in the file.
    tab: Range<usize>,
    ptr_size: usize,
    quantum: u64,
    nfunc: usize,
    text_start: u64,
    /// ELF virtual address minus file offset in the text segment.
    text_bias: u64,
    /// Offsets in the table of its parts.
    funcnames: usize,
    cutab: usize,
    filetab: usize,
    pctab: usize,
    functab: usize,
    /// File offset of `go:func.*`, which inline trees are relative to; `None` when the module
    /// data could not be found (names still work, inlined calls do not).
    gofunc: Option<usize>,
}

impl GoTable {
    /// The table of the ELF binary `data`. `Ok(None)` when it is not a Go binary (no
    /// `.gopclntab`) or an older layout than Go 1.18; `Err` when the table is corrupt.
    pub fn parse(data: &[u8]) -> Result<Option<GoTable>> {
        let Ok(file) = object::File::parse(data) else {
            return Ok(None);
        };
        // PIE binaries (`-buildmode=pie`) name it `.data.rel.ro.gopclntab`.
        let Some(section) = [".gopclntab", ".data.rel.ro.gopclntab"]
            .into_iter()
            .find_map(|name| file.section_by_name(name))
        else {
            return Ok(None);
        };
        let (offset, size) = section.file_range().ok_or(Corrupt)?;
        let tab = usize::try_from(offset).map_err(|_| Corrupt)?
            ..usize::try_from(offset.checked_add(size).ok_or(Corrupt)?).map_err(|_| Corrupt)?;
        let bytes = data.get(tab.clone()).ok_or(Corrupt)?;
        let version = match read_u32(bytes, 0)? {
            0xffff_fff0 => Version::Go118,
            0xffff_fff1 => Version::Go120,
            _ => return Ok(None),
        };
        let quantum = u64::from(*bytes.get(6).ok_or(Corrupt)?);
        let ptr_size = usize::from(*bytes.get(7).ok_or(Corrupt)?);
        if !matches!(ptr_size, 4 | 8) || !matches!(quantum, 1 | 2 | 4) {
            return Err(Corrupt);
        }
        let word = |i: usize| read_word(bytes, 8 + i * ptr_size, ptr_size);
        let to_offset = |v: u64| usize::try_from(v).ok().filter(|v| *v < bytes.len());
        let nfunc = usize::try_from(word(0)?).map_err(|_| Corrupt)?;
        let text_start = word(2)?;
        let [funcnames, cutab, filetab, pctab, functab] =
            [word(3)?, word(4)?, word(5)?, word(6)?, word(7)?].map(to_offset);
        let (Some(funcnames), Some(cutab), Some(filetab), Some(pctab), Some(functab)) =
            (funcnames, cutab, filetab, pctab, functab)
        else {
            return Err(Corrupt);
        };
        // The function index (nfunc + 1 entries of two u32) must fit.
        let index_end = nfunc
            .checked_add(1)
            .and_then(|n| n.checked_mul(8))
            .and_then(|n| n.checked_add(functab));
        if nfunc == 0 || index_end.is_none_or(|end| end > bytes.len()) {
            return Err(Corrupt);
        }
        let text_bias = file
            .segments()
            .find_map(|segment| {
                let (offset, size) = segment.file_range();
                let start = segment.address();
                (start <= text_start && text_start - start < size)
                    .then(|| start.wrapping_sub(offset))
            })
            .ok_or(Corrupt)?;
        let mut table = GoTable {
            version,
            tab,
            ptr_size,
            quantum,
            nfunc,
            text_start,
            text_bias,
            funcnames,
            cutab,
            filetab,
            pctab,
            functab,
            gofunc: None,
        };
        table.gofunc = table.find_gofunc(&file, data, section.address());
        Ok(Some(table))
    }

    /// Whether inline trees can be read (the module data was found).
    pub fn has_inline_trees(&self) -> bool {
        self.gofunc.is_some()
    }

    /// Number of functions in the table.
    pub fn len(&self) -> usize {
        self.nfunc
    }

    /// True when the table holds no function (never, for a table [`GoTable::parse`] returned).
    pub fn is_empty(&self) -> bool {
        self.nfunc == 0
    }

    /// The ELF virtual address of file offset `offset`, in the text segment.
    pub fn virtual_address(&self, offset: u64) -> u64 {
        offset.wrapping_add(self.text_bias)
    }

    /// Entry address of the `i`th function (in address order); for benchmarks and tests.
    pub fn entry(&self, data: &[u8], i: usize) -> Result<u64> {
        let bytes = self.bytes(data)?;
        if i >= self.nfunc {
            return Err(Corrupt);
        }
        Ok(self.text_start + u64::from(read_u32(bytes, self.functab + i * 8)?))
    }

    /// The functions at ELF virtual address `pc`, innermost inlined call first. `Ok(None)`
    /// when no Go function covers `pc` (outside the text, or C code linked in).
    pub fn lookup<'a>(&self, data: &'a [u8], pc: u64) -> Result<Option<Vec<GoLine<'a>>>> {
        let bytes = self.bytes(data)?;
        let Some(pc_off) = pc.checked_sub(self.text_start) else {
            return Ok(None);
        };
        let entry_at = |i: usize| read_u32(bytes, self.functab + i * 8).map(u64::from);
        if pc_off >= entry_at(self.nfunc)? {
            return Ok(None);
        }
        // The last function whose entry is at or below pc.
        let (mut lo, mut hi) = (0, self.nfunc);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if entry_at(mid)? <= pc_off {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if entry_at(lo)? > pc_off {
            return Ok(None);
        }
        let func_off = read_u32(bytes, self.functab + lo * 8 + 4)? as usize;
        let func = Func::read(
            bytes,
            self.functab.checked_add(func_off).ok_or(Corrupt)?,
            self,
        )?;
        let entry = self.text_start + u64::from(func.entry_off);
        let mut lines = Vec::with_capacity(2);
        let mut at = pc;
        let (inl_table, inl_tree) = self.inline_tree(bytes, data, &func)?;
        let mut index = match inl_table {
            Some(table) => self.pc_value(bytes, table, entry, at)?.unwrap_or(-1),
            None => -1,
        };
        for _ in 0..MAX_INLINE_DEPTH {
            if index < 0 {
                break;
            }
            let Some(tree) = inl_tree else { break };
            let call = self.inlined_call(data, tree, index as usize)?;
            lines.push(GoLine {
                function: self.name(bytes, self.funcnames, call.name_off)?,
                file: self.file(bytes, &func, entry, at)?,
                line: self.line(bytes, &func, entry, at)?,
            });
            at = entry
                .checked_add_signed(i64::from(call.parent_pc))
                .ok_or(Corrupt)?;
            index = match inl_table {
                Some(table) => self.pc_value(bytes, table, entry, at)?.unwrap_or(-1),
                None => -1,
            };
        }
        if index >= 0 {
            return Err(Corrupt);
        }
        lines.push(GoLine {
            function: self.name(bytes, self.funcnames, func.name_off)?,
            file: self.file(bytes, &func, entry, at)?,
            line: self.line(bytes, &func, entry, at)?,
        });
        Ok(Some(lines))
    }

    fn bytes<'a>(&self, data: &'a [u8]) -> Result<&'a [u8]> {
        data.get(self.tab.clone()).ok_or(Corrupt)
    }

    /// The pc-value table of `func`'s inlined calls and the file offset of its inline tree.
    fn inline_tree(
        &self,
        bytes: &[u8],
        data: &[u8],
        func: &Func,
    ) -> Result<(Option<u32>, Option<usize>)> {
        let Some(gofunc) = self.gofunc else {
            return Ok((None, None));
        };
        if func.npcdata as usize <= PCDATA_INL_TREE_INDEX
            || usize::from(func.nfuncdata) <= FUNCDATA_INL_TREE
        {
            return Ok((None, None));
        }
        let table = read_u32(bytes, func.pcdata + PCDATA_INL_TREE_INDEX * 4)?;
        let funcdata = func.pcdata + func.npcdata as usize * 4;
        let tree = read_u32(bytes, funcdata + FUNCDATA_INL_TREE * 4)?;
        if table == 0 || tree == u32::MAX {
            return Ok((None, None));
        }
        let tree = gofunc.checked_add(tree as usize).ok_or(Corrupt)?;
        if tree >= data.len() {
            return Err(Corrupt);
        }
        Ok((Some(table), Some(tree)))
    }

    fn inlined_call(&self, data: &[u8], tree: usize, index: usize) -> Result<InlinedCall> {
        let size = match self.version {
            Version::Go118 => 20,
            Version::Go120 => 16,
        };
        let at = index
            .checked_mul(size)
            .and_then(|o| o.checked_add(tree))
            .ok_or(Corrupt)?;
        Ok(match self.version {
            // parent int16, funcID u8, _ u8, file int32, line int32, func_ int32, parentPc int32
            Version::Go118 => InlinedCall {
                name_off: read_u32(data, at + 12)?,
                parent_pc: read_u32(data, at + 16)? as i32,
            },
            // funcID u8, _ [3]u8, nameOff int32, parentPc int32, startLine int32
            Version::Go120 => InlinedCall {
                name_off: read_u32(data, at + 4)?,
                parent_pc: read_u32(data, at + 8)? as i32,
            },
        })
    }

    fn file<'a>(
        &self,
        bytes: &'a [u8],
        func: &Func,
        entry: u64,
        pc: u64,
    ) -> Result<Option<&'a str>> {
        let Some(file) = self.pc_value(bytes, func.pcfile, entry, pc)? else {
            return Ok(None);
        };
        if file < 0 {
            return Ok(None);
        }
        let index = (func.cu_offset as usize)
            .checked_add(file as usize)
            .and_then(|i| i.checked_mul(4))
            .and_then(|i| i.checked_add(self.cutab))
            .ok_or(Corrupt)?;
        let name_off = read_u32(bytes, index)?;
        if name_off == u32::MAX {
            return Ok(None);
        }
        self.name(bytes, self.filetab, name_off).map(Some)
    }

    fn line(&self, bytes: &[u8], func: &Func, entry: u64, pc: u64) -> Result<u32> {
        Ok(self
            .pc_value(bytes, func.pcln, entry, pc)?
            .and_then(|line| u32::try_from(line).ok())
            .unwrap_or(0))
    }

    /// The NUL-terminated name at `offset` in the part of the table at `base`.
    fn name<'a>(&self, bytes: &'a [u8], base: usize, offset: u32) -> Result<&'a str> {
        let start = base.checked_add(offset as usize).ok_or(Corrupt)?;
        let rest = bytes.get(start..).ok_or(Corrupt)?;
        let rest = &rest[..rest.len().min(MAX_NAME)];
        let end = rest.iter().position(|b| *b == 0).ok_or(Corrupt)?;
        std::str::from_utf8(&rest[..end]).map_err(|_| Corrupt)
    }

    /// The value of the pc-value table at `table` (an offset in pctab) at `pc`, for the
    /// function entered at `entry`; `None` when the table has no value there.
    fn pc_value(&self, bytes: &[u8], table: u32, entry: u64, pc: u64) -> Result<Option<i32>> {
        if table == 0 {
            return Ok(None);
        }
        let mut at = self.pctab.checked_add(table as usize).ok_or(Corrupt)?;
        let (mut value, mut step_pc) = (-1i32, entry);
        for step in 0..MAX_STEPS {
            let delta = read_varint(bytes, &mut at)?;
            if delta == 0 && step > 0 {
                return Ok(None);
            }
            value = value.wrapping_add(((delta >> 1) as i32) ^ -((delta & 1) as i32));
            let pc_delta = read_varint(bytes, &mut at)?;
            step_pc = step_pc
                .checked_add(u64::from(pc_delta) * self.quantum)
                .ok_or(Corrupt)?;
            if pc < step_pc {
                return Ok(Some(value));
            }
        }
        Err(Corrupt)
    }

    /// The file offset of `go:func.*`, from the module data (`runtime.firstmoduledata`), found
    /// by its first fields: pointers to the table's header and to its function names.
    fn find_gofunc(&self, file: &object::File<'_>, data: &[u8], tab_addr: u64) -> Option<usize> {
        let ps = self.ptr_size;
        let word = |at: usize| read_word(data, at, ps).ok();
        // Words of moduledata: pcHeader, then 6 slices (3 words each), findfunctab, minpc,
        // maxpc, text (word 22), ... types, etypes, rodata, gofunc.
        let gofunc_word = match self.version {
            Version::Go118 => 38,
            Version::Go120 => 40,
        };
        let funcnames_addr = tab_addr.checked_add(self.funcnames as u64)?;
        for name in [".noptrdata", ".data"] {
            let Some((offset, size)) = file.section_by_name(name).and_then(|s| s.file_range())
            else {
                continue;
            };
            let Some(end) = offset.checked_add(size) else {
                continue;
            };
            let (start, end) = (offset as usize, end as usize);
            let mut at = start;
            while at + (gofunc_word + 1) * ps <= end.min(data.len()) {
                if word(at) == Some(tab_addr)
                    && word(at + ps) == Some(funcnames_addr)
                    && word(at + 22 * ps) == Some(self.text_start)
                {
                    let gofunc = word(at + gofunc_word * ps)?;
                    return vaddr_to_offset(file, gofunc);
                }
                at += ps;
            }
        }
        None
    }
}

/// The parts of a `_func` a look-up reads.
struct Func {
    entry_off: u32,
    name_off: u32,
    pcfile: u32,
    pcln: u32,
    npcdata: u32,
    cu_offset: u32,
    nfuncdata: u8,
    /// Offset in the table of the pcdata offsets (funcdata offsets follow).
    pcdata: usize,
}

impl Func {
    fn read(bytes: &[u8], at: usize, table: &GoTable) -> Result<Func> {
        let field = |i: usize| read_u32(bytes, at + i * 4);
        // entryOff, nameOff, args, deferreturn, pcsp, pcfile, pcln, npcdata, cuOffset,
        // [startLine (1.20+)], funcID u8, flag u8, _ u8, nfuncdata u8.
        let fixed = match table.version {
            Version::Go118 => 40,
            Version::Go120 => 44,
        };
        let npcdata = field(7)?;
        if npcdata > 1024 {
            return Err(Corrupt);
        }
        Ok(Func {
            entry_off: field(0)?,
            name_off: field(1)?,
            pcfile: field(5)?,
            pcln: field(6)?,
            npcdata,
            cu_offset: field(8)?,
            nfuncdata: *bytes.get(at + fixed - 1).ok_or(Corrupt)?,
            pcdata: at + fixed,
        })
    }
}

struct InlinedCall {
    name_off: u32,
    parent_pc: i32,
}

/// The file offset of ELF virtual address `vaddr`, in a loaded segment's file bytes.
fn vaddr_to_offset(file: &object::File<'_>, vaddr: u64) -> Option<usize> {
    file.segments().find_map(|segment| {
        let (offset, size) = segment.file_range();
        let start = segment.address();
        (start <= vaddr && vaddr < start + size)
            .then(|| usize::try_from(vaddr - start + offset).ok())
            .flatten()
    })
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32> {
    let b = bytes
        .get(at..at.checked_add(4).ok_or(Corrupt)?)
        .ok_or(Corrupt)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_word(bytes: &[u8], at: usize, size: usize) -> Result<u64> {
    let b = bytes
        .get(at..at.checked_add(size).ok_or(Corrupt)?)
        .ok_or(Corrupt)?;
    let mut word = [0u8; 8];
    word[..size].copy_from_slice(b);
    Ok(u64::from_le_bytes(word))
}

/// A little-endian base-128 varint of at most 32 bits, advancing `at`.
fn read_varint(bytes: &[u8], at: &mut usize) -> Result<u32> {
    let mut value = 0u32;
    for shift in (0..35).step_by(7) {
        let byte = *bytes.get(*at).ok_or(Corrupt)?;
        *at += 1;
        value |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Corrupt)
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, process::Command};

    use super::{Corrupt, GoTable};

    /// A Go program with a recursive function and a call the compiler inlines.
    const PROGRAM: &str = r#"package main

import "os"

//go:noinline
func fib(n int) int {
	if n < 2 {
		return n
	}
	return fib(n-1) + fib(n-2)
}

func add(a, b int) int { return a + b*3 }

//go:noinline
func loop(n int) int {
	s := 0
	for i := 0; i < n; i++ {
		s = add(s, fib(i%20))
	}
	return s
}

func main() { os.Exit(loop(len(os.Args)) & 1) }
"#;

    /// A stripped (`-ldflags=-s -w`) Go binary built from [`PROGRAM`] with `flags`; `None` (a
    /// skip) when no Go toolchain is installed, except in CI, where that fails.
    fn stripped_go_binary(flags: &[&str]) -> Option<(tempfile::TempDir, PathBuf)> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("main.go"), PROGRAM).unwrap();
        std::fs::write(dir.path().join("go.mod"), "module gofib\ngo 1.18\n").unwrap();
        let out = dir.path().join("fib");
        let built = Command::new("go")
            .args(["build", "-ldflags=-s -w"])
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg(".")
            .current_dir(dir.path())
            .env("GOFLAGS", "-mod=mod")
            .status();
        match built {
            Ok(status) if status.success() => Some((dir, out)),
            _ if std::env::var_os("CI").is_some() => panic!("go build failed: {built:?}"),
            _ => {
                eprintln!("skipped: no Go toolchain");
                None
            }
        }
    }

    #[test]
    fn names_functions_files_lines_and_inlined_calls_of_a_stripped_binary() {
        let Some((_dir, path)) = stripped_go_binary(&[]) else {
            return;
        };
        let data = std::fs::read(path).unwrap();
        let table = GoTable::parse(&data).unwrap().expect("a Go table");
        assert!(table.has_inline_trees(), "module data found");
        let mut fib = None;
        let mut loop_entry = None;
        for i in 0..table.len() {
            let entry = table.entry(&data, i).unwrap();
            let lines = table.lookup(&data, entry).unwrap().unwrap();
            match lines.last().unwrap().function {
                "main.fib" => fib = Some(lines),
                "main.loop" => loop_entry = Some(entry),
                _ => {}
            }
        }
        let fib = fib.expect("main.fib named");
        assert!(fib[0].file.unwrap().ends_with("main.go"), "{fib:?}");
        assert_eq!(fib[0].line, 6, "{fib:?}");
        // Somewhere in main.loop, main.add is inlined: [add, loop], innermost first.
        let loop_entry = loop_entry.expect("main.loop named");
        let inlined = (loop_entry..loop_entry + 512)
            .filter_map(|pc| table.lookup(&data, pc).ok().flatten())
            .find(|lines| lines.len() == 2)
            .expect("an inlined call in main.loop");
        assert_eq!(inlined[0].function, "main.add");
        assert_eq!(inlined[0].line, 13);
        assert_eq!(inlined[1].function, "main.loop");
        assert_eq!(inlined[1].line, 19, "the call site");
        // Outside the text: nothing, and no error.
        assert_eq!(table.lookup(&data, 0x10).unwrap(), None);
    }

    #[test]
    fn a_position_independent_binary_is_named_too() {
        // Its table is `.data.rel.ro.gopclntab`.
        let Some((_dir, path)) = stripped_go_binary(&["-buildmode=pie"]) else {
            return;
        };
        let data = std::fs::read(path).unwrap();
        let table = GoTable::parse(&data).unwrap().expect("a Go table");
        let named = (0..table.len()).any(|i| {
            let entry = table.entry(&data, i).unwrap();
            let lines = table.lookup(&data, entry).unwrap().unwrap();
            lines.last().unwrap().function == "main.fib"
        });
        assert!(named);
    }

    #[test]
    fn corrupt_tables_give_errors_not_panics() {
        let Some((_dir, path)) = stripped_go_binary(&[]) else {
            return;
        };
        let data = std::fs::read(path).unwrap();
        let table = GoTable::parse(&data).unwrap().unwrap();
        let entries: Vec<u64> = (0..table.len())
            .step_by(7)
            .map(|i| table.entry(&data, i).unwrap())
            .collect();
        let tab = table.tab.clone();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut errors = 0;
        for round in 0..40 {
            let mut bad = data.clone();
            // Scattered bytes, then whole runs, across the table (header included).
            for _ in 0..(1 << (round % 10)) {
                let at = tab.start + (random() as usize) % tab.len();
                bad[at] = random() as u8;
            }
            if round % 4 == 3 {
                let at = tab.start + (random() as usize) % tab.len();
                let end = (at + 4096).min(tab.end);
                bad[at..end].fill(0xff);
            }
            let table = match GoTable::parse(&bad) {
                Ok(Some(table)) => table,
                Ok(None) | Err(Corrupt) => {
                    errors += 1;
                    continue;
                }
            };
            for pc in &entries {
                for delta in [0, 3, 17] {
                    errors += usize::from(table.lookup(&bad, pc + delta).is_err());
                }
            }
        }
        assert!(errors > 0, "some corruption is noticed");
        // Cut short in the middle of the table.
        let short = &data[..tab.start + tab.len() / 2];
        if let Ok(Some(table)) = GoTable::parse(short) {
            for pc in &entries {
                let _ = table.lookup(short, *pc);
            }
        }
    }
}
