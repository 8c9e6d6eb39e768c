//! Parsing one binary with a deadline. The parse runs on a thread of its own while the caller
//! waits at most the deadline; a parse still running then is abandoned (its thread keeps going
//! at the lowest priority until it ends, and its result is dropped) and the caller marks the
//! binary bad. A panic in the parse is caught on that thread. A thread cannot be stopped from
//! outside in Rust, so a parse that never ends costs one idle-priority thread, not the agent.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    time::Duration,
};

/// The default deadline (`--parse-timeout`): the largest binaries here (a 140 MB Rust binary
/// with DWARF) symbolize in well under a second.
pub const DEFAULT: Duration = Duration::from_secs(5);

/// Abandoned parses still running at most: past it callers put parses off ([`saturated`]),
/// and [`run`] refuses them (reported as timed out), so that inputs that never finish cannot
/// pile up threads.
pub const MAX_ABANDONED: usize = 4;

/// Abandoned parses still running.
static ABANDONED: AtomicUsize = AtomicUsize::new(0);

/// Abandoned parses still running now.
pub fn abandoned() -> usize {
    ABANDONED.load(Ordering::Relaxed)
}

/// Whether [`MAX_ABANDONED`] abandoned parses are still running: callers put parses off
/// (and try again later) rather than have them refused.
pub fn saturated() -> bool {
    abandoned() >= MAX_ABANDONED
}

/// How a parse ended.
#[derive(Debug)]
pub enum Outcome<T> {
    Done(T),
    Panicked,
    /// Still running at the deadline: abandoned. Also, without running it, when
    /// [`MAX_ABANDONED`] abandoned parses are still running.
    TimedOut,
}

/// Runs `parse` on a thread of its own and waits for it at most `deadline`. When no thread can
/// be started (a task limit), it runs here, without a deadline.
pub fn run<T: Send + 'static>(
    deadline: Duration,
    parse: impl FnOnce() -> T + Send + 'static,
) -> Outcome<T> {
    run_counted(&ABANDONED, deadline, parse)
}

/// [`run`], with the abandoned parses still running counted in `abandoned`.
fn run_counted<T: Send + 'static>(
    abandoned: &'static AtomicUsize,
    deadline: Duration,
    parse: impl FnOnce() -> T + Send + 'static,
) -> Outcome<T> {
    if abandoned.load(Ordering::Relaxed) >= MAX_ABANDONED {
        return Outcome::TimedOut;
    }
    let (tid_tx, tid_rx) = mpsc::sync_channel(1);
    let (done_tx, done_rx) = mpsc::sync_channel(1);
    let given_up = Arc::new(AtomicBool::new(false));
    let ours = given_up.clone();
    // Shared, so that the parse can still run here if the thread does not start.
    let work = Arc::new(std::sync::Mutex::new(Some(parse)));
    let theirs = work.clone();
    let spawned = std::thread::Builder::new()
        .name("parse".into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let parse = theirs.lock().ok().and_then(|mut work| work.take());
            if let Some(parse) = parse {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse));
                let _ = done_tx.send(result);
            }
            // Whoever sets the flag second counts: the waiter gave up after this ended, or
            // this ended after the waiter gave up.
            if ours.swap(true, Ordering::AcqRel) {
                abandoned.fetch_sub(1, Ordering::Relaxed);
            }
        });
    if spawned.is_err() {
        let parse = work.lock().ok().and_then(|mut work| work.take());
        return match parse
            .map(|parse| std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)))
        {
            Some(Ok(value)) => Outcome::Done(value),
            _ => Outcome::Panicked,
        };
    }
    match done_rx.recv_timeout(deadline) {
        Ok(Ok(value)) => Outcome::Done(value),
        Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => Outcome::Panicked,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            if !given_up.swap(true, Ordering::AcqRel) {
                abandoned.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(tid) = tid_rx.try_recv() {
                // SAFETY: setpriority on a thread of ours; failing leaves it as it was.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
            }
            Outcome::TimedOut
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
        time::{Duration, Instant},
    };

    use super::{run, run_counted, Outcome, MAX_ABANDONED};

    #[test]
    fn a_parse_past_its_deadline_is_abandoned_and_a_panic_is_caught() {
        assert!(matches!(
            run(Duration::from_secs(5), || 7),
            Outcome::Done(7)
        ));
        let started = Instant::now();
        let late = run(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(300));
            1
        });
        assert!(matches!(late, Outcome::TimedOut), "{late:?}");
        assert!(started.elapsed() < Duration::from_millis(250));
        let panicked = run(Duration::from_secs(5), || -> u32 { panic!("a parser bug") });
        assert!(matches!(panicked, Outcome::Panicked), "{panicked:?}");
    }

    #[test]
    fn abandoned_parses_still_running_stop_new_ones_until_they_end() {
        static ABANDONED: AtomicUsize = AtomicUsize::new(0);
        let sleep = || std::thread::sleep(Duration::from_millis(500));
        for _ in 0..MAX_ABANDONED {
            let late = run_counted(&ABANDONED, Duration::from_millis(10), sleep);
            assert!(matches!(late, Outcome::TimedOut));
        }
        assert_eq!(ABANDONED.load(Ordering::Relaxed), MAX_ABANDONED);
        static RAN: AtomicBool = AtomicBool::new(false);
        let refused = run_counted(&ABANDONED, Duration::from_secs(5), || {
            RAN.store(true, Ordering::Relaxed)
        });
        assert!(matches!(refused, Outcome::TimedOut));
        assert!(
            !RAN.load(Ordering::Relaxed),
            "a parse started past the limit"
        );
        // As they end, parses run again.
        let until = Instant::now() + Duration::from_secs(10);
        while ABANDONED.load(Ordering::Relaxed) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(ABANDONED.load(Ordering::Relaxed), 0);
        let again = run_counted(&ABANDONED, Duration::from_secs(5), || 7);
        assert!(matches!(again, Outcome::Done(7)));
    }
}
