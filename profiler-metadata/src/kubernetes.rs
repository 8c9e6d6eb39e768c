//! Pod metadata for the containers running on this node.
//!
//! The profiler sees PIDs; [`crate::cgroup`] turns a PID into a container ID;
//! this module turns a container ID into the pod (namespace, name, labels,
//! owning workload) so samples can carry the labels people query by. It keeps
//! an in-memory cache fed by a Kubernetes *watch* restricted to this node's
//! pods (`spec.nodeName=<node>`): one list at start, then change events,
//! instead of polling the API server per lookup.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::pin::pin;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config};
use tokio::sync::watch;

/// How long [`watch_pods`] waits for the first complete list of pods before
/// returning anyway (the cache then fills in the background).
const INITIAL_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a deleted pod stays resolvable. Samples are resolved after they
/// are taken (batching, symbolization), and a short-lived pod may be gone
/// from the API by then; keeping it a little longer still labels them.
const DELETED_POD_GRACE: Duration = Duration::from_secs(120);

/// How often forgotten pods are purged when no events arrive.
const PURGE_INTERVAL: Duration = Duration::from_secs(30);

/// The workload that owns a pod: what people mean by "the service".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// The owner's kind: `Deployment` (resolved through its ReplicaSet),
    /// `ReplicaSet`, `StatefulSet`, `DaemonSet`, `Job`, `Node` (static pods)…
    pub kind: String,
    /// The owner's name, e.g. `web` for pods of Deployment `web`.
    pub name: String,
}

/// One container of a pod, as reported in the pod's status.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerInfo {
    /// The 64-hex container ID, without the `containerd://` (or `cri-o://`,
    /// `docker://`) prefix, i.e. what [`crate::cgroup::ContainerId::id`] holds.
    pub id: String,
    /// The container's name in the pod spec.
    pub name: String,
}

/// What the profiler needs to know about a pod to label its samples.
///
/// Only these fields are kept (not the whole `Pod` object) so that a cache of
/// every pod on a busy node stays small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's UID.
    pub uid: String,
    /// The pod's labels (`metadata.labels`).
    pub labels: BTreeMap<String, String>,
    /// The controlling workload, if any. A pod owned by a ReplicaSet whose
    /// name is `<deployment>-<pod-template-hash>` is reported as owned by
    /// that Deployment; `None` for bare pods.
    pub owner: Option<Owner>,
    /// Containers that have been started at least once (those with a
    /// container ID) from `containerStatuses`, `initContainerStatuses` and
    /// `ephemeralContainerStatuses`.
    pub containers: Vec<ContainerInfo>,
    /// The node the pod is scheduled on (`spec.nodeName`).
    pub node: String,
}

impl PodInfo {
    fn from_pod(pod: &Pod) -> PodInfo {
        let meta = &pod.metadata;
        let labels = meta.labels.clone().unwrap_or_default();
        let owner = meta.owner_references.as_deref().and_then(|refs| {
            // The controller reference is the owner; fall back to the first
            // reference for objects created by tools that do not set it.
            let controller = refs
                .iter()
                .find(|r| r.controller == Some(true))
                .or_else(|| refs.first())?;
            Some(workload_owner(&controller.kind, &controller.name, &labels))
        });
        let status = pod.status.as_ref();
        let statuses = [
            status.and_then(|s| s.init_container_statuses.as_deref()),
            status.and_then(|s| s.container_statuses.as_deref()),
            status.and_then(|s| s.ephemeral_container_statuses.as_deref()),
        ];
        let containers = statuses
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(container_info)
            .collect();
        PodInfo {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            labels,
            owner,
            containers,
            node: pod
                .spec
                .as_ref()
                .and_then(|spec| spec.node_name.clone())
                .unwrap_or_default(),
        }
    }

    /// The cache key: the UID, which survives a pod being recreated under the
    /// same name only as a different pod.
    fn key(&self) -> String {
        if self.uid.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            self.uid.clone()
        }
    }
}

