//! `cargo xtask dist`: the release tarball holds a static binary that records from an empty
//! directory, its debug information is found by build ID, and SHA256SUMS matches.
//!
//! The tarballs are the ones `cargo xtask test` built before running the tests (PROFILER_DIST,
//! PROFILER_DIST_DEBUG), so the suite checks exactly what a release would ship.

use std::{path::Path, process::Command};

use profiler_tests::{ship::*, *};

/// The single directory in the tarball: `profiler-<version>-x86_64-linux-musl`.
fn package_dir() -> String {
    format!("profiler-{}-x86_64-linux-musl", env!("CARGO_PKG_VERSION"))
}

/// Unpacks the dist tarball into `dir` (which must be empty) and returns the binary's path.
fn unpack(tarball: &Path, dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    assert!(files_under(dir).is_empty());
    untar(tarball, dir);
    dir.join(package_dir()).join("profiler")
}

#[test]
fn tarball_holds_a_static_binary() {
    let Some(tarball) = dist_tarball() else {
        return;
    };
    assert_eq!(
        tarball.file_name().unwrap().to_str().unwrap(),
        format!("{}.tar.gz", package_dir())
    );
    let dir = tempfile::tempdir().unwrap();
    let binary = unpack(&tarball, dir.path());
    let package = package_dir();
    assert_eq!(
        files_under(dir.path()),
        [
            format!("{package}/README.md"),
            format!("{package}/profiler")
        ]
    );

    let file = run_ok(Command::new("file").arg(&binary));
    assert!(file.contains("ELF 64-bit LSB"), "{file}");
    assert!(file.contains("x86-64"), "{file}");
    assert!(
        file.contains("statically linked") || file.contains("static-pie linked"),
        "`file` does not call it static: {file}"
    );
    // Symbols stay (its own profiles and backtraces name functions); debug info goes.
    assert!(file.contains("not stripped"), "{file}");

    // ldd finds nothing to load: it says so and exits 1 (it exits 0 and lists libraries for a
    // dynamic binary).
    let ldd = output(Command::new("ldd").arg(&binary));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    assert!(
        said.contains("not a dynamic executable") || said.contains("statically linked"),
        "ldd: {said}"
    );
    assert!(!said.contains("=>"), "ldd lists libraries: {said}");

    let sections = run_ok(Command::new("readelf").arg("-S").arg(&binary));
    assert!(
        !sections.contains(".debug_info"),
        "debug info left in the binary"
    );
    assert!(sections.contains(".symtab"), "symbol table stripped");

    // It runs: the version is the workspace's.
    let version = run_ok(Command::new(&binary).arg("--version"));
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")),
        "--version says {version}"
    );
}

#[test]
fn binary_from_an_empty_directory_records_a_workload() {
    let Some(tarball) = dist_tarball() else {
        return;
    };
    let Some(t) = bpf_test() else { return };
    let dir = t.path("unpacked");
    std::fs::create_dir(&dir).unwrap();
    let binary = unpack(&tarball, &dir);
    // The unpacked binary, run from its own directory, records `workload ARGS` at 999 Hz.
    let record = |name: &str, args: &[&str]| {
        let out = t.path(name);
        let result = output(
            Command::new(&binary)
                .current_dir(&dir)
                .args(["record", "-F", "999", "-o", path_str(&out), "--"])
                .arg(workload())
                .args(args),
        );
        let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
        assert!(result.status.success(), "record failed: {stderr}");
        (read_samples(&out), stderr)
    };
    let (samples, stderr) = record("shares.pb.gz", &["shares", "2"]);
    let is_workload = |s: &DecodedSample| s.labels.get("comm").is_some_and(|c| c == "workload");
    let shares = inclusive_shares(&samples, is_workload);
    let total = sample_count(&samples, is_workload);
    // Few enough for a machine whose other work leaves the workload a fraction of a CPU.
    assert!(total > 100, "too few samples: {total}; {stderr}");
    for (function, truth) in [("main", 100.0), ("heavy", 60.0), ("light", 30.0)] {
        let got = shares.get(function).copied().unwrap_or(0.0);
        assert!(
            (got - truth).abs() <= 7.0,
            "{function}: {got:.1}% recorded, {truth}% true; all: {shares:?}"
        );
    }
    // Kernel frames are symbolized too (kallsyms read by the static binary). A workload that
    // lives in write(2): a pure spinner reaches the kernel only by chance (one CI run had no
    // kernel frame in 2,000 samples).
    let (samples, stderr) = record("syscalls.pb.gz", &["syscalls", "1"]);
    assert!(
        samples
            .iter()
            .any(|s| s.functions.iter().any(|f| f.contains("sys_write"))),
        "no write(2) kernel frame in any sample; {stderr}"
    );
}

