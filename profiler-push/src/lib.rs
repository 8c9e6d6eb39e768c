//! Delivers finished profiles to a Pyroscope-compatible backend ([`Pusher`]) and to an
//! OpenTelemetry (OTLP profiles) endpoint ([`OtlpPusher`]).
//!
//! The sampling path hands each interval's profiles to [`Pusher::enqueue_all`] (or an OTLP
//! request to [`OtlpPusher::enqueue`]), which never blocks: they go into a queue bounded by
//! bytes, one per backend, and a background task delivers it with at most `max_in_flight`
//! requests under way, through Pyroscope's gRPC push API ([`Protocol::Grpc`]), its HTTP
//! `/ingest` endpoint ([`Protocol::Http`]), or OTLP over gRPC or HTTP. One interval's series
//! travel together in as few requests as the `max_request_bytes` bound allows.
//!
//! Transient failures (backend down, overloaded, timing out) are retried with capped
//! exponential backoff and full jitter; rejections (bad request, bad credentials) are logged
//! once and dropped; gRPC `Unknown`/`Internal`, which is what a proxy's 413 or 400 becomes,
//! are retried `suspect_retries` times and then dropped, so one oversized request cannot hold
//! the queue up for good. When the backend stays away long enough for the queue to fill up,
//! the oldest requests are dropped first, so what eventually arrives is the most recent data.
//! Everything that happens is reported through a [`PushObserver`].

#![warn(missing_docs)]

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::bail;
use tonic::codegen::Bytes;

mod basic_auth;
mod endpoint;
mod grpc;
mod http;
pub mod otlp;
mod queue;

pub use otlp::{OtlpConfig, OtlpProtocol, OtlpPusher};

use endpoint::Endpoint;
use queue::{Limits, Payload, Queue};

/// The first retry waits up to this long (less if `max_backoff` is smaller); each further
/// retry of the same request doubles it, up to `max_backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);

/// Default bound on one request: gRPC servers (tonic, grpc-go) refuse bigger messages unless
/// configured otherwise, and so do many proxies in front of them.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;

/// Sent as the User-Agent of every request, so the backend's logs show who is pushing.
pub(crate) const USER_AGENT: &str = concat!("profiler-push/", env!("CARGO_PKG_VERSION"));

/// Which of Pyroscope's ingestion APIs to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `push.v1.PusherService/Push` over HTTP/2: plain-text h2c for `http://` URLs, TLS for
    /// `https://`. Pyroscope serves it on its HTTP port (4040 by default). One request
    /// carries many series.
    Grpc,
    /// `POST /ingest?format=pprof`, the older HTTP API, for backends or proxies that do not
    /// speak gRPC. One request per series.
    Http,
}

/// How a delivery queue behaves, whatever the backend.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// Upper bound on the bytes of queued payloads. When a request would push the queue past
    /// it, the oldest requests are dropped to make room.
    pub queue_bytes: usize,
    /// Requests under way at once.
    pub max_in_flight: usize,
    /// Upper bound on one request's size; an interval's profiles are split over as many
    /// requests as it takes. A single profile larger than this goes alone.
    pub max_request_bytes: usize,
    /// Time limit of one delivery attempt (connecting included). An attempt that runs out of
    /// time is retried.
    pub timeout: Duration,
    /// Longest wait between two retries of the same request.
    pub max_backoff: Duration,
    /// How often a request that failed with gRPC `Unknown`/`Internal` (or HTTP 500) is
    /// retried before it is dropped.
    pub suspect_retries: u32,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            queue_bytes: 64 << 20,
            max_in_flight: 2,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
            suspect_retries: 3,
        }
    }
}

