//! The Redis backplane's shared state: how a received message reaches the room when several
//! instances share it, what the rest of the server asks of the link, and the wire format.
//!
//! With `--redis` (cargo feature `redis`), a message a client sends does not go straight to
//! this instance's broadcaster. It goes to Redis, and comes back to *every* instance (this one
//! included) through a pattern subscription:
//!
//! ```text
//!  conn thread ─► publish queue (bounded, never blocks) ─► redis-publisher: number it,
//!                          hold it in the ledger, run sequence.lua (one EVALSHA per batch)
//!                                                     │
//!              Redis: the room's next seq, its capped history, PUBLISH roomcast:room:<room>
//!                                                     │
//!  broadcaster ◄── events channel ◄── redis-subscriber: PSUBSCRIBE roomcast:room:*
//!                          (this instance's own messages take their held place in the ledger)
//! ```
//!
//! Redis is thus the one point that orders and numbers a room's messages, so members on
//! different instances see the same order and the same `seq` (`Order::Redis`), and a room's
//! epoch, history and reaction totals live there too (`keys`). The price is one round trip to
//! Redis per batch, even for members on the sender's own instance. Every instance mirrors
//! each room from the stream it subscribes to, so joins are answered without asking Redis,
//! except where the mirror may have a hole: then the script publishes a snapshot of the room
//! on the asking instance's control channel, where it arrives at its exact place among the
//! room's messages (`Arrival::Snapshot`, `Broadcaster::park_for_snapshot`).
//!
//! # One sender's order, whatever the link does
//!
//! Every event this instance sends towards its broadcaster passes through the publish queue,
//! while the link is up *and* while it is degraded, so nothing can overtake what is queued
//! ahead of it. The publisher numbers each event and holds it in the *ledger* until it is
//! handed to the broadcaster, which happens exactly once, in number order, by one of two
//! paths:
//! - the subscriber, when Redis brings one of our events back (messages carry their origin
//!   instance and number, see `encode_sequenced`): what Redis made of it (`Arrival`: the
//!   message with its `seq`, the totals with our taps added, the snapshot asked for) in its
//!   place, and before it any held one Redis did not bring back;
//! - local delivery of everything held, when the link is degraded: by the publisher (its
//!   pipeline failed, or the subscriber is down) or by the subscriber as its connection ends.
//!
//! Server-initiated closes join the same queue. Redis cannot carry a client, so the publisher
//! publishes a *marker* (its number) on this instance's control channel,
//! `roomcast:control:<instance>`, which only this instance subscribes to; Redis delivers one
//! connection's publishes to a subscriber in order across channels, so the marker arrives
//! behind the client's messages and the subscriber takes the close out of the ledger.
//!
//! The cost of this is a lock (the ledger's) taken by the publisher and the subscriber, never by
//! connection threads, and held while a delivery is handed to the broadcaster's bounded
//! channel: that is what keeps the two paths from interleaving.
//!
//! Other instances' messages carry their numbers too: each instance drops a message at or
//! below the last number it relayed from that origin (`Origins`), so the copy a publisher's
//! retry sends again is relayed once, and a late one cannot overtake.
//!
//! The threads that talk to Redis live in `redis_link`; this module holds only what connection
//! threads and endpoints touch, plus the ledger and the wire format, and compiles without the
//! `redis` feature (a server without `--redis` never builds one).

pub mod cluster;
pub mod keys;
#[cfg(feature = "redis")]
pub(crate) mod redis_link;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};
use parking_lot::{Condvar, Mutex, RwLock};
use tungstenite::Bytes;

use crate::relay::broadcaster::{Event, Events, Message, MessageKind, Stamp};
use crate::relay::room_state::{Retained, Snapshot};
use crate::v1::codec::Presence;

pub use keys::{CONTROL_CHANNEL_PREFIX, INSTANCE_KEY_PREFIX, ROOM_CHANNEL_PREFIX};

/// Messages the publish queue holds. A few tens of milliseconds of peak traffic: enough to
/// ride out a slow Redis reply, small enough that a dead link is noticed before memory grows.
pub const PUBLISH_QUEUE_MESSAGES: usize = 4096;
/// Payload bytes of this instance's messages between the connection threads and the
/// broadcaster (in the publish queue or the ledger) at most; never below two maximum-size
/// messages.
pub const PUBLISH_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Events the ledger holds at most. Normally it holds one round trip's worth; when the
/// subscriber falls this far behind, the publisher stops taking from the queue until it catches
/// up (and the queue, filling, drops).
pub const MAX_HELD_EVENTS: usize = PUBLISH_QUEUE_MESSAGES;
/// Other instances whose last message number each instance remembers (`Origins`). Far more
/// than a cluster has; the excess (instances restarted many times) forgets the quietest.
pub const MAX_ORIGINS: usize = 1024;

/// What the publish queue carries: an event for the broadcaster, on its way through Redis.
#[derive(Debug)]
pub enum Outgoing {
    /// A room message: numbered by Redis and published, so every instance relays it. The
    /// sender, if given, is told the `seq` it got (the publish endpoint answers with it).
    Message(Message, Option<Sender<u64>>),
    /// Any other event (a server-initiated close): it never leaves this instance, but a marker
    /// on the control channel keeps its place behind the messages queued before it.
    Local(Event),
    /// Reaction taps this instance counted in a room since its last ones: Redis adds them to
    /// the room's totals and publishes the sums to every instance.
    Reactions {
        room: Arc<str>,
        taps: Vec<(String, u64)>,
    },
    /// A join here (or a history request) needs the room as Redis holds it: Redis publishes
    /// a snapshot on this instance's control channel, at its place among the room's messages.
    /// A join creates the room's state when Redis has none (`create`); a request does not.
    Snapshot { room: Arc<str>, create: bool },
    /// Redis went back in time under a room's epoch (restored from an older dump): the room
    /// gets a new one, if it still has `epoch`, so no resume takes the rewound numbers for the
    /// ones its client saw.
    NewEpoch { room: Arc<str>, epoch: Arc<str> },
}

impl Outgoing {
    /// The bytes it counts against the publish queue's bound.
    pub fn payload_len(&self) -> usize {
        match self {
            Outgoing::Message(message, _) => message.payload.len(),
            Outgoing::Local(_)
            | Outgoing::Reactions { .. }
            | Outgoing::Snapshot { .. }
            | Outgoing::NewEpoch { .. } => 0,
        }
    }
}

/// What Redis brought back in place of one of this instance's events: the message with the
/// place Redis gave it, the totals with its taps added, or the snapshot asked for.
#[derive(Debug)]
pub enum Arrival {
    Message(Message),
    Totals {
        room: Arc<str>,
        epoch: Arc<str>,
        seq: u64,
        totals: BTreeMap<String, u64>,
    },
    /// `None`: Redis has no state for the room.
    Snapshot {
        room: Arc<str>,
        snapshot: Option<Snapshot>,
    },
}

impl Arrival {
    /// Whether it can stand for `held`: the same kind of event, for the same room. Anything
    /// else is a forgery under this instance's origin, and the held event goes as it is.
    fn answers(&self, held: &Outgoing) -> bool {
        match (self, held) {
            (Arrival::Message(arrived), Outgoing::Message(held, _)) => arrived.room == held.room,
            (Arrival::Totals { room, .. }, Outgoing::Reactions { room: held, .. }) => room == held,
            (Arrival::Snapshot { room, .. }, Outgoing::Snapshot { room: held, .. }) => room == held,
            _ => false,
        }
    }

