//! `profiler agent`: samples the whole node at a low frequency and pushes one profile per
//! target every upload interval, until SIGTERM, when it flushes what is left.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use super::{
    config::{AgentArgs, AgentConfig},
    privileges::require_capabilities,
};
use crate::{
    aggregate::{ProfileSet, SampleLabels},
    collect::{CollectConfig, Collector, Targets as Filter},
    export,
    metrics::Metrics,
    resolve::{Decision, ResolvedSample, Resolver, TargetKey, Targets},
};

/// How often the kernel maps are drained at most: every second, or four times per upload
/// interval when that is shorter, so that every interval holds the samples of its own time.
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: AgentArgs) -> Result<u8> {
    let config = AgentConfig::load(args)?;
    require_capabilities()?;
    let metrics = Metrics::new();
    metrics.serve(config.metrics_addr).await?;

    let mut collector = Collector::start(&CollectConfig {
        targets: Filter::All,
        frequency: config.frequency,
        kernel_stacks: true,
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
    let mut targets = Targets::new(config.node_name, config.labels, config.relabel, pods)
        .with_pod_grace(config.pod_wait);
    let mut resolver = Resolver::new(&[]);
    let sample_labels = match config.thread_names {
        true => SampleLabels::ThreadNames,
        false => SampleLabels::None,
    };
    let mut interval = Interval::new(config.frequency, sample_labels)
        .with_max_series(config.max_series, targets.overflow_key());

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
                for pid in collector.new_processes() {
                    // New process, or exec: read it (again) and decide where it belongs.
                    resolver.observe(pid);
                    let was_dropped = targets.forget(pid) == Some(Decision::Drop);
                    // Classified while /proc still has it; one gone already is classified
                    // from its samples' names when they are filed.
                    let Some(comm) = resolver.comm(pid) else { continue };
                    match (targets.decide(pid, &comm) == Decision::Drop, was_dropped) {
                        // Relabeling dropped it: the kernel stops sampling it.
                        (true, false) => collector.exclude(pid)?,
                        // It exec'd into something relabeling keeps.
                        (false, true) => collector.forget(pid),
                        _ => {}
                    }
                }
            }
            _ = drain.tick() => {
                interval.add(&mut targets, &resolver.resolve(&collector.drain()?), &metrics);
                interval.revisit(&mut targets, &mut collector, &metrics, false)?;
                metrics.update(&collector.counters()?, &resolver.stats());
            }
            _ = upload.tick() => {
                interval.add(&mut targets, &resolver.resolve(&collector.drain()?), &metrics);
                interval.send(&pusher, &metrics);
                // Exited processes' samples are out now: forget them.
                for pid in resolver.forget_exited() {
                    targets.forget(pid);
                    collector.forget(pid);
                }
            }
        }
    }

    // The last interval goes out too, then the queue gets until the deadline to drain.
    interval.add(
        &mut targets,
        &resolver.resolve(&collector.drain_all()?),
        &metrics,
    );
    // Samples still waiting for their pod go out with what is known.
    interval.revisit(&mut targets, &mut collector, &metrics, true)?;
    interval.send(&pusher, &metrics);
    metrics.update(&collector.counters()?, &resolver.stats());
    let left = pusher.shutdown(config.shutdown_timeout).await;
    if left > 0 {
        eprintln!("warn: {left} profiles were not delivered before the shutdown deadline");
    }
    Ok(0)
}

/// One upload interval's profiles, one per series.
struct Interval {
    profiles: ProfileSet<TargetKey>,
    start: SystemTime,
    frequency: u64,
}

impl Interval {
    fn new(frequency: u64, labels: SampleLabels) -> Self {
        Self {
            profiles: ProfileSet::new(frequency, labels),
            start: SystemTime::now(),
            frequency,
        }
    }

    /// At most `max` series per interval; what is over goes to `overflow`.
    fn with_max_series(mut self, max: usize, overflow: TargetKey) -> Self {
        self.profiles = self.profiles.with_cap(max, overflow);
        self
    }

    /// Files samples under their series; dropped processes' samples go nowhere, undecided
    /// ones wait in `targets`.
    fn add(&mut self, targets: &mut Targets, samples: &[ResolvedSample], metrics: &Metrics) {
        let mut folded = 0;
        targets.file(samples, |key, sample| {
            if self.profiles.add(key, sample) {
                folded += sample.count;
            }
        });
        metrics.series_overflow(folded);
        metrics.samples_lost("awaiting_metadata_full", targets.take_held_dropped());
    }

    /// Decides again what may have changed (pods appeared, grace periods ended; every
    /// waiting process when `all`), files the samples that waited, and tells the kernel which
    /// processes to stop or start sampling again.
    fn revisit(
        &mut self,
        targets: &mut Targets,
        collector: &mut Collector,
        metrics: &Metrics,
        all: bool,
    ) -> Result<()> {
        let mut folded = 0;
        let file = |key: &TargetKey, sample: &ResolvedSample| {
            if self.profiles.add(key, sample) {
                folded += sample.count;
            }
        };
        let changes = match all {
            true => targets.decide_all(file),
            false => targets.revisit(file),
        };
        metrics.series_overflow(folded);
        for change in changes {
            if change.exclude {
                collector.exclude(change.pid)?;
            } else {
                // Lifts the exclusion.
                collector.forget(change.pid);
            }
        }
        Ok(())
    }

    /// Queues one profile per target and starts the next interval.
    fn send(&mut self, pusher: &profiler_push::Pusher, metrics: &Metrics) {
        let until = SystemTime::now();
        for (key, profile) in self.profiles.take(self.start, until) {
            match export::upload(&profile, key.labels(), self.start, until, self.frequency) {
                Ok(upload) => pusher.enqueue(upload),
                Err(err) => {
                    eprintln!("warn: cannot encode the profile of {key:?}: {err:#}");
                    metrics.profile_dropped();
                }
            }
        }
        self.start = until;
    }
}
