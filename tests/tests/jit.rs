//! JIT code named from perf-map files (/tmp/perf-PID.map), end to end with the real profiler:
//! CPython 3.12 `-X perf`, Node.js `--perf-basic-prof` and HotSpot `jcmd PID Compiler.perfmap`,
//! each running a recursive `fib` loop; and a perf map that is a FIFO, refused without hanging.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use profiler_tests::*;

/// Whether a frame names the function `fib`, whatever the runtime adds around it
/// (`py::fib:/path`, `JS:*fib /path:1:13`, `int Fib.fib(int)`).
fn names_fib(function: &str) -> bool {
    function
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .any(|token| token == "fib")
}

/// Share (0-100) of the samples of `comm` with `fib` on their stack, and those samples.
fn fib_share(out: &Path, comm: &str) -> (f64, Vec<DecodedSample>) {
    let samples: Vec<DecodedSample> = read_samples(out)
        .into_iter()
        .filter(|s| s.labels.get("comm").map(String::as_str) == Some(comm))
        .collect();
    let total = sample_count(&samples, |_| true);
    assert!(total > 200, "too few samples of {comm}: {total}");
    let share = share_of(&samples, |s| s.functions.iter().any(|f| names_fib(f)));
    (share, samples)
}

/// Share (0-100) of `samples` that `keep` keeps, by count.
fn share_of(samples: &[DecodedSample], keep: impl Fn(&DecodedSample) -> bool) -> f64 {
    100.0 * sample_count(samples, keep) as f64 / sample_count(samples, |_| true).max(1) as f64
}

/// The `py::fib:PATH` frames (one per Python call of fib) of a sample.
fn py_fib_frames(sample: &DecodedSample) -> usize {
    sample
        .functions
        .iter()
        .filter(|f| f.starts_with("py::fib:"))
        .count()
}

/// Removes the perf map a runtime left behind for `pid`.
fn remove_perf_map(pid: u32) {
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
}

