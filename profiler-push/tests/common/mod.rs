//! Shared pieces of the integration tests: a recording observer and small helpers. The
//! receiver itself (a real tonic server) lives in `profiler_tests::receiver`, shared with the
//! agent's end-to-end tests.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use profiler_push::{Delivery, Protocol, PushConfig, PushObserver, PushOutcome, Upload};
pub use profiler_tests::receiver::*;

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

    fn dropped(&self, profiles: usize) {
        self.dropped.fetch_add(profiles, Ordering::SeqCst);
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
        delivery: delivery(),
    }
}

/// Short timeouts and backoffs; one request at a time, so tests can check the order.
pub fn delivery() -> Delivery {
    Delivery {
        queue_bytes: 1 << 20,
        max_in_flight: 1,
        timeout: Duration::from_secs(2),
        max_backoff: Duration::from_millis(50),
        ..Delivery::default()
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

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}
