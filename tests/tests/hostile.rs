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

/// Starts `command`, a run of tests/workloads/anonexec.c, and returns it with what it prints
/// first: its pid, and the start and size of its code in anonymous memory.
fn spawn_anonexec(command: &mut Command) -> (std::process::Child, [String; 3]) {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    let fields: [String; 3] = fields.try_into().unwrap();
    (child, fields)
}

/// A "container" (a chroot) whose /tmp is a symlink to an absolute path: the profiler must
/// resolve it inside the container's root, never on the host, where a perf map of the same
/// path names the code otherwise. (A perf map that is itself a symlink is refused: the unit
/// tests of `in_root` cover that.)
#[test]
fn a_perf_map_behind_a_symlink_in_a_chroot_is_read_inside_it_not_on_the_host() {
    let Some(t) = bpf_test() else { return };
    let program = compile_source("anonexec.c", "anonexec-static", &["-O1", "-static"]);
    let root = t.dir.path().join("root");
    // The same absolute path on the host and in the container.
    let target = format!("/profiler-test-{}", std::process::id());
    let host_dir = std::path::PathBuf::from(&target);
    std::fs::create_dir_all(&host_dir).unwrap();
    let _cleanup = RemoveOnDrop(host_dir.clone());
    let container_dir = root.join(&target[1..]);
    std::fs::create_dir_all(&container_dir).unwrap();
    std::os::unix::fs::symlink(&target, root.join("tmp")).unwrap();
    std::fs::copy(&program, root.join("anonexec")).unwrap();

    let (mut child, [pid, start, size]) =
        spawn_anonexec(Command::new("chroot").arg(&root).args(["/anonexec", "60"]));
    let map = format!("perf-{pid}.map");
    let map_line = |name: &str| format!("{start} {size} {name}\n");
    std::fs::write(host_dir.join(&map), map_line("host_file_was_read")).unwrap();
    std::fs::write(container_dir.join(&map), map_line("container_jit_code")).unwrap();

    let (out, stderr) = t.record(
        "chroot.pb.gz",
        &["--no-kernel", "-d", "2s", "--pid", &pid],
        &[],
    );
    let _ = child.kill();
    let _ = child.wait();
    let samples = read_samples(&out);
    let all: i64 = samples.iter().map(|s| s.count).sum();
    let named = |name: &str| -> i64 {
        samples
            .iter()
            .filter(|s| s.has_function(name))
            .map(|s| s.count)
            .sum()
    };
    assert_eq!(named("host_file_was_read"), 0, "{stderr}\n{samples:?}");
    assert!(
        all > 0 && named("container_jit_code") as f64 >= 0.8 * all as f64,
        "{} of {all} samples named from the container's map; {stderr}\n{samples:?}",
        named("container_jit_code")
    );
}

