//! Targets: which series a process's samples belong to, and whether they are sent at all.
//!
//! A series is identified by its final label set: `service_name`, `node`, the Kubernetes
//! labels of a pod's container (`namespace`, `pod`, `container`), the static labels and what
//! relabeling adds. Host processes group by executable (`service_name` is the basename of
//! `/proc/PID/exe`), so a thousand processes of one binary are one series; kernel threads are
//! one series per node. Per-process labels exist only when a relabel rule maps
//! `__meta_process_pid` or `__meta_process_comm`.
//!
//! A process in a container whose pod is not known yet waits: a `keep` rule on pod labels
//! must not exclude it for good, nor should its samples land in a series without its pod's
//! labels. Its samples are held (bounded) until the pod appears or [`POD_GRACE`] passes, then
//! filed. Decisions are made again when the pod cache changes, and the caller learns which
//! processes the kernel must sample again or stop sampling.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use profiler_metadata::{
    cgroup::container_id_of,
    kubernetes::{PodCache, PodInfo},
    relabel::Relabeler,
};

use super::{basename, ResolvedSample, UNKNOWN_PROCESS};

/// A label set.
pub type Labels = BTreeMap<String, String>;

/// What one profile is about: its final labels, `__name__` and `service_name` included.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey(Arc<Labels>);

impl TargetKey {
    /// The series' labels.
    pub fn labels(&self) -> &Labels {
        &self.0
    }
}

/// Where a process's samples go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Into the profile of this series.
    Keep(TargetKey),
    /// Nowhere: relabeling dropped it, so the kernel need not sample it.
    Drop,
    /// Not decided: its pod is not known yet. Samples are held meanwhile.
    Wait,
}

/// How long a process in a container waits for its pod before it is classified without one
/// (a container that is no pod's, or an API server that is down).
pub const POD_GRACE: Duration = Duration::from_secs(30);

/// Bound on samples held for undecided processes; beyond it they are dropped and counted.
pub const MAX_HELD_SAMPLES: usize = 10_000;

/// The profile type label Pyroscope keys CPU profiles by.
pub const PROFILE_NAME: &str = "process_cpu";

/// `service_name` of kernel threads.
pub const KERNEL_SERVICE: &str = "kernel";

/// `service_name` of samples over the series cap.
pub const OVERFLOW_SERVICE: &str = "series-overflow";

/// `service_name` of a process that exited before anything about it could be read.
pub const UNIDENTIFIED_SERVICE: &str = "unidentified";

/// `PF_KTHREAD` in the flags of `/proc/PID/stat` (include/linux/sched.h).
const PF_KTHREAD: u32 = 0x0020_0000;

/// What /proc said about a process when it was first classified, kept so that its decision
/// can be made again after it exits or execs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Facts {
    /// The process name (`comm`), "" when unknown.
    comm: String,
    /// The basename of its executable.
    exe: Option<String>,
    /// A kernel thread (`PF_KTHREAD`).
    kernel_thread: bool,
    /// Its container's runtime ID.
    container: Option<String>,
}

impl Facts {
    /// Reads them from /proc while the process exists; `comm` and `exe` are the fallbacks
    /// when it is gone. Returns `None` when nothing at all is known.
    fn read(pid: u32, comm: &str, exe: Option<&str>) -> Option<Facts> {
        let comm = if comm == UNKNOWN_PROCESS { "" } else { comm };
        let flags = procfs::process::Process::new(pid as i32)
            .and_then(|p| p.stat())
            .ok()
            .map(|stat| stat.flags);
        let read_exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .map(|name| name.trim_end_matches(" (deleted)").to_owned());
        let facts = Facts {
            comm: comm.to_owned(),
            kernel_thread: match flags {
                Some(flags) => flags & PF_KTHREAD != 0,
                None => false,
            },
            exe: read_exe.or_else(|| exe.map(str::to_owned)),
            container: container_id_of(pid).map(|c| c.id),
        };
        let known = flags.is_some() || facts.exe.is_some() || !facts.comm.is_empty();
        known.then_some(facts)
    }
}

