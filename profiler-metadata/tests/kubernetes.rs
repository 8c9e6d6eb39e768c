//! `watch_pods` with the real kube client against a fake API server.
//!
//! No Kubernetes API server can run in this test environment (no cluster, no
//! etcd, no container runtime to start one), so the test serves recorded-style
//! API responses itself from a small HTTP/1.1 server on 127.0.0.1:0:
//!
//! * `GET /api/v1/pods?…` (the watcher's initial list): a `PodList` with a
//!   `resourceVersion` and two pods on `node-a`, owned by ReplicaSet
//!   `web-7d4b9c8f6d` (pod-template-hash `7d4b9c8f6d`);
//! * `GET /api/v1/pods?…&watch=true…`: a chunked stream of newline-delimited
//!   `WatchEvent`s — ADDED for a third pod, a BOOKMARK, DELETED for the
//!   second pod — sent when the test says so, after which the connection is
//!   held open like a real watch.
//!
//! The server checks every request for `fieldSelector=spec.nodeName%3Dnode-a`
//! (and the bearer token from the kubeconfig) and records violations, which
//! the test asserts are absent. A temporary kubeconfig points the client at
//! the server. Everything is bounded by timeouts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::serde_json::{json, Value};
use profiler_metadata::kubernetes::{watch_pods, Owner, PodCache};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const NODE: &str = "node-a";
const TOKEN: &str = "test-token-5f2b";
const LIST_RESOURCE_VERSION: &str = "18201";

const WEB1_APP: &str = "8b1f2a3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";
const WEB1_PROXY: &str = "a0b1c2d3e4f5061728394a5b6c7d8e9f00112233445566778899aabbccddeeff";
const WEB1_INIT: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const WEB2_APP: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
const WORKER_APP: &str = "5555aaaa5555aaaa5555aaaa5555aaaa5555aaaa5555aaaa5555aaaa5555aaaa";

fn container_status(name: &str, id: &str) -> Value {
    json!({
        "name": name,
        "containerID": format!("containerd://{id}"),
        "image": format!("registry.example.com/shop/{name}:1.4.2"),
        "imageID": format!("registry.example.com/shop/{name}@sha256:{WEB1_INIT}"),
        "ready": true,
        "restartCount": 0,
        "started": true,
        "state": {"running": {"startedAt": "2025-05-01T10:00:03Z"}}
    })
}

fn web_pod(
    name: &str,
    uid: &str,
    resource_version: &str,
    containers: Vec<Value>,
    init: Vec<Value>,
) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "generateName": "web-7d4b9c8f6d-",
            "namespace": "shop",
            "uid": uid,
            "resourceVersion": resource_version,
            "creationTimestamp": "2025-05-01T10:00:00Z",
            "labels": {
                "app.kubernetes.io/name": "web",
                "app.kubernetes.io/part-of": "shop",
                "pod-template-hash": "7d4b9c8f6d"
            },
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-05-01T09:59:00Z"},
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-7d4b9c8f6d",
                "uid": "3d0f6c1e-8a2b-4c5d-9e0f-1a2b3c4d5e6f",
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": "web",
            "containers": [
                {"name": "app", "image": "registry.example.com/shop/app:1.4.2"},
                {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.0"}
            ],
            "initContainers": [{"name": "istio-init", "image": "docker.io/istio/proxyv2:1.22.0"}]
        },
        "status": {
            "phase": "Running",
            "hostIP": "10.0.0.11",
            "podIP": "10.244.1.17",
            "qosClass": "Burstable",
            "startTime": "2025-05-01T10:00:00Z",
            "containerStatuses": containers,
            "initContainerStatuses": init
        }
    })
}

fn web1() -> Value {
    web_pod(
        "web-7d4b9c8f6d-x2x9z",
        "0b7e3f52-2c1a-4c1e-9a6f-2d3c4b5a6978",
        "18190",
        vec![
            container_status("app", WEB1_APP),
            container_status("istio-proxy", WEB1_PROXY),
        ],
        vec![container_status("istio-init", WEB1_INIT)],
    )
}

fn web2() -> Value {
    web_pod(
        "web-7d4b9c8f6d-q8k2m",
        "7a5c1d2e-3f4a-4b5c-8d9e-0f1a2b3c4d5e",
        "18195",
        vec![container_status("app", WEB2_APP)],
        vec![],
    )
}