/// Resolves a ReplicaSet created by a Deployment to the Deployment: the
/// Deployment controller names it `<deployment>-<pod-template-hash>` and
/// copies the hash into the pod's `pod-template-hash` label.
fn workload_owner(kind: &str, name: &str, labels: &BTreeMap<String, String>) -> Owner {
    if kind == "ReplicaSet" {
        if let Some(hash) = labels.get("pod-template-hash").filter(|h| !h.is_empty()) {
            if let Some(deployment) = name
                .strip_suffix(hash.as_str())
                .and_then(|rest| rest.strip_suffix('-'))
                .filter(|d| !d.is_empty())
            {
                return Owner {
                    kind: "Deployment".to_owned(),
                    name: deployment.to_owned(),
                };
            }
        }
    }
    Owner {
        kind: kind.to_owned(),
        name: name.to_owned(),
    }
}

fn container_info(status: &ContainerStatus) -> Option<ContainerInfo> {
    let id = strip_runtime_prefix(status.container_id.as_deref()?);
    (!id.is_empty()).then(|| ContainerInfo {
        id: id.to_owned(),
        name: status.name.clone(),
    })
}

/// `containerd://abc…` → `abc…`; an ID without a prefix is returned as is.
fn strip_runtime_prefix(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, rest)| rest)
}

/// The pods on this node, indexed by container ID, kept current by the task
/// [`watch_pods`] starts.
///
/// Cloning is cheap (an `Arc`); all clones see the same data. The background
/// watch stops once every clone is dropped. Lookups take a read lock only
/// briefly and never wait for the network.
#[derive(Debug, Clone, Default)]
pub struct PodCache {
    inner: Arc<RwLock<Store>>,
}

#[derive(Debug, Default)]
struct Store {
    /// Pods by [`PodInfo::key`].
    pods: HashMap<String, Entry>,
    /// Container ID → (pod key, container name).
    containers: HashMap<String, (String, String)>,
    /// Moves on every change that can change a lookup's answer.
    version: u64,
}

#[derive(Debug)]
struct Entry {
    info: Arc<PodInfo>,
    /// When the pod was deleted (or found missing on a re-list); it stays
    /// resolvable for [`DELETED_POD_GRACE`] after that.
    deleted_at: Option<Instant>,
}

impl PodCache {
    /// Finds the pod that runs the container with this ID, and the
    /// container's name in it.
    ///
    /// `id` is the 64-hex container ID (a `containerd://`-style prefix is
    /// tolerated). Returns `None` when no pod on this node has such a
    /// container: a host process's container (e.g. a plain Docker container
    /// outside Kubernetes), a container started so recently that the watch has
    /// not delivered it yet, or a pod deleted more than two minutes ago.
    pub fn by_container_id(&self, id: &str) -> Option<(Arc<PodInfo>, String)> {
        let store = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let (key, container) = store.containers.get(strip_runtime_prefix(id))?;
        let entry = store.pods.get(key)?;
        Some((Arc::clone(&entry.info), container.clone()))
    }

    /// The number of pods currently on the node as far as the watch knows
    /// (deleted pods still kept for late lookups are not counted); 0 before
    /// the first list arrives.
    pub fn len(&self) -> usize {
        let store = self.inner.read().unwrap_or_else(|e| e.into_inner());
        store
            .pods
            .values()
            .filter(|e| e.deleted_at.is_none())
            .count()
    }

    /// Whether [`PodCache::len`] is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A number that moves whenever a lookup's answer may have changed (a pod added, updated
    /// or purged): callers that acted on an answer, or on its absence, ask again when it moves.
    pub fn version(&self) -> u64 {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).version
    }

    /// Adds or replaces a pod as a watch event would: for callers that learn about pods some
    /// other way, and for tests of what is built on the cache.
    pub fn insert(&self, info: PodInfo) {
        let mut store = self.inner.write().unwrap_or_else(|e| e.into_inner());
        store.apply(info);
    }
}

impl Store {
    fn apply(&mut self, info: PodInfo) {
        let key = info.key();
        self.version += 1;
        self.forget_containers(&key);
        for container in &info.containers {
            self.containers
                .insert(container.id.clone(), (key.clone(), container.name.clone()));
        }
        let entry = Entry {
            info: Arc::new(info),
            deleted_at: None,
        };
        self.pods.insert(key, entry);
    }

