//! Delivery through Pyroscope's gRPC push API, `push.v1.PusherService/Push`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use profiler_proto::push::v1::pusher_service_client::PusherServiceClient;
use profiler_proto::push::v1::{PushRequest, RawProfileSeries, RawSample};
use profiler_proto::types::v1::LabelPair;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

use crate::{Attempt, Checked, Item};

pub(crate) struct GrpcSender {
    client: PusherServiceClient<Channel>,
    tenant: Option<AsciiMetadataValue>,
    authorization: Option<AsciiMetadataValue>,
    timeout: Duration,
}

impl GrpcSender {
    /// Builds a lazily connecting channel: nothing touches the network until the first push,
    /// and a backend that is down is reconnected to on later attempts. Must run inside a
    /// tokio runtime.
    pub(crate) fn new(url: &str, checked: &Checked) -> anyhow::Result<GrpcSender> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("push URL {url:?} is not usable for gRPC"))?
            .user_agent(crate::USER_AGENT)?
            .connect_timeout(checked.timeout)
            .timeout(checked.timeout);
        if checked.tls {
            endpoint = with_tls(endpoint, checked)?;
        }
        let header = |what: &str, value: &Option<String>| {
            value
                .as_deref()
                .map(AsciiMetadataValue::try_from)
                .transpose()
                .with_context(|| format!("{what} cannot be sent as gRPC metadata"))
        };
        Ok(GrpcSender {
            client: PusherServiceClient::new(endpoint.connect_lazy()),
            tenant: header("tenant ID", &checked.tenant)?,
            authorization: header("basic-auth credentials", &checked.authorization)?,
            timeout: checked.timeout,
        })
    }

    pub(crate) async fn send(&self, item: &Arc<Item>) -> Attempt {
        let series = RawProfileSeries {
            labels: item
                .labels
                .iter()
                .map(|(name, value)| LabelPair {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            samples: vec![RawSample {
                raw_profile: item.pprof_gz.clone(),
                id: item.id.clone(),
            }],
        };
        let mut request = tonic::Request::new(PushRequest {
            series: vec![series],
        });
        // Tells the server our deadline (grpc-timeout); the endpoint enforces it locally.
        request.set_timeout(self.timeout);
        let metadata = request.metadata_mut();
        if let Some(tenant) = &self.tenant {
            metadata.insert("x-scope-orgid", tenant.clone());
        }
        if let Some(authorization) = &self.authorization {
            metadata.insert("authorization", authorization.clone());
        }

        let mut client = self.client.clone();
        // Belt and braces: the endpoint's timeout covers the request, this also covers
        // waiting for the channel to become ready.
        match tokio::time::timeout(self.timeout, client.push(request)).await {
            Err(_) => Attempt::Retry(format!("gRPC push timed out after {:?}", self.timeout)),
            Ok(Ok(_)) => Attempt::Delivered,
            Ok(Err(status)) => classify(&status),
        }
    }
}

/// Adds TLS: the system's roots plus the configured CA bundle. When the system has no roots
/// at all but a bundle was given, the bundle alone is trusted.
fn with_tls(endpoint: Endpoint, checked: &Checked) -> anyhow::Result<Endpoint> {
    let base = ClientTlsConfig::new().timeout(checked.timeout);
    let base = match &checked.ca_pem {
        Some(pem) => base.ca_certificate(Certificate::from_pem(pem)),
        None => base,
    };
    match endpoint
        .clone()
        .tls_config(base.clone().with_native_roots())
    {
        Ok(endpoint) => Ok(endpoint),
        Err(err) if checked.ca_pem.is_some() => endpoint
            .tls_config(base)
            .with_context(|| format!("cannot set up TLS with the CA bundle (system roots: {err})")),
        Err(err) => Err(err).context(
            "cannot set up TLS: no usable system root certificates; \
             install the system CA certificates or configure a CA bundle",
        ),
    }
}

/// Splits failures into what may pass with time (retry) and what the server will keep
/// refusing (reject).
fn classify(status: &tonic::Status) -> Attempt {
    let why = format!("gRPC {:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Unknown
        | Code::Internal
        | Code::Aborted
        // tonic reports its own request timeout as Cancelled ("Timeout expired").
        | Code::Cancelled => Attempt::Retry(why),
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => Attempt::Rejected(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert!(matches!(
                classify(&tonic::Status::new(code, "x")),
                Attempt::Retry(_)
            ));
        }
        for code in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unauthenticated,
        ] {
            assert!(matches!(
                classify(&tonic::Status::new(code, "x")),
                Attempt::Rejected(_)
            ));
        }
    }
}
