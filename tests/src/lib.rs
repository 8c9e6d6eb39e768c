//! Helpers for the end-to-end tests: build the C workloads, run the real profiler binary, and
//! decode what it wrote.

use std::{
    collections::{HashMap, HashSet},
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Mutex, MutexGuard, OnceLock},
};

use profiler_proto::pprof::Profile;

pub mod kube;
pub mod receiver;
pub mod ship;
use tempfile::TempDir;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The profiler binary under test: `$PROFILER_BIN`, else the release build of
/// `cargo xtask build` (static musl, the one we ship).
pub fn profiler_bin() -> PathBuf {
    let path = std::env::var_os("PROFILER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/x86_64-unknown-linux-musl/release/profiler"));
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo xtask test`, which builds it",
        path.display()
    );
    path
}

/// Whether BPF tests can run here. In CI (CI=true) they must, so a missing privilege fails
/// the test instead of skipping it.
fn bpf_available() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("BPF tests need root, and CI=true forbids skipping them");
    }
    eprintln!("skipped: BPF tests need root");
    false
}

/// Serializes tests that sample, so that they do not fight over the machine's two CPUs.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A BPF test's context: it holds the lock that keeps BPF tests from running at once, and a
/// temporary directory for its files.
pub struct BpfTest {
    pub dir: TempDir,
    _serial: MutexGuard<'static, ()>,
}

/// Starts a BPF test, or returns None where BPF tests cannot run (skipped outside CI; in CI
/// it panics instead, see `bpf_available`).
pub fn bpf_test() -> Option<BpfTest> {
    if !bpf_available() {
        return None;
    }
    let serial = serial();
    Some(BpfTest {
        dir: tempfile::tempdir().unwrap(),
        _serial: serial,
    })
}

impl BpfTest {
    /// NAME in the test's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `profiler record -F 499 -o DIR/NAME FLAGS... -- COMMAND...` (no `--` when COMMAND
    /// is empty), whatever its exit status; returns the output path and how the run ended.
    pub fn try_record(&self, name: &str, flags: &[&str], command: &[&str]) -> (PathBuf, Output) {
        let out = self.path(name);
        let output = profiler(&record_args(&out, flags, command));
        (out, output)
    }

    /// Like `try_record`, asserting success; returns the output path and stderr.
    pub fn record(&self, name: &str, flags: &[&str], command: &[&str]) -> (PathBuf, String) {
        let out = self.path(name);
        let stderr = profiler_ok(&record_args(&out, flags, command));
        (out, stderr)
    }
}

fn record_args<'a>(out: &'a Path, flags: &[&'a str], command: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["record", "-F", "499", "-o", path_str(out)];
    args.extend(flags);
    if !command.is_empty() {
        args.push("--");
        args.extend(command);
    }
    args
}

/// Waits (up to 60 s) until process `pid` holds a BPF link to a perf event (aya attaches the
/// sampler that way): a profiler started in the background samples from then on, its programs
/// loaded and verified.
pub fn wait_until_sampling(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let sampling = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::read_to_string(fd.path())
                    .is_ok_and(|info| info.lines().any(|l| l == "link_type:\tperf"))
            });
        if sampling {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} opened no perf event within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A path as a command-line argument (the tests' paths are all UTF-8).
pub fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The C workload (workloads/workload.c), compiled once per test binary with frame pointers
/// and debug info.
pub fn workload() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| compile("workload", &["-O0", "-g"]))
        .clone()
}

/// Compiles workloads/workload.c with extra flags into target/test-workloads/NAME.
pub fn compile(name: &str, flags: &[&str]) -> PathBuf {
    compile_source("workload.c", name, flags)
}

/// Compiles workloads/SOURCE with frame pointers and extra flags into target/test-workloads/NAME.
pub fn compile_source(source: &str, name: &str, flags: &[&str]) -> PathBuf {
    let dir = root().join("target/test-workloads");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    // Each test binary compiles its own copy under a unique name, then renames it into place.
    let tmp = dir.join(format!("{name}.{}", std::process::id()));
    let status = Command::new("gcc")
        .args(flags)
        .args([
            "-fno-omit-frame-pointer",
            "-mno-omit-leaf-frame-pointer",
            "-o",
        ])
        .arg(&tmp)
        .arg(root().join("tests/workloads").join(source))
        .status()
        .expect("gcc must be installed (cargo xtask setup installs it)");
    assert!(status.success(), "compiling the workload failed");
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// Runs `profiler ARGS` and returns its output.
pub fn profiler(args: &[&str]) -> Output {
    Command::new(profiler_bin())
        .args(args)
        .output()
        .expect("running the profiler")
}

/// Runs `profiler ARGS`, asserting success, and returns its stderr.
pub fn profiler_ok(args: &[&str]) -> String {
    let out = profiler(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "profiler {args:?} failed with {:?}: {stderr}",
        out.status
    );
    stderr
}

/// Asserts exit code `code` and a single stderr line, `error: ...`, containing every one of
/// `needles`: bad input must never end in a panic, a backtrace or a usage dump.
pub fn assert_one_line_error(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` missing from: {stderr}");
    }
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"));
}

