//! `container_id_of` against real cgroups.
//!
//! The unit tests check the parser on recorded lines; these check that what
//! the kernel actually writes to `/proc/PID/cgroup` for a process in a
//! runtime-shaped cgroup is understood. Each test creates cgroups named the
//! way a runtime would (only `mkdir`, no controllers enabled), moves a
//! `sleep` child into the innermost one, asks `container_id_of(child)`, then
//! kills the child and removes the directories innermost first — in a `Drop`
//! guard, so that happens on failure too.
//!
//! The cgroup v2 hierarchy is found in `/proc/self/mountinfo` rather than
//! assumed at `/sys/fs/cgroup`: on hybrid hosts `/sys/fs/cgroup` is a tmpfs
//! (where `mkdir` makes a plain directory) and cgroup v2 sits at
//! `/sys/fs/cgroup/unified`.
//!
//! Needs root. Without it the tests print "skipped: needs root" and pass,
//! unless `CI=true`, where they fail instead of silently not testing.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread::sleep;
use std::time::{Duration, Instant};

use profiler_metadata::cgroup::{container_id_of, ContainerId, Runtime};

/// Returns false (after saying why) when the test cannot run here; panics
/// instead when running in CI, where a skip would hide a broken setup.
fn skip(reason: &str) -> bool {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{reason} (CI=true, so this is a failure rather than a skip)");
    }
    eprintln!("skipped: {reason}");
    false
}

fn is_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    // "Uid:\treal\teffective\tsaved\tfs"
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// Mount points of cgroup hierarchies, from `/proc/self/mountinfo`:
/// (cgroup v2 mount, cgroup v1 `name=systemd` mount).
fn cgroup_mounts() -> (Option<PathBuf>, Option<PathBuf>) {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut v2 = None;
    let mut v1_systemd = None;
    for line in mountinfo.lines() {
        // "36 25 0:32 / /sys/fs/cgroup/x rw,… shared:1 - cgroup cgroup rw,name=systemd"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4);
        let mut right = right.split(' ');
        let (fs_type, super_options) = (right.next(), right.nth(1));
        match (fs_type, mount_point) {
            (Some("cgroup2"), Some(point)) if v2.is_none() => v2 = Some(PathBuf::from(point)),
            (Some("cgroup"), Some(point))
                if v1_systemd.is_none()
                    && super_options.is_some_and(|o| o.split(',').any(|o| o == "name=systemd")) =>
            {
                v1_systemd = Some(PathBuf::from(point))
            }
            _ => {}
        }
    }
    (v2, v1_systemd)
}

/// The cgroup v2 mount, or None when the test must not run.
fn v2_mount() -> Option<PathBuf> {
    if !is_root() {
        skip("needs root");
        return None;
    }
    match cgroup_mounts().0 {
        Some(mount) => Some(mount),
        None => {
            skip("no cgroup v2 hierarchy is mounted");
            None
        }
    }
}

/// A fresh 64-hex container ID.
fn random_id() -> String {
    let uuid = || {
        fs::read_to_string("/proc/sys/kernel/random/uuid")
            .expect("read a random uuid")
            .trim()
            .replace('-', "")
    };
    let id = uuid() + &uuid();
    assert_eq!(id.len(), 64);
    id
}

/// Owns what a test created: the child process and the cgroup directories
/// (outermost first). Dropping it kills and reaps the child, then removes the
/// directories innermost first.
#[derive(Default)]
struct Cleanup {
    child: Option<Child>,
    dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in self.dirs.iter().rev() {
            // The kernel may take a moment to notice that the cgroup emptied.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(err) if err.kind() == ErrorKind::NotFound => break,
                    Err(err) if Instant::now() < deadline && err.raw_os_error() == Some(16) => {
                        // EBUSY: still populated.
                        sleep(Duration::from_millis(20));
                    }
                    Err(err) => {
                        eprintln!("cannot remove test cgroup {}: {err}", dir.display());
                        break;
                    }
                }
            }
        }
    }
}

