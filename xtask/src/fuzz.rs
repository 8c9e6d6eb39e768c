//! `cargo xtask fuzz [--seconds N] [TARGET...]`: every cargo-fuzz target in `fuzz/` (or the
//! ones named) for N seconds each, from the checked-in seed corpus.
//!
//! libFuzzer's finds go under `target/fuzz/`, never into the checked-in corpus: a crash is
//! reported with the path of its input, which then belongs in `fuzz/corpus/TARGET/` (the suite
//! replays that directory on every run, so the crash stays fixed).

use std::ffi::OsString;
use std::fs;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{run, workspace_root, NIGHTLY};

/// Seconds per target when `--seconds` is not given.
const DEFAULT_SECONDS: u64 = 60;

pub fn fuzz(args: &[OsString]) -> Result<()> {
    let (seconds, wanted) = parse_args(args)?;
    let root = workspace_root();
    let all = targets()?;
    let chosen: Vec<String> = if wanted.is_empty() {
        all
    } else {
        for name in &wanted {
            if !all.contains(name) {
                bail!("no fuzz target `{name}`; there are: {}", all.join(", "));
            }
        }
        wanted
    };
    install_cargo_fuzz()?;
    for name in &chosen {
        let found = root.join("target/fuzz/corpus").join(name);
        let artifacts = root.join("target/fuzz/artifacts").join(name);
        for dir in [&found, &artifacts] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        println!("xtask: fuzzing {name} for {seconds} s");
        let mut cmd = nightly_cargo();
        cmd.current_dir(root.join("fuzz"))
            .args(["fuzz", "run", name])
            // New inputs go to the first directory; the seeds are only read.
            .arg(&found)
            .arg(root.join("fuzz/corpus").join(name))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1");
        run(&mut cmd).with_context(|| {
            format!(
                "fuzz target {name} failed: its input is in {}; add it to fuzz/corpus/{name}/ \
                 once fixed",
                artifacts.display()
            )
        })?;
    }
    println!(
        "xtask: {} fuzz targets ran {seconds} s each without a crash",
        chosen.len()
    );
    Ok(())
}

/// `--seconds N` and target names.
fn parse_args(args: &[OsString]) -> Result<(u64, Vec<String>)> {
    let mut seconds = DEFAULT_SECONDS;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .to_str()
            .with_context(|| format!("argument {} is not UTF-8", arg.display()))?;
        match arg {
            "--seconds" => {
                let value = args.next().context("--seconds needs a number")?;
                seconds = value
                    .to_str()
                    .and_then(|v| v.parse().ok())
                    .filter(|s| *s > 0)
                    .with_context(|| {
                        format!(
                            "--seconds takes a whole number above 0, not {}",
                            value.display()
                        )
                    })?;
            }
            flag if flag.starts_with('-') => bail!("unknown fuzz option `{flag}`"),
            name => targets.push(name.to_owned()),
        }
    }
    Ok((seconds, targets))
}

/// The target names: the files of `fuzz/fuzz_targets/`.
fn targets() -> Result<Vec<String>> {
    let dir = workspace_root().join("fuzz/fuzz_targets");
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// `cargo fuzz` for the nightly toolchain (libFuzzer's instrumentation needs nightly flags).
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", NIGHTLY, "cargo"])
        // What `cargo xtask` ran under would otherwise pick the stable toolchain's tools.
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN")
        // The targets never load the eBPF programs, and the eBPF crate must not be built with
        // libFuzzer's flags (it overflows BPF's stack): profiler/build.rs embeds an empty object.
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

/// Installs cargo-fuzz unless `cargo fuzz` already answers.
fn install_cargo_fuzz() -> Result<()> {
    let present = nightly_cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if present {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz");
    run(Command::new("rustup").args([
        "run",
        "stable",
        "cargo",
        "install",
        "cargo-fuzz",
        "--locked",
    ]))
}
