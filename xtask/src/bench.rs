//! `cargo xtask bench`: the profiler's overhead, memory and start-up, measured side by side
//! with `perf record` and bpftrace in one run, reported as medians and ratios because these
//! machines are noisy. Writes a markdown table and the raw numbers as JSON under bench/results/.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};

use super::{build_suite, profiler_bin, release_dir, run, suite_cargo, workspace_root};

mod churn;
mod offcpu;
mod sample_cost;

/// How much to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Everything, at the sizes the issue asks for (about 10 minutes).
    Full,
    /// A two-minute version.
    Quick,
    /// Every stage once, tiny: CI checks that the harness works and its output parses.
    Smoke,
    /// The off-CPU storm stage alone: the full run's rounds, with 4-second storms instead of
    /// 10 (about 11 minutes).
    OffCpu,
}

/// Sizes of each stage for a mode.
struct Plan {
    /// Runs of each configuration in the slowdown stage.
    runs: usize,
    /// Work units per CPU (about 1 ms each).
    units: u64,
    /// Seconds of the own-cost stage per configuration.
    own_cost_secs: u64,
    /// Seconds each configuration runs in the own-cost stage before its steady CPU is measured:
    /// start-up reads every process and builds tables once, which is not the steady cost.
    warmup_secs: u64,
    /// Live processes during the own-cost stage.
    processes: usize,
    /// Start-up measurements.
    startups: usize,
    /// Frequencies of the slowdown stage.
    frequencies: &'static [u64],
    /// Seconds of the churn stage.
    churn_secs: u64,
    /// Rounds and seconds per configuration of the per-sample cost stage.
    sample_cost: (usize, u64),
}

impl Mode {
    fn plan(self) -> Plan {
        match self {
            Mode::Full | Mode::OffCpu => Plan {
                runs: 5,
                units: 3000,
                own_cost_secs: 60,
                warmup_secs: 20,
                processes: 200,
                startups: 5,
                frequencies: &[19, 99, 999],
                churn_secs: 600,
                sample_cost: (3, 10),
            },
            Mode::Quick => Plan {
                runs: 3,
                units: 1500,
                own_cost_secs: 15,
                warmup_secs: 10,
                processes: 200,
                startups: 3,
                frequencies: &[99, 999],
                churn_secs: 120,
                sample_cost: (2, 5),
            },
            Mode::Smoke => Plan {
                runs: 1,
                units: 100,
                own_cost_secs: 2,
                warmup_secs: 1,
                processes: 10,
                startups: 1,
                frequencies: &[99],
                churn_secs: 4,
                sample_cost: (1, 1),
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Quick => "quick",
            Mode::Smoke => "smoke",
            Mode::OffCpu => "off-cpu",
        }
    }
}

/// One row of the results: a median with its range, and a ratio where there is a baseline.
#[derive(Clone, Debug)]
struct Row {
    stage: &'static str,
    config: String,
    metric: &'static str,
    unit: &'static str,
    median: f64,
    min: f64,
    max: f64,
}

impl Row {
    /// A row of one measurement: its median, min and max are the value.
    fn single(
        stage: &'static str,
        config: String,
        metric: &'static str,
        unit: &'static str,
        value: f64,
    ) -> Row {
        row(stage, config, metric, unit, &[value])
    }
}

/// The table's columns; the smoke check parses rows against them.
const COLUMNS: [&str; 7] = [
    "stage",
    "configuration",
    "metric",
    "median",
    "min",
    "max",
    "unit",
];

/// Runs the benchmarks; `args` is empty, `--quick` or `--smoke`.
pub fn bench(args: &[std::ffi::OsString]) -> Result<()> {
    let mode = match args
        .iter()
        .map(|a| a.to_str())
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => Mode::Full,
        [Some("--quick")] => Mode::Quick,
        [Some("--smoke")] => Mode::Smoke,
        [Some("--off-cpu")] => Mode::OffCpu,
        _ => bail!("`bench` takes --quick, --smoke, --off-cpu or nothing"),
    };
    build_suite()?;
    let plan = mode.plan();
    let dir = workspace_root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let _stats = BpfStats::enable()?;
    let setup = Setup {
        workload: compile_workload(&dir)?,
        peers: Peers::find(),
        sink: HttpSink::start()?,
        plan,
        dir,
    };

