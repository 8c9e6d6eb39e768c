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
    metrics::Metrics,
    resolve::{ResolvedSample, Resolver, TargetKey, Targets},
};

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
        unwinder: config.unwinder,
        unwind_table_memory: config.unwind_table_memory,
        ..Default::default()
    })?;
    metrics.set_ready();

    let pusher = profiler_push::Pusher::start(config.push.clone(), metrics.clone())?;
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
                interval.send(&pusher, &metrics);
                targets.retry_unknown_pods();
            }
        }
    }

    // The last interval goes out too, then the queue gets until the deadline to drain.
    take_changes(&mut collector, &mut resolver, &mut targets);
    interval.add(&mut targets, &resolver.resolve(&collector.drain_all()?));
    interval.until = collector.drained_window().1;
    interval.send(&pusher, &metrics);
    metrics.update(&collector.counters()?, &resolver.stats());
    let left = pusher.shutdown(config.shutdown_timeout).await;
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

    /// Queues one profile per target and starts the next interval.
    fn send(&mut self, pusher: &profiler_push::Pusher, metrics: &Metrics) {
        let until = self.until;
        for (key, profile) in self.profiles.take(self.start, until) {
            let Some(labels) = self.labels.get(&key) else {
                continue;
            };
            match export::upload(&profile, labels, self.start, until, self.frequency) {
                Ok(upload) => pusher.enqueue(upload),
                Err(err) => {
                    eprintln!("warn: cannot encode the profile of {key:?}: {err:#}");
                    metrics.profile_dropped();
                }
            }
        }
        self.labels.clear();
        self.start = until;
    }
}