    fn delete(&mut self, key: &str, now: Instant) {
        if let Some(entry) = self.pods.get_mut(key) {
            entry.deleted_at.get_or_insert(now);
        }
    }

    /// Removes pods deleted longer than `grace` ago.
    fn purge(&mut self, now: Instant, grace: Duration) {
        let expired: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, e)| {
                e.deleted_at
                    .is_some_and(|at| now.duration_since(at) >= grace)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in expired {
            self.version += 1;
            self.forget_containers(&key);
            self.pods.remove(&key);
        }
    }

    /// Drops the container index entries that point at pod `key`.
    fn forget_containers(&mut self, key: &str) {
        if let Some(old) = self.pods.get(key) {
            for container in &old.info.containers {
                if self
                    .containers
                    .get(&container.id)
                    .is_some_and(|(k, _)| k == key)
                {
                    self.containers.remove(&container.id);
                }
            }
        }
    }
}

/// Starts watching the pods scheduled on `node` and returns a cache of them.
///
/// The client comes from `kubeconfig` when given, else from
/// `kube::Config::infer()`: `$KUBECONFIG` or `~/.kube/config`, then the
/// in-cluster service account (`KUBERNETES_SERVICE_HOST` and
/// `/var/run/secrets/kubernetes.io/serviceaccount`).
///
/// Returns once the first complete list of the node's pods is in the cache,
/// so that early samples get labels — or after 10 seconds, or as soon as the
/// API server reports an error, whichever comes first. From then on a
/// background task keeps the cache current from watch events, reconnecting
/// with client-go's backoff after errors (reported once on stderr per
/// failure streak); so an API server that is down or refuses access at start
/// does not fail this call, the cache just fills later.
///
/// # Errors
///
/// Fails, with one message meant to be shown as is, when `node` is empty,
/// when the given kubeconfig cannot be read, or when there is no Kubernetes
/// configuration at all (not in a cluster, no kubeconfig): the caller should
/// then carry on without pod metadata.
pub async fn watch_pods(node: &str, kubeconfig: Option<&Path>) -> anyhow::Result<PodCache> {
    if node.is_empty() {
        bail!("cannot watch pods: the node name is empty");
    }
    let config = load_config(kubeconfig).await?;
    let client = Client::try_from(config).context("cannot create a Kubernetes client")?;
    let pods: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let watch_config = watcher::Config::default().fields(&selector);

    let cache = PodCache::default();
    let (state_tx, mut state_rx) = watch::channel(Progress::Listing);
    tokio::spawn(keep_updated(
        pods,
        watch_config,
        node.to_owned(),
        Arc::downgrade(&cache.inner),
        state_tx,
    ));
    // Any outcome is fine here: the task keeps going regardless.
    let _ = tokio::time::timeout(
        INITIAL_LIST_TIMEOUT,
        state_rx.wait_for(|p| *p != Progress::Listing),
    )
    .await;
    Ok(cache)
}

async fn load_config(kubeconfig: Option<&Path>) -> anyhow::Result<Config> {
    match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("cannot use kubeconfig {}", path.display()))
        }
        None => Config::infer().await.map_err(|err| {
            anyhow!(
                "no Kubernetes configuration: not running in a pod with a service account \
                 and no kubeconfig ($KUBECONFIG or ~/.kube/config) ({err})"
            )
        }),
    }
}

/// How far the background watch got, for [`watch_pods`] to wait on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Listing,
    Listed,
    Failed,
}

