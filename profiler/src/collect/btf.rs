//! Kernel structure offsets read from the running kernel's BTF.
//!
//! aya cannot apply CO-RE relocations to Rust eBPF code, so the one field the kernel side reads
//! from a `task_struct` (a forked child's `tgid`) is located here and passed in at load time.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use btf_rs::{Btf, Type};

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

/// Byte offset of `member` in `struct strukt`, from the BTF at `path`.
pub fn member_offset(path: &Path, strukt: &str, member: &str) -> Result<u32> {
    let btf = Btf::from_file(path).with_context(|| format!("reading {}", path.display()))?;
    let types = btf
        .resolve_types_by_name(strukt)
        .with_context(|| format!("no type `{strukt}` in the kernel's BTF"))?;
    for ty in types {
        let Type::Struct(s) = ty else { continue };
        for m in &s.members {
            if btf.resolve_name(m).ok().as_deref() == Some(member) {
                return Ok(m.bit_offset() / 8);
            }
        }
    }
    Err(anyhow!(
        "no member `{member}` in `struct {strukt}` in the kernel's BTF"
    ))
}
