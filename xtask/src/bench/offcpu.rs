//! Stage: what off-CPU profiling costs on a switch storm. A pipe ping-pong between two threads
//! (tests/workloads/offcpu.c `storm`) runs a fixed time alone, under `profiler record --off-cpu`
//! with each unwinder, and under libbpf-tools `offcputime` (frame-pointer stacks, in the same
//! run); the figures are its rounds per second (slowdown) and the BPF time per program run
//! from the kernel's statistics (`kernel.bpf_stats_enabled`).

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    bpf_prog_stats, compile_c, count_before, interrupt, median, row, spawn_watcher, works, Row,
    Setup,
};
use crate::profiler_bin;

/// Who watches the ping-pong.
#[derive(Clone, Copy)]
enum Watcher {
    Nothing,
    /// `--unwinder`, and `--off-cpu-max-rate` when not the default (which samples a storm).
    Profiler(&'static str, Option<&'static str>),
    Offcputime,
}

impl Watcher {
    fn label(self) -> String {
        match self {
            Watcher::Nothing => "nothing".into(),
            Watcher::Profiler(unwinder, None) => {
                format!("profiler record --off-cpu --unwinder {unwinder}")
            }
            Watcher::Profiler(unwinder, Some(rate)) => {
                format!("profiler record --off-cpu --unwinder {unwinder} --off-cpu-max-rate {rate}")
            }
            Watcher::Offcputime => "libbpf-tools offcputime".into(),
        }
    }

    /// Starts watching `pid`; None for `Nothing`.
    fn start(self, pid: u32, dir: &Path) -> Result<Option<Child>> {
        let mut command = match self {
            Watcher::Nothing => return Ok(None),
            Watcher::Profiler(unwinder, rate) => {
                let mut c = Command::new(profiler_bin());
                c.args(["record", "--off-cpu", "--unwinder", unwinder, "-o"])
                    .arg(dir.join("offcpu.pb.gz"))
                    .args(["--pid", &pid.to_string()]);
                if let Some(rate) = rate {
                    c.args(["--off-cpu-max-rate", rate]);
                }
                c
            }
            Watcher::Offcputime => {
                let mut c = Command::new("offcputime");
                c.args(["-p", &pid.to_string()]);
                c
            }
        };
        let child = spawn_watcher(&mut command, &self.label())?;
        // Attached once its switch program has run a few thousand times (the ping-pong is
        // not going yet, but the machine switches all the time; the profiler's fork, exec and
        // exit programs, attached earlier, run far less).
        let deadline = Instant::now() + Duration::from_secs(60);
        while switch_stats(child.id()).1 < 2000 {
            if Instant::now() > deadline {
                bail!("{} never attached", self.label());
            }
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_millis(300));
        Ok(Some(child))
    }
}

/// (run_time_ns, run_cnt) of a process's BPF programs other than perf_event ones (samplers):
/// its switch programs (`tp_btf` or raw tracepoint, whichever the tool uses), tail calls
/// included in their callers' time.
fn switch_stats(pid: u32) -> (u64, u64) {
    bpf_prog_stats(pid)
        .into_iter()
        .filter(|(kind, _)| kind != "perf_event")
        .fold((0, 0), |(t, n), (_, (time, runs))| (t + time, n + runs))
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

/// Runs the stage: `runs` interleaved rounds of `seconds` each per watcher.
pub(super) fn offcpu(setup: &Setup, seconds: u64, rows: &mut Vec<Row>) -> Result<()> {
    let workload = compile(&setup.dir)?;
    let mut watchers = vec![
        Watcher::Nothing,
        Watcher::Profiler("fp", None),
        Watcher::Profiler("auto", None),
        // Every switch-out recorded, as offcputime does: the cost per recorded event.
        Watcher::Profiler("fp", Some(EVERY_SWITCH)),
    ];
    if works("offcputime") {
        watchers.push(Watcher::Offcputime);
    } else {
        eprintln!(
            "bench: offcputime (Debian libbpf-tools) is missing; `cargo xtask setup` installs it"
        );
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); watchers.len()];
    let mut per_run: Vec<Vec<f64>> = vec![Vec::new(); watchers.len()];
    for round in 0..setup.plan.runs {
        for (i, watcher) in watchers.iter().enumerate() {
            eprintln!(
                "bench: off-CPU storm round {} {}",
                round + 1,
                watcher.label()
            );
            let mut pingpong = Command::new(&workload)
                .args(["storm", &seconds.to_string(), "wait"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let watching = watcher.start(pingpong.id(), &setup.dir)?;
            let before = watching.as_ref().map(|c| switch_stats(c.id()));
            let started = Instant::now();
            pingpong.stdin.take().unwrap().write_all(b"\n")?;
            let mut out = String::new();
            pingpong.stdout.take().unwrap().read_to_string(&mut out)?;
            pingpong.wait()?;
            let wall = started.elapsed().as_secs_f64();
            let rounds: f64 = out.trim().parse().context("the workload's round count")?;
            // Two switch-outs a round, one per thread.
            rates[i].push(2.0 * rounds / wall);
            if let (Some(mut child), Some((t0, n0))) = (watching, before) {
                let (t1, n1) = switch_stats(child.id());
                if n1 > n0 {
                    per_run[i].push(t1.saturating_sub(t0) as f64 / (n1 - n0) as f64);
                }
                let ours = matches!(watcher, Watcher::Profiler(..));
                let err = interrupt(&mut child, &watcher.label(), ours)?;
                if ours {
                    eprintln!("bench: {}", err.lines().last().unwrap_or(""));
                }
            }
        }
    }
    let baseline = median(&rates[0]);
    for (i, watcher) in watchers.iter().enumerate() {
        let label = watcher.label();
        rows.push(row("off-CPU", label.clone(), "switches", "1/s", &rates[i]));
        if i > 0 {
            let slowdown: Vec<f64> = rates[i]
                .iter()
                .map(|r| 100.0 * (baseline / r - 1.0))
                .collect();
            rows.push(row(
                "off-CPU",
                label.clone(),
                "slowdown vs nothing",
                "%",
                &slowdown,
            ));
        }
        if !per_run[i].is_empty() {
            rows.push(row(
                "off-CPU",
                label,
                "BPF time per switch",
                "ns",
                &per_run[i],
            ));
        }
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