impl Delivery {
    fn check(&self) -> anyhow::Result<()> {
        if self.queue_bytes == 0 {
            bail!("push queue_bytes must be greater than zero");
        }
        if self.max_in_flight == 0 {
            bail!("max_in_flight must be at least 1");
        }
        if self.max_request_bytes < 1024 {
            bail!("max_request_bytes must be at least 1024");
        }
        if self.timeout.is_zero() {
            bail!("push timeout must be greater than zero");
        }
        if self.max_backoff.is_zero() {
            bail!("push max_backoff must be greater than zero");
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            queue_bytes: self.queue_bytes,
            max_in_flight: self.max_in_flight,
            initial_backoff: INITIAL_BACKOFF.min(self.max_backoff),
            max_backoff: self.max_backoff,
            suspect_retries: self.suspect_retries,
        }
    }

    /// The size requests are packed to: never more than the queue could hold.
    fn request_bytes(&self) -> usize {
        self.max_request_bytes.min(self.queue_bytes)
    }
}

/// Where and how to deliver profiles to Pyroscope.
#[derive(Clone)]
pub struct PushConfig {
    /// Base URL of the backend, e.g. `http://pyroscope:4040` (plain text; h2c for gRPC) or
    /// `https://profiles.example.com` (TLS). For [`Protocol::Http`] a path in the URL is kept
    /// as a prefix of `/ingest`.
    pub url: String,
    /// Which ingestion API to use.
    pub protocol: Protocol,
    /// Tenant for multi-tenant backends, sent as the `X-Scope-OrgID` header. `None` sends no
    /// header (single-tenant Pyroscope).
    pub tenant_id: Option<String>,
    /// `(user, password)` sent as `Authorization: Basic ...`, for backends behind an
    /// authenticating proxy (e.g. Grafana Cloud). `None` sends no header.
    pub basic_auth: Option<(String, String)>,
    /// PEM bundle of extra CA certificates to trust for `https://` URLs, in addition to the
    /// system's roots. Ignored for `http://` URLs.
    pub ca_cert: Option<PathBuf>,
    /// Queue bound, concurrency, request size, timeouts and retries.
    pub delivery: Delivery,
}

impl fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password stays out of logs.
        f.debug_struct("PushConfig")
            .field("url", &self.url)
            .field("protocol", &self.protocol)
            .field("tenant_id", &self.tenant_id)
            .field(
                "basic_auth",
                &self
                    .basic_auth
                    .as_ref()
                    .map(|(user, _)| (user, "<redacted>")),
            )
            .field("ca_cert", &self.ca_cert)
            .field("delivery", &self.delivery)
            .finish()
    }
}

impl PushConfig {
    /// Checks the configuration before anything is started, so a typo fails at startup with
    /// one clear error instead of as an endless stream of failed deliveries.
    ///
    /// Rejects: a URL that does not parse, is not `http`/`https`, or has no host; a CA file
    /// that cannot be read or holds no PEM certificate; a tenant ID or basic-auth user that
    /// cannot be sent as a header; and a zero `queue_bytes`, `max_in_flight`, `timeout` or
    /// `max_backoff`. Returns `Ok(())` when none of those is found.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.check().map(|_| ())
    }

    pub(crate) fn check(&self) -> anyhow::Result<Endpoint> {
        let mut headers = Vec::new();
        if let Some(tenant) = &self.tenant_id {
            if tenant.is_empty() || !tenant.bytes().all(|b| b.is_ascii_graphic()) {
                bail!(
                    "tenant ID {tenant:?} must be non-empty printable ASCII without spaces \
                     (it is sent as the X-Scope-OrgID header)"
                );
            }
            headers.push(("x-scope-orgid".to_owned(), tenant.clone()));
        }
        match &self.basic_auth {
            Some((user, _)) if user.contains(':') => {
                bail!("basic-auth user {user:?} must not contain ':'")
            }
            Some((user, password)) => headers.push((
                "authorization".to_owned(),
                basic_auth::header_value(user, password),
            )),
            None => {}
        }
        self.delivery.check()?;
        Endpoint::check(
            "push URL",
            &self.url,
            self.ca_cert.as_deref(),
            headers,
            self.delivery.timeout,
        )
    }
}

