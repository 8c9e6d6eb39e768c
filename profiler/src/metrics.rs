//! Self-observability: every `profiler_` metric is declared here, once, with its help text, and
//! served on `/metrics` next to `/healthz` and `/readyz`, in the OpenMetrics text format when
//! the scraper asks for it and in Prometheus's classic text format (0.0.4) otherwise. The
//! standard `process_*` metrics and the memory of the agent's BPF maps are read from /proc
//! at each scrape.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use profiler_push::{PushObserver, PushOutcome};
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, text, DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
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
    events: Family<Labels, Counter>,
    maps_reads: Counter,
    truncated: Counter,
    processes: Gauge,
    parses_abandoned: Gauge,
    cache_hits: Counter,
    cache_misses: Counter,
    gopclntab_errors: Counter,
    parses_released: Counter,
    binaries_skipped: Family<Labels, Counter>,
    pushes: Family<Labels, Counter>,
    push_duration: Family<Labels, Histogram, fn() -> Histogram>,
    queue_bytes: Family<Labels, Gauge>,
    profiles_dropped: Family<Labels, Counter>,
    /// Profiles made for delivery, by backend: the delivery SLI's denominator.
    profiles_produced: Family<Labels, Counter>,
    /// Profiles a backend accepted: the delivery SLI's numerator (one request carries many).
    profiles_delivered: Family<Labels, Counter>,
    series_overflow: Counter,
    unwind: Family<Labels, Counter>,
    perf_map: Family<Labels, Counter>,
    perf_map_entries: Gauge,
    ready: AtomicBool,
    /// Kernel counters are totals; metrics move by the difference since the last update.
    last: Mutex<(Counters, ResolveStats)>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Metrics> {
        let mut root = Registry::default();
        // The standard process metrics carry no prefix: dashboards and alerts expect
        // `process_cpu_seconds_total`, as every Prometheus client library names it.
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("profiler");
        let metrics = Metrics {
            samples: Counter::default(),
            lost: Family::default(),
            events: Family::default(),
            maps_reads: Counter::default(),
            truncated: Counter::default(),
            processes: Gauge::default(),
            parses_abandoned: Gauge::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            gopclntab_errors: Counter::default(),
            parses_released: Counter::default(),
            binaries_skipped: Family::default(),
            pushes: Family::default(),
            push_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 12))
            }),
            queue_bytes: Family::default(),
            profiles_dropped: Family::default(),
            profiles_produced: Family::default(),
            profiles_delivered: Family::default(),
            series_overflow: Counter::default(),
            unwind: Family::default(),
            perf_map: Family::default(),
            perf_map_entries: Gauge::default(),
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
            "kernel_events",
            "What the kernel side counted besides samples (forks followed and not followed, \
             processes exited, idle and filtered samples, lost announcements, filter updates that \
             failed), by event",
            metrics.events.clone(),
        );
        registry.register(
            "maps_reads",
            "Reads of /proc/PID/maps (new processes, execs, and rereads for unmapped addresses)",
            metrics.maps_reads.clone(),
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
            "parses_abandoned_running",
            "Parses of a binary or perf map abandoned past --parse-timeout and still running \
             (at 4, no new parse starts until one ends)",
            metrics.parses_abandoned.clone(),
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
            "symbolizer_gopclntab_errors",
            "Corrupt Go function tables (.gopclntab), and look-ups they left unnamed",
            metrics.gopclntab_errors.clone(),
        );
        registry.register(
            "symbolizer_parses_released",
            "Binaries' parsed symbols dropped after a minute without a new address (their cached \
             names stay; a new address parses the binary again)",
            metrics.parses_released.clone(),
        );
        registry.register(
            "binaries_skipped",
            "Binaries left unparsed, by stage (symbols, unwind_table) and reason (too_large, \
             parse_error, panic, truncated, timeout): their frames show as file+0xADDR, or their code is walked \
             with frame pointers",
            metrics.binaries_skipped.clone(),
        );
        registry.register(
            "pushes",
            "Push requests attempted, by backend (pyroscope, otlp) and result (delivered, retrying, rejected, gave_up)",
            metrics.pushes.clone(),
        );
        registry.register(
            "push_duration_seconds",
            "Time of one push attempt, by backend",
            metrics.push_duration.clone(),
        );
        registry.register(
            "queue_bytes",
            "Profile bytes waiting for delivery, by backend",
            metrics.queue_bytes.clone(),
        );
        registry.register(
            "profiles_produced",
            "Profiles made for delivery, one per target and upload interval, by backend \
             (the delivery SLI's denominator)",
            metrics.profiles_produced.clone(),
        );
        registry.register(
            "profiles_delivered",
            "Profiles a backend accepted, by backend (the delivery SLI's numerator)",
            metrics.profiles_delivered.clone(),
        );
        registry.register(
            "profiles_dropped",
            "Profiles never delivered, by backend: not encodable, queue full, rejected, retries given up, or undelivered at shutdown",
            metrics.profiles_dropped.clone(),
        );
        registry.register(
            "series_overflow",
            "Samples filed under the node's series-overflow series because the interval had \
             reached --max-series series",
            metrics.series_overflow.clone(),
        );
        registry.register(
            "unwind_events",
            "The table unwinder (--unwinder auto): walks stopped early by reason \
             (unwind_stop_*), frame-pointer steps, and tables loaded, evicted or failed",
            metrics.unwind.clone(),
        );
        registry.register(
            "perf_map_events",
            "JIT perf-map files (/tmp/perf-PID.map) read, by event: files found, lines taken in, \
             malformed lines, lines dropped at the entry cap, files replaced, files unreadable, \
             reads abandoned past --parse-timeout",
            metrics.perf_map.clone(),
        );
        registry.register(
            "perf_map_entries",
            "JIT code entries held from perf-map files, over all processes",
            metrics.perf_map_entries.clone(),
        );
        registry.register(
            "build",
            "Version of this profiler",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(BpfMapMemory));
        Arc::new(Metrics {
            registry: root,
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
            let (family, key) = if is_loss {
                (&self.lost, "reason")
            } else if name.starts_with("unwind_") {
                (&self.unwind, "event")
            } else {
                (&self.events, "event")
            };
            family
                .get_or_create(&vec![(key, name.to_owned())])
                .inc_by(delta(now, before));
        }
        self.maps_reads
            .inc_by(delta(stats.maps_reads, last.1.maps_reads));
        self.processes.set(stats.processes as i64);
        self.parses_abandoned
            .set(crate::deadline::abandoned() as i64);
        self.cache_hits
            .inc_by(delta(stats.cache_hits, last.1.cache_hits));
        self.cache_misses
            .inc_by(delta(stats.cache_misses, last.1.cache_misses));
        self.gopclntab_errors
            .inc_by(delta(stats.gopclntab_errors, last.1.gopclntab_errors));
        self.parses_released
            .inc_by(delta(stats.parses_released, last.1.parses_released));
        let (now, before) = (&stats.skipped_binaries, &last.1.skipped_binaries);
        let (unwind, unwind_before) = (&counters.unwind, &last.0.unwind);
        for (stage, reason, now, before) in [
            ("symbols", "too_large", now.too_large, before.too_large),
            ("symbols", "panic", now.panics, before.panics),
            ("symbols", "truncated", now.truncated, before.truncated),
            ("symbols", "timeout", now.timeouts, before.timeouts),
            (
                "symbols",
                "parse_error",
                now.parse_errors,
                before.parse_errors,
            ),
            (
                "unwind_table",
                "timeout",
                unwind.build_timeouts,
                unwind_before.build_timeouts,
            ),
            (
                "unwind_table",
                "truncated",
                unwind.build_truncated,
                unwind_before.build_truncated,
            ),
            (
                "unwind_table",
                "parse_error",
                unwind.build_errors,
                unwind_before.build_errors,
            ),
            (
                "unwind_table",
                "panic",
                unwind.build_panics,
                unwind_before.build_panics,
            ),
        ] {
            self.binaries_skipped
                .get_or_create(&vec![
                    ("stage", stage.to_owned()),
                    ("reason", reason.to_owned()),
                ])
                .inc_by(delta(now, before));
        }
        let (now, before) = (&stats.perf_maps, &last.1.perf_maps);
        for (event, now, before) in [
            ("files", now.files, before.files),
            ("lines", now.lines, before.lines),
            ("malformed", now.malformed, before.malformed),
            ("dropped", now.dropped, before.dropped),
            ("replaced", now.replaced, before.replaced),
            ("unreadable", now.unreadable, before.unreadable),
            ("abandoned", now.abandoned, before.abandoned),
        ] {
            self.perf_map
                .get_or_create(&vec![("event", event.to_owned())])
                .inc_by(delta(now, before));
        }
        self.perf_map_entries.set(now.entries as i64);
        *last = (counters.clone(), *stats);
    }

    /// The push metrics of one backend (`pyroscope`, `otlp`), as its queue's observer.
    pub fn backend(self: &Arc<Self>, backend: &'static str) -> Arc<BackendMetrics> {
        let metrics = BackendMetrics {
            metrics: self.clone(),
            backend,
        };
        // Every series exists from the start, so a dashboard sees zeros rather than gaps.
        metrics.queue_bytes(0);
        metrics.dropped(0);
        metrics.delivered(0);
        metrics.produced(0);
        Arc::new(metrics)
    }

    /// Samples folded into the overflow series.
    pub fn series_overflow(&self, samples: u64) {
        self.series_overflow.inc_by(samples);
    }

    /// Samples lost in user space, for a reason of its own.
    pub fn samples_lost(&self, reason: &'static str, samples: u64) {
        if samples > 0 {
            self.lost
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc_by(samples);
        }
    }

    /// The metrics page in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = match format {
            Format::OpenMetrics => text::encode(&mut out, &self.registry),
            Format::Classic => prometheus_text::encode(&mut out, &self.registry),
        };
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

