//! Hostile input: files built to exhaust or crash the profiler must get one clear error line
//! and bounded work.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use profiler_tests::*;

/// Runs the profiler with `args`, returning (exit code, stderr, peak RSS in KiB). The peak is
/// the largest of this test process's waited-for children so far (`RUSAGE_CHILDREN`): only
/// profiler runs here.
fn run_measured(args: &[&str]) -> (Option<i32>, String, i64) {
    let output = Command::new(profiler_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        usage.ru_maxrss,
    )
}

/// A 2 MB file that inflates to 2 GiB is refused at the cap, in bounded memory.
#[test]
fn a_gzip_bomb_is_refused_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb.pb.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&bomb).unwrap(),
        flate2::Compression::best(),
    );
    let chunk = vec![0u8; 16 << 20];
    for _ in 0..128 {
        gz.write_all(&chunk).unwrap();
    }
    gz.finish().unwrap();
    let size = std::fs::metadata(&bomb).unwrap().len();
    assert!(size < 4 << 20, "{size} bytes");

    let (code, stderr, peak_kib) = run_measured(&["diff", path_str(&bomb), path_str(&bomb)]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("more than 128 MiB"),
        "{stderr}"
    );
    assert!(peak_kib <= 256 * 1024, "peak RSS {peak_kib} KiB");

    // The cap is a flag.
    let (code, stderr, _) = run_measured(&[
        "diff",
        "--max-size",
        "1MiB",
        path_str(&bomb),
        path_str(&bomb),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("than 1 MiB (--max-size)"), "{stderr}");
    let (code, stderr, _) = run_measured(&["diff", "--max-size", "lots", "a", "b"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("lots"), "{stderr}");
}
