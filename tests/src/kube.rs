//! A fake Kubernetes API server for the agent's tests, and real cgroups named like a
//! container runtime's.
//!
//! No API server can run here (no cluster, no etcd), so this one serves what kube-rs's pod
//! watcher asks for: `GET /api/v1/pods` (a `PodList`, empty or not) and the same with
//! `watch=true` (a chunked stream of `WatchEvent`s, sent when the test adds a pod). That is
//! enough to make pod metadata arrive late, on the test's schedule.

use std::{
    io::ErrorKind,
    path::PathBuf,
    process::Child,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A running fake API server; pods added with [`FakeApiServer::add_pod`] reach open watches.
pub struct FakeApiServer {
    pub port: u16,
    /// Every pod added so far, as watch events; the sender wakes the watches.
    events: watch::Sender<Vec<Value>>,
}

impl FakeApiServer {
    /// Listens on a fresh loopback port; the pod list starts empty.
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (events, _) = watch::channel(Vec::new());
        let receiver = events.subscribe();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_connection(stream, receiver.clone()));
            }
        });
        FakeApiServer { port, events }
    }

    /// Sends `pod` to every watch (and to every later one) as ADDED.
    pub fn add_pod(&self, pod: Value) {
        self.events
            .send_modify(|events| events.push(json!({"type": "ADDED", "object": pod})));
    }

    /// A kubeconfig file pointing at this server.
    pub fn kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: u\ncurrent-context: fake\n\
             users:\n- name: u\n  user:\n    token: test-token\n",
            self.port
        );
        std::fs::write(path, text).unwrap();
    }
}

/// A running pod on `node` owned by Deployment `app` (through its ReplicaSet), with one
/// container per `(name, 64-hex ID)`.
pub fn pod(
    namespace: &str,
    name: &str,
    app: &str,
    node: &str,
    containers: &[(&str, &str)],
) -> Value {
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(name, id)| {
            json!({
                "name": name, "containerID": format!("containerd://{id}"),
                "image": "registry.example.com/app:1", "imageID": "registry.example.com/app@sha256:0",
                "ready": true, "restartCount": 0, "started": true,
                "state": {"running": {"startedAt": "2025-05-01T10:00:03Z"}}
            })
        })
        .collect();
    let specs: Vec<Value> = containers
        .iter()
        .map(|(name, _)| json!({"name": name, "image": "registry.example.com/app:1"}))
        .collect();
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": namespace, "uid": format!("uid-{name}"),
            "resourceVersion": "2",
            "labels": {"app.kubernetes.io/name": app, "pod-template-hash": "7d4b9c8f6d"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-7d4b9c8f6d"),
                "uid": "rs-uid", "controller": true
            }]
        },
        "spec": {"nodeName": node, "containers": specs},
        "status": {"phase": "Running", "containerStatuses": statuses}
    })
}

async fn serve_connection(stream: TcpStream, mut events: watch::Receiver<Vec<Value>>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).await.unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            if header.trim_end().is_empty() {
                break;
            }
        }
        let target = request.split(' ').nth(1).unwrap_or("").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        if path != "/api/v1/pods" {
            respond(
                &mut write,
                "404 Not Found",
                &json!({"kind": "Status", "code": 404}),
            )
            .await;
            continue;
        }
        if !query.split('&').any(|p| p == "watch=true") {
            // The list: empty, so that every pod arrives late, through the watch.
            let list = json!({"kind": "PodList", "apiVersion": "v1",
                              "metadata": {"resourceVersion": "1"}, "items": []});
            respond(&mut write, "200 OK", &list).await;
            continue;
        }
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let _ = write.flush().await;
        let mut sent = 0;
        loop {
            let pending: Vec<Value> = events.borrow_and_update()[sent..].to_vec();
            for event in pending {
                let line = format!("{event}\n");
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                if write.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                let _ = write.flush().await;
                sent += 1;
            }
            if events.changed().await.is_err() {
                // The server is gone: hold the watch open like an idle API server.
                std::future::pending::<()>().await;
            }
        }
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

/// A fresh 64-hex container ID.
pub fn random_container_id() -> String {
    let uuid = || {
        std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .unwrap()
            .trim()
            .replace('-', "")
    };
    uuid() + &uuid()
}

/// A containerd-style cgroup (`<test>.slice/cri-containerd-<ID>.scope`) on the cgroup v2
/// hierarchy holding the processes given to [`FakeContainer::adopt`]. Dropping it kills them
/// and removes the cgroups.
pub struct FakeContainer {
    pub id: String,
    dirs: Vec<PathBuf>,
    children: Arc<Mutex<Vec<Child>>>,
}

impl FakeContainer {
    /// Creates the cgroups; `name` tells apart the containers of one test.
    pub fn new(name: &str) -> FakeContainer {
        let mount = cgroup2_mount().expect("no cgroup v2 hierarchy is mounted");
        let id = random_container_id();
        let slice = mount.join(format!("profiler-test-{}-{name}.slice", std::process::id()));
        let scope = slice.join(format!("cri-containerd-{id}.scope"));
        for dir in [&slice, &scope] {
            std::fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        FakeContainer {
            id,
            dirs: vec![slice, scope],
            children: Default::default(),
        }
    }

    /// Moves `child` into the container.
    pub fn adopt(&self, child: Child) {
        let procs = self.dirs[1].join("cgroup.procs");
        std::fs::write(&procs, child.id().to_string())
            .unwrap_or_else(|e| panic!("move {} into {}: {e}", child.id(), procs.display()));
        self.children.lock().unwrap().push(child);
    }
}

impl Drop for FakeContainer {
    fn drop(&mut self) {
        for child in self.children.lock().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in self.dirs.iter().rev() {
            // The kernel may take a moment to notice that the cgroup emptied.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(err) if err.kind() == ErrorKind::NotFound => break,
                    Err(err) if Instant::now() < deadline && err.raw_os_error() == Some(16) => {
                        std::thread::sleep(Duration::from_millis(20));
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

/// Where cgroup v2 is mounted, from /proc/self/mountinfo (not always /sys/fs/cgroup).
fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next() != Some("cgroup2") {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}
