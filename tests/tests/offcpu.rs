//! Off-CPU profiling end to end (`--off-cpu`): workloads whose blocked time is known by
//! construction (workloads/offcpu.c), recorded by the real binary and read back.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use profiler_proto::pprof::Profile;
use profiler_tests::{receiver::*, *};

/// workloads/offcpu.c, built once per test binary.
fn offcpu_workload() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| compile_source("offcpu.c", "offcpu", &["-O1", "-g", "-pthread"]))
        .clone()
}

/// Index of sample type `name` in `profile`.
fn value_index(profile: &Profile, name: &str) -> usize {
    profile
        .sample_type
        .iter()
        .position(|t| profile.string_table[t.r#type as usize] == name)
        .unwrap_or_else(|| panic!("no sample type {name}"))
}

/// Decoded samples counted by sample type `name` (nanoseconds for `offcpu`), those with a
/// zero value left out.
fn samples_of(profile: &Profile, name: &str) -> Vec<DecodedSample> {
    let index = value_index(profile, name);
    samples(profile)
        .into_iter()
        .zip(&profile.sample)
        .map(|(mut s, raw)| {
            s.count = raw.value[index];
            s
        })
        .filter(|s| s.count > 0)
        .collect()
}

/// Records the workload in `mode`, started first so that its libraries are mapped when the
/// profiler reads its maps (a process recorded from its exec has a second of stacks cut at
/// libc while they are read again), for `duration`; returns the output and the summary.
fn record_running(
    t: &BpfTest,
    name: &str,
    flags: &[&str],
    mode: &str,
    duration: &str,
) -> (PathBuf, String) {
    // It outlives the recording, whose start (the verifier) takes seconds on a busy machine.
    let mut workload = Command::new(offcpu_workload())
        .args([mode, "120"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = workload.id().to_string();
    let mut args = flags.to_vec();
    args.extend(["-d", duration, "--pid", &pid]);
    let recorded = t.record(name, &args, &[]);
    let _ = workload.kill();
    let _ = workload.wait();
    recorded
}

fn total(samples: &[DecodedSample]) -> i64 {
    samples.iter().map(|s| s.count).sum()
}

#[test]
fn sleeps_are_three_quarters_of_wall_time_in_the_sleeping_function() {
    let Some(t) = bpf_test() else { return };
    // Blocked waits only: a spin preempted by whatever else the machine runs is not a sleep.
    let (out, stderr) = record_running(
        &t,
        "sleep.pb.gz",
        &[
            "--off-cpu",
            "--off-cpu-state",
            "blocked",
            "--unwinder",
            "auto",
        ],
        "sleep",
        // Blocks that start before the process's tables are built (hundreds of ms on a busy
        // machine) keep only libc's leaf: a long recording makes them few.
        "6s",
    );
    let profile = load_pprof(&out);
    let name = |i: i64| profile.string_table[i as usize].as_str();
    assert_eq!(name(profile.default_sample_type), "offcpu");
    let off_cpu = samples_of(&profile, "offcpu");
    // 30 ms of every 40 ms round, less what spinning for 10 ms of wall time costs beyond that
    // on a busy machine.
    let share_of_wall = 100.0 * total(&off_cpu) as f64 / profile.duration_nanos as f64;
    assert!(
        (62.0..=85.0).contains(&share_of_wall),
        "off CPU {share_of_wall:.1}% of wall time; {stderr}"
    );
    // Through libc's frameless nanosleep to its caller and on to main.
    let in_sleep = chain_share(&off_cpu, &["sleep_phase", "main"]);
    assert!(
        in_sleep >= 90.0,
        "{in_sleep:.1}% in sleep_phase <- main; {stderr}\n{off_cpu:?}"
    );
    // The kernel side of the wait is there too.
    assert!(
        chain_share(&off_cpu, &["schedule", "sleep_phase"]) >= 90.0,
        "{off_cpu:?}"
    );
    // On-CPU samples are in the same file, where the spin is.
    let on_cpu = samples_of(&profile, "samples");
    let spinning = chain_share(&on_cpu, &["spin_phase", "main"]);
    assert!(spinning >= 80.0, "{spinning:.1}% on CPU in spin_phase");
    assert!(stderr.contains("off CPU in"), "{stderr}");

    // Go's own reader shows the off-CPU view on request.
    let text = go_pprof(
        &["-sample_index=offcpu", "-top", "-cum"],
        &out,
        t.dir.path(),
    );
    assert!(text.contains("sleep_phase"), "{text}");
}

#[test]
fn pipe_and_mutex_waits_keep_their_callers() {
    let Some(t) = bpf_test() else { return };
    // Waits only: preemption (a thread woken by a write preempting the writer, or anything
    // else the machine runs) is off-CPU time too, but not the ground truth here.
    let flags = [
        "--off-cpu",
        "--off-cpu-state",
        "blocked",
        "--unwinder",
        "auto",
        "--no-kernel",
    ];

    // Pipes, written as folded stacks (nanoseconds): each side waits in read, under its round.
    let (folded, stderr) = record_running(&t, "pipe.folded", &flags, "pipe", "2s");
    let text = std::fs::read_to_string(&folded).unwrap();
    // Per (thread function, round function or "" when the stack lacks it), the time waited
    // in read below them.
    let mut waits: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut all = 0u64;
    for line in text.lines().filter(|l| l.starts_with("offcpu;")) {
        let (stack, value) = line.rsplit_once(' ').unwrap();
        let value: u64 = value.parse().unwrap();
        all += value;
        // Root first: the thread's function, its round, then libc's read.
        let frames: Vec<&str> = stack.split(';').collect();
        let Some(read) = frames.iter().position(|f| f.ends_with("_read")) else {
            continue;
        };
        let above = &frames[..read];
        let Some(thread) = ["main", "pinger"].into_iter().find(|f| above.contains(f)) else {
            continue;
        };
        let round = ["pinger_round", "ponger_round"]
            .into_iter()
            .find(|f| above.contains(f))
            .unwrap_or("");
        *waits.entry((thread, round)).or_default() += value;
    }
    let waited: u64 = waits.values().sum();
    assert!(
        waited as f64 >= 0.95 * all as f64,
        "{waits:?} of {all} ns; {stderr}\n{text}"
    );
    // Most keep the read's caller, the round: only blocks that began before the process's
    // tables were built (the recording's first few hundred ms on a busy machine) keep just
    // libc's leaf and its caller's caller.
    let with_round = |thread, round| waits.get(&(thread, round)).copied().unwrap_or(0) as f64;
    let kept = with_round("main", "ponger_round") + with_round("pinger", "pinger_round");
    assert!(kept >= 0.6 * all as f64, "{waits:?} of {all} ns; {stderr}");
    assert!(
        with_round("main", "ponger_round") > 0.0 && with_round("pinger", "pinger_round") > 0.0,
        "{waits:?}"
    );
    // Two threads, each waiting about as long as the other spins for it: between a third and
    // all of 2 s.
    assert!(
        (600_000_000..=4_000_000_000).contains(&all),
        "{all} ns off CPU; {stderr}"
    );

    // A contended mutex: the waiter's stack goes through libc's lock to lock_and_work.
    let (out, stderr) = record_running(&t, "mutex.pb.gz", &flags, "mutex", "4s");
    let off_cpu: Vec<DecodedSample> = samples_of(&load_pprof(&out), "offcpu")
        .into_iter()
        .filter(|s| s.labels.get("comm").map(String::as_str) == Some("offcpu"))
        .collect();
    let through = |caller: &'static str| {
        move |s: &&DecodedSample| {
            let caller = s.functions.iter().position(|f| f == caller);
            let lock = s.functions.iter().position(|f| f.contains("lll_lock_wait"));
            matches!((lock, caller), (Some(l), Some(c)) if l < c)
        }
    };
    let share = |caller| {
        let time: i64 = off_cpu
            .iter()
            .filter(through(caller))
            .map(|s| s.count)
            .sum();
        100.0 * time as f64 / total(&off_cpu).max(1) as f64
    };
    // Every wait is in the lock, under one of the two threads' functions.
    let waiting = share("main") + share("locker");
    assert!(
        waiting >= 95.0,
        "{waiting:.1}% in the lock; {stderr}\n{off_cpu:?}"
    );
    // Most keep the lock call's caller: only blocks that began before the process's tables
    // were built (the recording's first few hundred ms on a busy machine) keep just libc's
    // leaf and its caller's caller.
    let with_caller = share("lock_and_work");
    assert!(
        with_caller >= 60.0,
        "{with_caller:.1}% under lock_and_work; {stderr}\n{off_cpu:?}"
    );
    assert!(total(&off_cpu) >= 300_000_000, "{off_cpu:?}");
}

#[test]
fn switches_past_the_rate_bound_are_sampled_and_weighted_to_the_same_blocked_time() {
    let Some(t) = bpf_test() else { return };
    // A pipe ping-pong, 50 us of work a message: about 8,000 switch-outs a second on each CPU.
    // Two recordings watch it at once: one records every switch-out, the other at most 300 per
    // second per CPU, so it samples and weights what it records. Not the bench's `storm`: its
    // blocks last about 6 us, and two profilers on one tracepoint shift each other's marks by
    // their own program's cost, up to 10 % of such a block, whichever is attached second.
    let mut workload = Command::new(offcpu_workload())
        .args(["pipe", "120"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = workload.id().to_string();
    let record = |name: &str, max_rate: &str| {
        let flags = [
            "--off-cpu",
            "--off-cpu-state",
            "blocked",
            "--unwinder",
            "fp",
            "--no-kernel",
            "--off-cpu-max-rate",
            max_rate,
            "-d",
            "4s",
            "--pid",
            &pid,
        ];
        let (out, stderr) = t.record(name, &flags, &[]);
        let profile = load_pprof(&out);
        let per_second =
            total(&samples_of(&profile, "offcpu")) as f64 / profile.duration_nanos as f64;
        (per_second, stderr)
    };
    let ((every, every_err), (sampled, sampled_err)) = std::thread::scope(|s| {
        let every = s.spawn(|| record("every.pb.gz", "100000000"));
        let sampled = s.spawn(|| record("sampled.pb.gz", "300"));
        (every.join().unwrap(), sampled.join().unwrap())
    });
    let _ = workload.kill();
    let _ = workload.wait();
    // Each of the two threads waits for the other most of the time.
    assert!(every >= 0.5, "{every:.2} s off CPU per second; {every_err}");
    assert!(
        (0.8..=1.2).contains(&(sampled / every)),
        "sampled {sampled:.2} against every {every:.2} s off CPU per second\n{sampled_err}\n{every_err}"
    );
    let sampled_out = |stderr: &str| -> u64 {
        stderr
            .split_once(" more switch-outs sampled out")
            .and_then(|(before, _)| before.rsplit('(').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert!(sampled_out(&sampled_err) > 0, "{sampled_err}");
    assert_eq!(sampled_out(&every_err), 0, "{every_err}");
}

#[test]
fn agent_pushes_an_offcpu_series_to_pyroscope_and_otlp() {
    let Some(_t) = bpf_test() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let recorder = Recorder::default();
    let otlp = OtlpRecorder::default();
    let (server, otlp_server) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (
            start_server(recorder.clone()).await,
            serve_otlp(listener, otlp.clone()),
        )
    });
    let mut workload = Command::new(offcpu_workload())
        .args(["sleep", "30"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut agent = Command::new(profiler_bin())
        .arg("agent")
        .args(["--pyroscope-url", &format!("http://{}", server.addr)])
        .args(["--otlp-endpoint", &format!("http://{}", otlp_server.addr)])
        .args(["--upload-interval", "2s", "--node-name", "test-node"])
        .args(["--metrics-addr", &metrics.to_string()])
        // Frame pointers: the agent announces every process that switches on the machine, and
        // with tables the sleeper's would wait behind all of theirs.
        .args(["--off-cpu", "--off-cpu-state", "blocked"])
        .env_remove("KUBECONFIG")
        .env("PROFILER_KUBECONFIG", "/nonexistent/kubeconfig")
        .spawn()
        .unwrap();
    let offcpu_series = |recorder: &Recorder| {
        recorder
            .snapshot()
            .into_iter()
            .filter(|r| {
                r.label("service_name") == Some("offcpu") && r.label("__name__") == Some("offcpu")
            })
            .collect::<Vec<_>>()
    };
    let arrived = rt.block_on(wait_until(Duration::from_secs(30), || {
        let n = offcpu_series(&recorder).len();
        async move { n >= 4 }
    }));
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    let _ = workload.kill();
    let _ = workload.wait();
    assert!(arrived, "fewer than 4 offcpu profiles arrived");
    assert!(status.success(), "{status:?}");

    let received = recorder.snapshot();
    let series = offcpu_series(&recorder);
    // The same series labels as the process_cpu one, but its name.
    let cpu = received
        .iter()
        .find(|r| {
            r.label("service_name") == Some("offcpu") && r.label("__name__") == Some("process_cpu")
        })
        .expect("the process_cpu series of the workload");
    let without_name = |labels: &[(String, String)]| {
        let mut l: Vec<_> = labels
            .iter()
            .filter(|(k, _)| k != "__name__")
            .cloned()
            .collect();
        l.sort();
        l
    };
    assert_eq!(without_name(&series[0].labels), without_name(&cpu.labels));
    let mut shares = Vec::new();
    let mut all: Vec<DecodedSample> = Vec::new();
    for r in &series {
        let profile = decode(&r.raw_profile);
        let types: Vec<&str> = profile
            .sample_type
            .iter()
            .map(|t| profile.string_table[t.r#type as usize].as_str())
            .collect();
        assert_eq!(types, ["offcpu"]);
        assert_eq!(
            profile.string_table[profile.sample_type[0].unit as usize],
            "nanoseconds"
        );
        let decoded = samples(&profile);
        shares.push(100.0 * total(&decoded) as f64 / profile.duration_nanos as f64);
        all.extend(decoded);
    }
    // Frame pointers step over libc's frameless nanosleep to sleep_phase's caller.
    let in_sleep = chain_share(&all, &["__GI___clock_nanosleep", "main"]);
    let elsewhere: Vec<&DecodedSample> = all
        .iter()
        .filter(|s| !s.has_function("__GI___clock_nanosleep"))
        .take(5)
        .collect();
    assert!(in_sleep >= 90.0, "{in_sleep:.1}%: {elsewhere:?}");
    // Whole intervals (not the first, which started with the agent, nor the last, cut short
    // by SIGTERM): three quarters off CPU, less what spinning over 10 ms costs on a busy machine.
    let middle = &shares[1..series.len() - 1];
    let share = middle.iter().sum::<f64>() / middle.len() as f64;
    assert!((60.0..=85.0).contains(&share), "{shares:?}");

    // OTLP: the off-CPU profile as Pyroscope's OTLP ingestion names it.
    let requests: Vec<_> = otlp.snapshot().iter().map(|r| r.request()).collect();
    let found = requests.iter().any(|request| {
        let dictionary = request.dictionary.as_ref().unwrap();
        let text = |i: i32| dictionary.string_table[i as usize].as_str();
        request
            .resource_profiles
            .iter()
            .flat_map(|r| &r.scope_profiles)
            .flat_map(|s| &s.profiles)
            .any(|p| {
                let st = p.sample_type.as_ref().unwrap();
                text(st.type_strindex) == "off_cpu"
                    && text(st.unit_strindex) == "nanoseconds"
                    && p.period_type.is_none()
                    && p.samples.iter().map(|s| s.values[0]).sum::<i64>() > 0
            })
    });
    assert!(found, "no off_cpu profile over OTLP");
    rt.block_on(async {
        server.stop().await;
        otlp_server.stop().await;
    });
}

#[test]
fn off_cpu_flags_without_off_cpu_are_one_line_errors() {
    for (flags, needle) in [
        (
            &["--off-cpu-min-block", "1ms"][..],
            "--off-cpu-min-block needs --off-cpu",
        ),
        (
            &["--off-cpu-state", "blocked"][..],
            "--off-cpu-state needs --off-cpu",
        ),
        (&["--off-cpu", "--off-cpu-max-rate", "0"][..], "at least 1"),
        (&["--off-cpu", "--off-cpu-min-block", "soon"][..], "soon"),
    ] {
        let mut args = vec!["record", "-d", "1s", "--pid", "1"];
        args.extend(flags);
        let out = profiler(&args);
        assert_one_line_error(&out, 2, &[needle]);
    }
    let out = profiler(&[
        "agent",
        "--pyroscope-url",
        "http://127.0.0.1:1",
        "--off-cpu-state",
        "blocked",
    ]);
    assert_one_line_error(&out, 2, &["--off-cpu-state needs --off-cpu"]);

    // A kernel whose BTF has what on-CPU sampling needs but no sched_switch tracepoint.
    let Some(t) = bpf_test() else { return };
    let btf = t.path("vmlinux");
    std::fs::write(&btf, btf_without_sched_switch()).unwrap();
    let me = std::process::id().to_string();
    let out = Command::new(profiler_bin())
        .args(["record", "--off-cpu", "-d", "1s", "--pid", &me, "-o"])
        .arg(t.path("never.pb.gz"))
        .env("PROFILER_VMLINUX_BTF", &btf)
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        1,
        &["--off-cpu needs the BTF tracepoint sched_switch"],
    );
    assert!(!t.path("never.pb.gz").exists());
}

/// A BTF blob declaring `struct task_struct` with the members the loader reads, and nothing
/// else: no `btf_trace_sched_switch`.
fn btf_without_sched_switch() -> Vec<u8> {
    let strings = b"\0int\0task_struct\0pid\0tgid\0group_leader\0start_boottime\0";
    let at = |name: &str| {
        let needle = format!("\0{name}\0");
        strings
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap() as u32
            + 1
    };
    let mut types: Vec<u32> = vec![at("int"), 1 << 24, 4, 32];
    types.extend([at("task_struct"), (4 << 24) | 4, 64]);
    for (member, byte) in [
        ("pid", 0),
        ("tgid", 4),
        ("group_leader", 8),
        ("start_boottime", 16),
    ] {
        types.extend([at(member), 1, byte * 8]);
    }
    let types: Vec<u8> = types.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut blob = Vec::new();
    blob.extend(0xeb9fu16.to_ne_bytes());
    blob.extend([1u8, 0]);
    let (types_len, strings_len) = (types.len() as u32, strings.len() as u32);
    for word in [24u32, 0, types_len, types_len, strings_len] {
        blob.extend(word.to_ne_bytes());
    }
    blob.extend(types);
    blob.extend(strings);
    blob
}

/// A gzipped pprof, decoded.
fn decode(raw: &[u8]) -> Profile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.pb.gz");
    std::fs::write(&path, raw).unwrap();
    load_pprof(&path)
}

/// Sets `kernel.pid_max` for as long as it lives, and puts the old value back when dropped
/// (a failed assertion included).
struct PidMax(String);

impl PidMax {
    const PATH: &str = "/proc/sys/kernel/pid_max";

    fn set(value: u32) -> PidMax {
        let old = std::fs::read_to_string(Self::PATH).unwrap();
        std::fs::write(Self::PATH, value.to_string()).unwrap();
        PidMax(old.trim().to_string())
    }
}

impl Drop for PidMax {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

#[test]
fn a_process_whose_pid_is_past_pid_max_at_start_is_still_profiled() {
    let Some(t) = bpf_test() else { return };
    // The filter marks and the blocked flags are arrays sized from pid_max when the programs
    // load; pid_max raised afterwards makes pids past them, which take the hashes behind the
    // arrays. Here the workload's pid is past a pid_max lowered while the profiler starts.
    const LOWERED: u32 = 1024;
    let spawn = || {
        Command::new(offcpu_workload())
            .args(["sleep", "120"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut workload = spawn();
    while workload.id() < 2 * LOWERED {
        // Pids just wrapped around: move past the lowered bound.
        let _ = workload.kill();
        let _ = workload.wait();
        for _ in 0..64 {
            let _ = Command::new("true").status();
        }
        workload = spawn();
    }
    let pid = workload.id().to_string();
    let out = t.path("past.pb.gz");
    let lowered = PidMax::set(LOWERED);
    let mut recorder = Command::new(profiler_bin())
        .args(["record", "-F", "499", "-d", "4s", "--off-cpu"])
        .args(["--off-cpu-state", "blocked", "--pid", &pid, "-o"])
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_sampling(recorder.id());
    drop(lowered);
    let stderr = std::io::read_to_string(recorder.stderr.take().unwrap()).unwrap();
    assert!(recorder.wait().unwrap().success(), "{stderr}");
    let _ = workload.kill();
    let _ = workload.wait();

    let profile = load_pprof(&out);
    let on_cpu = samples_of(&profile, "samples");
    let spinning = chain_share(&on_cpu, &["spin_phase", "main"]);
    assert!(
        spinning >= 80.0,
        "{spinning:.1}% on CPU in spin_phase; {stderr}"
    );
    let off_cpu = samples_of(&profile, "offcpu");
    let share_of_wall = 100.0 * total(&off_cpu) as f64 / profile.duration_nanos as f64;
    assert!(
        (50.0..=85.0).contains(&share_of_wall),
        "off CPU {share_of_wall:.1}% of wall time; {stderr}"
    );
    assert!(chain_share(&off_cpu, &["schedule"]) >= 90.0, "{off_cpu:?}");
}

#[test]
fn the_first_block_on_each_cpu_is_recorded() {
    let Some(t) = bpf_test() else { return };
    // The stack maps allocate their elements from per-CPU caches that the kernel refills only
    // with interrupts on; a switch-out stores two stacks with them off. Unless the profiler
    // fills those caches before it attaches, the first switch-out on each CPU is lost, and a
    // process that blocks once, as `sleep` does, has no off-CPU time at all. A sampling
    // frequency of 1 Hz keeps samples from refilling the cache first.
    let out = t.path("first.pb.gz");
    let stderr = profiler_ok(&[
        "record",
        "-F",
        "1",
        "--off-cpu",
        "--unwinder",
        "fp",
        "-o",
        path_str(&out),
        "--",
        "sleep",
        "1",
    ]);
    assert!(stderr.contains(" 0 lost"), "{stderr}");
    let profile = load_pprof(&out);
    let off_cpu = samples_of(&profile, "offcpu");
    let seconds = total(&off_cpu) as f64 / 1e9;
    assert!(
        (0.95..=1.5).contains(&seconds),
        "{seconds:.2}s off CPU; {stderr}"
    );
    assert!(chain_share(&off_cpu, &["schedule"]) >= 90.0, "{off_cpu:?}");
}
