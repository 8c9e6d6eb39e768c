//! Compare: which functions got more or less expensive from one set of profiles (base) to
//! another (head), and whether the change is more than sampling noise, so that a CI job can
//! fail a build on a real regression and only on one. Reading and merging is in [`input`], the
//! significance test in [`stats`], the outputs in [`report`]; none of it needs BPF.
//!
//! Functions are compared by their share of the samples rather than by raw time, because two
//! runs of a benchmark rarely take exactly as long: shares stay comparable. Each change is
//! tested with a two-proportion z-test on the sample counts (see [`stats`]).

mod input;
mod report;
mod stats;

use anyhow::{bail, Result};
use serde::Serialize;

pub use input::{decode_profile, read_profile, Cost, Key, SampleType, Side};
pub use report::{write_json, write_markdown, write_svg, write_table, ReportFormat};
pub use stats::{erfc, normal_cdf, normal_quantile, two_proportion_z, ZTest};

/// What functions are told apart by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KeyBy {
    /// The function name: one row per function, wherever it was sampled.
    Function,
    /// The function name and its source file: same-named functions in different files apart.
    File,
    /// The function name, file and line: where in a function the time went.
    Line,
}

/// How to judge the comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Confidence of the two-sided test, e.g. 0.99.
    pub confidence: f64,
    /// Fail when a function's cumulative share rose significantly by more than this many
    /// points; None never fails.
    pub fail_above: Option<f64>,
}

/// One side's totals, as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Totals {
    /// The files merged, in order.
    pub files: Vec<String>,
    /// How many files: the divisor of every time per run.
    pub runs: usize,
    /// Samples over all runs.
    pub samples: u64,
    /// The sum of the chosen value over all runs.
    pub total: i64,
    /// The chosen value per run in nanoseconds, when it measures time.
    pub time_per_run_ns: Option<f64>,
}

/// One key on one side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Share {
    /// Samples with the key as the leaf.
    pub self_samples: u64,
    /// Samples with the key anywhere on the stack: what the test compares.
    pub cumulative_samples: u64,
    /// Percent of the side's total value where the key is the leaf.
    pub self_percent: f64,
    /// Percent of the side's total value where the key is on the stack.
    pub cumulative_percent: f64,
    /// Average time per run where the key is the leaf, when the value measures time.
    pub self_ns_per_run: Option<f64>,
    /// Average time per run where the key is on the stack, when the value measures time.
    pub cumulative_ns_per_run: Option<f64>,
}

/// One key compared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The key as one string, the way the tables show it.
    pub name: String,
    #[serde(flatten)]
    pub key: Key,
    pub base: Share,
    pub head: Share,
    /// Head's self share minus base's, in percentage points.
    pub self_change_points: f64,
    /// Head's cumulative share minus base's, in percentage points.
    pub cumulative_change_points: f64,
    /// Head's cumulative time per run minus base's, when both measure time.
    pub cumulative_change_ns_per_run: Option<f64>,
    /// The z statistic of the cumulative sample counts (positive: head has more).
    pub z: f64,
    /// The two-sided p-value of `z`.
    pub p_value: f64,
    /// Whether the cumulative share changed beyond noise at the chosen confidence.
    pub significant: bool,
    /// Whether this row fails the check: significant and up by more than `--fail-above`.
    pub fails: bool,
}

impl Row {
    /// A significant rise: the function got more expensive relative to the rest.
    pub fn is_regression(&self) -> bool {
        self.significant && self.cumulative_change_points > 0.0
    }

    /// A significant fall.
    pub fn is_improvement(&self) -> bool {
        self.significant && self.cumulative_change_points < 0.0
    }
}

/// The outcome, in a form every output states the same way.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// True when some row fails (only with `--fail-above`): the exit code is then 1.
    pub failed: bool,
    /// One sentence.
    pub summary: String,
    /// The failing keys, largest rise first.
    pub failing: Vec<String>,
    /// Significant rises of any size.
    pub significant_regressions: usize,
    /// Significant falls of any size.
    pub significant_improvements: usize,
}

/// Base against head, every key, largest rise first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// What was compared; base and head agree on it.
    pub sample_type: SampleType,
    /// What the rows are keyed by.
    pub by: KeyBy,
    /// The confidence of the two-sided test, e.g. 0.99.
    pub confidence: f64,
    /// The |z| above which a change is significant: Φ⁻¹(1 − (1 − confidence)/2).
    pub critical_z: f64,
    /// The `--fail-above` threshold in points, if any.
    pub fail_above: Option<f64>,
    pub base: Totals,
    pub head: Totals,
    /// The outcome, stated once for every output.
    pub verdict: Verdict,
    #[serde(rename = "functions")]
    pub rows: Vec<Row>,
}

