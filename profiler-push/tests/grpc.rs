//! The gRPC pusher against a real tonic PusherService server on loopback.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use profiler_push::{Protocol, PushOutcome, Pusher, DEFAULT_MAX_REQUEST_BYTES};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_arrives_with_labels_payload_and_headers() {
    let recorder = Recorder::default();
    let server = start_server(recorder.clone()).await;
    let observer = Arc::new(Recording::default());
    let mut cfg = config(format!("http://{}", server.addr), Protocol::Grpc);
    cfg.tenant_id = Some("team-a".into());
    cfg.basic_auth = Some(("user".into(), "pass".into()));
    let pusher = Pusher::start(cfg, observer.clone()).unwrap();

    let sent = upload(7, 300);
    pusher.enqueue(sent.clone());
    assert!(wait_until(WAIT, || async { recorder.count() == 1 }).await);

    let got = &recorder.snapshot()[0];
    assert_eq!(got.labels, sent.labels);
    assert_eq!(got.raw_profile, sent.pprof_gz);
    assert!(uuid::Uuid::parse_str(&got.id).is_ok(), "ID {:?}", got.id);
    assert_eq!(got.tenant.as_deref(), Some("team-a"));
    // base64("user:pass")
    assert_eq!(got.authorization.as_deref(), Some("Basic dXNlcjpwYXNz"));

    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(observer.outcomes(), vec![PushOutcome::Delivered]);
    assert_eq!(observer.dropped(), 0);
    assert_eq!(observer.last_queue_bytes(), Some(0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_delivers_everything_once_in_order() {
    let addr = free_addr().await;
    let observer = Arc::new(Recording::default());
    let pusher = Pusher::start(
        config(format!("http://{addr}"), Protocol::Grpc),
        observer.clone(),
    )
    .unwrap();
    for seq in 0..3 {
        pusher.enqueue(upload(seq, 100));
    }
    assert!(
        wait_until(WAIT, || async {
            observer.count(PushOutcome::Retrying) >= 3
        })
        .await,
        "pusher should be retrying while the server is down"
    );
    assert_eq!(observer.count(PushOutcome::Delivered), 0);

    let recorder = Recorder::default();
    let server = serve(bind_again(addr).await, recorder.clone());
    assert!(wait_until(WAIT, || async { recorder.count() >= 3 }).await);
    // Give a stray duplicate the chance to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let received = recorder.snapshot();
    assert_eq!(seqs(&received), vec![0, 1, 2]);
    let ids: HashSet<_> = received.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), 3, "IDs must be distinct and never repeat");
    assert_eq!(observer.count(PushOutcome::Delivered), 3);
    assert_eq!(observer.dropped(), 0);
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_the_oldest() {
    let addr = free_addr().await;
    let observer = Arc::new(Recording::default());
    let mut cfg = config(format!("http://{addr}"), Protocol::Grpc);
    cfg.delivery.queue_bytes = 150; // less than two 100-byte uploads
    let pusher = Pusher::start(cfg, observer.clone()).unwrap();

    for seq in 0..4 {
        pusher.enqueue(upload(seq, 100));
    }
    assert_eq!(observer.dropped(), 3);
    assert_eq!(observer.last_queue_bytes(), Some(100));
    // Bigger than the whole bound: dropped itself, the queue keeps upload 3.
    pusher.enqueue(upload(99, 200));
    assert_eq!(observer.dropped(), 4);
    assert_eq!(observer.last_queue_bytes(), Some(100));
    // An attempt that began before its upload was dropped may still be under way; two more
    // failed attempts guarantee the pusher has moved on to what is left (upload 3) before
    // the server comes up.
    let failed = observer.count(PushOutcome::Retrying);
    assert!(
        wait_until(WAIT, || async {
            observer.count(PushOutcome::Retrying) >= failed + 2
        })
        .await
    );

    let recorder = Recorder::default();
    let server = serve(bind_again(addr).await, recorder.clone());
    assert!(wait_until(WAIT, || async { recorder.count() >= 1 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seqs(&recorder.snapshot()),
        vec![3],
        "the oldest must be the ones missing"
    );
    assert_eq!(observer.last_queue_bytes(), Some(0));
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_is_not_retried() {
    let recorder = Recorder::default();
    let server = start_server(recorder.clone()).await;
    let observer = Arc::new(Recording::default());
    let pusher = Pusher::start(
        config(format!("http://{}", server.addr), Protocol::Grpc),
        observer.clone(),
    )
    .unwrap();

    let mut refused = upload(0, 100);
    refused.labels.push(("reject".into(), "yes".into()));
    pusher.enqueue(refused);
    pusher.enqueue(upload(1, 100));
    assert!(wait_until(WAIT, || async { recorder.count() >= 2 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(
        seqs(&recorder.snapshot()),
        vec![0, 1],
        "the refused upload is sent once"
    );
    assert_eq!(observer.dropped(), 1, "a refused profile is counted");
    assert_eq!(
        observer.outcomes(),
        vec![PushOutcome::Rejected, PushOutcome::Delivered]
    );
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_when_the_server_is_up() {
    let recorder = Recorder::default();
    let server = start_server(recorder.clone()).await;
    let observer = Arc::new(Recording::default());
    let pusher = Pusher::start(
        config(format!("http://{}", server.addr), Protocol::Grpc),
        observer.clone(),
    )
    .unwrap();
    for seq in 0..5 {
        pusher.enqueue(upload(seq, 1000));
    }
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(seqs(&recorder.snapshot()), vec![0, 1, 2, 3, 4]);
    assert_eq!(observer.dropped(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_at_the_deadline_when_the_server_is_down() {
    let addr = free_addr().await;
    let observer = Arc::new(Recording::default());
    let pusher = Pusher::start(
        config(format!("http://{addr}"), Protocol::Grpc),
        observer.clone(),
    )
    .unwrap();
    pusher.enqueue(upload(0, 100));
    pusher.enqueue(upload(1, 100));

    let started = Instant::now();
    let left = pusher.shutdown(Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert_eq!(left, 2);
    assert_eq!(observer.dropped(), 2);
    assert_eq!(observer.last_queue_bytes(), Some(0));
    assert!(observer.count(PushOutcome::Retrying) >= 1);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_endpoints_start_without_connecting() {
    // A CA bundle that exists on most systems stands in for a private CA.
    let bundle = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    if !bundle.exists() {
        eprintln!("skipped: no {}", bundle.display());
        return;
    }
    for protocol in [Protocol::Grpc, Protocol::Http] {
        let mut cfg = config("https://127.0.0.1:9".into(), protocol);
        cfg.ca_cert = Some(bundle.into());
        let pusher = Pusher::start(cfg, Arc::new(Recording::default())).unwrap();
        assert_eq!(pusher.shutdown(Duration::from_millis(100)).await, 0);
    }
}

#[test]
fn pusher_can_be_shared_with_the_sampling_threads() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Pusher>();
}

#[test]
fn start_outside_a_runtime_is_an_error() {
    let err = Pusher::start(
        config("http://127.0.0.1:9".into(), Protocol::Grpc),
        Arc::new(Recording::default()),
    )
    .err()
    .expect("no runtime");
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_targets_arrive_as_one_request() {
    let recorder = Recorder::default();
    let server = start_server(recorder.clone()).await;
    let observer = Arc::new(Recording::default());
    let pusher = Pusher::start(
        config(format!("http://{}", server.addr), Protocol::Grpc),
        observer.clone(),
    )
    .unwrap();
    pusher.enqueue_all((0..200).map(|seq| upload(seq, 2000)).collect());
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);

    let received = recorder.snapshot();
    assert_eq!(seqs(&received), (0..200).collect::<Vec<_>>());
    assert_eq!(recorder.requests(), 1, "one interval, one request");
    assert!(received.iter().all(|r| r.request == 0));
    assert_eq!(observer.outcomes(), vec![PushOutcome::Delivered]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_is_split_into_requests_below_the_bound() {
    // tonic's server refuses messages over 4 MiB by default, like many gRPC servers: every
    // request arriving proves the split.
    let recorder = Recorder::default();
    let server = start_server(recorder.clone()).await;
    let observer = Arc::new(Recording::default());
    let mut cfg = config(format!("http://{}", server.addr), Protocol::Grpc);
    cfg.delivery.queue_bytes = 64 << 20;
    cfg.delivery.max_in_flight = 2;
    let pusher = Pusher::start(cfg, observer.clone()).unwrap();
    // 10 profiles of 1.5 MiB: at most two fit one 4 MiB request.
    let size = 3 << 19;
    pusher.enqueue_all((0..10).map(|seq| upload(seq, size)).collect());
    assert_eq!(pusher.shutdown(Duration::from_secs(20)).await, 0);

    let received = recorder.snapshot();
    let mut got = seqs(&received);
    got.sort();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    assert_eq!(recorder.requests(), 5, "two profiles per request");
    let mut per_request = std::collections::HashMap::<usize, usize>::new();
    for r in &received {
        *per_request.entry(r.request).or_default() += r.raw_profile.len();
    }
    assert!(per_request
        .values()
        .all(|&bytes| bytes < DEFAULT_MAX_REQUEST_BYTES));
    assert_eq!(observer.count(PushOutcome::Delivered), 5);
    assert_eq!(observer.dropped(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_is_retried_a_bounded_number_of_times_then_dropped_and_counted() {
    let recorder = Recorder::default();
    let server = start_server(recorder.clone()).await;
    let observer = Arc::new(Recording::default());
    let mut cfg = config(format!("http://{}", server.addr), Protocol::Grpc);
    cfg.delivery.suspect_retries = 2;
    let pusher = Pusher::start(cfg, observer.clone()).unwrap();

    // What a proxy's 413 looks like through gRPC: Unknown, every time.
    let mut too_big = upload(0, 100);
    too_big.labels.push(("reject".into(), "unknown".into()));
    pusher.enqueue(too_big);
    pusher.enqueue(upload(1, 100));
    assert!(wait_until(WAIT, || async { seqs(&recorder.snapshot()).contains(&1) }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(
        seqs(&recorder.snapshot()),
        vec![0, 0, 0, 1],
        "one attempt and two retries, then the queue moves on"
    );
    assert_eq!(
        observer.outcomes(),
        vec![
            PushOutcome::Retrying,
            PushOutcome::Retrying,
            PushOutcome::GaveUp,
            PushOutcome::Delivered
        ]
    );
    assert_eq!(observer.dropped(), 1);
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_max_in_flight_requests_are_under_way() {
    let recorder = Recorder::slow(Duration::from_millis(300));
    let server = start_server(recorder.clone()).await;
    let observer = Arc::new(Recording::default());
    let mut cfg = config(format!("http://{}", server.addr), Protocol::Grpc);
    cfg.delivery.max_in_flight = 2;
    let pusher = Pusher::start(cfg, observer.clone()).unwrap();
    // Six intervals, one request each, queued while the first ones are under way.
    for seq in 0..6 {
        pusher.enqueue(upload(seq, 100));
    }
    assert_eq!(pusher.shutdown(Duration::from_secs(10)).await, 0);
    assert_eq!(recorder.requests(), 6);
    assert_eq!(recorder.max_in_flight(), 2, "two at a time, never more");
    server.stop().await;
}

/// Over TLS to a server whose certificate a test CA signed: delivered with `ca_cert` naming
/// that CA, refused (and retried, never delivered) without it, since the system roots do not
/// trust it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_custom_ca_is_trusted_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let recorder = Recorder::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve_with(listener, recorder.clone(), Some(ca.identity.clone()));
    let url = format!("https://{}", server.addr);

    let observer = Arc::new(Recording::default());
    let mut trusting = config(url.clone(), Protocol::Grpc);
    trusting.ca_cert = Some(ca.ca_pem.clone());
    let pusher = Pusher::start(trusting, observer.clone()).unwrap();
    pusher.enqueue(upload(1, 100));
    assert!(wait_until(WAIT, || async { recorder.count() == 1 }).await);
    assert_eq!(pusher.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(observer.outcomes(), vec![PushOutcome::Delivered]);

    let observer = Arc::new(Recording::default());
    let pusher = Pusher::start(config(url, Protocol::Grpc), observer.clone()).unwrap();
    pusher.enqueue(upload(2, 100));
    assert!(
        wait_until(WAIT, || async {
            observer.count(PushOutcome::Retrying) >= 2
        })
        .await
    );
    assert_eq!(pusher.shutdown(Duration::from_millis(200)).await, 1);
    assert_eq!(observer.count(PushOutcome::Delivered), 0);
    assert_eq!(recorder.count(), 1, "nothing arrived without the CA");
    server.stop().await;
}
