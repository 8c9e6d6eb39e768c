//! Measures table builds: rows, bytes, distinct rules, and build time per MiB of CFI.
//!
//! `cargo run --release -p profiler-unwind --example table_stats -- [--json] [FILE...]`
//! (default: Debian's libc and python3.11). Prints a tab-separated table, or with `--json` one
//! flat JSON object per measurement (the format `cargo xtask bench` reads). Exits 2 on a file it
//! cannot build a table for.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use profiler_unwind::{build_from_path, Options};

const RUNS: usize = 7;

fn main() {
    let mut json = false;
    let mut paths = Vec::new();
    for arg in std::env::args_os().skip(1) {
        if arg == "--json" {
            json = true;
        } else {
            paths.push(PathBuf::from(arg));
        }
    }
    if paths.is_empty() {
        paths = ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/python3.11"]
            .map(PathBuf::from)
            .to_vec();
    }
    if !json {
        println!(
            "file\trows\tbefore merging\tdistinct rules\tKiB\tCFI KiB\tbuild ms\tms per MiB of CFI"
        );
    }
    for path in paths {
        let mut times: Vec<Duration> = Vec::new();
        let mut table = None;
        for _ in 0..RUNS {
            match build_from_path(&path, &Options::default()) {
                Ok(built) => {
                    times.push(built.stats.build_time);
                    table = Some(built);
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", path.display());
                    std::process::exit(2);
                }
            }
        }
        let table = table.expect("RUNS > 0");
        times.sort();
        let build_ms = times[RUNS / 2].as_secs_f64() * 1e3;
        let cfi_bytes = (table.stats.eh_frame_bytes + table.stats.debug_frame_bytes) as f64;
        let ms_per_mib = build_ms / (cfi_bytes / (1024.0 * 1024.0));
        let rules: HashSet<_> = table
            .rows
            .iter()
            .map(|r| (r.kind, r.rbp_rule, r.rbp_offset, r.cfa_offset))
            .collect();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let kib = table.size_bytes() as f64 / 1024.0;
        if json {
            let emit = |metric: &str, unit: &str, value: f64| {
                println!(
                    "{{\"stage\":\"unwind tables\",\"config\":\"{name}\",\"metric\":\"{metric}\",\"unit\":\"{unit}\",\"value\":{value}}}"
                )
            };
            emit("rows", "rows", table.rows.len() as f64);
            emit("table size", "KiB", kib);
            emit("distinct rules", "rules", rules.len() as f64);
            emit("build time", "ms", build_ms);
            emit("build time per MiB of CFI", "ms", ms_per_mib);
        } else {
            println!(
                "{name}\t{}\t{}\t{}\t{kib:.0}\t{:.0}\t{build_ms:.1}\t{ms_per_mib:.1}",
                table.rows.len(),
                table.stats.rows_before_dedup,
                rules.len(),
                cfi_bytes / 1024.0,
            );
        }
    }
}
