//! Measures table builds: rows, bytes, and build time per MiB of CFI.
//!
//! `cargo run --release -p profiler-unwind --example table_stats -- [FILE...]`
//! (default: Debian's libc and python3.11). Prints one tab-separated line per file:
//! path, rows, rows before merging, table bytes, .eh_frame bytes, .debug_frame bytes,
//! median build time in ms, and ms per MiB of CFI. Exits 2 on a file it cannot read.

use std::path::PathBuf;
use std::time::Duration;

use profiler_unwind::{build_from_path, Options};

const RUNS: usize = 7;

fn main() {
    let mut paths: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if paths.is_empty() {
        paths = ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/python3.11"]
            .map(PathBuf::from)
            .to_vec();
    }
    println!("path\trows\trows_before_merging\ttable_bytes\teh_frame_bytes\tdebug_frame_bytes\tbuild_ms\tms_per_mib");
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
        let median = times[RUNS / 2].as_secs_f64() * 1e3;
        let cfi = (table.stats.eh_frame_bytes + table.stats.debug_frame_bytes) as f64;
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{:.3}\t{:.3}",
            path.display(),
            table.rows.len(),
            table.stats.rows_before_dedup,
            table.size_bytes(),
            table.stats.eh_frame_bytes,
            table.stats.debug_frame_bytes,
            median,
            median / (cfi / (1024.0 * 1024.0)),
        );
    }
}
