//! Delivers finished profiles to a Pyroscope-compatible backend.
//!
//! The sampling path hands each profile to [`Pusher::enqueue`], which never blocks: the upload
//! goes into a queue bounded by bytes, and one background task delivers the queue in order
//! through either Pyroscope's gRPC push API ([`Protocol::Grpc`]) or its HTTP `/ingest`
//! endpoint ([`Protocol::Http`]). Transient failures (backend down, overloaded, timing out)
//! are retried with capped exponential backoff and full jitter; rejections (bad request,
//! bad credentials) are logged once and dropped. When the backend stays away long enough for
//! the queue to fill up, the oldest profiles are dropped first, so what eventually arrives is
//! the most recent data. Everything that happens is reported through a [`PushObserver`].

#![warn(missing_docs)]

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::codegen::Bytes;

mod basic_auth;
mod grpc;
mod http;

/// The first retry waits up to this long (less if `max_backoff` is smaller); each further
/// retry of the same upload doubles it, up to `max_backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);

/// Sent as the User-Agent of every request, so the backend's logs show who is pushing.
pub(crate) const USER_AGENT: &str = concat!("profiler-push/", env!("CARGO_PKG_VERSION"));

/// Which of Pyroscope's ingestion APIs to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `push.v1.PusherService/Push` over HTTP/2: plain-text h2c for `http://` URLs, TLS for
    /// `https://`. Pyroscope serves it on its HTTP port (4040 by default).
    Grpc,
    /// `POST /ingest?format=pprof`, the older HTTP API, for backends or proxies that do not
    /// speak gRPC.
    Http,
}

/// Where and how to deliver profiles.
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
    /// Upper bound on the bytes of queued `pprof_gz` payloads. When an upload would push the
    /// queue past it, the oldest uploads are dropped to make room.
    pub queue_bytes: usize,
    /// Time limit of one delivery attempt (connecting included). An attempt that runs out of
    /// time is retried.
    pub timeout: Duration,
    /// Longest wait between two retries of the same upload.
    pub max_backoff: Duration,
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
            .field("queue_bytes", &self.queue_bytes)
            .field("timeout", &self.timeout)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

/// A [`PushConfig`] that passed validation, with everything the transports need already
/// read and parsed.
pub(crate) struct Checked {
    pub(crate) url: url::Url,
    pub(crate) tls: bool,
    /// The CA bundle's bytes, only when the URL is `https://` and a bundle was configured.
    pub(crate) ca_pem: Option<Vec<u8>>,
    pub(crate) tenant: Option<String>,
    /// The complete `Authorization` header value.
    pub(crate) authorization: Option<String>,
    pub(crate) timeout: Duration,
}

impl PushConfig {
    /// Checks the configuration before anything is started, so a typo fails at startup with
    /// one clear error instead of as an endless stream of failed deliveries.
    ///
    /// Rejects: a URL that does not parse, is not `http`/`https`, or has no host; a CA file
    /// that cannot be read or holds no PEM certificate; a tenant ID or basic-auth user that
    /// cannot be sent as a header; and a zero `queue_bytes`, `timeout` or `max_backoff`.
    /// Returns `Ok(())` when none of those is found.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.check().map(|_| ())
    }

    pub(crate) fn check(&self) -> anyhow::Result<Checked> {
        let url = url::Url::parse(&self.url)
            .with_context(|| format!("push URL {:?} is not a valid URL", self.url))?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => bail!(
                "push URL {:?} has scheme {other:?}; use http:// (plain text) or https:// (TLS)",
                self.url
            ),
        };
        if url.host_str().is_none_or(str::is_empty) {
            bail!("push URL {:?} has no host", self.url);
        }
        // http:// never uses TLS, so a CA bundle would be dead configuration; it is not read.
        let ca_pem = match (&self.ca_cert, tls) {
            (Some(path), true) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read CA bundle {}", path.display()))?;
                let certs = ureq::tls::parse_pem(&pem)
                    .filter(|item| matches!(item, Ok(ureq::tls::PemItem::Certificate(_))))
                    .count();
                if certs == 0 {
                    bail!("CA bundle {} holds no PEM certificate", path.display());
                }
                Some(pem)
            }
            _ => None,
        };
        if let Some(tenant) = &self.tenant_id {
            if tenant.is_empty() || !tenant.bytes().all(|b| b.is_ascii_graphic()) {
                bail!(
                    "tenant ID {tenant:?} must be non-empty printable ASCII without spaces \
                     (it is sent as the X-Scope-OrgID header)"
                );
            }
        }
        let authorization = match &self.basic_auth {
            Some((user, _)) if user.contains(':') => {
                bail!("basic-auth user {user:?} must not contain ':'")
            }
            Some((user, password)) => Some(basic_auth::header_value(user, password)),
            None => None,
        };
        if self.queue_bytes == 0 {
            bail!("push queue_bytes must be greater than zero");
        }
        if self.timeout.is_zero() {
            bail!("push timeout must be greater than zero");
        }
        if self.max_backoff.is_zero() {
            bail!("push max_backoff must be greater than zero");
        }
        Ok(Checked {
            url,
            tls,
            ca_pem,
            tenant: self.tenant_id.clone(),
            authorization,
            timeout: self.timeout,
        })
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