/// A process as classified.
#[derive(Debug)]
struct Process {
    facts: Facts,
    /// When it was first classified: it waits for its pod until `POD_GRACE` after.
    since: Instant,
    decision: Decision,
    /// The pod cache's version when the decision was made.
    pods_version: u64,
    /// Samples taken while the decision was `Wait`.
    held: Vec<ResolvedSample>,
}

/// A process whose decision changed after it was first made, for the kernel's filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub pid: u32,
    /// True: stop sampling it; false: sample it (again).
    pub exclude: bool,
}

/// Classifies processes into series.
pub struct Targets {
    node: String,
    static_labels: Labels,
    relabel: Relabeler,
    pods: Option<PodCache>,
    grace: Duration,
    processes: HashMap<u32, Process>,
    /// Processes forgotten (exited or exec'd) while they still had samples waiting.
    gone: Vec<(u32, Process)>,
    /// One copy of each label set, shared by the processes of a series.
    keys: HashSet<TargetKey>,
    overflow: TargetKey,
    held: usize,
    held_dropped: u64,
}

impl Targets {
    /// `pods` is `None` outside Kubernetes.
    pub fn new(
        node: String,
        static_labels: Labels,
        relabel: Relabeler,
        pods: Option<PodCache>,
    ) -> Self {
        let mut overflow = static_labels.clone();
        overflow.insert("__name__".into(), PROFILE_NAME.into());
        overflow.insert("node".into(), node.clone());
        overflow.insert("service_name".into(), OVERFLOW_SERVICE.into());
        Self {
            node,
            static_labels,
            relabel,
            pods,
            grace: POD_GRACE,
            processes: HashMap::new(),
            gone: Vec::new(),
            keys: HashSet::new(),
            overflow: TargetKey(Arc::new(overflow)),
            held: 0,
            held_dropped: 0,
        }
    }

    /// How long a container's process waits for its pod (default [`POD_GRACE`]).
    pub fn with_pod_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The node's series for samples over the series cap.
    pub fn overflow_key(&self) -> TargetKey {
        self.overflow.clone()
    }

    /// The decision for `pid`, classifying it on first use from /proc (`comm` is its name, the
    /// fallback when /proc no longer has it).
    pub fn decide(&mut self, pid: u32, comm: &str) -> Decision {
        if let Some(process) = self.processes.get(&pid) {
            return process.decision.clone();
        }
        let facts = Facts::read(pid, comm, None).unwrap_or_default();
        self.insert(pid, facts, Instant::now())
    }

    /// Classifies `pid` from `facts` as of `now`.
    fn insert(&mut self, pid: u32, facts: Facts, now: Instant) -> Decision {
        let version = self.pods_version();
        let decision = self.classify(pid, &facts, now, now);
        self.processes.insert(
            pid,
            Process {
                facts,
                since: now,
                decision: decision.clone(),
                pods_version: version,
                held: Vec::new(),
            },
        );
        decision
    }

    /// Files samples: `out` gets those of kept processes with their series, samples of
    /// undecided processes are held (see [`Targets::revisit`]), dropped ones go nowhere.
    pub fn file(
        &mut self,
        samples: &[ResolvedSample],
        mut out: impl FnMut(&TargetKey, &ResolvedSample),
    ) {
        for sample in samples {
            let decision = match self.processes.get(&sample.pid) {
                Some(process) => process.decision.clone(),
                None => {
                    // Never announced, or gone before it could be read: the sample's own
                    // names are what is left.
                    let exe = sample
                        .frames
                        .iter()
                        .find_map(|f| f.mapping.as_ref().filter(|m| m.is_main))
                        .map(|m| basename(&m.path).to_owned());
                    let facts =
                        Facts::read(sample.pid, &sample.comm, exe.as_deref()).unwrap_or_default();
                    self.insert(sample.pid, facts, Instant::now())
                }
            };
            match decision {
                Decision::Keep(key) => out(&key, sample),
                Decision::Drop => {}
                Decision::Wait if self.held >= MAX_HELD_SAMPLES => {
                    self.held_dropped += sample.count;
                }
                Decision::Wait => {
                    self.held += 1;
                    if let Some(process) = self.processes.get_mut(&sample.pid) {
                        process.held.push(sample.clone());
                    }
                }
            }
        }
    }