fn worker() -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": "worker-0",
            "namespace": "jobs",
            "uid": "c3d4e5f6-a7b8-4c9d-8e0f-112233445566",
            "resourceVersion": "18230",
            "labels": {"app.kubernetes.io/name": "worker", "statefulset.kubernetes.io/pod-name": "worker-0"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "worker",
                "uid": "99887766-5544-4332-8110-ffeeddccbbaa", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "worker", "image": "registry.example.com/jobs/worker:2"}]},
        "status": {"phase": "Running", "containerStatuses": [container_status("worker", WORKER_APP)]}
    })
}

fn pod_list() -> Value {
    json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": LIST_RESOURCE_VERSION},
        "items": [web1(), web2()]
    })
}

fn watch_events() -> Vec<Value> {
    let mut deleted = web2();
    deleted["metadata"]["resourceVersion"] = json!("18240");
    deleted["metadata"]["deletionTimestamp"] = json!("2025-05-01T10:05:00Z");
    deleted["status"]["phase"] = json!("Succeeded");
    vec![
        json!({"type": "ADDED", "object": worker()}),
        json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "18235"}}}),
        json!({"type": "DELETED", "object": deleted}),
    ]
}

/// What the fake API server saw.
#[derive(Default)]
struct Seen {
    lists: usize,
    watches: usize,
    violations: Vec<String>,
}

struct FakeApiServer {
    port: u16,
    seen: Arc<Mutex<Seen>>,
    /// Flipped to true to let the first watch stream its events.
    release: watch::Sender<bool>,
}

impl FakeApiServer {
    async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (release, released) = watch::channel(false);
        let state = (Arc::clone(&seen), released);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_connection(stream, state.0.clone(), state.1.clone()));
            }
        });
        FakeApiServer {
            port,
            seen,
            release,
        }
    }
}

/// Serves HTTP/1.1 requests on one keep-alive connection.
async fn serve_connection(
    stream: TcpStream,
    seen: Arc<Mutex<Seen>>,
    mut released: watch::Receiver<bool>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut authorization = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("authorization") {
                    authorization = Some(value.trim().to_owned());
                }
            }
        }
        let target = request_line.split(' ').nth(1).unwrap_or("").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: Vec<&str> = query.split('&').collect();
        let is_watch = params.contains(&"watch=true");

        {
            let mut seen = seen.lock().unwrap();
            if !params.contains(&"fieldSelector=spec.nodeName%3Dnode-a") {
                seen.violations
                    .push(format!("no node field selector: {target}"));
            }
            if authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
                seen.violations
                    .push(format!("bad authorization {authorization:?}: {target}"));
            }
            if path != "/api/v1/pods" {
                seen.violations.push(format!("unexpected path: {target}"));
            }
        }
        if path != "/api/v1/pods" {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
            respond(&mut write, "404 Not Found", &status).await;
            continue;
        }

        if !is_watch {
            seen.lock().unwrap().lists += 1;
            respond(&mut write, "200 OK", &pod_list()).await;
            continue;
        }

        let first_watch = {
            let mut seen = seen.lock().unwrap();
            seen.watches += 1;
            if seen.watches == 1
                && !params.contains(&format!("resourceVersion={LIST_RESOURCE_VERSION}").as_str())
            {
                seen.violations
                    .push(format!("watch does not resume from the list: {target}"));
            }
            seen.watches == 1
        };
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let _ = write.flush().await;
        if first_watch {
            if released.wait_for(|r| *r).await.is_err() {
                return;
            }
            for event in watch_events() {
                let line = format!("{event}\n");
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                if write.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                let _ = write.flush().await;
            }
        }
        // Hold the watch open, as the API server does until its timeout.
        std::future::pending::<()>().await;
    }
}

async fn respond(write: &mut tokio::net::tcp::OwnedWriteHalf, status: &str, body: &Value) {
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = write.write_all(response.as_bytes()).await;
    let _ = write.flush().await;
}

fn kubeconfig(port: u16) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp kubeconfig");
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://127.0.0.1:{port}
contexts:
- name: fake
  context:
    cluster: fake
    user: profiler
    namespace: default
current-context: fake
users:
- name: profiler
  user:
    token: {TOKEN}
"
    );
    std::fs::write(file.path(), text).expect("write kubeconfig");
    file
}

