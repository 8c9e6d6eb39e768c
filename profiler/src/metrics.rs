//! Self-observability: every `profiler_` metric is declared here, once, with its help text, and
//! served as Prometheus text on `/metrics` next to `/healthz` and `/readyz`.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use profiler_push::{PushObserver, PushOutcome};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
        info::Info,
    },
    registry::Registry,
};

use crate::{collect::Counters, resolve::ResolveStats};

type Labels = Vec<(&'static str, String)>;

/// The agent's metrics and readiness.
pub struct Metrics {
    registry: Registry,
    samples: Counter,
    lost: Family<Labels, Counter>,
    truncated: Counter,
    processes: Gauge,
    cache_hits: Counter,
    cache_misses: Counter,
    pushes: Family<Labels, Counter>,
    push_duration: Histogram,
    queue_bytes: Gauge,
    profiles_dropped: Counter,
    unwind: Family<Labels, Counter>,
    ready: AtomicBool,
    /// Kernel counters are totals; metrics move by the difference since the last update.
    last: Mutex<(Counters, ResolveStats)>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("profiler");
        let metrics = Metrics {
            samples: Counter::default(),
            lost: Family::default(),
            truncated: Counter::default(),
            processes: Gauge::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            pushes: Family::default(),
            push_duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            queue_bytes: Gauge::default(),
            profiles_dropped: Counter::default(),
            unwind: Family::default(),
            ready: AtomicBool::new(false),
            last: Mutex::new(Default::default()),
            registry: Registry::default(),
        };
        registry.register(
            "samples_collected",
            "Samples counted into profiles",
            metrics.samples.clone(),
        );
        registry.register(
            "samples_lost",
            "Samples missing from profiles, by reason",
            metrics.lost.clone(),
        );
        registry.register(
            "stacks_truncated",
            "Stacks cut at the deepest recorded frame",
            metrics.truncated.clone(),
        );
        registry.register(
            "processes_tracked",
            "Processes whose metadata is held",
            metrics.processes.clone(),
        );
        registry.register(
            "symbolizer_cache_hits",
            "Address look-ups answered from the cache",
            metrics.cache_hits.clone(),
        );
        registry.register(
            "symbolizer_cache_misses",
            "Address look-ups that went to the symbolizer",
            metrics.cache_misses.clone(),
        );
        registry.register(
            "pushes",
            "Push attempts, by result (delivered, retrying, rejected)",
            metrics.pushes.clone(),
        );
        registry.register(
            "push_duration_seconds",
            "Time of one push attempt",
            metrics.push_duration.clone(),
        );
        registry.register(
            "queue_bytes",
            "Profile bytes waiting for delivery",
            metrics.queue_bytes.clone(),
        );
        registry.register(
            "profiles_dropped",
            "Profiles never delivered: queue full, rejected or undelivered at shutdown",
            metrics.profiles_dropped.clone(),
        );
        registry.register(
            "unwind_events",
            "The table unwinder (--unwinder auto): walks stopped early by reason \
             (unwind_stop_*), frame-pointer steps, and tables loaded, evicted or failed",
            metrics.unwind.clone(),
        );
        registry.register(
            "build",
            "Version of this profiler",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Arc::new(Metrics {
            registry,
            ..metrics
        })
    }

    /// Marks the agent ready (BPF attached): /readyz answers 200 from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Moves the sampling and resolver metrics to the latest totals.
    pub fn update(&self, counters: &Counters, stats: &ResolveStats) {
        use profiler_common::Counter as K;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let delta = |now: u64, before: u64| now.saturating_sub(before);
        self.samples
            .inc_by(delta(counters.get(K::Samples), last.0.get(K::Samples)));
        self.truncated.inc_by(delta(
            counters.get(K::StacksTruncated),
            last.0.get(K::StacksTruncated),
        ));
        for ((name, now, is_loss), (_, before, _)) in counters.all().into_iter().zip(last.0.all()) {
            if is_loss {
                self.lost
                    .get_or_create(&vec![("reason", name.to_owned())])
                    .inc_by(delta(now, before));
            } else if name.starts_with("unwind_") {
                self.unwind
                    .get_or_create(&vec![("event", name.to_owned())])
                    .inc_by(delta(now, before));
            }
        }
        self.processes.set(stats.processes as i64);
        self.cache_hits
            .inc_by(delta(stats.cache_hits, last.1.cache_hits));
        self.cache_misses
            .inc_by(delta(stats.cache_misses, last.1.cache_misses));
        *last = (counters.clone(), *stats);
    }

    /// Profiles dropped before they reached the queue (a target with nothing to send is not one).
    pub fn profile_dropped(&self) {
        self.profiles_dropped.inc();
    }

    fn text(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Serves /metrics, /healthz and /readyz on `addr` until the runtime ends.
    pub async fn serve(self: &Arc<Self>, addr: SocketAddr) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics"))?;
        let app = Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready_handler))
            .with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(())
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.text(),
    )
}

async fn ready_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "BPF not attached yet\n")
    }
}

impl PushObserver for Metrics {
    fn pushed(&self, outcome: PushOutcome, elapsed: Duration) {
        let result = match outcome {
            PushOutcome::Delivered => "delivered",
            PushOutcome::Retrying => "retrying",
            PushOutcome::Rejected => "rejected",
        };
        self.pushes
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
        self.push_duration.observe(elapsed.as_secs_f64());
        if matches!(outcome, PushOutcome::Rejected) {
            self.profiles_dropped.inc();
        }
    }

    fn dropped(&self, uploads: usize) {
        self.profiles_dropped.inc_by(uploads as u64);
    }

    fn queue_bytes(&self, bytes: usize) {
        self.queue_bytes.set(bytes as i64);
    }
}