    let mut rows = Vec::new();
    let mut notes = setup.peers.notes.clone();
    if mode == Mode::OffCpu {
        offcpu::offcpu(&setup, 4, &mut rows)?;
        return write_results(mode, &rows, &notes);
    }
    slowdown(&setup, &mut rows)?;
    own_cost(&setup, &mut rows, &mut notes)?;
    sample_cost::sample_cost(&setup, &mut rows, &mut notes)?;
    churn::churn(&setup, setup.plan.churn_secs, &mut rows)?;
    // Runs of 4 s, as in `--off-cpu` alone: bracketed by runs alone, longer ones add nothing.
    offcpu::offcpu(
        &setup,
        (setup.plan.own_cost_secs / 15).clamp(1, 4),
        &mut rows,
    )?;
    offcpu::min_block(
        &setup,
        (setup.plan.own_cost_secs / 20).clamp(1, 3),
        &mut rows,
    )?;
    startup(&setup.plan, &setup.dir, &mut rows)?;
    stages(mode, &mut rows)?;
    unwind_tables(&mut rows)?;
    micro(mode, &mut rows)?;
    write_results(mode, &rows, &notes)
}

/// Writes bench/results/MODE.md and .json, and prints the table.
fn write_results(mode: Mode, rows: &[Row], notes: &[String]) -> Result<()> {
    let markdown = render(mode, rows, notes);
    check_table(&markdown)?;
    let results = workspace_root().join("bench/results");
    fs::create_dir_all(&results)?;
    fs::write(results.join(format!("{}.md", mode.name())), &markdown)?;
    fs::write(
        results.join(format!("{}.json", mode.name())),
        to_json(mode, rows, notes),
    )?;
    println!("{markdown}");
    println!(
        "wrote bench/results/{0}.md and bench/results/{0}.json",
        mode.name()
    );
    Ok(())
}

/// What every measuring stage runs with.
struct Setup {
    plan: Plan,
    /// The benchmark workload binary (bench/workload.c).
    workload: PathBuf,
    peers: Peers,
    /// Receives the agent's uploads.
    sink: HttpSink,
    /// Scratch space for outputs.
    dir: PathBuf,
}

/// The peers to compare against, installed when missing; a peer that cannot be had is skipped
/// with the reason printed and written into the results.
struct Peers {
    perf: bool,
    bpftrace: bool,
    notes: Vec<String>,
}

impl Peers {
    fn find() -> Peers {
        let mut notes = Vec::new();
        let mut updated = false;
        let mut have = |tool: &str, package: &str| -> bool {
            if works(tool) {
                return true;
            }
            if !updated {
                updated = true;
                let _ = Command::new("apt-get").args(["update", "-qq"]).status();
            }
            let _ = Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", package])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status();
            if works(tool) {
                return true;
            }
            let note = format!("{tool} skipped: `apt-get install {package}` did not make it work");
            eprintln!("bench: {note}");
            notes.push(note);
            false
        };
        let perf = have("perf", "linux-perf");
        let bpftrace = have("bpftrace", "bpftrace");
        Peers {
            perf,
            bpftrace,
            notes,
        }
    }
}