#[test]
fn debug_info_is_found_by_build_id() {
    let (Some(tarball), Some(debug_tarball)) = (dist_tarball(), dist_debug_tarball()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let binary = unpack(&tarball, &dir.path().join("bin"));
    let debug_dir = dir.path().join("debug");
    untar(&debug_tarball, &debug_dir);
    let build_id = read_build_id(&binary);
    assert!(build_id.len() >= 32, "short build ID {build_id}");
    let debug_file = format!(".build-id/{}/{}.debug", &build_id[..2], &build_id[2..]);
    assert_eq!(files_under(&debug_dir), std::slice::from_ref(&debug_file));
    assert_eq!(read_build_id(&debug_dir.join(&debug_file)), build_id);

    // elfutils looks the debug file up by build ID under its debuginfo path: with the unpacked
    // debug tarball there, an address of the profiler's `main` gets its source line; without
    // it, only the symbol table's name.
    let symbols = run_ok(Command::new("nm").arg("--demangle").arg(&binary));
    let address = symbols
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.next()?;
            let kind = fields.next()?;
            let name = fields.next()?;
            let main = name == "profiler::main" || name.starts_with("profiler::main::h");
            (main && kind.eq_ignore_ascii_case("t")).then(|| format!("0x{address}"))
        })
        .expect("profiler::main in the symbol table");
    let addr2line = |debuginfo_path: &Path| {
        run_ok(
            Command::new("eu-addr2line")
                .arg(format!("--debuginfo-path={}", debuginfo_path.display()))
                .args(["-f", "-e"])
                .arg(&binary)
                .arg(&address),
        )
    };
    let found = addr2line(&debug_dir);
    assert!(
        found.contains("profiler/src/main.rs:"),
        "no source line for {address} with the debug file: {found}"
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let missing = addr2line(&empty);
    assert!(
        !missing.contains("main.rs:"),
        "a source line without the debug file, so the test proves nothing: {missing}"
    );
}

#[test]
fn sha256sums_covers_the_tarballs() {
    let (Some(tarball), Some(debug_tarball)) = (dist_tarball(), dist_debug_tarball()) else {
        return;
    };
    let dir = tarball.parent().unwrap();
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    for artifact in [&tarball, &debug_tarball] {
        let name = artifact.file_name().unwrap().to_str().unwrap();
        assert!(
            sums.lines().any(|l| l.ends_with(&format!("  {name}"))),
            "{name} missing from SHA256SUMS:\n{sums}"
        );
    }
    let checked = run_ok(Command::new("sha256sum").current_dir(dir).args([
        "--check",
        "--strict",
        "SHA256SUMS",
    ]));
    assert!(!checked.contains("FAILED"), "{checked}");
}

/// The kernel the README states as the minimum, as (major, minor).
const STATED_MINIMUM: (u32, u32) = (5, 15);

