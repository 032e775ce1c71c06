//! The shutdown signal: one handle, cloned to whoever may stop the server or must notice it.
//!
//! `main.rs` triggers it from the `ctrlc` handler; tests trigger it directly. Triggering sets a
//! flag, disconnects a channel (so the broadcaster's `select!` wakes at once), and connects to
//! every registered listener, because a thread blocked in `accept()` wakes for nothing else.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

/// How long `trigger` waits for its wake-up connection to a listener: loopback, so a
/// connect either succeeds at once or the listener is gone.
const WAKE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A cloneable handle that stops the server.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Written once by `trigger`; read by the acceptor after every `accept()` wake-up.
    triggered: AtomicBool,
    /// Taken (dropped) by `trigger`, which disconnects `closed` for every select on it.
    sender: Mutex<Option<Sender<()>>>,
    /// Never carries a message: it becomes ready (disconnected) when shutdown begins.
    closed: Receiver<()>,
    /// Listeners to poke awake; registered by `Server::run`, removed when it returns.
    listeners: Mutex<Vec<SocketAddr>>,
}

impl Default for Shutdown {
    fn default() -> Shutdown {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (sender, closed) = crossbeam_channel::bounded(0);
        Shutdown {
            inner: Arc::new(Inner {
                triggered: AtomicBool::new(false),
                sender: Mutex::new(Some(sender)),
                closed,
                listeners: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Begins shutdown. Safe to call from any thread, any number of times.
    pub fn trigger(&self) {
        if self.inner.triggered.swap(true, Ordering::SeqCst) {
            return;
        }
        drop(self.inner.sender.lock().take());
        let listeners = self.inner.listeners.lock().clone();
        for addr in listeners {
            // The connection is accepted and immediately seen as "shutting down"; its
            // failure only means the listener is already gone.
            let _ = TcpStream::connect_timeout(&wake_address(addr), WAKE_CONNECT_TIMEOUT);
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }

    /// A receiver that becomes ready (disconnected) once shutdown begins, for `select!`.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.inner.closed
    }

    pub(crate) fn register_listener(&self, addr: SocketAddr) {
        self.inner.listeners.lock().push(addr);
    }

    pub(crate) fn unregister_listener(&self, addr: SocketAddr) {
        self.inner.listeners.lock().retain(|a| *a != addr);
    }
}

/// A listener bound to the unspecified address (0.0.0.0) is reachable on loopback.
fn wake_address(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => (Ipv4Addr::LOCALHOST, a.port()).into(),
        SocketAddr::V6(a) if a.ip().is_unspecified() => (Ipv6Addr::LOCALHOST, a.port()).into(),
        other => other,
    }
}
