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
    privileges::{drop_capabilities, require_capabilities},
    raise_fd_limit,
};
use crate::{
    aggregate::{ProfileSet, SampleLabels, Values, OFF_CPU_TYPE},
    collect::{CollectConfig, Collector, ProcessChange, Targets as Filter},
    export,
    metrics::{BackendMetrics, Metrics},
    resolve::{Decision, ResolvedSample, Resolver, TargetKey, Targets},
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
        unwinder: config.unwinder,
        unwind_table_memory: config.unwind_table_memory,
        parse_timeout: config.parse_timeout,
        off_cpu: config.off_cpu.clone(),
        ..Default::default()
    })?;
    // Before anything starts a thread (the resolver's DNS lookups do): threads inherit them.
    drop_capabilities()?;
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
    let mut targets = Targets::new(config.node_name, config.labels, config.relabel, pods)
        .with_pod_grace(config.pod_wait);
    let mut resolver = Resolver::new(&[]);
    resolver.set_parse_timeout(config.parse_timeout);
    let sample_labels = match config.thread_names {
        true => SampleLabels::ThreadNames,
        false => SampleLabels::None,
    };
    let mut interval = Interval::new(
        config.frequency,
        sample_labels,
        collector.drained_window().0,
        config.off_cpu.is_some(),
    )
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
                take_changes(&mut collector, &mut resolver, &mut targets);
            }
            _ = drain.tick() => {
                take_changes(&mut collector, &mut resolver, &mut targets);
                interval.add(&mut targets, &resolver.resolve(&collector.drain()?), &metrics);
                interval.until = collector.drained_window().1;
                forget_ended(&collector, &mut resolver, &mut targets);
                interval.revisit(&mut targets, &mut collector, &metrics, false);
                metrics.update(&collector.counters()?, &resolver.stats());
            }
            _ = upload.tick() => {
                take_changes(&mut collector, &mut resolver, &mut targets);
                interval.add(&mut targets, &resolver.resolve(&collector.drain()?), &metrics);
                interval.until = collector.drained_window().1;
                forget_ended(&collector, &mut resolver, &mut targets);
                interval.send(&backends);
            }
        }
    }

    // The last interval goes out too, then the queue gets until the deadline to drain.
    take_changes(&mut collector, &mut resolver, &mut targets);
    interval.add(
        &mut targets,
        &resolver.resolve(&collector.drain_all()?),
        &metrics,
    );
    interval.until = collector.drained_window().1;
    // Samples still waiting for their pod go out with what is known.
    interval.revisit(&mut targets, &mut collector, &metrics, true);
    interval.send(&backends);
    metrics.update(&collector.counters()?, &resolver.stats());
    let left = backends.shutdown(config.shutdown_timeout).await;
    if left > 0 {
        eprintln!("warn: {left} profiles were not delivered before the shutdown deadline");
    }
    Ok(0)
}

/// Takes in what the kernel said about processes: a new one (or a new image after exec) is
/// read at once and decided, and the kernel stops sampling it when relabeling drops it, or
/// samples it again when an exec made relabeling keep it. A full filter is counted
/// (`filter_updates_failed`) and sampling goes on.
fn take_changes(collector: &mut Collector, resolver: &mut Resolver, targets: &mut Targets) {
    let flips = collector.flips();
    for change in collector.process_changes() {
        resolver.apply(&change, flips);
        let ProcessChange::Started { process, .. } = change else {
            continue;
        };
        let pid = process.tgid;
        let was_dropped = targets.forget(pid) == Some(Decision::Drop);
        // The kernel's announcement names a process gone before /proc could be read.
        let Some(comm) = resolver.comm(&process) else {
            continue;
        };
        match (targets.decide(pid, &comm) == Decision::Drop, was_dropped) {
            (true, false) => {
                let _ = collector.exclude(pid);
            }
            (false, true) => collector.forget(pid),
            _ => {}
        }
    }
}

