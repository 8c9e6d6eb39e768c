//! Developer tasks for the profiler workspace: `cargo xtask <setup|build|record|test|bench>`.
//!
//! The eBPF half of the profiler needs a nightly toolchain with `rust-src` and a `bpf-linker`
//! that speaks the same LLVM as that nightly, and the integration tests need a handful of Debian
//! packages. Doing all of that by hand is error-prone, so every task here starts by running the
//! idempotent `setup`, which costs a few probe commands when everything is already in place.
//!
//! Arguments are parsed by hand rather than with clap: `record` and `test` pass everything after
//! the subcommand (including `--`) through verbatim, which is exactly what a hand parser does.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

mod bench;
mod dist;
mod fuzz;

/// Debian packages the tests rely on; `setup` installs whichever are missing.
const APT_PACKAGES: &[&str] = &[
    "golang-go",  // `go tool pprof` reads our profiles in tests
    "util-linux", // `unshare`
    "binutils",   // `objcopy`/`strip` for the debug-link tests
    "gcc", // linker for every Rust build (including `cargo install bpf-linker`) and test programs
    "libc6-dev", // headers and crt files for gcc
    "python3", // helper scripts in tests
    "python3.11", // Debian's own python: profiler-unwind's tests unwind it from its .eh_frame
    // pip for Debian's python3, to install the `PIP_PACKAGES`
    "python3-pip",
    "prometheus", // a real Prometheus server and `promtool` for the monitoring tests
    "musl-tools", // musl-gcc: ring's C and assembly for the static `dist` binary
    "buildah",    // `image`: builds the FROM scratch image, no daemon
    "ca-certificates", // the CA bundle `image` copies into the image
    "file",       // the dist tests check that the binary is static
    "elfutils",   // eu-addr2line finds the dist debug file by build ID in a test
    "curl",       // the CI action's download, run by its test from a file:// URL
    "openssl",    // the TLS tests make a CA and a server certificate with it
    "nodejs",     // the JIT tests: node --perf-basic-prof writes /tmp/perf-PID.map
    "openjdk-17-jdk-headless", // the JIT tests: java and `jcmd PID Compiler.perfmap`
    "libbpf-tools", // `offcputime`, the off-CPU peer in the bench
];

/// PyPI packages the tests read or validate our output with, as (package, version prefix, a
/// module it installs); `setup` installs each into whatever `python3` is first on PATH unless
/// that module imports and the installed version has the prefix ("" for any version).
const PIP_PACKAGES: &[(&str, &str, &str)] = &[
    // The deploy tests validate the Kubernetes manifests with it.
    ("kubernetes-validate", "", "kubernetes_validate"),
    // Helm's own engine (its Go library) to render and lint the chart, without a helm binary
    ("helm-python-sdk", "", "helm_python"),
    // The CI action and workflow against GitHub's schemas.
    ("check-jsonschema", "", "check_jsonschema"),
    // The OTLP tests decode our export requests with it (profiles v1development).
    (
        "opentelemetry-proto",
        "1.45.",
        "opentelemetry.proto.profiles.v1development.profiles_pb2",
    ),
];

/// The nightly toolchain the eBPF crate is built with (aya-build calls it by this name).
pub const NIGHTLY: &str = "nightly";

/// Prefix of the LLVM shared library shipped in a nightly's `lib` directory,
/// e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
const LLVM_LIB_PREFIX: &str = "libLLVM.so.";

/// Usage text printed for unknown or missing subcommands.
const USAGE: &str = "usage: cargo xtask <command> [args...]