/// One finished profile, ready to send.
#[derive(Clone)]
pub struct Upload {
    /// Labels of the series, including `__name__` (the profile type, e.g. `process_cpu`) and
    /// `service_name`. Sent as-is over gRPC; over HTTP they become the `name` parameter.
    pub labels: Vec<(String, String)>,
    /// The gzipped pprof profile.
    pub pprof_gz: Vec<u8>,
    /// Start of the period the profile covers.
    pub from: SystemTime,
    /// End of the period the profile covers.
    pub until: SystemTime,
    /// Sampling frequency in Hz, sent as `/ingest`'s `sampleRate`.
    pub sample_rate: u32,
}

impl fmt::Debug for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upload")
            .field("labels", &self.labels)
            .field("pprof_gz_bytes", &self.pprof_gz.len())
            .field("from", &self.from)
            .field("until", &self.until)
            .field("sample_rate", &self.sample_rate)
            .finish()
    }
}

/// The result of one delivery attempt (one request), as reported to [`PushObserver::pushed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PushOutcome {
    /// The backend accepted the request; it has left the queue.
    Delivered,
    /// The attempt failed in a way that may pass (backend unreachable, overloaded, timing
    /// out); the request stays queued and is tried again after a backoff.
    Retrying,
    /// The backend refused the request (bad request, bad credentials, ...); sending it again
    /// would not help, so it has been dropped and a warning printed to stderr.
    Rejected,
    /// The request kept failing with an error that may be its own fault (gRPC
    /// `Unknown`/`Internal`) until its retry cap ran out; it has been dropped.
    GaveUp,
}

impl PushOutcome {
    /// A short lowercase name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PushOutcome::Delivered => "delivered",
            PushOutcome::Retrying => "retrying",
            PushOutcome::Rejected => "rejected",
            PushOutcome::GaveUp => "gave_up",
        }
    }
}

/// Receives what a pusher does, typically to turn it into metrics. Called from the
/// delivery tasks and from the enqueuing caller, so implementations must be quick and must
/// not call back into the pusher.
pub trait PushObserver: Send + Sync + 'static {
    /// Called once per delivery attempt of one request with its outcome and how long it took.
    fn pushed(&self, outcome: PushOutcome, elapsed: Duration);
    /// Called when a backend accepted `profiles` profiles (one request carries many).
    fn delivered(&self, profiles: usize) {
        let _ = profiles;
    }
    /// Called when `profiles` profiles were thrown away undelivered: the oldest ones when
    /// the queue was full, a request that alone exceeded the queue bound, one the backend
    /// refused or gave up on, or those still queued when shutdown gave up.
    fn dropped(&self, profiles: usize);
    /// Called with the queue's new size in payload bytes every time it changes.
    fn queue_bytes(&self, bytes: usize);
}

/// One profile of a Pyroscope request. The ID is generated once, when the profile is
/// queued, so every retry carries the same ID and the backend can tell a retry from a new
/// profile.
pub(crate) struct Series {
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) pprof_gz: Bytes,
    pub(crate) from: SystemTime,
    pub(crate) until: SystemTime,
    pub(crate) sample_rate: u32,
    pub(crate) id: String,
}