/// The two text formats of /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`info` type, `# EOF`), for scrapers that ask for it.
    OpenMetrics,
    /// Prometheus's classic text format 0.0.4, which every scraper reads.
    Classic,
}

impl Format {
    /// The `Content-Type` the page is sent with.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => prometheus_text::CONTENT_TYPE,
        }
    }

    /// The format an `Accept` header prefers: OpenMetrics when it weighs
    /// `application/openmetrics-text` above the classic format (`text/plain`, `text/*`,
    /// `*/*`), the classic format otherwise, also when there is no header at all.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let (mut openmetrics, mut classic) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let quality = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse().unwrap_or(0.0));
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(quality),
                "text/plain" | "text/*" | "*/*" => classic = classic.max(quality),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= classic {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }
}

async fn metrics_handler(
    State(metrics): State<Arc<Metrics>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let format = Format::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        metrics.encode(format),
    )
}

async fn ready_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "BPF not attached yet\n")
    }
}

/// One backend's view of the push metrics: every series it touches carries
/// `backend="<name>"`.
pub struct BackendMetrics {
    metrics: Arc<Metrics>,
    backend: &'static str,
}

impl BackendMetrics {
    fn labels(&self, result: Option<&'static str>) -> Labels {
        let mut labels = vec![("backend", self.backend.to_owned())];
        if let Some(result) = result {
            labels.push(("result", result.to_owned()));
        }
        labels
    }