commands:
  setup                    install the nightly toolchain, bpf-linker and test packages (idempotent)
  build                    setup, then build the release profiler
  record [ARGS...]         build, then run the release profiler's `record ARGS...`
  test [ARGS...]           setup, build, dist, then `cargo test --release` (ARGS go to cargo test)
  dist                     static musl release tarball, debug tarball and SHA256SUMS -> target/dist/
  image [--dist TARBALL] [-o ARCHIVE]
                           FROM scratch image profiler:<version> with buildah -> OCI archive
  bench [--quick|--smoke|--off-cpu]  benchmarks side by side with perf and bpftrace -> bench/results/
  fuzz [--seconds N] [TARGET...]
                           every cargo-fuzz target in fuzz/ (or those named), N s each (60)";

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit_code_of(&e)
        }
    }
}

/// Dispatches the subcommand; returns the exit code for the cases that do not fail outright.
fn try_main() -> Result<ExitCode> {
    let mut args = env::args_os().skip(1);
    let Some(command) = args.next() else {
        eprintln!("{USAGE}");
        return Ok(ExitCode::FAILURE);
    };
    let rest: Vec<OsString> = args.collect();
    prepend_cargo_bin_to_path()?;
    match command.to_str() {
        Some("setup") => no_args("setup", &rest).and_then(|()| setup()),
        Some("build") => no_args("build", &rest).and_then(|()| build()),
        Some("record") => record(&rest),
        Some("test") => test(&rest),
        Some("bench") => bench::bench(&rest),
        Some("dist") => dist::dist(&rest),
        Some("image") => dist::image(&rest),
        Some("fuzz") => fuzz::fuzz(&rest),
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown command `{}`\n{USAGE}", command.display()),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Rejects stray arguments so a typo does not silently do something else.
fn no_args(command: &str, rest: &[OsString]) -> Result<()> {
    if let Some(arg) = rest.first() {
        bail!("`{command}` takes no arguments, got `{}`", arg.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Subcommands
// ---------------------------------------------------------------------------------------------

/// Installs every prerequisite. Apt packages come first because a fresh machine has no C
/// linker, without which neither `cargo install bpf-linker` nor any other Rust build can link.
fn setup() -> Result<()> {
    let missing = missing_apt_packages()?;
    if !missing.is_empty() && !is_root()? {
        bail!(
            "setup needs root to install apt packages (missing: {}); re-run as root",
            missing.join(" ")
        );
    }
    report("apt packages", install_apt_packages(&missing)?);
    for &(package, version, module) in PIP_PACKAGES {
        report(package, install_pip_package(package, version, module)?);
    }
    report("python3.12 (pyenv)", install_python312()?);
    report("musl target", add_musl_target()?);
    report("nightly toolchain", install_nightly()?);
    report("rust-src for nightly", add_rust_src()?);
    let llvm = link_nightly_llvm()?;
    report("nightly LLVM links", llvm.outcome.clone());
    report("bpf-linker", install_bpf_linker(&llvm)?);
    Ok(())
}

/// Builds the release profiler; its build script compiles the eBPF crate with bpf-linker.
fn build() -> Result<()> {
    setup()?;
    build_profiler()
}

/// Builds, then replaces this process with `profiler record ...` so that Ctrl-C reaches the
/// profiler alone (it must stop cleanly and write its output) and its exit code is ours.
fn record(args: &[OsString]) -> Result<()> {
    build()?;
    let mut cmd = Command::new(profiler_bin());
    cmd.arg("record").args(args);
    Err(exec(&mut cmd))
}

/// Builds the profiler and the release tarballs, then runs the whole test suite against that
/// release binary. The dist and image tests get the tarballs built here (`PROFILER_DIST`,
/// `PROFILER_DIST_DEBUG`) and this very xtask (`PROFILER_XTASK`) to build images with.
fn test(args: &[OsString]) -> Result<()> {
    let started = Instant::now();
    build_suite()?;
    println!("xtask: built in {:.0?}", started.elapsed());
    let dist = dist::build_dist()?;
    println!("xtask: dist built at {:.0?}", started.elapsed());
    let xtask = env::current_exe().context("finding the xtask binary")?;
    let mut cmd = suite_cargo(&["test", "--release"]);
    cmd.args(args)
        .env("PROFILER_BIN", profiler_bin())
        .env("PROFILER_DIST", &dist.tarball)
        .env("PROFILER_DIST_DEBUG", &dist.debug_tarball)
        .env("PROFILER_XTASK", xtask);
    let (passed, failed) = run_counting_tests(&mut cmd)?;
    println!("xtask: tests done at {:.0?}", started.elapsed());
    // The benchmark harness is part of the suite: every stage once, tiny, output checked.
    bench::bench(&["--smoke".into()])?;
    println!("xtask: bench smoke done at {:.0?}", started.elapsed());
    // The suite's closing line counts every test binary, since cargo ends on the last one's.
    println!("tests: {} passed, {failed} failed", passed + 1);
    Ok(())
}

/// (passed, failed) from a libtest `test result: ok. 8 passed; 0 failed; ...` line; (0, 0) for
/// any other line.
fn test_counts(line: &str) -> (u64, u64) {
    let Some(rest) = line.strip_prefix("test result: ") else {
        return (0, 0);
    };
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| {
                let number = part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?;
                number.parse::<u64>().ok()
            })
            .unwrap_or(0)
    };
    (count("passed"), count("failed"))
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines.
fn run_counting_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::BufRead as _;
    let command = announce(cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{command}`"))?;
    let (mut passed, mut failed) = (0, 0);
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    for line in io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        let (p, f) = test_counts(&line);
        passed += p;
        failed += f;
    }
    check(command, child.wait()?)?;
    Ok((passed, failed))
}

/// What every build, test, bench and release selects, always with these arguments, so that
/// each reuses what the others built:
/// - cargo resolves features once per package selection, and `-p profiler` alone resolves them
///   without the test crates' and dev-dependencies' features, so the two would rebuild the
///   profiler and most of its dependencies (about five minutes here) each time one follows the
///   other;
/// - one target, the static musl one we ship ([`dist::TARGET`]): the tests run the very binary
///   the tarball holds, and a fresh CI compiles the dependencies once instead of once per
///   target (ten minutes here).
///
/// The eBPF crate is left out: it is `no_std`/`no_main` for bpfel only (profiler/build.rs
/// builds it), and its binary is also named `profiler`, which would collide with the real one.
const SUITE: [&str; 5] = [
    "--workspace",
    "--exclude",
    "profiler-ebpf",
    "--target",
    dist::TARGET,
];

/// `cargo ARGS SUITE` at the workspace root, with the target's build environment.
fn suite_cargo(args: &[&str]) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(workspace_root()).args(args).args(SUITE);
    dist::target_env(&mut cmd);
    cmd
}

/// Setup, then the release profiler with every test, bench and example target of the suite,
/// in one feature resolution (see [`SUITE`]).
fn build_suite() -> Result<()> {
    setup()?;
    run(suite_cargo(&["build", "--release"]).arg("--all-targets"))
}

/// The suite's release binaries without its tests: the profiler for `record` and `dist`.
fn build_profiler() -> Result<()> {
    run(&mut suite_cargo(&["build", "--release"]))
}

// ---------------------------------------------------------------------------------------------
// Setup steps
// ---------------------------------------------------------------------------------------------

/// What a setup step did, printed as one line per step.
#[derive(Clone, Debug)]
enum Outcome {
    /// Nothing to do; the reason says what was found.
    Skipped(String),
    /// The step changed something.
    Done,
}

/// Prints the one-line summary of a setup step.
fn report(step: &str, outcome: Outcome) {
    match outcome {
        Outcome::Skipped(why) => println!("setup: {step}: skipped ({why})"),
        Outcome::Done => println!("setup: {step}: done"),
    }
}

/// The packages of [`APT_PACKAGES`] that dpkg does not report as installed.
fn missing_apt_packages() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for &package in APT_PACKAGES {
        if !apt_package_installed(package)? {
            missing.push(package);
        }
    }
    Ok(missing)
}

/// Asks dpkg; an unknown package makes dpkg-query fail, which also means "not installed".
fn apt_package_installed(package: &str) -> Result<bool> {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "-f=${Status}", package]);
    Ok(probe(&mut cmd)?.is_some_and(|status| status.contains("install ok installed")))
}

/// Installs the given packages, refreshing the package lists once beforehand.
fn install_apt_packages(missing: &[&str]) -> Result<Outcome> {
    if missing.is_empty() {
        return Ok(Outcome::Skipped("all installed".into()));
    }
    run(Command::new("apt-get").arg("update"))?;
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(missing);
    run(&mut cmd)?;
    Ok(Outcome::Done)
}

/// Installs `package` (`version` is a prefix, "" for any) with `python3 -m pip` unless
/// `python3` can already import `module` from a matching version.
///
/// The tests call the same `python3` (`python3 -m kubernetes_validate`), so this works for a
/// pyenv or venv interpreter as well as for Debian's, which refuses installs outside a venv
/// (PEP 668) unless told `--break-system-packages`; that flag is passed only there.
fn install_pip_package(package: &str, version: &str, module: &str) -> Result<Outcome> {
    let mut installed = Command::new("python3");
    installed.args([
        "-c",
        &format!(
            "import {module}; from importlib.metadata import version; \
             print(version('{package}'))"
        ),
    ]);
    if let Some(found) = probe(&mut installed)? {
        if found.trim().starts_with(version) {
            return Ok(Outcome::Skipped(format!("{package} {}", found.trim())));
        }
    }
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "install", "--quiet"]);
    if python_externally_managed()? {
        cmd.arg("--break-system-packages");
    }
    // Root is expected here (CI, containers); pip's warning about it is noise.
    let requirement = match version.strip_suffix('.') {
        Some(prefix) => format!("{package}=={prefix}.*"),
        None => package.to_owned(),
    };
    cmd.arg(requirement).env("PIP_ROOT_USER_ACTION", "ignore");
    run(&mut cmd)?;
    Ok(Outcome::Done)
}

/// Whether `python3` is an externally managed interpreter in the sense of PEP 668: not in a
/// virtual environment, with an `EXTERNALLY-MANAGED` marker in its stdlib directory.
fn python_externally_managed() -> Result<bool> {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import os, sys, sysconfig; \
         marker = os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'); \
         sys.exit(0 if sys.prefix == sys.base_prefix and os.path.isfile(marker) else 1)",
    ]);
    Ok(probe(&mut cmd)?.is_some())
}

/// Adds the standard library for [`dist::TARGET`] to the stable toolchain (a no-op when there).
fn add_musl_target() -> Result<Outcome> {
    let mut installed = Command::new("rustup");
    installed.args(["target", "list", "--installed"]);
    if probe(&mut installed)?.is_some_and(|targets| targets.lines().any(|t| t == dist::TARGET)) {
        return Ok(Outcome::Skipped(format!("{} installed", dist::TARGET)));
    }
    run(Command::new("rustup").args(["target", "add", dist::TARGET]))?;
    Ok(Outcome::Done)
}

/// Installs the nightly toolchain unless it already runs.
fn install_nightly() -> Result<Outcome> {
    let mut version = Command::new("rustup");
    version.args(["run", NIGHTLY, "rustc", "--version"]);
    if let Some(version) = probe(&mut version)? {
        return Ok(Outcome::Skipped(version.trim().to_owned()));
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]);
    run(&mut cmd)?;
    Ok(Outcome::Done)
}

/// The JIT tests run CPython 3.12 with `-X perf`; Debian 12 has none, so it comes from pyenv.
fn install_python312() -> Result<Outcome> {
    let mut installed = Command::new("pyenv");
    installed.args(["latest", "3.12"]);
    if let Some(version) = probe(&mut installed)? {
        return Ok(Outcome::Skipped(version.trim().to_owned()));
    }
    let mut cmd = Command::new("pyenv");
    cmd.args(["install", "--skip-existing", "3.12"]);
    run(&mut cmd).context("installing python3.12 with pyenv (is pyenv on PATH?)")?;
    Ok(Outcome::Done)
}

/// `build-std` for the bpfel target needs the standard library sources; rustup makes this a
/// no-op when the component is already there.
fn add_rust_src() -> Result<Outcome> {
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add", "rust-src", "--toolchain", NIGHTLY]);
    run(&mut cmd)?;
    Ok(Outcome::Done)
}

/// Where the nightly's LLVM library is exposed to bpf-linker, as set up by [`link_nightly_llvm`].
struct NightlyLlvm {
    /// The stable prefix `$HOME/.local/share/profiler/llvm` (its `lib` holds the links).
    prefix: PathBuf,
    /// File name of the nightly's library, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
    file_name: String,
    /// LLVM major version parsed from `file_name`, selecting bpf-linker's `llvm-<major>` feature.
    major: u32,
    /// Whether the links had to be (re)created.
    outcome: Outcome,
}

/// Points `$D/lib/libLLVM.so` and `$D/lib/<file name>` at the nightly's LLVM library.
///
/// bpf-linker must use the very LLVM that produced the nightly's bitcode. Building it against
/// the nightly's own shared library guarantees that, and going through a stable prefix lets a
/// new nightly be picked up by relinking (and rebuilding bpf-linker only if the name changed).
fn link_nightly_llvm() -> Result<NightlyLlvm> {
    let prefix = home()?.join(".local/share/profiler/llvm");
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let library = find_nightly_llvm_library()?;
    let file_name = file_name_of(&library)?;
    let major = llvm_major(&file_name)?;
    let unversioned = replace_symlink(&lib_dir.join("libLLVM.so"), &library)?;
    let versioned = replace_symlink(&lib_dir.join(&file_name), &library)?;
    let outcome = if unversioned || versioned {
        Outcome::Done
    } else {
        Outcome::Skipped(format!("{} -> {}", lib_dir.display(), library.display()))
    };
    Ok(NightlyLlvm {
        prefix,
        file_name,
        major,
        outcome,
    })
}

/// The single `libLLVM.so.*` in the nightly's `lib` directory; its name differs per nightly.
fn find_nightly_llvm_library() -> Result<PathBuf> {
    let mut cmd = Command::new("rustc");
    cmd.args([&format!("+{NIGHTLY}"), "--print", "sysroot"]);
    let sysroot = run_capture(&mut cmd)?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib_dir).with_context(|| format!("reading {}", lib_dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", lib_dir.display()))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(LLVM_LIB_PREFIX)
        {
            found.push(entry.path());
        }
    }
    match <[PathBuf; 1]>::try_from(found) {
        Ok([library]) => Ok(library),
        Err(found) if found.is_empty() => {
            bail!("no {LLVM_LIB_PREFIX}* in {}", lib_dir.display())
        }
        Err(found) => bail!(
            "several {LLVM_LIB_PREFIX}* in {}: {found:?}",
            lib_dir.display()
        ),
    }
}

/// The UTF-8 file name of `path` (it becomes a stamp and a link name, so it must be text).
fn file_name_of(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(OsStr::to_str)
        .map(str::to_owned)
        .with_context(|| format!("no UTF-8 file name in {}", path.display()))
}

/// The digits right after `libLLVM.so.`: 22 for `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn llvm_major(file_name: &str) -> Result<u32> {
    let version = file_name
        .strip_prefix(LLVM_LIB_PREFIX)
        .with_context(|| format!("{file_name} does not start with {LLVM_LIB_PREFIX}"))?;
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .with_context(|| format!("no LLVM major version in {file_name}"))
}

/// Makes `link` a symlink to `target`, replacing whatever stale link is there.
/// Returns whether anything changed.
fn replace_symlink(link: &Path, target: &Path) -> Result<bool> {
    match fs::read_link(link) {
        Ok(current) if current == target => return Ok(false),
        Ok(_) => fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading link {}", link.display())),
    }
    symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    Ok(true)
}

/// Installs bpf-linker against the nightly's LLVM unless a working one was already built
/// against this very library (recorded in `$D/stamp`).
fn install_bpf_linker(llvm: &NightlyLlvm) -> Result<Outcome> {
    let stamp = llvm.prefix.join("stamp");
    let existing = find_on_path("bpf-linker");
    if let Some(linker) = &existing {
        if let Some(version) = probe(Command::new(linker).arg("--version"))? {
            if read_stamp(&stamp)?.as_deref() == Some(llvm.file_name.as_str()) {
                return Ok(Outcome::Skipped(format!(
                    "{}, built for {}",
                    version.trim(),
                    llvm.file_name
                )));
            }
        }
    }
    let mut cmd = cargo();
    cmd.env("LLVM_PREFIX", &llvm.prefix)
        .args(["install", "bpf-linker", "--no-default-features"])
        .args(["--features", &format!("llvm-{}", llvm.major)]);
    if existing.is_some() {
        cmd.arg("--force");
    }
    run(&mut cmd)?;
    fs::write(&stamp, &llvm.file_name).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(Outcome::Done)
}

/// The stamp's contents, or `None` when no bpf-linker was installed by us yet.
fn read_stamp(stamp: &Path) -> Result<Option<String>> {
    match fs::read_to_string(stamp) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", stamp.display())),
    }
}

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

/// Puts `$HOME/.cargo/bin` first on PATH, for our own look-ups and every child: bpf-linker is
/// installed there and a fresh shell may not have it on PATH yet.
fn prepend_cargo_bin_to_path() -> Result<()> {
    let cargo_bin = home()?.join(".cargo/bin");
    let old = env::var_os("PATH").unwrap_or_default();
    let paths = std::iter::once(cargo_bin).chain(env::split_paths(&old));
    let new = env::join_paths(paths).context("building PATH")?;
    // Single-threaded at this point, so mutating the environment is sound.
    env::set_var("PATH", new);
    Ok(())
}

/// The user's home directory, where cargo, rustup and our LLVM prefix live.
fn home() -> Result<PathBuf> {
    env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// The first executable file called `name` on PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a regular file with some execute bit set.
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether we run with effective uid 0, read from `/proc/self/status` to avoid a libc dependency.
fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    Ok(effective_uid == "0")
}

/// The workspace root: xtask lives in `<root>/xtask`.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir has a parent")
}

/// Where the suite's release binaries and examples land.
fn release_dir() -> PathBuf {
    workspace_root()
        .join("target")
        .join(dist::TARGET)
        .join("release")
}

/// The release profiler binary that `build` produces.
fn profiler_bin() -> PathBuf {
    release_dir().join("profiler")
}

/// The cargo that runs us (`cargo run` sets `CARGO`), so children use the same toolchain.
fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

/// A child command that exited unsuccessfully; `main` exits with the child's own code.
#[derive(Debug)]
struct CommandFailed {
    /// The command line as printed before running it.
    command: String,
    /// How it ended.
    status: ExitStatus,
}

impl fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed with {}", self.command, self.status)
    }
}

impl std::error::Error for CommandFailed {}

/// The process exit code for an error: the failing child's code (shell-style 128+signal for a
/// signal), so `cargo xtask test` exits like `cargo test`; 1 for everything else.
fn exit_code_of(error: &anyhow::Error) -> ExitCode {
    let code = error
        .downcast_ref::<CommandFailed>()
        .and_then(|failed| {
            failed
                .status
                .code()
                .or_else(|| failed.status.signal().map(|signal| 128 + signal))
        })
        .and_then(|code| u8::try_from(code).ok())
        .filter(|&code| code != 0)
        .unwrap_or(1);
    ExitCode::from(code)
}

/// Runs `cmd` with inherited stdio after printing it; a non-zero exit is an error.
fn run(cmd: &mut Command) -> Result<()> {
    let command = announce(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{command}`"))?;
    check(command, status)
}

/// Like [`run`] but returns the command's stdout (stderr still goes to the terminal).
fn run_capture(cmd: &mut Command) -> Result<String> {
    let command = announce(cmd);
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{command}`"))?;
    check(command, output.status)?;
    String::from_utf8(output.stdout).context("command output is not UTF-8")
}

/// Runs a check whose failure is an answer, not an error: `Some(stdout)` on success, `None` when
/// it exits non-zero or does not exist. Its output is captured to keep setup's log short.
fn probe(cmd: &mut Command) -> Result<Option<String>> {
    let command = announce(cmd);
    match cmd.stdin(Stdio::null()).output() {
        Ok(output) if output.status.success() => {
            Ok(Some(String::from_utf8_lossy(&output.stdout).into_owned()))
        }
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("could not start `{command}`")),
    }
}

/// Replaces this process with `cmd` after printing it; only returns if that fails.
fn exec(cmd: &mut Command) -> anyhow::Error {
    let command = announce(cmd);
    anyhow::Error::new(cmd.exec()).context(format!("could not exec `{command}`"))
}

/// Turns a child's exit status into a [`CommandFailed`] error when it is not success.
fn check(command: String, status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        Err(CommandFailed { command, status }.into())
    }
}

