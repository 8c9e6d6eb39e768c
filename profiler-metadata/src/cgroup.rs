//! Container identity from a process's cgroup membership.
//!
//! Every container runtime puts a container's processes into a cgroup whose
//! path embeds the 64-hex-digit container ID, so `/proc/PID/cgroup` is the one
//! place that tells, without asking any runtime, which container a sampled
//! process belongs to. The runtimes name these cgroups differently; the
//! layouts recognised here (innermost match wins) are:
//!
//! | runtime | cgroup driver | path (last components) |
//! |---|---|---|
//! | containerd (CRI) | systemd | `…/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
//! | containerd (CRI) | cgroupfs | `/kubepods/burstable/pod<uid>/<id>` (bare ID under `kubepods`) |
//! | containerd (CRI), systemd-style path on a cgroupfs host | cgroupfs | `…/kubepods-…-pod<uid>.slice:cri-containerd:<id>` |
//! | containerd (nerdctl) | systemd | `/system.slice/nerdctl-<id>.scope` |
//! | CRI-O | systemd | `…/crio-<id>.scope`, possibly followed by `/container` |
//! | CRI-O | cgroupfs | `/kubepods/burstable/pod<uid>/crio-<id>` |
//! | Docker | cgroupfs | `/docker/<id>` |
//! | Docker | systemd | `/system.slice/docker-<id>.scope` |
//! | Podman | systemd | `…/libpod-<id>.scope` (reported as [`Runtime::Unknown`]) |
//!
//! CRI-O's monitor process lives in `crio-conmon-<id>.scope`; it is not part
//! of the container and yields no ID. Host processes (`0::/init.scope`,
//! `0::/user.slice/…`, `0::/system.slice/sshd.service`) yield nothing either.

use std::fmt;

/// The runtime that created a container, as far as the cgroup path tells.
///
/// Kept because the same 64-hex ID means nothing without knowing whom to ask
/// about it, and because it is a useful label on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// containerd, through its CRI plugin (Kubernetes) or nerdctl.
    Containerd,
    /// CRI-O.
    CriO,
    /// Docker (dockerd, or cri-dockerd with the systemd driver).
    Docker,
    /// A container ID was found but the path does not say which runtime made
    /// it (for example Podman's `libpod-<id>.scope`, or a bare ID outside
    /// `kubepods` and `docker`).
    Unknown,
}

impl Runtime {
    /// A short lowercase name ("containerd", "cri-o", "docker", "unknown"),
    /// the same spelling Kubernetes uses in `containerID` prefixes, so it can
    /// be used directly as a label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container a process runs in, identified from its cgroup path.
///
/// The ID is the full 64-hex-digit form that Kubernetes reports (after the
/// `containerd://` style prefix) in a pod's `status.containerStatuses`, so it
/// is the key that joins a sampled PID to its pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerId {
    /// The container ID: exactly 64 lowercase hex digits.
    pub id: String,
    /// The runtime that created the container, when the path says so.
    pub runtime: Runtime,
}

/// Finds the container a process belongs to from the text of its
/// `/proc/PID/cgroup` file.
///
/// Accepts cgroup v1 (one `N:controllers:/path` line per hierarchy), cgroup v2
/// (`0::/path`) and hybrid files; the first line whose path names a container
/// decides. Within a path the innermost container component wins, so a
/// container nested in another (kind nodes, Docker-in-Docker) reports the
/// inner one, and sub-cgroups a container made for itself
/// (`…/crio-<id>.scope/container`) are looked through.
///
/// Returns `None` for host processes, for runtime helpers such as CRI-O's
/// `conmon`, and for text that is not a cgroup file at all.
pub fn container_id_from_cgroup(contents: &str) -> Option<ContainerId> {
    contents.lines().find_map(|line| {
        // "hierarchy-ID:controller-list:cgroup-path"; the path may itself
        // contain ':' (see the colon form above), so split only twice.
        let mut fields = line.trim_start().splitn(3, ':');
        let _hierarchy = fields.next()?;
        let _controllers = fields.next()?;
        let path = fields.next()?.trim_end();
        // cgroup v2 marks a removed cgroup this way (a zombie still in it).
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        container_id_from_path(path)
    })
}

