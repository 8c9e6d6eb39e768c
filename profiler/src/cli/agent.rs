//! `profiler agent`: samples the whole node at a low frequency and pushes one profile per
//! target every upload interval, until SIGTERM, when it flushes what is left.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use super::{
    config::{AgentArgs, AgentConfig},
    privileges::require_capabilities,
    raise_fd_limit,
};
use crate::{
    aggregate::ProfileSet,
    collect::{CollectConfig, Collector, ProcessChange, Targets as Filter},
    export,
    metrics::{BackendMetrics, Metrics},
    resolve::{ResolvedSample, Resolver, TargetKey, Targets},
};
use profiler_proto::pprof::Profile;
use profiler_push::{OtlpPusher, Pusher};

/// How often the kernel maps are drained at most: every second, or four times per upload
/// interval when that is shorter, so that every interval holds the samples of its own time.
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: AgentArgs) -> Result<u8> {
    let config = AgentConfig::load(args)?;
    require_capabilities()?;
    raise_fd_limit();
    let metrics = Metrics::new();
    metrics.serve(config.metrics_addr).await?;

    let mut collector = Collector::start(&CollectConfig {
        targets: Filter::All,
        frequency: config.frequency,
        kernel_stacks: true,
        ..Default::default()
    })?;
    metrics.set_ready();

    let backends = Backends::start(&config, &metrics)?;
    let pods = match profiler_metadata::kubernetes::watch_pods(
        &config.node_name,
        config.kubeconfig.as_deref(),
    )
    .await
    {
        Ok(pods) => Some(pods),
        Err(err) => {
            eprintln!("info: running without Kubernetes labels: {err:#}");
            None
        }
    };
    let mut targets = Targets::new(config.node_name, config.labels, config.relabel, pods);
    let mut resolver = Resolver::new(&[]);
    let mut interval = Interval::new(config.frequency, collector.drained_window().0);

    let events = collector.events()?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut drain = tokio::time::interval(DRAIN_INTERVAL.min(config.upload_interval / 4));
    let mut upload = tokio::time::interval_at(
        tokio::time::Instant::now() + config.upload_interval,
        config.upload_interval,
    );

    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            guard = events.readable() => {
                let mut guard = guard?;
                guard.clear_ready();
                take_changes(&mut collector, &mut resolver, &mut targets);
            }
            _ = drain.tick() => {
                take_changes(&mut collector, &mut resolver, &mut targets);
                interval.add(&mut targets, &resolver.resolve(&collector.drain()?));
                interval.until = collector.drained_window().1;
                forget_ended(&collector, &mut resolver, &mut targets);
                metrics.update(&collector.counters()?, &resolver.stats());
            }
            _ = upload.tick() => {
                take_changes(&mut collector, &mut resolver, &mut targets);
                interval.add(&mut targets, &resolver.resolve(&collector.drain()?));
                interval.until = collector.drained_window().1;
                forget_ended(&collector, &mut resolver, &mut targets);
                interval.send(&backends);
                targets.retry_unknown_pods();
            }
        }
    }

    // The last interval goes out too, then the queue gets until the deadline to drain.
    take_changes(&mut collector, &mut resolver, &mut targets);
    interval.add(&mut targets, &resolver.resolve(&collector.drain_all()?));
    interval.until = collector.drained_window().1;
    interval.send(&backends);
    metrics.update(&collector.counters()?, &resolver.stats());
    let left = backends.shutdown(config.shutdown_timeout).await;
    if left > 0 {
        eprintln!("warn: {left} profiles were not delivered before the shutdown deadline");
    }
    Ok(0)
}

/// Takes in what the kernel said about processes: a new one (or a new image after exec) is
/// read at once and classified, and the kernel stops sampling it when relabeling drops it.
fn take_changes(collector: &mut Collector, resolver: &mut Resolver, targets: &mut Targets) {
    let flips = collector.flips();
    for change in collector.process_changes() {
        resolver.apply(&change, flips);
        let ProcessChange::Started { process, .. } = change else {
            continue;
        };
        targets.forget(process.tgid);
        let comm = resolver.comm(&process).unwrap_or_else(|| Arc::from(""));
        if targets.get(process.tgid, &comm).dropped {
            // Counted in `filter_updates_failed` when the filter is full; sampling goes on.
            let _ = collector.exclude(process.tgid);
        }
    }
}

