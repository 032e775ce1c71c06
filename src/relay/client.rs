//! One connected WebSocket client as every thread sees it: its socket, its outbox, and the
//! clocks the heartbeat and the slow-client policy read.
//!
//! A `Client` lives in an `Arc`, shared by its connection thread (which reads the socket), the
//! hub (which lists it in its room) and, briefly, the broadcaster (which queues frames to it).
//! It dies when the last of those drops it, and with it the file descriptor.

use std::fmt;
use std::net::{Shutdown as Both, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use parking_lot::Mutex;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::{CloseFrame, Frame};
use tungstenite::Bytes;

use crate::relay::outbox::{Flush, Latest, Outbox, Push};
use crate::stats::{Eviction, Stats};
use crate::v1::identity::Identity;

/// The protocol a client negotiated at its upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// No subprotocol: the verbatim relay.
    Plain,
    /// `roomcast.v1`: JSON frames with identity and sequence numbers (PROTOCOL.md).
    V1,
}

/// What an upgrade settled about a client: its protocol and who it is.
#[derive(Debug)]
pub struct Session {
    pub protocol: Protocol,
    pub identity: Arc<Identity>,
}

/// A connected, upgraded client.
pub struct Client {
    pub id: u64,
    pub room: Arc<str>,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    /// Who it is: fixed at the upgrade, carried by every message it sends.
    pub identity: Arc<Identity>,
    /// For a v1 client: set by the broadcaster once its `welcome` is queued. Until then the
    /// broadcaster gives it no room message, since those are already counted in the welcome's
    /// `seq` (see `Broadcaster::welcome`). Always true for a plain client.
    welcomed: AtomicBool,
    /// Read only by the connection thread; written only through `outbox` (see outbox.rs);
    /// shut down by whoever evicts the client, which is what wakes the reader.
    socket: Arc<TcpStream>,
    /// The one path to the socket. Locked by the broadcaster to queue and flush, and by the
    /// connection thread for its protocol replies; never held across anything but the
    /// non-blocking `sendmsg` itself.
    outbox: Mutex<Outbox>,
    /// Byte bound of `outbox`, fixed at start-up.
    outbox_limit: usize,
    /// Set when this client is on the broadcaster's retry list or on its way there (see
    /// `Broadcaster::track_backlog` and `Event::Backlogged`), so it is listed once. Cleared by
    /// the broadcaster when it drops the client from the list.
    pub(crate) is_backlog_tracked: AtomicBool,
    /// This client's index in its room's member list. Written only by the hub, under its write
    /// lock (join, and a `leave` that moves this client into the gap), so `leave` is O(1).
    member_index: AtomicUsize,
    /// Milliseconds since `epoch` when the connection thread last read anything from the
    /// client. Written by the connection thread, read by the broadcaster's heartbeat.
    last_heard_ms: AtomicU64,
    /// Milliseconds since `epoch` of the last ping the broadcaster sent.
    last_ping_ms: AtomicU64,
    /// Set once, by whoever evicts. The connection thread reads it when its `read` fails, to
    /// tell an eviction (nothing more to send) from the peer going away.
    evicted: Mutex<Option<Eviction>>,
    epoch: Instant,
    stats: Arc<Stats>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("room", &self.room)
            .field("peer", &self.peer)
            .finish()
    }
}

impl Client {
    /// A client of `session.protocol`; a v1 client starts unwelcomed.
    pub fn new(
        id: u64,
        room: Arc<str>,
        peer: SocketAddr,
        socket: Arc<TcpStream>,
        outbox_limit: usize,
        stats: Arc<Stats>,
        session: Session,
    ) -> Client {
        let Session { protocol, identity } = session;
        Client {
            id,
            room,
            peer,
            protocol,
            identity,
            welcomed: AtomicBool::new(protocol == Protocol::Plain),
            socket,
            outbox: Mutex::new(Outbox::new()),
            outbox_limit,
            is_backlog_tracked: AtomicBool::new(false),
            member_index: AtomicUsize::new(usize::MAX),
            last_heard_ms: AtomicU64::new(0),
            last_ping_ms: AtomicU64::new(0),
            evicted: Mutex::new(None),
            epoch: Instant::now(),
            stats,
        }
    }

