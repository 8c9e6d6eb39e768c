//! `--unwinder auto`: the kernel walks stacks with .eh_frame tables, end to end with the real
//! profiler. The workload is profiler-unwind's frameless test program (built -O2
//! -fomit-frame-pointer, so its leaves build no frame) and Debian's own python3.11 and libc.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, ChildStdout, Command, Stdio},
};

use profiler_tests::*;

/// frames.c (profiler-unwind's test program) built without frame pointers.
fn frameless() -> PathBuf {
    compile_frameless("profiler-unwind/tests/testdata/frames.c", "frameless", &[])
}

/// Compiles `source` (relative to the repository) -O2 without frame pointers, with `extra`
/// flags, into target/test-workloads/NAME; through a temporary name, since tests running at
/// once may build the same program.
fn compile_frameless(source: &str, name: &str, extra: &[&str]) -> PathBuf {
    let dir = root().join("target/test-workloads");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    let tmp = dir.join(format!("{name}.{}", std::process::id()));
    let status = Command::new("gcc")
        .args(["-O2", "-fomit-frame-pointer", "-g"])
        .args(extra)
        .arg("-o")
        .arg(&tmp)
        .arg(root().join(source))
        .status()
        .expect("gcc must be installed (cargo xtask setup installs it)");
    assert!(status.success(), "compiling {source} failed");
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// Runs the frameless program in `mode` until it says it is ready (spinning in its leaf).
/// Its stdout stays open: the signal handler writes to it.
struct Spinner(Child, BufReader<ChildStdout>);

impl Spinner {
    fn start(mode: Option<&str>) -> Spinner {
        Spinner::run(Command::new(frameless()).args(mode))
    }

    /// Starts `command`, which says "ready" on stdout once it spins in its leaf.
    fn run(command: &mut Command) -> Spinner {
        let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut spinner = Spinner(child, stdout);
        spinner.expect_line("ready\n");
        spinner
    }

    fn expect_line(&mut self, expected: &str) {
        let mut line = String::new();
        self.1.read_line(&mut line).unwrap();
        assert_eq!(line, expected);
    }

    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Records the spinner for two seconds with `unwinder`; returns its samples and the summary.
fn record_spinner(
    t: &BpfTest,
    name: &str,
    mode: Option<&str>,
    unwinder: &str,
) -> (Vec<DecodedSample>, String) {
    record_running(t, name, Spinner::start(mode), unwinder, &[])
}

/// Records a running spinner for two seconds with `unwinder` and `extra` flags; returns its
/// samples and the summary.
fn record_running(
    t: &BpfTest,
    name: &str,
    spinner: Spinner,
    unwinder: &str,
    extra: &[&str],
) -> (Vec<DecodedSample>, String) {
    let pid = spinner.pid();
    let mut args = vec![
        "--unwinder",
        unwinder,
        "--no-kernel",
        "-d",
        "2s",
        "--pid",
        &pid,
    ];
    args.extend(extra);
    let (out, stderr) = t.record(name, &args, &[]);
    drop(spinner);
    let samples: Vec<DecodedSample> = read_samples(&out)
        .into_iter()
        .filter(|s| s.labels.get("pid") == Some(&pid))
        .collect();
    (samples, stderr)
}

/// The share (0-100) of `samples` whose user frames, leaf first, contain `chain` in order.
fn share_with_chain(samples: &[DecodedSample], chain: &[&str]) -> f64 {
    let total: i64 = samples.iter().map(|s| s.count).sum();
    assert!(total > 300, "too few samples: {total}");
    chain_share(samples, chain)
}

const CHAIN: [&str; 7] = [
    "leaf",
    "big_frame",
    "level3",
    "level2",
    "level1",
    "main",
    "_start",
];

#[test]
fn frameless_leaves_unwind_to_main() {
    let Some(t) = bpf_test() else { return };
    let (samples, stderr) = record_spinner(&t, "auto.pb.gz", None, "auto");
    let share = share_with_chain(&samples, &CHAIN);
    assert!(
        share >= 95.0,
        "{share:.1}% of samples have the full chain; {stderr}\n{samples:?}"
    );
}

/// A binary whose section headers are gone (`e_shoff`, `e_shnum` and `e_shstrndx` zeroed, as
/// sstrip and packers leave it): its table comes from `PT_GNU_EH_FRAME`, its build ID from
/// `PT_NOTE`, and its names from its unstripped copy, given as a debug file by build ID.
#[test]
fn a_binary_without_section_headers_unwinds_to_main() {
    use object::Object as _;
    use std::os::unix::fs::PermissionsExt as _;
    let Some(t) = bpf_test() else { return };
    let original = frameless();
    let bytes = std::fs::read(&original).unwrap();
    let mut stripped = bytes.clone();
    stripped[0x28..0x30].fill(0); // e_shoff
    stripped[0x3c..0x40].fill(0); // e_shnum, e_shstrndx
    let elf = object::File::parse(&*stripped).unwrap();
    assert_eq!(elf.sections().count(), 0, "section headers still read");
    let build_id: String = elf
        .build_id()
        .unwrap()
        .expect("the build ID is read from PT_NOTE")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("noshdr");
    std::fs::write(&binary, &stripped).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let debug_dir = dir.path().join("debug");
    let by_id = debug_dir.join(".build-id").join(&build_id[..2]);
    std::fs::create_dir_all(&by_id).unwrap();
    std::fs::copy(&original, by_id.join(format!("{}.debug", &build_id[2..]))).unwrap();

    let spinner = Spinner::run(&mut Command::new(&binary));
    let extra = ["--debug-dir", path_str(&debug_dir)];
    let (samples, stderr) = record_running(&t, "noshdr.pb.gz", spinner, "auto", &extra);
    let share = share_with_chain(&samples, &CHAIN);
    assert!(
        share >= 95.0,
        "{share:.1}% of samples have the full chain; {stderr}\n{samples:?}"
    );
}

#[test]
fn frame_pointers_alone_lose_frameless_callers() {
    // The same program with --unwinder fp: today's bpf_get_stack cannot see past the leaf,
    // which is what makes the test above mean something.
    let Some(t) = bpf_test() else { return };
    let (samples, stderr) = record_spinner(&t, "fp.pb.gz", None, "fp");
    let share = share_with_chain(&samples, &CHAIN[..3]);
    assert!(share < 50.0, "{share:.1}% with frame pointers; {stderr}");
}

#[test]
fn qsort_comparator_unwinds_through_libc_to_its_caller() {
    let Some(t) = bpf_test() else { return };
    let (samples, stderr) = record_spinner(&t, "qsort.pb.gz", Some("qsort"), "auto");
    let share = share_with_chain(&samples, &["compare_then_spin", "sort_numbers", "main"]);
    assert!(share >= 95.0, "{share:.1}%; {stderr}\n{samples:?}");
    // Between the comparator and its caller: libc's qsort itself.
    let through_libc = samples.iter().any(|s| {
        let at = |name: &str| s.functions.iter().position(|f| f == name);
        let qsort = s.functions.iter().position(|f| f.contains("qsort"));
        matches!(
            (at("compare_then_spin"), qsort, at("sort_numbers")),
            (Some(a), Some(b), Some(c)) if a < b && b < c
        )
    });
    assert!(through_libc, "no qsort frame: {samples:?}");
}

#[test]
fn deep_recursion_is_cut_at_the_frame_limit_and_counted() {
    let Some(t) = bpf_test() else { return };
    let (samples, stderr) = record_spinner(&t, "deep.pb.gz", Some("deep"), "auto");
    let deep: Vec<&DecodedSample> = samples
        .iter()
        .filter(|s| s.has_function("recurse"))
        .collect();
    assert!(!deep.is_empty(), "{samples:?}");
    for s in &deep {
        // 127 frames: the leaf, then recurse all the way (main is beyond the limit).
        assert_eq!(s.functions.len(), 127, "{:?}", s.functions);
        assert_eq!(s.functions[0], "leaf");
        assert!(s.functions[1..].iter().all(|f| f == "recurse"), "{s:?}");
    }
    assert!(stderr.contains("unwind_stop_frame_limit="), "{stderr}");
}

#[test]
fn python_loop_reaches_py_runmain() {
    let Some(t) = bpf_test() else { return };
    let python = "/usr/bin/python3.11";
    assert!(
        std::path::Path::new(python).exists(),
        "{python} is missing (cargo xtask setup installs python3.11)"
    );
    let (out, stderr) = t.record(
        "python.pb.gz",
        &["--unwinder", "auto"],
        &[
            python,
            "-c",
            // About 1 s here, some 470 samples at 499 Hz: past the 300 `share_with_chain`
            // wants with room (8 million iterations made 292 on one fresh CI machine).
            "x = 0\nfor i in range(14_000_000):\n    x += i * i\n",
        ],
    );
    let samples: Vec<DecodedSample> = read_samples(&out)
        .into_iter()
        .filter(|s| s.labels.get("comm").map(String::as_str) == Some("python3.11"))
        .collect();
    let share = share_with_chain(&samples, &["_PyEval_EvalFrameDefault", "Py_RunMain"]);
    // perf --call-graph dwarf: 99.6%; start-up and exit have no eval loop.
    assert!(share >= 85.0, "{share:.1}%; {stderr}");
}

#[test]
fn signal_handler_frames_unwind_through_the_restorer_to_main() {
    let Some(t) = bpf_test() else { return };
    let mut spinner = Spinner::start(None);
    // SAFETY: a signal to our own child.
    assert_eq!(
        unsafe { libc::kill(spinner.0.id() as i32, libc::SIGUSR1) },
        0
    );
    spinner.expect_line("handler\n");
    let (samples, stderr) = record_running(&t, "signal.pb.gz", spinner, "auto", &[]);
    // handler_spin <- on_signal <- glibc's __restore_rt (signal frame) <- the interrupted frame
    // <- big_frame .. _start. The interrupted frame is `leaf`, or `write` <- `say` when the signal
    // lands on the return from the write that said "ready": both are right, so the chain skips it.
    let mut chain = vec!["handler_spin", "on_signal"];
    chain.extend(&CHAIN[1..]);
    let share = share_with_chain(&samples, &chain);
    assert!(share >= 95.0, "{share:.1}%; {stderr}\n{samples:?}");
}

#[test]
fn vdso_clock_gettime_loop_unwinds_to_main() {
    let Some(t) = bpf_test() else { return };
    let (samples, stderr) = record_spinner(&t, "vdso.pb.gz", Some("vdso"), "auto");
    let share = share_with_chain(&samples, &["vdso_loop", "main", "_start"]);
    assert!(share >= 95.0, "{share:.1}%; {stderr}\n{samples:?}");
}

/// A Rust release build without frame pointers (std is built without them too): the caller
/// chain comes from the tables alone.
#[test]
fn rust_release_binary_without_frame_pointers_unwinds_to_main() {
    let Some(t) = bpf_test() else { return };
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("spin.rs");
    std::fs::write(
        &source,
        r#"
use std::hint::black_box;
#[inline(never)]
fn leaf(n: u64) -> u64 {
    let mut x = n;
    loop { x = black_box(x.wrapping_mul(31).wrapping_add(7)); }
}
#[inline(never)]
fn middle(n: u64) -> u64 { leaf(black_box(n + 1)) ^ black_box(3) }
#[inline(never)]
fn outer(n: u64) -> u64 { middle(black_box(n * 2)).wrapping_mul(black_box(5)) }
fn main() {
    println!("ready");
    let n = outer(std::env::args().count() as u64);
    println!("{n}");
}
"#,
    )
    .unwrap();
    let program = dir.path().join("spin");
    let status = Command::new("rustc")
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "force-frame-pointers=no",
            "-g",
            "-o",
        ])
        .arg(&program)
        .arg(&source)
        .status()
        .expect("rustc (cargo xtask setup installs the toolchain)");
    assert!(status.success());
    let chain = ["spin::leaf", "spin::middle", "spin::outer", "spin::main"];
    let (samples, stderr) = record_running(
        &t,
        "rust.pb.gz",
        Spinner::run(&mut Command::new(&program)),
        "auto",
        &[],
    );
    let share = share_with_chain(&samples, &chain);
    assert!(share >= 95.0, "{share:.1}%; {stderr}\n{samples:?}");
}