    /// Hands it to the broadcaster; a message's sender (`numbered`) is told its `seq` there.
    fn deliver(
        self,
        events: &Events,
        numbered: Option<Sender<u64>>,
    ) -> Result<(), crate::relay::broadcaster::Stopped> {
        match self {
            Arrival::Message(message) => events.send_message(message, numbered),
            Arrival::Totals {
                room,
                epoch,
                seq,
                totals,
            } => events.send(Event::Totals {
                room,
                epoch,
                seq,
                totals,
            }),
            Arrival::Snapshot { room, snapshot } => events.send(Event::Snapshot { room, snapshot }),
        }
    }
}

impl From<Event> for Outgoing {
    fn from(event: Event) -> Outgoing {
        match event {
            // The message's claim on the event channel's byte budget is given back here: the
            // publish queue counts its bytes instead, and the broadcaster's channel will take
            // them again when the ledger delivers it.
            Event::Message {
                message,
                permit: _,
                numbered,
            } => Outgoing::Message(message, numbered),
            other => Outgoing::Local(other),
        }
    }
}

impl Outgoing {
    /// Hands it to the broadcaster (a message takes its bytes from the channel's budget).
    /// Blocks while the broadcaster is behind; fails only once it has stopped.
    /// Its local form: what this instance's members get when Redis did not bring it back.
    fn deliver(self, events: &Events) -> Result<(), crate::relay::broadcaster::Stopped> {
        match self {
            Outgoing::Message(message, numbered) => events.send_message(message, numbered),
            Outgoing::Local(event) => events.send(event),
            Outgoing::Reactions { room, taps } => events.send(Event::Tally { room, taps }),
            Outgoing::Snapshot { room, .. } => events.send(Event::Snapshot {
                room,
                snapshot: None,
            }),
            // Only Redis can change a room's epoch for every instance.
            Outgoing::NewEpoch { .. } => Ok(()),
        }
    }
}

/// What became of a message handed to `relay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relayed {
    /// On its way to the room.
    Queued,
    /// Dropped (and counted): the publish queue was full, Redis is slower than the clients.
    Dropped,
    /// The broadcaster or the publisher has stopped: the server is shutting down.
    Stopped,
}

/// Why a message meant for Redis, or from it, was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The publish queue was full: Redis is slower than the clients.
    QueueFull,
    /// A message from Redis that is not ours to relay: bad room name, unknown kind byte, text
    /// that is not UTF-8, or a marker or number this instance never published.
    Malformed,
    /// A message from Redis at or below the last number relayed from its origin: a second copy
    /// (a publisher's retry), or a late one that would overtake.
    Duplicate,
    /// A message from Redis over this instance's `--max-message-bytes` (a backend publishing
    /// to Redis directly, or an instance with a larger limit): relaying it would evict every
    /// member, since it fits no outbox.
    TooLarge,
}

/// A position in this instance's sequence that the ledger never handed out: a forged marker,
/// or a message claiming to be ours.
#[derive(Debug, PartialEq, Eq)]
pub struct NeverNumbered;

/// The two connections a working relay needs; the link is up only when both are.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    Publisher,
    Subscriber,
}

/// This instance's events between the publish queue and the broadcaster (see the module doc).
#[derive(Debug, Default)]
struct Ledger {
    /// Events numbered `delivered + 1`, `delivered + 2`, ..., oldest first.
    held: VecDeque<Outgoing>,
    /// The number of the last event handed to the broadcaster.
    delivered: u64,
}

impl Ledger {
    /// The number of the last event the publisher took off the queue.
    fn last_numbered(&self) -> u64 {
        self.delivered + self.held.len() as u64
    }
}

/// What the server knows about its Redis link. Shared by connection threads (which publish),
/// endpoints (health, counts, metrics) and the three `redis_link` threads (which update it).
#[derive(Debug)]
pub struct Backplane {
    /// This instance's name in Redis (its presence hash and control channel).
    pub instance: String,
    /// This instance's origin in sequenced messages: random, so no two instances share one.
    pub origin: u64,
    control_channel: String,
    queue: Sender<Outgoing>,
    /// Payload bytes in the publish queue and the ledger: added by connection threads as they
    /// queue, released as the ledger delivers.
    queued_bytes: AtomicUsize,
    max_queued_bytes: usize,
    /// Written by the publisher (which holds) and by the subscriber and publisher (which
    /// deliver); lives as long as the backplane.
    ledger: Mutex<Ledger>,
    /// Signalled after every delivery: the publisher waits on it while the ledger is full.
    ledger_drained: Condvar,
    /// Publisher and subscriber connected, in that order; changed together under the lock so
    /// transitions (and outages) are counted once.
    sides: Mutex<(bool, bool)>,
    /// Both sides connected: messages go through Redis. Read on every message.
    up: AtomicBool,
    /// When the subscriber last heard from Redis, in ms after `born`.
    last_heard_ms: AtomicU64,
    born: Instant,
    /// A queue overflow was logged and not yet followed by a successful publish.
    overflow_logged: AtomicBool,
    /// Other instances' clients and users per room, summed, from the last presence heartbeat.
    remote_rooms: RwLock<HashMap<String, Presence>>,
    remote_instances: AtomicUsize,
    pub outages: AtomicU64,
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_malformed: AtomicU64,
    pub dropped_duplicate: AtomicU64,
    pub dropped_too_large: AtomicU64,
    /// Messages from Redis outside any room's sequence (a raw `PUBLISH`): plain members only.
    pub unsequenced: AtomicU64,
    /// Events the sequencing script could not run (a room's key overwritten with another
    /// type, say): skipped by Redis, delivered here only.
    pub script_failures: AtomicU64,
    /// This instance's `--max-message-bytes`: larger messages from Redis are dropped.
    pub max_message_bytes: usize,
    /// Heartbeat period and the TTL of the presence hash (three heartbeats).
    pub heartbeat: Duration,
    pub presence_ttl: Duration,
    /// Moderation commands from the endpoint to the presence thread, on their way to the
    /// other instances (`cluster`).
    pub moderation: cluster::Handoff,
}

impl Backplane {
    /// The shared state and the receiving end of the publish queue (for the publisher thread).
    pub fn new(
        instance: String,
        max_message_bytes: usize,
        presence_ttl: Duration,
    ) -> (Backplane, Receiver<Outgoing>) {
        let (queue, outgoing) = crossbeam_channel::bounded(PUBLISH_QUEUE_MESSAGES);
        let backplane = Backplane {
            // RandomState is keyed from the OS's randomness, afresh for each one.
            origin: RandomState::new().hash_one(&instance),
            control_channel: control_channel(&instance),
            instance,
            queue,
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: PUBLISH_QUEUE_BYTES.max(max_message_bytes.saturating_mul(2)),
            ledger: Mutex::new(Ledger::default()),
            ledger_drained: Condvar::new(),
            sides: Mutex::new((false, false)),
            up: AtomicBool::new(false),
            last_heard_ms: AtomicU64::new(0),
            born: Instant::now(),
            overflow_logged: AtomicBool::new(false),
            remote_rooms: RwLock::new(HashMap::new()),
            remote_instances: AtomicUsize::new(0),
            outages: AtomicU64::new(0),
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            dropped_malformed: AtomicU64::new(0),
            dropped_duplicate: AtomicU64::new(0),
            dropped_too_large: AtomicU64::new(0),
            unsequenced: AtomicU64::new(0),
            script_failures: AtomicU64::new(0),
            max_message_bytes,
            heartbeat: presence_ttl / 3,
            presence_ttl,
            moderation: cluster::Handoff::default(),
        };
        (backplane, outgoing)
    }

