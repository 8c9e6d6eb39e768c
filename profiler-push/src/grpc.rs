//! Delivery through Pyroscope's gRPC push API, `push.v1.PusherService/Push`: one request
//! carries every series of an interval (or as many as fit the request bound).

use std::time::Duration;

use profiler_proto::push::v1::pusher_service_client::PusherServiceClient;
use profiler_proto::push::v1::{PushRequest, RawProfileSeries, RawSample};
use profiler_proto::types::v1::LabelPair;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use crate::endpoint::{classify_grpc, Endpoint};
use crate::queue::Attempt;
use crate::{Request, Series};

pub(crate) struct GrpcSender {
    client: PusherServiceClient<Channel>,
    metadata: MetadataMap,
    timeout: Duration,
}

impl GrpcSender {
    /// Must run inside a tokio runtime (the lazy channel spawns its connection task).
    pub(crate) fn new(url: &str, endpoint: &Endpoint) -> anyhow::Result<GrpcSender> {
        Ok(GrpcSender {
            client: PusherServiceClient::new(endpoint.channel(url)?)
                // A request may be as large as the configured bound, above tonic's default.
                .max_encoding_message_size(usize::MAX),
            metadata: endpoint.metadata(),
            timeout: endpoint.timeout,
        })
    }

    pub(crate) async fn send(&self, request: &Request) -> Attempt {
        let mut request = tonic::Request::new(push_request(&request.series));
        // Tells the server our deadline (grpc-timeout); the endpoint enforces it locally.
        request.set_timeout(self.timeout);
        *request.metadata_mut() = self.metadata.clone();

        let mut client = self.client.clone();
        // Belt and braces: the endpoint's timeout covers the request, this also covers
        // waiting for the channel to become ready.
        match tokio::time::timeout(self.timeout, client.push(request)).await {
            Err(_) => Attempt::Retry(format!("gRPC push timed out after {:?}", self.timeout)),
            Ok(Ok(_)) => Attempt::Delivered,
            Ok(Err(status)) => classify_grpc(&status),
        }
    }
}

/// The `PushRequest` of `series`, one `RawProfileSeries` each.
pub(crate) fn push_request(series: &[Series]) -> PushRequest {
    PushRequest {
        series: series
            .iter()
            .map(|s| RawProfileSeries {
                labels: s
                    .labels
                    .iter()
                    .map(|(name, value)| LabelPair {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                samples: vec![RawSample {
                    raw_profile: s.pprof_gz.clone(),
                    id: s.id.clone(),
                }],
            })
            .collect(),
    }
}