/// Polls `check` until it holds or `timeout` passes.
async fn eventually(timeout: Duration, what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_pods_of_the_node() {
    tokio::time::timeout(Duration::from_secs(60), scenario())
        .await
        .expect("the test took over 60 s");
}

async fn scenario() {
    let server = FakeApiServer::start().await;
    let config = kubeconfig(server.port);

    let started = std::time::Instant::now();
    let cache: PodCache = watch_pods(NODE, Some(config.path()))
        .await
        .expect("watch_pods");
    // watch_pods waits for the initial list: everything listed is there now.
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "watch_pods hit its timeout"
    );
    assert_eq!(cache.len(), 2);

    let (pod, container) = cache.by_container_id(WEB1_APP).expect("web1 app container");
    assert_eq!(container, "app");
    assert_eq!(pod.namespace, "shop");
    assert_eq!(pod.name, "web-7d4b9c8f6d-x2x9z");
    assert_eq!(pod.uid, "0b7e3f52-2c1a-4c1e-9a6f-2d3c4b5a6978");
    assert_eq!(pod.node, NODE);
    assert_eq!(
        pod.labels.get("app.kubernetes.io/name").map(String::as_str),
        Some("web")
    );
    assert_eq!(
        pod.labels.get("pod-template-hash").map(String::as_str),
        Some("7d4b9c8f6d")
    );
    assert_eq!(
        pod.owner,
        Some(Owner {
            kind: "Deployment".into(),
            name: "web".into()
        })
    );
    assert_eq!(pod.containers.len(), 3, "{:?}", pod.containers);

    let (_, container) = cache.by_container_id(WEB1_PROXY).expect("sidecar");
    assert_eq!(container, "istio-proxy");
    let (_, container) = cache.by_container_id(WEB1_INIT).expect("init container");
    assert_eq!(container, "istio-init");
    let (pod2, _) = cache.by_container_id(WEB2_APP).expect("web2");
    assert_eq!(pod2.name, "web-7d4b9c8f6d-q8k2m");
    assert!(
        cache.by_container_id(WORKER_APP).is_none(),
        "not streamed yet"
    );

    // Now the watch delivers: worker-0 added, web2 deleted.
    server.release.send_replace(true);
    eventually(
        Duration::from_secs(20),
        "the watched events are applied",
        || cache.by_container_id(WORKER_APP).is_some() && cache.len() == 2,
    )
    .await;
    let (worker, container) = cache.by_container_id(WORKER_APP).unwrap();
    assert_eq!(container, "worker");
    assert_eq!(
        (worker.namespace.as_str(), worker.name.as_str()),
        ("jobs", "worker-0")
    );
    assert_eq!(
        worker.owner,
        Some(Owner {
            kind: "StatefulSet".into(),
            name: "worker".into()
        })
    );
    // A deleted pod stays resolvable for a while, for samples taken before.
    assert_eq!(
        cache.by_container_id(WEB2_APP).unwrap().0.name,
        "web-7d4b9c8f6d-q8k2m"
    );

    let seen = server.seen.lock().unwrap();
    assert!(
        seen.violations.is_empty(),
        "bad requests: {:#?}",
        seen.violations
    );
    assert_eq!(seen.lists, 1, "one list, no polling");
    assert!(seen.watches >= 1);
}

#[tokio::test]
async fn unreadable_kubeconfig_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-kubeconfig");
    let err = watch_pods(NODE, Some(&missing)).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("cannot read kubeconfig"), "{message}");
    assert!(message.contains("no-such-kubeconfig"), "{message}");
}

#[tokio::test]
async fn empty_node_name_is_an_error() {
    let err = watch_pods("", None).await.unwrap_err();
    assert!(err.to_string().contains("node name is empty"), "{err}");
}

/// An API server that is down does not fail `watch_pods`: it returns with
/// an empty cache (early, not after the full initial-list timeout) and keeps
/// retrying in the background.
#[tokio::test]
async fn unreachable_api_server_is_retried_in_the_background() {
    // A port nobody listens on: bind, note it, close.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = kubeconfig(port);
    let started = std::time::Instant::now();
    let cache = tokio::time::timeout(
        Duration::from_secs(30),
        watch_pods(NODE, Some(config.path())),
    )
    .await
    .expect("bounded")
    .expect("not an error");
    assert!(cache.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "returned on the first error"
    );
}
