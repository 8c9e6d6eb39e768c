//! Stage: what off-CPU profiling costs on a switch storm: a pipe ping-pong between two threads
//! (tests/workloads/offcpu.c `storm`), both pinned to CPU 0.
//!
//! Pinned, every switch goes from one thread straight to the other: the program's cost lands on
//! the workload's critical path and nowhere else. Unpinned, each wake-up crosses CPUs and idle
//! states, and a program in the switch path changes their timing more than its own cost shows
//! (on these VMs the ping-pong ran faster with a profiler attached).
//!
//! Two parts, in interleaved rounds:
//! - slowdown: the storm under `profiler record --off-cpu` with each unwinder at the defaults,
//!   under the profiler recording another process (what the switch program costs when it
//!   records nothing: the floor under any program there), and under libbpf-tools `offcputime`,
//!   which records every switch-out; with the kernel's BPF statistics off (they cost two clock
//!   reads per run), at two paces: as fast as it goes, and about 200,000 switches a second.
//!   Each watched run lies between two runs of the storm alone and is compared with their
//!   mean, and the watchers run on the other CPUs;
//! - BPF time per switch (`kernel.bpf_stats_enabled`): each of those configurations alone (and
//!   that time as a share of the CPU, which the noise of the slowdown rounds cannot hide), and
//!   our recorder with every switch-out recorded beside libbpf-tools `offcputime`
//!   (frame-pointer stacks) attached at once, so that both see the same switches. The one
//!   attached first runs first and meets the cold caches, so the order alternates by round.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    bpf_prog_stats, compile_c, count_before, cpu_seconds, interrupt, row, set_bpf_stats,
    spawn_watcher, works, Row, Setup,
};
use crate::profiler_bin;

/// Who watches the ping-pong.
#[derive(Clone, Copy)]
enum Watcher {
    /// `--unwinder`, and `--off-cpu-max-rate` when not the default (which samples a storm).
    Profiler(&'static str, Option<&'static str>),
    /// The profiler recording another process (this one): its switch program runs on every
    /// switch of the storm and records none. What any program there costs, and ours the least.
    Elsewhere,
    Offcputime,
}

impl Watcher {
    fn label(self) -> String {
        match self {
            Watcher::Profiler(unwinder, None) => {
                format!("profiler record --off-cpu --unwinder {unwinder}")
            }
            Watcher::Profiler(unwinder, Some(rate)) => {
                format!("profiler record --off-cpu --unwinder {unwinder} --off-cpu-max-rate {rate}")
            }
            Watcher::Elsewhere => {
                "profiler record --off-cpu --unwinder fp, another process recorded".into()
            }
            Watcher::Offcputime => "libbpf-tools offcputime".into(),
        }
    }

