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
