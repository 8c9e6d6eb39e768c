//! The parsers of untrusted input, each as one function of bytes that panics only when the
//! parser broke a promise. The cargo-fuzz targets in `fuzz/` call these, and so does the
//! replay test over the checked-in corpus, so that the suite runs every seed and every past
//! crash on each build without libFuzzer.

use std::collections::BTreeMap;
use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::Path;

use crate::compare::{self, KeyBy, Options, Side};
use crate::resolve::{parse_perf_map_line, PerfMap, PerfMapStats, PERF_MAP_MAX_LINE};

/// A fuzz target: takes any bytes, panics only on a broken promise.
pub type Target = fn(&[u8]);

/// The fuzz targets by name: the directory names of `fuzz/corpus/` and of `fuzz/fuzz_targets/`.
pub const TARGETS: [(&str, Target); 7] = [
    ("pprof", pprof),
    ("perf_map", perf_map),
    ("unwind_table", unwind_table),
    ("gopclntab", gopclntab),
    ("relabel", relabel),
    ("cgroup", cgroup),
    ("proc_maps", proc_maps),
];

/// `profiler diff`'s reader: decode (gunzip within the size cap), then every way of keying a
/// side, and a comparison of the side with itself, which must find no change.
pub fn pprof(data: &[u8]) {
    let Ok(profile) = compare::decode_profile(data) else {
        return;
    };
    for by in [KeyBy::Function, KeyBy::File, KeyBy::Line] {
        let Ok(side) = Side::from_profile(Path::new("fuzz.pb"), &profile, None, by) else {
            continue;
        };
        let options = Options {
            confidence: 0.99,
            fail_above: Some(5.0),
        };
        if let Ok(same) = compare::compare(&side, &side, by, options) {
            assert!(
                same.rows.iter().all(|row| !row.fails),
                "a profile compared with itself fails"
            );
            let mut out = Vec::new();
            compare::write_table(&same, 20, &mut out).expect("writing to memory");
            compare::write_json(&same, &mut out).expect("writing to memory");
            compare::write_svg(&side, &side, &mut out).expect("writing to memory");
        }
    }
}

/// The perf-map reader, fed the file in two appends as a JIT writes it. What it keeps must be
/// what a plain reading of the lines says: for every address, the last complete, well-formed
/// line that covers it (entries overlap when V8 moves code). With little room, it keeps no
/// more entries than allowed.
pub fn perf_map(data: &[u8]) {
    let cut = data.len() / 2;
    let file = memfd();
    let mut map = PerfMap::default();
    let mut stats = PerfMapStats::default();
    let room = 1 << 20;
    for part in [&data[..cut], &data[cut..]] {
        let mut writer = file.try_clone().expect("dup of a memfd");
        writer.seek(SeekFrom::End(0)).expect("seek in a memfd");
        writer.write_all(part).expect("write to a memfd");
        map.read_from(file.try_clone().expect("dup of a memfd"), room, &mut stats)
            .expect("reading a memfd");
    }
    // The plain reading: complete lines only, none over MAX_LINE, later lines win.
    let mut lines: Vec<(u64, u64, &str)> = Vec::new();
    let mut pieces: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    pieces.pop(); // after the last newline: not a complete line yet
    for piece in pieces {
        if piece.len() <= PERF_MAP_MAX_LINE {
            lines.extend(parse_perf_map_line(piece));
        }
    }
    let addresses = lines
        .iter()
        .flat_map(|&(start, size, _)| [start, start + size - 1, start + size]);
    for addr in addresses {
        let expected = lines
            .iter()
            .rev()
            .find(|&&(start, size, _)| start <= addr && addr - start < size)
            .map(|&(_, _, name)| name);
        assert_eq!(
            map.lookup(addr).map(|name| &**name),
            expected,
            "at {addr:#x}"
        );
    }

    let mut small = PerfMap::default();
    small
        .read_from(file, 3, &mut PerfMapStats::default())
        .expect("reading a memfd");
    assert!(small.len() <= 3, "{} entries in room for 3", small.len());
}

/// The unwind-table compiler on an ELF file: rows sorted by pc, and a row lookup anywhere
/// answers without panicking.
pub fn unwind_table(data: &[u8]) {
    let Ok(table) = profiler_unwind::build(data, None, &profiler_unwind::Options::default()) else {
        return;
    };
    assert!(
        table.rows.windows(2).all(|w| w[0].pc <= w[1].pc),
        "rows out of order"
    );
    for row in table.rows.iter().step_by(17) {
        let vaddr = table.base + u64::from(row.pc);
        assert!(table.row_for(vaddr).is_some(), "no row at {vaddr:#x}");
    }
    let _ = table.row_for(0);
    let _ = table.row_for(u64::MAX);
}

/// Go's `.gopclntab` in an ELF file: every function's entry and the byte after it looked up,
/// as the symbolizer does for stripped Go binaries.
pub fn gopclntab(data: &[u8]) {
    use crate::resolve::gopclntab::GoTable;
    let Ok(Some(table)) = GoTable::parse(data) else {
        return;
    };
    for i in 0..table.len().min(1024) {
        if let Ok(entry) = table.entry(data, i) {
            let _ = table.lookup(data, entry);
            let _ = table.lookup(data, entry.wrapping_add(1));
        }
    }
    let _ = table.lookup(data, 0);
    let _ = table.lookup(data, u64::MAX);
}

/// The agent config file's `relabel_configs`, compiled and applied to a pod's labels.
pub fn relabel(data: &[u8]) {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        relabel_configs: Vec<profiler_metadata::relabel::RelabelConfig>,
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = toml::from_str::<File>(text) else {
        return;
    };
    let Ok(relabeler) = profiler_metadata::relabel::Relabeler::new(&file.relabel_configs) else {
        return;
    };
    let mut labels: BTreeMap<String, String> = [
        ("service_name", "checkout"),
        ("__meta_kubernetes_namespace", "shop"),
        ("__meta_kubernetes_pod_name", "checkout-7d4f9-x2k8q"),
        ("__meta_kubernetes_pod_label_app", "checkout"),
        ("comm", "java"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    relabeler.apply(&mut labels);
}

/// `/proc/PID/cgroup` text to a container ID.
pub fn cgroup(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(found) = profiler_metadata::cgroup::container_id_from_cgroup(text) {
            let id = &found.id;
            assert!(
                id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "not 64 lowercase hex digits: {id:?}"
            );
        }
    }
}

/// `/proc/PID/maps` text, as the resolver reads it: every executable mapping, none inverted.
/// (procfs's parser, used here before, panicked on a short `/SYSV` path.)
pub fn proc_maps(data: &[u8]) {
    for mapping in crate::resolve::executable_mappings(data, None) {
        assert!(mapping.start <= mapping.end, "an inverted mapping");
        assert!(
            mapping.path.is_some() || !mapping.deleted,
            "deleted without a path"
        );
    }
}

/// An anonymous in-memory file: the perf-map reader takes a real file, and a memfd needs no
/// directory and no cleanup.
fn memfd() -> std::fs::File {
    use std::os::fd::FromRawFd as _;
    // SAFETY: a static NUL-terminated name; the returned fd is checked and then owned by File.
    let fd = unsafe { libc::memfd_create(c"fuzz-perf-map".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nobody else owns.
    unsafe { std::fs::File::from_raw_fd(fd) }
}
