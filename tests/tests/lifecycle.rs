//! Process lifecycles under `profiler record`: processes that come and go by the thousand, pids
//! that are reused, binaries rewritten in place. Each sample must be resolved with the mappings
//! and names of the process that took it.

use std::collections::HashSet;

use profiler_tests::*;

/// Samples by comm label.
fn of_comm<'a>(samples: &'a [DecodedSample], comm: &str) -> Vec<&'a DecodedSample> {
    samples
        .iter()
        .filter(|s| s.labels.get("comm").map(String::as_str) == Some(comm))
        .collect()
}

/// `record -- CMD` where CMD forks more short children over its life than the kernel's filter
/// holds: exited children leave the filter, so the child that does the work is still followed.
#[test]
fn a_fork_storm_does_not_hide_the_working_child() {
    let Some(t) = bpf_test() else { return };
    let workload = workload();
    let (out, stderr) = t.record(
        "storm.pb.gz",
        &[],
        &[path_str(&workload), "storm", "1", "20000"],
    );
    let samples = read_samples(&out);
    let burned: i64 = samples
        .iter()
        .filter(|s| s.has_function("child_burn"))
        .map(|s| s.count)
        .sum();
    // One second at 499 Hz: about 499 samples on an idle machine, fewer on a busy one.
    assert!(
        burned > 20,
        "the working child was not recorded ({burned} samples): {stderr}"
    );
    assert!(
        !stderr.contains("forks_not_followed=") && !stderr.contains("filter_updates_failed="),
        "{stderr}"
    );
}

/// A reused pid: process A exits, and B is started with A's pid (the kernel's `ns_last_pid`
/// forces it). B's samples must carry B's name and be symbolized with B's binary, not A's.
#[test]
fn a_reused_pid_does_not_inherit_the_old_process() {
    let Some(t) = bpf_test() else { return };
    let a = compile("reuse_a", &["-O0", "-g"]);
    let b = compile(
        "reuse_b",
        &[
            "-O0",
            "-g",
            "-Dburn_outer=reused_outer",
            "-Dburn_inner=reused_inner",
        ],
    );
    // Forcing a pid races every other fork on the machine: a few tries.
    let driver = r#"
import os, subprocess, sys
a, b = sys.argv[1], sys.argv[2]
for _ in range(20):
    first = subprocess.Popen([a, "burn", "0.6"])
    first.wait()
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(first.pid - 1))
    second = subprocess.Popen([b, "burn", "0.6"])
    second.wait()
    if second.pid == first.pid:
        print(first.pid)
        sys.exit(0)
sys.exit(3)
"#;
    let (out, output) = t.try_record(
        "reuse.pb.gz",
        &[],
        &["python3", "-c", driver, path_str(&a), path_str(&b)],
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "no pid could be reused: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pid = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let samples = read_samples(&out);
    let first = of_comm(&samples, "reuse_a");
    let second = of_comm(&samples, "reuse_b");
    assert!(!first.is_empty() && !second.is_empty(), "{samples:?}");
    for s in first.iter().chain(&second) {
        assert_eq!(s.labels["pid"], pid, "both ran as pid {pid}: {s:?}");
    }
    assert!(first.iter().any(|s| s.has_function("burn_inner")));
    assert!(second.iter().any(|s| s.has_function("reused_inner")));
    for s in &second {
        assert!(
            !s.has_function("burn_inner") && !s.has_function("burn_outer"),
            "B resolved with A's binary: {s:?}"
        );
    }
}

/// A binary rewritten in place keeps its inode (same device and inode); its new contents must
/// not be symbolized with the old one's cached symbols. (The runs are a second apart: samples
/// still waiting when a file is rewritten in place can only be read against its new contents.)
#[test]
fn a_binary_rewritten_in_place_is_symbolized_anew() {
    let Some(t) = bpf_test() else { return };
    let first = compile("inode_first", &["-O0", "-g"]);
    let second = compile(
        "inode_second",
        &[
            "-O0",
            "-g",
            "-Dburn_outer=second_outer",
            "-Dburn_inner=second_inner",
        ],
    );
    let target = t.path("rewritten");
    std::fs::copy(&first, &target).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::metadata(&target).unwrap().ino();
    let script = format!(
        "{t} burn 0.6 && sleep 1 && cp {second} {t} && {t} burn 0.6",
        t = path_str(&target),
        second = path_str(&second),
    );
    let (out, _) = t.record("inode.pb.gz", &[], &["sh", "-c", &script]);
    assert_eq!(
        std::fs::metadata(&target).unwrap().ino(),
        inode,
        "cp rewrote the file in place"
    );
    let samples = read_samples(&out);
    let runs = of_comm(&samples, "rewritten");
    let pids: HashSet<&String> = runs.iter().map(|s| &s.labels["pid"]).collect();
    assert_eq!(pids.len(), 2, "two runs: {runs:?}");
    for pid in pids {
        let mine: Vec<_> = runs.iter().filter(|s| &s.labels["pid"] == pid).collect();
        let old = mine.iter().any(|s| s.has_function("burn_inner"));
        let new = mine.iter().any(|s| s.has_function("second_inner"));
        assert!(old != new, "pid {pid} mixes both binaries' names: {mine:?}");
    }
    assert!(has_function(&samples, "second_inner"), "{runs:?}");
    assert!(has_function(&samples, "burn_inner"), "{runs:?}");
}

/// Short processes that exit before the next drain still come out named and symbolized.
#[test]
fn processes_that_exit_before_the_drain_keep_their_names() {
    let Some(t) = bpf_test() else { return };
    let workload = workload();
    let script = format!(
        "for i in 1 2 3 4 5 6 7 8; do {w} burn 0.2; done",
        w = path_str(&workload)
    );
    let (out, _) = t.record("short.pb.gz", &[], &["sh", "-c", &script]);
    let samples = read_samples(&out);
    let short = of_comm(&samples, "workload");
    let total: i64 = short.iter().map(|s| s.count).sum();
    // `main` is named from the process's own mappings, even where a frameless vDSO leaf
    // hides burn_outer from the frame-pointer walk.
    let named: i64 = short
        .iter()
        .filter(|s| s.has_function("main"))
        .map(|s| s.count)
        .sum();
    assert!(total > 50, "{samples:?}");
    // Start-up (the dynamic loader) and exit take the rest.
    assert!(
        named * 100 >= total * 85,
        "{named} of {total} samples symbolized"
    );
    assert!(short.iter().all(|s| !s.functions.is_empty()), "{short:?}");
    let pids: HashSet<&String> = short.iter().map(|s| &s.labels["pid"]).collect();
    assert!(pids.len() >= 6, "one pid per run: {pids:?}");
    assert!(
        samples
            .iter()
            .all(|s| s.labels.get("comm").map(String::as_str) != Some("[unknown]")),
        "{samples:?}"
    );
}