/// A library dlopen()ed after the profiler read the process's maps: the walker's first pc in
/// it tells user space at once, which rereads the maps, so nearly every sample in the library
/// keeps its callers (waiting for the next drain's reread would cut a drain's worth: 8 % here).
#[test]
fn a_library_loaded_after_the_maps_were_read_is_walked_through() {
    let Some(t) = bpf_test() else { return };
    let lib = compile_frameless(
        "tests/workloads/dlopen_lib.c",
        "libdlopen_spin.so",
        &["-shared", "-fPIC"],
    );
    let program = compile_frameless("tests/workloads/dlopen.c", "dlopen", &[]);
    let mut spinner = Spinner::run(Command::new(&program).arg(&lib).stdin(Stdio::piped()));
    let pid = spinner.pid();
    let out = t.path("dlopen.pb.gz");
    let recorder = Command::new(profiler_bin())
        .args(["record", "-F", "499", "--no-kernel", "-d", "4s", "-p", &pid])
        .args(["-o", path_str(&out)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_sampling(recorder.id());
    // Sampled, so announced and its maps read, before the library is there.
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::io::Write::write_all(&mut spinner.0.stdin.take().unwrap(), b"go\n").unwrap();
    let output = recorder.wait_with_output().unwrap();
    drop(spinner);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let in_lib: Vec<DecodedSample> = read_samples(&out)
        .into_iter()
        .filter(|s| s.has_function("lib_leaf"))
        .collect();
    let share = share_with_chain(
        &in_lib,
        &["lib_leaf", "lib_spin", "call_lib", "main", "_start"],
    );
    assert!(share >= 97.0, "{share:.1}%; {stderr}\n{in_lib:?}");
}

/// Go keeps frame pointers and describes its code in `.debug_frame` only: the walk goes through
/// either, and reaches the runtime's `runtime.main`.
#[test]
fn go_binary_unwinds_to_runtime_main() {
    let Some(t) = bpf_test() else { return };
    let Some(go) = tool("go", "golang-go") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("main.go"),
        r#"package main

import "fmt"

var sink uint64

//go:noinline
func leaf(n uint64) {
	for {
		sink += n
	}
}

//go:noinline
func middle(n uint64) { leaf(n + 1); sink++ }

func main() {
	fmt.Println("ready")
	middle(3)
}
"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("go.mod"), "module spin\n\ngo 1.19\n").unwrap();
    let program = dir.path().join("spin");
    let status = Command::new(go)
        .args(["build", "-o"])
        .arg(&program)
        .current_dir(dir.path())
        .env("GOFLAGS", "-mod=mod")
        .status()
        .unwrap();
    assert!(status.success());
    let chain = ["main.leaf", "main.middle", "main.main", "runtime.main"];
    let (samples, stderr) = record_running(
        &t,
        "go.pb.gz",
        Spinner::run(&mut Command::new(&program)),
        "auto",
        &[],
    );
    let share = share_with_chain(&samples, &chain);
    assert!(share >= 90.0, "{share:.1}%; {stderr}\n{samples:?}");
}
