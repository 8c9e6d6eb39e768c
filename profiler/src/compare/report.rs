//! The comparison's outputs: a table for a terminal, markdown for a pull-request comment, JSON
//! for tools, and a differential flame graph.

use std::io::Write;

use anyhow::{Context as _, Result};

use super::{confidence_label, Comparison, Row, Side, Totals};
use crate::export::FoldedStack;

/// The format of the report on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// Aligned columns for a terminal or a CI log.
    Table,
    /// Markdown ready to post as a pull-request comment.
    Markdown,
    /// Every function with every number, for tools.
    Json,
}

/// The heads of the number columns, shared by the table and markdown outputs; the function
/// column comes last in the table (names vary in length) and first in markdown (it reads best).
const NUMBER_HEADS: [&str; 7] = [
    "cum base",
    "cum head",
    "change",
    "self base",
    "self head",
    "time/run",
    "p-value",
];

/// The report as aligned text: verdict, then the `top` largest significant regressions and
/// improvements.
pub fn write_table(c: &Comparison, top: usize, out: &mut impl Write) -> Result<()> {
    writeln!(out, "base: {}", side_line(&c.base))?;
    writeln!(out, "head: {}", side_line(&c.head))?;
    writeln!(
        out,
        "compared by {} on {}; significant when |z| >= {:.2} ({} two-sided)",
        by_name(c),
        c.sample_type,
        c.critical_z,
        confidence_label(c.confidence)
    )?;
    writeln!(out, "{}", c.verdict.summary)?;
    for (title, rows) in sections(c, top) {
        writeln!(out, "\n{title}:")?;
        if rows.is_empty() {
            writeln!(out, "  none")?;
            continue;
        }
        for head in NUMBER_HEADS {
            write!(out, "{head:>11}")?;
        }
        writeln!(out, "  function")?;
        for row in rows {
            for cell in cells(row) {
                write!(out, "{cell:>11}")?;
            }
            let flag = if row.fails { "  [fails]" } else { "" };
            writeln!(out, "  {}{flag}", row.name)?;
        }
    }
    writeln!(out, "\n{}", noise_line(c))?;
    Ok(())
}

/// The report as markdown for a pull-request comment: a heading that gives the verdict at a
/// glance, the verdict line, both sides' totals, and tables of the top regressions and
/// improvements.
pub fn write_markdown(c: &Comparison, top: usize, out: &mut impl Write) -> Result<()> {
    let heading = match (c.fail_above, c.verdict.failed) {
        (None, _) => "Profile diff",
        (Some(_), true) => "Profile diff: ❌ regression",
        (Some(_), false) => "Profile diff: ✅ no regression",
    };
    writeln!(out, "### {heading}\n")?;
    let (verdict, rest) = match c.verdict.summary.split_once(": ") {
        Some((word @ ("PASS" | "FAIL"), rest)) => (format!("**{word}**: "), rest),
        _ => (String::new(), c.verdict.summary.as_str()),
    };
    writeln!(out, "{verdict}{}\n", escape(rest))?;
    writeln!(out, "| | base | head |\n|---|--:|--:|")?;
    writeln!(out, "| runs | {} | {} |", c.base.runs, c.head.runs)?;
    writeln!(out, "| samples | {} | {} |", c.base.samples, c.head.samples)?;
    if let (Some(b), Some(h)) = (c.base.time_per_run_ns, c.head.time_per_run_ns) {
        writeln!(
            out,
            "| {} per run | {} | {} |",
            c.sample_type.kind,
            duration(b, false),
            duration(h, false)
        )?;
    }
    writeln!(
        out,
        "\nCompared by {} on `{}`. A change is significant when a two-sided two-proportion z-test \
         on the sample counts gives p < {} ({} confidence).",
        by_name(c),
        c.sample_type,
        round(1.0 - c.confidence),
        confidence_label(c.confidence)
    )?;
    for (title, rows) in sections(c, top) {
        writeln!(out, "\n#### {title}\n")?;
        if rows.is_empty() {
            writeln!(out, "None.")?;
            continue;
        }
        writeln!(out, "| function | {} | |", NUMBER_HEADS.join(" | "))?;
        writeln!(out, "|---|{}---|", "--:|".repeat(NUMBER_HEADS.len()))?;
        for row in rows {
            let flag = if row.fails { "❌ fails" } else { "" };
            writeln!(
                out,
                "| `{}` | {} | {flag} |",
                escape(&row.name.replace('`', "'")),
                cells(row).join(" | ")
            )?;
        }
    }
    writeln!(out, "\n<sub>{}</sub>", noise_line(c))?;
    Ok(())
}

