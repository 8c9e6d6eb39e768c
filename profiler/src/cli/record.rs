//! `profiler record`: samples until the duration ends, a signal arrives, or the targets exit,
//! then writes one profile and prints a summary.

use std::{
    ffi::OsString,
    fs::File,
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::Args;
use tokio::{
    process::Child,
    signal::unix::{signal, SignalKind},
};

use super::{
    parse_duration, parse_min_block, privileges::require_capabilities, raise_fd_limit, Exit,
};
use crate::{
    aggregate::{ProfileBuilder, Values},
    collect::{
        CollectConfig, Collector, Counters, OffCpuConfig, OffCpuState, Targets, Unwinder,
        DEFAULT_OFF_CPU_MAX_RATE, DEFAULT_OFF_CPU_MIN_BLOCK,
    },
    export::{self, Format},
    resolve::{is_alive, PerfMapStats, Resolver},
};

/// How often the kernel maps are drained.
const DRAIN_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Args, Debug)]
pub struct RecordArgs {
    /// Process to record (repeatable); what it forks is recorded too.
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Record every process on the machine.
    #[arg(short = 'a', long, conflicts_with_all = ["pids", "command"])]
    all: bool,
    /// Samples per second on each CPU (1 to 10000).
    #[arg(short = 'F', long, value_name = "HZ", default_value_t = 99,
          value_parser = clap::value_parser!(u64).range(1..=10000))]
    frequency: u64,
    /// Stop after this long: 500ms, 10s, 2m.
    #[arg(short = 'd', long, value_name = "DUR", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Where to write the profile.
    #[arg(
        short = 'o',
        long,
        value_name = "PATH",
        default_value = "profile.pb.gz"
    )]
    output: PathBuf,
    /// pprof, folded or svg; by default from the output's extension (.svg, .folded/.txt, else pprof).
    #[arg(long, value_name = "F")]
    format: Option<Format>,
    /// Leave kernel frames out.
    #[arg(long)]
    no_kernel: bool,
    /// Extra directory of separate debug info (.build-id/ or debug-link files); repeatable.
    #[arg(long = "debug-dir", value_name = "DIR")]
    debug_dirs: Vec<PathBuf>,
    /// How user stacks are unwound: `auto` (.eh_frame tables where they cover a pc, a
    /// frame-pointer step elsewhere) or `fp` (frame pointers only).
    #[arg(long, value_enum, value_name = "U", default_value_t = Unwinder::default())]
    unwinder: Unwinder,
    /// Kernel memory for unwind tables (`--unwinder auto`): 16MiB, 512KiB, or bytes.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = super::diff::parse_size)]
    unwind_table_memory: u64,
    /// Longest one binary's symbols or unwind table may take to read; a binary past it is
    /// skipped (its frames show as file+0xADDR) and counted.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = super::parse_duration)]
    parse_timeout: std::time::Duration,
    /// Record off-CPU time too (where threads wait), as sample type `offcpu` (nanoseconds),
    /// the file's default; folded and SVG output show it. On-CPU samples stay in the file
    /// (`go tool pprof -sample_index=cpu`).
    #[arg(long)]
    off_cpu: bool,
    /// Leave out blocks shorter than this (counted as offcpu_short_blocks): 1us, 1ms, 0
    /// [default: 1us].
    #[arg(long, value_name = "DUR", value_parser = parse_min_block)]
    off_cpu_min_block: Option<Duration>,
    /// Which switch-outs count as off-CPU: any (preemption included), blocked (waits and
    /// sleeps), uninterruptible (D state) [default: any].
    #[arg(long, value_enum, value_name = "S")]
    off_cpu_state: Option<OffCpuState>,
    /// Switch-outs recorded per second on each CPU before sampling starts: a CPU that switches
    /// faster records one in 2, 4, ... at random, each weighted to stand for the others
    /// (offcpu_sampled_out); a burst past it before the rate adapts is dropped and counted
    /// (offcpu_rate_limited) [default: 2000].
    #[arg(long, value_name = "N")]
    off_cpu_max_rate: Option<u64>,
    /// Command to start and record, with its arguments, after `--`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// What ended the recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Duration,
    Signal,
    TargetsExited,
}

