//! `profiler diff` end to end: a workload made slower in one function is caught, runs of the
//! same binary are not, Go's own profiles compare by their function names, several runs merge,
//! every output format holds the numbers, and bad input is one line with exit code 2.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use flate2::{write::GzEncoder, Compression};
use profiler_proto::pprof::{Function, Line, Location, Profile, Sample, ValueType};
use profiler_tests::*;
use prost::Message as _;
use serde_json::Value;

/// `profiler record -F HZ -o DIR/NAME -- BINARY shares-cpu SECONDS`: the shares workload until
/// it has used SECONDS of CPU, so that a busy machine does not cut the number of samples.
fn record_shares(t: &BpfTest, name: &str, hz: &str, binary: &Path, seconds: &str) -> PathBuf {
    let out = t.path(name);
    profiler_ok(&[
        "record",
        "-F",
        hz,
        "-o",
        path_str(&out),
        "--",
        path_str(binary),
        "shares-cpu",
        seconds,
    ]);
    out
}

/// `profiler diff ARGS --format json`: the exit code and the decoded report.
fn diff_json(args: &[&str]) -> (i32, Value) {
    let out = profiler(&[&["diff", "--format", "json"], args].concat());
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

/// The report's row for `name`.
fn row<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no row for {name}"))
}

/// Names of the rows whose cumulative share rose significantly.
fn regressions(report: &Value) -> Vec<&str> {
    report["functions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["significant"] == true && f["cumulative_change_points"].as_f64() > Some(0.0))
        .map(|f| f["name"].as_str().unwrap())
        .collect()
}

fn number(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"))
}

#[test]
fn a_function_made_twice_as_expensive_is_flagged() {
    let Some(t) = bpf_test() else { return };
    let head_binary = compile("workload-light6", &["-O0", "-g", "-DLIGHT_UNITS=6"]);
    let base = record_shares(&t, "base.pb.gz", "999", &workload(), "2");
    let head = record_shares(&t, "head.pb.gz", "999", &head_binary, "2");
    let svg = t.path("diff.svg");
    let (code, report) = diff_json(&[
        path_str(&base),
        path_str(&head),
        "--fail-above",
        "5",
        "--svg",
        path_str(&svg),
    ]);
    assert_eq!(code, 1, "{report:#}");
    // light is the one regression that matters. The first few ms of a process can be walked
    // before its tables are in (no `_start`), and how many samples that is varies with start-up:
    // a fresh CI run saw `_start` rise 0.8 points at |z| 2.9. Significant, but not a regression
    // of the workload's work.
    assert!(regressions(&report).contains(&"light"), "{report:#}");
    for other in regressions(&report)
        .into_iter()
        .filter(|name| *name != "light")
    {
        let change = number(&row(&report, other)["cumulative_change_points"]);
        assert!(change < 2.0, "{other} rose {change:.1} points: {report:#}");
    }
    assert_eq!(report["verdict"]["failing"], serde_json::json!(["light"]));
    // light goes from 3 of 10 units to 6 of 13.
    let light = row(&report, "light");
    let (before, after) = (
        number(&light["base"]["cumulative_percent"]),
        number(&light["head"]["cumulative_percent"]),
    );
    assert!(
        (before - 30.0).abs() < 5.0 && (after - 46.2).abs() < 5.0,
        "{light:#}"
    );
    assert!(
        number(&light["cumulative_change_ns_per_run"]) > 0.0,
        "{light:#}"
    );
    // heavy did not change, but its share fell: an improvement, never a failure.
    assert_eq!(row(&report, "heavy")["fails"], false);

    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = parse_svg(&text);
    assert!(doc
        .descendants()
        .any(|n| n.text().is_some_and(|t| t.contains("light"))));

    // The default table says the same.
    let out = profiler(&[
        "diff",
        path_str(&base),
        path_str(&head),
        "--fail-above",
        "5",
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(
        table.contains("FAIL") && table.contains("light  [fails]"),
        "{table}"
    );
}

#[test]
fn recordings_of_the_same_binary_do_not_fail() {
    let Some(t) = bpf_test() else { return };
    let mut failures = Vec::new();
    // 999 Hz for 3 s of CPU: about 3000 samples a side. Then a 5-point rise of light (30 %) or
    // heavy (60 %) is 4 standard deviations of the difference (1.2 and 1.3 points), which
    // chance reaches about once in 30,000 pairs. With 1 s (1000 samples) it was 2.4 deviations:
    // 5.5 points at |z| 2.69 failed one CI run in ten pairs. CPU seconds, not wall seconds: a
    // busy machine gave 3 wall seconds only 1,900 samples.
    for pair in 0..5 {
        let base = record_shares(&t, &format!("a{pair}.pb.gz"), "999", &workload(), "3");
        let head = record_shares(&t, &format!("b{pair}.pb.gz"), "999", &workload(), "3");
        let (code, report) = diff_json(&[path_str(&base), path_str(&head), "--fail-above", "5"]);
        let largest = report["functions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| number(&f["z"]).abs())
            .fold(0.0, f64::max);
        eprintln!("pair {pair}: exit {code}, largest |z| {largest:.2}");
        // The bound above holds only with that many samples.
        for side in ["base", "head"] {
            let samples = number(&report[side]["samples"]);
            assert!(samples >= 2000.0, "{side}: {samples} samples");
        }
        if code != 0 {
            failures.push(report["verdict"]["summary"].to_string());
        }
    }
    assert!(failures.is_empty(), "false positives: {failures:?}");
}

/// A Go program that burns CPU in `main.spinA` and `main.spinB` for the given milliseconds
/// per round, under runtime/pprof.
const GO_PROGRAM: &str = r#"package main

import (
	"fmt"
	"os"
	"runtime/pprof"
	"strconv"
	"time"
)

var sink uint64

//go:noinline
func spinA(d time.Duration) {
	for end := time.Now().Add(d); time.Now().Before(end); {
		for i := uint64(0); i < 1000; i++ {
			sink += i ^ (sink >> 3)
		}
	}
}

//go:noinline
func spinB(d time.Duration) {
	for end := time.Now().Add(d); time.Now().Before(end); {
		for i := uint64(0); i < 1000; i++ {
			sink += i ^ (sink >> 5)
		}
	}
}

func main() {
	a, _ := strconv.Atoi(os.Args[2])
	b, _ := strconv.Atoi(os.Args[3])
	rounds, _ := strconv.Atoi(os.Args[4])
	f, err := os.Create(os.Args[1])
	if err == nil {
		err = pprof.StartCPUProfile(f)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for i := 0; i < rounds; i++ {
		spinA(time.Duration(a) * time.Millisecond)
		spinB(time.Duration(b) * time.Millisecond)
	}
	pprof.StopCPUProfile()
	f.Close()
}
"#;

/// Builds GO_PROGRAM in `dir` with Debian's Go, offline and with every cache inside `dir`.
fn build_go_program(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("main.go"), GO_PROGRAM).unwrap();
    std::fs::write(dir.join("go.mod"), "module spin\n\ngo 1.19\n").unwrap();
    let binary = dir.join("spin");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(dir)
        .env("HOME", dir)
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0")
        .output()
        .expect("go (golang-go) must be installed: cargo xtask setup installs it");
    assert!(
        out.status.success(),
        "go build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

#[test]
fn go_cpu_profiles_compare_by_go_function_names() {
    let dir = tempfile::tempdir().unwrap();
    let binary = build_go_program(dir.path());
    let run = |name: &str, a_ms: &str, b_ms: &str| {
        let out = dir.path().join(name);
        let status = Command::new(&binary)
            .arg(&out)
            .args([a_ms, b_ms, "60"])
            .status()
            .unwrap();
        assert!(status.success());
        out
    };
    // spinB's share goes from a third to a half.
    let base = run("base.pprof", "20", "10");
    let head = run("head.pprof", "20", "20");
    let (code, report) = diff_json(&[path_str(&base), path_str(&head), "--fail-above", "5"]);
    assert_eq!(
        report["sample_type"],
        serde_json::json!({"type": "cpu", "unit": "nanoseconds"})
    );
    // Go profiles at 100 Hz: the samples/count value, not nanoseconds, is what is tested.
    let samples: i64 = read_samples(&base).iter().map(|s| s.count).sum();
    assert_eq!(report["base"]["samples"], samples);
    let (a, b) = (row(&report, "main.spinA"), row(&report, "main.spinB"));
    assert!(number(&a["base"]["cumulative_percent"]) > 50.0, "{a:#}");
    assert!(number(&b["cumulative_change_points"]) > 0.0, "{b:#}");
    // The exit code follows the verdict, whichever way this run's samples fell.
    let failed = report["verdict"]["failed"] == true;
    assert_eq!(code, i32::from(failed), "{report:#}");
    assert_eq!(failed, b["fails"] == true, "{report:#}");

    let out = profiler(&["diff", path_str(&base), path_str(&head)]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "no --fail-above: {table}");
    assert!(table.contains("main.spin"), "{table}");
}

/// Our sample types: a count and CPU time, 10 ms per sample.
const CPU: &[(&str, &str)] = &[("samples", "count"), ("cpu", "nanoseconds")];

/// A profile with `types` and one sample per stack (function names leaf first) holding `count`
/// in every count type and `count` × 10 ms in every other.
fn synthetic(types: &[(&str, &str)], stacks: &[(&[&str], i64)]) -> Profile {
    let mut strings = vec![String::new()];
    let mut intern = |s: &str| match strings.iter().position(|t| t == s) {
        Some(i) => i as i64,
        None => {
            strings.push(s.to_owned());
            strings.len() as i64 - 1
        }
    };
    let sample_type = types
        .iter()
        .map(|(kind, unit)| ValueType {
            r#type: intern(kind),
            unit: intern(unit),
        })
        .collect();
    let mut names: Vec<&str> = Vec::new();
    let mut sample = Vec::new();
    for (stack, count) in stacks {
        let location_id = stack
            .iter()
            .map(|name| match names.iter().position(|n| n == name) {
                Some(i) => i as u64 + 1,
                None => {
                    names.push(name);
                    names.len() as u64
                }
            })
            .collect();
        let value = types
            .iter()
            .map(|(_, unit)| {
                if *unit == "count" {
                    *count
                } else {
                    count * 10_000_000
                }
            })
            .collect();
        sample.push(Sample {
            location_id,
            value,
            label: vec![],
        });
    }
    let ids = 1..=names.len() as u64;
    let function = ids
        .clone()
        .zip(&names)
        .map(|(id, name)| Function {
            id,
            name: intern(name),
            ..Default::default()
        })
        .collect();
    let location = ids
        .map(|id| Location {
            id,
            line: vec![Line {
                function_id: id,
                line: 0,
                column: 0,
            }],
            ..Default::default()
        })
        .collect();
    Profile {
        sample_type,
        sample,
        function,
        location,
        string_table: strings,
        period: 10_000_000,
        ..Default::default()
    }
}

/// Writes `profile` to DIR/NAME, gzipped when the name ends in .gz.
fn write_profile(dir: &Path, name: &str, profile: &Profile) -> PathBuf {
    let path = dir.join(name);
    let raw = profile.encode_to_vec();
    let bytes = if name.ends_with(".gz") {
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&raw).unwrap();
        gz.finish().unwrap()
    } else {
        raw
    };
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A profile where `work` has `work` of 1000 samples and `other` the rest, both under main.
fn work_profile(dir: &Path, name: &str, work: i64) -> String {
    let profile = synthetic(
        CPU,
        &[(&["work", "main"], work), (&["other", "main"], 1000 - work)],
    );
    path_str(&write_profile(dir, name, &profile)).to_owned()
}

#[test]
fn several_runs_per_side_merge_and_every_format_holds_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Gzipped and plain files mixed: both are pprof.
    let (b1, b2) = (
        work_profile(d, "b1.pb.gz", 300),
        work_profile(d, "b2.pb", 320),
    );
    let (h1, h2) = (
        work_profile(d, "h1.pb", 500),
        work_profile(d, "h2.pb.gz", 520),
    );
    let svg = d.join("diff.svg");
    let listed = [format!("{b1},{b2}"), format!("{h1},{h2}")];
    let (code, report) = diff_json(&[&listed[0], &listed[1], "--fail-above", "5"]);
    let (flag_code, flagged) = diff_json(&[
        "--base",
        &b1,
        "--base",
        &b2,
        "--head",
        &h1,
        "--head",
        &h2,
        "--fail-above",
        "5",
        "--svg",
        path_str(&svg),
    ]);
    assert_eq!((code, flag_code), (1, 1));
    assert_eq!(report, flagged, "both syntaxes merge the same");

    assert_eq!(report["base"]["files"], serde_json::json!([b1, b2]));
    assert_eq!(report["base"]["runs"], 2);
    assert_eq!(report["base"]["samples"], 2000);
    assert_eq!(report["head"]["samples"], 2000);
    // 2000 samples of 10 ms over two runs.
    assert_eq!(report["base"]["time_per_run_ns"], 1e10);
    let work = row(&report, "work");
    assert_eq!(work["base"]["cumulative_samples"], 620);
    assert_eq!(work["head"]["cumulative_samples"], 1020);
    assert_eq!(work["base"]["cumulative_percent"], 31.0);
    assert_eq!(work["head"]["cumulative_percent"], 51.0);
    assert_eq!(work["cumulative_change_points"], 20.0);
    assert_eq!(work["cumulative_change_ns_per_run"], 2e9);
    assert_eq!(work["fails"], true);
    assert!(number(&work["p_value"]) < 1e-30, "{work:#}");
    assert_eq!(row(&report, "main")["significant"], false);
    assert_eq!(report["verdict"]["failing"], serde_json::json!(["work"]));

    // Markdown: a heading, the verdict, and table rows with the same numbers.
    let out = profiler(&[
        "diff",
        &listed[0],
        &listed[1],
        "--fail-above",
        "5",
        "--format",
        "markdown",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let md = String::from_utf8(out.stdout).unwrap();
    let mut lines = md.lines();
    assert_eq!(
        lines.next(),
        Some("### Profile diff: ❌ regression"),
        "{md}"
    );
    assert!(md.contains("\n**FAIL**: "), "{md}");
    let cells = |name: &str| -> Vec<String> {
        let line = md
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("no row for {name}: {md}"));
        line.trim_matches('|')
            .split(" | ")
            .map(|c| c.trim().to_owned())
            .collect()
    };
    let work = cells("work");
    let p = format!("{:.1e}", number(&row(&report, "work")["p_value"]));
    assert_eq!(
        work,
        [
            "`work`",
            "31.0%",
            "51.0%",
            "+20.0",
            "31.0%",
            "51.0%",
            "+2.00 s",
            p.as_str(),
            "❌ fails"
        ],
        "{md}"
    );
    assert_eq!(cells("other")[1..4], ["69.0%", "49.0%", "-20.0"], "{md}");
    assert!(
        md.contains("| runs | 2 | 2 |") && md.contains("| samples | 2000 | 2000 |"),
        "{md}"
    );

    // The differential flame graph draws both functions.
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = parse_svg(&text);
    for name in ["work", "other"] {
        assert!(
            doc.descendants()
                .any(|n| n.text().is_some_and(|t| t.starts_with(name))),
            "{name} missing from the SVG"
        );
    }
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = work_profile(d, "good.pb.gz", 300);
    let text = d.join("notes.txt");
    std::fs::write(&text, "not a profile\n").unwrap();
    let counts_only = write_profile(d, "counts.pb", &synthetic(&CPU[..1], &[(&["main"], 5)]));
    let empty = write_profile(d, "empty.pb", &synthetic(CPU, &[]));
    let missing = d.join("missing.pb.gz");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[path_str(&missing), &good],
            &["cannot read", "missing.pb.gz"],
        ),
        (
            &[&good, path_str(&text)],
            &["notes.txt is not a pprof profile"],
        ),
        (
            &[&good, &good, "--sample-type", "alloc_space"],
            &[
                "no sample type `alloc_space`",
                "samples/count, cpu/nanoseconds",
            ],
        ),
        // Without --sample-type each side takes cpu, else its first type: those differ.
        (
            &[&good, path_str(&counts_only)],
            &["cpu/nanoseconds", "samples/count", "--sample-type"],
        ),
        (
            &[&format!("{good},{}", path_str(&counts_only)), &good],
            &["sample type"],
        ),
        (&[&good, path_str(&empty)], &["holds no cpu samples"]),
        (&[&good], &["give the base and head profiles"]),
        (&[&good, &good, "--base", &good], &["cannot be used with"]),
        (
            &[&good, &good, "--confidence", "1.5"],
            &["confidence between 0 and 1"],
        ),
        (
            &[&good, &good, "--svg", "/nonexistent-dir/d.svg"],
            &["cannot write"],
        ),
    ];
    for (args, needles) in cases {
        let out: Output = profiler(&[&["diff"], *args].concat());
        assert_one_line_error(&out, 2, needles);
        assert!(out.stdout.is_empty(), "{args:?} wrote a report");
    }
}

/// The CI action's script (deploy/ci/profile-diff.sh, which action.yml and so the example
/// workflow run) calls the profiler with flags it has.
#[test]
fn the_ci_action_uses_existing_flags() {
    let script = std::fs::read_to_string(root().join("deploy/ci/profile-diff.sh")).unwrap();
    let flags = |text: &str| -> Vec<String> {
        text.split(|c: char| c.is_whitespace() || c == '(' || c == ')')
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(str::to_owned)
            .collect()
    };
    let help = |command: &str| {
        String::from_utf8_lossy(&profiler(&[command, "--help"]).stdout).into_owned()
    };
    let (record_help, diff_help) = (help("record"), help("diff"));
    let (mut checked, mut records) = (0, 0);
    for line in script.lines().filter(|l| !l.trim_start().starts_with('#')) {
        if let Some((_, rest)) = line.split_once("\"$PROFILER\" record ") {
            records += 1;
            for flag in flags(rest.split(" -- ").next().unwrap()) {
                assert!(
                    record_help.contains(&flag),
                    "`profiler record` has no {flag}: {line}"
                );
                checked += 1;
            }
            // Short flags too (-F, -o).
            for flag in rest
                .split_whitespace()
                .filter(|w| w.len() == 2 && w.starts_with('-'))
            {
                assert!(
                    record_help.contains(flag),
                    "`profiler record` has no {flag}: {line}"
                );
            }
        }
        if line.contains("args=(diff ") || line.contains("args+=(") {
            for flag in flags(line) {
                assert!(
                    diff_help.contains(&flag),
                    "`profiler diff` has no {flag}: {line}"
                );
                checked += 1;
            }
        }
    }
    assert!(
        records >= 1 && checked >= 4,
        "the action should record and diff with flags ({records} records, {checked} flags)"
    );
}