    /// Whether room messages are for this client yet (see `welcomed`).
    pub fn is_welcomed(&self) -> bool {
        self.welcomed.load(Ordering::Acquire)
    }

    /// Its room's state is about to become another (see `Broadcaster::rejoin`): room
    /// messages wait for its next welcome. Only the broadcaster calls this.
    pub(crate) fn mark_unwelcomed(&self) {
        self.welcomed.store(false, Ordering::Release);
    }

    pub(crate) fn mark_welcomed(&self) {
        self.welcomed.store(true, Ordering::Release);
    }

    pub(crate) fn member_index(&self) -> usize {
        self.member_index.load(Ordering::Relaxed)
    }

    pub(crate) fn set_member_index(&self, index: usize) {
        self.member_index.store(index, Ordering::Relaxed);
    }

    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// Queues a frame and reports whether the client now has something to flush.
    ///
    /// `Push::Overflow` leaves the frame unqueued and the client untouched: the caller decides,
    /// usually after a send attempt (see `queue_or_evict`), because a client is slow only if
    /// it failed to take what it was sent, not because one batch queued a lot at once. The
    /// broadcaster calls this under the hub's read lock, so it must stay a memory operation.
    pub fn queue(&self, frame: Bytes) -> Push {
        self.outbox.lock().push(frame, self.outbox_limit)
    }

    /// Queues a frame of which only the newest matters (a `presence` or `reactions` frame), in
    /// the place of the older one if that is still unsent; see `Outbox::push_latest`. Like
    /// `queue`, a memory operation for use under the hub's lock.
    pub fn queue_latest(&self, frame: Bytes, class: Latest) -> Push {
        self.outbox
            .lock()
            .push_latest(frame, class, self.outbox_limit)
    }

    /// `queue_latest`, and if the frame does not fit, a send attempt first and then, if it
    /// still does not fit, eviction (as `queue_or_evict`). Not for use under the hub's lock.
    pub fn queue_latest_or_evict(&self, frame: Bytes, class: Latest) -> Push {
        self.push_or_evict(|| self.queue_latest(frame.clone(), class))
    }

    /// Queues the `101 Switching Protocols` response, the first bytes of every session: no
    /// bound may refuse it (the outbox is empty, and a client whose upgrade was swallowed
    /// would hang).
    pub fn queue_response(&self, response: Bytes) {
        self.outbox.lock().push(response, usize::MAX);
    }

    /// Queues a frame; if it does not fit, first sends what the kernel will take and tries
    /// again, and only then evicts the client as too slow. Not for use under the hub's lock
    /// (it may send, shut a socket down and log).
    pub fn queue_or_evict(&self, frame: Bytes) -> Push {
        self.push_or_evict(|| self.queue(frame.clone()))
    }

    /// The judgement of `queue_or_evict`, whatever the kind of push: try, and on overflow
    /// send what the kernel takes and try again; only then is the client too slow.
    fn push_or_evict(&self, push: impl Fn() -> Push) -> Push {
        let pushed = match push() {
            Push::Overflow => {
                self.flush();
                push()
            }
            pushed => pushed,
        };
        if pushed == Push::Overflow {
            self.evict(Eviction::Slow);
        }
        pushed
    }

    /// Queues a close frame; nothing is sent after it.
    pub fn queue_close(&self, code: CloseCode, reason: &str) {
        let frame = encode(Frame::close(Some(CloseFrame {
            code,
            reason: reason.to_string().into(),
        })));
        self.outbox.lock().push_close(frame);
    }

    /// Removes a client because a moderator asked (`POST /api/rooms/<room>/disconnect`):
    /// close `4003` with the moderator's reason; returns whether this was the first removal.
    ///
    /// Unlike `evict`, the client is well and is told why, so the close frame must get out:
    /// it is queued and flushed here, and only the read side is shut down, which wakes the
    /// connection thread (end-of-file) while the socket can still send. That thread then
    /// lingers for the close to leave, as for any close we start (see `connection::finish`).
    pub fn remove_by_moderator(&self, reason: &str) -> bool {
        if !self.record_eviction(Eviction::Moderated) {
            return false;
        }
        self.queue_close(CloseCode::Library(4003), reason);
        self.flush();
        let _ = self.socket.shutdown(Both::Read);
        true
    }