/// Runs Go's own reader, `go tool pprof ARGS PATH`, with HOME (its cache) in `home`; asserts
/// success and returns its stdout.
pub fn go_pprof(args: &[&str], path: &Path, home: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(path)
        .env("HOME", home)
        .output()
        .expect("go (golang-go) must be installed: cargo xtask setup installs it");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Parses an SVG written by inferno, failing the test unless it is well-formed XML with an
/// `svg` root (inferno writes a DOCTYPE, so DTDs are allowed).
pub fn parse_svg(text: &str) -> roxmltree::Document<'_> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc
}

/// Reads a gzipped (or plain) pprof file.
pub fn load_pprof(path: &Path) -> Profile {
    let bytes = std::fs::read(path).unwrap();
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        bytes
    };
    prost::Message::decode(raw.as_slice()).expect("a valid pprof protobuf")
}

/// One decoded sample: function names leaf first (inlined frames expanded), its count and
/// its string labels.
#[derive(Debug, Clone)]
pub struct DecodedSample {
    pub functions: Vec<String>,
    pub count: i64,
    pub labels: HashMap<String, String>,
}

impl DecodedSample {
    /// True when `function` is on this sample's stack.
    pub fn has_function(&self, function: &str) -> bool {
        self.functions.iter().any(|f| f == function)
    }
}

/// True when any sample has `function` on its stack: the usual proof that a process's
/// frames were recorded and symbolized.
pub fn has_function(samples: &[DecodedSample], function: &str) -> bool {
    samples.iter().any(|s| s.has_function(function))
}

/// Every sample of the pprof file at `path`, decoded.
pub fn read_samples(path: &Path) -> Vec<DecodedSample> {
    samples(&load_pprof(path))
}

/// Every sample of `profile`, decoded.
pub fn samples(profile: &Profile) -> Vec<DecodedSample> {
    let s = |i: i64| profile.string_table[i as usize].clone();
    let functions: HashMap<u64, String> =
        profile.function.iter().map(|f| (f.id, s(f.name))).collect();
    let locations: HashMap<u64, Vec<String>> = profile
        .location
        .iter()
        .map(|l| {
            let names = l
                .line
                .iter()
                .map(|line| functions[&line.function_id].clone());
            (l.id, names.collect())
        })
        .collect();
    profile
        .sample
        .iter()
        .map(|sample| DecodedSample {
            functions: sample
                .location_id
                .iter()
                .flat_map(|id| locations[id].clone())
                .collect(),
            count: sample.value[0],
            labels: sample
                .label
                .iter()
                .map(|l| {
                    let value = if l.str != 0 {
                        s(l.str)
                    } else {
                        l.num.to_string()
                    };
                    (s(l.key), value)
                })
                .collect(),
        })
        .collect()
}

/// The share (0-100) of `samples`' counts whose functions, leaf first, hold `chain` in order.
pub fn chain_share(samples: &[DecodedSample], chain: &[&str]) -> f64 {
    let total: i64 = samples.iter().map(|s| s.count).sum();
    let matching: i64 = samples
        .iter()
        .filter(|s| {
            let mut frames = s.functions.iter();
            chain.iter().all(|f| frames.any(|g| g == f))
        })
        .map(|s| s.count)
        .sum();
    100.0 * matching as f64 / total.max(1) as f64
}