/// Forgets processes whose last samples have been resolved.
fn forget_ended(collector: &Collector, resolver: &mut Resolver, targets: &mut Targets) {
    for process in resolver.forget_ended(collector.flips()) {
        targets.forget(process.tgid);
    }
}

/// One upload interval's profiles, one per target, with each target's labels.
struct Interval {
    profiles: ProfileSet<TargetKey>,
    labels: BTreeMap<TargetKey, BTreeMap<String, String>>,
    /// When the interval's samples were taken: the windows of its drains, which meet.
    start: SystemTime,
    until: SystemTime,
    frequency: u64,
}

impl Interval {
    fn new(frequency: u64, start: SystemTime) -> Self {
        Self {
            profiles: ProfileSet::new(frequency),
            labels: BTreeMap::new(),
            start,
            until: start,
            frequency,
        }
    }

    /// Files samples under their targets; dropped targets' samples go nowhere.
    fn add(&mut self, targets: &mut Targets, samples: &[ResolvedSample]) {
        for sample in samples {
            let target = targets.get(sample.pid, &sample.comm);
            if target.dropped {
                continue;
            }
            self.labels
                .entry(target.key.clone())
                .or_insert_with(|| target.labels.clone());
            self.profiles.add(&target.key, sample);
        }
    }

    /// Queues one profile per target with every backend and starts the next interval.
    fn send(&mut self, backends: &Backends) {
        let until = self.until;
        let profiles = self.profiles.take(self.start, until);
        let targets: Vec<_> = profiles
            .iter()
            .filter_map(|(key, profile)| Some((self.labels.get(key)?, profile)))
            .collect();
        backends.send(&targets, self.start, until, self.frequency);
        self.labels.clear();
        self.start = until;
    }
}

/// Where profiles go: Pyroscope, an OTLP endpoint or both, each with its own queue, retries
/// and metrics, so that an outage of one never holds up the other.
struct Backends {
    pyroscope: Option<(Pusher, Arc<BackendMetrics>)>,
    otlp: Option<(OtlpPusher, Arc<BackendMetrics>)>,
}

impl Backends {
    fn start(config: &AgentConfig, metrics: &Arc<Metrics>) -> Result<Backends> {
        let pyroscope = match &config.push {
            Some(push) => {
                let observer = metrics.backend("pyroscope");
                Some((Pusher::start(push.clone(), observer.clone())?, observer))
            }
            None => None,
        };
        let otlp = match &config.otlp {
            Some(otlp) => {
                let observer = metrics.backend("otlp");
                Some((OtlpPusher::start(otlp.clone(), observer.clone())?, observer))
            }
            None => None,
        };
        Ok(Backends { pyroscope, otlp })
    }

    /// Queues one interval's profiles, `(labels, profile)` per target, with every backend.
    fn send(
        &self,
        targets: &[(&BTreeMap<String, String>, &Profile)],
        from: SystemTime,
        until: SystemTime,
        frequency: u64,
    ) {
        if let Some((pusher, observer)) = &self.pyroscope {
            observer.produced(targets.len());
            let mut uploads = Vec::with_capacity(targets.len());
            for (labels, profile) in targets {
                match export::upload(profile, labels, from, until, frequency) {
                    Ok(upload) => uploads.push(upload),
                    Err(err) => {
                        eprintln!("warn: cannot encode the profile of {labels:?}: {err:#}");
                        observer.profile_dropped();
                    }
                }
            }
            pusher.enqueue_all(uploads);
        }
        if let Some((pusher, observer)) = &self.otlp {
            observer.produced(targets.len());
            let targets: Vec<_> = targets
                .iter()
                .map(|(labels, profile)| export::otlp::TargetProfile { labels, profile })
                .collect();
            pusher.enqueue(export::otlp::requests(&targets, pusher.max_request_bytes()));
        }
    }

    /// Delivers what is queued until `deadline`, every backend at once; returns the number
    /// of profiles left undelivered.
    async fn shutdown(self, deadline: Duration) -> usize {
        let pyroscope = async {
            match self.pyroscope {
                Some((pusher, _)) => pusher.shutdown(deadline).await,
                None => 0,
            }
        };
        let otlp = async {
            match self.otlp {
                Some((pusher, _)) => pusher.shutdown(deadline).await,
                None => 0,
            }
        };
        let (a, b) = tokio::join!(pyroscope, otlp);
        a + b
    }
}
