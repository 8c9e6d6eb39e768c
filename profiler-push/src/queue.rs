//! The delivery queue every backend uses: bounded in bytes, oldest dropped first, up to
//! `max_in_flight` requests sent at once, each retried with capped exponential backoff and
//! full jitter until it is delivered, refused, or (for failures that may be the payload's own
//! fault) its retry cap runs out.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use crate::{PushObserver, PushOutcome};

/// What the queue needs to know of a request.
pub(crate) trait Payload: Send + Sync + 'static {
    /// Bytes counted against the queue's bound.
    fn bytes(&self) -> usize;
    /// Profiles lost when the request is dropped.
    fn profiles(&self) -> usize;
}

/// What one attempt came to, with a reason for failures.
pub(crate) enum Attempt {
    Delivered,
    /// Delivered, but the backend says it threw `rejected` of the profiles away.
    Partial {
        rejected: usize,
        why: String,
    },
    /// May pass with time (backend down, overloaded, timing out): retried without limit.
    Retry(String),
    /// May pass, or may be the payload's own fault (gRPC `Unknown`/`Internal`, which is what
    /// a proxy's 413 or 400 becomes): retried up to the cap, then dropped.
    Suspect(String),
    /// Will be refused again: dropped at once.
    Rejected(String),
}

/// Sends one request to one backend.
pub(crate) trait Transport<P>: Send + Sync + 'static {
    fn send(&self, payload: &P) -> impl Future<Output = Attempt> + Send;
}

/// How the queue behaves; the same for every backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) queue_bytes: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    /// Retries of a [`Attempt::Suspect`] failure before the request is dropped.
    pub(crate) suspect_retries: u32,
}

struct Entry<P> {
    payload: P,
    /// Set once the entry has left the queue (delivered, refused or dropped); a sender still
    /// retrying it stops.
    gone: AtomicBool,
}

struct State<P> {
    queue: VecDeque<Arc<Entry<P>>>,
    /// Entries of `queue` a sender holds, always a prefix of `queue`'s untaken order.
    taken: Vec<Arc<Entry<P>>>,
    bytes: usize,
    closed: bool,
}

struct Shared<P> {
    state: Mutex<State<P>>,
    wake: Notify,
    observer: Arc<dyn PushObserver>,
    limits: Limits,
    /// The backend's name in log lines.
    backend: &'static str,
    /// Whether the last attempt failed, so an outage is logged once, not once per attempt.
    failing: AtomicBool,
}

impl<P: Payload> Shared<P> {
    fn lock(&self) -> MutexGuard<'_, State<P>> {
        // A panic elsewhere must not take the sampling path down with it: the queue is
        // consistent after every individual operation, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `entry` out of the queue unless it already left (dropped to make room while it
    /// was being sent).
    fn remove(&self, entry: &Arc<Entry<P>>) {
        let mut state = self.lock();
        if entry.gone.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(at) = state.queue.iter().position(|e| Arc::ptr_eq(e, entry)) {
            state.queue.remove(at);
            state.bytes -= entry.payload.bytes();
            self.observer.queue_bytes(state.bytes);
        }
    }

    fn recovered(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            eprintln!("info: {} push recovered", self.backend);
        }
    }
}

/// A running queue with its delivery task.
pub(crate) struct Queue<P> {
    shared: Arc<Shared<P>>,
    worker: Option<JoinHandle<()>>,
}

impl<P: Payload> Queue<P> {
    /// Spawns the delivery task on the current runtime (the caller checked there is one).
    pub(crate) fn start<T: Transport<P>>(
        transport: T,
        limits: Limits,
        observer: Arc<dyn PushObserver>,
        backend: &'static str,
    ) -> Queue<P> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                taken: Vec::new(),
                bytes: 0,
                closed: false,
            }),
            wake: Notify::new(),
            observer,
            limits,
            backend,
            failing: AtomicBool::new(false),
        });
        let worker = tokio::spawn(deliver(shared.clone(), Arc::new(transport)));
        Queue {
            shared,
            worker: Some(worker),
        }
    }

    /// Queues `payloads` in order. Never blocks: when the queue would exceed its bound the
    /// oldest requests are dropped (and counted) to make room; a request larger than the
    /// whole bound, or one queued after shutdown began, is dropped itself.
    pub(crate) fn enqueue(&self, payloads: impl IntoIterator<Item = P>) {
        let shared = &self.shared;
        let limit = shared.limits.queue_bytes;
        let mut dropped = 0;
        {
            let mut state = shared.lock();
            for payload in payloads {
                let size = payload.bytes();
                if size > limit || state.closed {
                    dropped += payload.profiles();
                    continue;
                }
                while state.bytes + size > limit {
                    let Some(oldest) = state.queue.pop_front() else {
                        break;
                    };
                    oldest.gone.store(true, Ordering::Relaxed);
                    state.bytes -= oldest.payload.bytes();
                    dropped += oldest.payload.profiles();
                }
                state.queue.push_back(Arc::new(Entry {
                    payload,
                    gone: AtomicBool::new(false),
                }));
                state.bytes += size;
            }
            shared.observer.queue_bytes(state.bytes);
        }
        if dropped > 0 {
            shared.observer.dropped(dropped);
        }
        shared.wake.notify_one();
    }

    /// Stops accepting requests and keeps delivering until the queue is empty or `deadline`
    /// has passed. Returns the number of profiles left undelivered, also reported as dropped.
    pub(crate) async fn shutdown(mut self, deadline: Duration) -> usize {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(mut worker) = self.worker.take() {
            if tokio::time::timeout(deadline, &mut worker).await.is_err() {
                // Aborting the worker drops its JoinSet, which aborts the senders.
                worker.abort();
                let _ = worker.await;
            }
        }
        let left = {
            let mut state = self.shared.lock();
            let left: usize = state.queue.iter().map(|e| e.payload.profiles()).sum();
            state.queue.clear();
            state.taken.clear();
            if state.bytes != 0 {
                state.bytes = 0;
                self.shared.observer.queue_bytes(0);
            }
            left
        };
        if left > 0 {
            self.shared.observer.dropped(left);
        }
        left
    }
}