/// The background task: applies watch events to the cache until every
/// [`PodCache`] clone is gone.
async fn keep_updated(
    pods: Api<Pod>,
    config: watcher::Config,
    node: String,
    cache: Weak<RwLock<Store>>,
    progress: watch::Sender<Progress>,
) {
    let mut events = pin!(watcher::watcher(pods, config).default_backoff());
    let mut purge = tokio::time::interval(PURGE_INTERVAL);
    // Keys listed since the last Init, to spot pods deleted while the watch
    // was down.
    let mut relisted: HashSet<String> = HashSet::new();
    let mut failing = false;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = purge.tick() => {
                let Some(strong) = cache.upgrade() else { return };
                let mut store = strong.write().unwrap_or_else(|e| e.into_inner());
                store.purge(Instant::now(), DELETED_POD_GRACE);
                continue;
            }
        };
        let Some(strong) = cache.upgrade() else {
            return;
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(err)) => {
                if !failing && !is_routine(&err) {
                    eprintln!(
                        "warning: watching pods on node {node} failed, retrying: {}",
                        one_line(&err)
                    );
                    failing = true;
                }
                progress.send_if_modified(|p| {
                    let first_failure = *p == Progress::Listing;
                    if first_failure {
                        *p = Progress::Failed;
                    }
                    first_failure
                });
                continue;
            }
            // The watcher stream never ends; if it did, nothing more can come.
            None => return,
        };
        // Init comes before the list request, so it proves nothing yet.
        if failing && !matches!(event, Event::Init) {
            eprintln!("watching pods on node {node} works again");
            failing = false;
        }
        let mut store = strong.write().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Init => relisted.clear(),
            Event::InitApply(pod) => {
                let info = PodInfo::from_pod(&pod);
                relisted.insert(info.key());
                store.apply(info);
            }
            Event::InitDone => {
                let now = Instant::now();
                let gone: Vec<String> = store
                    .pods
                    .keys()
                    .filter(|key| !relisted.contains(*key))
                    .cloned()
                    .collect();
                for key in gone {
                    store.delete(&key, now);
                }
                relisted.clear();
                drop(store);
                progress.send_replace(Progress::Listed);
            }
            Event::Apply(pod) => store.apply(PodInfo::from_pod(&pod)),
            Event::Delete(pod) => store.delete(&PodInfo::from_pod(&pod).key(), Instant::now()),
        }
    }
}

/// A watch that expired (HTTP 410 Gone) is routine: the watcher re-lists.
fn is_routine(err: &watcher::Error) -> bool {
    matches!(err, watcher::Error::WatchError(status) if status.code == 410)
}