/// Counter `name` from a summary line (`name=N` among its warnings), 0 when it is not there.
fn summary_counter(stderr: &str, name: &str) -> u64 {
    stderr
        .split_once(&format!("{name}="))
        .and_then(|(_, rest)| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Where to patch a copy of an ELF file: `(file offset, size)` of section `name`.
fn section_range(data: &[u8], name: &str) -> (usize, usize) {
    use object::{Object as _, ObjectSection as _};
    let elf = object::File::parse(data).unwrap();
    let (offset, size) = elf.section_by_name(name).unwrap().file_range().unwrap();
    (offset as usize, size as usize)
}

/// `data` with the last byte of its build ID changed to `last`: another binary to every cache
/// keyed by build ID.
fn with_build_id(mut data: Vec<u8>, last: u8) -> Vec<u8> {
    let (offset, size) = section_range(&data, ".note.gnu.build-id");
    data[offset + size - 1] = last;
    data
}

/// A process that maps a truncated ELF, one whose first `.eh_frame` entry claims 4 GiB, and one
/// whose debug link names itself (and has no CFI, so the unwinder looks for its debug file),
/// next to one that maps none: both are profiled with full stacks, and the binaries that could
/// not be used are counted.
#[test]
fn hostile_binaries_are_counted_and_every_process_is_still_profiled() {
    let Some(t) = bpf_test() else { return };
    let program = compile_source("hostile_maps.c", "hostile_maps", &["-O1", "-g"]);
    let original = std::fs::read(&program).unwrap();
    let (id_at, id_size) = section_range(&original, ".note.gnu.build-id");
    let original_id_end = original[id_at + id_size - 1];
    let dir = t.dir.path().join("hostile");
    std::fs::create_dir_all(dir.join("other")).unwrap();

    // Program headers and build ID intact, section headers past the end.
    let truncated = dir.join("truncated.so");
    let copy = with_build_id(original.clone(), original_id_end ^ 1);
    std::fs::write(&truncated, &copy[..8192]).unwrap();

    let huge = dir.join("huge-eh-frame.so");
    let mut patched = with_build_id(original.clone(), original_id_end ^ 2);
    let (eh_frame, _) = section_range(&patched, ".eh_frame");
    patched[eh_frame..eh_frame + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    std::fs::write(&huge, &patched).unwrap();

    // `--add-gnu-debuglink` takes the link's name from the file it is given: a copy of the
    // same name elsewhere makes the result's link name itself (same build ID, wrong CRC).
    let self_linked = dir.join("self-linked.so");
    let stand_in = dir.join("other/self-linked.so");
    std::fs::copy(&program, &stand_in).unwrap();
    let status = Command::new("objcopy")
        .args([
            "--remove-section=.eh_frame",
            "--remove-section=.eh_frame_hdr",
        ])
        .arg("--remove-section=.debug_frame")
        .arg(format!("--add-gnu-debuglink={}", stand_in.display()))
        .arg(&program)
        .arg(&self_linked)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_file(&stand_in).unwrap();
    let relinked = std::fs::read(&self_linked).unwrap();
    std::fs::write(&self_linked, with_build_id(relinked, original_id_end ^ 3)).unwrap();

    let (out, stderr) = t.record(
        "hostile.pb.gz",
        &["--no-kernel"],
        &[
            path_str(&program),
            "3",
            path_str(&truncated),
            path_str(&huge),
            path_str(&self_linked),
        ],
    );
    let samples = read_samples(&out);
    let all: i64 = samples.iter().map(|s| s.count).sum();
    let share = |function: &str| -> f64 {
        let under_main: i64 = samples
            .iter()
            .filter(|s| {
                let at = s.functions.iter().position(|f| f == function);
                let main = s.functions.iter().position(|f| f == "main");
                matches!((at, main), (Some(a), Some(m)) if a < m)
            })
            .map(|s| s.count)
            .sum();
        100.0 * under_main as f64 / all.max(1) as f64
    };
    // Two busy processes on two CPUs: about half each, both walked to main.
    for function in ["spin_with_maps", "spin_elsewhere"] {
        assert!(
            share(function) >= 30.0,
            "{function}: {:.1}% under main; {stderr}\n{samples:?}",
            share(function)
        );
    }
    let errors = summary_counter(&stderr, "unwind_table_build_errors");
    assert!(errors >= 3, "{errors} build errors counted; {stderr}");
}

/// With a deadline no parse can meet, every binary is skipped, named in one line and counted,
/// and the recording goes on: its samples are kept, as file+0xADDR frames.
#[test]
fn binaries_that_take_too_long_to_parse_are_skipped_and_counted() {
    let Some(t) = bpf_test() else { return };
    let program = compile_source("workload.c", "workload-deadline", &["-O0", "-g"]);
    let (out, stderr) = t.record(
        "deadline.folded",
        &["--no-kernel", "--parse-timeout", "1us"],
        &[path_str(&program), "shares", "2"],
    );
    let folded = std::fs::read_to_string(&out).unwrap();
    let all: u64 = folded
        .lines()
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    assert!(all >= 300, "{all} samples; {stderr}");
    assert!(
        stderr.contains("took longer than --parse-timeout"),
        "{stderr}"
    );
    let timeouts = summary_counter(&stderr, "unwind_table_build_timeouts");
    assert!(timeouts >= 2, "{timeouts} table builds timed out; {stderr}");
    // The workload's own frames are unnamed now (its symbols were never read), but kept.
    assert!(!folded.contains("heavy"), "{folded}");
    assert!(folded.contains("workload-deadline+0x"), "{folded}");
}

/// A perf-map read past the deadline is abandoned, counted and named; that process's map is
/// not read again, and the recording goes on.
#[test]
fn a_perf_map_read_past_the_deadline_is_abandoned_and_counted() {
    let Some(t) = bpf_test() else { return };
    let program = compile_source("anonexec.c", "anonexec-deadline", &["-O1"]);
    let (mut child, [pid, start, size]) = spawn_anonexec(Command::new(&program).arg("60"));
    let map = std::path::PathBuf::from(format!("/tmp/perf-{pid}.map"));
    let _cleanup = RemoveOnDrop(map.clone());
    std::fs::write(&map, format!("{start} {size} jit_code\n")).unwrap();

    let (out, stderr) = t.record(
        "perfmap-deadline.folded",
        &[
            "--no-kernel",
            "--parse-timeout",
            "1us",
            "-d",
            "2s",
            "--pid",
            &pid,
        ],
        &[],
    );
    let _ = child.kill();
    let _ = child.wait();
    let folded = std::fs::read_to_string(&out).unwrap();
    assert!(!folded.is_empty(), "{stderr}");
    assert!(!folded.contains("jit_code"), "{folded}");
    assert!(stderr.contains("abandoned=1)"), "{stderr}");
    assert!(
        stderr.contains(&format!("not reading the perf map of process {pid} again")),
        "{stderr}"
    );
}

/// Removes a directory tree or a file when dropped, test failed or not.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0).or_else(|_| std::fs::remove_file(&self.0));
    }
}
