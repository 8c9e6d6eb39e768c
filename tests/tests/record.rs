//! `profiler record` end to end: real workloads with known call trees, the real BPF programs,
//! and the output decoded.

use std::{
    io::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use profiler_tests::{
    ship::{read_build_id, run_ok},
    *,
};

/// Starts the workload outside the profiler, for the tests that record by pid.
fn spawn_workload(args: &[&str]) -> Child {
    Command::new(workload()).args(args).spawn().unwrap()
}

/// The workload's own samples: its process name is "workload".
fn is_workload(s: &DecodedSample) -> bool {
    s.labels.get("comm").map(String::as_str) == Some("workload")
}

#[test]
fn known_shares_and_leaf_first_order() {
    let Some(t) = bpf_test() else { return };
    let out = t.path("shares.pb.gz");
    profiler_ok(&[
        "record",
        "-F",
        "999",
        "-o",
        path_str(&out),
        "--",
        path_str(&workload()),
        "shares",
        "3",
    ]);
    let samples = read_samples(&out);
    let shares = inclusive_shares(&samples, is_workload);
    let total = sample_count(&samples, is_workload);
    assert!(total > 1000, "too few samples: {total}");
    // Truth from the unit counts: heavy 6, light 3, leaf_c 1 of every 10 units.
    for (function, truth) in [
        ("main", 100.0),
        ("heavy", 60.0),
        ("light", 30.0),
        ("middle", 10.0),
        ("leaf_c", 10.0),
    ] {
        let got = shares.get(function).copied().unwrap_or(0.0);
        assert!(
            (got - truth).abs() <= 5.0,
            "{function}: {got:.1}% recorded, {truth}% true; all: {shares:?}"
        );
    }
    // Leaf first: leaf_c, then middle, then main.
    let stack = samples
        .iter()
        .find(|s| s.functions.first().map(String::as_str) == Some("leaf_c"))
        .expect("a sample with leaf_c as its leaf");
    let pos = |name: &str| stack.functions.iter().position(|f| f == name).unwrap();
    assert!(
        pos("leaf_c") < pos("middle") && pos("middle") < pos("main"),
        "{stack:?}"
    );
}

#[test]
fn syscalls_show_symbolized_kernel_frames() {
    let Some(t) = bpf_test() else { return };
    let workload = workload();
    let (out, _) = t.record("sys.pb.gz", &[], &[path_str(&workload), "syscalls", "2"]);
    let recorded = read_samples(&out);
    let with_kernel = recorded.iter().find(|s| {
        is_workload(s)
            && s.has_function("syscall_loop")
            && s.functions.iter().any(|f| f.contains("sys_write"))
    });
    assert!(
        with_kernel.is_some(),
        "no sample with a symbolized kernel frame under syscall_loop: {:?}",
        &recorded[..recorded.len().min(5)]
    );
    // Kernel frames come before (are deeper than) the user frames they serve.
    let s = with_kernel.unwrap();
    let kernel = s
        .functions
        .iter()
        .position(|f| f.contains("sys_write"))
        .unwrap();
    let user = s
        .functions
        .iter()
        .position(|f| f == "syscall_loop")
        .unwrap();
    assert!(kernel < user, "{s:?}");

    // --no-kernel leaves them out.
    let (out, _) = t.record(
        "nokernel.pb.gz",
        &["--no-kernel"],
        &[path_str(&workload), "syscalls", "1"],
    );
    let without = read_samples(&out);
    assert!(has_function(&without, "syscall_loop"));
    assert!(!without
        .iter()
        .any(|s| s.functions.iter().any(|f| f.contains("sys_write"))));
}

#[test]
fn command_children_are_followed_and_exit_code_passed_through() {
    let Some(t) = bpf_test() else { return };
    let (out, output) = t.try_record(
        "fork.pb.gz",
        &[],
        &[path_str(&workload()), "fork", "1.5", "7"],
    );
    assert_eq!(output.status.code(), Some(7), "CMD's exit code: {output:?}");
    // Without a terminal (as in CI): no progress line, no table, one summary line that says
    // why the recording stopped and where the profile went, although CMD failed.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    for needle in ["samples", "lost", "targets exited", path_str(&out)] {
        assert!(lines[0].contains(needle), "`{needle}` missing: {stderr}");
    }
    assert!(
        !stderr.contains('\r') && !stderr.contains("self%"),
        "{stderr}"
    );
    let samples = read_samples(&out);
    let child: Vec<_> = samples
        .iter()
        .filter(|s| s.has_function("child_burn"))
        .collect();
    assert!(!child.is_empty(), "the forked child was not recorded");
    let child_count: i64 = child.iter().map(|s| s.count).sum();
    assert!(child_count > 300, "child samples: {child_count}");
}

