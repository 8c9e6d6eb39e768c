//! Every kind of bad input gets one clear line on stderr and a non-zero exit code, never a
//! panic, a backtrace or a usage dump.

use std::process::{Command, Output};

use profiler_tests::*;

/// Runs `command ... record --all -d 1s -o DIR/p.pb.gz`: `command` is the profiler, or a
/// wrapper that takes the profiler as its first argument.
fn record_all(t: &BpfTest, mut command: Command) -> Output {
    let output = t.path("p.pb.gz");
    command
        .args(["record", "--all", "-d", "1s", "-o", path_str(&output)])
        .output()
        .unwrap()
}

#[test]
fn frequency_out_of_range() {
    for hz in ["0", "10001"] {
        let out = profiler(&[
            "record",
            "-F",
            hz,
            "--all",
            "-d",
            "1s",
            "-o",
            "/tmp/x.pb.gz",
        ]);
        assert_one_line_error(&out, 2, &["--frequency", hz]);
    }
}

#[test]
fn bad_duration() {
    let out = profiler(&["record", "--all", "-d", "soon"]);
    assert_one_line_error(&out, 2, &["soon", "duration"]);
}

#[test]
fn nothing_to_record() {
    let out = profiler(&["record"]);
    assert_one_line_error(&out, 2, &["nothing to record"]);
}

#[test]
fn unwritable_output_fails_before_sampling() {
    let started = std::time::Instant::now();
    let out = profiler(&[
        "record",
        "--all",
        "-d",
        "5s",
        "-o",
        "/nonexistent-dir/p.pb.gz",
    ]);
    assert_one_line_error(&out, 2, &["cannot write", "/nonexistent-dir/p.pb.gz"]);
    assert!(
        started.elapsed().as_secs() < 3,
        "it sampled before checking"
    );
}

#[test]
fn pid_that_does_not_exist() {
    let out = profiler(&[
        "record",
        "-p",
        "999999999",
        "-d",
        "1s",
        "-o",
        "/tmp/x.pb.gz",
    ]);
    assert_one_line_error(&out, 2, &["no process with pid 999999999"]);
}

#[test]
fn unknown_format() {
    let out = profiler(&["record", "--all", "--format", "png", "-o", "/tmp/x.pb.gz"]);
    assert_one_line_error(&out, 2, &["png"]);
}

#[test]
fn command_that_cannot_start() {
    let Some(t) = bpf_test() else { return };
    let output = t.path("p.pb.gz");
    let out = profiler(&[
        "record",
        "-o",
        path_str(&output),
        "--",
        "/nonexistent/command",
    ]);
    assert_one_line_error(&out, 127, &["cannot start", "/nonexistent/command"]);
}

#[test]
fn missing_capabilities_are_named() {
    if unsafe { libc::geteuid() } != 0 && std::env::var("CI").as_deref() != Ok("true") {
        eprintln!("skipped: needs root to drop to another user");
        return;
    }
    // setpriv (util-linux) drops to nobody with no capabilities at all.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(profiler_bin())
        .args([
            "record",
            "--all",
            "-d",
            "1s",
            "-o",
            "/tmp/nobody-profile.pb.gz",
        ])
        .output()
        .expect("setpriv");
    // /tmp is writable by nobody; the capability check is what must fail.
    let _ = std::fs::remove_file("/tmp/nobody-profile.pb.gz");
    assert_one_line_error(&out, 1, &["CAP_BPF", "CAP_PERFMON", "root"]);
}

#[test]
fn kernel_without_btf() {
    let Some(t) = bpf_test() else { return };
    let mut profiler = Command::new(profiler_bin());
    profiler.env("PROFILER_VMLINUX_BTF", t.path("no-such-btf"));
    let out = record_all(&t, profiler);
    assert_one_line_error(&out, 1, &["no BTF", "CONFIG_DEBUG_INFO_BTF"]);
}

#[test]
fn kernel_without_bpf() {
    let Some(t) = bpf_test() else { return };
    let nobpf = compile_source("nobpf.c", "nobpf", &["-O1"]);
    let mut wrapper = Command::new(nobpf);
    wrapper.arg(profiler_bin());
    let out = record_all(&t, wrapper);
    assert_one_line_error(&out, 1, &["no BPF support"]);
}
