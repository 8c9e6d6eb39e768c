//! `profiler diff`: compares base and head profiles, prints the report on stdout, draws the
//! differential flame graph, and turns the verdict into the exit code a CI job gates on.

use std::{
    fs::File,
    io::{BufWriter, Write as _},
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use clap::Args;

use super::Exit;
use crate::compare::{self, KeyBy, Options, ReportFormat, Side};

/// The help's closing section: what the arguments and exit codes mean together.
const AFTER_HELP: &str = "\
Several runs per side are merged (added up) before comparing, either as comma-separated lists
    profiler diff base1.pb.gz,base2.pb.gz head1.pb.gz,head2.pb.gz
or with repeated flags (also for paths that contain a comma)
    profiler diff --base base1.pb.gz --base base2.pb.gz --head head1.pb.gz --head head2.pb.gz

Shares are percentages of all samples; a function's cumulative share counts every sample with
the function anywhere on the stack. A change is significant when a two-sided two-proportion
z-test on the cumulative sample counts (pooled variance) rejects \"no change\" at --confidence.

Exit codes: 1 when --fail-above PCT is given and some function's cumulative share rose by more
than PCT points and the rise is significant; 0 otherwise; 2 on bad input (a missing file, a file
that is not pprof, a sample type that is absent or differs between the profiles).";

#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct DiffArgs {
    /// The base profile(s): a pprof file (ours, Go's, pprof-rs; gzipped or not), or several
    /// runs separated by commas.
    #[arg(value_name = "BASE", conflicts_with_all = ["base", "head"])]
    base_list: Option<String>,
    /// The head profile(s), like BASE.
    #[arg(value_name = "HEAD", conflicts_with_all = ["base", "head"])]
    head_list: Option<String>,
    /// A base profile; repeat for several runs. Instead of BASE HEAD.
    #[arg(long = "base", value_name = "FILE")]
    base: Vec<PathBuf>,
    /// A head profile; repeat for several runs. Instead of BASE HEAD.
    #[arg(long = "head", value_name = "FILE")]
    head: Vec<PathBuf>,
    /// The sample type to compare, by name (cpu, samples, alloc_space, ...); by default `cpu`
    /// when the profiles have it, else their first.
    #[arg(long, value_name = "TYPE")]
    sample_type: Option<String>,
    /// Tell functions apart by name, by name and source file, or by name, file and line.
    #[arg(long, value_enum, value_name = "KEY", default_value_t = KeyBy::Function)]
    by: KeyBy,
    /// Confidence of the significance test, between 0 and 1 exclusive.
    #[arg(long, value_name = "C", default_value_t = 0.99, value_parser = parse_confidence)]
    confidence: f64,
    /// Exit 1 when a function's cumulative share rose by more than PCT percentage points and
    /// the rise is significant.
    #[arg(long, value_name = "PCT", value_parser = parse_points)]
    fail_above: Option<f64>,
    /// The report on stdout: table, markdown (for a pull-request comment) or json.
    #[arg(long, value_enum, value_name = "F", default_value_t = ReportFormat::Table)]
    format: ReportFormat,
    /// Also write a differential flame graph (red: more expensive in head, blue: cheaper).
    #[arg(long, value_name = "PATH")]
    svg: Option<PathBuf>,
    /// The most one profile may take, on disk or inflated: 128MiB, 512KiB, 1GiB, or bytes. A
    /// larger one (a gzip bomb) is refused before it takes the memory.
    #[arg(long, value_name = "SIZE", default_value = "128MiB", value_parser = parse_size)]
    max_size: u64,
    /// Rows in each of the regression and improvement tables.
    #[arg(long, value_name = "N", default_value_t = 10)]
    top: usize,
}

/// A size with an optional KiB, MiB or GiB suffix.
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let (number, shift) = [("GiB", 30), ("MiB", 20), ("KiB", 10)]
        .iter()
        .find_map(|(suffix, shift)| text.strip_suffix(suffix).map(|n| (n, *shift)))
        .unwrap_or((text, 0));
    number
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_shl(shift).filter(|v| v >> shift == n))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{text}` is not a size such as 128MiB, 512KiB or 1048576"))
}

/// Compares, reports, and returns 1 when the check fails, else 0.
pub fn run(args: DiffArgs) -> Result<u8> {
    let base = files(args.base_list.as_deref(), &args.base);
    let head = files(args.head_list.as_deref(), &args.head);
    if base.is_empty() || head.is_empty() {
        return Err(Exit::usage(
            "give the base and head profiles: `profiler diff BASE HEAD` or --base FILE --head FILE",
        ));
    }
    // Opened first, so that a bad path fails before the work.
    let svg = args
        .svg
        .as_ref()
        .map(|path| {
            File::create(path)
                .map_err(|e| Exit::usage(format!("cannot write {}: {e}", path.display())))
        })
        .transpose()?;
    let sample_type = args.sample_type.as_deref();
    let load = |paths: &[PathBuf]| {
        Side::load(paths, sample_type, args.by, args.max_size)
            .map_err(|e| Exit::usage(format!("{e:#}")))
    };
    let (base, head) = (load(&base)?, load(&head)?);
    let options = Options {
        confidence: args.confidence,
        fail_above: args.fail_above,
    };
    let comparison = compare::compare(&base, &head, args.by, options)
        .map_err(|e| Exit::usage(format!("{e:#}")))?;

    let mut out = std::io::stdout().lock();
    match args.format {
        ReportFormat::Table => compare::write_table(&comparison, args.top, &mut out),
        ReportFormat::Markdown => compare::write_markdown(&comparison, args.top, &mut out),
        ReportFormat::Json => compare::write_json(&comparison, &mut out),
    }
    .and_then(|()| Ok(out.flush()?))
    .context("writing the report")?;
    if let (Some(file), Some(path)) = (svg, &args.svg) {
        let mut writer = BufWriter::new(file);
        compare::write_svg(&base, &head, &mut writer)
            .and_then(|()| Ok(writer.flush()?))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(u8::from(comparison.verdict.failed))
}

/// The files of one side: the comma-separated positional list, or the repeated flag.
fn files(list: Option<&str>, flags: &[PathBuf]) -> Vec<PathBuf> {
    let listed = list
        .into_iter()
        .flat_map(|l| l.split(','))
        .filter(|f| !f.is_empty())
        .map(PathBuf::from);
    listed.chain(flags.iter().cloned()).collect()
}

fn parse_confidence(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(c) if c > 0.0 && c < 1.0 => Ok(c),
        _ => Err(format!(
            "`{text}` is not a confidence between 0 and 1, like 0.99"
        )),
    }
}

fn parse_points(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if p.is_finite() && p >= 0.0 => Ok(p),
        _ => Err(format!(
            "`{text}` is not a number of percentage points, like 5"
        )),
    }
}
