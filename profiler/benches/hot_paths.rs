//! Criterion micro-benchmarks of the userspace hot paths: decoding kernel stacks, symbol
//! cache look-ups and pprof building.

mod common;

use std::{fs::File, hint::black_box, sync::Arc};

use criterion::{criterion_group, criterion_main, Criterion};
use profiler::{aggregate::ProfileBuilder, resolve::Symbols};
use profiler_common::{Stack, MAX_STACK_DEPTH};

fn stack_decode(c: &mut Criterion) {
    let mut stack = Stack {
        len: 24,
        exact: [1, 0],
        addrs: [0; MAX_STACK_DEPTH],
    };
    for (i, addr) in stack.addrs.iter_mut().enumerate().take(24) {
        *addr = 0x5555_0000_0000 + i as u64 * 0x40;
    }
    c.bench_function("stack decode (24 frames)", |b| {
        b.iter(|| {
            let frames: Arc<[u64]> = Arc::from(black_box(&stack).frames());
            frames
        })
    });
}

fn symbol_cache(c: &mut Criterion) {
    let (key, offsets) = common::own_code_offsets(256);
    let mut symbols = Symbols::new(&[]);
    symbols.add_object(
        key,
        File::open("/proc/self/exe").unwrap(),
        std::path::Path::new("/proc/self/exe"),
        profiler::in_root::ProcessRoot::open(std::process::id()).ok(),
    );
    symbols.load_file_offsets(&key, &offsets);
    let mut i = 0;
    c.bench_function("symbol cache hit", |b| {
        b.iter(|| {
            i = (i + 1) % offsets.len();
            symbols.file_lines(&key, black_box(offsets[i]))
        })
    });
}

fn pprof_building(c: &mut Criterion) {
    let samples = common::stacks(1_000, 24);
    c.bench_function("pprof build (1000 stacks)", |b| {
        b.iter(|| {
            let mut builder = ProfileBuilder::new(99);
            builder.add(black_box(&samples));
            builder.build(1)
        })
    });
}

criterion_group!(benches, stack_decode, symbol_cache, pprof_building);
criterion_main!(benches);
