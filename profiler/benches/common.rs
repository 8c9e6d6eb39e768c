//! Inputs shared by the benchmarks: synthetic resolved stacks and addresses in a real binary.

use std::sync::Arc;

use profiler::resolve::{FileKey, Frame, Line, Mapping, ResolvedSample};

/// `count` distinct stacks of `depth` frames over a pool of functions in three binaries, as
/// the resolve stage would hand them to aggregation.
pub fn stacks(count: usize, depth: usize) -> Vec<ResolvedSample> {
    let mappings: Vec<Arc<Mapping>> = (0..3u64)
        .map(|i| {
            Arc::new(Mapping {
                id: 10 + i,
                start: 0x40_0000 * (i + 1),
                end: 0x40_0000 * (i + 2),
                offset: 0,
                path: format!("/usr/lib/lib{i}.so"),
                file: Some(FileKey {
                    dev: 8,
                    ino: i,
                    size: 1,
                    mtime_ns: 0,
                }),
                build_id: format!("{i:040x}"),
                is_main: i == 0,
                load_bias: 0,
            })
        })
        .collect();
    let functions: Vec<Arc<[Line]>> = (0..500)
        .map(|i| {
            Arc::from(vec![Line {
                function: Arc::from(format!("module::function_{i}")),
                file: Some(Arc::from(format!("src/file_{}.rs", i % 40))),
                line: (i * 7 % 900) as u32,
            }])
        })
        .collect();
    (0..count)
        .map(|s| {
            let frames = (0..depth)
                .map(|d| {
                    let f = (s * 31 + d * 17) % functions.len();
                    let mapping = &mappings[f % mappings.len()];
                    Frame {
                        address: mapping.start + (f as u64) * 64 + (s as u64 % 8),
                        mapping: Some(mapping.clone()),
                        lines: functions[f].clone(),
                    }
                })
                .collect();
            ResolvedSample {
                process: Default::default(),
                pid: 1000 + (s % 50) as u32,
                tid: 1000 + (s % 200) as u32,
                comm: Arc::from("bench"),
                thread: Arc::from("worker"),
                frames,
                count: 1 + (s % 5) as u64,
                off_cpu: false,
            }
        })
        .collect()
}

/// `count` distinct file offsets in this benchmark's own executable (a large binary with debug
/// info), spread over its executable mapping, and the key of that binary.
pub fn own_code_offsets(count: usize) -> (FileKey, Vec<u64>) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("reading /proc/self/maps");
    let exe = std::fs::read_link("/proc/self/exe").expect("reading /proc/self/exe");
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || !fields[1].contains('x') || fields[5] != exe.to_str().unwrap() {
            continue;
        }
        let (start, end) = fields[0].split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let offset = u64::from_str_radix(fields[2], 16).unwrap();
        let key = FileKey::of(&exe).expect("stat of the benchmark's own binary");
        let step = ((end - start) / count as u64).max(1);
        let offsets = (0..count as u64).map(|i| offset + i * step).collect();
        return (key, offsets);
    }
    panic!("no executable mapping of {}", exe.display());
}
