//! Kernel structure offsets read from the running kernel's BTF.
//!
//! aya cannot apply CO-RE relocations to Rust eBPF code, so the fields the kernel side reads
//! from a `task_struct` (a forked child's `tgid`, the leader's start time) are located here and
//! passed in at load time.
//! The look-up scans the type section once without building the type graph: full BTF parsers
//! (btf-rs) spent about 75 ms of our 190 ms start-up decoding 100,000 types to answer it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};

/// Where the kernel publishes its own BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The kernel's BTF: `$PROFILER_VMLINUX_BTF` (for kernels whose BTF ships as a separate file),
/// else /sys/kernel/btf/vmlinux.
pub fn vmlinux_btf() -> PathBuf {
    std::env::var_os("PROFILER_VMLINUX_BTF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(VMLINUX_BTF))
}

/// Fails with a clear message when the kernel has no BTF, which every program we load needs.
pub fn require_btf() -> Result<PathBuf> {
    let path = vmlinux_btf();
    if !path.exists() {
        bail!(
            "this kernel has no BTF ({} is missing); a kernel built with CONFIG_DEBUG_INFO_BTF=y is needed",
            path.display()
        );
    }
    Ok(path)
}

/// The kernel's BTF, read once for both the offset look-up and aya.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_TYPEDEF: u32 = 8;

/// Fails with one clear line when the kernel has no BTF tracepoint `name` (the typedef
/// `btf_trace_NAME` the kernel declares for each), which `feature` needs.
pub fn require_btf_tracepoint(btf: &[u8], name: &str, feature: &str) -> Result<()> {
    let typedef = format!("btf_trace_{name}");
    if find_type(btf, KIND_TYPEDEF, &typedef)?.is_none() {
        bail!(
            "{feature} needs the BTF tracepoint {name} (tp_btf/{name}), which this kernel's BTF \
             does not declare"
        );
    }
    Ok(())
}

/// Byte offset of `member` in `struct strukt`, from the kernel's BTF bytes (native endian).
#[cfg(test)]
pub fn member_offset(btf: &[u8], strukt: &str, member: &str) -> Result<u32> {
    Ok(member_offsets(btf, strukt, &[member])?[0])
}

fn u32_at(btf: &[u8], at: usize) -> Option<u32> {
    btf.get(at..at + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// A type found by [`find_type`]: where its members start, how many, and its kind flag.
struct FoundType<'a> {
    members_at: usize,
    vlen: usize,
    kind_flag: u32,
    strings: &'a [u8],
}

/// The first type of `kind` named `name`, in one scan of the type section.
fn find_type<'a>(btf: &'a [u8], kind: u32, name: &str) -> Result<Option<FoundType<'a>>> {
    let u16_at = |at: usize| {
        btf.get(at..at + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| u32_at(btf, at);
    let bad = || anyhow!("the kernel's BTF is malformed");
    if u16_at(0) != Some(BTF_MAGIC) {
        bail!("the kernel's BTF has a bad magic number");
    }
    let header_len = u32_at(4).ok_or_else(bad)? as usize;
    let field = |i: usize| u32_at(8 + 4 * i).map(|v| v as usize).ok_or_else(bad);
    let (type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?);
    let types = header_len + type_off..header_len + type_off + type_len;
    let strings = btf
        .get(header_len + str_off..header_len + str_off + str_len)
        .ok_or_else(bad)?;
    let mut at = types.start;
    while at + 12 <= types.end {
        let name_off = u32_at(at).ok_or_else(bad)?;
        let info = u32_at(at + 4).ok_or_else(bad)?;
        let (found, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31);
        at += 12;
        if found == kind && string(strings, name_off) == name.as_bytes() {
            return Ok(Some(FoundType {
                members_at: at,
                vlen,
                kind_flag,
                strings,
            }));
        }
        at += trailing_bytes(found, vlen).ok_or_else(|| anyhow!("unknown BTF kind {found}"))?;
    }
    Ok(None)
}

/// The NUL-terminated string at `offset` of the string section.
fn string(strings: &[u8], offset: u32) -> &[u8] {
    let rest = strings.get(offset as usize..).unwrap_or_default();
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    &rest[..end]
}

/// Byte offsets of `members` in `struct strukt`, in one scan of the kernel's BTF bytes.
pub fn member_offsets(btf: &[u8], strukt: &str, members: &[&str]) -> Result<Vec<u32>> {
    let bad = || anyhow!("the kernel's BTF is malformed");
    let found = find_type(btf, KIND_STRUCT, strukt)?
        .ok_or_else(|| anyhow!("no `struct {strukt}` in the kernel's BTF"))?;
    let mut offsets = Vec::with_capacity(members.len());
    for member in members {
        let at = (0..found.vlen)
            .map(|i| found.members_at + 12 * i)
            .find(|m| {
                u32_at(btf, *m).is_some_and(|n| string(found.strings, n) == member.as_bytes())
            })
            .ok_or_else(|| {
                anyhow!("no member `{member}` in `struct {strukt}` in the kernel's BTF")
            })?;
        let offset = u32_at(btf, at + 8).ok_or_else(bad)?;
        // With kind_flag, the top 8 bits hold a bitfield size.
        let bits = if found.kind_flag == 1 {
            offset & 0xff_ffff
        } else {
            offset
        };
        offsets.push(bits / 8);
    }
    Ok(offsets)
}

/// Bytes that follow a type's 12-byte header, by kind (see the kernel's btf.rst).
fn trailing_bytes(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        // INT, VAR and DECL_TAG carry one u32.
        1 | 14 | 17 => 4,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG: nothing.
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        // ARRAY: element type, index type, count.
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64: 12 bytes per member.
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO: 8 bytes per member.
        6 | 13 => 8 * vlen,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::member_offset;

    /// A BTF blob with `int` and `struct point { int x; int y; }`.
    fn tiny_btf() -> Vec<u8> {
        let strings = b"\0int\0point\0x\0y\0";
        let mut types: Vec<u32> = vec![];
        // [1] INT "int", size 4, encoding word.
        types.extend([1, 1 << 24, 4, 32]);
        // [2] STRUCT "point", 2 members, size 8.
        types.extend([5, (4 << 24) | 2, 8]);
        types.extend([11, 1, 0]); // x at bit 0
        types.extend([13, 1, 32]); // y at bit 32
        let types: Vec<u8> = types.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend(0xeb9fu16.to_ne_bytes());
        blob.extend([1u8, 0]);
        for word in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend(word.to_ne_bytes());
        }
        blob.extend(types);
        blob.extend(strings);
        blob
    }

    #[test]
    fn finds_members_in_a_hand_made_blob() {
        let btf = tiny_btf();
        assert_eq!(member_offset(&btf, "point", "x").unwrap(), 0);
        assert_eq!(member_offset(&btf, "point", "y").unwrap(), 4);
        assert!(member_offset(&btf, "point", "z").is_err());
        assert!(member_offset(&btf, "line", "x").is_err());
        assert!(member_offset(b"junk", "point", "x").is_err());
    }

    #[test]
    fn btf_tracepoints_are_found_by_their_typedef() {
        let btf = tiny_btf();
        let err = super::require_btf_tracepoint(&btf, "sched_switch", "--off-cpu").unwrap_err();
        assert!(err
            .to_string()
            .contains("--off-cpu needs the BTF tracepoint sched_switch"));
        let Ok(vmlinux) = std::fs::read(super::VMLINUX_BTF) else {
            eprintln!("skipped: no kernel BTF");
            return;
        };
        super::require_btf_tracepoint(&vmlinux, "sched_switch", "--off-cpu").unwrap();
        assert!(super::require_btf_tracepoint(&vmlinux, "no_such_event", "x").is_err());
    }

    #[test]
    fn tgid_follows_pid_in_the_running_kernel() {
        let Ok(btf) = std::fs::read(super::VMLINUX_BTF) else {
            eprintln!("skipped: no kernel BTF");
            return;
        };
        let pid = member_offset(&btf, "task_struct", "pid").unwrap();
        let tgid = member_offset(&btf, "task_struct", "tgid").unwrap();
        assert_eq!(tgid, pid + 4);
    }
}