impl Series {
    fn new(upload: Upload) -> Series {
        Series {
            labels: upload.labels,
            pprof_gz: Bytes::from(upload.pprof_gz),
            from: upload.from,
            until: upload.until,
            sample_rate: upload.sample_rate,
            id: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// An upper bound of this series' bytes in an encoded `PushRequest`: every field's tag
    /// and length prefix counted at their largest (1 + 5 bytes).
    fn wire_bytes(&self) -> usize {
        const FIELD: usize = 6;
        let labels: usize = self
            .labels
            .iter()
            .map(|(k, v)| FIELD + FIELD + k.len() + FIELD + v.len())
            .sum();
        FIELD + labels + FIELD + FIELD + self.pprof_gz.len() + FIELD + self.id.len()
    }
}

/// One Pyroscope request: a `PushRequest` over gRPC, one `/ingest` POST over HTTP.
pub(crate) struct Request {
    pub(crate) series: Vec<Series>,
    payload_bytes: usize,
}

impl Payload for Request {
    fn bytes(&self) -> usize {
        self.payload_bytes
    }

    fn profiles(&self) -> usize {
        self.series.len()
    }
}

enum Transport {
    Grpc(grpc::GrpcSender),
    Http(http::HttpSender),
}

impl queue::Transport<Request> for Transport {
    async fn send(&self, request: &Request) -> queue::Attempt {
        match self {
            Transport::Grpc(sender) => sender.send(request).await,
            Transport::Http(sender) => sender.send(&request.series[0]).await,
        }
    }
}

/// A running Pyroscope delivery queue. Create it with [`Pusher::start`], feed it with
/// [`Pusher::enqueue_all`], and stop it with [`Pusher::shutdown`] (dropping it instead stops
/// delivery at once, abandoning whatever is queued).
pub struct Pusher {
    queue: Queue<Request>,
    request_bytes: usize,
    series_per_request: usize,
}

impl Pusher {
    /// Validates `config` (see [`PushConfig::validate`]), sets up the transport and spawns the
    /// delivery task on the current tokio runtime.
    ///
    /// Nothing is sent yet and the backend need not be up: connections are made on the first
    /// delivery. Fails on an invalid configuration, when TLS is requested but no trusted root
    /// certificate can be found (neither system roots nor `ca_cert`), or when called outside a
    /// tokio runtime.
    pub fn start(config: PushConfig, observer: Arc<dyn PushObserver>) -> anyhow::Result<Pusher> {
        let endpoint = config.check()?;
        let runtime = endpoint::runtime("Pusher::start")?;
        let _guard = runtime.enter();
        let (transport, series_per_request) = match config.protocol {
            Protocol::Grpc => (
                Transport::Grpc(grpc::GrpcSender::new(&config.url, &endpoint)?),
                usize::MAX,
            ),
            // /ingest takes one profile per POST; retrying a POST of several would send
            // again those that already arrived.
            Protocol::Http => (Transport::Http(http::HttpSender::new(&endpoint)?), 1),
        };
        let delivery = config.delivery;
        Ok(Pusher {
            queue: Queue::start(transport, delivery.limits(), observer, "pyroscope"),
            request_bytes: delivery.request_bytes(),
            series_per_request,
        })
    }

    /// Queues one profile; see [`Pusher::enqueue_all`].
    pub fn enqueue(&self, upload: Upload) {
        self.enqueue_all(vec![upload]);
    }

    /// Queues one interval's profiles, packed in order into as few requests as the request
    /// bound allows (one per profile for `/ingest`). Never blocks and never fails, so the
    /// sampling path can call it directly: it only takes a short lock.
    ///
    /// When the queue would exceed `queue_bytes`, the oldest requests are dropped (reported
    /// through [`PushObserver::dropped`]) to make room; a request larger than the whole bound
    /// is dropped itself. After [`Pusher::shutdown`] has begun, requests are dropped as well.
    pub fn enqueue_all(&self, uploads: Vec<Upload>) {
        let mut requests = Vec::new();
        let mut current: Vec<Series> = Vec::new();
        let mut wire = 0;
        for upload in uploads {
            let series = Series::new(upload);
            let size = series.wire_bytes();
            if !current.is_empty()
                && (wire + size > self.request_bytes || current.len() >= self.series_per_request)
            {
                requests.push(request(std::mem::take(&mut current)));
                wire = 0;
            }
            wire += size;
            current.push(series);
        }
        if !current.is_empty() {
            requests.push(request(current));
        }
        self.queue.enqueue(requests);
    }

    /// Stops accepting profiles and keeps delivering until the queue is empty or `deadline`
    /// has passed, whichever comes first.
    ///
    /// Returns how many profiles were left undelivered (0 when everything got through); they
    /// are also reported through [`PushObserver::dropped`].
    pub async fn shutdown(self, deadline: Duration) -> usize {
        self.queue.shutdown(deadline).await
    }
}

fn request(series: Vec<Series>) -> Request {
    Request {
        payload_bytes: series.iter().map(|s| s.pprof_gz.len()).sum(),
        series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> PushConfig {
        PushConfig {
            url: url.to_string(),
            protocol: Protocol::Grpc,
            tenant_id: None,
            basic_auth: None,
            ca_cert: None,
            delivery: Delivery {
                queue_bytes: 1 << 20,
                timeout: Duration::from_secs(5),
                ..Delivery::default()
            },
        }
    }

    #[test]
    fn validate_accepts_http_and_https() {
        config("http://pyroscope:4040").validate().unwrap();
        config("https://profiles.example.com").validate().unwrap();
        config("http://127.0.0.1:4040/prefix/").validate().unwrap();
    }

    #[test]
    fn validate_rejects_bad_urls() {
        for url in [
            "pyroscope:4040",
            "ftp://host",
            "http://",
            "not a url",
            "file:///tmp/x",
        ] {
            let err = config(url).validate().unwrap_err();
            assert!(format!("{err:#}").contains("push URL"), "{url}: {err:#}");
        }
    }

    #[test]
    fn validate_rejects_unreadable_ca() {
        let mut c = config("https://profiles.example.com");
        c.ca_cert = Some(PathBuf::from("/nonexistent/ca.pem"));
        let err = c.validate().unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read CA bundle"),
            "{err:#}"
        );
        // Not PEM at all.
        let path =
            std::env::temp_dir().join(format!("profiler-push-bad-ca-{}", std::process::id()));
        std::fs::write(&path, b"hello").unwrap();
        c.ca_cert = Some(path.clone());
        let err = c.validate().unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(format!("{err:#}").contains("no PEM certificate"), "{err:#}");
    }

    #[test]
    fn validate_rejects_bad_headers_and_zero_bounds() {
        let mut c = config("http://pyroscope:4040");
        c.tenant_id = Some("a b".into());
        assert!(c.validate().is_err());
        let mut c = config("http://pyroscope:4040");
        c.basic_auth = Some(("us:er".into(), "pw".into()));
        assert!(c.validate().is_err());
        let mut c = config("http://pyroscope:4040");
        c.delivery.queue_bytes = 0;
        assert!(c.validate().is_err());
        let mut c = config("http://pyroscope:4040");
        c.delivery.timeout = Duration::ZERO;
        assert!(c.validate().is_err());
        let mut c = config("http://pyroscope:4040");
        c.delivery.max_in_flight = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn debug_hides_password() {
        let mut c = config("http://pyroscope:4040");
        c.basic_auth = Some(("user".into(), "hunter2".into()));
        let shown = format!("{c:?}");
        assert!(
            shown.contains("user") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn wire_bytes_bound_the_encoded_request() {
        use prost::Message as _;
        let series = Series::new(Upload {
            labels: vec![
                ("__name__".into(), "process_cpu".into()),
                ("service_name".into(), "x".repeat(300)),
            ],
            pprof_gz: vec![7; 70_000],
            from: SystemTime::UNIX_EPOCH,
            until: SystemTime::UNIX_EPOCH,
            sample_rate: 19,
        });
        let bound = series.wire_bytes();
        let exact = grpc::push_request(std::slice::from_ref(&series)).encoded_len();
        assert!(exact <= bound && bound < exact + 64, "{exact} vs {bound}");
    }

    #[test]
    fn jitter_stays_within_cap() {
        for _ in 0..1000 {
            assert!(queue::full_jitter(Duration::from_millis(200)) <= Duration::from_millis(200));
        }
        assert_eq!(queue::full_jitter(Duration::ZERO), Duration::ZERO);
    }
}
