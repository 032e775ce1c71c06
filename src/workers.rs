//! The connection threads: one per connection while it lasts, kept a little while afterwards
//! so the next connection can have it.
//!
//! Creating and ending a thread (`clone3`, stack mappings, `exit`) cost about a quarter of the
//! server's CPU in the churn benchmark, where clients connect and leave thousands of times a
//! second. So a thread that has finished its connection waits up to `IDLE_TIMEOUT` for
//! another, and the acceptor hands a new connection to a waiting thread before it spawns one.
//! Each connection still has a thread to itself for its whole life; at most
//! `MAX_IDLE_WORKERS` threads wait at once, and the total never exceeds the peak number of
//! connections, because a thread is only spawned when none is waiting.
//!
//! The hand-over is a zero-capacity channel: `try_send` succeeds only when some thread is
//! blocked in `recv` at that moment, which is exactly "an idle thread exists".

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::error;

use crate::stats::Stats;

/// Stack size of a connection thread. The default 2 MiB would reserve 30 GiB of address
/// space for 15,000 clients and touch more than needed. Measured with tungstenite 0.30: the
/// handshake and read loop peak near 13 KB, and a panic with `RUST_BACKTRACE=1` needs about
/// 27 KB, so 16–24 KiB would abort the process on a panic; 64 KiB is safe and costs no more
/// resident memory than 32 KiB, since only touched pages are resident.
pub const CONNECTION_STACK_BYTES: usize = 64 * 1024;
/// Most threads waiting for a connection at once. Enough to absorb a burst of reconnects
/// without spawning; each costs its touched stack pages (about 10 KiB) while it waits.
const MAX_IDLE_WORKERS: usize = 64;
/// How long a thread waits for another connection before it ends.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection's work: serve it, then release its slot.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// The acceptor's handle on every connection thread.
pub(crate) struct Workers {
    /// Dropped at shutdown, which wakes every waiting thread to end.
    jobs: Option<Sender<Job>>,
    waiting: Receiver<Job>,
    threads: HashMap<u64, JoinHandle<()>>,
    ended: (Sender<u64>, Receiver<u64>),
    next_id: u64,
    stats: Arc<Stats>,
}

impl Workers {
    pub fn new(stats: Arc<Stats>) -> Workers {
        let (jobs, waiting) = crossbeam_channel::bounded(0);
        Workers {
            jobs: Some(jobs),
            waiting,
            threads: HashMap::new(),
            ended: crossbeam_channel::unbounded(),
            next_id: 1,
            stats,
        }
    }

    /// Runs `job` on a waiting thread, or on a new one. Fails only when the OS refuses a new
    /// thread; the job has then been dropped without running.
    pub fn run(&mut self, job: Job) -> io::Result<()> {
        self.join_ended();
        let job = match self.jobs.as_ref().map(|jobs| jobs.try_send(job)) {
            Some(Ok(())) => return Ok(()),
            Some(Err(TrySendError::Full(job) | TrySendError::Disconnected(job))) => job,
            None => return Err(io::Error::other("shutting down")),
        };
        let id = self.next_id;
        self.next_id += 1;
        let waiting = self.waiting.clone();
        let stats = self.stats.clone();
        let ended = EndNotice {
            id,
            ended: self.ended.0.clone(),
        };
        let thread = thread::Builder::new()
            .name(format!("worker-{id}"))
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || work(job, &waiting, &stats, ended))?;
        self.threads.insert(id, thread);
        Ok(())
    }

    /// Joins the threads that have ended (idle too long, or one too many waiting).
    fn join_ended(&mut self) {
        for id in self.ended.1.try_iter() {
            if let Some(thread) = self.threads.remove(&id) {
                if thread.join().is_err() {
                    error!("a connection thread panicked");
                }
            }
        }
    }

    /// Shutdown: wakes every waiting thread to end, waits for the busy ones to finish their
    /// connections (the caller has cut their sockets), and joins them all.
    pub fn join_all(mut self) -> usize {
        drop(self.jobs.take());
        let mut panicked = 0;
        for (_, thread) in self.threads.drain() {
            panicked += usize::from(thread.join().is_err());
        }
        panicked
    }
}

/// A connection thread's life: its first job, then whatever the acceptor hands it while it
/// waits, until it has waited `IDLE_TIMEOUT` or enough others are already waiting.
fn work(first: Job, waiting: &Receiver<Job>, stats: &Stats, _ended: EndNotice) {
    let mut job = first;
    loop {
        job();
        if stats.idle_workers.fetch_add(1, Ordering::SeqCst) >= MAX_IDLE_WORKERS {
            stats.idle_workers.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let next = waiting.recv_timeout(IDLE_TIMEOUT);
        stats.idle_workers.fetch_sub(1, Ordering::SeqCst);
        match next {
            Ok(next) => job = next,
            // Idle too long, or shutdown.
            Err(_) => return,
        }
    }
}

/// Tells the acceptor a thread has ended, so it can be joined. Sent from `drop`, so a thread
/// that panicked is joined too.
struct EndNotice {
    id: u64,
    ended: Sender<u64>,
}

impl Drop for EndNotice {
    fn drop(&mut self) {
        let _ = self.ended.send(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn wait_for(mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "condition not met within 10 s");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_finished_thread_serves_the_next_connection() {
        let stats = Arc::new(Stats::default());
        let mut workers = Workers::new(stats.clone());
        let (done, finished) = crossbeam_channel::unbounded();
        for i in 0..50 {
            let done = done.clone();
            workers
                .run(Box::new(move || done.send(i).unwrap()))
                .unwrap();
            assert_eq!(finished.recv().unwrap(), i);
            // Wait until the thread is back in `recv`, so the next job finds it.
            wait_for(|| stats.idle_workers.load(Ordering::SeqCst) == 1);
        }
        assert_eq!(workers.threads.len(), 1, "one thread served all 50 in turn");
        assert_eq!(workers.join_all(), 0);
        assert_eq!(stats.idle_workers.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn busy_threads_are_never_shared_and_idle_ones_end_at_shutdown() {
        let stats = Arc::new(Stats::default());
        let mut workers = Workers::new(stats.clone());
        let (release, gate) = crossbeam_channel::unbounded::<()>();
        for _ in 0..5 {
            let gate = gate.clone();
            workers.run(Box::new(move || gate.recv().unwrap())).unwrap();
        }
        assert_eq!(
            workers.threads.len(),
            5,
            "each busy connection has its own thread"
        );
        for _ in 0..5 {
            release.send(()).unwrap();
        }
        wait_for(|| stats.idle_workers.load(Ordering::SeqCst) == 5);
        let started = Instant::now();
        assert_eq!(workers.join_all(), 0);
        assert!(
            started.elapsed() < IDLE_TIMEOUT,
            "waiting threads end at once"
        );
    }

    #[test]
    fn a_panicking_connection_ends_its_thread_and_is_joined() {
        let stats = Arc::new(Stats::default());
        let mut workers = Workers::new(stats.clone());
        workers
            .run(Box::new(|| panic!("test panic in a connection")))
            .unwrap();
        assert_eq!(workers.join_all(), 1);
        assert_eq!(stats.idle_workers.load(Ordering::SeqCst), 0);
    }
}