impl Stop {
    /// The reason as the summary states it.
    fn reason(self) -> &'static str {
        match self {
            Stop::Duration => "duration reached",
            Stop::Signal => "interrupted",
            Stop::TargetsExited => "targets exited",
        }
    }
}

/// Records, writes the profile, and returns the exit code: CMD's with `-- CMD`, else 0.
pub async fn run(args: RecordArgs) -> Result<u8> {
    if args.pids.is_empty() && !args.all && args.command.is_empty() {
        return Err(Exit::usage(
            "nothing to record: give --pid PID, --all, or a command after --",
        ));
    }
    off_cpu_config(
        args.off_cpu,
        args.off_cpu_min_block,
        args.off_cpu_state,
        args.off_cpu_max_rate,
    )
    .map_err(Exit::usage)?;
    // Opened without truncating, so that a recording that fails to start destroys nothing.
    let existed = args.output.exists();
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&args.output)
        .map_err(|e| Exit::usage(format!("cannot write {}: {e}", args.output.display())))?;
    let result = record(&args, output).await;
    if result.is_err() && !existed {
        let _ = std::fs::remove_file(&args.output);
    }
    result
}

async fn record(args: &RecordArgs, output: File) -> Result<u8> {
    let format = args
        .format
        .unwrap_or_else(|| Format::from_path(&args.output));
    for pid in &args.pids {
        if !is_alive(*pid) {
            return Err(Exit::usage(format!("no process with pid {pid}")));
        }
    }
    require_capabilities()?;
    raise_fd_limit();

    let targets = if args.all {
        Targets::All
    } else {
        Targets::Pids(args.pids.clone())
    };
    let config = CollectConfig {
        targets,
        frequency: args.frequency,
        kernel_stacks: !args.no_kernel,
        unwinder: args.unwinder,
        unwind_table_memory: args.unwind_table_memory,
        parse_timeout: args.parse_timeout,
        debug_dirs: args.debug_dirs.clone(),
        off_cpu: off_cpu_config(
            args.off_cpu,
            args.off_cpu_min_block,
            args.off_cpu_state,
            args.off_cpu_max_rate,
        )
        .map_err(Exit::usage)?,
        ..Default::default()
    };
    // Before the programs load (a second or two, mostly verifying the stack walker), so that a
    // Ctrl-C meanwhile still ends in a written profile rather than the default kill.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut collector = Collector::start(&config)?;
    let mut resolver = Resolver::new(&args.debug_dirs);
    resolver.set_parse_timeout(args.parse_timeout);
    let values = match args.off_cpu {
        true => Values::OnAndOffCpu,
        false => Values::OnCpu,
    };
    let mut builder = ProfileBuilder::new(args.frequency).values(values);
    let started = Instant::now();

    let mut child = match args.command.split_first() {
        Some((program, rest)) => Some(spawn(&mut collector, program, rest)?),
        None => None,
    };
    let mut child_status: Option<u8> = None;

    let events = collector.events()?;
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let progress = std::io::stderr().is_terminal();
    let watch_targets = !args.all;

    let stop = loop {
        let sleep_until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let child_exit = async {
            match child.as_mut() {
                Some(c) => c.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep_until_deadline => break Stop::Duration,
            _ = interrupt.recv() => break Stop::Signal,
            _ = terminate.recv() => break Stop::Signal,
            status = child_exit => {
                child_status = Some(exit_code(status?));
                child = None;
            }
            guard = events.readable() => {
                let mut guard = guard?;
                guard.clear_ready();
                take_changes(&mut collector, &mut resolver);
            }
            _ = tick.tick() => {
                take_changes(&mut collector, &mut resolver);
                let samples = collector.drain()?;
                builder.add(&resolver.resolve(&samples));
                // Ended processes' last samples are in: forget them and close their binaries.
                resolver.forget_ended(collector.flips());
                if progress {
                    show_progress(started, &collector.counters()?);
                }
                if watch_targets && child.is_none() && !any_target_alive(&mut collector) {
                    break Stop::TargetsExited;
                }
            }
        }
    };
    if progress {
        eprint!("\r\x1b[2K");
    }

    // Samples of processes announced but not yet observed still need their mappings.
    take_changes(&mut collector, &mut resolver);
    let samples = collector.drain_all()?;
    builder.add(&resolver.resolve(&samples));
    let elapsed = started.elapsed();
    let profile = builder.build(elapsed.as_nanos() as i64);
    output.set_len(0).context("truncating the output")?;
    export::write(&profile, format, output)
        .with_context(|| format!("writing {}", args.output.display()))?;

    let counters = collector.counters()?;
    let summary = Summary {
        stop,
        elapsed,
        format,
        processes: resolver.stats().processes_seen as usize,
        perf_maps: resolver.stats().perf_maps,
    };
    if progress {
        print_summary(args, &summary, &profile, &counters);
    } else {
        eprintln!("{}", summary_line(args, &summary, &profile, &counters));
    }
    let go_errors = resolver.stats().gopclntab_errors;
    if go_errors > 0 {
        eprintln!("warning: {go_errors} corrupt Go function tables or look-ups in them (frames left as file+0xADDR)");
    }

    // With -- CMD, exit as CMD did; stopped early, wait for it unless it was signalled.
    if let Some(mut child) = child {
        if stop == Stop::Signal {
            let _ = child.start_kill();
        }
        child_status = Some(exit_code(child.wait().await?));
    }
    Ok(child_status.unwrap_or(0))
}

/// The off-CPU settings from the `--off-cpu*` flags (shared by `record` and the agent), or
/// why they do not go together.
pub(crate) fn off_cpu_config(
    enabled: bool,
    min_block: Option<Duration>,
    state: Option<OffCpuState>,
    max_rate: Option<u64>,
) -> Result<Option<OffCpuConfig>, String> {
    if !enabled {
        let given = [
            ("--off-cpu-min-block", min_block.is_some()),
            ("--off-cpu-state", state.is_some()),
            ("--off-cpu-max-rate", max_rate.is_some()),
        ];
        return match given.iter().find(|(_, set)| *set) {
            Some((flag, _)) => Err(format!("{flag} needs --off-cpu")),
            None => Ok(None),
        };
    }
    let max_rate = max_rate.unwrap_or(DEFAULT_OFF_CPU_MAX_RATE);
    if max_rate == 0 {
        return Err("--off-cpu-max-rate must be at least 1".into());
    }
    Ok(Some(OffCpuConfig {
        min_block: min_block.unwrap_or(DEFAULT_OFF_CPU_MIN_BLOCK),
        state: state.unwrap_or_default(),
        max_rate,
    }))
}

/// Takes in what the kernel said about processes (new ones are read from /proc at once).
fn take_changes(collector: &mut Collector, resolver: &mut Resolver) {
    let flips = collector.flips();
    for change in collector.process_changes() {
        resolver.apply(&change, flips);
    }
}

/// Starts CMD so that it and everything it forks are in the filter before they run: the
/// kernel follows forks of the profiler itself only for as long as the spawn takes.
fn spawn(collector: &mut Collector, program: &OsString, args: &[OsString]) -> Result<Child> {
    let me = std::process::id();
    collector.follow_children_of(me)?;
    let spawned = super::original_environment(&mut tokio::process::Command::new(program))
        .args(args)
        .spawn();
    collector.exclude(me)?;
    let child = spawned.map_err(|e| Exit {
        code: 127,
        message: format!("cannot start `{}`: {e}", program.to_string_lossy()),
    })?;
    if let Some(pid) = child.id() {
        // In case the fork was not seen (it always should be), include CMD explicitly.
        collector.include(pid)?;
    }
    Ok(child)
}

fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => 1,
    }
}