/// Prints the command line (with its extra environment and directory) and returns it.
fn announce(cmd: &Command) -> String {
    let command = describe(cmd);
    match cmd.get_current_dir() {
        Some(dir) => eprintln!("+ (cd {} && {command})", quote(dir.as_os_str())),
        None => eprintln!("+ {command}"),
    }
    command
}

/// A shell-like rendering of the command: `VAR=value program args...`.
fn describe(cmd: &Command) -> String {
    let env = cmd.get_envs().filter_map(|(key, value)| {
        value.map(|value| format!("{}={}", key.to_string_lossy(), quote(value)))
    });
    let program = std::iter::once(quote(cmd.get_program()));
    let args = cmd.get_args().map(quote);
    env.chain(program).chain(args).collect::<Vec<_>>().join(" ")
}

/// Single-quotes a word for display when it contains anything a shell would interpret.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=+:,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn libtest_result_lines_are_counted() {
        let line = "test result: FAILED. 8 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(super::test_counts(line), (8, 2));
        assert_eq!(super::test_counts("running 8 tests"), (0, 0));
    }

    use super::*;

    #[test]
    fn llvm_major_reads_digits_before_first_dot() {
        assert_eq!(
            llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly").unwrap(),
            22
        );
        assert_eq!(llvm_major("libLLVM.so.19-rust-1.83.0-nightly").unwrap(), 19);
        assert!(llvm_major("libLLVM.so.x").is_err());
        assert!(llvm_major("libfoo.so.1").is_err());
    }

    #[test]
    fn replace_symlink_fixes_stale_links_only() {
        let dir = env::temp_dir().join(format!("xtask-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let link = dir.join("link");
        let (old, new) = (dir.join("old"), dir.join("new"));
        assert!(replace_symlink(&link, &old).unwrap());
        assert!(!replace_symlink(&link, &old).unwrap());
        assert!(replace_symlink(&link, &new).unwrap());
        assert_eq!(fs::read_link(&link).unwrap(), new);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_command_keeps_its_exit_status() {
        let error = run(Command::new("sh").args(["-c", "exit 7"])).unwrap_err();
        let failed = error.downcast_ref::<CommandFailed>().unwrap();
        assert_eq!(failed.status.code(), Some(7));
        assert_eq!(
            error.to_string(),
            "`sh -c 'exit 7'` failed with exit status: 7"
        );
    }

    #[test]
    fn quote_only_when_needed() {
        assert_eq!(quote(OsStr::new("--features")), "--features");
        assert_eq!(quote(OsStr::new("-f=${Status}")), "'-f=${Status}'");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
    }
}
