//! Checks, before anything is loaded, that this process may load BPF programs and open perf
//! events, so that the user gets the names of the missing capabilities instead of EPERM.

const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const CAP_SYS_ADMIN: u32 = 21;

/// Names of the capabilities that recording needs and this process lacks.
fn missing_capabilities() -> Vec<&'static str> {
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    // CAP_SYS_ADMIN stands in for both on kernels older than 5.8.
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| name)
        .collect()
}

/// Fails, naming what is missing, unless this process may load BPF programs and open perf events.
pub fn require_capabilities() -> anyhow::Result<()> {
    let missing = missing_capabilities();
    if !missing.is_empty() {
        anyhow::bail!(
            "recording needs root or the capabilities CAP_BPF and CAP_PERFMON (missing: {})",
            missing.join(", ")
        );
    }
    Ok(())
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYSLOG: u32 = 34;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// What the agent still uses once its programs are loaded and attached, and why. Everything
/// else (BPF, PERFMON, SYS_RESOURCE, NET_ADMIN, SETPCAP, ...) served start-up only: map
/// updates, table loads and reads go through file descriptors it already holds.
pub const KEPT_CAPABILITIES: [(u32, &str); 4] = [
    (
        CAP_SYS_PTRACE,
        "read /proc/PID/{maps,mem,root} of every process",
    ),
    (
        CAP_CHECKPOINT_RESTORE,
        "open /proc/PID/map_files/* (binaries, deleted or in containers)",
    ),
    (
        CAP_SYSLOG,
        "reread /proc/kallsyms with real addresses when modules change",
    ),
    (
        CAP_DAC_READ_SEARCH,
        "read binaries that are not world-readable",
    ),
];

/// The capability sets of one thread, as capget(2) version 3 returns them.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn capget() -> std::io::Result<u64> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and two data structs, as version 3 asks.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from(data[0].permitted) | u64::from(data[1].permitted) << 32)
}

fn capset(keep: u64) -> std::io::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: keep as u32,
            permitted: keep as u32,
            inheritable: 0,
        },
        CapData {
            effective: (keep >> 32) as u32,
            permitted: (keep >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: header and two data structs, as version 3 asks.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops every capability but [`KEPT_CAPABILITIES`] (SYS_ADMIN stands in for
/// CHECKPOINT_RESTORE before 5.9) from the permitted, effective, inheritable, ambient and, where
/// allowed, bounding sets, and sets `no_new_privs`. Capabilities are per thread: call it while
/// the process has one thread; threads started later inherit the reduced sets.
pub fn drop_capabilities() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let permitted = capget().context("reading the capability sets")?;
    let mut keep = KEPT_CAPABILITIES
        .iter()
        .fold(0u64, |set, (cap, _)| set | 1 << cap)
        & permitted;
    if keep & (1 << CAP_CHECKPOINT_RESTORE) == 0 {
        keep |= permitted & (1 << CAP_SYS_ADMIN);
    }
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40)
        .min(63);
    // The bounding set needs SETPCAP, which a container seldom grants (its runtime has
    // bounded it already); without it only exec would matter, and no_new_privs covers that.
    for cap in (0..=last).filter(|cap| keep & (1 << cap) == 0) {
        // SAFETY: plain prctl; failure leaves the set as it was.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
    // SAFETY: plain prctls.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    capset(keep).context("dropping capabilities")?;
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    Ok(())
}
