//! The Redis backplane's shared state: how a received message reaches the room when several
//! instances share it, what the rest of the server asks of the link, and the wire format.
//!
//! With `--redis` (cargo feature `redis`), a message a client sends does not go straight to
//! this instance's broadcaster. It goes to Redis, and comes back to *every* instance (this one
//! included) through a pattern subscription:
//!
//! ```text
//!  conn thread ─► publish queue (bounded) ─► redis-publisher: PUBLISH roomcast:room:<room>
//!                                                   │
//!                                                 Redis (orders each room's messages)
//!                                                   │
//!  broadcaster ◄── events channel ◄── redis-subscriber: PSUBSCRIBE roomcast:room:*
//! ```
//!
//! Redis is thus the one point that orders a room's messages, so members on different
//! instances see the same order. The price is one round trip to Redis per message, even for
//! members on the sender's own instance.
//!
//! When Redis is unreachable the link is *degraded*: messages go to the local broadcaster, so
//! each instance keeps serving its own members, and `/healthz` says so. The threads that talk
//! to Redis live in `redis_link`; this module holds only what connection threads and endpoints
//! touch, and compiles without the `redis` feature (a server without `--redis` never builds
//! one).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};
use parking_lot::{Mutex, RwLock};
use tungstenite::Bytes;

use crate::broadcaster::{Events, MessageKind, Stopped};

/// Prefix of the channel each room publishes to: `roomcast:room:<room>`.
pub const ROOM_CHANNEL_PREFIX: &str = "roomcast:room:";
/// Prefix of each instance's presence hash, `roomcast:instance:<id>`: room → local clients.
pub const INSTANCE_KEY_PREFIX: &str = "roomcast:instance:";
/// Messages the publish queue holds. A few tens of milliseconds of peak traffic: enough to
/// ride out a slow Redis reply, small enough that a dead link is noticed before memory grows.
pub const PUBLISH_QUEUE_MESSAGES: usize = 4096;
/// Bytes the publish queue holds at most (it is never below two maximum-size messages).
pub const PUBLISH_QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// A message on its way to Redis.
#[derive(Debug)]
pub struct Outgoing {
    pub room: std::sync::Arc<str>,
    pub kind: MessageKind,
    pub payload: Bytes,
}

/// Why a message meant for Redis was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The publish queue was full: Redis is slower than the clients.
    QueueFull,
    /// A message from Redis that is not ours to relay: bad room name, unknown kind byte, or
    /// text that is not UTF-8.
    Malformed,
}

/// The two connections a working relay needs; the link is up only when both are.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    Publisher,
    Subscriber,
}

/// What the server knows about its Redis link. Shared by connection threads (which publish),
/// endpoints (health, counts, metrics) and the three `redis_link` threads (which update it).
#[derive(Debug)]
pub struct Backplane {
    /// This instance's name in Redis (its presence hash).
    pub instance: String,
    queue: Sender<Outgoing>,
    queued_bytes: AtomicUsize,
    max_queued_bytes: usize,
    /// Publisher and subscriber connected, in that order; changed together under the lock so
    /// transitions (and outages) are counted once.
    sides: Mutex<(bool, bool)>,
    /// Both sides connected: messages go through Redis. Read on every message.
    up: AtomicBool,
    /// A queue overflow was logged and not yet followed by a successful publish.
    overflow_logged: AtomicBool,
    /// Other instances' clients per room, from the last presence heartbeat.
    remote_rooms: RwLock<HashMap<String, usize>>,
    remote_instances: AtomicUsize,
    pub outages: AtomicU64,
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_malformed: AtomicU64,
    /// Heartbeat period and the TTL of the presence hash (three heartbeats).
    pub heartbeat: Duration,
    pub presence_ttl: Duration,
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
            instance,
            queue,
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: PUBLISH_QUEUE_BYTES.max(max_message_bytes.saturating_mul(2)),
            sides: Mutex::new((false, false)),
            up: AtomicBool::new(false),
            overflow_logged: AtomicBool::new(false),
            remote_rooms: RwLock::new(HashMap::new()),
            remote_instances: AtomicUsize::new(0),
            outages: AtomicU64::new(0),
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            dropped_malformed: AtomicU64::new(0),
            heartbeat: presence_ttl / 3,
            presence_ttl,
        };
        (backplane, outgoing)
    }

    /// Whether messages go through Redis (true) or straight to the local broadcaster.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Records that one side connected or lost its connection; logs and counts the change of
    /// the link as a whole.
    pub fn set_side(&self, side: Side, connected: bool) {
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
    }

    /// Queues a message for Redis without blocking. A full queue drops it, counted and logged
    /// once per episode: connection threads must never wait on Redis.
    pub fn publish(&self, message: Outgoing) {
        let len = message.payload.len();
        let fits =
            self.queued_bytes.fetch_add(len, Ordering::SeqCst) + len <= self.max_queued_bytes;
        // Full, or disconnected at shutdown: either way the message is not queued.
        let sent = fits && self.queue.try_send(message).is_ok();
        if !sent {
            self.queued_bytes.fetch_sub(len, Ordering::SeqCst);
            self.count_drop(Dropped::QueueFull);
        }
    }

    /// Called by the publisher for each message it takes off the queue.
    pub fn dequeued(&self, message: &Outgoing) {
        self.queued_bytes
            .fetch_sub(message.payload.len(), Ordering::SeqCst);
    }

    /// Called by the publisher after Redis accepted a batch.
    pub fn count_published(&self, messages: usize) {
        self.published.fetch_add(messages as u64, Ordering::Relaxed);
        if self.overflow_logged.swap(false, Ordering::Relaxed) {
            info!("redis publish queue has room again");
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
        }
    }

    /// Messages waiting for the publisher.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Replaces the other instances' room counts (the presence thread, every heartbeat).
    pub fn set_remote_rooms(&self, instances: usize, rooms: HashMap<String, usize>) {
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
        let mut rooms = self.remote_rooms.read().clone();
        for (room, clients) in local {
            *rooms.entry(room).or_default() += clients;
        }
        rooms.into_iter().filter(|(_, n)| *n > 0).collect()
    }

    /// Cluster-wide members of one room.
    pub fn cluster_room_size(&self, room: &str, local: usize) -> usize {
        local + self.remote_rooms.read().get(room).copied().unwrap_or(0)
    }
}