/// The profiler turns error backtraces off for itself (RUST_LIB_BACKTRACE=0 when unset), not
/// for CMD: CMD gets the environment the profiler was given.
#[test]
fn command_gets_the_environment_the_profiler_was_given() {
    let Some(t) = bpf_test() else { return };
    let script = format!("env > {}", path_str(&t.path("env.txt")));
    let run = |lib_backtrace: Option<&str>| {
        let out = t.path("env.pb.gz");
        let mut command = Command::new(profiler_bin());
        command
            .args(["record", "-F", "99", "-o", path_str(&out), "--", "sh", "-c"])
            .arg(&script)
            .env("RUST_BACKTRACE", "1")
            .env_remove("RUST_LIB_BACKTRACE");
        if let Some(value) = lib_backtrace {
            command.env("RUST_LIB_BACKTRACE", value);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        std::fs::read_to_string(t.path("env.txt")).unwrap()
    };
    let env = run(None);
    assert!(env.lines().any(|l| l == "RUST_BACKTRACE=1"), "{env}");
    assert!(!env.contains("RUST_LIB_BACKTRACE"), "{env}");
    let env = run(Some("1"));
    assert!(env.lines().any(|l| l == "RUST_LIB_BACKTRACE=1"), "{env}");
}

#[test]
fn a_process_that_exits_mid_recording_is_symbolized() {
    let Some(t) = bpf_test() else { return };
    let script = format!("{} burn 0.5; sleep 1.5", workload().display());
    let (out, _) = t.record("short.pb.gz", &[], &["sh", "-c", &script]);
    let samples = read_samples(&out);
    let burn = samples
        .iter()
        .find(|s| s.has_function("burn_inner"))
        .expect("the short-lived process's frames were not symbolized");
    assert!(burn.has_function("burn_outer"));
}

#[test]
fn binary_only_in_a_private_mount_namespace_is_symbolized() {
    let Some(t) = bpf_test() else { return };
    let hidden = t.path("hidden");
    std::fs::create_dir(&hidden).unwrap();
    // The binary is copied into a tmpfs mounted only inside the new mount namespace: from
    // outside, `hidden` stays empty, and only /proc/PID/root or map_files reach the file.
    let script = format!(
        "mount -t tmpfs none {h} && cp {w} {h}/nsworkload && exec {h}/nsworkload burn 1.5",
        h = hidden.display(),
        w = workload().display()
    );
    let (out, _) = t.record(
        "ns.pb.gz",
        &[],
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ],
    );
    assert!(std::fs::read_dir(&hidden).unwrap().next().is_none());
    assert!(
        has_function(&read_samples(&out), "burn_inner"),
        "the namespaced binary's frames were not symbolized"
    );
}

#[test]
fn binary_deleted_after_start_is_symbolized() {
    let Some(t) = bpf_test() else { return };
    let copy = t.path("doomed");
    std::fs::copy(workload(), &copy).unwrap();
    // It outlives the recorder's start-up and second of sampling, and is killed after it.
    let mut child = Command::new(&copy).args(["burn", "30"]).spawn().unwrap();
    sleep(Duration::from_millis(200));
    std::fs::remove_file(&copy).unwrap();
    let pid = child.id().to_string();
    let (out, _) = t.record("deleted.pb.gz", &["-p", &pid, "-d", "1s"], &[]);
    let _ = child.kill();
    let _ = child.wait();
    let samples = read_samples(&out);
    assert!(
        has_function(&samples, "burn_inner"),
        "the deleted binary's frames were not symbolized"
    );
    assert!(samples.iter().all(|s| s.labels["pid"] == pid));
}

#[test]
fn samples_after_an_exec_resolve_against_the_new_image() {
    let Some(t) = bpf_test() else { return };
    // The shell spins first, so that the kernel side has tracked it (and cached it) under its
    // first image when the exec gives the same process a new one.
    let script = format!(
        "i=0; while [ $i -lt 500000 ]; do i=$((i+1)); done; exec {} burn 1.5",
        workload().display()
    );
    let (out, stderr) = t.record("exec.pb.gz", &[], &["sh", "-c", &script]);
    let samples = read_samples(&out);
    let of_comm = |comm: &str| {
        sample_count(&samples, |s| {
            s.labels.get("comm").map(String::as_str) == Some(comm)
        })
    };
    assert!(
        of_comm("sh") > 100,
        "the shell's spin: {}; {stderr}",
        of_comm("sh")
    );
    // 1.5 s at 499 Hz, every one in the new image's burn loop.
    let burning = sample_count(&samples, |s| is_workload(s) && s.has_function("burn_inner"));
    assert!(
        burning > 500 && burning as f64 >= 0.9 * of_comm("workload") as f64,
        "{burning} samples in burn_inner of {} after the exec; {stderr}",
        of_comm("workload")
    );
}