    /// Sends what the kernel will take now, without blocking.
    ///
    /// A send error means the peer is gone: the socket is shut down so the connection thread
    /// wakes from its `read` and cleans up.
    pub fn flush(&self) -> Flush {
        let mut outbox = self.outbox.lock();
        let before = outbox.queued_bytes();
        let result = outbox.send_to(&*self.socket);
        let sent = before - outbox.queued_bytes();
        if result.is_err() {
            // Nothing queued can reach a peer that is gone: free it now.
            outbox.clear();
        }
        drop(outbox);
        self.stats
            .bytes_sent
            .fetch_add(sent as u64, Ordering::Relaxed);
        result.unwrap_or_else(|err| {
            debug!("client {} send failed: {err}", self.id);
            let _ = self.socket.shutdown(Both::Both);
            Flush::Drained
        })
    }

    /// Whether a close frame has been queued (nothing more will be sent).
    pub fn is_closing(&self) -> bool {
        self.outbox.lock().is_closed()
    }

    /// How long the client has had unsent bytes, if it has any.
    pub fn backlog_age(&self, now: Instant) -> Option<Duration> {
        self.outbox
            .lock()
            .backlog_since()
            .map(|since| now.saturating_duration_since(since))
    }

    pub fn has_backlog(&self) -> bool {
        self.outbox.lock().queued_bytes() > 0
    }

    /// Removes a client that broke a rule it cannot be told about in-band (it is not reading).
    ///
    /// Shutting the socket down is what makes this safe from any thread: the connection
    /// thread, blocked in `read`, wakes with end-of-file and does the real clean-up
    /// (deregistration, thread exit). Only the first removal of a client counts (see
    /// `record_eviction`); a later one does nothing.
    pub fn evict(&self, reason: Eviction) {
        if !self.record_eviction(reason) {
            return;
        }
        self.outbox.lock().clear();
        abort_on_close(&self.socket);
        let _ = self.socket.shutdown(Both::Both);
    }

    /// Makes the socket's final close a reset (see `abort_on_close`).
    pub(crate) fn abort_on_close(&self) {
        abort_on_close(&self.socket);
    }

    /// Records that the server removes this client, counting and logging it, unless a removal
    /// was already recorded; returns whether this one was the first.
    ///
    /// Every path that removes a client against its will comes through here: `evict` (slow,
    /// from the broadcaster or a connection thread) and the connection thread's own closes
    /// (rate, size, idle). A client can trip two of them at once, say its rate on its own
    /// thread while the broadcaster finds its outbox full; it is still one removal, counted
    /// once, logged once, under the first reason.
    pub fn record_eviction(&self, reason: Eviction) -> bool {
        {
            let mut evicted = self.evicted.lock();
            if evicted.is_some() {
                return false;
            }
            *evicted = Some(reason);
        }
        self.stats.count_eviction(reason);
        warn!(
            "removed client {} ({}) from room {}: {}",
            self.id, self.peer, self.room, reason
        );
        true
    }