/// Compares `base` with `head`, which must hold samples of the same type.
pub fn compare(base: &Side, head: &Side, by: KeyBy, options: Options) -> Result<Comparison> {
    if base.sample_type != head.sample_type {
        bail!(
            "base has sample type {} but head has {}; pick one both have with --sample-type",
            base.sample_type,
            head.sample_type
        );
    }
    for (name, side) in [("base", base), ("head", head)] {
        if side.total_samples == 0 || side.total_value <= 0 {
            bail!(
                "{name} ({}) holds no {} samples",
                files(side).join(", "),
                side.sample_type.kind
            );
        }
    }
    let critical_z = normal_quantile(1.0 - (1.0 - options.confidence) / 2.0);
    let nanos = base.sample_type.nanos_per_unit();
    let mut keys: Vec<&Key> = base.costs.keys().chain(head.costs.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut rows: Vec<Row> = keys
        .into_iter()
        .map(|key| {
            let cost = |side: &Side| side.costs.get(key).copied().unwrap_or_default();
            let (b, h) = (cost(base), cost(head));
            let (base_share, head_share) = (share(base, &b, nanos), share(head, &h, nanos));
            let test = two_proportion_z(
                b.cumulative_samples,
                base.total_samples,
                h.cumulative_samples,
                head.total_samples,
            );
            let cumulative_change = head_share.cumulative_percent - base_share.cumulative_percent;
            let significant = test.z.abs() >= critical_z;
            Row {
                name: key.to_string(),
                key: key.clone(),
                base: base_share,
                head: head_share,
                self_change_points: head_share.self_percent - base_share.self_percent,
                cumulative_change_points: cumulative_change,
                cumulative_change_ns_per_run: head_share
                    .cumulative_ns_per_run
                    .zip(base_share.cumulative_ns_per_run)
                    .map(|(h, b)| h - b),
                z: test.z,
                p_value: test.p_value,
                significant,
                fails: significant
                    && options
                        .fail_above
                        .is_some_and(|limit| cumulative_change > limit),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.cumulative_change_points
            .total_cmp(&a.cumulative_change_points)
            .then_with(|| a.key.cmp(&b.key))
    });
    let verdict = verdict(&rows, options);
    Ok(Comparison {
        sample_type: base.sample_type.clone(),
        by,
        confidence: options.confidence,
        critical_z,
        fail_above: options.fail_above,
        base: totals(base, nanos),
        head: totals(head, nanos),
        verdict,
        rows,
    })
}

impl Comparison {
    /// Significant rises, largest first.
    pub fn regressions(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.is_regression())
    }

    /// Significant falls, largest first.
    pub fn improvements(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().rev().filter(|r| r.is_improvement())
    }
}

/// The confidence as a percentage without float noise: 0.99 as "99%", 0.999 as "99.9%".
fn confidence_label(confidence: f64) -> String {
    format!("{}%", (confidence * 1e5).round() / 1e3)
}

fn files(side: &Side) -> Vec<String> {
    side.files.iter().map(|f| f.display().to_string()).collect()
}

fn totals(side: &Side, nanos: Option<f64>) -> Totals {
    Totals {
        files: files(side),
        runs: side.runs(),
        samples: side.total_samples,
        total: side.total_value,
        time_per_run_ns: nanos.map(|n| side.total_value as f64 * n / side.runs() as f64),
    }
}

fn share(side: &Side, cost: &Cost, nanos: Option<f64>) -> Share {
    let percent = |value: i64| 100.0 * value as f64 / side.total_value as f64;
    let per_run = |value: i64| nanos.map(|n| value as f64 * n / side.runs() as f64);
    Share {
        self_samples: cost.self_samples,
        cumulative_samples: cost.cumulative_samples,
        self_percent: percent(cost.self_value),
        cumulative_percent: percent(cost.cumulative_value),
        self_ns_per_run: per_run(cost.self_value),
        cumulative_ns_per_run: per_run(cost.cumulative_value),
    }
}

fn verdict(rows: &[Row], options: Options) -> Verdict {
    let failing: Vec<&Row> = rows.iter().filter(|r| r.fails).collect();
    let regressions = rows.iter().filter(|r| r.is_regression()).count();
    let improvements = rows.iter().filter(|r| r.is_improvement()).count();
    let confidence = confidence_label(options.confidence);
    let summary = match (options.fail_above, failing.as_slice()) {
        (None, _) => format!(
            "{regressions} significant regressions and {improvements} significant improvements \
             at {confidence} confidence"
        ),
        (Some(limit), []) => format!(
            "PASS: no function's cumulative share rose significantly by more than {limit} points \
             ({regressions} smaller significant regressions, {improvements} improvements)"
        ),
        (Some(limit), failing) => {
            let named: Vec<String> = failing
                .iter()
                .map(|r| format!("{} (+{:.1})", r.name, r.cumulative_change_points))
                .collect();
            format!(
                "FAIL: cumulative share rose significantly by more than {limit} points in {}",
                named.join(", ")
            )
        }
    };
    Verdict {
        failed: !failing.is_empty(),
        summary,
        failing: failing.iter().map(|r| r.name.clone()).collect(),
        significant_regressions: regressions,
        significant_improvements: improvements,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use input::tests::go_profile;

    fn side(name: &str, stacks: &[(&[&str], i64)]) -> Side {
        Side::from_profile(Path::new(name), &go_profile(stacks), None, KeyBy::Function).unwrap()
    }

    const STRICT: Options = Options {
        confidence: 0.99,
        fail_above: Some(5.0),
    };

    #[test]
    fn a_doubled_function_fails_and_the_rest_moves_the_other_way() {
        // light doubles: 300 of 1000 samples become 600 of 1300.
        let base = side(
            "base",
            &[
                (&["heavy", "main"], 600),
                (&["light", "main"], 300),
                (&["leaf", "main"], 100),
            ],
        );
        let head = side(
            "head",
            &[
                (&["heavy", "main"], 600),
                (&["light", "main"], 600),
                (&["leaf", "main"], 100),
            ],
        );
        let c = compare(&base, &head, KeyBy::Function, STRICT).unwrap();
        assert!(c.verdict.failed, "{c:#?}");
        assert_eq!(c.verdict.failing, ["light"]);
        let light = &c.rows[0];
        assert_eq!(light.name, "light");
        assert!((light.base.cumulative_percent - 30.0).abs() < 1e-9);
        assert!((light.head.cumulative_percent - 600.0 / 13.0).abs() < 1e-9);
        // Absolute time per run: 3 s to 6 s of CPU.
        assert_eq!(light.cumulative_change_ns_per_run, Some(3e9));
        assert_eq!(c.head.time_per_run_ns, Some(13e9));
        assert!(c.improvements().any(|r| r.name == "heavy"));
        assert_eq!(c.regressions().count(), 1);
        let main = c.rows.iter().find(|r| r.name == "main").unwrap();
        assert!(!main.significant && main.cumulative_change_points == 0.0);
        assert!((c.critical_z - 2.575_829_303_548_9).abs() < 1e-7);
    }

    #[test]
    fn a_small_or_noisy_rise_does_not_fail() {
        let base = side("base", &[(&["a", "main"], 50), (&["b", "main"], 50)]);
        // a: 50% to 58% of 100 samples is a big rise, but not significant with so few samples.
        let head = side("head", &[(&["a", "main"], 58), (&["b", "main"], 42)]);
        let c = compare(&base, &head, KeyBy::Function, STRICT).unwrap();
        assert!(!c.verdict.failed, "{c:#?}");
        assert!(
            c.verdict.summary.starts_with("PASS"),
            "{}",
            c.verdict.summary
        );
        // Significant but small: 50% to 53% of a million samples.
        let base = side(
            "base",
            &[(&["a", "main"], 500_000), (&["b", "main"], 500_000)],
        );
        let head = side(
            "head",
            &[(&["a", "main"], 530_000), (&["b", "main"], 470_000)],
        );
        let c = compare(&base, &head, KeyBy::Function, STRICT).unwrap();
        assert!(
            c.rows[0].significant && !c.rows[0].fails,
            "{:#?}",
            c.rows[0]
        );
        assert!(!c.verdict.failed);
        // Without --fail-above nothing fails, however large.
        let loose = Options {
            fail_above: None,
            ..STRICT
        };
        let c = compare(&base, &head, KeyBy::Function, loose).unwrap();
        assert!(!c.verdict.failed && c.rows.iter().all(|r| !r.fails));
    }

    #[test]
    fn merged_runs_give_time_per_run() {
        let mut base = side("b1", &[(&["a", "main"], 10)]);
        base.merge(side("b2", &[(&["a", "main"], 30)])).unwrap();
        let head = side("h1", &[(&["a", "main"], 20)]);
        let c = compare(&base, &head, KeyBy::Function, STRICT).unwrap();
        assert_eq!(c.base.runs, 2);
        assert_eq!(c.base.samples, 40);
        // 40 samples of 10 ms over two runs: 200 ms per run, like head's one run.
        assert_eq!(c.base.time_per_run_ns, Some(2e8));
        assert_eq!(c.rows[0].cumulative_change_ns_per_run, Some(0.0));
    }

    #[test]
    fn empty_or_mismatched_sides_are_refused() {
        let full = side("full", &[(&["a"], 1)]);
        let empty = side("empty", &[]);
        let err = compare(&full, &empty, KeyBy::Function, STRICT).unwrap_err();
        assert_eq!(err.to_string(), "head (empty) holds no cpu samples");
        let counts = Side::from_profile(
            Path::new("c"),
            &go_profile(&[(&["a"], 1)]),
            Some("samples"),
            KeyBy::Function,
        )
        .unwrap();
        let err = compare(&full, &counts, KeyBy::Function, STRICT).unwrap_err();
        assert!(
            err.to_string()
                .contains("cpu/nanoseconds but head has samples/count"),
            "{err}"
        );
    }
}