#[test]
fn recording_a_pid_stops_when_it_exits() {
    let Some(t) = bpf_test() else { return };
    // It outlives the start-up (verifying the stack walker takes a second or two).
    let mut child = spawn_workload(&["burn", "3"]);
    let pid = child.id().to_string();
    let out = t.path("pid.pb.gz");
    let started = Instant::now();
    // No duration: the recording must end by itself when the target exits (reaped below by a
    // thread, as a parent would).
    let waiter = std::thread::spawn(move || child.wait());
    let stderr = profiler_ok(&["record", "-p", &pid, "-o", path_str(&out)]);
    waiter.join().unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "{stderr}");
    assert!(stderr.contains("targets exited"), "{stderr}");
    assert!(has_function(&read_samples(&out), "burn_inner"));
}

#[test]
fn inlined_frames_and_separate_debug_info() {
    let Some(t) = bpf_test() else { return };
    // -O2 with DWARF: inlined_leaf is inlined into with_inline.
    let full = compile("workload-inline", &["-O2", "-g", "-Wl,--build-id"]);
    let stripped = t.path("workload");
    let debug_dir = t.path("debug");
    // Separate debug info under .build-id/, the binary stripped of all symbols.
    let build_id = read_build_id(&full);
    let target = debug_dir
        .join(".build-id")
        .join(&build_id[..2])
        .join(format!("{}.debug", &build_id[2..]));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    run_ok(
        Command::new("objcopy")
            .args(["--only-keep-debug"])
            .arg(&full)
            .arg(&target),
    );
    run_ok(
        Command::new("objcopy")
            .args(["--strip-all"])
            .arg(&full)
            .arg(&stripped),
    );
    let (out, _) = t.record(
        "inline.pb.gz",
        &["--debug-dir", path_str(&debug_dir)],
        &[path_str(&stripped), "inline", "1.5"],
    );
    let profile = load_pprof(&out);
    let samples = samples(&profile);
    let s = samples
        .iter()
        .find(|s| s.has_function("inlined_leaf"))
        .expect("no inlined frame: separate debug info was not used");
    let leaf = s
        .functions
        .iter()
        .position(|f| f == "inlined_leaf")
        .unwrap();
    assert_eq!(
        s.functions.get(leaf + 1).map(String::as_str),
        Some("with_inline")
    );
    // The mapping carries the build ID.
    let strings = &profile.string_table;
    assert!(profile
        .mapping
        .iter()
        .any(|m| strings[m.build_id as usize] == build_id));
}

#[test]
fn outputs_load_in_go_tool_pprof_and_folded_and_svg_are_well_formed() {
    let Some(t) = bpf_test() else { return };
    let workload = workload();
    let command = [path_str(&workload), "shares", "1"];
    let (pprof, _) = t.record("p.pb.gz", &[], &command);
    let (folded, _) = t.record("p.folded", &[], &command);
    let (svg, _) = t.record("p.svg", &[], &command);
    let (forced, _) = t.record("forced.out", &["--format", "folded"], &command);

    // pprof: Go's own reader, with our symbols (no re-symbolization).
    let text = go_pprof(
        &["-symbolize=none", "-top", "-nodecount=5"],
        &pprof,
        t.dir.path(),
    );
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("flat%"))
        .skip(1)
        .collect();
    assert!(rows[0].ends_with(" heavy"), "{text}");
    assert!(rows[1].ends_with(" light"), "{text}");
    assert!(text.contains("Type: cpu"), "{text}");
    assert!(
        text.contains("File: workload"),
        "the main binary should be the first mapping: {text}"
    );

    // The pprof follows the spec.
    let profile = load_pprof(&pprof);
    assert_eq!(profile.string_table[0], "");
    let types: Vec<_> = profile
        .sample_type
        .iter()
        .map(|t| {
            (
                &profile.string_table[t.r#type as usize],
                &profile.string_table[t.unit as usize],
            )
        })
        .collect();
    assert_eq!(types[0], (&"samples".to_owned(), &"count".to_owned()));
    assert_eq!(types[1], (&"cpu".to_owned(), &"nanoseconds".to_owned()));
    assert_eq!(profile.period, 1_000_000_000 / 499);
    assert!(profile.time_nanos > 0 && profile.duration_nanos > 0);
    for sample in &profile.sample {
        assert_eq!(sample.value[1], sample.value[0] * profile.period);
    }

    // Folded: `frames count` lines, process name at the root.
    for path in [&folded, &forced] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(!text.is_empty());
        for line in text.lines() {
            let (stack, count) = line.rsplit_once(' ').expect("`stack count`");
            assert!(count.parse::<u64>().is_ok(), "{line}");
            assert!(!stack.is_empty(), "{line}");
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("workload;") && l.contains(";main;heavy ")),
            "{text}"
        );
    }

    // SVG: parses as XML and names the workload's functions.
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = parse_svg(&text);
    assert!(doc
        .descendants()
        .any(|n| n.text().is_some_and(|t| t.contains("heavy"))));
}