/// The result of one delivery attempt, as reported to [`PushObserver::pushed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PushOutcome {
    /// The backend accepted the upload; it has left the queue.
    Delivered,
    /// The attempt failed in a way that may pass (backend unreachable, overloaded, timing
    /// out); the upload stays at the head of the queue and is tried again after a backoff.
    Retrying,
    /// The backend refused the upload (bad request, bad credentials, ...); sending it again
    /// would not help, so it has been dropped and a warning printed to stderr.
    Rejected,
}

/// Receives what the pusher does, typically to turn it into metrics. Called from the
/// delivery task and from [`Pusher::enqueue`]'s caller, so implementations must be quick
/// and must not call back into the [`Pusher`].
pub trait PushObserver: Send + Sync + 'static {
    /// Called once per delivery attempt with its outcome and how long it took.
    fn pushed(&self, outcome: PushOutcome, elapsed: Duration);
    /// Called when `uploads` uploads were thrown away undelivered: the oldest ones when the
    /// queue was full, one that alone exceeded the queue bound, or those still queued when
    /// [`Pusher::shutdown`] gave up.
    fn dropped(&self, uploads: usize);
    /// Called with the queue's new size in payload bytes every time it changes.
    fn queue_bytes(&self, bytes: usize);
}

/// A queued upload. The ID is generated once, when the upload is queued, so every retry of
/// it carries the same ID and the backend can tell a retry from a new profile.
pub(crate) struct Item {
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) pprof_gz: Bytes,
    pub(crate) from: SystemTime,
    pub(crate) until: SystemTime,
    pub(crate) sample_rate: u32,
    pub(crate) id: String,
}

impl Item {
    fn new(upload: Upload) -> Item {
        Item {
            labels: upload.labels,
            pprof_gz: Bytes::from(upload.pprof_gz),
            from: upload.from,
            until: upload.until,
            sample_rate: upload.sample_rate,
            id: uuid::Uuid::new_v4().to_string(),
        }
    }

    fn size(&self) -> usize {
        self.pprof_gz.len()
    }
}

/// What one attempt came to, with a reason for failures.
pub(crate) enum Attempt {
    Delivered,
    Retry(String),
    Rejected(String),
}

enum Transport {
    Grpc(grpc::GrpcSender),
    Http(http::HttpSender),
}

impl Transport {
    async fn send(&self, item: &Arc<Item>) -> Attempt {
        match self {
            Transport::Grpc(sender) => sender.send(item).await,
            Transport::Http(sender) => sender.send(item).await,
        }
    }
}

struct State {
    queue: VecDeque<Arc<Item>>,
    bytes: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    observer: Arc<dyn PushObserver>,
    limit: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the sampling path down with it: the queue is
        // consistent after every individual operation, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes `item` from the head of the queue, if it is still there (the queue may have
    /// dropped it to make room while it was being sent).
    fn remove_head(&self, item: &Arc<Item>) {
        let mut state = self.lock();
        if state
            .queue
            .front()
            .is_some_and(|head| Arc::ptr_eq(head, item))
        {
            state.queue.pop_front();
            state.bytes -= item.size();
            self.observer.queue_bytes(state.bytes);
        }
    }
}