/// Since when the kernel has each BPF helper (by id) the programs may call.
const HELPERS: &[(i32, &str, (u32, u32))] = &[
    (1, "map_lookup_elem", (3, 19)),
    (2, "map_update_elem", (3, 19)),
    (3, "map_delete_elem", (3, 19)),
    (4, "probe_read", (4, 1)),
    (5, "ktime_get_ns", (4, 1)),
    (6, "trace_printk", (4, 1)),
    (7, "get_prandom_u32", (4, 1)),
    (8, "get_smp_processor_id", (4, 1)),
    (12, "tail_call", (4, 2)),
    (14, "get_current_pid_tgid", (4, 2)),
    (15, "get_current_uid_gid", (4, 2)),
    (16, "get_current_comm", (4, 2)),
    (25, "perf_event_output", (4, 4)),
    (27, "get_stackid", (4, 6)),
    (35, "get_current_task", (4, 8)),
    (67, "get_stack", (4, 18)),
    (112, "probe_read_user", (5, 5)),
    (113, "probe_read_kernel", (5, 5)),
    (114, "probe_read_user_str", (5, 5)),
    (115, "probe_read_kernel_str", (5, 5)),
    (130, "ringbuf_output", (5, 8)),
    (131, "ringbuf_reserve", (5, 8)),
    (132, "ringbuf_submit", (5, 8)),
    (133, "ringbuf_discard", (5, 8)),
    (158, "get_current_task_btf", (5, 11)),
    (175, "task_pt_regs", (5, 15)),
    (181, "loop", (5, 17)),
];

/// Since when the kernel has each map type (by `bpf_map_type` number).
const MAP_TYPES: &[(u32, &str, (u32, u32))] = &[
    (1, "hash", (3, 19)),
    (2, "array", (3, 19)),
    (3, "prog_array", (4, 2)),
    (4, "perf_event_array", (4, 3)),
    (5, "percpu_hash", (4, 6)),
    (6, "percpu_array", (4, 6)),
    (7, "stack_trace", (4, 6)),
    (9, "lru_hash", (4, 10)),
    (10, "lru_percpu_hash", (4, 10)),
    (12, "array_of_maps", (4, 12)),
    (13, "hash_of_maps", (4, 12)),
    (27, "ringbuf", (5, 8)),
];

/// Since when the kernel has each program type, by ELF section name prefix.
const PROGRAM_SECTIONS: &[(&str, (u32, u32))] = &[
    ("kprobe/", (4, 1)),
    ("tracepoint/", (4, 7)),
    ("perf_event", (4, 9)),
    ("raw_tracepoint/", (4, 17)),
    ("tp_btf/", (5, 5)),
];

/// One ELF64 little-endian section: name, flags and contents.
struct Section<'a> {
    name: String,
    flags: u64,
    data: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap()) as usize
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> usize {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize
}

/// The sections of the ELF64 object starting at `elf`.
fn sections(elf: &[u8]) -> Vec<Section<'_>> {
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(elf, 0x28),
        u16_at(elf, 0x3a),
        u16_at(elf, 0x3c),
        u16_at(elf, 0x3e),
    );
    let header = |i: usize| &elf[shoff + i * shentsize..shoff + (i + 1) * shentsize];
    let contents = |h: &[u8]| {
        // SHT_NOBITS (.bss) has no contents in the file.
        if u32_at(h, 4) == 8 {
            &elf[0..0]
        } else {
            &elf[u64_at(h, 0x18)..u64_at(h, 0x18) + u64_at(h, 0x20)]
        }
    };
    let names = contents(header(shstrndx));
    (0..shnum)
        .map(|i| {
            let h = header(i);
            let name = &names[u32_at(h, 0) as usize..];
            let end = name.iter().position(|&b| b == 0).unwrap();
            Section {
                name: String::from_utf8_lossy(&name[..end]).into_owned(),
                flags: u64_at(h, 8) as u64,
                data: contents(h),
            }
        })
        .collect()
}

