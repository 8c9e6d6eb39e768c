//! Stage timings for `cargo xtask bench`: symbolization (cold and warm) and profile building.
//! Prints one JSON object per result on stdout. Argument: full, quick or smoke.

mod common;

use std::{fs::File, time::Instant};

use profiler::{aggregate::ProfileBuilder, export::encode_gzipped, resolve::Symbols};

fn emit(stage: &str, config: &str, metric: &str, unit: &str, value: f64) {
    println!(
        "{{\"stage\":\"{stage}\",\"config\":\"{config}\",\"metric\":\"{metric}\",\"unit\":\"{unit}\",\"value\":{value}}}"
    );
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "full".into());
    let (addresses, stack_counts): (usize, &[usize]) = match mode.as_str() {
        "smoke" => (200, &[100]),
        "quick" => (5_000, &[1_000, 10_000]),
        _ => (20_000, &[1_000, 10_000, 50_000]),
    };

    // Symbolization of N distinct addresses in a large binary with DWARF.
    let (key, offsets) = common::own_code_offsets(addresses);
    let mut symbols = Symbols::new(&[]);
    symbols.add_object(
        key,
        File::open("/proc/self/exe").expect("opening our own binary"),
    );
    let config = format!("{addresses} addresses, own release binary");
    let started = Instant::now();
    for offset in &offsets {
        symbols.is_cached(&key, *offset);
    }
    symbols.load_file_offsets(&key, &offsets);
    let cold = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut named = 0;
    for offset in &offsets {
        if symbols.is_cached(&key, *offset) && !symbols.file_lines(&key, *offset).is_empty() {
            named += 1;
        }
    }
    let warm = started.elapsed().as_secs_f64();
    let per = |secs: f64| 1e6 * secs / addresses as f64;
    emit("symbolize", &config, "cold, per address", "µs", per(cold));
    emit("symbolize", &config, "warm, per address", "µs", per(warm));
    let lookups = (symbols.hits + symbols.misses) as f64;
    emit(
        "symbolize",
        &config,
        "cache hit rate (cold + warm pass)",
        "%",
        100.0 * symbols.hits as f64 / lookups,
    );
    emit(
        "symbolize",
        &config,
        "addresses named",
        "%",
        100.0 * named as f64 / addresses as f64,
    );

    // Building and gzipping a pprof from K distinct stacks of 24 frames.
    for &count in stack_counts {
        let samples = common::stacks(count, 24);
        let started = Instant::now();
        let mut builder = ProfileBuilder::new(99);
        builder.add(&samples);
        let profile = builder.build(1_000_000_000);
        let bytes = encode_gzipped(&profile).expect("encoding");
        let secs = started.elapsed().as_secs_f64();
        let config = format!("{count} distinct stacks x 24 frames");
        emit("pprof", &config, "build + gzip time", "ms", secs * 1e3);
        emit(
            "pprof",
            &config,
            "gzipped size",
            "KiB",
            bytes.len() as f64 / 1024.0,
        );
    }
}