/// Forgets processes whose last samples have been resolved.
fn forget_ended(collector: &Collector, resolver: &mut Resolver, targets: &mut Targets) {
    for process in resolver.forget_ended(collector.flips()) {
        targets.forget(process.tgid);
    }
}

/// One upload interval's profiles, one per series.
struct Interval {
    profiles: ProfileSet<TargetKey>,
    /// Off-CPU profiles (`--off-cpu`), pushed as the targets' `offcpu` series.
    off_cpu: Option<ProfileSet<TargetKey>>,
    /// When the interval's samples were taken: the windows of its drains, which meet.
    start: SystemTime,
    until: SystemTime,
    frequency: u64,
}

impl Interval {
    fn new(frequency: u64, labels: SampleLabels, start: SystemTime, off_cpu: bool) -> Self {
        Self {
            profiles: ProfileSet::new(frequency, labels),
            off_cpu: off_cpu
                .then(|| ProfileSet::new(frequency, labels).with_values(Values::OffCpu)),
            start,
            until: start,
            frequency,
        }
    }

    /// At most `max` series per interval; what is over goes to `overflow`.
    fn with_max_series(mut self, max: usize, overflow: TargetKey) -> Self {
        self.profiles = self.profiles.with_cap(max, overflow.clone());
        self.off_cpu = self.off_cpu.map(|set| set.with_cap(max, overflow));
        self
    }

    /// Adds `sample` to its kind's profile of `key`; returns the samples that went to the
    /// overflow series instead (off-CPU time is not a number of samples: none).
    fn file(&mut self, key: &TargetKey, sample: &ResolvedSample) -> u64 {
        match (&mut self.off_cpu, sample.off_cpu) {
            (Some(off_cpu), true) => {
                off_cpu.add(key, sample);
                0
            }
            (None, true) => 0,
            (_, false) => match self.profiles.add(key, sample) {
                true => sample.count,
                false => 0,
            },
        }
    }

    /// Files samples under their series; dropped processes' samples go nowhere, undecided
    /// ones wait in `targets`.
    fn add(&mut self, targets: &mut Targets, samples: &[ResolvedSample], metrics: &Metrics) {
        let mut folded = 0;
        targets.file(samples, |key, sample| folded += self.file(key, sample));
        metrics.series_overflow(folded);
        metrics.samples_lost("awaiting_metadata_full", targets.take_held_dropped());
    }

    /// Decides again what may have changed (pods appeared, grace periods ended; every
    /// waiting process when `all`), files the samples that waited, and tells the kernel which
    /// processes to stop or start sampling again (a full filter is counted, and sampling goes
    /// on).
    fn revisit(
        &mut self,
        targets: &mut Targets,
        collector: &mut Collector,
        metrics: &Metrics,
        all: bool,
    ) {
        let mut folded = 0;
        let file = |key: &TargetKey, sample: &ResolvedSample| folded += self.file(key, sample);
        let changes = match all {
            true => targets.decide_all(file),
            false => targets.revisit(file),
        };
        metrics.series_overflow(folded);
        for change in changes {
            if change.exclude {
                let _ = collector.exclude(change.pid);
            } else {
                // Lifts the exclusion.
                collector.forget(change.pid);
            }
        }
    }

    /// Queues one profile per series with every backend and starts the next interval.
    fn send(&mut self, backends: &Backends) {
        let until = self.until;
        let profiles = self.profiles.take(self.start, until);
        let mut targets: Vec<_> = profiles
            .iter()
            .map(|(key, profile)| (std::borrow::Cow::Borrowed(key.labels()), profile))
            .collect();
        let off_cpu = match &mut self.off_cpu {
            Some(set) => set.take(self.start, until),
            None => Vec::new(),
        };
        for (key, profile) in &off_cpu {
            let mut labels = key.labels().clone();
            labels.insert("__name__".into(), OFF_CPU_TYPE.into());
            targets.push((std::borrow::Cow::Owned(labels), profile));
        }
        let targets: Vec<_> = targets
            .iter()
            .map(|(labels, profile)| (labels.as_ref(), *profile))
            .collect();
        backends.send(&targets, self.start, until, self.frequency);
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
