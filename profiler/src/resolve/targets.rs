//! Targets: which service a process belongs to, and the labels its profile carries.
//!
//! In Kubernetes a target is a container of a pod; elsewhere a container (by ID), else the
//! process. Labels are computed once per process, with Prometheus-style relabeling over
//! `__meta_*` labels, which can also drop a target altogether.

use std::{collections::BTreeMap, collections::HashMap, sync::Arc};

use profiler_metadata::{
    cgroup::container_id_of,
    kubernetes::{PodCache, PodInfo},
    relabel::Relabeler,
};

/// What one profile is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKey {
    /// A container, by runtime ID.
    Container(String),
    /// A process outside any container.
    Process(u32),
}

/// A target and the labels of its profiles.
#[derive(Debug)]
pub struct Target {
    pub key: TargetKey,
    /// Final labels, `__name__` and `service_name` included.
    pub labels: BTreeMap<String, String>,
    /// Relabeling dropped it: nothing of it is sampled or sent.
    pub dropped: bool,
    /// In a container whose pod was not known yet: classify again later.
    awaiting_pod: bool,
}

/// Classifies processes into targets.
pub struct Targets {
    node: String,
    static_labels: BTreeMap<String, String>,
    relabel: Relabeler,
    pods: Option<PodCache>,
    by_pid: HashMap<u32, Arc<Target>>,
}

/// The profile type label Pyroscope keys CPU profiles by.
pub const PROFILE_NAME: &str = "process_cpu";

impl Targets {
    /// `pods` is `None` outside Kubernetes.
    pub fn new(
        node: String,
        static_labels: BTreeMap<String, String>,
        relabel: Relabeler,
        pods: Option<PodCache>,
    ) -> Self {
        Self {
            node,
            static_labels,
            relabel,
            pods,
            by_pid: HashMap::new(),
        }
    }

    /// The target of `pid`, classified on first use. `comm` is the process name.
    pub fn get(&mut self, pid: u32, comm: &str) -> Arc<Target> {
        if let Some(target) = self.by_pid.get(&pid) {
            return target.clone();
        }
        let target = Arc::new(self.classify(pid, comm));
        self.by_pid.insert(pid, target.clone());
        target
    }

    /// Forgets `pid` (it exited, or exec'd into something else).
    pub fn forget(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
    }

    /// Classifies again the processes whose pod was not known yet.
    pub fn retry_unknown_pods(&mut self) {
        self.by_pid.retain(|_, t| !t.awaiting_pod);
    }

    /// Processes classified.
    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    /// True when no process is classified.
    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    fn classify(&self, pid: u32, comm: &str) -> Target {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .map(|name| name.trim_end_matches(" (deleted)").to_owned())
            .unwrap_or_else(|| comm.to_owned());
        self.classify_as(pid, comm, exe, container_id_of(pid).map(|c| c.id))
    }

    /// Classification from what /proc said: the executable's name and the container ID.
    fn classify_as(&self, pid: u32, comm: &str, exe: String, container: Option<String>) -> Target {
        let pod = match (&container, &self.pods) {
            (Some(id), Some(pods)) => pods.by_container_id(id),
            _ => None,
        };
        let mut labels = self.static_labels.clone();
        labels.insert("__name__".into(), PROFILE_NAME.into());
        labels.insert("node".into(), self.node.clone());
        labels.insert("__meta_process_pid".into(), pid.to_string());
        labels.insert("__meta_process_comm".into(), comm.to_owned());
        labels.insert("__meta_process_exe".into(), exe.clone());
        let key = match &container {
            Some(id) => {
                labels.insert("container_id".into(), id.clone());
                labels.insert("__meta_container_id".into(), id.clone());
                TargetKey::Container(id.clone())
            }
            None => {
                labels.insert("pid".into(), pid.to_string());
                labels.insert("comm".into(), comm.to_owned());
                TargetKey::Process(pid)
            }
        };
        let service = match &pod {
            Some((pod, container_name)) => {
                add_pod_labels(&mut labels, pod, container_name);
                format!("{}/{}", pod.namespace, workload_name(pod))
            }
            None => exe,
        };
        labels.insert("service_name".into(), service);
        let keep = self.relabel.apply(&mut labels);
        labels.retain(|k, _| !k.starts_with("__") || k == "__name__");
        Target {
            key,
            labels,
            dropped: !keep,
            awaiting_pod: container.is_some() && self.pods.is_some() && pod.is_none(),
        }
    }
}