    /// Starts watching `pid` and returns once its switch program runs.
    fn start(self, pid: u32, dir: &Path) -> Result<Child> {
        let recorder = |unwinder: &str, target: u32, out: &str| {
            let mut c = off_the_storm(profiler_bin());
            c.args(["record", "--off-cpu", "--unwinder", unwinder, "-o"])
                .arg(dir.join(out))
                .args(["--pid", &target.to_string()]);
            c
        };
        let mut command = match self {
            Watcher::Profiler(unwinder, rate) => {
                let mut c = recorder(unwinder, pid, &format!("offcpu-{unwinder}.pb.gz"));
                if let Some(rate) = rate {
                    c.args(["--off-cpu-max-rate", rate]);
                }
                c
            }
            Watcher::Elsewhere => recorder("fp", std::process::id(), "offcpu-elsewhere.pb.gz"),
            Watcher::Offcputime => {
                let mut c = off_the_storm("offcputime".into());
                c.args(["-p", &pid.to_string()]);
                c
            }
        };
        let child = spawn_watcher(&mut command, &self.label())?;
        // Attached once its switch program has run a few thousand times (the ping-pong is
        // not going yet, but the machine switches all the time; the profiler's fork, exec and
        // exit programs, attached earlier, run far less). Counting runs needs the statistics.
        set_bpf_stats(true)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while switch_stats(child.id()).1 < 2000 {
            if Instant::now() > deadline {
                bail!("{} never attached", self.label());
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Attached is not settled: the profiler attaches its switch program before it loads its
        // sampler, then reads the target's mappings (and builds its tables). By hand, a storm
        // begun 0.3 s after the attach ran twice the steady slowdown, one begun after 3 s the
        // steady one, which is what a running profiler costs.
        loop {
            let before = cpu_seconds(child.id());
            thread::sleep(Duration::from_millis(500));
            if cpu_seconds(child.id()) - before <= SETTLED_CPU_SECONDS {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} never settled", self.label());
            }
        }
        Ok(child)
    }

    fn stop(self, mut child: Child) -> Result<()> {
        let ours = !matches!(self, Watcher::Offcputime);
        let err = interrupt(&mut child, &self.label(), ours)?;
        if ours {
            eprintln!("bench: {}", err.lines().last().unwrap_or(""));
        }
        Ok(())
    }
}

/// At most this much CPU in half a second (2 %): a watcher done starting.
const SETTLED_CPU_SECONDS: f64 = 0.01;

/// (run_time_ns, run_cnt) of a process's BPF programs other than perf_event ones (samplers):
/// its switch programs (`tp_btf` or raw tracepoint, whichever the tool uses), tail calls
/// included in their callers' time.
fn switch_stats(pid: u32) -> (u64, u64) {
    bpf_prog_stats(pid)
        .into_iter()
        .filter(|(kind, _)| kind != "perf_event")
        .fold((0, 0), |(t, n), (_, (time, runs))| (t + time, n + runs))
}

/// `program` to run on every CPU but the storm's (CPU 0), where one exists: the storm's
/// slowdown is then the switch path's cost, which runs on its CPU, and not the recorder's
/// user-space work (start-up, table building, drains) taking turns with it there. That work is
/// measured by the agent rows.
fn off_the_storm(program: PathBuf) -> Command {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return Command::new(program);
    }
    let mut command = Command::new("taskset");
    command
        .args(["-c", &format!("1-{}", cpus - 1)])
        .arg(program);
    command
}

/// A `--off-cpu-max-rate` no storm reaches: no sampling.
const EVERY_SWITCH: &str = "100000000";

/// Compiles the workload with frame pointers (offcputime's stacks need them).
fn compile(dir: &Path) -> Result<PathBuf> {
    compile_c(
        dir,
        "offcpu",
        "tests/workloads/offcpu.c",
        &["-O1", "-pthread", "-fno-omit-frame-pointer"],
    )
}

/// One storm of `seconds` on CPU 0 while `watchers` (started in this order) watch it, with the
/// BPF statistics on or off meanwhile. Returns the switches per second (two switch-outs a
/// round, one per thread) and each watcher's BPF ns per run of its switch programs.
fn storm(
    workload: &Path,
    seconds: u64,
    pace: Pace,
    watchers: &[Watcher],
    stats: bool,
    dir: &Path,
) -> Result<(f64, Vec<f64>)> {
    let mut pingpong = Command::new("taskset")
        .args(["-c", "0"])
        .arg(workload)
        .args(["storm", &seconds.to_string(), "wait", pace.spin_us])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running the ping-pong under taskset")?;
    let mut watching = Vec::new();
    for watcher in watchers {
        watching.push((*watcher, watcher.start(pingpong.id(), dir)?));
    }
    set_bpf_stats(stats)?;
    let before: Vec<_> = watching.iter().map(|(_, c)| switch_stats(c.id())).collect();
    let started = Instant::now();
    pingpong.stdin.take().unwrap().write_all(b"\n")?;
    let mut out = String::new();
    pingpong.stdout.take().unwrap().read_to_string(&mut out)?;
    pingpong.wait()?;
    let wall = started.elapsed().as_secs_f64();
    let rounds: f64 = out.trim().parse().context("the workload's round count")?;
    let mut per_run = Vec::new();
    for ((watcher, child), (t0, n0)) in watching.into_iter().zip(before) {
        let (t1, n1) = switch_stats(child.id());
        per_run.push(match n1 > n0 {
            true => t1.saturating_sub(t0) as f64 / (n1 - n0) as f64,
            false => f64::NAN,
        });
        watcher.stop(child)?;
    }
    set_bpf_stats(true)?;
    Ok((2.0 * rounds / wall, per_run))
}