    /// Decides again where that may now come out differently: processes still waiting whose
    /// pod appeared or whose grace ended, and every container's process when the pod cache
    /// changed. Held samples of processes now kept go to `out`. Returns the live processes
    /// the kernel must stop sampling, or sample again.
    pub fn revisit(&mut self, out: impl FnMut(&TargetKey, &ResolvedSample)) -> Vec<Change> {
        self.revisit_at(Instant::now(), false, out)
    }

    /// Decides every waiting process now, pod or not, and files its samples: for shutdown.
    pub fn decide_all(&mut self, out: impl FnMut(&TargetKey, &ResolvedSample)) -> Vec<Change> {
        self.revisit_at(Instant::now(), true, out)
    }

    fn revisit_at(
        &mut self,
        now: Instant,
        force: bool,
        mut out: impl FnMut(&TargetKey, &ResolvedSample),
    ) -> Vec<Change> {
        let version = self.pods_version();
        let grace = self.grace;
        let deadline = if force { now + grace } else { now };
        let due = |p: &Process| {
            let expired = p.decision == Decision::Wait && p.since + grace <= deadline;
            expired || (p.facts.container.is_some() && p.pods_version != version)
        };
        let mut changes = Vec::new();
        let pids: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, p)| due(p))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in pids {
            let (facts, since) = {
                let process = &self.processes[&pid];
                (process.facts.clone(), process.since)
            };
            let decision = self.classify(pid, &facts, since, deadline);
            let process = self.processes.get_mut(&pid).expect("listed above");
            process.pods_version = version;
            let was_dropped = process.decision == Decision::Drop;
            let is_dropped = decision == Decision::Drop;
            if was_dropped != is_dropped {
                changes.push(Change {
                    pid,
                    exclude: is_dropped,
                });
            }
            process.decision = decision.clone();
            if decision != Decision::Wait {
                let held = std::mem::take(&mut process.held);
                self.release(&decision, held, &mut out);
            }
        }
        for (pid, mut process) in std::mem::take(&mut self.gone) {
            let decision = match due(&process) {
                true => self.classify(pid, &process.facts, process.since, deadline),
                false => Decision::Wait,
            };
            if decision == Decision::Wait {
                process.pods_version = version;
                self.gone.push((pid, process));
            } else {
                let held = std::mem::take(&mut process.held);
                self.release(&decision, held, &mut out);
            }
        }
        // Label sets no process uses any more.
        self.keys.retain(|k| Arc::strong_count(&k.0) > 1);
        changes
    }

    /// Files held samples by their process's new decision (never `Wait`).
    fn release(
        &mut self,
        decision: &Decision,
        held: Vec<ResolvedSample>,
        out: &mut impl FnMut(&TargetKey, &ResolvedSample),
    ) {
        if let Decision::Keep(key) = decision {
            held.iter().for_each(|s| out(key, s));
        }
        self.held -= held.len();
    }

    /// Forgets `pid` (it exited, or exec'd into something else) and returns its decision.
    /// Samples it left waiting are still filed once its pod is known or its grace ends.
    pub fn forget(&mut self, pid: u32) -> Option<Decision> {
        let process = self.processes.remove(&pid)?;
        let decision = process.decision.clone();
        // Only a waiting process holds samples.
        if !process.held.is_empty() {
            self.gone.push((pid, process));
        }
        Some(decision)
    }

    /// Samples dropped since the last call because too many were held.
    pub fn take_held_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.held_dropped)
    }

    /// Processes classified.
    pub fn len(&self) -> usize {
        self.processes.len()
    }

    /// True when no process is classified.
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    fn pods_version(&self) -> u64 {
        self.pods.as_ref().map_or(0, PodCache::version)
    }

    /// The decision for a process first classified at `since`, as of `now`.
    fn classify(&mut self, pid: u32, facts: &Facts, since: Instant, now: Instant) -> Decision {
        let pod = match (&facts.container, &self.pods) {
            (Some(id), Some(pods)) => pods.by_container_id(id),
            _ => None,
        };
        let awaiting_pod = facts.container.is_some() && self.pods.is_some() && pod.is_none();
        if awaiting_pod && now < since + self.grace {
            return Decision::Wait;
        }
        match self.labels(pid, facts, pod.as_ref().map(|(p, c)| (&**p, c.as_str()))) {
            Some(labels) => Decision::Keep(self.intern(labels)),
            None => Decision::Drop,
        }
    }

    /// The labels of a process (and of its pod's container, when known) after relabeling;
    /// `None` when relabeling drops it.
    fn labels(&self, pid: u32, facts: &Facts, pod: Option<(&PodInfo, &str)>) -> Option<Labels> {
        let mut labels = self.static_labels.clone();
        labels.insert("__name__".into(), PROFILE_NAME.into());
        labels.insert("node".into(), self.node.clone());
        labels.insert("__meta_process_pid".into(), pid.to_string());
        labels.insert("__meta_process_comm".into(), facts.comm.clone());
        if let Some(exe) = &facts.exe {
            labels.insert("__meta_process_exe".into(), exe.clone());
        }
        if let Some(id) = &facts.container {
            // Not a default label: it changes on every restart of the container.
            labels.insert("__meta_container_id".into(), id.clone());
        }
        let service = match pod {
            Some((pod, container)) => {
                add_pod_labels(&mut labels, pod, container);
                format!("{}/{}", pod.namespace, workload_name(pod))
            }
            None if facts.kernel_thread => KERNEL_SERVICE.to_owned(),
            None => match (&facts.exe, facts.comm.as_str()) {
                (Some(exe), _) => exe.clone(),
                (None, "") => UNIDENTIFIED_SERVICE.to_owned(),
                (None, comm) => comm.to_owned(),
            },
        };
        labels.insert("service_name".into(), service);
        if !self.relabel.apply(&mut labels) {
            return None;
        }
        labels.retain(|k, _| !k.starts_with("__") || k == "__name__");
        Some(labels)
    }

    fn intern(&mut self, labels: Labels) -> TargetKey {
        let key = TargetKey(Arc::new(labels));
        match self.keys.get(&key) {
            Some(existing) => existing.clone(),
            None => {
                self.keys.insert(key.clone());
                key
            }
        }
    }
}

