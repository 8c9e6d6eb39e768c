//! The per-sample cost of the sampling program, with every CPU busy running user code (idle
//! samples are nearly free and hide the walk): `--unwinder auto` and `--unwinder fp` beside
//! bpftrace's `ustack, kstack` profile, on the same 9-frame program built frameless and with
//! frame pointers. The time is the kernel's own BPF statistics (run_time_ns / run_cnt), which
//! charge tail-called walker programs to the sampling program that called them.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::Result;

use super::{compile_c, median, micros_per_run, row, Config, KillOnDrop, Row, Setup};

/// One build of the unwinder's test program.
struct Build {
    name: &'static str,
    flags: &'static [&'static str],
}

const BUILDS: [Build; 2] = [
    Build {
        name: "frameless -O2",
        flags: &["-O2", "-fomit-frame-pointer"],
    },
    Build {
        name: "frame pointers -O2",
        flags: &["-O2", "-fno-omit-frame-pointer"],
    },
];

pub(super) fn sample_cost(
    setup: &Setup,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let Setup {
        plan,
        peers,
        sink,
        dir,
        ..
    } = setup;
    let (rounds, seconds) = plan.sample_cost;
    let cpus = thread::available_parallelism().map_or(2, |n| n.get());
    let mut configs = vec![Config::Unwinder(99, "auto"), Config::Unwinder(99, "fp")];
    if peers.bpftrace {
        configs.push(Config::Bpftrace(99));
    }
    for build in &BUILDS {
        let program = compile(dir, build)?;
        let spinners: Vec<Child> = (0..cpus)
            .map(|_| Command::new(&program).stdout(Stdio::null()).spawn())
            .collect::<std::io::Result<_>>()?;
        let _spinners = KillOnDrop(spinners);
        let mut per_sample: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        for round in 0..rounds {
            for (i, config) in configs.iter().enumerate() {
                eprintln!(
                    "bench: sample cost round {} {} on {}",
                    round + 1,
                    config.label(),
                    build.name
                );
                let running = config.start(dir, sink)?.expect("not Nothing");
                let before = running.bpf_stats();
                thread::sleep(Duration::from_secs(seconds));
                let after = running.bpf_stats();
                running.stop()?;
                per_sample[i].extend(micros_per_run(&before, &after, "perf_event"));
            }
        }
        let peer = peers
            .bpftrace
            .then(|| median(&per_sample[configs.len() - 1]));
        for (config, times) in configs.iter().zip(&per_sample) {
            let label = format!("{} on {}", config.label(), build.name);
            rows.push(row(
                "sample cost",
                label.clone(),
                "BPF time per sample",
                "µs",
                times,
            ));
            if let (Some(peer), Config::Unwinder(..)) = (peer, config) {
                let ratio = median(times) / peer;
                rows.push(Row::single(
                    "sample cost",
                    label,
                    "ratio to bpftrace",
                    "×",
                    ratio,
                ));
            }
        }
    }
    notes.push(format!(
        "sample cost: {cpus} spinning copies of profiler-unwind's frames.c (9 user frames), one \
         per CPU, {rounds} round(s) of {seconds} s per configuration"
    ));
    Ok(())
}

fn compile(dir: &Path, build: &Build) -> Result<PathBuf> {
    let name = format!("frames-{}", build.flags[1].trim_start_matches("-f"));
    compile_c(
        dir,
        &name,
        "profiler-unwind/tests/testdata/frames.c",
        build.flags,
    )
}