fn add_pod_labels(labels: &mut BTreeMap<String, String>, pod: &PodInfo, container: &str) {
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
    use std::collections::BTreeMap;

    use profiler_metadata::{
        kubernetes::{ContainerInfo, Owner, PodCache, PodInfo},
        relabel::{RelabelConfig, Relabeler},
    };

    use super::{TargetKey, Targets};

    const ID: &str = "8b1f2a3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

    fn pods(labels: &[(&str, &str)]) -> PodCache {
        let cache = PodCache::default();
        cache.insert(PodInfo {
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
        });
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

    #[test]
    fn a_pod_container_is_labelled_from_the_pod() {
        let targets = targets(Some(pods(&[("app.kubernetes.io/name", "storefront")])), "");
        let t = targets.classify_as(42, "java", "java".into(), Some(ID.into()));
        assert_eq!(t.key, TargetKey::Container(ID.into()));
        let expected = [
            ("__name__", "process_cpu"),
            ("service_name", "shop/storefront"),
            ("namespace", "shop"),
            ("pod", "web-7d4b9c8f6d-x2x9q"),
            ("container", "app"),
            ("container_id", ID),
            ("node", "node-a"),
            ("cluster", "prod"),
        ];
        let expected: BTreeMap<String, String> = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(t.labels, expected);
        assert!(!t.dropped);
    }

    #[test]
    fn without_app_labels_the_owner_workload_names_the_service() {
        let targets = targets(Some(pods(&[])), "");
        let t = targets.classify_as(42, "java", "java".into(), Some(ID.into()));
        assert_eq!(t.labels["service_name"], "shop/web");
    }

    #[test]
    fn a_host_process_is_its_own_target() {
        let targets = targets(None, "");
        let t = targets.classify_as(7, "nginx: worker", "nginx".into(), None);
        assert_eq!(t.key, TargetKey::Process(7));
        assert_eq!(t.labels["service_name"], "nginx");
        assert_eq!(t.labels["pid"], "7");
        assert_eq!(t.labels["comm"], "nginx: worker");
        assert!(t.labels.keys().all(|k| !k.starts_with("__meta")));
    }

    #[test]
    fn relabeling_drops_and_rewrites_over_meta_labels() {
        let rules = r#"
[[relabel_configs]]
source_labels = ["__meta_kubernetes_namespace"]
regex = "kube-system|shop"
action = "drop"
"#;
        let dropping = targets(Some(pods(&[])), rules);
        assert!(
            dropping
                .classify_as(42, "java", "java".into(), Some(ID.into()))
                .dropped
        );
        let rules = r#"
[[relabel_configs]]
source_labels = ["__meta_kubernetes_pod_label_team"]
target_label = "team"
"#;
        let rewriting = targets(Some(pods(&[("team", "payments")])), rules);
        let t = rewriting.classify_as(42, "java", "java".into(), Some(ID.into()));
        assert_eq!(t.labels["team"], "payments");
    }

    #[test]
    fn a_container_whose_pod_is_not_known_yet_is_retried() {
        let mut targets = targets(Some(PodCache::default()), "");
        let t = targets.classify_as(42, "java", "java".into(), Some(ID.into()));
        assert!(t.awaiting_pod);
        assert_eq!(t.labels["service_name"], "java");
        targets.by_pid.insert(42, std::sync::Arc::new(t));
        targets.retry_unknown_pods();
        assert!(targets.is_empty());
    }
}