/// Creates `mount/relative` one directory at a time, starts `sleep` in the
/// innermost one and returns what `container_id_of` says about it.
fn container_of_process_in(
    mount: &Path,
    relative: &[&str],
    cleanup: &mut Cleanup,
) -> Option<ContainerId> {
    let mut dir = mount.to_path_buf();
    for component in relative {
        dir.push(component);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        cleanup.dirs.push(dir.clone());
    }
    let child = Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    cleanup.child = Some(child);
    fs::write(dir.join("cgroup.procs"), pid.to_string())
        .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", dir.display()));

    let seen =
        fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read the child's cgroup file");
    let leaf = relative.join("/");
    assert!(
        seen.lines().any(|line| line.trim_end().ends_with(&leaf)),
        "the kernel does not show the child in {leaf}:\n{seen}"
    );
    container_id_of(pid)
}

/// Test cgroup names start with this and the test process's PID, so
/// parallel tests and concurrent runs do not collide and leftovers are
/// recognisable.
fn prefix(case: &str) -> String {
    format!("profiler-test-{}-{case}", std::process::id())
}

#[test]
fn containerd_systemd_scope() {
    let Some(mount) = v2_mount() else { return };
    let id = random_id();
    let slice = format!("{}.slice", prefix("containerd"));
    let scope = format!("cri-containerd-{id}.scope");
    let mut cleanup = Cleanup::default();
    let got = container_of_process_in(&mount, &[&slice, &scope], &mut cleanup);
    assert_eq!(
        got,
        Some(ContainerId {
            id,
            runtime: Runtime::Containerd
        })
    );
}

#[test]
fn docker_cgroupfs() {
    let Some(mount) = v2_mount() else { return };
    let id = random_id();
    let top = prefix("docker");
    let mut cleanup = Cleanup::default();
    let got = container_of_process_in(&mount, &[&top, "docker", &id], &mut cleanup);
    assert_eq!(
        got,
        Some(ContainerId {
            id,
            runtime: Runtime::Docker
        })
    );
}

#[test]
fn crio_scope_with_container_subcgroup() {
    let Some(mount) = v2_mount() else { return };
    let id = random_id();
    let slice = format!("{}.slice", prefix("crio"));
    let scope = format!("crio-{id}.scope");
    let mut cleanup = Cleanup::default();
    let got = container_of_process_in(&mount, &[&slice, &scope, "container"], &mut cleanup);
    assert_eq!(
        got,
        Some(ContainerId {
            id,
            runtime: Runtime::CriO
        })
    );
}

#[test]
fn crio_conmon_is_not_a_container() {
    let Some(mount) = v2_mount() else { return };
    let slice = format!("{}.slice", prefix("conmon"));
    let scope = format!("crio-conmon-{}.scope", random_id());
    let mut cleanup = Cleanup::default();
    assert_eq!(
        container_of_process_in(&mount, &[&slice, &scope], &mut cleanup),
        None
    );
}

#[test]
fn host_process_is_not_in_a_container() {
    let Some(mount) = v2_mount() else { return };
    let slice = format!("{}.slice", prefix("host"));
    let mut cleanup = Cleanup::default();
    let got = container_of_process_in(&mount, &[&slice, "session-3.scope"], &mut cleanup);
    assert_eq!(got, None);
}

/// cgroup v1 (`N:name=systemd:/path` lines), on hosts that still mount it.
/// Pure cgroup v2 hosts have none, so its absence is a skip even in CI.
#[test]
fn docker_cgroupfs_v1() {
    if !is_root() {
        skip("needs root");
        return;
    }
    let Some(mount) = cgroup_mounts().1 else {
        eprintln!("skipped: no cgroup v1 name=systemd hierarchy on this host");
        return;
    };
    let id = random_id();
    let top = prefix("docker-v1");
    let mut cleanup = Cleanup::default();
    let got = container_of_process_in(&mount, &[&top, "docker", &id], &mut cleanup);
    assert_eq!(
        got,
        Some(ContainerId {
            id,
            runtime: Runtime::Docker
        })
    );
}