fn add_pod_labels(labels: &mut Labels, pod: &PodInfo, container: &str) {
    labels.insert("namespace".into(), pod.namespace.clone());
    labels.insert("pod".into(), pod.name.clone());
    labels.insert("container".into(), container.to_owned());
    let meta = [
        ("__meta_kubernetes_namespace", pod.namespace.as_str()),
        ("__meta_kubernetes_pod_name", pod.name.as_str()),
        ("__meta_kubernetes_pod_uid", pod.uid.as_str()),
        ("__meta_kubernetes_pod_node_name", pod.node.as_str()),
        ("__meta_kubernetes_pod_container_name", container),
    ];
    for (k, v) in meta {
        labels.insert(k.into(), v.into());
    }
    if let Some(owner) = &pod.owner {
        labels.insert(
            "__meta_kubernetes_pod_controller_kind".into(),
            owner.kind.clone(),
        );
        labels.insert(
            "__meta_kubernetes_pod_controller_name".into(),
            owner.name.clone(),
        );
    }
    for (k, v) in &pod.labels {
        labels.insert(
            format!("__meta_kubernetes_pod_label_{}", sanitize(k)),
            v.clone(),
        );
    }
}

/// The pod's service: its `app.kubernetes.io/name` or `app` label, else its owner workload,
/// else the pod's own name.
fn workload_name(pod: &PodInfo) -> String {
    pod.labels
        .get("app.kubernetes.io/name")
        .or_else(|| pod.labels.get("app"))
        .cloned()
        .or_else(|| pod.owner.as_ref().map(|o| o.name.clone()))
        .unwrap_or_else(|| pod.name.clone())
}

