//! Stage: the agent over a node whose processes come and go. One long-running process plus
//! about twenty short-lived ones a second, for minutes; the agent's RSS is read every few
//! seconds, and what it grows by over the second half is the figure (per-process state that is
//! never pruned shows up there as a slope).

use std::{
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{map_memory_kib, memory_kib, Config, KillOnDrop, Memory, Row, Setup};

/// Short-lived processes started per second.
const SPAWNS_PER_SECOND: u64 = 20;

/// Runs the agent at 99 Hz for `seconds` under churn and adds its rows.
pub(super) fn churn(setup: &Setup, seconds: u64, rows: &mut Vec<Row>) -> Result<()> {
    let Setup {
        workload,
        sink,
        dir,
        ..
    } = setup;
    let long = Command::new(workload)
        .args(["duty", &(seconds + 60).to_string()])
        .spawn()?;
    let _long = KillOnDrop(vec![long]);
    let config = Config::Agent(99);
    eprintln!("bench: churn under {} for {seconds}s", config.label());
    let running = config.start(dir, sink)?.expect("not Nothing");
    let pid = running.pid();
    let started = Instant::now();
    let every = Duration::from_millis(1000 / SPAWNS_PER_SECOND);
    let probe = Duration::from_secs((seconds / 60).clamp(1, 10));
    let mut short: Vec<Child> = Vec::new();
    let mut rss = Vec::new();
    let mut next_probe = started;
    let mut spawned = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        short.push(Command::new(workload).args(["duty", "0.2"]).spawn()?);
        spawned += 1;
        short.retain_mut(|c| c.try_wait().ok().flatten().is_none());
        if Instant::now() >= next_probe {
            rss.push((started.elapsed().as_secs_f64(), memory_kib(pid).rss));
            next_probe += probe;
        }
        thread::sleep(every);
    }
    let maps = map_memory_kib(pid);
    let Memory {
        rss: steady, peak, ..
    } = memory_kib(pid);
    drop(KillOnDrop(short));
    running.stop()?;

    let half = seconds as f64 / 2.0;
    let at_half = rss
        .iter()
        .find(|(t, _)| *t >= half)
        .map_or(0, |(_, kib)| *kib);
    let growth = (steady as f64 - at_half as f64) / 1024.0;
    let label = format!(
        "{} under churn ({SPAWNS_PER_SECOND} exits/s, {spawned} processes in {seconds} s)",
        config.label()
    );
    let single = |metric, unit, value| Row::single("churn", label.clone(), metric, unit, value);
    rows.push(single("RSS growth over the second half", "MiB", growth));
    rows.push(single(
        "RSS at the end, mmapped maps apart",
        "MiB",
        steady as f64 / 1024.0,
    ));
    rows.push(single(
        "RSS peak, mmapped maps apart",
        "MiB",
        peak as f64 / 1024.0,
    ));
    rows.push(single("BPF map memory", "MiB", maps as f64 / 1024.0));
    rows.push(single(
        "footprint (RSS + BPF maps)",
        "MiB",
        (steady + maps) as f64 / 1024.0,
    ));
    Ok(())
}