fn works(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn compile_workload(dir: &Path) -> Result<PathBuf> {
    compile_c(
        dir,
        "workload",
        "bench/workload.c",
        &["-O1", "-fno-omit-frame-pointer"],
    )
}

/// Compiles the workspace's C file `source` with `flags` into `dir/name`.
fn compile_c(dir: &Path, name: &str, source: &str, flags: &[&str]) -> Result<PathBuf> {
    let out = dir.join(name);
    run(Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(workspace_root().join(source)))?;
    Ok(out)
}

/// A configuration running in the background while something is measured.
#[derive(Clone, Debug)]
enum Config {
    Nothing,
    Record(u64),
    /// `record --all` with `--unwinder`.
    Unwinder(u64, &'static str),
    Agent(u64),
    Perf(u64),
    Bpftrace(u64),
}

impl Config {
    fn label(&self) -> String {
        match self {
            Config::Nothing => "nothing".into(),
            Config::Record(hz) => format!("profiler record --all -F {hz}"),
            Config::Unwinder(hz, unwinder) => {
                format!("profiler record --all -F {hz} --unwinder {unwinder}")
            }
            Config::Agent(hz) => format!("profiler agent -F {hz}"),
            Config::Perf(hz) => format!("perf record -a -g -F {hz}"),
            Config::Bpftrace(hz) => format!("bpftrace profile:hz:{hz} ustack+kstack"),
        }
    }

    /// Starts the configuration; `None` for `Nothing`.
    fn start(&self, dir: &Path, sink: &HttpSink) -> Result<Option<Running>> {
        let metrics = free_port()?;
        let mut command = match self {
            Config::Nothing => return Ok(None),
            Config::Record(hz) | Config::Unwinder(hz, _) => {
                let mut c = Command::new(profiler_bin());
                c.args(["record", "--all", "-F", &hz.to_string(), "-o"])
                    .arg(dir.join("record.pb.gz"));
                if let Config::Unwinder(_, unwinder) = self {
                    c.args(["--unwinder", unwinder]);
                }
                c
            }
            Config::Agent(hz) => {
                let mut c = Command::new(profiler_bin());
                c.args(["agent", "--protocol", "http", "-F", &hz.to_string()])
                    .args(["--pyroscope-url", &format!("http://{}", sink.addr)])
                    .args(["--upload-interval", "5s", "--node-name", "bench"])
                    .args(["--metrics-addr", &metrics])
                    .env("PROFILER_KUBECONFIG", "/nonexistent");
                c
            }
            Config::Perf(hz) => {
                let mut c = Command::new("perf");
                c.args(["record", "-a", "-g", "-F", &hz.to_string(), "-o"])
                    .arg(dir.join("perf.data"));
                c
            }
            Config::Bpftrace(hz) => {
                let mut c = Command::new("bpftrace");
                c.arg("-e").arg(format!(
                    "profile:hz:{hz} {{ @[ustack, kstack] = count(); }}"
                ));
                c
            }
        };
        let label = self.label();
        let child = spawn_watcher(&mut command, &label)?;
        let running = Running {
            child,
            started: Instant::now(),
            metrics,
            label,
            ours: matches!(
                self,
                Config::Record(_) | Config::Unwinder(..) | Config::Agent(_)
            ),
        };
        running.wait_attached()?;
        Ok(Some(running))
    }
}

/// Starts a profiler or peer in the background: no input, no output, stderr kept for its
/// summary.
fn spawn_watcher(command: &mut Command, label: &str) -> Result<Child> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {label}"))
}

/// A running profiler or peer.
struct Running {
    child: Child,
    started: Instant,
    metrics: String,
    label: String,
    /// The profiler itself rather than a peer: one that hangs on SIGINT fails the run.
    ours: bool,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until sampling runs (perf's events are open, or a perf_event BPF program has
    /// run), then a little more.
    fn wait_attached(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let sampling = |pid| {
            fd_links(pid, "anon_inode:[perf_event]") > 0
                || bpf_prog_stats(pid)
                    .get("perf_event")
                    .is_some_and(|(_, runs)| *runs > 0)
        };
        while !sampling(self.pid()) {
            if Instant::now() > deadline {
                bail!("pid {} never opened a perf event", self.pid());
            }
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    /// CPU seconds (user + system, all threads) so far.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// BPF programs' (run_time_ns, run_cnt) by program type, from the process's own fds.
    fn bpf_stats(&self) -> BTreeMap<String, (u64, u64)> {
        bpf_prog_stats(self.pid())
    }

    /// Stops it with SIGINT (every tool here writes its output on SIGINT) and returns stderr.
    fn stop(mut self) -> Result<String> {
        interrupt(&mut self.child, &self.label, self.ours)
    }
}

impl Drop for Running {
    /// A stage that fails half-way must not leave a profiler sampling the machine.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Stage 1: how much slower a fixed amount of CPU-bound work on every CPU runs under each
/// configuration, configurations interleaved run by run.
fn slowdown(setup: &Setup, rows: &mut Vec<Row>) -> Result<()> {
    let Setup {
        plan,
        workload,
        peers,
        sink,
        dir,
    } = setup;
    let mut configs = vec![Config::Nothing];
    for hz in plan.frequencies {
        configs.push(Config::Record(*hz));
        if peers.perf {
            configs.push(Config::Perf(*hz));
        }
    }
    configs.push(Config::Agent(19));
    if peers.bpftrace {
        configs.push(Config::Bpftrace(99));
    }
    let cpus = thread::available_parallelism().map_or(2, |n| n.get());
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..plan.runs {
        for (i, config) in configs.iter().enumerate() {
            eprintln!("bench: slowdown round {} {}", round + 1, config.label());
            let running = config.start(dir, sink)?;
            let started = Instant::now();
            let workers: Vec<Child> = (0..cpus)
                .map(|_| {
                    Command::new(workload)
                        .args(["work", &plan.units.to_string()])
                        .spawn()
                })
                .collect::<std::io::Result<_>>()?;
            for mut worker in workers {
                worker.wait()?;
            }
            times[i].push(started.elapsed().as_secs_f64());
            if let Some(running) = running {
                running.stop()?;
            }
        }
    }
    let baseline = median(&times[0]);
    for (config, times) in configs.iter().zip(&times) {
        rows.push(row(
            "slowdown",
            config.label(),
            "work wall time",
            "s",
            times,
        ));
        if !matches!(config, Config::Nothing) {
            let ratios: Vec<f64> = times.iter().map(|t| 100.0 * (t / baseline - 1.0)).collect();
            rows.push(row(
                "slowdown",
                config.label(),
                "slowdown vs nothing",
                "%",
                &ratios,
            ));
        }
    }
    Ok(())
}

/// Stage 2 (and 3): the profiler's own CPU and memory with many live processes, and the BPF
/// programs' time per run from the kernel's statistics.
fn own_cost(setup: &Setup, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let Setup {
        plan,
        workload,
        peers,
        sink,
        dir,
    } = setup;
    let seconds = plan.own_cost_secs;
    let warmup = plan.warmup_secs;
    let mut configs = vec![Config::Record(99), Config::Agent(19), Config::Agent(99)];
    if peers.perf {
        configs.push(Config::Perf(99));
    }
    if peers.bpftrace {
        configs.push(Config::Bpftrace(99));
    }
    let lifetime = (seconds + warmup + 10) * configs.len() as u64 + 30;
    let live: Vec<Child> = (0..plan.processes)
        .map(|_| {
            Command::new(workload)
                .args(["duty", &lifetime.to_string()])
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let _live = KillOnDrop(live);
    for config in configs {
        eprintln!(
            "bench: own cost {} for {warmup}s + {seconds}s",
            config.label()
        );
        let running = config.start(dir, sink)?.expect("not Nothing");
        let cpu_start = running.cpu_seconds();
        thread::sleep(Duration::from_secs(warmup));
        let cpu_before = running.cpu_seconds();
        let bpf_before = running.bpf_stats();
        let started = Instant::now();
        thread::sleep(Duration::from_secs(seconds));
        let wall = started.elapsed().as_secs_f64();
        let cpu = running.cpu_seconds() - cpu_before;
        let bpf_after = running.bpf_stats();
        let Memory {
            rss,
            peak,
            anon,
            file,
        } = memory_kib(running.pid());
        let maps = map_memory_kib(running.pid());
        let samples = match config {
            Config::Agent(_) => metric(&running.metrics, "profiler_samples_collected_total"),
            _ => None,
        };
        let total_wall = running.started.elapsed().as_secs_f64();
        let stderr = running.stop()?;
        let samples =
            samples.or_else(|| recorded_samples(&stderr).map(|n| n as f64 * wall / total_wall));
        let label = config.label();
        let single =
            |stage, metric, unit, value| Row::single(stage, label.clone(), metric, unit, value);
        rows.push(single(
            "own cost",
            "CPU per wall second, steady",
            "% of a core",
            100.0 * cpu / wall,
        ));
        rows.push(single(
            "own cost",
            "CPU in the first seconds (see notes)",
            "CPU s",
            cpu_before - cpu_start,
        ));
        if let Some(samples) = samples.filter(|s| *s > 0.0) {
            rows.push(single(
                "own cost",
                "CPU per 1000 samples",
                "ms",
                1e6 * cpu / samples,
            ));
        }
        rows.push(single(
            "own cost",
            "RSS steady, mmapped maps apart",
            "MiB",
            rss as f64 / 1024.0,
        ));
        rows.push(single(
            "own cost",
            "RSS steady: anonymous (heap, stacks)",
            "MiB",
            anon as f64 / 1024.0,
        ));
        rows.push(single(
            "own cost",
            "RSS steady: files (own code, binaries read)",
            "MiB",
            file as f64 / 1024.0,
        ));
        rows.push(single(
            "own cost",
            "RSS peak, mmapped maps apart",
            "MiB",
            peak as f64 / 1024.0,
        ));
        rows.push(single(
            "own cost",
            "BPF map memory",
            "MiB",
            maps as f64 / 1024.0,
        ));
        rows.push(single(
            "own cost",
            "footprint (RSS + BPF maps)",
            "MiB",
            (rss + maps) as f64 / 1024.0,
        ));
        for kind in bpf_after.keys() {
            let Some(per_run) = micros_per_run(&bpf_before, &bpf_after, kind) else {
                continue;
            };
            rows.push(Row::single(
                "bpf cost",
                format!("{label}: {kind} program"),
                "time per run",
                "µs",
                per_run,
            ));
        }
    }
    notes.push(format!(
        "own cost: {} live processes waking every 100 ms; each configuration runs {warmup} s \
         (its first seconds: attaching, reading every process, building tables), then is \
         measured for {seconds} s (steady)",
        plan.processes
    ));
    Ok(())
}

/// Stage 4: time from exec to every BPF link being attached (two tracepoints and one perf
/// event per CPU) and to the sampling program's first run.
fn startup(plan: &Plan, dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let mut attached = Vec::new();
    let mut first = Vec::new();
    for _ in 0..plan.startups {
        let started = Instant::now();
        let mut child = Command::new(profiler_bin())
            .args(["record", "--all", "-d", "2s", "-o"])
            .arg(dir.join("startup.pb.gz"))
            .stderr(Stdio::null())
            .spawn()?;
        let pid = child.id();
        let deadline = started + Duration::from_secs(10);
        let mut seen_attached = None;
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        while Instant::now() < deadline {
            if seen_attached.is_none() && fd_links(pid, "anon_inode:bpf_link") >= 2 + cpus {
                seen_attached = Some(started.elapsed());
            }
            let runs: u64 = bpf_prog_stats(pid)
                .get("perf_event")
                .map_or(0, |(_, runs)| *runs);
            if runs > 0 {
                first.push(started.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            thread::sleep(Duration::from_micros(500));
        }
        if let Some(at) = seen_attached {
            attached.push(at.as_secs_f64() * 1000.0);
        }
        child.wait()?;
    }
    rows.push(row(
        "start-up",
        "profiler record --all".into(),
        "exec to BPF attached",
        "ms",
        &attached,
    ));
    rows.push(row(
        "start-up",
        "profiler record --all".into(),
        "exec to first sample",
        "ms",
        &first,
    ));
    Ok(())
}

/// Stages 5 and 6 (symbolization, profile building) and perf-map parsing from the profiler crate's own bench
/// binary, which prints one JSON object per line.
fn stages(mode: Mode, rows: &mut Vec<Row>) -> Result<()> {
    let mut command = cargo_bench("stages");
    command.arg(mode.name());
    let output = json_lines(&mut command, "the stages bench")?;
    push_json_rows(&output, rows, |stage| match stage {
        "symbolize" => "symbolization",
        "gopclntab" => "Go symbols (.gopclntab)",
        "perfmap" => "perf-map parsing",
        _ => "profile building",
    });
    Ok(())
}

/// Unwind tables: rows, size and build time per MiB of CFI for Debian's libc and the profiler's
/// own binary (profiler-unwind's `table_stats` example).
fn unwind_tables(rows: &mut Vec<Row>) -> Result<()> {
    // Built by `build_suite` with the rest: `cargo run -p profiler-unwind` would resolve
    // features for that crate alone and rebuild its dependencies.
    let example = release_dir().join("examples/table_stats");
    let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let mut command = Command::new(example);
    command.arg("--json").arg(libc).arg(profiler_bin());
    let output = json_lines(&mut command, "the unwind table bench")?;
    push_json_rows(&output, rows, |_| "unwind tables");
    Ok(())
}

/// `cargo bench --quiet SUITE --bench NAME --` at the workspace root, ready for the bench's own
/// arguments: with the suite's package selection, so it reuses what `build_suite` built.
fn cargo_bench(name: &str) -> Command {
    let mut command = suite_cargo(&["bench", "--quiet"]);
    command.args(["--bench", name, "--"]);
    command
}

/// Runs a cargo command at the workspace root and returns its stdout.
fn json_lines(command: &mut Command, what: &str) -> Result<String> {
    let output = command
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!("{what} failed: {}", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One row per flat JSON line (`stage`, `config`, `metric`, `unit`, `value`), under the stage
/// name `stage` gives for the line's own.
fn push_json_rows(output: &str, rows: &mut Vec<Row>, stage: impl Fn(&str) -> &'static str) {
    for line in output.lines() {
        let Some(fields) = parse_flat_json(line) else {
            continue;
        };
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        let value: f64 = get("value").parse().unwrap_or(f64::NAN);
        rows.push(Row {
            stage: stage(&get("stage")),
            config: get("config"),
            metric: leak(get("metric")),
            unit: leak(get("unit")),
            median: value,
            min: value,
            max: value,
        });
    }
}

/// Stage 7: criterion micro-benchmarks of the userspace hot paths (stack decode, symbol cache
/// look-up, pprof building); the smoke run keeps criterion's minimum sample count and short times.
fn micro(mode: Mode, rows: &mut Vec<Row>) -> Result<()> {
    let mut cmd = cargo_bench("hot_paths");
    if mode != Mode::Full {
        cmd.args([
            "--warm-up-time",
            "0.2",
            "--measurement-time",
            "0.5",
            "--sample-size",
            "10",
        ]);
    }
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running criterion")?;
    if !output.status.success() {
        bail!("the criterion benches failed: {}", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut previous = "";
    for line in text.lines() {
        if let Some((name, times)) = line.split_once("time:") {
            let name = if name.trim().is_empty() {
                previous.trim()
            } else {
                name.trim()
            };
            if let Some([low, mid, high]) = criterion_times(times) {
                rows.push(Row {
                    stage: "micro",
                    config: name.to_owned(),
                    metric: "time per iteration",
                    unit: "ns",
                    median: mid,
                    min: low,
                    max: high,
                });
            }
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    Ok(())
}

/// Criterion's `[12.3 ns 12.5 ns 12.8 ns]` as nanoseconds.
fn criterion_times(text: &str) -> Option<[f64; 3]> {
    let inner = text.trim().strip_prefix('[')?.strip_suffix(']')?;
    let words: Vec<&str> = inner.split_whitespace().collect();
    let mut values = [0.0; 3];
    for (i, pair) in words.chunks(2).enumerate().take(3) {
        let value: f64 = pair.first()?.parse().ok()?;
        let scale = match *pair.get(1)? {
            "ps" => 1e-3,
            "ns" => 1.0,
            "µs" | "us" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            _ => return None,
        };
        values[i] = value * scale;
    }
    Some(values)
}

/// Row strings live for the whole run; the few from the stages bench are leaked on purpose.
fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// Parses one flat JSON object of string and number values (what the stages bench prints).
fn parse_flat_json(line: &str) -> Option<BTreeMap<String, String>> {
    let body = line.trim().strip_prefix('{')?.strip_suffix('}')?;
    let mut fields = BTreeMap::new();
    for pair in body.split(",\"") {
        let (key, value) = pair.split_once(':')?;
        fields.insert(
            key.trim().trim_matches('"').to_owned(),
            value.trim().trim_matches('"').to_owned(),
        );
    }
    Some(fields)
}

fn row(
    stage: &'static str,
    config: String,
    metric: &'static str,
    unit: &'static str,
    values: &[f64],
) -> Row {
    Row {
        stage,
        config,
        metric,
        unit,
        median: median(values),
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

fn render(mode: Mode, rows: &[Row], notes: &[String]) -> String {
    let mut out = String::new();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        out,
        "Benchmarks ({}), `cargo xtask bench{}`, kernel {}, {cpus} CPUs\n",
        mode.name(),
        match mode {
            Mode::Full => "",
            Mode::Quick => " --quick",
            Mode::Smoke => " --smoke",
            Mode::OffCpu => " --off-cpu",
        },
        kernel.trim()
    );
    let _ = writeln!(out, "| {} |", COLUMNS.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(COLUMNS.len()));
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.stage,
            r.config,
            r.metric,
            number(r.median),
            number(r.min),
            number(r.max),
            r.unit
        );
    }
    for note in notes {
        let _ = writeln!(out, "\n- {note}");
    }
    out
}

fn number(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.3}")
    } else {
        "-".into()
    }
}

/// Checks the table's shape: a header of [`COLUMNS`], then rows with as many cells, numbers
/// where numbers belong. The smoke run in CI relies on this.
fn check_table(markdown: &str) -> Result<()> {
    let mut lines = markdown.lines().filter(|l| l.starts_with('|'));
    let header: Vec<&str> = cells(lines.next().unwrap_or_default());
    if header != COLUMNS {
        bail!("bench table header is {header:?}");
    }
    lines.next();
    let mut count = 0;
    for line in lines {
        let cells = cells(line);
        if cells.len() != COLUMNS.len() {
            bail!("bench table row has {} cells: {line}", cells.len());
        }
        for value in &cells[3..6] {
            if *value != "-" && value.parse::<f64>().is_err() {
                bail!("bench table cell `{value}` is not a number: {line}");
            }
        }
        count += 1;
    }
    if count == 0 {
        bail!("bench table has no rows");
    }
    Ok(())
}

fn cells(line: &str) -> Vec<&str> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(str::trim)
        .collect()
}

fn to_json(mode: Mode, rows: &[Row], notes: &[String]) -> String {
    let text = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let num = |v: f64| {
        if v.is_finite() {
            format!("{v}")
        } else {
            "null".into()
        }
    };
    let rows: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"stage\":{},\"configuration\":{},\"metric\":{},\"unit\":{},\"median\":{},\"min\":{},\"max\":{}}}",
                text(r.stage),
                text(&r.config),
                text(r.metric),
                text(r.unit),
                num(r.median),
                num(r.min),
                num(r.max)
            )
        })
        .collect();
    let notes: Vec<String> = notes.iter().map(|n| text(n)).collect();
    let when = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{{\"mode\":{},\"unix_time\":{when},\"rows\":[{}],\"notes\":[{}]}}\n",
        text(mode.name()),
        rows.join(","),
        notes.join(",")
    )
}

// ---------------------------------------------------------------------------------------------
// Reading processes from /proc
// ---------------------------------------------------------------------------------------------

/// Number of a process's file descriptors that point at `target` (e.g. `anon_inode:bpf_link`).
fn fd_links(pid: u32, target: &str) -> usize {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    entries
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|link| link.to_string_lossy() == target)
        .count()
}

/// Microseconds per run of the `kind` programs between two [`bpf_prog_stats`] readings;
/// `None` when they did not run.
fn micros_per_run(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    kind: &str,
) -> Option<f64> {
    let (time_before, runs_before) = before.get(kind).copied().unwrap_or_default();
    let (time_after, runs_after) = after.get(kind).copied().unwrap_or_default();
    let runs = runs_after.saturating_sub(runs_before);
    (runs > 0).then(|| time_after.saturating_sub(time_before) as f64 / runs as f64 / 1000.0)
}

/// (run_time_ns, run_cnt) summed per BPF program type over a process's program fds; the
/// kernel fills them while `kernel.bpf_stats_enabled` is 1.
fn bpf_prog_stats(pid: u32) -> BTreeMap<String, (u64, u64)> {
    let mut stats: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return stats;
    };
    for entry in entries.flatten() {
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let (Some(kind), Some(time), Some(runs)) = (
            field("prog_type:"),
            field("run_time_ns:"),
            field("run_cnt:"),
        ) else {
            continue;
        };
        let kind = match kind.as_str() {
            "7" => "perf_event".to_owned(),
            "26" => "tracing".to_owned(),
            other => format!("type {other}"),
        };
        let slot = stats.entry(kind).or_default();
        slot.0 += time.parse::<u64>().unwrap_or(0);
        slot.1 += runs.parse::<u64>().unwrap_or(0);
    }
    stats
}

/// User + system CPU seconds of a process, all threads included.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// Asked once: the off-CPU stage polls `cpu_seconds` every half second, and each `getconf`
/// would be a child of the bench that a recorder following it sees.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        // getconf CLK_TCK is 100 on every Linux this runs on; ask to be sure.
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A process's resident memory in KiB, the BPF maps it mmapped apart: the unwind rows' array
/// map is mmapped (16 MiB by default, all of it resident), and those pages are the map's kernel
/// memory, already in `map_memory_kib` (the cgroup is charged for them once).
pub(super) struct Memory {
    /// VmRSS.
    pub rss: u64,
    /// VmHWM.
    pub peak: u64,
    /// Anonymous (heap, stacks).
    pub anon: u64,
    /// File-backed (its own code and the binaries it reads): page cache the kernel can reclaim
    /// under a memory limit, unlike the rest.
    pub file: u64,
}

/// The resident memory of `pid`, from one read of its status and of its smaps.
pub(super) fn memory_kib(pid: u32) -> Memory {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let mapped = bpf_mapped_kib(pid);
    Memory {
        rss: field("VmRSS:").saturating_sub(mapped),
        peak: field("VmHWM:").saturating_sub(mapped),
        anon: (field("RssAnon:") + field("RssShmem:")).saturating_sub(mapped),
        file: field("RssFile:"),
    }
}

/// Resident KiB of the BPF maps `pid` has mmapped (`anon_inode:bpf-map` in its smaps).
fn bpf_mapped_kib(pid: u32) -> u64 {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut in_map = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if in_map {
                kib += rss
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-'))
        {
            // A mapping's header line: `start-end perms offset dev inode [name]`.
            in_map = line.ends_with("anon_inode:bpf-map");
        }
    }
    kib
}

/// Kernel memory of the BPF maps `pid` holds, in KiB: the `memlock` of each map descriptor
/// (charged to the process's memory cgroup, so a pod limit sees RSS plus this).
fn map_memory_kib(pid: u32) -> u64 {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    let bytes: u64 = entries
        .filter_map(|e| fs::read_to_string(e.ok()?.path()).ok())
        .filter(|info| info.lines().any(|l| l.starts_with("map_type:")))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum();
    bytes / 1024
}

/// The sample count in `profiler record`'s summary ("... N samples ...").
fn recorded_samples(stderr: &str) -> Option<u64> {
    count_before(stderr, "samples")
}

/// The count just before the first `word` of a summary (`recorded 1234 samples,`,
/// `(56 shorter than ...`).
pub(super) fn count_before(text: &str, word: &str) -> Option<u64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1].trim_end_matches(',') == word)
        .and_then(|w| w[0].trim_start_matches('(').parse().ok())
}

/// One metric's value from a /metrics endpoint.
fn metric(addr: &str, name: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

fn free_port() -> Result<String> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
}

fn signal_process(pid: u32, signal: i32) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status();
}

/// How long a profiler or peer gets after SIGINT to write its output and exit.
const EXIT_GRACE: Duration = Duration::from_secs(60);

/// Sends SIGINT to `child` (`label`) and returns its stderr once it exits. One still running
/// [`EXIT_GRACE`] later is killed, so a tool that hangs on exit cannot stall the benchmark (and
/// CI with it) for good: an error if it is the profiler itself (`ours`), while a peer that
/// hangs (bpftrace symbolizing every stack it kept, say) costs the run its output, not the run.
fn interrupt(child: &mut Child, label: &str, ours: bool) -> Result<String> {
    let stderr = child.stderr.take();
    // Read while waiting: a tool blocked on a full stderr pipe would never exit.
    let reader = thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    });
    signal_process(child.id(), 2);
    let deadline = Instant::now() + EXIT_GRACE;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let hung = format!(
                "{label}: still running {} s after SIGINT; killed",
                EXIT_GRACE.as_secs()
            );
            if ours {
                bail!(hung);
            }
            eprintln!("bench: {hung}");
            return Ok(String::new());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(reader.join().unwrap_or_default())
}

/// Kills the live processes when the stage ends, however it ends.
struct KillOnDrop(Vec<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Turns `kernel.bpf_stats_enabled` on for the run and back to what it was afterwards.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's BPF run statistics on or off (they cost two clock reads per program
/// run); `BpfStats` restores the setting found at the start.
fn set_bpf_stats(on: bool) -> Result<()> {
    fs::write(BPF_STATS, if on { "1" } else { "0" })
        .with_context(|| format!("writing {BPF_STATS} (needs root)"))
}

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let before =
            fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS} (needs root)"))?;
        Ok(BpfStats(before.trim().to_owned()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.0);
    }
}

