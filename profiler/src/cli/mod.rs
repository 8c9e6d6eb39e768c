//! Command-line wiring: parses arguments and turns every failure into one line on stderr and
//! an exit code, never a panic or a backtrace.

mod agent;
mod config;
mod diff;
mod privileges;
mod record;

use std::{
    fmt,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use clap::{Parser, Subcommand};

pub use record::RecordArgs;

/// A continuous eBPF CPU profiler.
#[derive(Parser, Debug)]
#[command(name = "profiler", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Record on-CPU stacks (and with --off-cpu, off-CPU time) of processes, a command, or the
    /// whole machine into a profile.
    Record(RecordArgs),
    /// Profile the whole node continuously and push profiles to Pyroscope and/or an OTLP endpoint.
    Agent(Box<config::AgentArgs>),
    /// Compare two profiles (or sets of runs): which functions got more or less expensive, and
    /// whether beyond sampling noise; exits 1 on a significant regression with --fail-above.
    Diff(diff::DiffArgs),
}

/// An error that carries the exit code it should end the process with.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl Exit {
    /// Bad input from the user: exit code 2.
    pub fn usage(message: impl Into<String>) -> anyhow::Error {
        Exit {
            code: 2,
            message: message.into(),
        }
        .into()
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Set when this process turned error backtraces off itself (see [`no_error_backtraces`]).
static ERROR_BACKTRACES_OFF: AtomicBool = AtomicBool::new(false);

/// Turns off the backtrace std captures with every `anyhow` error while RUST_BACKTRACE is set,
/// as many images set it. Errors here print as one line, so each capture was an unwind for
/// nothing, and it kept all of our `.eh_frame` (1.8 MiB) resident. RUST_LIB_BACKTRACE=0 leaves
/// panic backtraces to RUST_BACKTRACE. Called before any thread starts.
fn no_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
        ERROR_BACKTRACES_OFF.store(true, Ordering::Relaxed);
    }
}

/// Gives a command the environment this process was started with: what
/// [`no_error_backtraces`] set is for this process only.
pub fn original_environment(command: &mut tokio::process::Command) -> &mut tokio::process::Command {
    if ERROR_BACKTRACES_OFF.load(Ordering::Relaxed) {
        command.env_remove("RUST_LIB_BACKTRACE");
    }
    command
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = err.print();
                return ExitCode::from(if err.use_stderr() { 2 } else { 0 });
            }
            // clap's first line says what is wrong; the usage text after it is noise here.
            let rendered = err.render().to_string();
            let first = rendered
                .lines()
                .next()
                .unwrap_or("error: invalid arguments");
            eprintln!("{first}");
            return ExitCode::from(2);
        }
    };
    // Before any binary is mapped: a file truncated under a map must not end us.
    crate::truncation::install();
    no_error_backtraces();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Record(args) => record::run(args).await,
            Command::Agent(args) => agent::run(*args).await,
            Command::Diff(args) => diff::run(args),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let code = err.downcast_ref::<Exit>().map_or(1, |e| e.code);
            eprintln!("error: {}", one_line(&err));
            ExitCode::from(code)
        }
    }
}

/// Parses `500ms`, `10s`, `2m`; zero is refused.
/// Raises the soft limit on open files to the hard one: binaries stay open while their
/// processes may still need symbols, and a node has many (the default soft limit is 1024).
pub(crate) fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like 500ms, 10s or 2m ({e})"))?;
    if duration.is_zero() {
        return Err("the duration must be longer than 0".into());
    }
    Ok(duration)
}

/// Parses `--off-cpu-min-block`: a duration like 10us or 1ms, or 0 to keep every block.
pub(crate) fn parse_min_block(text: &str) -> Result<std::time::Duration, String> {
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like 10us, 1ms or 0 ({e})"))
}

/// The error and its causes on one line.
fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}").replace('\n', " ")
}