    /// The channel only this instance subscribes to, for its markers.
    pub fn control_channel(&self) -> &str {
        &self.control_channel
    }

    /// Whether messages go through Redis (true) or only to this instance's members (degraded).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Whether one side has its connection (the publisher connects only once the subscriber
    /// has, see `redis_link`).
    pub fn is_connected(&self, side: Side) -> bool {
        let sides = self.sides.lock();
        match side {
            Side::Publisher => sides.0,
            Side::Subscriber => sides.1,
        }
    }

    /// Records that one side connected or lost its connection; logs and counts the change of
    /// the link as a whole.
    ///
    /// Returns whether the link just came up: the caller then tells the broadcaster
    /// (`Event::StreamBroken`), whose rooms may have missed messages while it was down.
    pub fn set_side(&self, side: Side, connected: bool) -> bool {
        let mut sides = self.sides.lock();
        let was_up = sides.0 && sides.1;
        match side {
            Side::Publisher => sides.0 = connected,
            Side::Subscriber => sides.1 = connected,
        }
        let is_up = sides.0 && sides.1;
        self.up.store(is_up, Ordering::SeqCst);
        if was_up && !is_up {
            self.outages.fetch_add(1, Ordering::Relaxed);
            warn!("redis link down ({side:?} lost): degraded, relaying to this instance's clients only");
        } else if !was_up && is_up {
            info!("redis link up: relaying through redis");
        }
        !was_up && is_up
    }

    /// A side's thread ends at shutdown: the link goes down without counting as an outage.
    pub fn leave(&self, side: Side) {
        let mut sides = self.sides.lock();
        match side {
            Side::Publisher => sides.0 = false,
            Side::Subscriber => sides.1 = false,
        }
        self.up.store(false, Ordering::SeqCst);
    }

    /// The subscriber heard from Redis (a message, or a reply to its ping).
    pub fn heard_from_redis(&self) {
        self.last_heard_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether the subscriber has heard from Redis since `since`: the publisher reconnects
    /// only then, so a Redis that accepts connections but answers nothing (hung, or behind a
    /// black hole) costs it no reply timeout while it has local deliveries to make.
    pub fn heard_from_redis_since(&self, since: Instant) -> bool {
        let since_ms = since.saturating_duration_since(self.born).as_millis() as u64;
        self.last_heard_ms.load(Ordering::Relaxed) >= since_ms
    }

    /// Queues a message for the publisher without blocking. A full queue drops it, counted and
    /// logged once per episode: connection threads must never wait on Redis.
    pub fn publish(&self, message: Outgoing) -> Relayed {
        let len = message.payload_len();
        let fits =
            self.queued_bytes.fetch_add(len, Ordering::SeqCst) + len <= self.max_queued_bytes;
        let refused = if fits {
            match self.queue.try_send(message) {
                Ok(()) => return Relayed::Queued,
                Err(err) => err.is_disconnected(),
            }
        } else {
            false
        };
        self.queued_bytes.fetch_sub(len, Ordering::SeqCst);
        if refused {
            // The publisher has ended: shutdown (or it panicked, which the server reports).
            return Relayed::Stopped;
        }
        self.count_drop(Dropped::QueueFull);
        Relayed::Dropped
    }

    /// Queues an event of the broadcaster's own (taps, a snapshot request) without blocking;
    /// gives it back when the queue has no room.
    // Large only when given back (a full queue), which is rare: not worth a box per event.
    #[allow(clippy::result_large_err)]
    pub fn try_publish(&self, outgoing: Outgoing) -> Result<(), Outgoing> {
        self.queue
            .try_send(outgoing)
            .map_err(|err| err.into_inner())
    }

    /// Queues a server-initiated close behind everything queued before it, without blocking.
    /// Gives it back when the queue has no room or the publisher has ended.
    #[allow(clippy::result_large_err)]
    pub fn queue_close(&self, close: Event) -> Result<(), Event> {
        self.queue
            .try_send(Outgoing::Local(close))
            .map_err(|err| match err.into_inner() {
                Outgoing::Local(event) => event,
                _ => unreachable!("only a close was offered"),
            })
    }

    /// The number of the last event the publisher took off the queue (0 before the first).
    pub fn last_numbered(&self) -> u64 {
        self.ledger.lock().last_numbered()
    }

    /// Events held: taken off the queue and not yet handed to the broadcaster.
    pub fn held(&self) -> usize {
        self.ledger.lock().held.len()
    }

    /// The publisher: numbers a batch it took off the queue (from `last_numbered() + 1` on, in
    /// order) and holds it until it is delivered.
    pub fn hold(&self, batch: Vec<Outgoing>) {
        self.ledger.lock().held.extend(batch);
    }

    /// Waits, at most `timeout`, until the ledger holds fewer than `MAX_HELD_EVENTS`.
    pub fn wait_for_ledger_room(&self, timeout: Duration) {
        let mut ledger = self.ledger.lock();
        let deadline = Instant::now() + timeout;
        while ledger.held.len() >= MAX_HELD_EVENTS {
            if self
                .ledger_drained
                .wait_until(&mut ledger, deadline)
                .timed_out()
            {
                return;
            }
        }
    }

    /// Hands the broadcaster every held event numbered up to `seq`, oldest first: Redis has
    /// passed `seq` (it brought back that message, or that marker), so held events before it
    /// that it did not bring back never will be. Returns how many it delivered: 0 when `seq`
    /// was delivered already (a second copy, or a marker for an event delivered locally).
    ///
    /// `arrived` is what Redis made of event `seq` (the message numbered, the totals summed,
    /// the snapshot asked for): it is delivered instead of the held event. Without it (a
    /// marker) the held event is delivered as it is.
    pub fn deliver_through(
        &self,
        seq: u64,
        arrived: Option<Arrival>,
        events: &Events,
    ) -> Result<usize, NeverNumbered> {
        let mut ledger = self.ledger.lock();
        if seq > ledger.last_numbered() {
            return Err(NeverNumbered);
        }
        // At most `held.len()`, since `seq` is at most the last number.
        let due = usize::try_from(seq.saturating_sub(ledger.delivered)).unwrap_or(usize::MAX);
        let Some(arrived) = arrived.filter(|_| due > 0) else {
            return Ok(self.deliver(&mut ledger, due, events));
        };
        if !ledger
            .held
            .get(due - 1)
            .is_some_and(|held| arrived.answers(held))
        {
            // Not what this instance sent under that number: a forgery. Nothing is delivered
            // for it; the real one, or a marker, still comes.
            return Err(NeverNumbered);
        }
        let before = self.deliver(&mut ledger, due - 1, events);
        let Some(held) = ledger.held.pop_front() else {
            return Ok(before);
        };
        ledger.delivered += 1;
        self.queued_bytes
            .fetch_sub(held.payload_len(), Ordering::SeqCst);
        let numbered = match held {
            Outgoing::Message(_, numbered) => numbered,
            _ => None,
        };
        let _ = arrived.deliver(events, numbered);
        self.ledger_drained.notify_all();
        Ok(before + 1)
    }

    /// Hands the broadcaster everything held: the link is degraded, so Redis will not bring it
    /// back. Returns how many it delivered.
    pub fn deliver_all(&self, events: &Events) -> usize {
        let mut ledger = self.ledger.lock();
        let due = ledger.held.len();
        self.deliver(&mut ledger, due, events)
    }

    /// Delivers the `due` oldest held events. The sends happen under the ledger's lock: were
    /// it released first, the other path could deliver a later event in between. A send
    /// blocks only while the broadcaster is behind, as any sender to it does; connection
    /// threads never take this lock.
    fn deliver(&self, ledger: &mut Ledger, due: usize, events: &Events) -> usize {
        let mut delivered = 0;
        while delivered < due {
            let Some(event) = ledger.held.pop_front() else {
                break;
            };
            ledger.delivered += 1;
            delivered += 1;
            self.queued_bytes
                .fetch_sub(event.payload_len(), Ordering::SeqCst);
            // Fails only once the broadcaster has stopped (shutdown): nothing is left to relay to.
            let _ = event.deliver(events);
        }
        if delivered > 0 {
            self.ledger_drained.notify_all();
        }
        delivered
    }

    /// Called by the publisher after Redis accepted a batch.
    pub fn count_published(&self, messages: usize) {
        self.published.fetch_add(messages as u64, Ordering::Relaxed);
        if self.overflow_logged.swap(false, Ordering::Relaxed) {
            info!("redis publish queue has room again");
        }
    }

    /// The script skipped `failed` events of a batch; said once, then counted.
    pub fn count_script_failures(&self, failed: u64) {
        if self.script_failures.fetch_add(failed, Ordering::Relaxed) == 0 {
            warn!(
                "the redis sequencing script could not run {failed} events (a room key of another type?); counted in roomcast_redis_script_failures_total"
            );
        }
    }

    pub fn count_drop(&self, reason: Dropped) {
        match reason {
            Dropped::QueueFull => {
                self.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                if !self.overflow_logged.swap(true, Ordering::Relaxed) {
                    warn!("redis publish queue full: dropping messages until redis catches up");
                }
            }
            Dropped::Malformed => {
                self.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            }
            Dropped::Duplicate => {
                self.dropped_duplicate.fetch_add(1, Ordering::Relaxed);
            }
            Dropped::TooLarge => {
                if self.dropped_too_large.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!(
                        "dropping messages from redis over --max-message-bytes ({} B); counted in roomcast_redis_dropped_total{{reason=\"too_large\"}}",
                        self.max_message_bytes
                    );
                }
            }
        }
    }

