//! Shared pieces of the integration tests: a real tonic PusherService server that records
//! what it receives, a recording observer, and small helpers.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use profiler_proto::push::v1::pusher_service_server::{PusherService, PusherServiceServer};
use profiler_proto::push::v1::{PushRequest, PushResponse};
use profiler_push::{Protocol, PushConfig, PushObserver, PushOutcome, Upload};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// One profile as the server saw it, with the request's metadata.
#[derive(Debug, Clone)]
pub struct Received {
    pub labels: Vec<(String, String)>,
    pub raw_profile: Vec<u8>,
    pub id: String,
    pub tenant: Option<String>,
    pub authorization: Option<String>,
}

impl Received {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A PusherService that records every request; requests carrying the label
/// `reject="yes"` are recorded and then refused with InvalidArgument.
#[derive(Clone, Default)]
pub struct Recorder {
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Recorder {
    pub fn snapshot(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

#[tonic::async_trait]
impl PusherService for Recorder {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let tenant = header("x-scope-orgid");
        let authorization = header("authorization");
        let mut reject = false;
        for series in request.into_inner().series {
            let labels: Vec<(String, String)> = series
                .labels
                .into_iter()
                .map(|l| (l.name, l.value))
                .collect();
            reject |= labels.iter().any(|(k, v)| k == "reject" && v == "yes");
            for sample in series.samples {
                self.received.lock().unwrap().push(Received {
                    labels: labels.clone(),
                    raw_profile: sample.raw_profile.to_vec(),
                    id: sample.id,
                    tenant: tenant.clone(),
                    authorization: authorization.clone(),
                });
            }
        }
        if reject {
            return Err(Status::invalid_argument("profile refused by test server"));
        }
        Ok(Response::new(PushResponse {}))
    }
}

/// A running test server; stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves `recorder` on `listener` with tonic's real server (h2c).
pub fn serve(listener: TcpListener, recorder: Recorder) -> Server {
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        // One service, so no router (tonic's `router` feature) is needed.
        tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                PusherServiceServer::new(recorder),
                TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    Server {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Starts a server on a fresh loopback port.
pub async fn start_server(recorder: Recorder) -> Server {
    serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), recorder)
}

/// A loopback address nobody listens on (bound, then released).
pub async fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Binds `addr` again, retrying briefly in case the port is still being released.
pub async fn bind_again(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(err) if Instant::now() < deadline => {
                eprintln!("rebinding {addr}: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("cannot rebind {addr}: {err}"),
        }
    }
}

/// Everything the pusher reported.
#[derive(Default)]
pub struct Recording {
    pub outcomes: Mutex<Vec<PushOutcome>>,
    pub dropped: AtomicUsize,
    pub queue_bytes: Mutex<Vec<usize>>,
}

impl Recording {
    pub fn outcomes(&self) -> Vec<PushOutcome> {
        self.outcomes.lock().unwrap().clone()
    }

    pub fn count(&self, outcome: PushOutcome) -> usize {
        self.outcomes().iter().filter(|o| **o == outcome).count()
    }

    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }

    pub fn last_queue_bytes(&self) -> Option<usize> {
        self.queue_bytes.lock().unwrap().last().copied()
    }
}

impl PushObserver for Recording {
    fn pushed(&self, outcome: PushOutcome, _elapsed: Duration) {
        self.outcomes.lock().unwrap().push(outcome);
    }

    fn dropped(&self, uploads: usize) {
        self.dropped.fetch_add(uploads, Ordering::SeqCst);
    }

    fn queue_bytes(&self, bytes: usize) {
        self.queue_bytes.lock().unwrap().push(bytes);
    }
}

/// A config with short timeouts and backoffs so the tests stay fast.
pub fn config(url: String, protocol: Protocol) -> PushConfig {
    PushConfig {
        url,
        protocol,
        tenant_id: None,
        basic_auth: None,
        ca_cert: None,
        queue_bytes: 1 << 20,
        timeout: Duration::from_secs(2),
        max_backoff: Duration::from_millis(50),
    }
}

/// Upload number `seq`, with a `size`-byte payload that encodes `seq`.
pub fn upload(seq: usize, size: usize) -> Upload {
    let mut payload = vec![0x1f, 0x8b];
    payload.extend((0..size.saturating_sub(2)).map(|i| (seq * 31 + i) as u8));
    payload.truncate(size);
    Upload {
        labels: vec![
            ("__name__".into(), "process_cpu".into()),
            ("service_name".into(), "test-svc".into()),
            ("seq".into(), seq.to_string()),
        ],
        pprof_gz: payload,
        from: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        until: UNIX_EPOCH + Duration::from_secs(1_700_000_010),
        sample_rate: 99,
    }
}

pub fn seqs(received: &[Received]) -> Vec<usize> {
    received
        .iter()
        .map(|r| r.label("seq").unwrap().parse().unwrap())
        .collect()
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}