/// Where connection threads and the publish API send a message: Redis when the backplane is
/// up, else the local broadcaster. The error means the broadcaster has stopped (shutdown).
pub(crate) fn relay(
    backplane: Option<&Backplane>,
    events: &Events,
    room: std::sync::Arc<str>,
    kind: MessageKind,
    payload: Bytes,
) -> Result<(), Stopped> {
    match backplane {
        Some(backplane) if backplane.is_up() => {
            backplane.publish(Outgoing {
                room,
                kind,
                payload,
            });
            Ok(())
        }
        // Degraded or no backplane. A bounded channel: when the broadcaster is behind, this
        // blocks, which stops the connection thread reading, which lets TCP flow control push
        // back on the sender.
        _ => events.send_message(room, kind, payload),
    }
}

/// The payload as published: one kind byte (`T` text, `B` binary), then the message verbatim.
/// Redis strings are binary-safe, so nothing else is needed, and a backend can publish to a
/// room with `PUBLISH roomcast:room:<room> "T<text>"`.
pub fn encode(kind: MessageKind, payload: &[u8]) -> Vec<u8> {
    let mut wire = Vec::with_capacity(payload.len() + 1);
    wire.push(match kind {
        MessageKind::Text => b'T',
        MessageKind::Binary => b'B',
    });
    wire.extend_from_slice(payload);
    wire
}

/// The inverse of `encode`; `None` for anything else (unknown kind, text not UTF-8).
pub fn decode(mut wire: Vec<u8>) -> Option<(MessageKind, Bytes)> {
    let kind = match wire.first()? {
        b'T' => MessageKind::Text,
        b'B' => MessageKind::Binary,
        _ => return None,
    };
    wire.remove(0);
    if kind == MessageKind::Text && std::str::from_utf8(&wire).is_err() {
        return None;
    }
    Some((kind, Bytes::from(wire)))
}

/// The channel a room publishes to, and back.
pub fn room_channel(room: &str) -> String {
    format!("{ROOM_CHANNEL_PREFIX}{room}")
}

pub fn room_of_channel(channel: &str) -> Option<&str> {
    channel
        .strip_prefix(ROOM_CHANNEL_PREFIX)
        .filter(|room| crate::hub::is_valid_room_name(room))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_round_trips() {
        for (kind, payload) in [
            (MessageKind::Text, &b"hello"[..]),
            (MessageKind::Text, b""),
            (MessageKind::Binary, b"\x00\xff\xfeT"),
        ] {
            let (back, bytes) = decode(encode(kind, payload)).unwrap();
            assert_eq!((back, &bytes[..]), (kind, payload));
        }
        assert!(decode(b"".to_vec()).is_none());
        assert!(decode(b"Xhello".to_vec()).is_none());
        assert!(decode(b"T\xff".to_vec()).is_none());
    }

    #[test]
    fn channels_name_rooms() {
        assert_eq!(room_channel("stage"), "roomcast:room:stage");
        assert_eq!(room_of_channel("roomcast:room:stage"), Some("stage"));
        assert_eq!(room_of_channel("roomcast:room:a b"), None);
        assert_eq!(room_of_channel("other:stage"), None);
    }

    #[test]
    fn link_is_up_only_with_both_sides_and_counts_outages() {
        let (backplane, _outgoing) = Backplane::new("i".into(), 1024, Duration::from_secs(3));
        backplane.set_side(Side::Publisher, true);
        assert!(!backplane.is_up());
        backplane.set_side(Side::Subscriber, true);
        assert!(backplane.is_up());
        backplane.set_side(Side::Subscriber, false);
        backplane.set_side(Side::Publisher, false);
        assert!(!backplane.is_up());
        assert_eq!(backplane.outages.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (backplane, outgoing) = Backplane::new("i".into(), 1024, Duration::from_secs(3));
        let message = || Outgoing {
            room: "r".into(),
            kind: MessageKind::Binary,
            payload: Bytes::from(vec![0; 1024 * 1024]),
        };
        for _ in 0..20 {
            backplane.publish(message());
        }
        assert_eq!(outgoing.len(), 16, "bounded by bytes");
        assert_eq!(backplane.dropped_queue_full.load(Ordering::Relaxed), 4);
        for message in outgoing.try_iter() {
            backplane.dequeued(&message);
        }
        backplane.publish(message());
        assert_eq!(outgoing.len(), 1);
    }

    #[test]
    fn cluster_counts_add_local_to_remote() {
        let (backplane, _outgoing) = Backplane::new("i".into(), 1024, Duration::from_secs(3));
        backplane.set_remote_rooms(2, HashMap::from([("a".to_string(), 3)]));
        let mut rooms = backplane.cluster_rooms(vec![("a".into(), 1), ("b".into(), 2)]);
        rooms.sort();
        assert_eq!(rooms, [("a".to_string(), 4), ("b".to_string(), 2)]);
        assert_eq!(backplane.cluster_room_size("a", 0), 3);
        assert_eq!(backplane.instances(), 3);
    }
}