/// How fast the ping-pong goes: its work per message (fractional microseconds of spinning).
#[derive(Clone, Copy)]
struct Pace {
    spin_us: &'static str,
    label: &'static str,
}

/// As fast as the machine switches (about 370,000 a second here), and about 200,000 a second
/// (the rate the issue names) with 2 us of work a message.
const PACES: [Pace; 2] = [
    Pace {
        spin_us: "0",
        label: "",
    },
    Pace {
        spin_us: "2",
        label: ", 2 us of work a message",
    },
];

/// Runs the stage: `setup.plan.runs` interleaved rounds of `seconds` each per configuration.
pub(super) fn offcpu(setup: &Setup, seconds: u64, rows: &mut Vec<Row>) -> Result<()> {
    let workload = compile(&setup.dir)?;
    let dir = &setup.dir;
    let defaults = [
        Watcher::Profiler("fp", None),
        Watcher::Profiler("auto", None),
    ];
    let every = Watcher::Profiler("fp", Some(EVERY_SWITCH));
    let peer = works("offcputime");
    if !peer {
        eprintln!(
            "bench: offcputime (Debian libbpf-tools) is missing; `cargo xtask setup` installs it"
        );
    }
    // The peer slows the same storm too: it records every switch-out, with frame pointers.
    let slowing: Vec<Watcher> = defaults
        .iter()
        .copied()
        .chain([Watcher::Elsewhere])
        .chain(peer.then_some(Watcher::Offcputime))
        .collect();
    let empty = || vec![Vec::new(); defaults.len()];
    let mut alone: Vec<Vec<f64>> = vec![Vec::new(); PACES.len()];
    let mut watched: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); slowing.len()]; PACES.len()];
    let mut slowdown = watched.clone();
    let (mut cost, mut share) = (empty(), empty());
    let (mut ours_every, mut theirs, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let full_speed = PACES[0];
    for round in 0..setup.plan.runs {
        eprintln!("bench: off-CPU storm round {}", round + 1);
        for (p, pace) in PACES.iter().enumerate() {
            // Each watched run between two runs alone, and compared with their mean: the host
            // drifts over minutes by more than the cost, and nearly linearly over seconds.
            let mut before = storm(&workload, seconds, *pace, &[], false, dir)?.0;
            alone[p].push(before);
            for (i, watcher) in slowing.iter().enumerate() {
                let switches = storm(&workload, seconds, *pace, &[*watcher], false, dir)?.0;
                let after = storm(&workload, seconds, *pace, &[], false, dir)?.0;
                watched[p][i].push(switches);
                slowdown[p][i].push(100.0 * ((before + after) / 2.0 / switches - 1.0));
                alone[p].push(after);
                before = after;
            }
        }
        for (i, watcher) in defaults.iter().enumerate() {
            let (switches, per_run) =
                storm(&workload, seconds, full_speed, &[*watcher], true, dir)?;
            cost[i].push(per_run[0]);
            // One run per switch, all on the one CPU: the share of its time the program took,
            // the part of the slowdown that the round-to-round noise cannot hide.
            share[i].push(100.0 * per_run[0] * switches / 1e9);
        }
        if peer {
            // Both orders each round: whichever is attached first meets the cold caches.
            let (mut ours, mut other) = (0.0, 0.0);
            for order in [[every, Watcher::Offcputime], [Watcher::Offcputime, every]] {
                let per_run = storm(&workload, seconds, full_speed, &order, true, dir)?.1;
                let ours_first = matches!(order[0], Watcher::Profiler(..));
                ours += per_run[usize::from(!ours_first)];
                other += per_run[usize::from(ours_first)];
            }
            ours_every.push(ours / 2.0);
            theirs.push(other / 2.0);
            ratio.push(ours / other);
        } else {
            ours_every.push(storm(&workload, seconds, full_speed, &[every], true, dir)?.1[0]);
        }
    }
    let stage = "off-CPU (pinned)";
    for (p, pace) in PACES.iter().enumerate() {
        let nothing = format!("nothing{}", pace.label);
        rows.push(row(stage, nothing, "switches", "1/s", &alone[p]));
        for (i, watcher) in slowing.iter().enumerate() {
            let label = format!("{}{}", watcher.label(), pace.label);
            rows.push(row(stage, label.clone(), "switches", "1/s", &watched[p][i]));
            rows.push(row(
                stage,
                label,
                "slowdown vs nothing",
                "%",
                &slowdown[p][i],
            ));
        }
    }
    for (i, watcher) in defaults.iter().enumerate() {
        let label = watcher.label();
        rows.push(row(
            stage,
            label.clone(),
            "BPF time per switch",
            "ns",
            &cost[i],
        ));
        rows.push(row(
            stage,
            label,
            "BPF time, share of the CPU",
            "%",
            &share[i],
        ));
    }
    let label = match peer {
        true => format!("{}, offcputime attached too", every.label()),
        false => every.label(),
    };
    rows.push(row(stage, label, "BPF time per switch", "ns", &ours_every));
    if peer {
        let label = format!("{}, ours attached too", Watcher::Offcputime.label());
        rows.push(row(stage, label, "BPF time per switch", "ns", &theirs));
        rows.push(row(
            stage,
            format!("{} / offcputime", every.label()),
            "BPF time per switch, ratio (both orders)",
            "x",
            &ratio,
        ));
    }
    Ok(())
}