    /// Messages waiting for the publisher.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Replaces the other instances' room counts (the presence thread, every heartbeat).
    pub fn set_remote_rooms(&self, instances: usize, rooms: HashMap<String, Presence>) {
        *self.remote_rooms.write() = rooms;
        self.remote_instances.store(instances, Ordering::Relaxed);
    }

    /// Instances seen at the last heartbeat, this one included.
    pub fn instances(&self) -> usize {
        self.remote_instances.load(Ordering::Relaxed) + 1
    }

    /// Cluster-wide counts: this instance's live counts plus the others' as of the last
    /// heartbeat (at most `heartbeat` old).
    pub fn cluster_rooms(&self, local: Vec<(String, usize)>) -> Vec<(String, usize)> {
        let mut rooms: HashMap<String, usize> = self
            .remote_rooms
            .read()
            .iter()
            .map(|(room, presence)| (room.clone(), presence.clients))
            .collect();
        for (room, clients) in local {
            *rooms.entry(room).or_default() += clients;
        }
        rooms.into_iter().filter(|(_, n)| *n > 0).collect()
    }

    /// Cluster-wide members of one room.
    pub fn cluster_room_size(&self, room: &str, local: usize) -> usize {
        local + self.remote_presence(room).clients
    }

    /// The other instances' clients and users in one room, as of their last heartbeat (at
    /// most `heartbeat` old); zero for a room none of them reported. Add this instance's own
    /// (`cluster::add`) for the room's cluster-wide presence.
    pub fn remote_presence(&self, room: &str) -> Presence {
        self.remote_rooms
            .read()
            .get(room)
            .copied()
            .unwrap_or(cluster::NO_ONE)
    }
}

/// Where connection threads and the publish API send a message. With a backplane: the publish
/// queue, whether the link is up or degraded, so it stays behind the sender's earlier
/// messages (the publisher decides where it goes). Without: the broadcaster's channel, which
/// is bounded, so when the broadcaster is behind this blocks, which stops the connection
/// thread reading, which lets TCP flow control push back on the sender.
pub(crate) fn relay(backplane: Option<&Backplane>, events: &Events, message: Message) -> Relayed {
    match backplane {
        Some(backplane) => backplane.publish(Outgoing::Message(message, None)),
        None => match events.send_message(message, None) {
            Ok(()) => Relayed::Queued,
            Err(_) => Relayed::Stopped,
        },
    }
}

/// Where an event about one client (a server-initiated close, an `error` reply) goes so that
/// it lands behind every message that client sent before it: the same way those went. With a backplane that is the
/// publish queue; when the queue has no room (or the publisher has ended) the close takes the
/// broadcaster's channel instead and may overtake the client's last queued messages. Waits
/// for room in the channel until `deadline`; returns whether the close is on its way.
pub(crate) fn relay_in_order(
    backplane: Option<&Backplane>,
    events: &Events,
    close: Event,
    deadline: Instant,
) -> bool {
    let close = match backplane {
        Some(backplane) => match backplane.queue_close(close) {
            Ok(()) => return true,
            Err(close) => close,
        },
        None => close,
    };
    events.send_deadline(close, deadline).is_ok()
}

/// The last message number relayed from each other instance, so that each of its messages is
/// relayed at most once and never behind a later one. Owned by the subscriber thread.
#[derive(Debug, Default)]
pub struct Origins {
    /// Origin → (last number relayed, `clock` when it was).
    last: HashMap<u64, (u64, u64)>,
    /// Counts messages seen, to find the quietest origin when the map is full.
    clock: u64,
}

impl Origins {
    /// Whether message `seq` from `origin` is to be relayed (and now the last one from it):
    /// false when it is at or below the last one relayed, a second copy or a late one.
    pub fn is_new(&mut self, origin: u64, seq: u64) -> bool {
        self.clock += 1;
        if let Some((last, seen)) = self.last.get_mut(&origin) {
            if seq <= *last {
                return false;
            }
            *last = seq;
            *seen = self.clock;
            return true;
        }
        if self.last.len() >= MAX_ORIGINS {
            let quietest = self
                .last
                .iter()
                .min_by_key(|(_, (_, seen))| *seen)
                .map(|(origin, _)| *origin);
            if let Some(quietest) = quietest {
                self.last.remove(&quietest);
            }
        }
        self.last.insert(origin, (seq, self.clock));
        true
    }
}

/// The plain payload format: one kind byte (`T` text, `B` binary, `J` a JSON value), then the
/// message verbatim. Redis strings are binary-safe, so nothing else is needed, and a backend
/// can publish to a room with `PUBLISH roomcast:room:<room> "T<text>"`.
pub fn encode(kind: MessageKind, payload: &[u8]) -> Vec<u8> {
    let mut wire = Vec::with_capacity(payload.len() + 1);
    wire.push(kind_byte(kind));
    wire.extend_from_slice(payload);
    wire
}

/// Bytes before the plain form in a sequenced message: `S`, origin, number.
const SEQUENCED_HEADER: usize = 1 + 8 + 8;