    /// Profiles dropped before they reached the queue (a target with nothing to send is not one).
    pub fn profile_dropped(&self) {
        self.dropped(1);
    }

    /// Profiles made for this backend: counted whether they then reach its queue or not.
    pub fn produced(&self, profiles: usize) {
        self.metrics
            .profiles_produced
            .get_or_create(&self.labels(None))
            .inc_by(profiles as u64);
    }
}

impl PushObserver for BackendMetrics {
    fn pushed(&self, outcome: PushOutcome, elapsed: Duration) {
        self.metrics
            .pushes
            .get_or_create(&self.labels(Some(outcome.as_str())))
            .inc();
        self.metrics
            .push_duration
            .get_or_create(&self.labels(None))
            .observe(elapsed.as_secs_f64());
    }

    fn delivered(&self, profiles: usize) {
        self.metrics
            .profiles_delivered
            .get_or_create(&self.labels(None))
            .inc_by(profiles as u64);
    }

    fn dropped(&self, profiles: usize) {
        self.metrics
            .profiles_dropped
            .get_or_create(&self.labels(None))
            .inc_by(profiles as u64);
    }

    fn queue_bytes(&self, bytes: usize) {
        self.metrics
            .queue_bytes
            .get_or_create(&self.labels(None))
            .set(bytes as i64);
    }
}

