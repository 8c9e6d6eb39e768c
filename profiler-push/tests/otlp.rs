//! The OTLP pusher against a real tonic ProfilesService server and a real HTTP server on
//! loopback.

mod common;

use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use opentelemetry_proto::tonic::profiles::v1development::{
    Profile, ProfilesDictionary, ResourceProfiles, ScopeProfiles,
};
use profiler_push::{OtlpConfig, OtlpProtocol, OtlpPusher, PushOutcome};
use prost::Message as _;

const WAIT: Duration = Duration::from_secs(10);

fn otlp_config(endpoint: String, protocol: OtlpProtocol) -> OtlpConfig {
    OtlpConfig {
        endpoint,
        protocol,
        headers: vec![
            ("Authorization".into(), "Bearer t0ken".into()),
            ("x-team".into(), "a".into()),
        ],
        ca_cert: None,
        gzip: true,
        delivery: delivery(),
    }
}

/// A request holding `profiles` empty profiles, tagged by `seq` in the string table.
fn request(seq: usize, profiles: usize) -> ExportProfilesServiceRequest {
    ExportProfilesServiceRequest {
        resource_profiles: vec![ResourceProfiles {
            scope_profiles: vec![ScopeProfiles {
                profiles: vec![Profile::default(); profiles],
                ..Default::default()
            }],
            ..Default::default()
        }],
        dictionary: Some(ProfilesDictionary {
            string_table: vec![String::new(), format!("seq-{seq}")],
            ..Default::default()
        }),
    }
}

fn seq_of(request: &ExportProfilesServiceRequest) -> String {
    request.dictionary.as_ref().unwrap().string_table[1].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_arrives_gzipped_with_headers() {
    let recorder = OtlpRecorder::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve_otlp(listener, recorder.clone());
    let observer = Arc::new(Recording::default());
    let pusher = OtlpPusher::start(
        otlp_config(format!("http://{}", server.addr), OtlpProtocol::Grpc),
        observer.clone(),
    )
    .unwrap();
    pusher.enqueue(vec![request(0, 3), request(1, 1)]);
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);

    let received = recorder.snapshot();
    assert_eq!(received.len(), 2);
    assert_eq!(seq_of(&received[0].request()), "seq-0");
    assert_eq!(received[0].request(), request(0, 3));
    let got = &received[0];
    assert_eq!(got.header("authorization"), Some("Bearer t0ken"));
    assert_eq!(got.header("x-team"), Some("a"));
    assert_eq!(got.header("grpc-encoding"), Some("gzip"));
    assert_eq!(
        observer.outcomes(),
        vec![PushOutcome::Delivered, PushOutcome::Delivered]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_export_posts_protobuf_to_v1development_profiles() {
    let requests = HttpRequests::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_http(listener, requests.clone()));
    let observer = Arc::new(Recording::default());
    let pusher = OtlpPusher::start(
        otlp_config(format!("http://{addr}/prefix/"), OtlpProtocol::Http),
        observer.clone(),
    )
    .unwrap();
    pusher.enqueue(vec![request(7, 2)]);
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);

    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let got = &requests[0];
    assert!(
        got.line.starts_with("POST /prefix/v1development/profiles "),
        "{}",
        got.line
    );
    assert_eq!(got.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    assert_eq!(got.header("authorization"), Some("Bearer t0ken"));
    let mut body = Vec::new();
    flate2::read::GzDecoder::new(&got.body[..])
        .read_to_end(&mut body)
        .unwrap();
    assert_eq!(
        ExportProfilesServiceRequest::decode(&body[..]).unwrap(),
        request(7, 2)
    );
    assert_eq!(observer.outcomes(), vec![PushOutcome::Delivered]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_delivers_everything_within_the_bound_and_drops_the_oldest_beyond() {
    let addr = free_addr().await;
    let observer = Arc::new(Recording::default());
    let mut cfg = otlp_config(format!("http://{addr}"), OtlpProtocol::Grpc);
    // Room for three of these requests, not four.
    let size = request(0, 2).encoded_len();
    cfg.delivery.queue_bytes = size * 3 + size / 2;
    cfg.delivery.max_in_flight = 2;
    let pusher = OtlpPusher::start(cfg, observer.clone()).unwrap();
    for seq in 0..3 {
        pusher.enqueue(vec![request(seq, 2)]);
    }
    assert!(
        wait_until(WAIT, || async {
            observer.count(PushOutcome::Retrying) >= 2
        })
        .await
    );
    assert_eq!(observer.dropped(), 0, "within the bound nothing is lost");

    let recorder = OtlpRecorder::default();
    let server = serve_otlp(bind_again(addr).await, recorder.clone());
    assert!(wait_until(WAIT, || async { recorder.snapshot().len() >= 3 }).await);
    let mut seqs: Vec<String> = recorder
        .snapshot()
        .iter()
        .map(|r| seq_of(&r.request()))
        .collect();
    seqs.sort();
    assert_eq!(seqs, ["seq-0", "seq-1", "seq-2"]);

    // Beyond the bound the oldest goes, counted by its profiles.
    server.stop().await;
    for seq in 3..7 {
        pusher.enqueue(vec![request(seq, 2)]);
    }
    assert_eq!(observer.dropped(), 2);
    let left = pusher.shutdown(Duration::from_millis(300)).await;
    assert_eq!(left, 6, "three requests of two profiles were still queued");
}

#[test]
fn bad_otlp_configuration_is_refused() {
    let mut cfg = otlp_config("grpc://collector:4317".into(), OtlpProtocol::Grpc);
    assert!(cfg.validate().is_err());
    cfg.endpoint = "http://collector:4317".into();
    cfg.validate().unwrap();
    cfg.headers = vec![("bad header".into(), "v".into())];
    assert!(cfg.validate().is_err());
    // Header values never show in logs.
    cfg.headers = vec![("authorization".into(), "Bearer s3cret".into())];
    assert!(!format!("{cfg:?}").contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_endpoints_with_a_custom_ca_start_without_connecting() {
    // A CA bundle that exists on most systems stands in for a private CA.
    let bundle = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    if !bundle.exists() {
        eprintln!("skipped: no {}", bundle.display());
        return;
    }
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::Http] {
        let mut cfg = otlp_config("https://127.0.0.1:9".into(), protocol);
        cfg.ca_cert = Some(bundle.into());
        let pusher = OtlpPusher::start(cfg, Arc::new(Recording::default())).unwrap();
        assert_eq!(pusher.shutdown(Duration::from_millis(100)).await, 0);
    }
}

/// OTLP over TLS, trusting the test CA through `ca_cert`: the export arrives, gzipped, with
/// its headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_over_tls_with_a_custom_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let recorder = OtlpRecorder::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve_otlp_with(listener, recorder.clone(), Some(ca.identity.clone()));
    let mut config = otlp_config(format!("https://{}", server.addr), OtlpProtocol::Grpc);
    config.ca_cert = Some(ca.ca_pem.clone());
    let observer = Arc::new(Recording::default());
    let pusher = OtlpPusher::start(config, observer.clone()).unwrap();
    pusher.enqueue(vec![request(0, 2)]);
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);
    let received = recorder.snapshot();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].request(), request(0, 2));
    assert_eq!(received[0].header("authorization"), Some("Bearer t0ken"));
    assert_eq!(observer.outcomes(), vec![PushOutcome::Delivered]);
    server.stop().await;
}
