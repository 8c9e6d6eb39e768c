//! Delivery to an OpenTelemetry profiles endpoint (the OTel Collector, Pyroscope's OTLP
//! ingestion): `opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export`
//! over gRPC (h2c or TLS), or the same message as a protobuf `POST URL/v1development/profiles`.
//! Its own queue, retries and counters, so an outage of one backend never holds up another.

use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::profiles::v1development::{
    profiles_service_client::ProfilesServiceClient, ExportProfilesServiceRequest,
    ExportProfilesServiceResponse,
};
use prost::Message as _;
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use crate::endpoint::{classify_grpc, Endpoint};
use crate::queue::{self, Attempt, Payload, Queue};
use crate::{Delivery, PushObserver};

/// The path the HTTP variant posts to, below the endpoint URL's own path.
pub const HTTP_PATH: &str = "v1development/profiles";

/// Which OTLP transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `ProfilesService/Export` over HTTP/2 (h2c for `http://`, TLS for `https://`).
    Grpc,
    /// A protobuf `POST URL/v1development/profiles` (OTLP/HTTP).
    Http,
}

/// Where and how to deliver OTLP profiles.
#[derive(Clone)]
pub struct OtlpConfig {
    /// Base URL, e.g. `http://otel-collector:4317` for gRPC or `http://otel-collector:4318`
    /// for HTTP.
    pub endpoint: String,
    /// gRPC or HTTP.
    pub protocol: OtlpProtocol,
    /// Sent with every request (e.g. `authorization`); names are case-insensitive.
    pub headers: Vec<(String, String)>,
    /// PEM bundle of extra CA certificates to trust for `https://`, beside the system roots.
    pub ca_cert: Option<PathBuf>,
    /// gzip the requests (`grpc-encoding: gzip`, or `Content-Encoding: gzip`).
    pub gzip: bool,
    /// Queue bound, concurrency, request size, timeouts and retries.
    pub delivery: Delivery,
}

impl fmt::Debug for OtlpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values are usually tokens: they stay out of logs.
        let headers: Vec<_> = self
            .headers
            .iter()
            .map(|(name, _)| (name, "<redacted>"))
            .collect();
        f.debug_struct("OtlpConfig")
            .field("endpoint", &self.endpoint)
            .field("protocol", &self.protocol)
            .field("headers", &headers)
            .field("ca_cert", &self.ca_cert)
            .field("gzip", &self.gzip)
            .field("delivery", &self.delivery)
            .finish()
    }
}

impl OtlpConfig {
    /// Checks the URL, the CA bundle, the headers and the delivery bounds, as
    /// [`crate::PushConfig::validate`] does. Returns `Ok(())` when all are usable.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.check().map(|_| ())
    }

    fn check(&self) -> anyhow::Result<Endpoint> {
        self.delivery.check()?;
        Endpoint::check(
            "OTLP endpoint",
            &self.endpoint,
            self.ca_cert.as_deref(),
            self.headers.clone(),
            self.delivery.timeout,
        )
    }
}

/// One export request with what the queue needs to know of it.
struct OtlpRequest {
    message: ExportProfilesServiceRequest,
    bytes: usize,
    profiles: usize,
}

impl Payload for OtlpRequest {
    fn bytes(&self) -> usize {
        self.bytes
    }

    fn profiles(&self) -> usize {
        self.profiles
    }
}

/// The number of `Profile` messages in `request`.
pub fn profile_count(request: &ExportProfilesServiceRequest) -> usize {
    request
        .resource_profiles
        .iter()
        .flat_map(|r| &r.scope_profiles)
        .map(|s| s.profiles.len())
        .sum()
}

enum Transport {
    Grpc {
        client: ProfilesServiceClient<Channel>,
        metadata: MetadataMap,
        timeout: Duration,
    },
    Http {
        agent: ureq::Agent,
        url: url::Url,
        headers: Vec<(String, String)>,
        gzip: bool,
    },
}