/// The standard process metrics of the agent itself, read from /proc at each scrape, named
/// as every Prometheus client library names them.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        // A /proc read that fails leaves its metric out of this scrape rather than failing it.
        let me = procfs::process::Process::myself().ok();
        let stat = me.as_ref().and_then(|p| p.stat().ok());
        let ticks = procfs::ticks_per_second() as f64;
        if let Some(stat) = &stat {
            let cpu = (stat.utime + stat.stime) as f64 / ticks;
            let rss = stat.rss * procfs::page_size();
            counter(
                &mut encoder,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                cpu,
            )?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                rss as f64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                stat.vsize as f64,
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Number of OS threads in the process.",
                stat.num_threads as f64,
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                let start = boot as f64 + stat.starttime as f64 / ticks;
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    start,
                )?;
            }
        }
        if let Some(fds) = me.as_ref().and_then(|p| p.fd_count().ok()) {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                fds as f64,
            )?;
        }
        let max_fds = me.as_ref().and_then(|p| p.limits().ok()).and_then(|l| {
            match l.max_open_files.soft_limit {
                procfs::process::LimitValue::Value(n) => Some(n),
                procfs::process::LimitValue::Unlimited => None,
            }
        });
        if let Some(max) = max_fds {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max as f64,
            )?;
        }
        Ok(())
    }
}

/// `profiler_bpf_map_memory_bytes`: what the kernel charges for the agent's BPF maps.
#[derive(Debug)]
struct BpfMapMemory;

impl Collector for BpfMapMemory {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        gauge(
            &mut encoder,
            "bpf_map_memory_bytes",
            "Memory of this agent's BPF maps (memlock in /proc/self/fdinfo), which the kernel \
             charges to its memory cgroup on top of the resident set",
            bpf_map_memory(std::path::Path::new("/proc/self/fdinfo")) as f64,
        )
    }
}

/// The sum of `memlock` over the BPF maps open in `fdinfo` (a /proc/PID/fdinfo directory): a
/// map's fdinfo has a `map_type` line, a program's a `prog_type` line. A map open under several
/// descriptors (same `map_id`) counts once.
pub fn bpf_map_memory(fdinfo: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(fdinfo) else {
        return 0;
    };
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for entry in entries.flatten() {
        // Descriptors close between the listing and the read; those simply count nothing.
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if field("map_type").is_none() {
            continue;
        }
        if let Some(id) = field("map_id") {
            if !seen.insert(id.to_owned()) {
                continue;
            }
        }
        total += field("memlock")
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMETHEUS_2_42: &str = "application/openmetrics-text;version=1.0.0,\
        application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn accept_selects_the_format() {
        assert_eq!(
            Format::negotiate(Some(PROMETHEUS_2_42)),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(None), Format::Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Classic);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Classic);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; version=1.0.0")),
            Format::OpenMetrics
        );
        // Weights decide, not order; q=0 refuses.
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Classic
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Classic
        );
        assert_eq!(Format::negotiate(Some("garbage;;;,")), Format::Classic);
    }

    #[test]
    fn classic_page_has_no_openmetrics_only_syntax() {
        let metrics = Metrics::new();
        metrics.backend("pyroscope").produced(1);
        let page = metrics.encode(Format::Classic);
        assert!(!page.contains("# EOF"), "{page}");
        assert!(!page.contains(" info\n"), "{page}");
        assert!(
            page.contains(
                "# TYPE profiler_profiles_produced_total counter\n\
                 profiler_profiles_produced_total{backend=\"pyroscope\"} 1\n"
            ),
            "{page}"
        );
        assert!(
            page.contains("# TYPE profiler_build_info gauge\n"),
            "{page}"
        );
        assert!(page.contains("\nprocess_cpu_seconds_total "), "{page}");
        let open = metrics.encode(Format::OpenMetrics);
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("# TYPE profiler_build info\n"), "{open}");
    }

    #[test]
    fn map_memory_sums_map_descriptors_only() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "3",
            "flags:\t02000002\nmap_type:\t1\nmemlock:\t4096\nmap_id:\t7\n",
        );
        write(
            "4",
            "pos:\t0\nmap_type:\t6\nmemlock:\t1052672\nmap_id:\t8\n",
        );
        // The same map again, under another descriptor.
        write(
            "9",
            "pos:\t0\nmap_type:\t6\nmemlock:\t1052672\nmap_id:\t8\n",
        );
        write("5", "pos:\t0\nprog_type:\t7\nmemlock:\t8192\nprog_id:\t3\n");
        write("6", "pos:\t0\nflags:\t0100002\n");
        assert_eq!(bpf_map_memory(dir.path()), 4096 + 1052672);
        assert_eq!(bpf_map_memory(&dir.path().join("missing")), 0);
    }
}