/// The eBPF objects (ELF64 LE relocatable, machine EM_BPF) embedded in `binary`'s bytes.
fn embedded_bpf_objects(binary: &[u8]) -> Vec<&[u8]> {
    let magic = b"\x7fELF\x02\x01\x01";
    (0..binary.len().saturating_sub(64))
        .filter(|&at| {
            binary[at..].starts_with(magic)
                && u16_at(binary, at + 16) == 1 // ET_REL
                && u16_at(binary, at + 18) == 247 // EM_BPF
        })
        .map(|at| &binary[at..])
        .collect()
}

/// What one use needs: "helper get_stack needs 4.18".
type Need = (String, (u32, u32));

/// Every helper, map type, program type and global-data section the object uses, with the
/// kernel it needs; panics on any use the tables above do not know, so that a new one cannot
/// slip past the stated minimum.
fn kernel_needs(object: &[u8]) -> Vec<Need> {
    let mut needs = Vec::new();
    for section in sections(object) {
        let name = section.name.as_str();
        const SHF_EXECINSTR: u64 = 4;
        if section.flags & SHF_EXECINSTR != 0 && !section.data.is_empty() {
            if name != ".text" {
                let (_, kernel) = PROGRAM_SECTIONS
                    .iter()
                    .find(|(prefix, _)| name.starts_with(prefix))
                    .unwrap_or_else(|| panic!("program section {name} is not in the table"));
                needs.push((format!("program {name}"), *kernel));
            }
            // BPF_JMP | BPF_CALL with src_reg 0 calls helper `imm`.
            for insn in section.data.chunks_exact(8) {
                if insn[0] == 0x85 && insn[1] >> 4 == 0 {
                    let id = i32::from_le_bytes(insn[4..8].try_into().unwrap());
                    let (_, helper, kernel) = HELPERS
                        .iter()
                        .find(|(known, ..)| *known == id)
                        .unwrap_or_else(|| panic!("helper {id} (in {name}) is not in the table"));
                    needs.push((format!("helper {helper}"), *kernel));
                }
            }
        } else if name == "maps" {
            // aya-ebpf's legacy map definitions: seven u32s, the map type first.
            assert_eq!(
                section.data.len() % 28,
                0,
                "maps is not a bpf_map_def array"
            );
            for def in section.data.chunks_exact(28) {
                let kind = u32_at(def, 0);
                let (_, map, kernel) = MAP_TYPES
                    .iter()
                    .find(|(known, ..)| *known == kind)
                    .unwrap_or_else(|| panic!("map type {kind} is not in the table"));
                needs.push((format!("map {map}"), *kernel));
            }
        } else if name == ".maps" {
            panic!("BTF-defined maps (.maps): teach this test their types");
        } else if [".rodata", ".data", ".bss"].contains(&name) {
            needs.push((format!("global data {name}"), (5, 2)));
        }
    }
    needs
}

#[test]
fn stated_minimum_kernel_covers_the_shipped_ebpf_programs() {
    let Some(tarball) = dist_tarball() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let binary = std::fs::read(unpack(&tarball, dir.path())).unwrap();
    let objects = embedded_bpf_objects(&binary);
    assert_eq!(objects.len(), 1, "expected one embedded eBPF object");
    let needs = kernel_needs(objects[0]);
    for expected in ["helper get_stack", "map ringbuf", "program perf_event"] {
        assert!(
            needs.iter().any(|(what, _)| what == expected),
            "{expected} not found, so the parsing is off: {needs:?}"
        );
    }
    let newest = needs.iter().map(|(_, kernel)| *kernel).max().unwrap();
    let newest_uses: Vec<&str> = needs
        .iter()
        .filter(|(_, kernel)| *kernel == newest)
        .map(|(what, _)| what.as_str())
        .collect();
    assert_eq!(
        newest, STATED_MINIMUM,
        "the programs need {newest:?} ({newest_uses:?}); the README states {STATED_MINIMUM:?}"
    );
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let (major, minor) = STATED_MINIMUM;
    assert!(
        readme.contains(&format!("Linux {major}.{minor} or later")),
        "README does not state Linux {major}.{minor} or later"
    );
}