/// A running delivery queue. Create it with [`Pusher::start`], feed it with
/// [`Pusher::enqueue`], and stop it with [`Pusher::shutdown`] (dropping it instead stops the
/// delivery task at once, abandoning whatever is queued).
pub struct Pusher {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
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
        let checked = config.check()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow::anyhow!("Pusher::start must be called inside a tokio runtime"))?;
        let transport = match config.protocol {
            Protocol::Grpc => {
                // The lazy channel spawns its connection task, which needs the runtime entered.
                let _guard = runtime.enter();
                Transport::Grpc(grpc::GrpcSender::new(&config.url, &checked)?)
            }
            Protocol::Http => Transport::Http(http::HttpSender::new(&checked)?),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                closed: false,
            }),
            wake: Notify::new(),
            observer,
            limit: config.queue_bytes,
        });
        let initial_backoff = INITIAL_BACKOFF.min(config.max_backoff);
        let worker = runtime.spawn(deliver(
            shared.clone(),
            transport,
            initial_backoff,
            config.max_backoff,
        ));
        Ok(Pusher {
            shared,
            worker: Some(worker),
        })
    }

    /// Queues `upload` for delivery. Never blocks and never fails, so the sampling path can
    /// call it directly: it only takes a short lock.
    ///
    /// When the queue would exceed `queue_bytes`, the oldest uploads are dropped (reported
    /// through [`PushObserver::dropped`]) to make room; an upload larger than the whole bound
    /// is dropped itself and the queue is left alone. After [`Pusher::shutdown`] has begun,
    /// uploads are dropped as well.
    pub fn enqueue(&self, upload: Upload) {
        let size = upload.pprof_gz.len();
        let shared = &self.shared;
        let mut dropped = 0;
        if size > shared.limit {
            dropped = 1;
        } else {
            let item = Arc::new(Item::new(upload));
            let mut state = shared.lock();
            if state.closed {
                dropped = 1;
            } else {
                while state.bytes + size > shared.limit {
                    let Some(oldest) = state.queue.pop_front() else {
                        break;
                    };
                    state.bytes -= oldest.size();
                    dropped += 1;
                }
                state.queue.push_back(item);
                state.bytes += size;
                shared.observer.queue_bytes(state.bytes);
            }
        }
        if dropped > 0 {
            shared.observer.dropped(dropped);
        }
        shared.wake.notify_one();
    }

    /// Stops accepting uploads and keeps delivering until the queue is empty or `deadline`
    /// has passed, whichever comes first.
    ///
    /// Returns how many uploads were left undelivered (0 when everything got through); they
    /// are also reported through [`PushObserver::dropped`].
    pub async fn shutdown(mut self, deadline: Duration) -> usize {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(mut worker) = self.worker.take() {
            if tokio::time::timeout(deadline, &mut worker).await.is_err() {
                worker.abort();
                let _ = worker.await;
            }
        }
        let left = {
            let mut state = self.shared.lock();
            let left = state.queue.len();
            state.queue.clear();
            if state.bytes != 0 {
                state.bytes = 0;
                self.shared.observer.queue_bytes(0);
            }
            left
        };
        if left > 0 {
            self.shared.observer.dropped(left);
        }
        left
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.shared.lock().closed = true;
            worker.abort();
        }
    }
}

/// The delivery task: sends the head of the queue until it is delivered or rejected, then
/// moves on. Returns once the pusher is closed and the queue is empty.
async fn deliver(
    shared: Arc<Shared>,
    transport: Transport,
    initial_backoff: Duration,
    max_backoff: Duration,
) {
    let mut backoff = initial_backoff;
    let mut failing = false;
    loop {
        let head = {
            let state = shared.lock();
            match state.queue.front() {
                Some(item) => Some(item.clone()),
                None if state.closed => return,
                None => None,
            }
        };
        let Some(item) = head else {
            // `notify_one` stores a permit when nobody waits, so an upload queued between
            // the check above and this await still wakes us.
            shared.wake.notified().await;
            continue;
        };

        let started = Instant::now();
        let attempt = transport.send(&item).await;
        let elapsed = started.elapsed();
        match attempt {
            Attempt::Delivered => {
                shared.observer.pushed(PushOutcome::Delivered, elapsed);
                shared.remove_head(&item);
                backoff = initial_backoff;
                if failing {
                    eprintln!("info: pyroscope push recovered");
                    failing = false;
                }
            }
            Attempt::Rejected(why) => {
                shared.observer.pushed(PushOutcome::Rejected, elapsed);
                eprintln!("warn: pyroscope rejected a profile: {why}");
                shared.remove_head(&item);
                backoff = initial_backoff;
            }
            Attempt::Retry(why) => {
                shared.observer.pushed(PushOutcome::Retrying, elapsed);
                if !failing {
                    // One line per outage, not one per attempt.
                    eprintln!("warn: pyroscope push failed, retrying: {why}");
                    failing = true;
                }
                tokio::time::sleep(full_jitter(backoff)).await;
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

/// A uniformly random wait in `[0, cap]` ("full jitter"), so many profilers retrying after
/// the same outage do not come back in lockstep.
fn full_jitter(cap: Duration) -> Duration {
    let cap = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=cap))
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
            queue_bytes: 1 << 20,
            timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
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
        c.queue_bytes = 0;
        assert!(c.validate().is_err());
        let mut c = config("http://pyroscope:4040");
        c.timeout = Duration::ZERO;
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
    fn jitter_stays_within_cap() {
        for _ in 0..1000 {
            assert!(full_jitter(Duration::from_millis(200)) <= Duration::from_millis(200));
        }
        assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
    }
}