/// `profiler record -F 499 -o OUT -p PID...` in the background, its stderr kept.
fn start_recorder(pids: &[&str], out: &Path) -> Child {
    let mut command = Command::new(profiler_bin());
    command.args(["record", "-F", "499", "-o", path_str(out)]);
    for pid in pids {
        command.args(["-p", pid]);
    }
    command.stderr(Stdio::piped()).spawn().unwrap()
}

/// Records a burning workload into `out`, sends `signal` once `before_signal` (given the
/// recorder's pid) returns, and checks that the recording stopped cleanly.
fn interrupted_recording(out: &Path, signal: i32, before_signal: impl FnOnce(u32)) {
    let mut burner = spawn_workload(&["burn", "10"]);
    let recorder = start_recorder(&[&burner.id().to_string()], out);
    before_signal(recorder.id());
    unsafe { libc::kill(recorder.id() as i32, signal) };
    let output = recorder.wait_with_output().unwrap();
    // A signal during start-up once made the kernel's verifier give up and aya verify again
    // with logs, twice, for 25 s: the target (10 s) was gone before the recorder stopped.
    let target_outlived_recorder = burner.try_wait().unwrap().is_none();
    let _ = burner.kill();
    let _ = burner.wait();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        target_outlived_recorder,
        "the interrupted recorder outlived its 10 s target: {stderr}"
    );
}

#[test]
fn ctrl_c_during_start_up_still_writes_a_profile() {
    let Some(t) = bpf_test() else { return };
    let out = t.path("early.pb.gz");
    // Well inside the second or more it takes to load and verify the programs.
    interrupted_recording(&out, libc::SIGINT, |_| sleep(Duration::from_millis(300)));
    // A valid profile, however few samples it holds.
    load_pprof(&out);
}

#[test]
fn sigterm_and_sigint_stop_the_recording_and_write_the_profile() {
    let Some(t) = bpf_test() else { return };
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let out = t.path(&format!("sig{signal}.pb.gz"));
        interrupted_recording(&out, signal, |recorder| {
            wait_until_sampling(recorder);
            sleep(Duration::from_millis(500));
        });
        assert!(has_function(&read_samples(&out), "burn_inner"));
    }
}

#[test]
fn recording_goes_on_until_the_last_of_several_pids_exits() {
    let Some(t) = bpf_test() else { return };
    // Each waits for a line before it execs the workload (same pid), so that both start work
    // once the recorder samples, however long its start-up takes.
    let held = |args: &str| {
        Command::new("sh")
            .args([
                "-c",
                &format!("read _ && exec {} {args}", workload().display()),
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut short = held("burn 0.5");
    let mut long = held("shares 2");
    let (short_pid, long_pid) = (short.id().to_string(), long.id().to_string());
    let out = t.path("two.pb.gz");
    let recorder = start_recorder(&[&short_pid, &long_pid], &out);
    wait_until_sampling(recorder.id());
    let started = Instant::now();
    for child in [&mut short, &mut long] {
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }
    let reaper = std::thread::spawn(move || (short.wait(), long.wait()));
    let output = recorder.wait_with_output().unwrap();
    let _ = reaper.join();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("targets exited"), "{stderr}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "{stderr}");
    let samples = read_samples(&out);
    let pids: std::collections::HashSet<&str> =
        samples.iter().map(|s| s.labels["pid"].as_str()).collect();
    assert!(pids.contains(short_pid.as_str()) && pids.contains(long_pid.as_str()));
    assert!(has_function(&samples, "heavy"));
}

#[test]
fn a_terminal_gets_a_live_progress_line() {
    let Some(t) = bpf_test() else { return };
    let out = t.path("tty.pb.gz");
    // script(1) (util-linux) runs the profiler on a pseudo-terminal and keeps what it printed.
    let command = format!(
        "{} record -o {} -- {} burn 1",
        profiler_bin().display(),
        out.display(),
        workload().display()
    );
    let typescript = t.path("typescript");
    let status = Command::new("script")
        .args(["-qec", &command])
        .arg(&typescript)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    assert!(
        text.contains("\rrecording") || text.contains("\r\x1b[2Krecording"),
        "{text:?}"
    );
    assert!(text.contains(" samples"), "{text:?}");
    assert!(text.contains("self%"), "{text:?}");
}
