//! The connection threads: one per connection while it lasts, kept a little while afterwards
//! so the next connection can have it.
//!
//! Creating and ending a thread (`clone3`, stack mappings, `exit`) cost about a quarter of the
//! server's CPU in the churn benchmark, where clients connect and leave thousands of times a
//! second. So a thread that has finished its connection parks for up to `IDLE_TIMEOUT`,
//! waiting for another, and the acceptor hands a new connection to a parked thread before it
//! spawns one. Each connection still has a thread to itself for its whole life; at most
//! `MAX_IDLE_WORKERS` threads wait at once, and the total never exceeds the peak number of
//! connections, because a thread is only spawned when none is waiting.
//!
//! The waiting threads form a stack: the acceptor wakes the one that parked last, whose stack
//! and data are most likely still in the CPU's caches, and the others time out and end when
//! connections are fewer than they were. (A zero-capacity crossbeam channel did the same job,
//! but its spinning before it parks cost about 9% of the core in that benchmark.)

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::error;
use parking_lot::Mutex;

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

/// A parked thread, and the job the acceptor leaves it before unparking it.
struct Parked {
    thread: Thread,
    job: Mutex<Option<Job>>,
}

/// The threads waiting for a connection, shared by the acceptor and the threads themselves.
#[derive(Default)]
struct Waiting {
    /// Most recently parked last.
    parked: Vec<Arc<Parked>>,
    /// Set at shutdown: no thread parks any more, and parked ones end.
    closed: bool,
}

/// The acceptor's handle on every connection thread.
pub(crate) struct Workers {
    waiting: Arc<Mutex<Waiting>>,
    threads: HashMap<u64, JoinHandle<()>>,
    ended: (Sender<u64>, crossbeam_channel::Receiver<u64>),
    next_id: u64,
    stats: Arc<Stats>,
    idle_timeout: Duration,
}

impl Workers {
    pub fn new(stats: Arc<Stats>) -> Workers {
        Workers {
            waiting: Arc::default(),
            threads: HashMap::new(),
            ended: crossbeam_channel::unbounded(),
            next_id: 1,
            stats,
            idle_timeout: IDLE_TIMEOUT,
        }
    }

    /// Runs `job` on a waiting thread, or on a new one. Fails only when the OS refuses a new
    /// thread; the job has then been dropped without running.
    pub fn run(&mut self, job: Job) -> io::Result<()> {
        self.join_ended();
        let parked = self.waiting.lock().parked.pop();
        if let Some(parked) = parked {
            *parked.job.lock() = Some(job);
            parked.thread.unpark();
            return Ok(());
        }
        let id = self.next_id;
        self.next_id += 1;
        let waiting = self.waiting.clone();
        let stats = self.stats.clone();
        let idle_timeout = self.idle_timeout;
        let ended = EndNotice {
            id,
            ended: self.ended.0.clone(),
        };
        let thread = thread::Builder::new()
            .name(format!("worker-{id}"))
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || work(job, &waiting, &stats, idle_timeout, ended))?;
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
    pub fn join_all(self) -> usize {
        let parked = {
            let mut waiting = self.waiting.lock();
            waiting.closed = true;
            std::mem::take(&mut waiting.parked)
        };
        for parked in parked {
            parked.thread.unpark();
        }
        let mut panicked = 0;
        for (_, thread) in self.threads {
            panicked += usize::from(thread.join().is_err());
        }
        panicked
    }
}

/// A connection thread's life: its first job, then whatever the acceptor hands it while it
/// waits, until it has waited `IDLE_TIMEOUT` or enough others are already waiting.
fn work(
    first: Job,
    waiting: &Mutex<Waiting>,
    stats: &Stats,
    idle_timeout: Duration,
    _ended: EndNotice,
) {
    let mut job = first;
    loop {
        job();
        let me = Arc::new(Parked {
            thread: thread::current(),
            job: Mutex::new(None),
        });
        {
            let mut waiting = waiting.lock();
            if waiting.closed || waiting.parked.len() >= MAX_IDLE_WORKERS {
                return;
            }
            waiting.parked.push(me.clone());
        }
        stats.idle_workers.fetch_add(1, Ordering::SeqCst);
        let next = wait_for_job(&me, waiting, idle_timeout);
        stats.idle_workers.fetch_sub(1, Ordering::SeqCst);
        match next {
            Some(next) => job = next,
            None => return,
        }
    }
}

/// Parks until the acceptor leaves a job, the wait times out, or shutdown. (`park` may also
/// return spuriously, hence the loop.)
fn wait_for_job(me: &Arc<Parked>, waiting: &Mutex<Waiting>, timeout: Duration) -> Option<Job> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(job) = me.job.lock().take() {
            return Some(job);
        }
        let now = Instant::now();
        let mut waiting = waiting.lock();
        if now >= deadline || waiting.closed {
            match waiting.parked.iter().position(|p| Arc::ptr_eq(p, me)) {
                // Still listed, so nobody is handing us a job: leave.
                Some(index) => {
                    waiting.parked.remove(index);
                    return None;
                }
                // Taken off the list by shutdown, or by a hand-over just before it.
                None if waiting.closed => return me.job.lock().take(),
                // The acceptor took us off the list: its job is on its way.
                None => {}
            }
        }
        drop(waiting);
        thread::park_timeout(
            deadline
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        );
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

    /// Threads time out while the acceptor hands over jobs: every job runs exactly once, and
    /// every thread that timed out is joined.
    #[test]
    fn hand_overs_racing_idle_timeouts_lose_no_job() {
        let stats = Arc::new(Stats::default());
        let mut workers = Workers::new(stats.clone());
        workers.idle_timeout = Duration::from_millis(2);
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for i in 0..2000u64 {
            let ran = ran.clone();
            workers
                .run(Box::new(move || {
                    ran.fetch_add(1, Ordering::SeqCst);
                }))
                .unwrap();
            if i % 7 == 0 {
                // Now and then, long enough for waiting threads to time out.
                thread::sleep(Duration::from_micros(i % 3000));
            }
        }
        assert_eq!(workers.join_all(), 0);
        assert_eq!(ran.load(Ordering::SeqCst), 2000);
        assert_eq!(stats.idle_workers.load(Ordering::SeqCst), 0);
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
