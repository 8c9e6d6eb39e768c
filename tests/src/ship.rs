//! What `cargo xtask test` built for the release tests: the dist tarballs and the xtask binary
//! that builds images, passed in the environment. Outside `cargo xtask test` these tests skip;
//! with CI=true a missing one fails them instead.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// Whether skipping is forbidden: CI runs `cargo xtask test`, which sets everything up.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Skips the test (None, after saying why), or in CI fails it.
pub fn skip<T>(why: &str) -> Option<T> {
    assert!(!in_ci(), "{why}, and CI=true forbids skipping");
    eprintln!("skipped: {why}");
    None
}

/// The path in environment variable `name`, which `cargo xtask test` sets.
fn from_env(name: &str) -> Option<PathBuf> {
    match std::env::var_os(name) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(path.exists(), "{name}={} does not exist", path.display());
            Some(path)
        }
        None => skip(&format!("{name} is not set (`cargo xtask test` builds it)")),
    }
}

/// `target/dist/profiler-<version>-x86_64-linux-musl.tar.gz`, from `PROFILER_DIST`.
pub fn dist_tarball() -> Option<PathBuf> {
    from_env("PROFILER_DIST")
}

/// The `-debug.tar.gz` beside it, from `PROFILER_DIST_DEBUG`.
pub fn dist_debug_tarball() -> Option<PathBuf> {
    from_env("PROFILER_DIST_DEBUG")
}

/// The xtask binary, from `PROFILER_XTASK`.
pub fn xtask() -> Option<PathBuf> {
    from_env("PROFILER_XTASK")
}

/// Runs `cmd`, asserting success; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` to completion, whatever its exit status.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// Unpacks the tarball (gzipped or not) `archive` into `dir`.
pub fn untar(archive: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(dir),
    );
}

/// The hex GNU build ID of an ELF file, from `readelf -n`.
pub fn read_build_id(elf: &Path) -> String {
    let notes = run_ok(Command::new("readelf").arg("-n").arg(elf));
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("{} has no GNU build-ID note", elf.display()))
        .trim()
        .to_owned()
}

/// The paths of the regular files under `dir`, relative to it, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap();
                files.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    files
}
