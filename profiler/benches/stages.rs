//! Stage timings for `cargo xtask bench`: symbolization (cold and warm), Go's `.gopclntab`
//! against blazesym, profile building and perf-map parsing.
//! Prints one JSON object per result on stdout. Argument: full, quick or smoke.

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    fs::File,
    io::Write as _,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use profiler::{
    aggregate::ProfileBuilder,
    export::encode_gzipped,
    resolve::{PerfMap, PerfMapStats, Symbols},
};

/// Counts the bytes allocated, so that the perf map's memory is measured, not estimated.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn emit(stage: &str, config: &str, metric: &str, unit: &str, value: f64) {
    println!(
        "{{\"stage\":\"{stage}\",\"config\":\"{config}\",\"metric\":\"{metric}\",\"unit\":\"{unit}\",\"value\":{value}}}"
    );
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "full".into());
    let (addresses, stack_counts, perf_map_lines): (usize, &[usize], usize) = match mode.as_str() {
        "smoke" => (200, &[100], 2_000),
        "quick" => (5_000, &[1_000, 10_000], 100_000),
        _ => (20_000, &[1_000, 10_000, 50_000], 250_000),
    };
    perf_map(perf_map_lines);

    // Symbolization of N distinct addresses in a large binary with DWARF.
    let (key, offsets) = common::own_code_offsets(addresses);
    let mut symbols = Symbols::new(&[]);
    symbols.add_object(
        key,
        File::open("/proc/self/exe").expect("opening our own binary"),
        std::path::Path::new("/proc/self/exe"),
        profiler::in_root::ProcessRoot::open(std::process::id()).ok(),
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

    gopclntab(&mode, addresses);

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

/// A Go program: a small one for the smoke run, one with net/http's thousands of functions
/// otherwise.
fn go_program(mode: &str) -> &'static str {
    if mode == "smoke" {
        "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(1) }\n"
    } else {
        "package main\n\nimport \"net/http\"\n\nfunc main() { _ = http.ListenAndServe(\":0\", nil) }\n"
    }
}

/// Look-ups in an unstripped Go binary's `.gopclntab` (names, files, lines, inlined calls)
/// against blazesym's in its symbol table and DWARF, at `count` pcs spread over its functions.
/// Skipped (with a note on stderr) when no Go toolchain is installed.
fn gopclntab(mode: &str, count: usize) {
    use blazesym::symbolize::{source::Elf, source::Source, Input, Symbolized, Symbolizer};
    use profiler::resolve::gopclntab::GoTable;

    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("main.go"), go_program(mode)).expect("writing main.go");
    std::fs::write(dir.path().join("go.mod"), "module bench\ngo 1.18\n").expect("go.mod");
    let binary = dir.path().join("bench");
    let built = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(dir.path())
        .status();
    if !built.is_ok_and(|s| s.success()) {
        eprintln!("gopclntab bench skipped: `go build` failed (golang-go not installed?)");
        return;
    }
    let data = std::fs::read(&binary).expect("reading the Go binary");
    let table = GoTable::parse(&data)
        .ok()
        .flatten()
        .expect("the Go binary's .gopclntab");
    // pcs a few bytes into functions, spread over the whole table.
    let pcs: Vec<u64> = (0..count)
        .map(|i| {
            let f = (i * 7919) % table.len();
            table.entry(&data, f).expect("an entry") + (i % 13) as u64
        })
        .collect();
    let config = format!("{count} pcs, {} Go functions", table.len());

    let started = Instant::now();
    let mut go_names = Vec::with_capacity(pcs.len());
    for pc in &pcs {
        let lines = table.lookup(&data, *pc).ok().flatten();
        go_names.push(lines.and_then(|l| l.last().map(|l| l.function.to_owned())));
    }
    let go_secs = started.elapsed().as_secs_f64();

    let symbolizer = Symbolizer::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .build();
    let source = Source::Elf(Elf::new(&binary));
    let started = Instant::now();
    let results = symbolizer
        .symbolize(&source, Input::VirtOffset(&pcs))
        .expect("blazesym symbolizes the Go binary");
    let blaze_secs = started.elapsed().as_secs_f64();
    // Again, with the symbol table and DWARF already parsed.
    let started = Instant::now();
    let again = symbolizer
        .symbolize(&source, Input::VirtOffset(&pcs))
        .expect("blazesym symbolizes the Go binary");
    let blaze_warm_secs = started.elapsed().as_secs_f64();
    assert_eq!(again.len(), results.len());
    let agree = results
        .iter()
        .zip(&go_names)
        .filter(|(r, go)| match (r, go) {
            (Symbolized::Sym(sym), Some(go)) => sym.name == go.as_str(),
            _ => false,
        })
        .count();
    // blazesym leaves the padding after a function unnamed (past its symbol's size); the
    // pclntab gives it to the function before.
    let blaze_named = results
        .iter()
        .filter(|r| matches!(r, Symbolized::Sym(_)))
        .count();

    let rate = |secs: f64| count as f64 / secs.max(1e-9);
    emit(
        "gopclntab",
        &config,
        "pclntab look-ups (cold)",
        "/s",
        rate(go_secs),
    );
    emit(
        "gopclntab",
        &config,
        "blazesym look-ups (cold, DWARF)",
        "/s",
        rate(blaze_secs),
    );
    emit(
        "gopclntab",
        &config,
        "blazesym look-ups (parsed, DWARF)",
        "/s",
        rate(blaze_warm_secs),
    );
    emit(
        "gopclntab",
        &config,
        "same outer function where blazesym names one",
        "%",
        100.0 * agree as f64 / blaze_named.max(1) as f64,
    );
}

/// Perf-map parsing: lines per second and memory per 100k entries, from a file of V8-like
/// lines (a tenth of them overlapping earlier code, as when code moves).
fn perf_map(lines: usize) {
    let mut file = tempfile::tempfile().expect("a temporary file");
    let mut text = String::new();
    for i in 0..lines as u64 {
        let start = if i % 10 == 9 {
            0x1000 + (i - 5) * 0x100 + 0x40
        } else {
            0x1000 + i * 0x100
        };
        text.push_str(&format!(
            "{start:x} c0 JS:*handler_{i} /app/src/module_{}.js:{}:{}\n",
            i % 97,
            i % 1000,
            i % 80
        ));
    }
    file.write_all(text.as_bytes())
        .expect("writing the perf map");
    let mut map = PerfMap::default();
    let mut stats = PerfMapStats::default();
    let before = ALLOCATED.load(Ordering::Relaxed);
    let started = Instant::now();
    // Each read takes in a bounded slice of the file: read until all of it is in.
    while stats.lines < lines as u64 {
        let lines_before = stats.lines;
        let file = file.try_clone().expect("cloning the descriptor");
        map.read_from(file, lines, &mut stats).expect("reading");
        assert!(stats.lines > lines_before, "no progress");
    }
    let secs = started.elapsed().as_secs_f64();
    let bytes = ALLOCATED.load(Ordering::Relaxed).saturating_sub(before);
    let config = format!("{lines} lines, {} entries", map.len());
    emit(
        "perfmap",
        &config,
        "parse rate",
        "lines/s",
        lines as f64 / secs,
    );
    emit(
        "perfmap",
        &config,
        "memory per 100k entries",
        "MiB",
        bytes as f64 / map.len() as f64 * 100_000.0 / (1 << 20) as f64,
    );
    assert_eq!(stats.malformed, 0);
}