/// The format instances publish: `S`, the origin (8 bytes, big-endian), the message's number
/// in that origin's sequence (8 bytes, big-endian), then, for a client's message, `F`, the
/// length of its sender's encoded identity (2 bytes, big-endian) and that identity, and then
/// the plain form. The numbers let the origin recognise its own messages and every instance
/// drop a second copy; the sender lets every instance's v1 clients see who wrote it.
pub fn encode_sequenced(
    origin: u64,
    seq: u64,
    kind: MessageKind,
    payload: &[u8],
    from: Option<&str>,
) -> Vec<u8> {
    let from = from.filter(|from| from.len() <= usize::from(u16::MAX));
    let from_len = from.map_or(0, |from| 3 + from.len());
    let mut wire = Vec::with_capacity(SEQUENCED_HEADER + from_len + 1 + payload.len());
    wire.push(b'S');
    wire.extend_from_slice(&origin.to_be_bytes());
    wire.extend_from_slice(&seq.to_be_bytes());
    if let Some(from) = from {
        wire.push(b'F');
        wire.extend_from_slice(&(from.len() as u16).to_be_bytes());
        wire.extend_from_slice(from.as_bytes());
    }
    wire.push(kind_byte(kind));
    wire.extend_from_slice(payload);
    wire
}

fn kind_byte(kind: MessageKind) -> u8 {
    match kind {
        MessageKind::Text => b'T',
        MessageKind::Binary => b'B',
        MessageKind::Json => b'J',
    }
}

/// Whether `bytes` is one JSON value (what a `J` payload and a sender must be, since both are
/// written into v1 frames as they are).
fn is_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<&serde_json::value::RawValue>(bytes).is_ok()
}

/// Where a sequenced message comes from: its origin instance and its number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub origin: u64,
    pub seq: u64,
}

/// A room message as it came from Redis.
#[derive(Debug)]
pub struct Decoded {
    /// `None` for the plain form (a backend's).
    pub sequence: Option<Sequence>,
    pub kind: MessageKind,
    pub payload: Bytes,
    /// The sender's encoded identity; `None` for a backend's message.
    pub from: Option<Arc<str>>,
}

/// The inverse of `encode` and `encode_sequenced`; `None` for anything else (unknown kind,
/// short header, text not UTF-8).
pub fn decode(wire: Vec<u8>) -> Option<Decoded> {
    decode_bytes(Bytes::from(wire))
}

fn decode_bytes(wire: Bytes) -> Option<Decoded> {
    let (sequence, plain) = match wire.first()? {
        b'S' => {
            let number = |at: usize| {
                wire.get(at..at + 8)?
                    .try_into()
                    .ok()
                    .map(u64::from_be_bytes)
            };
            let sequence = Sequence {
                origin: number(1)?,
                seq: number(9)?,
            };
            (Some(sequence), SEQUENCED_HEADER)
        }
        _ => (None, 0),
    };
    let (from, plain) = match (sequence, wire.get(plain)) {
        (Some(_), Some(b'F')) => {
            let len = wire.get(plain + 1..plain + 3)?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            let from = wire.get(plain + 3..plain + 3 + len)?;
            if !is_json(from) {
                return None;
            }
            let from: Arc<str> = std::str::from_utf8(from).ok()?.into();
            (Some(from), plain + 3 + len)
        }
        _ => (None, plain),
    };
    let kind = match wire.get(plain)? {
        b'T' => MessageKind::Text,
        b'B' => MessageKind::Binary,
        b'J' => MessageKind::Json,
        _ => return None,
    };
    // A slice of the received buffer: no copy, even of a large message.
    let payload = wire.slice(plain + 1..);
    let is_valid = match kind {
        MessageKind::Text => std::str::from_utf8(&payload).is_ok(),
        MessageKind::Json => is_json(&payload),
        MessageKind::Binary => true,
    };
    if !is_valid {
        return None;
    }
    Some(Decoded {
        sequence,
        kind,
        payload,
        from,
    })
}

/// Bounds of the history bytes one snapshot carries. Redis closes a subscriber whose output
/// buffer passes 32 MiB (8 MiB for a minute) by default.
const MIN_SNAPSHOT_BYTES: usize = 256 * 1024;
const MAX_SNAPSHOT_BYTES: usize = 4 * 1024 * 1024;
/// History bytes all the snapshots in flight carry at most, together: well under the 8 MiB
/// Redis lets a subscriber's buffer hold for long.
const SNAPSHOT_BYTES_IN_FLIGHT: usize = 4 * 1024 * 1024;

/// History bytes a snapshot carries at most: what a welcome here can show (half an outbox),
/// within the bounds above.
pub fn snapshot_bytes(config: &crate::Config) -> usize {
    (config.effective_outbox_bytes() / 2).clamp(MIN_SNAPSHOT_BYTES, MAX_SNAPSHOT_BYTES)
}

/// Snapshots one instance has in flight at most: 1 to 8, as many as fit
/// `SNAPSHOT_BYTES_IN_FLIGHT`.
pub fn snapshots_in_flight(config: &crate::Config) -> usize {
    (SNAPSHOT_BYTES_IN_FLIGHT / snapshot_bytes(config)).clamp(1, 8)
}

/// The longest header before the first newline in the formats the sequencing script
/// publishes (an epoch and four numbers, or a room name: 128 bytes at most).
const MAX_SCRIPT_HEADER: usize = 256;

/// The header of a script-published form: its first line, split at spaces, after its lead
/// (`V`, `A` or `snapshot `), and the rest after the newline.
fn script_header<'a>(wire: &'a [u8], lead: &[u8]) -> Option<(Vec<&'a str>, usize)> {
    let rest = wire.strip_prefix(lead)?;
    let end = rest
        .iter()
        .take(MAX_SCRIPT_HEADER)
        .position(|&byte| byte == b'\n')?;
    let header = std::str::from_utf8(&rest[..end]).ok()?;
    Some((header.split(' ').collect(), lead.len() + end + 1))
}