/// Thresholds of the min-block stage (`--off-cpu-min-block`).
const MIN_BLOCKS: [&str; 5] = ["0", "1us", "10us", "100us", "1ms"];

/// Stage: what `--off-cpu-min-block` leaves out, to choose its default. Each workload of known
/// blocks (tests/workloads/offcpu.c: `sleep` 30 ms, `mutex` about 2 ms, `pipe` about 50 us,
/// `storm` a few us) is recorded once per threshold; the rows are the off-CPU time kept, as a
/// share of what threshold 0 records, and the blocks left out per second.
pub(super) fn min_block(setup: &Setup, seconds: u64, rows: &mut Vec<Row>) -> Result<()> {
    let workload = compile(&setup.dir)?;
    let out = setup.dir.join("min-block.folded");
    // The smoke run (one run a stage) only checks that the stage works.
    let (modes, thresholds) = match setup.plan.runs {
        1 => (&["storm"][..], &MIN_BLOCKS[..2]),
        _ => (&["sleep", "mutex", "pipe", "storm"][..], &MIN_BLOCKS[..]),
    };
    for &mode in modes {
        let mut baseline = None;
        for &min in thresholds {
            eprintln!("bench: off-CPU min block {min} on {mode}");
            let output = Command::new(profiler_bin())
                .args(["record", "--off-cpu", "--unwinder", "fp"])
                .args(["--off-cpu-min-block", min, "-o"])
                .arg(&out)
                .arg("--")
                .arg(&workload)
                .args([mode, &seconds.to_string()])
                .stdout(Stdio::null())
                .output()?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !output.status.success() {
                bail!("record --off-cpu of {mode} failed: {stderr}");
            }
            let off_cpu_ns: f64 = std::fs::read_to_string(&out)?
                .lines()
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum();
            let base = *baseline.get_or_insert(off_cpu_ns);
            let left_out = count_before(&stderr, "shorter").unwrap_or(0) as f64;
            let config = format!("{mode}, --off-cpu-min-block {min}");
            let kept = if base > 0.0 {
                100.0 * off_cpu_ns / base
            } else {
                0.0
            };
            rows.push(row(
                "off-CPU min block",
                config.clone(),
                "off-CPU time kept",
                "%",
                &[kept],
            ));
            rows.push(row(
                "off-CPU min block",
                config,
                "blocks left out",
                "1/s",
                &[left_out / seconds as f64],
            ));
        }
    }
    Ok(())
}
