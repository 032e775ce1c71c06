//! The broadcaster: the one thread that turns received messages into frames for rooms.
//!
//! It drains the event channel a batch at a time, encodes each message once, gathers a batch's
//! messages for a room into one shared chunk, queues that chunk in every member's outbox, and
//! flushes each touched client once per batch with a non-blocking send.
//! Because it is the only thread that orders messages, every member of a room sees that room's
//! messages in the same order. Because it never blocks on a socket, one stalled client cannot
//! delay anyone: its bytes wait in its outbox, retried on a short tick, until it drains, grows
//! past its bound, or stays backlogged past `--slow-timeout` and is evicted.
//!
//! Its tick also drives the heartbeat (pinging quiet clients) and, at shutdown, the
//! `1001 going away` closes and the grace period.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use log::{debug, info};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Bytes;

use crate::client::{encode, Client};
use crate::config::Config;
use crate::hub::Hub;
use crate::outbox::{Flush, Push};
use crate::shutdown::Shutdown;
use crate::stats::{Eviction, Stats};

/// Bound of the event channel. When connection threads produce faster than the broadcaster
/// relays, they block on `send`, which is the backpressure we want; the bound only sizes the
/// shock absorber (a few milliseconds of peak traffic).
pub const EVENT_QUEUE_CAPACITY: usize = 4096;
/// Events handled before the touched clients are flushed. Larger batches mean fewer syscalls
/// per frame under load; the bound keeps latency and the dirty list in check.
pub(crate) const MAX_BATCH: usize = 1024;
/// Upper bound of a room's chunk of gathered frames (see `Broadcaster::gather`): large enough
/// that a busy batch of small messages becomes one chunk, small enough to stay cache-friendly.
pub(crate) const MAX_CHUNK: usize = 64 * 1024;
/// How soon backlogged clients are retried. Short, because a healthy client that briefly
/// filled its socket buffer should not wait long; the retry is one failed `sendmsg` per
/// backlogged client, cheap enough to repeat 100 times a second.
const BACKLOG_RETRY: Duration = Duration::from_millis(10);
/// Bounds of the heartbeat sweep interval, which is a quarter of `--ping-interval`.
const MIN_SWEEP: Duration = Duration::from_millis(10);
const MAX_SWEEP: Duration = Duration::from_secs(1);
/// How often shutdown re-checks whether every client has gone during the grace period.
const GRACE_STEP: Duration = Duration::from_millis(10);

/// Frames gathered for one room within a batch.
#[derive(Debug, Default)]
struct Chunk {
    bytes: Vec<u8>,
    messages: u64,
}

/// The kind of a data message; the relay keeps it (text stays text, binary stays binary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
}

/// What connection threads send the broadcaster.
#[derive(Debug)]
pub enum Event {
    /// A complete message for everyone in `room`, the sender included.
    Message {
        room: Arc<str>,
        kind: MessageKind,
        payload: Bytes,
    },
    /// The server closes `client` (protocol error, limit, idle). Sent through the channel
    /// rather than queued directly so the close lands behind every message the client sent
    /// before it: per-sender order holds even for the client's own echo. `done` reports
    /// that the close frame is queued.
    Close {
        client: Arc<Client>,
        code: CloseCode,
        reason: &'static str,
        done: Sender<()>,
    },
}

/// The broadcaster's state. Created by `Server::run`, owned by the broadcaster thread.
pub struct Broadcaster {
    hub: Arc<Hub>,
    stats: Arc<Stats>,
    config: Arc<Config>,
    /// Clients given a frame in the current batch and not yet flushed.
    dirty: Vec<Arc<Client>>,
    /// Frames gathered per room during the current batch, fanned out at its end (or earlier,
    /// see `gather`). Emptied after every batch.
    chunks: HashMap<Arc<str>, Chunk>,
    /// Largest chunk: half the outbox bound (so a chunk can never evict a healthy client,
    /// two always fit) and at most `MAX_CHUNK`.
    chunk_limit: usize,
    /// Clients whose kernel send buffer was full at the last attempt.
    backlog: Vec<Arc<Client>>,
    ping: Bytes,
    sweep_every: Duration,
    /// The server's draining flag (see `Shared::draining`), set here as shutdown begins.
    draining: Arc<AtomicBool>,
}