/// A Kubernetes label name as a Prometheus label name: other characters become `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, HashSet},
        sync::Arc,
        time::{Duration, Instant},
    };

    use profiler_metadata::{
        kubernetes::{ContainerInfo, Owner, PodCache, PodInfo},
        relabel::{RelabelConfig, Relabeler},
    };

    use super::{Change, Decision, Facts, Labels, TargetKey, Targets, MAX_HELD_SAMPLES};
    use crate::{aggregate::ProfileSet, aggregate::SampleLabels, resolve::ResolvedSample};

    const ID: &str = "8b1f2a3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

    fn pod(labels: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: "web-7d4b9c8f6d-x2x9q".into(),
            uid: "uid-1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            owner: Some(Owner {
                kind: "Deployment".into(),
                name: "web".into(),
            }),
            containers: vec![ContainerInfo {
                id: ID.into(),
                name: "app".into(),
            }],
            node: "node-a".into(),
        }
    }

    fn pods(labels: &[(&str, &str)]) -> PodCache {
        let cache = PodCache::default();
        cache.insert(pod(labels));
        cache
    }

    fn targets(pods: Option<PodCache>, rules: &str) -> Targets {
        #[derive(serde::Deserialize)]
        struct Rules {
            #[serde(default)]
            relabel_configs: Vec<RelabelConfig>,
        }
        let rules: Rules = toml::from_str(rules).unwrap();
        let static_labels = BTreeMap::from([("cluster".to_owned(), "prod".to_owned())]);
        Targets::new(
            "node-a".into(),
            static_labels,
            Relabeler::new(&rules.relabel_configs).unwrap(),
            pods,
        )
    }

    fn host(comm: &str, exe: &str) -> Facts {
        Facts {
            comm: comm.into(),
            exe: Some(exe.into()),
            ..Default::default()
        }
    }

    fn in_container(comm: &str) -> Facts {
        Facts {
            container: Some(ID.into()),
            ..host(comm, comm)
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn keep(decision: Decision) -> TargetKey {
        match decision {
            Decision::Keep(key) => key,
            other => panic!("not kept: {other:?}"),
        }
    }

    fn sample(pid: u32, count: u64) -> ResolvedSample {
        ResolvedSample {
            process: crate::collect::ProcessKey {
                tgid: pid,
                ..Default::default()
            },
            pid,
            tid: pid,
            comm: Arc::from("app"),
            thread: Arc::from("app"),
            frames: Vec::new(),
            count,
            off_cpu: false,
        }
    }

    /// Files `samples` into `out` as (series labels, count).
    fn file(targets: &mut Targets, samples: &[ResolvedSample]) -> Vec<(Labels, u64)> {
        let mut out = Vec::new();
        targets.file(samples, |k, s| out.push((k.labels().clone(), s.count)));
        out
    }

    #[test]
    fn a_pod_container_is_labelled_from_the_pod_without_its_container_id() {
        let mut targets = targets(Some(pods(&[("app.kubernetes.io/name", "storefront")])), "");
        let key = keep(targets.insert(42, in_container("java"), Instant::now()));
        let expected = labels(&[
            ("__name__", "process_cpu"),
            ("service_name", "shop/storefront"),
            ("namespace", "shop"),
            ("pod", "web-7d4b9c8f6d-x2x9q"),
            ("container", "app"),
            ("node", "node-a"),
            ("cluster", "prod"),
        ]);
        assert_eq!(key.labels(), &expected);
    }

    #[test]
    fn the_container_id_is_there_for_relabeling() {
        let rules = r#"
[[relabel_configs]]
source_labels = ["__meta_container_id"]
target_label = "container_id"
"#;
        let mut targets = targets(Some(pods(&[])), rules);
        let key = keep(targets.insert(42, in_container("java"), Instant::now()));
        assert_eq!(key.labels()["container_id"], ID);
        assert_eq!(key.labels()["service_name"], "shop/web");
    }

    #[test]
    fn host_processes_of_one_executable_are_one_series() {
        let mut targets = targets(None, "");
        let now = Instant::now();
        let a = keep(targets.insert(7, host("nginx: worker", "nginx"), now));
        let b = keep(targets.insert(8, host("nginx: master", "nginx"), now));
        let other = keep(targets.insert(9, host("redis-server", "redis-server"), now));
        assert_eq!(a, b);
        assert!(Arc::ptr_eq(&a.0, &b.0), "one shared copy of the labels");
        assert_ne!(a, other);
        let expected = labels(&[
            ("__name__", "process_cpu"),
            ("service_name", "nginx"),
            ("node", "node-a"),
            ("cluster", "prod"),
        ]);
        assert_eq!(a.labels(), &expected, "no pid, no comm");
    }

    #[test]
    fn pid_and_comm_are_labels_only_when_relabeling_maps_them() {
        let rules = r#"
[[relabel_configs]]
source_labels = ["__meta_process_pid"]
target_label = "pid"

[[relabel_configs]]
source_labels = ["__meta_process_comm"]
target_label = "comm"
"#;
        let mut targets = targets(None, rules);
        let key = keep(targets.insert(7, host("nginx: worker", "nginx"), Instant::now()));
        assert_eq!(key.labels()["pid"], "7");
        assert_eq!(key.labels()["comm"], "nginx: worker");
    }

    #[test]
    fn kernel_threads_are_one_series_per_node_unless_relabeled() {
        let kthread = |comm: &str| Facts {
            comm: comm.into(),
            exe: None,
            kernel_thread: true,
            container: None,
        };
        let mut plain = targets(None, "");
        let now = Instant::now();
        let a = keep(plain.insert(2, kthread("kthreadd"), now));
        let b = keep(plain.insert(40, kthread("kworker/0:1"), now));
        assert_eq!(a, b);
        assert_eq!(a.labels()["service_name"], "kernel");

        let rules = r#"
[[relabel_configs]]
source_labels = ["__meta_process_comm"]
regex = "(kworker).*"
target_label = "service_name"
replacement = "$1"
"#;
        let mut split = targets(None, rules);
        let worker = keep(split.insert(40, kthread("kworker/0:1"), now));
        assert_eq!(worker.labels()["service_name"], "kworker");
    }

    #[test]
    fn live_kernel_threads_and_this_process_are_read_from_proc() {
        let mut targets = targets(None, "");
        // kthreadd is pid 2 on Linux.
        let kthreadd = keep(targets.decide(2, "kthreadd"));
        assert_eq!(kthreadd.labels()["service_name"], "kernel");
        let me = keep(targets.decide(std::process::id(), "x"));
        let exe = std::env::current_exe().unwrap();
        let exe = exe.file_name().unwrap().to_str().unwrap();
        assert_eq!(me.labels()["service_name"], exe);
    }

    #[test]
    fn a_process_known_only_by_its_samples_is_named_by_its_executable_mapping() {
        use crate::resolve::{Frame, Mapping};
        let mut targets = targets(None, "");
        let main = Arc::new(Mapping {
            id: 9,
            start: 0x1000,
            end: 0x2000,
            offset: 0,
            path: "/opt/app/bin/server".into(),
            file: None,
            build_id: String::new(),
            is_main: true,
            load_bias: 0,
        });
        // A pid that cannot exist: only the sample's names are left.
        let mut gone = sample(u32::MAX - 1, 3);
        gone.comm = Arc::from("[unknown]");
        gone.frames.push(Frame {
            address: 0x1100,
            mapping: Some(main),
            lines: Vec::new().into(),
        });
        let filed = file(&mut targets, &[gone]);
        assert_eq!(filed[0].0["service_name"], "server");
        let mut nothing = sample(u32::MAX - 2, 1);
        nothing.comm = Arc::from("[unknown]");
        let filed = file(&mut targets, &[nothing]);
        assert_eq!(filed[0].0["service_name"], "unidentified");
    }

    #[test]
    fn relabeling_drops_and_rewrites_over_meta_labels() {
        let rules = r#"
[[relabel_configs]]
source_labels = ["__meta_kubernetes_namespace"]
regex = "kube-system|shop"
action = "drop"
"#;
        let mut dropping = targets(Some(pods(&[])), rules);
        let now = Instant::now();
        assert_eq!(
            dropping.insert(42, in_container("java"), now),
            Decision::Drop
        );
        let rules = r#"
[[relabel_configs]]
source_labels = ["__meta_kubernetes_pod_label_team"]
target_label = "team"
"#;
        let mut rewriting = targets(Some(pods(&[("team", "payments")])), rules);
        let key = keep(rewriting.insert(42, in_container("java"), now));
        assert_eq!(key.labels()["team"], "payments");
    }

    const KEEP_SHOP: &str = r#"
[[relabel_configs]]
source_labels = ["__meta_kubernetes_namespace"]
regex = "shop"
action = "keep"
"#;

    #[test]
    fn a_keep_rule_waits_for_the_pod_and_files_what_was_held() {
        let cache = PodCache::default();
        let mut targets = targets(Some(cache.clone()), KEEP_SHOP);
        let start = Instant::now();
        assert_eq!(
            targets.insert(42, in_container("java"), start),
            Decision::Wait
        );
        // Host processes are decided at once, by the keep rule: dropped.
        assert_eq!(
            targets.insert(7, host("sshd", "sshd"), start),
            Decision::Drop
        );
        assert!(file(&mut targets, &[sample(42, 2), sample(7, 5)]).is_empty());
        assert!(file(&mut targets, &[sample(42, 1)]).is_empty());

        // Nothing changed yet: still waiting.
        let mut out = Vec::new();
        let changes = targets.revisit_at(start + Duration::from_secs(1), false, |k, s| {
            out.push((k.clone(), s.count))
        });
        assert!(changes.is_empty() && out.is_empty());

        cache.insert(pod(&[]));
        let changes = targets.revisit_at(start + Duration::from_secs(2), false, |k, s| {
            out.push((k.clone(), s.count))
        });
        assert!(changes.is_empty(), "it was never excluded: {changes:?}");
        assert_eq!(out.len(), 2, "both held samples are filed");
        assert_eq!(out[0].0.labels()["service_name"], "shop/web");
        assert_eq!(out.iter().map(|(_, c)| c).sum::<u64>(), 3);
        // From now on its samples go straight to the series.
        assert_eq!(file(&mut targets, &[sample(42, 4)]).len(), 1);
    }

    #[test]
    fn a_process_dropped_without_its_pod_is_sampled_again_when_the_pod_appears() {
        let cache = PodCache::default();
        let mut targets = targets(Some(cache.clone()), KEEP_SHOP);
        let start = Instant::now();
        assert_eq!(
            targets.insert(42, in_container("java"), start),
            Decision::Wait
        );
        file(&mut targets, &[sample(42, 2)]);
        // The grace period ends without a pod: the keep rule drops it, held samples too.
        let mut out = Vec::new();
        let late = start + super::POD_GRACE;
        let changes = targets.revisit_at(late, false, |k, s| out.push((k.clone(), s.count)));
        assert_eq!(
            changes,
            vec![Change {
                pid: 42,
                exclude: true
            }]
        );
        assert!(out.is_empty());
        assert_eq!(targets.held, 0);

        cache.insert(pod(&[]));
        let changes = targets.revisit_at(late, false, |k, s| out.push((k.clone(), s.count)));
        assert_eq!(
            changes,
            vec![Change {
                pid: 42,
                exclude: false
            }]
        );
        assert!(matches!(targets.processes[&42].decision, Decision::Keep(_)));
    }

    #[test]
    fn samples_of_an_exited_waiting_process_are_filed_when_its_pod_appears() {
        let cache = PodCache::default();
        let mut targets = targets(Some(cache.clone()), KEEP_SHOP);
        let start = Instant::now();
        targets.insert(42, in_container("java"), start);
        file(&mut targets, &[sample(42, 2)]);
        targets.forget(42);
        assert!(targets.is_empty());
        cache.insert(pod(&[]));
        let mut out = Vec::new();
        let changes = targets.revisit_at(start, false, |k, s| out.push((k.clone(), s.count)));
        assert!(changes.is_empty(), "not live: nothing for the kernel");
        assert_eq!(out.len(), 1);
        assert!(targets.gone.is_empty());
    }

    #[test]
    fn shutdown_decides_every_waiting_process() {
        let mut targets = targets(Some(PodCache::default()), "");
        targets.insert(42, in_container("java"), Instant::now());
        file(&mut targets, &[sample(42, 2)]);
        let mut out = Vec::new();
        targets.decide_all(|k, s| out.push((k.labels().clone(), s.count)));
        assert_eq!(out, vec![(out[0].0.clone(), 2)]);
        assert_eq!(out[0].0["service_name"], "java", "no pod: the executable");
    }

    #[test]
    fn held_samples_are_bounded_and_counted() {
        let mut targets = targets(Some(PodCache::default()), "");
        targets.insert(42, in_container("java"), Instant::now());
        let samples: Vec<ResolvedSample> =
            (0..MAX_HELD_SAMPLES + 10).map(|_| sample(42, 2)).collect();
        file(&mut targets, &samples);
        assert_eq!(targets.held, MAX_HELD_SAMPLES);
        assert_eq!(targets.take_held_dropped(), 20);
        assert_eq!(targets.take_held_dropped(), 0);
    }

    /// A relabel rule that makes every process a series of its own, over 10,000 processes:
    /// the real classification and the real per-interval cap.
    #[test]
    fn a_rule_that_would_make_10000_series_is_capped() {
        let rules = r#"
[[relabel_configs]]
source_labels = ["__meta_process_pid"]
target_label = "pid"
"#;
        let mut targets = targets(None, rules);
        let mut profiles =
            ProfileSet::new(99, SampleLabels::None).with_cap(1000, targets.overflow_key());
        let now = Instant::now();
        let mut folded = 0;
        for pid in 10_000..20_000 {
            targets.insert(pid, host("worker", "worker"), now);
        }
        let samples: Vec<ResolvedSample> = (10_000..20_000).map(|pid| sample(pid, 1)).collect();
        targets.file(&samples, |key, sample| {
            if profiles.add(key, sample) {
                folded += sample.count;
            }
        });
        assert_eq!(folded, 9_000);
        let taken = profiles.take(std::time::SystemTime::now(), std::time::SystemTime::now());
        assert_eq!(taken.len(), 1001, "1000 series and the overflow series");
        let overflow: Vec<_> = taken
            .iter()
            .filter(|(k, _)| k.labels()["service_name"] == "series-overflow")
            .collect();
        assert_eq!(overflow.len(), 1);
        assert_eq!(overflow[0].0.labels()["node"], "node-a");
        assert_eq!(
            overflow[0].1.sample.iter().map(|s| s.value[0]).sum::<i64>(),
            9_000
        );
        let pids: HashSet<&str> = taken
            .iter()
            .filter_map(|(k, _)| k.labels().get("pid").map(String::as_str))
            .collect();
        assert_eq!(pids.len(), 1000);
    }
}