/// The whole comparison as JSON: totals, verdict, and every key with all its numbers.
pub fn write_json(c: &Comparison, out: &mut impl Write) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, c)?;
    writeln!(out)?;
    Ok(())
}

/// A differential flame graph: head's stacks, red where head spends more than base, blue where
/// less. Base is scaled to head's total first, since two runs rarely take the same time.
pub fn write_svg(base: &Side, head: &Side, out: &mut impl Write) -> Result<()> {
    let mut diff = Vec::new();
    inferno::differential::from_readers(
        inferno::differential::Options {
            normalize: true,
            strip_hex: false,
        },
        folded(base).as_bytes(),
        folded(head).as_bytes(),
        &mut diff,
    )
    .context("diffing the stacks")?;
    let mut options = inferno::flamegraph::Options::default();
    options.title = "Differential flame graph: head against base".into();
    options.subtitle =
        Some("red: more expensive in head, blue: cheaper (base scaled to head's total)".into());
    options.count_name = match head.sample_type.unit.as_str() {
        "count" => "samples".into(),
        unit => unit.into(),
    };
    if diff.is_empty() {
        // inferno refuses an empty input; stacks without frames still get a valid picture.
        diff.extend_from_slice(b"[no stacks] 1 1\n");
    }
    inferno::flamegraph::from_reader(&mut options, diff.as_slice(), out)
        .context("drawing the flame graph")?;
    Ok(())
}

/// A side's stacks as folded lines, for inferno.
fn folded(side: &Side) -> String {
    let mut text = String::new();
    for (frames, &count) in &side.stacks {
        if frames.is_empty() {
            continue;
        }
        let stack = FoldedStack {
            process: String::new(),
            frames: frames.clone(),
            count,
        };
        text.push_str(&stack.line());
        text.push('\n');
    }
    text
}

/// The two tables: top significant regressions and improvements.
fn sections(c: &Comparison, top: usize) -> [(&'static str, Vec<&Row>); 2] {
    [
        ("Top regressions", c.regressions().take(top).collect()),
        ("Top improvements", c.improvements().take(top).collect()),
    ]
}

/// A row's numbers in [`NUMBER_HEADS`] order.
fn cells(row: &Row) -> Vec<String> {
    vec![
        format!("{:.1}%", row.base.cumulative_percent),
        format!("{:.1}%", row.head.cumulative_percent),
        format!("{:+.1}", row.cumulative_change_points),
        format!("{:.1}%", row.base.self_percent),
        format!("{:.1}%", row.head.self_percent),
        row.cumulative_change_ns_per_run
            .map_or_else(|| "-".to_owned(), |ns| duration(ns, true)),
        p_value(row.p_value),
    ]
}

fn side_line(t: &Totals) -> String {
    let runs = if t.runs == 1 { "run" } else { "runs" };
    let time = t
        .time_per_run_ns
        .map(|ns| format!(", {} per run", duration(ns, false)))
        .unwrap_or_default();
    format!(
        "{} {runs}, {} samples{time} ({})",
        t.runs,
        t.samples,
        t.files.join(", ")
    )
}

fn by_name(c: &Comparison) -> &'static str {
    match c.by {
        super::KeyBy::Function => "function",
        super::KeyBy::File => "function and file",
        super::KeyBy::Line => "function, file and line",
    }
}

/// The rows left out of both tables because their change is within the noise.
fn noise_line(c: &Comparison) -> String {
    let quiet = c.rows.iter().filter(|r| !r.significant).count();
    format!(
        "{quiet} of {} functions changed within the noise. cum: share of the samples with the \
         function anywhere on the stack; self: as the leaf; change: in percentage points; \
         time/run: change in cumulative time per run.",
        c.rows.len()
    )
}