impl queue::Transport<OtlpRequest> for Transport {
    async fn send(&self, request: &OtlpRequest) -> Attempt {
        match self {
            Transport::Grpc {
                client,
                metadata,
                timeout,
            } => {
                let mut call = tonic::Request::new(request.message.clone());
                call.set_timeout(*timeout);
                *call.metadata_mut() = metadata.clone();
                let mut client = client.clone();
                match tokio::time::timeout(*timeout, client.export(call)).await {
                    Err(_) => Attempt::Retry(format!("OTLP export timed out after {timeout:?}")),
                    Ok(Ok(response)) => partial(response.into_inner()),
                    Ok(Err(status)) => classify_grpc(&status),
                }
            }
            Transport::Http {
                agent,
                url,
                headers,
                gzip,
            } => {
                let body = request.message.encode_to_vec();
                let (body, encoding) = if *gzip {
                    (gzip_bytes(&body), Some("gzip"))
                } else {
                    (body, None)
                };
                let (attempt, response) = crate::http::post(
                    agent,
                    url.clone(),
                    headers,
                    "application/x-protobuf",
                    encoding,
                    body,
                    "OTLP/HTTP",
                )
                .await;
                match attempt {
                    // The body is an ExportProfilesServiceResponse; an empty or unreadable
                    // one reports no partial success.
                    Attempt::Delivered => ExportProfilesServiceResponse::decode(&response[..])
                        .map_or(Attempt::Delivered, partial),
                    other => other,
                }
            }
        }
    }
}

/// Delivered, unless the backend says it dropped some of the profiles.
fn partial(response: ExportProfilesServiceResponse) -> Attempt {
    match response.partial_success {
        Some(p) if p.rejected_profiles > 0 => Attempt::Partial {
            rejected: p.rejected_profiles as usize,
            why: p.error_message,
        },
        _ => Attempt::Delivered,
    }
}

fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(data);
    encoder.finish().unwrap_or_default()
}

/// A running OTLP delivery queue; see [`crate::Pusher`] for the behaviour they share.
pub struct OtlpPusher {
    queue: Queue<OtlpRequest>,
    request_bytes: usize,
}

impl OtlpPusher {
    /// Validates `config`, sets up the transport and spawns the delivery task on the current
    /// tokio runtime. Nothing is sent yet and the endpoint need not be up. Fails on an invalid
    /// configuration, when TLS has no root certificate to trust, or outside a tokio runtime.
    pub fn start(config: OtlpConfig, observer: Arc<dyn PushObserver>) -> anyhow::Result<Self> {
        let endpoint = config.check()?;
        let runtime = crate::endpoint::runtime("OtlpPusher::start")?;
        let _guard = runtime.enter();
        let transport = match config.protocol {
            OtlpProtocol::Grpc => {
                let mut client = ProfilesServiceClient::new(endpoint.channel(&config.endpoint)?)
                    .max_encoding_message_size(usize::MAX);
                if config.gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                Transport::Grpc {
                    client,
                    metadata: endpoint.metadata(),
                    timeout: endpoint.timeout,
                }
            }
            OtlpProtocol::Http => Transport::Http {
                agent: endpoint.http_agent()?,
                url: crate::http::with_path(&endpoint.url, HTTP_PATH),
                headers: endpoint.headers.clone(),
                gzip: config.gzip,
            },
        };
        Ok(OtlpPusher {
            queue: Queue::start(transport, config.delivery.limits(), observer, "otlp"),
            request_bytes: config.delivery.request_bytes(),
        })
    }

    /// The size (encoded, before compression) the caller should split requests to.
    pub fn max_request_bytes(&self) -> usize {
        self.request_bytes
    }

    /// Queues `requests` in order; never blocks. The queue counts each request's encoded
    /// size; when full, the oldest requests are dropped and counted, as for Pyroscope.
    pub fn enqueue(&self, requests: Vec<ExportProfilesServiceRequest>) {
        self.queue
            .enqueue(requests.into_iter().map(|message| OtlpRequest {
                bytes: message.encoded_len(),
                profiles: profile_count(&message),
                message,
            }));
    }

    /// Stops accepting requests and delivers until the queue is empty or `deadline` passes;
    /// returns the number of profiles left undelivered (also reported as dropped).
    pub async fn shutdown(self, deadline: Duration) -> usize {
        self.queue.shutdown(deadline).await
    }
}