/// Reads `/proc/PID/cgroup` and returns the container the process runs in.
///
/// Returns `None` when the process runs on the host (no container component
/// in its cgroup path), and also when the file cannot be read — typically
/// because the process has already exited, which a sampling profiler sees
/// often and should not treat as an error.
pub fn container_id_of(pid: u32) -> Option<ContainerId> {
    let contents = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    container_id_from_cgroup(&contents)
}

/// Scans one cgroup path from the innermost component outwards.
fn container_id_from_path(path: &str) -> Option<ContainerId> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    (0..components.len()).rev().find_map(|i| {
        let ancestors = &components[..i];
        parse_component(components[i], ancestors)
    })
}

/// Recognises one path component as a container cgroup.
fn parse_component(component: &str, ancestors: &[&str]) -> Option<ContainerId> {
    let found = |id: &str, runtime| {
        is_container_id(id).then(|| ContainerId {
            id: id.to_owned(),
            runtime,
        })
    };

    // containerd with a systemd-style cgroupsPath on a cgroupfs host creates
    // a literal "<slice>:<prefix>:<id>" directory.
    let mut colon = component.split(':');
    if let (Some(_slice), Some(prefix), Some(id), None) =
        (colon.next(), colon.next(), colon.next(), colon.next())
    {
        return found(id, runtime_of_prefix(prefix)?);
    }

    let name = component.strip_suffix(".scope").unwrap_or(component);
    if let Some((prefix, id)) = name.rsplit_once('-') {
        // "crio-conmon-<id>" splits into ("crio-conmon", id), whose prefix is
        // not a runtime, so conmon is skipped here on purpose.
        return found(id, runtime_of_prefix(prefix)?);
    }

    // A bare ID: the cgroupfs drivers. The parent says who made it.
    let runtime = if ancestors.last() == Some(&"docker") {
        Runtime::Docker
    } else if ancestors.iter().any(|a| a.starts_with("kubepods")) {
        // containerd is the runtime that writes this layout today
        // (cgroupfs driver); dockershim/cri-dockerd wrote the same.
        Runtime::Containerd
    } else {
        Runtime::Unknown
    };
    found(name, runtime)
}

/// Maps a scope/cgroup name prefix to the runtime that uses it.
fn runtime_of_prefix(prefix: &str) -> Option<Runtime> {
    match prefix {
        "cri-containerd" | "nerdctl" => Some(Runtime::Containerd),
        "crio" => Some(Runtime::CriO),
        "docker" => Some(Runtime::Docker),
        "libpod" => Some(Runtime::Unknown),
        _ => None,
    }
}