/// A p-value as people read it; a p-value below the smallest double prints as a bound.
fn p_value(p: f64) -> String {
    if p == 0.0 {
        "<1e-300".to_owned()
    } else if p < 1e-3 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

/// Nanoseconds in the unit that keeps the number short, with a sign when `signed`.
fn duration(ns: f64, signed: bool) -> String {
    let sign = if !signed || ns == 0.0 {
        ""
    } else if ns < 0.0 {
        "-"
    } else {
        "+"
    };
    let abs = ns.abs();
    let text = if abs >= 1e9 {
        format!("{:.2} s", abs / 1e9)
    } else if abs >= 1e6 {
        format!("{:.1} ms", abs / 1e6)
    } else if abs >= 1e3 {
        format!("{:.1} µs", abs / 1e3)
    } else {
        format!("{abs:.0} ns")
    };
    format!("{sign}{text}")
}

/// `x` without float noise in its last digits (1 − 0.99 is 0.010000000000000009).
fn round(x: f64) -> f64 {
    (x * 1e9).round() / 1e9
}

/// Text made safe inside a markdown table cell.
fn escape(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::compare::{compare, input::tests::go_profile, KeyBy, Options};

    fn comparison() -> (Side, Side, Comparison) {
        let side = |name: &str, light: i64| {
            let profile = go_profile(&[
                (&["heavy", "main"], 600),
                (&["light", "main"], light),
                (&["a|b", "main"], 10),
            ]);
            Side::from_profile(Path::new(name), &profile, None, KeyBy::Function).unwrap()
        };
        let (base, head) = (side("base.pb.gz", 300), side("head.pb.gz", 600));
        let options = Options {
            confidence: 0.99,
            fail_above: Some(5.0),
        };
        let c = compare(&base, &head, KeyBy::Function, options).unwrap();
        (base, head, c)
    }

    #[test]
    fn table_and_markdown_name_the_failing_function() {
        let (_, _, c) = comparison();
        let mut table = Vec::new();
        write_table(&c, 10, &mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(table.contains("FAIL"), "{table}");
        let light = table
            .lines()
            .find(|l| l.ends_with("light  [fails]"))
            .unwrap();
        assert!(
            light.contains("+16.6") && light.contains("+3.00 s"),
            "{table}"
        );

        let mut md = Vec::new();
        write_markdown(&c, 10, &mut md).unwrap();
        let md = String::from_utf8(md).unwrap();
        assert!(md.starts_with("### Profile diff: ❌ regression\n"), "{md}");
        assert!(md.contains("**FAIL**: "), "{md}");
        assert!(md.contains("p < 0.01 (99% confidence)"), "{md}");
        assert!(md.contains("| `light` | 33.0% | 49.6% | +16.6 |"), "{md}");
    }

    #[test]
    fn json_holds_every_function() {
        let (_, _, c) = comparison();
        let mut json = Vec::new();
        write_json(&c, &mut json).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["verdict"]["failing"][0], "light");
        assert_eq!(value["functions"].as_array().unwrap().len(), 4);
        assert_eq!(value["sample_type"]["type"], "cpu");
        assert_eq!(value["base"]["samples"], 910);
        assert_eq!(value["functions"][0]["function"], "light");
        assert_eq!(value["functions"][0]["head"]["cumulative_samples"], 600);
    }

    #[test]
    fn svg_is_a_differential_flame_graph() {
        let (base, head, _) = comparison();
        let mut svg = Vec::new();
        write_svg(&base, &head, &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("<svg") && svg.contains("light"), "{svg}");
        assert!(svg.contains("Differential flame graph"));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(duration(3e9, true), "+3.00 s");
        assert_eq!(duration(-2.5e6, true), "-2.5 ms");
        assert_eq!(duration(1500.0, false), "1.5 µs");
        assert_eq!(duration(0.0, true), "0 ns");
        assert_eq!(p_value(0.0), "<1e-300");
        assert_eq!(p_value(1.9e-25), "1.9e-25");
        assert_eq!(p_value(0.0337), "0.034");
        assert_eq!(round(1.0 - 0.99), 0.01);
        assert_eq!(escape("a|b"), "a\\|b");
    }
}