impl Broadcaster {
    pub fn new(
        hub: Arc<Hub>,
        stats: Arc<Stats>,
        config: Arc<Config>,
        draining: Arc<AtomicBool>,
    ) -> Broadcaster {
        let sweep_every = (config.ping_interval / 4).clamp(MIN_SWEEP, MAX_SWEEP);
        let chunk_limit = (config.effective_outbox_bytes() / 2).min(MAX_CHUNK);
        Broadcaster {
            hub,
            stats,
            config,
            dirty: Vec::new(),
            chunks: HashMap::new(),
            chunk_limit,
            backlog: Vec::new(),
            ping: encode(Frame::ping(Bytes::new())),
            sweep_every,
            draining,
        }
    }

    /// Relays until shutdown, then closes every client within the grace period.
    pub fn run(mut self, events: Receiver<Event>, shutdown: &Shutdown) {
        let mut next_sweep = Instant::now() + self.sweep_every;
        loop {
            let wait = if self.backlog.is_empty() {
                next_sweep.saturating_duration_since(Instant::now())
            } else {
                BACKLOG_RETRY
            };
            select! {
                recv(events) -> event => {
                    let Ok(event) = event else { break };
                    self.handle(event);
                    for event in events.try_iter().take(MAX_BATCH - 1) {
                        self.handle(event);
                    }
                    self.fan_out_all();
                    self.flush_dirty();
                }
                recv(shutdown.receiver()) -> _ => break,
                default(wait) => {}
            }
            let now = Instant::now();
            self.retry_backlog(now);
            if now >= next_sweep {
                self.sweep();
                next_sweep = now + self.sweep_every;
            }
        }
        self.close_all(&events);
    }

    /// Gathers a message into its room's chunk, or queues a close behind the messages before
    /// it.
    fn handle(&mut self, event: Event) {
        match event {
            Event::Message {
                room,
                kind,
                payload,
            } => self.gather(room, kind, payload),
            Event::Close {
                client,
                code,
                reason,
                done,
            } => {
                // Whatever this client's room has gathered came before the close: send it first.
                self.fan_out(&client.room);
                client.queue_close(code, reason);
                let _ = done.send(());
            }
        }
    }

