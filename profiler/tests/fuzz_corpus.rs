//! Every seed and every past crash in `fuzz/corpus/` through its fuzz target's entry point, on
//! every suite run: what libFuzzer found once stays fixed without running libFuzzer.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

#[test]
fn every_corpus_input_passes_its_target() {
    let mut failures = Vec::new();
    for (name, target) in profiler::fuzz::TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.is_file())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{} holds no seed", dir.display());
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failures.push(input.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "inputs that fail: {failures:?}");
}

/// Mutations of each seed per target in the short pass below.
const MUTATIONS_PER_SEED: u64 = 2000;

/// CI's short fuzzing pass: libFuzzer's instrumented build costs more minutes than a CI run has,
/// so every seed is mutated here instead, the way libFuzzer starts (bit flips, byte changes,
/// cuts, inserts and repeated chunks), without its coverage guidance. Deterministic: a failure
/// names the seed and the mutation number, which `mutate` reproduces.
#[test]
fn a_short_mutation_pass_over_every_seed() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for (name, target) in profiler::fuzz::TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.is_file())
            .collect();
        seeds.sort();
        for seed in seeds {
            let data = std::fs::read(&seed).unwrap();
            for n in 0..MUTATIONS_PER_SEED {
                let input = mutate(&data, n);
                runs += 1;
                if std::panic::catch_unwind(|| target(&input)).is_err() {
                    failures.push(format!("{} mutation {n}", seed.display()));
                }
            }
        }
    }
    assert!(runs > 1000, "{runs} runs");
    assert!(failures.is_empty(), "inputs that fail: {failures:?}");
}

/// Mutation `n` of `data`: one to eight edits chosen by a generator seeded with `n`.
fn mutate(data: &[u8], n: u64) -> Vec<u8> {
    let mut state = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut out = data.to_vec();
    for _ in 0..=next() % 8 {
        let at = |out: &Vec<u8>, r: u64| (r % (out.len() as u64 + 1)) as usize;
        match next() % 6 {
            0 if !out.is_empty() => {
                let i = at(&out, next()).min(out.len() - 1);
                out[i] ^= 1 << (next() % 8);
            }
            1 if !out.is_empty() => {
                // Bytes parsers treat specially: lengths and offsets at their extremes.
                let i = at(&out, next()).min(out.len() - 1);
                out[i] = [0, 0xff, 0x7f, 0x80, b'\n', b' ', b'0'][(next() % 7) as usize];
            }
            2 => {
                let cut = at(&out, next());
                out.truncate(cut);
            }
            3 => {
                let i = at(&out, next());
                let byte = next() as u8;
                out.insert(i, byte);
            }
            4 if !out.is_empty() => {
                let start = at(&out, next()).min(out.len() - 1);
                let len = ((next() % 64) as usize).min(out.len() - start);
                let chunk = out[start..start + len].to_vec();
                let i = at(&out, next());
                out.splice(i..i, chunk);
            }
            _ if out.len() >= 4 => {
                // A 32-bit field set to its largest value.
                let i = at(&out, next()).min(out.len() - 4);
                out[i..i + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            }
            _ => {}
        }
    }
    out
}

/// The targets cargo-fuzz builds and the ones the replay runs are the same set.
#[test]
fn every_target_has_a_cargo_fuzz_binary() {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut binaries: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|entry| {
            let path = entry.unwrap().path();
            let stem = path.file_stem()?.to_str()?.to_owned();
            (path.extension()? == "rs").then_some(stem)
        })
        .collect();
    binaries.sort();
    let mut targets: Vec<String> = profiler::fuzz::TARGETS
        .iter()
        .map(|(name, _)| name.to_string())
        .collect();
    targets.sort();
    assert_eq!(binaries, targets);
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for name in &targets {
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")),
            "fuzz/Cargo.toml has no [[bin]] for {name}"
        );
    }
}