fn one_line(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // Many errors already print their source; do not repeat it.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    const C1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const C2: &str = "2222222222222222222222222222222222222222222222222222222222222222";
    const C3: &str = "3333333333333333333333333333333333333333333333333333333333333333";

    fn status(name: &str, id: Option<&str>) -> ContainerStatus {
        ContainerStatus {
            name: name.to_owned(),
            container_id: id.map(str::to_owned),
            image: "registry.example/app:1".to_owned(),
            image_id: "registry.example/app@sha256:00".to_owned(),
            ..ContainerStatus::default()
        }
    }

    fn pod(
        uid: &str,
        name: &str,
        owner: Option<(&str, &str)>,
        containers: Vec<ContainerStatus>,
    ) -> Pod {
        let mut labels = BTreeMap::from([("app.kubernetes.io/name".to_owned(), "web".to_owned())]);
        labels.insert("pod-template-hash".to_owned(), "7d4b9c8f6d".to_owned());
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("shop".to_owned()),
                uid: Some(uid.to_owned()),
                labels: Some(labels),
                owner_references: owner.map(|(kind, name)| {
                    vec![OwnerReference {
                        api_version: "apps/v1".to_owned(),
                        kind: kind.to_owned(),
                        name: name.to_owned(),
                        uid: "owner-uid".to_owned(),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    }]
                }),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".to_owned()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                container_statuses: Some(containers),
                init_container_statuses: Some(vec![status(
                    "init",
                    Some(&format!("containerd://{C3}")),
                )]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn pod_info_from_pod() {
        let p = pod(
            "uid-1",
            "web-7d4b9c8f6d-x2x9z",
            Some(("ReplicaSet", "web-7d4b9c8f6d")),
            vec![
                status("app", Some(&format!("containerd://{C1}"))),
                status("sidecar", Some(&format!("cri-o://{C2}"))),
                status("waiting", None),
            ],
        );
        let info = PodInfo::from_pod(&p);
        assert_eq!(info.namespace, "shop");
        assert_eq!(info.name, "web-7d4b9c8f6d-x2x9z");
        assert_eq!(info.uid, "uid-1");
        assert_eq!(info.node, "node-a");
        assert_eq!(info.labels["app.kubernetes.io/name"], "web");
        assert_eq!(
            info.owner,
            Some(Owner {
                kind: "Deployment".into(),
                name: "web".into()
            })
        );
        let containers: Vec<(&str, &str)> = info
            .containers
            .iter()
            .map(|c| (c.name.as_str(), c.id.as_str()))
            .collect();
        assert_eq!(containers, vec![("init", C3), ("app", C1), ("sidecar", C2)]);
    }

    #[test]
    fn owner_resolution() {
        let labels = BTreeMap::from([("pod-template-hash".to_owned(), "5f6d7c".to_owned())]);
        let owner = |kind: &str, name: &str, labels: &BTreeMap<String, String>| {
            let o = workload_owner(kind, name, labels);
            (o.kind, o.name)
        };
        assert_eq!(
            owner("ReplicaSet", "api-server-5f6d7c", &labels),
            ("Deployment".into(), "api-server".into())
        );
        // A ReplicaSet whose name does not end in the hash was not made by a Deployment.
        assert_eq!(
            owner("ReplicaSet", "handmade", &labels),
            ("ReplicaSet".into(), "handmade".into())
        );
        // No hash label: keep the ReplicaSet.
        assert_eq!(
            owner("ReplicaSet", "api-server-5f6d7c", &BTreeMap::new()),
            ("ReplicaSet".into(), "api-server-5f6d7c".into())
        );
        assert_eq!(
            owner("StatefulSet", "db", &labels),
            ("StatefulSet".into(), "db".into())
        );
        assert_eq!(
            owner("ReplicaSet", "-5f6d7c", &labels),
            ("ReplicaSet".into(), "-5f6d7c".into())
        );
    }

    #[test]
    fn bare_pod_has_no_owner() {
        let info = PodInfo::from_pod(&pod("u", "debug", None, vec![]));
        assert_eq!(info.owner, None);
    }

    #[test]
    fn cache_apply_update_delete_purge() {
        let cache = PodCache::default();
        let now = Instant::now();
        {
            let mut store = cache.inner.write().unwrap();
            store.apply(PodInfo::from_pod(&pod(
                "u1",
                "web-1",
                None,
                vec![status("app", Some(&format!("containerd://{C1}")))],
            )));
        }
        assert_eq!(cache.len(), 1);
        let (info, name) = cache.by_container_id(C1).unwrap();
        assert_eq!((info.name.as_str(), name.as_str()), ("web-1", "app"));
        assert!(cache
            .by_container_id(&format!("containerd://{C1}"))
            .is_some());
        assert!(
            cache.by_container_id(C3).is_some(),
            "init containers are indexed"
        );

        // The container restarts with a new ID: the old one is forgotten.
        cache.inner.write().unwrap().apply(PodInfo::from_pod(&pod(
            "u1",
            "web-1",
            None,
            vec![status("app", Some(&format!("containerd://{C2}")))],
        )));
        assert!(cache.by_container_id(C1).is_none());
        assert_eq!(cache.by_container_id(C2).unwrap().1, "app");
        let version = cache.version();
        assert!(version >= 2, "each change moves the version");

        // Deleted: not counted, still resolvable during the grace period.
        cache.inner.write().unwrap().delete("u1", now);
        assert_eq!(cache.len(), 0);
        assert!(cache.is_empty());
        assert!(cache.by_container_id(C2).is_some());
        cache
            .inner
            .write()
            .unwrap()
            .purge(now + Duration::from_secs(1), DELETED_POD_GRACE);
        assert!(cache.by_container_id(C2).is_some());
        assert_eq!(cache.version(), version, "no answer changed");
        cache
            .inner
            .write()
            .unwrap()
            .purge(now + DELETED_POD_GRACE, DELETED_POD_GRACE);
        assert!(cache.by_container_id(C2).is_none());
        assert!(cache.version() > version, "a purge changes answers");
        assert!(cache.inner.read().unwrap().pods.is_empty());
        assert!(cache.inner.read().unwrap().containers.is_empty());
    }

    #[test]
    fn unknown_container_is_none() {
        assert!(PodCache::default().by_container_id(C1).is_none());
    }
}