impl<P> Drop for Queue<P> {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.abort();
        }
    }
}

/// Starts a sender for the oldest request no sender holds whenever fewer than
/// `max_in_flight` run; returns once the queue is closed and empty.
async fn deliver<P: Payload, T: Transport<P>>(shared: Arc<Shared<P>>, transport: Arc<T>) {
    let mut senders = JoinSet::new();
    loop {
        let next = {
            let mut state = shared.lock();
            state.taken.retain(|e| !e.gone.load(Ordering::Relaxed));
            let next = if senders.len() < shared.limits.max_in_flight {
                state
                    .queue
                    .iter()
                    .find(|e| !state.taken.iter().any(|t| Arc::ptr_eq(t, e)))
                    .cloned()
            } else {
                None
            };
            if let Some(entry) = &next {
                state.taken.push(entry.clone());
            } else if state.closed && state.queue.is_empty() && senders.is_empty() {
                return;
            }
            next
        };
        match next {
            Some(entry) => {
                senders.spawn(send(shared.clone(), transport.clone(), entry));
            }
            // `notify_one` stores a permit when nobody waits, so a request queued between the
            // check above and this await still wakes us.
            None if senders.is_empty() => shared.wake.notified().await,
            None => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = senders.join_next() => {}
                }
            }
        }
    }
}

/// Delivers one request: retries until it is delivered, refused, out of suspect retries, or
/// dropped from the queue to make room.
async fn send<P: Payload, T: Transport<P>>(
    shared: Arc<Shared<P>>,
    transport: Arc<T>,
    entry: Arc<Entry<P>>,
) {
    let limits = shared.limits;
    let observer = &shared.observer;
    let mut backoff = limits.initial_backoff;
    let mut suspect = 0;
    while !entry.gone.load(Ordering::Relaxed) {
        let started = Instant::now();
        let attempt = transport.send(&entry.payload).await;
        let elapsed = started.elapsed();
        let why = match attempt {
            Attempt::Delivered => {
                observer.pushed(PushOutcome::Delivered, elapsed);
                observer.delivered(entry.payload.profiles());
                shared.remove(&entry);
                shared.recovered();
                return;
            }
            Attempt::Partial { rejected, why } => {
                observer.pushed(PushOutcome::Delivered, elapsed);
                observer.delivered(entry.payload.profiles().saturating_sub(rejected));
                shared.remove(&entry);
                shared.recovered();
                eprintln!(
                    "warn: {} accepted a request but dropped {rejected} profiles: {why}",
                    shared.backend
                );
                observer.dropped(rejected);
                return;
            }
            Attempt::Rejected(why) => {
                observer.pushed(PushOutcome::Rejected, elapsed);
                eprintln!("warn: {} rejected a request: {why}", shared.backend);
                shared.remove(&entry);
                observer.dropped(entry.payload.profiles());
                return;
            }
            Attempt::Suspect(why) if suspect >= limits.suspect_retries => {
                observer.pushed(PushOutcome::GaveUp, elapsed);
                eprintln!(
                    "warn: {} failed a request {} times, dropping its {} profiles: {why}",
                    shared.backend,
                    suspect + 1,
                    entry.payload.profiles()
                );
                shared.remove(&entry);
                observer.dropped(entry.payload.profiles());
                return;
            }
            Attempt::Suspect(why) => {
                suspect += 1;
                why
            }
            Attempt::Retry(why) => why,
        };
        observer.pushed(PushOutcome::Retrying, elapsed);
        if !shared.failing.swap(true, Ordering::Relaxed) {
            // One line per outage, not one per attempt.
            eprintln!("warn: {} push failed, retrying: {why}", shared.backend);
        }
        tokio::time::sleep(full_jitter(backoff)).await;
        backoff = (backoff * 2).min(limits.max_backoff);
    }
}

/// A uniformly random wait in `[0, cap]` ("full jitter"), so many profilers retrying after
/// the same outage do not come back in lockstep.
pub(crate) fn full_jitter(cap: Duration) -> Duration {
    let cap = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=cap))
}