/// The samples among `samples` that `keep` keeps, counted.
pub fn sample_count(samples: &[DecodedSample], keep: impl Fn(&DecodedSample) -> bool) -> i64 {
    samples.iter().filter(|s| keep(s)).map(|s| s.count).sum()
}

/// Inclusive share (0–100) of each function among the samples that `keep` accepts.
pub fn inclusive_shares(
    samples: &[DecodedSample],
    keep: impl Fn(&DecodedSample) -> bool,
) -> HashMap<String, f64> {
    let mut counts: HashMap<String, i64> = HashMap::new();
    let mut total = 0;
    for sample in samples.iter().filter(|s| keep(s)) {
        total += sample.count;
        let unique: HashSet<&String> = sample.functions.iter().collect();
        for name in unique {
            *counts.entry(name.clone()).or_default() += sample.count;
        }
    }
    counts
        .into_iter()
        .map(|(name, count)| (name, 100.0 * count as f64 / total.max(1) as f64))
        .collect()
}

/// Whether skipping is forbidden: CI (CI=true) runs `cargo xtask setup`, so a tool missing
/// there is a bug.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Skips a test (printing why) where a tool it needs is missing; with CI=true it fails instead.
fn missing(what: &str, why: &str) {
    let message = format!("{what} is missing ({why}); `cargo xtask setup` installs it");
    if in_ci() {
        panic!("{message}, and CI=true forbids skipping");
    }
    eprintln!("skipped: {message}");
}

/// Whether `python3` can import `module` (from the PyPI package `package`). Where it cannot,
/// prints why and returns false; with CI=true it panics instead.
pub fn python_module(module: &str, package: &str) -> bool {
    let probe = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output();
    let why = match probe {
        Ok(out) if out.status.success() => return true,
        // The traceback's last line, e.g. "ModuleNotFoundError: No module named ...".
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            stderr.lines().last().unwrap_or_default().to_owned()
        }
        Err(e) => format!("cannot run python3: {e}"),
    };
    missing(&format!("PyPI {package} for python3"), &why);
    false
}

/// `tool` on PATH (from the Debian package `package`), or None where it is not, after printing
/// why; with CI=true it panics instead.
pub fn tool(tool: &str, package: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        missing(&format!("{tool} (Debian {package})"), "not on PATH");
    }
    found
}

/// The Kubernetes version manifests are validated against: the oldest they target, since 1.30
/// brought `securityContext.appArmorProfile`. kubernetes-validate ships schemas for the dozen
/// releases before its own version (1.25 to 1.37 in 1.37.0).
pub const KUBERNETES_VERSION: &str = "1.30.0";

/// Runs `kubernetes-validate --strict` for [`KUBERNETES_VERSION`] on `files` in `dir` and asserts
/// that it passes and names each file as passed (a file without a single document would pass
/// without a word), except `warn_only` ones (custom resources, which it has no schema for).
/// Does nothing but print why where kubernetes-validate is missing; with CI=true that fails.
pub fn kubernetes_validate<S: AsRef<str>>(dir: &Path, files: &[S]) {
    kubernetes_validate_except(dir, files, &[]);
}

/// [`kubernetes_validate`], not requiring a "passed" for the files in `warn_only`.
pub fn kubernetes_validate_except<S: AsRef<str>>(dir: &Path, files: &[S], warn_only: &[&str]) {
    if !python_module("kubernetes_validate", "kubernetes-validate") {
        return;
    }
    let files: Vec<&str> = files.iter().map(AsRef::as_ref).collect();
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(["--kubernetes-version", KUBERNETES_VERSION])
        .args(&files)
        .current_dir(dir)
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate --strict -k {KUBERNETES_VERSION} failed ({}):\n{output}",
        out.status
    );
    for file in files.iter().filter(|f| !warn_only.contains(f)) {
        assert!(
            output.contains(&format!("{file} passed")),
            "{file} was not validated:\n{output}"
        );
    }
}
