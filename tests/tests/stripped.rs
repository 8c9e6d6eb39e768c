//! Binaries without symbols: a stripped C binary's frames keep a name (`file+0xADDR`, the ELF
//! address `addr2line` takes) and a pprof that symbolizers with the binary can fill in; a
//! stripped Go binary is named from its `.gopclntab`.

use std::process::Command;

use profiler_tests::{
    ship::{read_build_id, run_ok},
    *,
};

#[test]
fn stripped_c_frames_are_file_and_elf_address_and_go_tool_pprof_names_them() {
    let Some(t) = bpf_test() else { return };
    // Unstripped with DWARF (`go tool pprof` reads its lines), and a copy stripped of all.
    let full = compile("workload-full", &["-O0", "-g", "-Wl,--build-id"]);
    let stripped = t.path("workload");
    run_ok(
        Command::new("objcopy")
            .arg("--strip-all")
            .arg(&full)
            .arg(&stripped),
    );
    let build_id = read_build_id(&full);
    let command = [path_str(&stripped), "shares", "1"];
    let (pprof, _) = t.record("stripped.pb.gz", &[], &command);
    let (folded, _) = t.record("stripped.folded", &[], &command);

    // Folded: the workload's own frames are `workload+0xADDR`, and ADDR is what addr2line
    // takes: the unstripped copy names the hottest leaf `heavy`.
    let text = std::fs::read_to_string(&folded).unwrap();
    let mut leaves: Vec<(u64, u64)> = text
        .lines()
        .filter(|l| l.starts_with("workload;"))
        .filter_map(|l| {
            let (stack, count) = l.rsplit_once(' ')?;
            let leaf = stack.rsplit(';').next()?;
            let addr = u64::from_str_radix(leaf.strip_prefix("workload+0x")?, 16).ok()?;
            Some((count.parse().ok()?, addr))
        })
        .collect();
    leaves.sort_unstable();
    let (_, hottest) = *leaves
        .last()
        .unwrap_or_else(|| panic!("no workload+0x leaf: {text}"));
    let named = run_ok(
        Command::new("addr2line")
            .args(["-f", "-e"])
            .arg(&full)
            .arg(format!("{hottest:#x}")),
    );
    assert_eq!(named.lines().next(), Some("heavy"), "{named}\n{text}");

    // pprof: the workload's mapping has its build ID and claims no functions, and its
    // locations keep their addresses without lines.
    let profile = load_pprof(&pprof);
    let strings = &profile.string_table;
    let mapping = profile
        .mapping
        .iter()
        .find(|m| strings[m.filename as usize].ends_with("/workload"))
        .expect("the workload's mapping");
    assert_eq!(strings[mapping.build_id as usize], build_id);
    assert!(!mapping.has_functions, "nothing in it was named");
    let own: Vec<_> = profile
        .location
        .iter()
        .filter(|l| l.mapping_id == mapping.id)
        .collect();
    assert!(!own.is_empty());
    assert!(own.iter().all(|l| l.line.is_empty() && l.address != 0));

    // `go tool pprof`, given the unstripped copy, names the frames. (Its own ELF reader has
    // no build IDs, so it cannot find binaries by build ID under PPROF_BINARY_PATH.)
    let out = Command::new("go")
        .args(["tool", "pprof", "-symbolize=local", "-top", "-nodecount=5"])
        .arg(&full)
        .arg(&pprof)
        .env("HOME", t.dir.path())
        .output()
        .expect("go (golang-go) must be installed: cargo xtask setup installs it");
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{top}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.contains("flat%"))
        .skip(1)
        .collect();
    assert!(rows.first().is_some_and(|r| r.ends_with(" heavy")), "{top}");
    assert!(top.contains(" light"), "{top}");
}

/// A Go program whose time goes to `main.fib` under `main.loop`.
const GO_FIB: &str = r#"package main

import (
	"os"
	"strconv"
	"time"
)

//go:noinline
func fib(n int) int {
	if n < 2 {
		return n
	}
	return fib(n-1) + fib(n-2)
}

//go:noinline
func loop(seconds float64) int {
	s := 0
	end := time.Now().Add(time.Duration(seconds * float64(time.Second)))
	for time.Now().Before(end) {
		s += fib(22)
	}
	return s
}

func main() {
	seconds, _ := strconv.ParseFloat(os.Args[1], 64)
	// record -- CMD exits as CMD does: succeed, but keep the result live.
	if loop(seconds) < 0 {
		os.Exit(1)
	}
}
"#;

#[test]
fn a_stripped_go_binary_is_named_from_its_pclntab() {
    let Some(t) = bpf_test() else { return };
    let src = t.path("gofib");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("main.go"), GO_FIB).unwrap();
    std::fs::write(src.join("go.mod"), "module gofib\ngo 1.18\n").unwrap();
    let binary = t.path("gofib-stripped");
    run_ok(
        Command::new("go")
            .args(["build", "-ldflags=-s -w", "-o"])
            .arg(&binary)
            .arg(".")
            .current_dir(&src),
    );
    // No symbol table: only .gopclntab can name it.
    let symbols = run_ok(Command::new("readelf").arg("-s").arg(&binary));
    assert!(!symbols.contains("main.fib"), "{symbols}");

    let (out, _) = t.record(
        "go.pb.gz",
        &["--unwinder", "fp"],
        &[path_str(&binary), "1.5"],
    );
    let samples = read_samples(&out);
    let total: i64 = samples.iter().map(|s| s.count).sum();
    let in_fib: i64 = samples
        .iter()
        .filter(|s| s.functions.first().is_some_and(|f| f == "main.fib"))
        .map(|s| s.count)
        .sum();
    assert!(
        in_fib * 2 > total,
        "main.fib is the leaf of {in_fib} of {total} samples"
    );
    // Go keeps frame pointers: full stacks, named up to main.main.
    let full = samples
        .iter()
        .find(|s| s.functions.first().is_some_and(|f| f == "main.fib"))
        .unwrap();
    let tail: Vec<&str> = full
        .functions
        .iter()
        .map(String::as_str)
        .skip_while(|f| *f == "main.fib")
        .take(2)
        .collect();
    assert_eq!(tail, ["main.loop", "main.main"], "{:?}", full.functions);
}