/// Whether any process in the filter is still running; drops exited ones from the filter.
fn any_target_alive(collector: &mut Collector) -> bool {
    let mut alive = false;
    for pid in collector.included() {
        if is_alive(pid) {
            alive = true;
        } else {
            collector.forget(pid);
        }
    }
    alive
}

fn show_progress(started: Instant, counters: &Counters) {
    use profiler_common::Counter;
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r\x1b[2Krecording {:.1}s  {} samples  {} lost",
        started.elapsed().as_secs_f64(),
        counters.get(Counter::Samples),
        counters.lost()
    );
    let _ = err.flush();
}

/// How a recording went, for the summary.
struct Summary {
    stop: Stop,
    elapsed: Duration,
    format: Format,
    processes: usize,
    perf_maps: PerfMapStats,
}

/// What both summaries start with: samples, processes, time, why it stopped, losses.
fn headline(
    args: &RecordArgs,
    summary: &Summary,
    profile: &profiler_proto::pprof::Profile,
    counters: &Counters,
) -> String {
    use profiler_common::Counter;
    let off_cpu = match args.off_cpu {
        true => {
            let index = export::shown_value(profile);
            let ns: i64 = profile.sample.iter().map(|s| s.value[index]).sum();
            let sampled_out = match counters.get(Counter::OffCpuSampledOut) {
                0 => String::new(),
                n => format!(" ({n} more switch-outs sampled out, their time estimated)"),
            };
            let short = match counters.get(Counter::OffCpuShortBlocks) {
                0 => String::new(),
                n => format!(" ({n} shorter than --off-cpu-min-block left out)"),
            };
            format!(
                " and {:.2}s off CPU in {} blocks{sampled_out}{short}",
                ns as f64 / 1e9,
                counters.get(Counter::OffCpuBlocks)
            )
        }
        false => String::new(),
    };
    format!(
        "recorded {} samples{off_cpu} from {} processes in {:.2}s at {} Hz ({}); {} lost",
        counters.get(Counter::Samples),
        summary.processes,
        summary.elapsed.as_secs_f64(),
        args.frequency,
        summary.stop.reason(),
        counters.lost(),
    )
}

