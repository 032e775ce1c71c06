//! Supervision of the threads the server cannot live without: the broadcaster and, with
//! `--redis`, the Redis link's threads.
//!
//! Connection threads are expendable: one that panics loses its own client, and the others go
//! on. The broadcaster is not: without it the acceptor would go on upgrading clients into rooms
//! where nothing is ever relayed, and a load balancer's health check would keep sending viewers
//! to a server that looks healthy. So each such thread holds a [`Watch`]. If the thread
//! unwinds, the watch reports it: the failure is logged at error, `/healthz` answers `503`,
//! the server drains and shuts down, and `Server::run` returns an error, so the process exits
//! non-zero and a service manager restarts it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::error;
use parking_lot::Mutex;

use crate::shutdown::Shutdown;

/// The server's record of failed threads. Shared as `Arc<Supervisor>` through `Shared` (read by
/// `/healthz`) and by every watched thread (written when one dies); lives as long as the server.
#[derive(Debug)]
pub struct Supervisor {
    /// The first thread that failed; set once, never cleared.
    failure: Mutex<Option<&'static str>>,
    /// The server's draining flag (see `Shared::draining`): set on failure, so upgrades are
    /// refused and `/healthz` turns `503` at once.
    draining: Arc<AtomicBool>,
}

impl Supervisor {
    pub fn new(draining: Arc<AtomicBool>) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            failure: Mutex::new(None),
            draining,
        })
    }

    /// A guard for the calling thread, named `thread` in the log: if the thread unwinds while
    /// holding it, the server fails and shuts down through `shutdown`.
    pub fn watch(self: &Arc<Supervisor>, thread: &'static str, shutdown: Shutdown) -> Watch {
        Watch {
            supervisor: self.clone(),
            thread,
            shutdown,
        }
    }

    /// Records that `thread` died, and begins shutdown.
    pub fn fail(&self, thread: &'static str, shutdown: &Shutdown) {
        {
            let mut failure = self.failure.lock();
            if failure.is_none() {
                *failure = Some(thread);
            }
        }
        self.draining.store(true, Ordering::SeqCst);
        error!("the {thread} thread panicked: the server cannot relay without it; shutting down");
        shutdown.trigger();
    }

    /// The thread whose failure is taking the server down, if any.
    pub fn failure(&self) -> Option<&'static str> {
        *self.failure.lock()
    }
}

/// Held by a supervised thread for its whole life; see [`Supervisor::watch`].
#[derive(Debug)]
pub struct Watch {
    supervisor: Arc<Supervisor>,
    thread: &'static str,
    shutdown: Shutdown,
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Dropped on every exit; only an exit by unwinding is a failure.
        if std::thread::panicking() {
            self.supervisor.fail(self.thread, &self.shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_under_watch_fails_the_server_and_a_clean_exit_does_not() {
        let draining = Arc::new(AtomicBool::new(false));
        let supervisor = Supervisor::new(draining.clone());
        let shutdown = Shutdown::new();

        let watch = supervisor.watch("clean", shutdown.clone());
        std::thread::spawn(move || drop(watch)).join().unwrap();
        assert_eq!(supervisor.failure(), None);
        assert!(!shutdown.is_triggered());

        let watch = supervisor.watch("doomed", shutdown.clone());
        let died = std::thread::spawn(move || {
            let _watch = watch;
            panic!("on purpose");
        })
        .join();
        assert!(died.is_err());
        assert_eq!(supervisor.failure(), Some("doomed"));
        assert!(shutdown.is_triggered());
        assert!(draining.load(Ordering::SeqCst));
    }
}