    pub fn eviction(&self) -> Option<Eviction> {
        *self.evicted.lock()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Called by the connection thread whenever bytes arrive from the client.
    pub fn mark_heard(&self) {
        self.last_heard_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// True when the client has been quiet, and unpinged, for at least `interval`; records
    /// the ping as sent. Only the broadcaster calls this.
    pub fn is_due_for_ping(&self, interval: Duration) -> bool {
        let now = self.now_ms();
        let interval = interval.as_millis() as u64;
        let quiet = now.saturating_sub(self.last_heard_ms.load(Ordering::Relaxed)) >= interval;
        let unpinged = now.saturating_sub(self.last_ping_ms.load(Ordering::Relaxed)) >= interval;
        if quiet && unpinged {
            self.last_ping_ms.store(now, Ordering::Relaxed);
        }
        quiet && unpinged
    }
}

/// Makes the socket's final `close` reset the connection (`SO_LINGER` of zero).
///
/// An evicted client stopped reading, so its kernel send buffer is full (up to `tcp_wmem`'s
/// maximum, 4 MiB here) and its window is zero: a FIN would wait behind that data forever, and
/// the closed socket would live on as an orphan holding the buffer for minutes. A reset frees
/// it at once, and tells the client at once that it was dropped.
fn abort_on_close(socket: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized, initialised option value.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Encodes a server frame. Server frames are unmasked (RFC 6455 §5.1), so the same bytes serve
/// every receiver: this is what lets the broadcaster encode a room message exactly once.
pub fn encode(frame: Frame) -> Bytes {
    let mut buf = Vec::with_capacity(frame.len());
    frame
        .format(&mut buf)
        .expect("writing into a Vec cannot fail");
    Bytes::from(buf)
}

/// Encodes a text frame the server writes itself (a v1 `welcome`, `error`, `presence` or
/// `reactions` frame).
pub fn encode_text(text: String) -> Bytes {
    encode(Frame::message(
        text,
        tungstenite::protocol::frame::coding::OpCode::Data(
            tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    ))
}

#[cfg(test)]
impl Client {
    /// For unit tests: a client on the server end of a fresh loopback connection, and the
    /// peer's end, which the test keeps open (and may leave unread, to fill the socket).
    pub(crate) fn on_loopback(
        id: u64,
        room: &str,
        outbox_limit: usize,
        stats: Arc<Stats>,
    ) -> (Client, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer_side = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, peer) = listener.accept().unwrap();
        let identity = Arc::new(Identity::anonymous(id, None));
        let client = Client::new(
            id,
            room.into(),
            peer,
            Arc::new(socket),
            outbox_limit,
            stats,
            Session {
                protocol: Protocol::Plain,
                identity,
            },
        );
        (client, peer_side)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_client() -> (Client, Arc<Stats>, TcpStream) {
        let stats = Arc::new(Stats::default());
        let (client, peer_side) = Client::on_loopback(7, "r", 1024, stats.clone());
        (client, stats, peer_side)
    }

    fn total(stats: &Stats) -> u64 {
        Eviction::ALL.iter().map(|r| stats.evictions(*r)).sum()
    }

    /// A client that trips two rules at once (its rate on its own thread, a full outbox in the
    /// broadcaster) is one removal: counted once, under the first reason.
    #[test]
    fn an_eviction_is_counted_once_whatever_the_mix_of_paths() {
        let (client, stats, _peer) = new_client();
        assert!(client.record_eviction(Eviction::Rate));
        client.evict(Eviction::Slow);
        assert!(!client.record_eviction(Eviction::Idle));
        assert_eq!(total(&stats), 1);
        assert_eq!(stats.evictions(Eviction::Rate), 1);
        assert_eq!(client.eviction(), Some(Eviction::Rate));

        let (client, stats, _peer) = new_client();
        client.evict(Eviction::Slow);
        client.evict(Eviction::Slow);
        assert!(!client.record_eviction(Eviction::Size));
        assert_eq!(total(&stats), 1);
        assert_eq!(stats.evictions(Eviction::Slow), 1);
    }

    /// The bound is judged after a send attempt: a frame that does not fit beside unsent
    /// bytes the peer can take now is queued, not a reason to evict.
    #[test]
    fn a_full_outbox_is_flushed_before_the_client_is_judged() {
        let (client, stats, _peer) = new_client();
        assert_eq!(
            client.queue(Bytes::from(vec![1; 900])),
            Push::Queued { was_empty: true }
        );
        // 900 + 100 (+ their charge per entry) > 1024, but the kernel takes the first 900
        // bytes at once.
        assert_eq!(client.queue(Bytes::from(vec![2; 100])), Push::Overflow);
        assert_eq!(
            client.queue_or_evict(Bytes::from(vec![2; 100])),
            Push::Queued { was_empty: true }
        );
        assert_eq!(total(&stats), 0);
    }
}