/// The summary for a CI log (stderr is not a terminal): one line with what a failed job needs
/// to be understood — samples, losses by reason, why the recording stopped, where it went.
fn summary_line(
    args: &RecordArgs,
    summary: &Summary,
    profile: &profiler_proto::pprof::Profile,
    counters: &Counters,
) -> String {
    let losses: Vec<String> = counters
        .all()
        .iter()
        .filter(|(_, value, is_loss)| *is_loss && *value > 0)
        .map(|(name, value, _)| (*name, *value))
        .chain(counters.warnings().into_iter().filter(|(_, v)| *v > 0))
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    let losses = if losses.is_empty() {
        String::new()
    } else {
        format!(" ({})", losses.join(" "))
    };
    let jit = summary
        .perf_maps
        .describe()
        .map(|text| format!("; {text}"))
        .unwrap_or_default();
    format!(
        "{}{losses}{jit}; wrote {} ({})",
        headline(args, summary, profile, counters),
        args.output.display(),
        summary.format,
    )
}

/// The summary for a terminal: the counts, the ten most expensive functions, every counter and
/// the output path.
fn print_summary(
    args: &RecordArgs,
    summary: &Summary,
    profile: &profiler_proto::pprof::Profile,
    counters: &Counters,
) {
    let mut out = headline(args, summary, profile, counters);
    out.push('\n');
    out.push_str(&export::top_table(profile, 10));
    let counts: Vec<String> = counters
        .all()
        .iter()
        .map(|(name, value, _)| format!("{name}={value}"))
        .collect();
    out.push_str(&format!("counters: {}\n", counts.join(" ")));
    if let Some(text) = summary.perf_maps.describe() {
        out.push_str(&format!("{text}\n"));
    }
    out.push_str(&format!(
        "wrote {} ({})\n",
        args.output.display(),
        summary.format
    ));
    eprint!("{out}");
}
