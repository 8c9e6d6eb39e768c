//! Where a sampled process runs, for labelling profiles.
//!
//! An eBPF profiler sees PIDs and stacks; people look for profiles by pod,
//! namespace, workload and container. This crate holds the pieces that bridge
//! the two, kept apart from the BPF code so that they can be tested without
//! BPF, privileges or a cluster:
//!
//! * [`cgroup`]: PID → container ID and runtime, from `/proc/PID/cgroup`;
//! * [`kubernetes`]: container ID → pod metadata, from a watch on this node's
//!   pods;
//! * [`relabel`]: Prometheus `relabel_config` rules to filter and shape the
//!   resulting label sets.

pub mod cgroup;
pub mod kubernetes;
pub mod relabel;

pub use cgroup::{container_id_from_cgroup, container_id_of, ContainerId, Runtime};
pub use kubernetes::{watch_pods, ContainerInfo, Owner, PodCache, PodInfo};
pub use relabel::{Action, RelabelConfig, Relabeler};
