//! Test helpers: building the C test program, naming addresses, finding real binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use object::{Object, ObjectSection, ObjectSymbol};

/// Debian's libc and python, the binaries the issue names.
pub const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
pub const PYTHON: &str = "/usr/bin/python3.11";

/// A directory that lives as long as the test binary.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
}

/// Runs a command that must succeed.
pub fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `testdata/frames.c` built with `cc -O2 -fomit-frame-pointer -g` plus `extra` flags, once per
/// distinct `name`.
pub fn frames_binary(name: &str, extra: &[&str]) -> PathBuf {
    let out = scratch().join(name);
    if !out.exists() {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/frames.c");
        let tmp = scratch().join(format!("{name}.tmp"));
        run(Command::new("cc")
            .args(["-O2", "-fomit-frame-pointer", "-g"])
            .args(extra)
            .arg("-o")
            .arg(&tmp)
            .arg(source));
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// `testdata/spin.go` built with `go build` (golang-go, installed by `cargo xtask setup`).
pub fn go_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let out = scratch().join("spin-go");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/spin.go");
        run(Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&out)
            .arg(source));
        out
    })
    .clone()
}

/// The default build of the C test program.
pub fn frames() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| frames_binary("frames", &[])).clone()
}

/// A copy of `path` with its section headers removed (e_shoff, e_shnum and e_shstrndx zeroed),
/// as some packers and size-squeezed images ship.
pub fn without_section_headers(path: &Path, name: &str) -> PathBuf {
    let mut data = std::fs::read(path).unwrap();
    data[0x28..0x30].fill(0); // e_shoff
    data[0x3c..0x40].fill(0); // e_shnum, e_shstrndx
    let out = scratch().join(name);
    std::fs::write(&out, data).unwrap();
    let file = std::fs::read(&out).unwrap();
    let elf = object::File::parse(&file[..]).unwrap();
    assert_eq!(elf.sections().count(), 0, "section headers still present");
    out
}

/// Function symbols of an ELF file (symtab and dynsym), by ELF virtual address.
pub struct Symbols(Vec<(u64, u64, String)>);

impl Symbols {
    pub fn of(path: &Path) -> Symbols {
        let data = std::fs::read(path).unwrap();
        let elf = object::File::parse(&data[..]).unwrap();
        let mut symbols: Vec<_> = elf
            .symbols()
            .chain(elf.dynamic_symbols())
            .filter(|s| s.kind() == object::SymbolKind::Text && s.address() != 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
            .collect();
        symbols.sort();
        symbols.dedup_by_key(|s| s.0);
        Symbols(symbols)
    }

    /// The function containing `vaddr`; symbols without a size cover up to the next one.
    pub fn name(&self, vaddr: u64) -> Option<&str> {
        let at = self.0.partition_point(|s| s.0 <= vaddr).checked_sub(1)?;
        let (start, size, name) = &self.0[at];
        (size == &0 || vaddr < start + size).then_some(name.as_str())
    }

    /// Address and size of the function `name`.
    pub fn find(&self, name: &str) -> Option<(u64, u64)> {
        self.0.iter().find(|s| s.2 == name).map(|s| (s.0, s.1))
    }
}

/// Address and size of a section.
pub fn section(path: &Path, name: &str) -> Option<(u64, u64)> {
    let data = std::fs::read(path).unwrap();
    let elf = object::File::parse(&data[..]).unwrap();
    let section = elf.section_by_name(name)?;
    Some((section.address(), section.size()))
}

/// A real file the tests need: on CI its absence fails the test, elsewhere it is reported.
pub fn required(path: &str) -> Option<PathBuf> {
    let path = PathBuf::from(path);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").is_err(),
        "{} is missing (installed by cargo xtask setup)",
        path.display()
    );
    eprintln!("skipping {}: not installed", path.display());
    None
}

/// Rust release binaries without frame pointers: this test binary itself (built by
/// `cargo test --release`), and the profiler when `PROFILER_BIN` names it (as `cargo xtask test`
/// does).
pub fn rust_binaries() -> Vec<PathBuf> {
    let mut binaries = vec![std::env::current_exe().unwrap()];
    if let Ok(bin) = std::env::var("PROFILER_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.exists(),
            "PROFILER_BIN={} does not exist",
            bin.display()
        );
        binaries.push(bin);
    }
    binaries
}