/// Container IDs are 64 lowercase hex digits (a SHA-256).
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_A: &str = "f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830";

    /// Real-world lines (from bug reports, test suites of other agents and
    /// live nodes), with the ID each must yield.
    #[test]
    fn real_world_paths() {
        use Runtime::*;
        // (what, line, expected ID and runtime)
        type Expected = Option<(&'static str, Runtime)>;
        let cases: &[(&str, &str, Expected)] = &[
            (
                "containerd, cgroupfs driver, v1 (kubeadm)",
                "11:pids:/kubepods/besteffort/poda36d0c1d-0b26-4451-8d80-9c195e004afa/5dd96d5394ca930a854a390ea46f7515a8bc930123eb3251ba20f2708a38fc61",
                Some(("5dd96d5394ca930a854a390ea46f7515a8bc930123eb3251ba20f2708a38fc61", Containerd)),
            ),
            (
                "containerd, cgroupfs driver, v2, burstable",
                "0::/kubepods/burstable/pod7c6a5f6e-5d2b-4b8e-9c1c-0d6a1a1d2b3c/0f2c4c8e3d1b5a6978a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3",
                Some(("0f2c4c8e3d1b5a6978a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3", Containerd)),
            ),
            (
                "containerd, systemd driver, v2 (Bottlerocket/EKS)",
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poddd1bf9d1_241d_47f5_8e25_12de83135812.slice/cri-containerd-f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830.scope",
                Some((ID_A, Containerd)),
            ),
            (
                "containerd, systemd driver, v1 line",
                "5:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2105e389_7471_476e_a50f_6074cef29bbd.slice/cri-containerd-f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830.scope",
                Some((ID_A, Containerd)),
            ),
            (
                "containerd, guaranteed QoS (no QoS slice)",
                "0::/kubepods.slice/kubepods-pod2105e389_7471_476e_a50f_6074cef29bbd.slice/cri-containerd-f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830.scope",
                Some((ID_A, Containerd)),
            ),
            (
                "containerd 1.4, systemd-style cgroupsPath on a cgroupfs host",
                "1:name=systemd:/system.slice/containerd.service/kubepods-besteffort-pod2105e389_7471_476e_a50f_6074cef29bbd.slice:cri-containerd:d3d8ccf5cca91931c6285c1d7472c413dd5a7700fddc0aa9f89a9ac7008b003e",
                Some(("d3d8ccf5cca91931c6285c1d7472c413dd5a7700fddc0aa9f89a9ac7008b003e", Containerd)),
            ),
            (
                "kind: pod inside a Docker-run node, innermost wins",
                "0::/system.slice/docker-3a8b2b2e1c7d4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f90.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod4c1e_11.slice/cri-containerd-f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830.scope",
                Some((ID_A, Containerd)),
            ),
            (
                "container namespace view relative to the reader's cgroupns",
                "0::/../../kubepods-besteffort-pod2105e389_7471_476e_a50f_6074cef29bbd.slice/cri-containerd-f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830.scope",
                Some((ID_A, Containerd)),
            ),
            (
                "CRI-O, systemd driver (OpenShift 4.6)",
                "12:devices:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod8ca306fa_3c03_47fa_97dd_19979c345572.slice/crio-d6d725b909f37c3e232aadfbafa950a58bfe7baa579ba8c47a12be88bb921607.scope",
                Some(("d6d725b909f37c3e232aadfbafa950a58bfe7baa579ba8c47a12be88bb921607", CriO)),
            ),
            (
                "CRI-O, v2, process in the container's own sub-cgroup",
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod207aaad1_659f_4db8_88e0_46e0cdcc3004.slice/crio-0644511bc2734f5ff9f9532fdecddb9f1b92597fe269168b137ada040c3a3118.scope/container",
                Some(("0644511bc2734f5ff9f9532fdecddb9f1b92597fe269168b137ada040c3a3118", CriO)),
            ),
            (
                "CRI-O, cgroupfs driver",
                "0::/kubepods/burstable/pod207aaad1-659f-4db8-88e0-46e0cdcc3004/crio-0644511bc2734f5ff9f9532fdecddb9f1b92597fe269168b137ada040c3a3118",
                Some(("0644511bc2734f5ff9f9532fdecddb9f1b92597fe269168b137ada040c3a3118", CriO)),
            ),
            (
                "CRI-O conmon is not the container",
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod207aaad1_659f_4db8_88e0_46e0cdcc3004.slice/crio-conmon-32da98c8522068be05a7510a3eddb09cad6ed2f03286180d0e931d0d0b6224a6.scope",
                None,
            ),
            (
                "Docker, cgroupfs driver (Ubuntu, v1)",
                "4:memory:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30",
                Some(("31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30", Docker)),
            ),
            (
                "Docker, cgroupfs driver, v2",
                "0::/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30",
                Some(("31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30", Docker)),
            ),
            (
                "Docker, systemd driver (CentOS, v1)",
                "8:memory:/system.slice/docker-9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d.scope",
                Some(("9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d", Docker)),
            ),
            (
                "Docker, systemd driver, v2",
                "0::/system.slice/docker-9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d.scope",
                Some(("9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d", Docker)),
            ),
            (
                "Docker-in-Docker (RancherOS): the inner container",
                "8:memory:/docker/a9a5ad238e59234193ee7ec3fcff5e735b3708ea1068826952255b69e3cfa413/docker/ec08435e04266c5ba381fccbb829f626d11d8ddf5f8f547263c7a2d79ab4787a",
                Some(("ec08435e04266c5ba381fccbb829f626d11d8ddf5f8f547263c7a2d79ab4787a", Docker)),
            ),
            (
                "dockershim with the systemd driver under kubepods",
                "11:cpuset:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod045b1e35_7f13_11e7_ac42_0050568ffca0.slice/docker-b5b6f2da8008be266864f896f93789762b2ce50792114a5c5f2cc3315af0bc70.scope",
                Some(("b5b6f2da8008be266864f896f93789762b2ce50792114a5c5f2cc3315af0bc70", Docker)),
            ),
            (
                "a sub-cgroup made inside the container (kube-proxy)",
                "11:freezer:/kubepods/besteffort/podf8a694f2-7c08-11e9-98da-000c29077430/c04e0a88a1de067f25bece337d4dbb897396e0b623c2a65330850fc9823f1903/kube-proxy",
                Some(("c04e0a88a1de067f25bece337d4dbb897396e0b623c2a65330850fc9823f1903", Containerd)),
            ),
            (
                "Podman",
                "0::/machine.slice/libpod-4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970.scope/container",
                Some(("4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970", Unknown)),
            ),
            (
                "nerdctl (containerd without Kubernetes)",
                "0::/system.slice/nerdctl-4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970.scope",
                Some(("4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970", Containerd)),
            ),
            (
                "bare ID from a runtime we cannot name",
                "10:net_prio:/4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970",
                Some(("4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970", Unknown)),
            ),
            (
                "cgroup v2 removed cgroup",
                "0::/system.slice/docker-9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d.scope (deleted)",
                Some(("9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d", Docker)),
            ),
            ("host: user session", "0::/user.slice/user-1000.slice/session-3.scope", None),
            ("host: systemd", "0::/init.scope", None),
            ("host: root cgroup", "0::/", None),
            ("host: the docker daemon itself", "0::/system.slice/docker.service", None),
            ("host: containerd itself", "0::/system.slice/containerd.service", None),
            ("host: kubelet", "0::/system.slice/kubelet.service", None),
            (
                "host: a pod-level cgroup is not a container",
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod207aaad1_659f_4db8_88e0_46e0cdcc3004.slice",
                None,
            ),
            ("host: a user-chosen 32-hex name is too short", "4:memory:/process_api/543bae6d1786c03aa1b8c5e5571fd380", None),
            (
                "uppercase hex is not a container ID",
                "0::/docker/31CB02944DA7A12196A193CF0E0F6C226D7C453A1DB62E65BA98287593A2EE30",
                None,
            ),
            ("not a cgroup file", "hello world", None),
            ("empty", "", None),
        ];
        for (what, line, want) in cases {
            let got = container_id_from_cgroup(line);
            let want = want.map(|(id, runtime)| ContainerId {
                id: id.to_string(),
                runtime,
            });
            assert_eq!(got, want, "{what}: {line}");
        }
    }

    /// A whole hybrid-mode file: v1 hierarchies at the host root, the
    /// container only visible in some of them.
    #[test]
    fn whole_v1_file_and_hybrid() {
        let v1 = "\
12:hugetlb:/
11:blkio:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poddd1bf9d1_241d_47f5_8e25_12de83135812.slice/cri-containerd-f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830.scope
6:rdma:/
1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poddd1bf9d1_241d_47f5_8e25_12de83135812.slice/cri-containerd-f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830.scope
0::/
";
        let got = container_id_from_cgroup(v1).expect("container in v1 lines");
        assert_eq!(got.id, ID_A);
        assert_eq!(got.runtime, Runtime::Containerd);

        let host = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/543bae6d1786c03aa1b8c5e5571fd380
0::/
";
        assert_eq!(container_id_from_cgroup(host), None);
    }

    #[test]
    fn container_id_of_missing_pid_is_none() {
        // PIDs are below 2^22 on Linux, so this one never exists.
        assert_eq!(container_id_of(u32::MAX), None);
    }

    #[test]
    fn runtime_names() {
        assert_eq!(Runtime::CriO.to_string(), "cri-o");
        assert_eq!(Runtime::Containerd.as_str(), "containerd");
    }
}