/// A script in the test's directory.
fn script(t: &BpfTest, name: &str, text: &str) -> PathBuf {
    let path = t.path(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// pyenv's CPython 3.12 (Debian 12 has none); `cargo xtask setup` installs it.
fn python312() -> Option<PathBuf> {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".pyenv")))?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("3.12"))
        .map(|e| e.path().join("bin/python3.12"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    let python = found.pop();
    if python.is_none() {
        assert!(
            !in_ci(),
            "python3.12 under pyenv is missing: run cargo xtask setup"
        );
        eprintln!("skipped: python3.12 under pyenv is missing");
    }
    python
}

/// A Python script looping over `fib(depth)` for `seconds`.
fn python_fib(depth: u32, seconds: u32) -> String {
    format!(
        "import time
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
end = time.time() + {seconds}
while time.time() < end:
    fib({depth})
"
    )
}

/// Records `python3.12 -X perf` running `text` with the table walker; returns the share of its
/// samples naming fib, those samples and the summary (its perf maps removed).
fn record_python(t: &BpfTest, python: &Path, text: &str) -> (f64, Vec<DecodedSample>, String) {
    let work = script(t, "work.py", text);
    let (out, stderr) = t.record(
        "python.pb.gz",
        &["--unwinder", "auto", "--no-kernel"],
        &[path_str(python), "-X", "perf", path_str(&work)],
    );
    let (share, samples) = fib_share(&out, "python3.12");
    for pid in samples.iter().filter_map(|s| s.labels.get("pid")) {
        remove_perf_map(pid.parse().unwrap());
    }
    (share, samples, stderr)
}

#[test]
fn python312_perf_trampolines_name_fib() {
    let Some(t) = bpf_test() else { return };
    let Some(python) = python312() else { return };
    let (share, samples, stderr) = record_python(&t, &python, &python_fib(22, 2));
    // Each Python call runs through a trampoline of its own that the perf map names
    // `py::fib:PATH`; the interpreter's frames below it come from libpython's .eh_frame.
    assert!(share >= 50.0, "{share:.1}% name fib; {stderr}");
    assert!(
        samples
            .iter()
            .any(|s| s.has_function("_PyEval_EvalFrameDefault")
                && s.functions.iter().any(|f| f.starts_with("py::fib:"))),
        "no fib trampoline above the interpreter loop: {samples:?}"
    );
    assert!(stderr.contains("perf maps: 1 files"), "{stderr}");
}

/// The trampolines keep no frame pointer and have no CFI: the walk steps through them with a
/// table made from their fixed layout, so stacks run from the innermost Python call, through
/// every trampoline and libpython's frameless frames, down to `Py_RunMain`.
#[test]
fn python312_stacks_run_through_the_trampolines_to_py_runmain() {
    let Some(t) = bpf_test() else { return };
    let Some(python) = python312() else { return };
    let (_, samples, stderr) = record_python(&t, &python, &python_fib(10, 3));
    let through = share_of(&samples, |s| {
        py_fib_frames(s) > 0 && s.has_function("Py_RunMain")
    });
    assert!(
        through >= 80.0,
        "{through:.1}% of samples run from py::fib down to Py_RunMain; {stderr}"
    );
    // fib(10) recurses ten deep: a deep sample passes that many trampolines.
    let deep = share_of(&samples, |s| py_fib_frames(s) >= 5);
    assert!(
        deep >= 50.0,
        "{deep:.1}% of samples hold 5 or more py::fib frames"
    );
}

/// CPython maps its trampolines in 64 KiB arenas of 5,957 copies: with 14,000 code objects run
/// first, fib's trampoline lands in the third arena. (Here each arena is a mapping of its own;
/// adjacent ones merge into one, which the loader splits back into arenas.)
#[test]
fn python312_stacks_run_through_a_trampoline_in_a_later_arena() {
    let Some(t) = bpf_test() else { return };
    let Some(python) = python312() else { return };
    let fill = "for i in range(7000):\n    exec(f'def f{i}(): return {i}\\nf{i}()')\n";
    let (_, samples, stderr) = record_python(&t, &python, &(fill.to_owned() + &python_fib(10, 3)));
    let share = share_of(&samples, |s| {
        py_fib_frames(s) > 0 && s.has_function("Py_RunMain")
    });
    assert!(
        share >= 60.0,
        "{share:.1}% run from py::fib down to Py_RunMain; {stderr}"
    );
}

const NODE_FIB: &str = "function fib(n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
const end = Date.now() + Number(process.argv[2] || 2000);
let x = 0;
while (Date.now() < end) x += fib(22);
";

#[test]
fn node_perf_basic_prof_names_fib_down_to_start() {
    let Some(t) = bpf_test() else { return };
    let Some(node) = tool("node", "nodejs") else {
        return;
    };
    let work = script(&t, "work.js", NODE_FIB);
    let (out, stderr) = t.record(
        "node.pb.gz",
        &["--unwinder", "auto", "--no-kernel"],
        &[
            path_str(&node),
            "--perf-basic-prof",
            // Else node 20 also writes a V8 log into the current directory.
            "--no-logfile-per-isolate",
            &format!("--logfile={}", t.path("v8.log").display()),
            path_str(&work),
        ],
    );
    let (share, samples) = fib_share(&out, "node");
    for pid in samples.iter().filter_map(|s| s.labels.get("pid")) {
        remove_perf_map(pid.parse().unwrap());
    }
    assert!(share >= 50.0, "{share:.1}% name fib; {stderr}");
    // V8 keeps frame pointers: JIT frames and node's own (by .eh_frame) make whole stacks.
    let whole: i64 = samples
        .iter()
        .filter(|s| s.functions.iter().any(|f| names_fib(f)) && s.has_function("_start"))
        .map(|s| s.count)
        .sum();
    let total: i64 = samples.iter().map(|s| s.count).sum();
    assert!(
        whole * 2 >= total,
        "{whole} of {total} samples go from fib down to _start; {stderr}"
    );
}

const JAVA_FIB: &str = "public class Fib {
    static int fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
    public static void main(String[] args) throws Exception {
        long x = 0;
        long warm = System.currentTimeMillis() + 1500;
        while (System.currentTimeMillis() < warm) x += fib(22);
        System.out.println(\"ready\");
        while (System.in.available() == 0) x += fib(22);
        System.out.println(x);
    }
}
";

#[test]
fn java_perfmap_from_jcmd_names_fib() {
    let Some(t) = bpf_test() else { return };
    let (Some(java), Some(jcmd)) = (
        tool("java", "openjdk-17-jdk-headless"),
        tool("jcmd", "openjdk-17-jdk-headless"),
    ) else {
        return;
    };
    let source = script(&t, "Fib.java", JAVA_FIB);
    let mut child = Command::new(java)
        .args(["-XX:+PreserveFramePointer"])
        .arg(&source)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    // fib is compiled by now; HotSpot writes its perf map only when asked.
    let status = Command::new(jcmd)
        .args([&pid.to_string(), "Compiler.perfmap"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "jcmd Compiler.perfmap failed");
    let pid_arg = pid.to_string();
    let (out, stderr) = t.record(
        "java.pb.gz",
        &[
            "--unwinder",
            "auto",
            "--no-kernel",
            "-d",
            "2s",
            "-p",
            &pid_arg,
        ],
        &[],
    );
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
    remove_perf_map(pid);
    let (share, _) = fib_share(&out, "java");
    assert!(share >= 50.0, "{share:.1}% name fib; {stderr}");
}

#[test]
fn a_fifo_for_a_perf_map_is_refused_and_counted_without_hanging() {
    let Some(t) = bpf_test() else { return };
    let Some(node) = tool("node", "nodejs") else {
        return;
    };
    let work = script(&t, "work.js", NODE_FIB);
    // The FIFO has no writer: opened for reading without O_NONBLOCK, it would block forever.
    let command = format!(
        "mkfifo /tmp/perf-$$.map && exec {} {} 700",
        node.display(),
        work.display()
    );
    let (out, output) = t.try_record("fifo.pb.gz", &["--no-kernel"], &["sh", "-c", &command]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for sample in read_samples(&out) {
        if let Some(pid) = sample.labels.get("pid") {
            remove_perf_map(pid.parse().unwrap());
        }
    }
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("unreadable=1 "), "{stderr}");
}