    /// Encodes a message onto the end of its room's chunk. The same bytes serve every member
    /// (server frames are unmasked), and gathering a batch's messages for a room into one
    /// chunk means each member costs one queue entry, one lock and one iovec per batch rather
    /// than per message. A chunk that would outgrow `chunk_limit` is fanned out first.
    fn gather(&mut self, room: Arc<str>, kind: MessageKind, payload: Bytes) {
        let opcode = match kind {
            MessageKind::Text => OpCode::Data(Data::Text),
            MessageKind::Binary => OpCode::Data(Data::Binary),
        };
        let frame = Frame::message(payload, opcode, true);
        let is_full = self.chunks.get(&room).is_some_and(|chunk| {
            !chunk.bytes.is_empty() && chunk.bytes.len() + frame.len() > self.chunk_limit
        });
        if is_full {
            self.fan_out(&room);
        }
        let chunk = self.chunks.entry(room).or_default();
        chunk.bytes.reserve(frame.len());
        frame
            .format(&mut chunk.bytes)
            .expect("writing into a Vec cannot fail");
        chunk.messages += 1;
        self.stats.messages_relayed.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues a room's gathered chunk for every member.
    fn fan_out(&mut self, room: &str) {
        let Some(chunk) = self.chunks.get_mut(room).filter(|chunk| chunk.messages > 0) else {
            return;
        };
        let bytes = Bytes::from(std::mem::take(&mut chunk.bytes));
        let messages = std::mem::take(&mut chunk.messages);
        let mut delivered = 0;
        let dirty = &mut self.dirty;
        // The read lock is held only while queuing (memory operations); flushing happens in
        // `flush_dirty`, after it is released.
        self.hub.for_each_member(room, |client| {
            if let Push::Queued { was_empty } = client.queue(bytes.clone()) {
                delivered += messages;
                // A client whose outbox was already non-empty is either in `dirty` already or
                // backlogged (and retried on the tick), so each client is listed once.
                if was_empty {
                    dirty.push(client.clone());
                }
            }
        });
        self.stats
            .messages_delivered
            .fetch_add(delivered, Ordering::Relaxed);
    }

    /// Fans out every room's chunk at the end of a batch.
    fn fan_out_all(&mut self) {
        let rooms: Vec<Arc<str>> = self.chunks.keys().cloned().collect();
        for room in rooms {
            self.fan_out(&room);
        }
        self.chunks.clear();
    }

    /// One non-blocking send per touched client: every frame of the batch in one `sendmsg`.
    fn flush_dirty(&mut self) {
        for client in std::mem::take(&mut self.dirty) {
            if client.flush() == Flush::Backlogged {
                self.track_backlog(client);
            }
        }
    }

    fn track_backlog(&mut self, client: Arc<Client>) {
        if !client.is_backlog_tracked.swap(true, Ordering::Relaxed) {
            self.backlog.push(client);
        }
    }

    /// Retries backlogged clients; evicts those backlogged past `--slow-timeout`.
    fn retry_backlog(&mut self, now: Instant) {
        let slow_timeout = self.config.slow_timeout;
        self.backlog.retain(|client| {
            let keep = client.eviction().is_none()
                && client.flush() == Flush::Backlogged
                && match client.backlog_age(now) {
                    Some(age) if age > slow_timeout => {
                        client.evict(Eviction::Slow);
                        false
                    }
                    _ => true,
                };
            if !keep {
                client.is_backlog_tracked.store(false, Ordering::Relaxed);
            }
            keep
        });
    }

    /// The heartbeat: pings clients quiet for `--ping-interval`, and picks up backlogs that
    /// began on a connection thread's own send (a pong into a full socket buffer).
    fn sweep(&mut self) {
        let interval = self.config.ping_interval;
        let mut found_backlog = Vec::new();
        let dirty = &mut self.dirty;
        let ping = &self.ping;
        self.hub.for_each_client(|client| {
            if client.is_due_for_ping(interval) {
                if let Push::Queued { was_empty: true } = client.queue(ping.clone()) {
                    dirty.push(client.clone());
                }
            } else if !client.is_backlog_tracked.load(Ordering::Relaxed) && client.has_backlog() {
                found_backlog.push(client.clone());
            }
        });
        for client in found_backlog {
            self.track_backlog(client);
        }
        self.flush_dirty();
    }

    /// Shutdown: queue `1001 going away` for everyone, give them `--shutdown-grace` to take it
    /// and answer, then cut whoever is left. Cutting (socket shutdown) is what wakes each
    /// connection thread from `read` so it can exit and be joined.
    fn close_all(&mut self, events: &Receiver<Event>) {
        // First, so that anyone who sees a 1001 also sees the server draining.
        self.draining.store(true, Ordering::SeqCst);
        info!("shutting down: closing {} clients", self.hub.client_count());
        let deadline = Instant::now() + self.config.shutdown_grace;
        let mut clients = Vec::new();
        loop {
            // Messages still arriving have nowhere to go: every outbox is sealed by its close.
            for _ in events.try_iter() {}
            // Taken afresh each step (clients that answered have left), which also catches a
            // client that finished its handshake after shutdown began.
            clients.clear();
            self.hub
                .for_each_client(|client| clients.push(client.clone()));
            if clients.is_empty() || Instant::now() >= deadline {
                break;
            }
            for client in &clients {
                if !client.is_closing() {
                    client.queue_close(CloseCode::Away, "server shutting down");
                }
                if client.has_backlog() {
                    client.flush();
                }
            }
            std::thread::sleep(GRACE_STEP);
        }
        for client in &clients {
            let _ = client.socket().shutdown(std::net::Shutdown::Both);
        }
        debug!("grace period over: {} clients cut", clients.len());
    }
}