/// A local HTTP server that accepts Pyroscope /ingest requests and answers 200, so the agent
/// runs its whole delivery path during the benchmark.
struct HttpSink {
    addr: String,
}

impl HttpSink {
    fn start() -> Result<HttpSink> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || serve_one(stream));
            }
        });
        Ok(HttpSink { addr })
    }
}

fn serve_one(stream: TcpStream) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut writer = writer;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if writer
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rows_are_named_by_the_caller_and_skip_other_lines() {
        let output = "Compiling...\n\
            {\"stage\":\"unwind tables\",\"config\":\"libc.so.6\",\"metric\":\"rows\",\"unit\":\"rows\",\"value\":28274}\n";
        let mut rows = Vec::new();
        push_json_rows(output, &mut rows, |stage| {
            assert_eq!(stage, "unwind tables");
            "unwind tables"
        });
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(
            (row.config.as_str(), row.metric, row.unit),
            ("libc.so.6", "rows", "rows")
        );
        assert_eq!((row.median, row.min, row.max), (28274.0, 28274.0, 28274.0));
    }

    #[test]
    fn table_round_trips_through_the_check() {
        let rows = vec![row(
            "slowdown",
            "a | b".replace('|', "/"),
            "m",
            "s",
            &[1.0, 3.0, 2.0],
        )];
        let text = render(Mode::Smoke, &rows, &[]);
        check_table(&text).unwrap();
        assert!(text.contains("| 2.000 | 1.000 | 3.000 |"));
        assert!(check_table("| stage |\n|---|\n").is_err());
    }

    #[test]
    fn flat_json_lines_parse() {
        let f = parse_flat_json(
            r#"{"stage":"symbolize","config":"cold","metric":"time","unit":"ms","value":1.5}"#,
        )
        .unwrap();
        assert_eq!(f["value"], "1.5");
        assert_eq!(f["config"], "cold");
    }

    #[test]
    fn criterion_output_parses() {
        assert_eq!(
            criterion_times(" [1.5 ns 2.0 ns 2.5 µs]"),
            Some([1.5, 2.0, 2500.0])
        );
        assert_eq!(criterion_times("garbage"), None);
    }

    #[test]
    fn summary_sample_counts_parse() {
        assert_eq!(
            recorded_samples("recorded 1234 samples from 3 processes"),
            Some(1234)
        );
        assert_eq!(recorded_samples("nothing"), None);
    }

    #[test]
    fn the_count_before_a_marker_parses() {
        let line = "recorded 5 samples and 1.20s off CPU in 40 blocks (1234 shorter than \
                    --off-cpu-min-block left out); 0 lost";
        assert_eq!(super::count_before(line, "shorter"), Some(1234));
        assert_eq!(super::count_before("nothing", "shorter"), None);
    }
}
