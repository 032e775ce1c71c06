//! Counters every thread bumps and anyone may read: the shutdown summary, tests, and (later)
//! the metrics endpoint. Relaxed atomics: each counter is independent and only ever summed.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Why the server removed a client against its will.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Its outbox overflowed or stayed backlogged past `--slow-timeout`.
    Slow,
    /// It sent faster than `--rate`/`--burst` allow (close 1008).
    Rate,
    /// It sent a message over `--max-message-bytes` (close 1009).
    Size,
    /// Nothing arrived from it for `--idle-timeout`.
    Idle,
    /// A moderator removed it (close 4003).
    Moderated,
    /// It sent a data message without the right to post (close 1008).
    Forbidden,
}

impl Eviction {
    pub const ALL: [Eviction; 6] = [
        Eviction::Slow,
        Eviction::Rate,
        Eviction::Size,
        Eviction::Idle,
        Eviction::Moderated,
        Eviction::Forbidden,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Eviction::Slow => "slow",
            Eviction::Rate => "rate",
            Eviction::Size => "size",
            Eviction::Idle => "idle",
            Eviction::Moderated => "moderated",
            Eviction::Forbidden => "forbidden",
        }
    }
}

impl fmt::Display for Eviction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Eviction::Slow => "too slow to keep up (outbox over its bound or backlogged too long)",
            Eviction::Rate => "over its message rate",
            Eviction::Size => "message over the size limit",
            Eviction::Idle => "idle past the idle timeout",
            Eviction::Moderated => "removed by a moderator",
            Eviction::Forbidden => "posted without the right to post",
        })
    }
}

/// Why a connection was refused before any thread was spawned for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-clients` connections already held.
    Capacity,
    /// `--max-clients-per-ip` connections already held from that address.
    PerIp,
    /// The OS would not give us another thread.
    Spawn,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::Capacity, Refusal::PerIp, Refusal::Spawn];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Capacity => "capacity",
            Refusal::PerIp => "per_ip",
            Refusal::Spawn => "spawn_failed",
        }
    }
}

/// Server-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connection threads alive right now (handshaking or upgraded). Incremented by the
    /// acceptor before spawning, decremented by the thread's last act.
    pub connection_threads: AtomicUsize,
    /// Connection threads done with their connection and waiting for another (see `workers`).
    pub idle_workers: AtomicUsize,
    pub connections_accepted: AtomicU64,
    pub refused_capacity: AtomicU64,
    pub refused_per_ip: AtomicU64,
    pub refused_spawn: AtomicU64,
    /// Clients that completed the WebSocket handshake.
    pub clients_served: AtomicU64,
    /// Messages received from clients and handed to the broadcaster.
    pub messages_received: AtomicU64,
    /// Messages a backend published through `POST /api/rooms/<room>/messages`.
    pub messages_published: AtomicU64,
    /// Messages the broadcaster relayed to a room (once per message, not per receiver).
    pub messages_relayed: AtomicU64,
    /// Frames queued to receivers (once per receiver).
    pub messages_delivered: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub evicted_slow: AtomicU64,
    pub evicted_rate: AtomicU64,
    pub evicted_size: AtomicU64,
    pub evicted_idle: AtomicU64,
    pub evicted_moderated: AtomicU64,
    pub evicted_forbidden: AtomicU64,
    /// Upgrades refused for their join token, by reason (`expired`, `bad_signature`, ...,
    /// `banned`, `too_many_connections`). The reasons are a small fixed set of labels.
    pub auth_refused: parking_lot::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// `error` frames sent to v1 clients.
    pub v1_errors_sent: AtomicU64,
    /// Reaction taps counted into a room's totals, and dropped: over the user's reaction
    /// bucket, a key `--reaction-keys` does not allow, a room's 65th key.
    pub reactions_counted: AtomicU64,
    pub reactions_dropped_rate: AtomicU64,
    pub reactions_dropped_key: AtomicU64,
    pub reactions_dropped_full: AtomicU64,
    /// `presence` and `reactions` frames sent (once per room and send, not per member).
    pub presence_frames: AtomicU64,
    pub reaction_frames: AtomicU64,
    /// Resumes (`since` and `epoch` on the upgrade) that recovered, and that did not.
    pub resumes_recovered: AtomicU64,
    pub resumes_failed: AtomicU64,
    /// Rooms that gave their history up to `--history-budget`.
    pub histories_given_up: AtomicU64,
    /// With Redis: room snapshots asked for by joins, and those that did not come in time
    /// (the joins were answered from this instance's state).
    pub snapshots_requested: AtomicU64,
    pub snapshots_missed: AtomicU64,
    /// With Redis: v1 members sent a second `welcome` because their room's epoch changed
    /// under them (see `Broadcaster::rewelcome`).
    pub rewelcomes: AtomicU64,
}

impl Stats {
    pub fn count_eviction(&self, reason: Eviction) {
        self.eviction_counter(reason)
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn evictions(&self, reason: Eviction) -> u64 {
        self.eviction_counter(reason).load(Ordering::Relaxed)
    }

    fn eviction_counter(&self, reason: Eviction) -> &AtomicU64 {
        match reason {
            Eviction::Slow => &self.evicted_slow,
            Eviction::Rate => &self.evicted_rate,
            Eviction::Size => &self.evicted_size,
            Eviction::Idle => &self.evicted_idle,
            Eviction::Moderated => &self.evicted_moderated,
            Eviction::Forbidden => &self.evicted_forbidden,
        }
    }

    pub fn count_resume(&self, recovered: bool) {
        let counter = if recovered {
            &self.resumes_recovered
        } else {
            &self.resumes_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_auth_refusal(&self, reason: &'static str) {
        *self.auth_refused.lock().entry(reason).or_default() += 1;
    }

    pub fn count_refusal(&self, reason: Refusal) {
        self.refusal_counter(reason).fetch_add(1, Ordering::Relaxed);
    }

    pub fn refusals(&self, reason: Refusal) -> u64 {
        self.refusal_counter(reason).load(Ordering::Relaxed)
    }

    fn refusal_counter(&self, reason: Refusal) -> &AtomicU64 {
        match reason {
            Refusal::Capacity => &self.refused_capacity,
            Refusal::PerIp => &self.refused_per_ip,
            Refusal::Spawn => &self.refused_spawn,
        }
    }

    /// Connection threads alive now.
    pub fn threads(&self) -> usize {
        self.connection_threads.load(Ordering::SeqCst)
    }
}
