//! Real receivers for tests, on loopback: a tonic Pyroscope `PusherService` server and a tonic
//! OTLP `ProfilesService` server, each recording what arrives with its request headers, and a
//! minimal HTTP/1.1 server recording raw requests. Used by the push crate's tests and by the
//! agent's end-to-end tests.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::profiles::v1development::{
    profiles_service_server::{ProfilesService, ProfilesServiceServer},
    ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use prost::Message as _;
use tonic::codec::CompressionEncoding;

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
    /// Which request (0, 1, ...) carried this profile: series of one request share it.
    pub request: usize,
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
/// `reject="yes"` are recorded and then refused with InvalidArgument, those carrying
/// `reject="unknown"` with Unknown (what a proxy's 413 becomes). Each request takes `delay`
/// to answer, and the most requests ever under way at once is kept.
#[derive(Clone, Default)]
pub struct Recorder {
    pub received: Arc<Mutex<Vec<Received>>>,
    delay: Duration,
    requests: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Recorder {
    /// A recorder whose every answer takes `delay`.
    pub fn slow(delay: Duration) -> Recorder {
        Recorder {
            delay,
            ..Recorder::default()
        }
    }

    pub fn snapshot(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The most requests that were under way at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
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
        let index = self.requests.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut reject = None;
        for series in request.into_inner().series {
            let labels: Vec<(String, String)> = series
                .labels
                .into_iter()
                .map(|l| (l.name, l.value))
                .collect();
            if let Some((_, how)) = labels.iter().find(|(k, _)| k == "reject") {
                reject = Some(how.clone());
            }
            for sample in series.samples {
                self.received.lock().unwrap().push(Received {
                    labels: labels.clone(),
                    raw_profile: sample.raw_profile.to_vec(),
                    id: sample.id,
                    tenant: tenant.clone(),
                    authorization: authorization.clone(),
                    request: index,
                });
            }
        }
        match reject.as_deref() {
            Some("yes") => Err(Status::invalid_argument("profile refused by test server")),
            Some("unknown") => Err(Status::unknown("413 Request Entity Too Large")),
            _ => Ok(Response::new(PushResponse {})),
        }
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

/// tonic's server builder, over TLS with `identity` when given, else h2c.
fn server_builder(identity: Option<tonic::transport::Identity>) -> tonic::transport::Server {
    let builder = tonic::transport::Server::builder();
    match identity {
        Some(identity) => builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap(),
        None => builder,
    }
}

/// Serves `recorder` on `listener` with tonic's real server (h2c).
pub fn serve(listener: TcpListener, recorder: Recorder) -> Server {
    serve_with(listener, recorder, None)
}

/// Serves `recorder` with tonic's real server, over TLS with `identity` when given.
pub fn serve_with(
    listener: TcpListener,
    recorder: Recorder,
    identity: Option<tonic::transport::Identity>,
) -> Server {
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let builder = server_builder(identity);
        // One service, so no router (tonic's `router` feature) is needed.
        builder
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

/// One OTLP export request as the server saw it: the message encoded again, and the
/// request's metadata (names lowercase).
#[derive(Debug, Clone)]
pub struct OtlpReceived {
    pub bytes: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl OtlpReceived {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn request(&self) -> ExportProfilesServiceRequest {
        ExportProfilesServiceRequest::decode(&self.bytes[..]).unwrap()
    }
}

/// An OTLP ProfilesService that records every export request (gzip accepted).
#[derive(Clone, Default)]
pub struct OtlpRecorder {
    pub received: Arc<Mutex<Vec<OtlpReceived>>>,
}

impl OtlpRecorder {
    pub fn snapshot(&self) -> Vec<OtlpReceived> {
        self.received.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl ProfilesService for OtlpRecorder {
    async fn export(
        &self,
        request: Request<ExportProfilesServiceRequest>,
    ) -> Result<Response<ExportProfilesServiceResponse>, Status> {
        let headers = request
            .metadata()
            .iter()
            .filter_map(|entry| match entry {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        self.received.lock().unwrap().push(OtlpReceived {
            bytes: request.into_inner().encode_to_vec(),
            headers,
        });
        Ok(Response::new(ExportProfilesServiceResponse::default()))
    }
}

/// Serves `recorder` as an OTLP ProfilesService on `listener` (h2c).
pub fn serve_otlp(listener: TcpListener, recorder: OtlpRecorder) -> Server {
    serve_otlp_with(listener, recorder, None)
}

/// Serves `recorder` as an OTLP ProfilesService on `listener`, over TLS with `identity`
/// (certificate and key, PEM) when given, else h2c.
pub fn serve_otlp_with(
    listener: TcpListener,
    recorder: OtlpRecorder,
    identity: Option<tonic::transport::Identity>,
) -> Server {
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let builder = server_builder(identity);
        builder
            .serve_with_incoming_shutdown(
                ProfilesServiceServer::new(recorder)
                    .accept_compressed(CompressionEncoding::Gzip)
                    .max_decoding_message_size(64 << 20),
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

/// One HTTP request: its request line, headers (names lowercase) and body.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Requests an HTTP server received.
pub type HttpRequests = Arc<Mutex<Vec<HttpRequest>>>;

/// A minimal HTTP/1.1 server: records each request (Content-Length bodies) and answers 200
/// with an empty body.
pub async fn serve_http(listener: TcpListener, requests: HttpRequests) {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let mut headers = Vec::new();
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).await.unwrap();
                    if header == "\r\n" || header.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = header.split_once(':') {
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                    }
                }
                let length = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .map_or(0, |(_, v)| v.parse().unwrap());
                let mut body = vec![0; length];
                reader.read_exact(&mut body).await.unwrap();
                requests.lock().unwrap().push(HttpRequest {
                    line: line.trim_end().to_owned(),
                    headers,
                    body,
                });
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
    }
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

/// A certificate authority made for one test with Debian's `openssl`, and a server
/// certificate it signed for 127.0.0.1 and localhost.
pub struct TestCa {
    /// The CA certificate (PEM file), for the client's `--ca-cert`.
    pub ca_pem: std::path::PathBuf,
    /// The server's certificate and key.
    pub identity: tonic::transport::Identity,
}

impl TestCa {
    /// Makes the CA and the server certificate in `dir`.
    pub fn new(dir: &std::path::Path) -> TestCa {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl must be installed (Debian's openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec![
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=profiler test CA",
        ];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
        run(&ca);
        let mut csr = vec!["req", "-new", "-subj", "/CN=localhost"];
        csr.extend(ec);
        csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
        run(&csr);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        TestCa {
            ca_pem: dir.join("ca.pem"),
            identity: tonic::transport::Identity::from_pem(read("server.pem"), read("server.key")),
        }
    }
}
