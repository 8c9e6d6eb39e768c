//! A real Pyroscope push receiver for tests: a tonic `PusherService` server on loopback that
//! records every profile with its request headers. Used by the push crate's tests and by the
//! agent's end-to-end tests.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use profiler_proto::push::v1::{
    pusher_service_server::{PusherService, PusherServiceServer},
    PushRequest, PushResponse,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
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