/// A decimal number as the script writes it: digits only.
fn number(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// An epoch as PROTOCOL §4 has it: `[A-Za-z0-9_-]{1,32}`, so it goes into a URL as is.
fn is_epoch(text: &str) -> bool {
    (1..=32).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The pieces the script writes as `<length>:<bytes>`, one after another.
fn counted_pieces(mut wire: &[u8]) -> Option<Vec<&[u8]>> {
    let mut pieces = Vec::new();
    while !wire.is_empty() {
        let colon = wire.iter().take(21).position(|&b| b == b':')?;
        let len = usize::try_from(number(std::str::from_utf8(&wire[..colon]).ok()?)?).ok()?;
        let end = colon.checked_add(1)?.checked_add(len)?;
        let piece = wire.get(colon + 1..end)?;
        pieces.push(piece);
        wire = &wire[end..];
    }
    Some(pieces)
}

/// A room message as the sequencing script publishes it: `V<epoch> <seq> <ts_ms>\n`, then
/// the sequenced form (`encode_sequenced`) the publisher gave it.
pub fn decode_stamped(wire: Vec<u8>) -> Option<(Stamp, Decoded)> {
    let (header, body) = script_header(&wire, b"V")?;
    let [epoch, seq, ts_ms] = header[..] else {
        return None;
    };
    let stamp = Stamp {
        epoch: Some(epoch).filter(|e| is_epoch(e))?.into(),
        // Redis's numbers stay below the ones instances give themselves while it is away.
        seq: number(seq)
            .filter(|seq| (1..crate::relay::room_state::LOCAL_SEQ_BASE).contains(seq))?,
        ts_ms: number(ts_ms)?,
    };
    let decoded = decode_bytes(Bytes::from(wire).slice(body..))?;
    decoded.sequence?;
    Some((stamp, decoded))
}

/// A room's totals as the script publishes them after adding an instance's taps:
/// `A<epoch> <seq> <origin> <number>\n`, then key and total, each counted.
#[derive(Debug, PartialEq, Eq)]
pub struct Totals {
    pub epoch: Arc<str>,
    pub seq: u64,
    pub sequence: Sequence,
    pub totals: BTreeMap<String, u64>,
}

pub fn decode_totals(wire: &[u8]) -> Option<Totals> {
    let (header, body) = script_header(wire, b"A")?;
    let [epoch, seq, origin, n] = header[..] else {
        return None;
    };
    if !is_epoch(epoch) {
        return None;
    }
    Some(Totals {
        epoch: epoch.into(),
        seq: number(seq)?,
        sequence: Sequence {
            origin: number(origin)?,
            seq: number(n)?,
        },
        totals: totals(&counted_pieces(&wire[body..])?)?,
    })
}

/// Key, total, key, total, ...: keys of 1-32 bytes of UTF-8, as reactions are.
fn totals(pieces: &[&[u8]]) -> Option<BTreeMap<String, u64>> {
    if pieces.len() % 2 != 0 || pieces.len() / 2 > crate::relay::room_state::MAX_ROOM_REACTION_KEYS
    {
        return None;
    }
    pieces
        .chunks(2)
        .map(|pair| {
            let key = std::str::from_utf8(pair[0]).ok()?;
            if !(1..=32).contains(&key.len()) {
                return None;
            }
            Some((key.to_string(), number(std::str::from_utf8(pair[1]).ok()?)?))
        })
        .collect()
}

/// One retained message as the script keeps it in a room's history: `<seq> <ts_ms>\n`, then
/// the sequenced form. `at` is when it was retained, reckoned from its `ts`.
fn decode_entry(entry: &[u8], unix_ms_now: u64, now: Instant) -> Option<Retained> {
    let (header, body) = script_header(entry, b"")?;
    let [seq, ts_ms] = header[..] else {
        return None;
    };
    let ts_ms = number(ts_ms)?;
    let decoded = decode_bytes(Bytes::copy_from_slice(&entry[body..]))?;
    decoded.sequence?;
    let age = Duration::from_millis(unix_ms_now.saturating_sub(ts_ms));
    Some(Retained {
        seq: number(seq).filter(|&seq| seq > 0)?,
        ts_ms,
        from: decoded.from,
        kind: decoded.kind,
        payload: decoded.payload,
        at: now.checked_sub(age).unwrap_or(now),
    })
}

/// A room's snapshot as the script publishes it on the asking instance's control channel:
/// `snapshot <number> <room>\n`, then counted: the epoch, the seq, the number of totals,
/// key and total for each, and the retained messages oldest first; nothing after the header
/// when Redis has no state for the room (a history request, which creates none).
#[allow(clippy::type_complexity)]
pub fn decode_snapshot(wire: &[u8], unix_ms_now: u64) -> Option<(u64, Arc<str>, Option<Snapshot>)> {
    let (header, body) = script_header(wire, b"snapshot ")?;
    let [n, room] = header[..] else {
        return None;
    };
    if !crate::relay::hub::is_valid_room_name(room) {
        return None;
    }
    let pieces = counted_pieces(&wire[body..])?;
    if pieces.is_empty() {
        return Some((number(n)?, room.into(), None));
    }
    let text = |piece: &[u8]| std::str::from_utf8(piece).ok().map(str::to_string);
    let epoch = text(pieces.first()?).filter(|e| is_epoch(e))?;
    let seq = number(&text(pieces.get(1)?)?)?;
    let keys = usize::try_from(number(&text(pieces.get(2)?)?)?).ok()?;
    let totals_end = 3usize.checked_add(keys.checked_mul(2)?)?;
    let totals = totals(pieces.get(3..totals_end)?)?;
    let now = Instant::now();
    let messages = pieces[totals_end..]
        .iter()
        .map(|entry| decode_entry(entry, unix_ms_now, now))
        .collect::<Option<Vec<_>>>()?;
    let snapshot = Snapshot {
        epoch,
        seq,
        messages,
        totals,
    };
    Some((number(n)?, room.into(), Some(snapshot)))
}

/// A marker as published on the control channel: `marker <number>`, in ASCII so that
/// `redis-cli MONITOR` reads it.
pub fn encode_marker(seq: u64) -> Vec<u8> {
    format!("marker {seq}").into_bytes()
}

/// The inverse of `encode_marker`; `None` for anything else.
pub fn decode_marker(wire: &[u8]) -> Option<u64> {
    let digits = wire.strip_prefix(b"marker ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The channel a room publishes to, and back.
pub fn room_channel(room: &str) -> String {
    format!("{ROOM_CHANNEL_PREFIX}{room}")
}

pub fn room_of_channel(channel: &str) -> Option<&str> {
    channel
        .strip_prefix(ROOM_CHANNEL_PREFIX)
        .filter(|room| crate::relay::hub::is_valid_room_name(room))
}

/// The channel only `instance` subscribes to.
pub fn control_channel(instance: &str) -> String {
    format!("{CONTROL_CHANNEL_PREFIX}{instance}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_backplane() -> (Backplane, Receiver<Outgoing>) {
        Backplane::new("i".into(), 1024, Duration::from_secs(3))
    }

    fn text(room: &str, text: &str) -> Message {
        Message {
            room: room.into(),
            kind: MessageKind::Text,
            payload: Bytes::from(text.to_string()),
            from: None,
            order: crate::relay::broadcaster::Order::Here,
        }
    }

    fn message(text: &str) -> Outgoing {
        Outgoing::Message(self::text("r", text), None)
    }

    /// What the broadcaster received, as texts (closes as "close").
    fn received(events: &Receiver<Event>) -> Vec<String> {
        events
            .try_iter()
            .map(|event| match event {
                Event::Message { message, .. } => {
                    String::from_utf8_lossy(&message.payload).into_owned()
                }
                Event::Close { .. } => "close".into(),
                Event::Backlogged(_) => "backlogged".into(),
                Event::Welcome { .. } => "welcome".into(),
                Event::React { .. } => "react".into(),
                Event::Reply { .. } => "reply".into(),
                Event::Tally { .. } => "tally".into(),
                Event::Totals { .. } => "totals".into(),
                Event::Snapshot { .. } => "snapshot".into(),
                Event::Sync { .. } => "sync".into(),
                Event::StreamBroken => "stream broken".into(),
                Event::LinkUp => "link up".into(),
            })
            .collect()
    }

    /// What the publisher does: take everything queued and hold it.
    fn hold_queued(backplane: &Backplane, outgoing: &Receiver<Outgoing>) {
        backplane.hold(outgoing.try_iter().collect());
    }

    #[test]
    fn wire_format_round_trips() {
        for (kind, payload) in [
            (MessageKind::Text, &b"hello"[..]),
            (MessageKind::Text, b""),
            (MessageKind::Binary, b"\x00\xff\xfeT"),
        ] {
            let plain = decode(encode(kind, payload)).unwrap();
            assert_eq!(
                (plain.sequence, plain.kind, &plain.payload[..]),
                (None, kind, payload)
            );
            let sequenced = decode(encode_sequenced(7, 42, kind, payload, None)).unwrap();
            let sequence = Some(Sequence { origin: 7, seq: 42 });
            assert_eq!(
                (sequenced.sequence, sequenced.kind, &sequenced.payload[..]),
                (sequence, kind, payload)
            );
            let from = r#"{"id":"u1","name":"Ann","verified":true}"#;
            let signed = decode(encode_sequenced(7, 42, kind, payload, Some(from))).unwrap();
            assert_eq!(signed.from.as_deref(), Some(from));
            assert_eq!((signed.kind, &signed.payload[..]), (kind, payload));
        }
        let json = decode(encode(MessageKind::Json, br#"{"a":1}"#)).unwrap();
        assert_eq!(json.kind, MessageKind::Json);
        assert!(decode(b"J{not json".to_vec()).is_none(), "J must be JSON");
        let mut bad_from = encode_sequenced(1, 1, MessageKind::Text, b"x", Some("{}"));
        bad_from[SEQUENCED_HEADER + 3] = b'<';
        assert!(decode(bad_from).is_none(), "a sender must be JSON");
        let mut short_from = encode_sequenced(1, 1, MessageKind::Text, b"", Some("{}"));
        short_from.truncate(SEQUENCED_HEADER + 4);
        assert!(decode(short_from).is_none());
        assert!(decode(b"".to_vec()).is_none());
        assert!(decode(b"Xhello".to_vec()).is_none());
        assert!(decode(b"T\xff".to_vec()).is_none());
        assert!(decode(b"S\x00\x01".to_vec()).is_none(), "short header");
        let mut no_kind = encode_sequenced(1, 1, MessageKind::Text, b"", None);
        no_kind.truncate(SEQUENCED_HEADER);
        assert!(decode(no_kind).is_none());
        let mut bad_text = encode_sequenced(1, 1, MessageKind::Text, b"", None);
        bad_text.push(0xff);
        assert!(decode(bad_text).is_none());
    }

    /// The forms the sequencing script writes, as `sequence.lua` writes them.
    #[test]
    fn the_scripts_forms_decode_and_anything_else_is_refused() {
        let body = encode_sequenced(7, 3, MessageKind::Text, b"hi", Some(r#"{"id":"u"}"#));
        let mut stamped = b"V0123abcd 42 1764230000123\n".to_vec();
        stamped.extend_from_slice(&body);
        let (stamp, decoded) = decode_stamped(stamped).unwrap();
        assert_eq!(
            (&*stamp.epoch, stamp.seq, stamp.ts_ms),
            ("0123abcd", 42, 1764230000123)
        );
        assert_eq!(decoded.sequence, Some(Sequence { origin: 7, seq: 3 }));
        assert_eq!(&decoded.payload[..], b"hi");
        for bad in [
            &b"Vbogus"[..],
            b"V0123 42\nS",
            b"Vep 0 1\n",
            b"Vep x 1\n",
            b"Vep 1 -1\n",
            b"Vep! 1 1\n",
        ] {
            let mut wire = bad.to_vec();
            wire.extend_from_slice(&body);
            assert!(
                decode_stamped(wire).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A stamp needs the sequenced form under it: a bare plain one is not ours.
        assert!(decode_stamped(b"Vep 1 1\nThi".to_vec()).is_none());

        let totals = decode_totals("Aep 5 7 9\n6:❤️2:123:abc1:0".as_bytes()).unwrap();
        assert_eq!(totals.sequence, Sequence { origin: 7, seq: 9 });
        assert_eq!(totals.seq, 5);
        assert_eq!(totals.totals.get("❤️"), Some(&12));
        assert_eq!(totals.totals.get("abc"), Some(&0));
        for bad in [
            "Aep 5 7\n",
            "Aep 5 7 9\n3:abc",
            "Aep 5 7 9\n3:abc1:x",
            "Aep 5 7 9\n9:abc",
        ] {
            assert!(decode_totals(bad.as_bytes()).is_none(), "{bad:?}");
        }

        let mut entry = b"4 1764230000000\n".to_vec();
        entry.extend_from_slice(&body);
        let mut snapshot = b"snapshot 11 stage\n2:ep1:41:13:k\xc3\xa91:2".to_vec();
        snapshot.extend_from_slice(format!("{}:", entry.len()).as_bytes());
        snapshot.extend_from_slice(&entry);
        let (n, room, snapshot) = decode_snapshot(&snapshot, 1764230000500).unwrap();
        let snapshot = snapshot.unwrap();
        assert_eq!(
            (n, &*room, &*snapshot.epoch, snapshot.seq),
            (11, "stage", "ep", 4)
        );
        assert_eq!(snapshot.totals.get("ké"), Some(&2));
        assert_eq!(snapshot.messages.len(), 1);
        assert_eq!(snapshot.messages[0].seq, 4);
        assert_eq!(&snapshot.messages[0].payload[..], b"hi");
        // No state in Redis: a header alone.
        let (_, _, none) = decode_snapshot(b"snapshot 12 stage\n", 0).unwrap();
        assert!(none.is_none());
        for bad in [
            &b"snapshot 12 bad room\n"[..],
            b"snapshot x stage\n",
            b"snapshot 12 stage\n2:ep",
            b"snapshot 12 stage\n2:ep1:41:9",
            b"snapshot 12 stage\n2:ep1:41:05:junk!",
        ] {
            assert!(
                decode_snapshot(bad, 0).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn markers_round_trip_and_nothing_else_is_one() {
        assert_eq!(decode_marker(&encode_marker(0)), Some(0));
        assert_eq!(decode_marker(&encode_marker(u64::MAX)), Some(u64::MAX));
        for bad in [
            &b"marker "[..],
            b"marker +1",
            b"marker 1x",
            b"marker 18446744073709551616",
            b"Marker 1",
            b"hello",
        ] {
            assert_eq!(
                decode_marker(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn channels_name_rooms_and_instances() {
        assert_eq!(room_channel("stage"), "roomcast:room:stage");
        assert_eq!(room_of_channel("roomcast:room:stage"), Some("stage"));
        assert_eq!(room_of_channel("roomcast:room:a b"), None);
        assert_eq!(room_of_channel("other:stage"), None);
        // The control channel is outside the rooms' pattern.
        let control = control_channel("127.0.0.1:9001-1-ff");
        assert_eq!(control, "roomcast:control:127.0.0.1:9001-1-ff");
        assert_eq!(room_of_channel(&control), None);
    }

    #[test]
    fn link_is_up_only_with_both_sides_and_counts_outages() {
        let (backplane, _outgoing) = new_backplane();
        backplane.set_side(Side::Publisher, true);
        assert!(!backplane.is_up());
        assert!(backplane.is_connected(Side::Publisher));
        assert!(!backplane.is_connected(Side::Subscriber));
        backplane.set_side(Side::Subscriber, true);
        assert!(backplane.is_up());
        backplane.set_side(Side::Subscriber, false);
        backplane.set_side(Side::Publisher, false);
        assert!(!backplane.is_up());
        assert_eq!(backplane.outages.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_says_so() {
        let (backplane, outgoing) = new_backplane();
        let large = || {
            Outgoing::Message(
                Message {
                    kind: MessageKind::Binary,
                    payload: Bytes::from(vec![0; 1024 * 1024]),
                    ..text("r", "")
                },
                None,
            )
        };
        let results: Vec<Relayed> = (0..20).map(|_| backplane.publish(large())).collect();
        assert_eq!(outgoing.len(), 16, "bounded by bytes");
        assert!(results[..16].iter().all(|r| *r == Relayed::Queued));
        assert!(results[16..].iter().all(|r| *r == Relayed::Dropped));
        assert_eq!(backplane.dropped_queue_full.load(Ordering::Relaxed), 4);
        // Bytes stay counted while held, and are released as the ledger delivers.
        hold_queued(&backplane, &outgoing);
        assert_eq!(backplane.publish(large()), Relayed::Dropped);
        let (events, _delivered) = Events::channel(1 << 16, usize::MAX);
        assert_eq!(backplane.deliver_all(&events), 16);
        assert_eq!(backplane.publish(large()), Relayed::Queued);

        // By count, too.
        let (backplane, _outgoing) = new_backplane();
        for _ in 0..PUBLISH_QUEUE_MESSAGES {
            assert_eq!(backplane.publish(message("m")), Relayed::Queued);
        }
        assert_eq!(backplane.publish(message("m")), Relayed::Dropped);
    }

    #[test]
    fn a_stopped_publisher_is_not_a_full_queue() {
        let (backplane, outgoing) = new_backplane();
        drop(outgoing);
        assert_eq!(backplane.publish(message("m")), Relayed::Stopped);
        assert_eq!(backplane.dropped_queue_full.load(Ordering::Relaxed), 0);
        let (events, delivered) = Events::channel(1 << 16, usize::MAX);
        let close = close_event();
        assert!(relay_in_order(
            Some(&backplane),
            &events,
            close,
            Instant::now()
        ));
        assert_eq!(received(&delivered), ["close"], "took the local path");
    }

    fn close_event() -> Event {
        let stats = Arc::new(crate::stats::Stats::default());
        let (client, _peer) = crate::relay::client::Client::on_loopback(1, "r", 1 << 20, stats);
        let (done, _queued) = crossbeam_channel::bounded(1);
        Event::Close {
            client: Arc::new(client),
            code: tungstenite::protocol::frame::coding::CloseCode::Policy,
            reason: "test",
            done,
        }
    }

    #[test]
    fn a_close_queues_behind_the_messages_before_it() {
        let (backplane, outgoing) = new_backplane();
        let (events, delivered) = Events::channel(1 << 16, usize::MAX);
        let relay_text = |text: &str| relay(Some(&backplane), &events, self::text("r", text));
        assert_eq!(relay_text("a"), Relayed::Queued);
        assert_eq!(relay_text("b"), Relayed::Queued);
        assert!(relay_in_order(
            Some(&backplane),
            &events,
            close_event(),
            Instant::now()
        ));
        assert!(delivered.is_empty(), "nothing overtakes the queue");
        hold_queued(&backplane, &outgoing);
        // The subscriber got the close's marker (number 3) back from Redis.
        assert_eq!(backplane.deliver_through(3, None, &events), Ok(3));
        assert_eq!(received(&delivered), ["a", "b", "close"]);
    }

    #[test]
    fn the_ledger_delivers_each_event_once_in_number_order() {
        let (backplane, outgoing) = new_backplane();
        let (events, delivered) = Events::channel(1 << 16, usize::MAX);
        for text in ["1", "2", "3", "4"] {
            backplane.publish(message(text));
        }
        hold_queued(&backplane, &outgoing);
        assert_eq!(backplane.last_numbered(), 4);
        // Redis brought back 2, but never 1 (lost with a subscriber connection): 1 goes first.
        assert_eq!(backplane.deliver_through(2, None, &events), Ok(2));
        assert_eq!(received(&delivered), ["1", "2"]);
        // A second copy of 2, or a late 1: nothing.
        assert_eq!(backplane.deliver_through(2, None, &events), Ok(0));
        assert_eq!(backplane.deliver_through(1, None, &events), Ok(0));
        // A number never handed out (a forgery) changes nothing.
        assert_eq!(
            backplane.deliver_through(5, None, &events),
            Err(NeverNumbered)
        );
        assert_eq!(backplane.held(), 2);
        // Degraded: the rest goes locally, in order; Redis's copies later are duplicates.
        assert_eq!(backplane.deliver_all(&events), 2);
        assert_eq!(received(&delivered), ["3", "4"]);
        assert_eq!(backplane.deliver_through(4, None, &events), Ok(0));
        // Numbering goes on from there.
        backplane.publish(message("5"));
        hold_queued(&backplane, &outgoing);
        assert_eq!(backplane.deliver_through(5, None, &events), Ok(1));
        assert_eq!(received(&delivered), ["5"]);
    }

    #[test]
    fn a_full_ledger_makes_the_publisher_wait_until_it_drains() {
        let (backplane, _outgoing) = new_backplane();
        backplane.hold((0..MAX_HELD_EVENTS).map(|_| message("m")).collect());
        let started = Instant::now();
        backplane.wait_for_ledger_room(Duration::from_millis(50));
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "did not wait"
        );
        let (events, _delivered) = Events::channel(1 << 16, usize::MAX);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                backplane.deliver_through(1, None, &events).unwrap();
            });
            let started = Instant::now();
            backplane.wait_for_ledger_room(Duration::from_secs(10));
            assert!(started.elapsed() < Duration::from_secs(5), "not woken");
        });
    }

    #[test]
    fn origins_relay_each_number_once_and_never_a_late_one() {
        let mut origins = Origins::default();
        assert!(origins.is_new(1, 1));
        assert!(origins.is_new(1, 2));
        assert!(!origins.is_new(1, 2), "second copy");
        assert!(!origins.is_new(1, 1), "late");
        assert!(origins.is_new(2, 1), "another origin counts on its own");
        assert!(origins.is_new(1, 5), "a gap (lost messages) is fine");
        // Bounded: the quietest origin is forgotten first.
        for origin in 100..100 + MAX_ORIGINS as u64 {
            origins.is_new(origin, 1);
            origins.is_new(1, origin);
        }
        assert_eq!(origins.last.len(), MAX_ORIGINS);
        assert!(!origins.is_new(1, 1), "the busy origin is still remembered");
    }

    #[test]
    fn without_a_backplane_messages_go_to_the_broadcaster() {
        let (events, delivered) = Events::channel(1 << 16, usize::MAX);
        let relayed = relay(None, &events, text("r", "x"));
        assert_eq!(relayed, Relayed::Queued);
        assert_eq!(received(&delivered), ["x"]);
        drop(delivered);
        let relayed = relay(None, &events, text("r", "x"));
        assert_eq!(relayed, Relayed::Stopped);
    }

    #[test]
    fn cluster_counts_add_local_to_remote() {
        let (backplane, _outgoing) = new_backplane();
        let remote = Presence {
            clients: 3,
            users: 2,
        };
        backplane.set_remote_rooms(2, HashMap::from([("a".to_string(), remote)]));
        let mut rooms = backplane.cluster_rooms(vec![("a".into(), 1), ("b".into(), 2)]);
        rooms.sort();
        assert_eq!(rooms, [("a".to_string(), 4), ("b".to_string(), 2)]);
        assert_eq!(backplane.cluster_room_size("a", 0), 3);
        assert_eq!(backplane.remote_presence("a"), remote);
        assert_eq!(backplane.remote_presence("b"), cluster::NO_ONE, "unknown");
        assert_eq!(backplane.instances(), 3);
    }
}
