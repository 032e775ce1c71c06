//! What a room keeps beyond its member list: its epoch, its message sequence, the messages it
//! retains for joins and resumes, and its reaction totals.
//!
//! Every message in a room, from a plain client, a v1 client or the backend, gets the room's
//! next `seq` from the broadcaster, the one thread that orders messages, so `seq` is the
//! room's order itself. The `epoch` names one life of that sequence: when a room's state is
//! dropped (`--room-ttl` after its last member left), or its history is given up to the
//! history budget, a client holding an old epoch can tell that its numbers no longer lead
//! anywhere, and is not told it recovered.
//!
//! The broadcaster alone creates, advances and drops states. The HTTP side reads them (the
//! rooms API, `GET .../history`) through the same `Arc`s. The history and the totals sit
//! behind their own small mutexes, taken by the broadcaster once per message or tap and by a
//! reader for one copy; the `seq` is an atomic, so numbering a message takes no lock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tungstenite::Bytes;

use crate::relay::broadcaster::MessageKind;

/// What one retained message costs the history budget beyond its payload and sender: the
/// entry itself and its share of the ring's allocation.
pub const RETAINED_OVERHEAD_BYTES: usize = 96;
/// Where an instance that cannot reach Redis numbers its rooms' messages from: 2^40, far
/// above any seq Redis will assign, so a client that saw such a number and resumes through an
/// instance that follows Redis asks for a seq beyond the room's and is told `recovered:false`,
/// never handed a gap of other messages.
pub const LOCAL_SEQ_BASE: u64 = 1 << 40;
/// Distinct reaction keys a room counts at most (PROTOCOL §3); taps of more are dropped.
pub const MAX_ROOM_REACTION_KEYS: usize = 64;

/// One retained message: what its `message` frame is made of, encoded only when asked for.
#[derive(Clone, Debug)]
pub struct Retained {
    pub seq: u64,
    pub ts_ms: u64,
    pub from: Option<Arc<str>>,
    pub kind: MessageKind,
    pub payload: Bytes,
    /// When it was retained, for `--history-ttl`.
    pub at: Instant,
}

impl Retained {
    fn cost(&self) -> usize {
        self.payload.len()
            + self.from.as_ref().map_or(0, |from| from.len())
            + RETAINED_OVERHEAD_BYTES
    }

    /// Appends its `message` frame's JSON.
    pub fn push_json(&self, out: &mut Vec<u8>) {
        crate::v1::codec::push_message(
            out,
            self.seq,
            self.ts_ms,
            self.from.as_deref(),
            self.kind,
            &self.payload,
        );
    }
}

/// A room as Redis holds it at one point of its stream (the answer to a join's request).
#[derive(Debug)]
pub struct Snapshot {
    pub epoch: String,
    pub seq: u64,
    /// Oldest first.
    pub messages: Vec<Retained>,
    pub totals: BTreeMap<String, u64>,
}

/// `messages` as their `message` frames, comma-separated (the inside of a JSON array), oldest
/// first: the newest that fit within `budget` bytes. Returns whether all of them did.
pub fn messages_json(messages: &[Retained], budget: usize) -> (String, bool) {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut bytes = 0;
    for message in messages.iter().rev() {
        let mut json = Vec::new();
        message.push_json(&mut json);
        bytes += json.len() + 1;
        if bytes > budget {
            break;
        }
        frames.push(json);
    }
    let complete = frames.len() == messages.len();
    let mut out = Vec::with_capacity(bytes);
    for (i, json) in frames.iter().rev().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(json);
    }
    // Every piece is JSON that `push_message` wrote from checked parts.
    (String::from_utf8(out).unwrap_or_default(), complete)
}

/// A room's retained messages, oldest first, always the latest ones without a gap.
#[derive(Debug, Default)]
pub struct History {
    entries: VecDeque<Retained>,
    bytes: usize,
}

impl History {
    /// The retained messages with `seq` after `since`, none older than `ttl`.
    pub fn after(&self, since: u64, now: Instant, ttl: Duration) -> Vec<Retained> {
        self.entries
            .iter()
            .filter(|m| m.seq > since && now.saturating_duration_since(m.at) < ttl)
            .cloned()
            .collect()
    }

    /// Whether every message after `since` up to `seq` is retained (and young enough): a
    /// resume from `since` then misses nothing.
    pub fn covers(&self, since: u64, seq: u64, now: Instant, ttl: Duration) -> bool {
        if since == seq {
            return true;
        }
        if since > seq {
            return false;
        }
        self.entries
            .iter()
            .find(|m| now.saturating_duration_since(m.at) < ttl)
            .is_some_and(|oldest| oldest.seq <= since + 1)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A room's reaction totals since its epoch began.
#[derive(Debug, Default)]
pub struct Reactions {
    totals: BTreeMap<String, u64>,
    /// Changed since the last `reactions` frame went out.
    changed: bool,
}

/// The room already counts `MAX_ROOM_REACTION_KEYS` other keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooManyKeys;

impl Reactions {
    pub(crate) fn add(&mut self, key: &str, taps: u64) -> Result<(), TooManyKeys> {
        if let Some(total) = self.totals.get_mut(key) {
            *total += taps;
        } else if self.totals.len() >= MAX_ROOM_REACTION_KEYS {
            return Err(TooManyKeys);
        } else {
            self.totals.insert(key.to_string(), taps);
        }
        self.changed = true;
        Ok(())
    }

    /// The totals as a JSON object, keys in order.
    pub fn totals_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (key, total)) in self.totals.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&crate::v1::codec::json_string(key));
            out.push(':');
            out.push_str(&total.to_string());
        }
        out.push('}');
        out
    }

    /// Replaces the totals with the cluster's (from Redis); changed only if they differ.
    pub(crate) fn set_totals(&mut self, totals: BTreeMap<String, u64>) {
        if self.totals != totals {
            self.totals = totals;
            self.changed = true;
        }
    }

    /// Whether the totals changed since the last call that returned true.
    pub(crate) fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }
}

/// One room's state, as readers see it.
#[derive(Debug)]
pub struct RoomState {
    /// Opaque, URL-safe (`[0-9a-f]{16}`), fresh for each life of the room.
    epoch: Mutex<Arc<str>>,
    /// The `seq` of the room's last message; 0 before the first.
    seq: AtomicU64,
    history: Mutex<History>,
    pub reactions: Mutex<Reactions>,
    /// All rooms' history bytes (shared with `RoomStates`).
    history_total: Arc<AtomicUsize>,
}

impl RoomState {
    fn new(history_total: Arc<AtomicUsize>) -> RoomState {
        RoomState {
            epoch: Mutex::new(new_epoch().into()),
            seq: AtomicU64::new(0),
            history: Mutex::new(History::default()),
            reactions: Mutex::new(Reactions::default()),
            history_total,
        }
    }

    pub fn epoch(&self) -> Arc<str> {
        self.epoch.lock().clone()
    }

    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Numbers the room's next message. Only the broadcaster calls this.
    pub(crate) fn next_seq(&self) -> u64 {
        // One writer: a load and a store, no read-modify-write needed.
        let seq = self.seq.load(Ordering::Relaxed) + 1;
        self.seq.store(seq, Ordering::Release);
        seq
    }

    /// Runs `f` on the history, after dropping what `ttl` has aged out.
    pub fn with_history<T>(&self, now: Instant, ttl: Duration, f: impl FnOnce(&History) -> T) -> T {
        let mut history = self.history.lock();
        self.expire(&mut history, now, ttl);
        f(&history)
    }

    /// Retains a message, keeping at most `limit` (the oldest go first). Only the
    /// broadcaster calls this.
    pub(crate) fn retain(&self, message: Retained, limit: usize, ttl: Duration) {
        let now = message.at;
        let mut history = self.history.lock();
        self.expire(&mut history, now, ttl);
        let cost = message.cost();
        history.entries.push_back(message);
        history.bytes += cost;
        self.history_total.fetch_add(cost, Ordering::Relaxed);
        while history.entries.len() > limit {
            self.drop_oldest(&mut history);
        }
    }

    /// Gives the whole history up (to the history budget) and starts a new epoch, since a
    /// resume can no longer be served from this one. `seq` goes on, so the members' numbers
    /// stay in order.
    pub(crate) fn forget_history(&self) {
        self.clear_history();
        *self.epoch.lock() = new_epoch().into();
        // Reaction totals run "since the room's epoch began" (PROTOCOL §4).
        let mut reactions = self.reactions.lock();
        if !reactions.totals.is_empty() {
            reactions.totals.clear();
            reactions.changed = true;
        }
    }

    /// Redis's life of the room replaces this one (another instance created it, or Redis
    /// lost its state and started anew): its epoch, its `seq` so far, none of this life's
    /// history (it belongs to another sequence) and no totals until Redis's arrive.
    pub(crate) fn adopt(&self, epoch: &str, seq: u64) {
        self.clear_history();
        *self.epoch.lock() = epoch.into();
        self.seq.store(seq, Ordering::Release);
        let mut reactions = self.reactions.lock();
        if !reactions.totals.is_empty() {
            reactions.totals.clear();
            reactions.changed = true;
        }
    }

    /// A snapshot of the room as Redis holds it: its epoch, seq, retained messages (oldest
    /// first) and totals, all at once.
    pub(crate) fn replace(
        &self,
        epoch: &str,
        seq: u64,
        messages: Vec<Retained>,
        limit: usize,
        ttl: Duration,
        totals: BTreeMap<String, u64>,
    ) {
        self.adopt(epoch, seq);
        for message in messages.into_iter().filter(|m| m.seq <= seq) {
            self.retain(message, limit, ttl);
        }
        self.reactions.lock().set_totals(totals);
    }

    /// Sets the `seq` of the room's last message to one Redis assigned. Only the broadcaster
    /// calls this.
    pub(crate) fn set_seq(&self, seq: u64) {
        self.seq.store(seq, Ordering::Release);
    }

    /// This instance numbers the room's messages itself from now on, while Redis cannot:
    /// under a new epoch, from above `LOCAL_SEQ_BASE`, so no client can take a number of
    /// this life for one of Redis's. The history stays: it is what a join still shows.
    pub(crate) fn start_local_epoch(&self) {
        *self.epoch.lock() = new_epoch().into();
        let seq = self.seq().max(LOCAL_SEQ_BASE);
        self.seq.store(seq, Ordering::Release);
    }

    /// Drops the retained messages (to the history budget) without a new epoch: the epoch is
    /// Redis's, and a snapshot can bring them back.
    pub(crate) fn clear_history(&self) {
        let mut history = self.history.lock();
        let bytes = std::mem::take(&mut history.bytes);
        history.entries.clear();
        history.entries.shrink_to_fit();
        self.history_total.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Runs `f` on the history and the epoch it belongs to, as one snapshot.
    pub fn with_history_and_epoch<T>(
        &self,
        now: Instant,
        ttl: Duration,
        f: impl FnOnce(&History, &str) -> T,
    ) -> T {
        let mut history = self.history.lock();
        self.expire(&mut history, now, ttl);
        let epoch = self.epoch();
        f(&history, &epoch)
    }

    pub fn history_bytes(&self) -> usize {
        self.history.lock().bytes
    }

    fn expire(&self, history: &mut History, now: Instant, ttl: Duration) {
        while history
            .entries
            .front()
            .is_some_and(|m| now.saturating_duration_since(m.at) >= ttl)
        {
            self.drop_oldest(history);
        }
    }

    fn drop_oldest(&self, history: &mut History) {
        if let Some(oldest) = history.entries.pop_front() {
            let cost = oldest.cost();
            history.bytes -= cost;
            self.history_total.fetch_sub(cost, Ordering::Relaxed);
        }
    }
}

impl Drop for RoomState {
    fn drop(&mut self) {
        let bytes = self.history.get_mut().bytes;
        self.history_total.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Every room with state, for readers outside the broadcaster.
#[derive(Debug, Default)]
pub struct RoomStates {
    rooms: RwLock<HashMap<Arc<str>, Arc<RoomState>>>,
    /// All rooms' history bytes: what `--history-budget` bounds.
    history_total: Arc<AtomicUsize>,
}

impl RoomStates {
    pub fn get(&self, room: &str) -> Option<Arc<RoomState>> {
        self.rooms.read().get(room).cloned()
    }

    /// A fresh state for `room`, registered for readers.
    pub(crate) fn create(&self, room: Arc<str>) -> Arc<RoomState> {
        let state = Arc::new(RoomState::new(self.history_total.clone()));
        self.rooms.write().insert(room, state.clone());
        state
    }

    pub(crate) fn remove(&self, room: &str) {
        self.rooms.write().remove(room);
    }

    pub fn len(&self) -> usize {
        self.rooms.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All rooms' history bytes now.
    pub fn history_bytes(&self) -> usize {
        self.history_total.load(Ordering::Relaxed)
    }
}

/// 64 random bits from the kernel, in hex. Unique enough that a client never mistakes one
/// life of a room for another; not a secret.
pub(crate) fn new_epoch() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: a valid, writable buffer of the length passed.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != bytes.len() as isize {
        // getrandom cannot fail for 8 bytes after boot; if it ever does, the clock and a
        // counter still make epochs distinct within this process.
        static FALLBACK: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (nanos ^ FALLBACK.fetch_add(1, Ordering::Relaxed).rotate_left(32)).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (RoomStates, Arc<RoomState>) {
        let states = RoomStates::default();
        let state = states.create("r".into());
        (states, state)
    }

    fn message(seq: u64, at: Instant) -> Retained {
        Retained {
            seq,
            ts_ms: 0,
            from: None,
            kind: MessageKind::Text,
            payload: Bytes::from(vec![b'x'; 100]),
            at,
        }
    }

    #[test]
    fn epochs_are_url_safe_and_differ() {
        let (_states, a) = state();
        let (_states, b) = state();
        assert_ne!(a.epoch(), b.epoch());
        assert_eq!(a.epoch().len(), 16);
        assert!(a.epoch().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn seq_counts_from_one() {
        let (_states, state) = state();
        assert_eq!(state.seq(), 0);
        assert_eq!(state.next_seq(), 1);
        assert_eq!(state.next_seq(), 2);
        assert_eq!(state.seq(), 2);
    }

    #[test]
    fn history_keeps_the_latest_within_its_limit_and_ttl_and_counts_its_bytes() {
        let (states, state) = state();
        let ttl = Duration::from_secs(60);
        let t0 = Instant::now();
        for seq in 1..=10 {
            state.retain(message(seq, t0), 4, ttl);
        }
        let seqs = |since, now| {
            state.with_history(now, ttl, |h| {
                h.after(since, now, ttl)
                    .iter()
                    .map(|m| m.seq)
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(seqs(0, t0), [7, 8, 9, 10]);
        assert_eq!(seqs(8, t0), [9, 10]);
        assert_eq!(states.history_bytes(), 4 * (100 + RETAINED_OVERHEAD_BYTES));
        assert!(state.with_history(t0, ttl, |h| h.covers(6, 10, t0, ttl)));
        assert!(
            !state.with_history(t0, ttl, |h| h.covers(5, 10, t0, ttl)),
            "seq 6 is gone"
        );
        assert!(state.with_history(t0, ttl, |h| h.covers(10, 10, t0, ttl)));
        assert!(
            !state.with_history(t0, ttl, |h| h.covers(11, 10, t0, ttl)),
            "beyond seq"
        );
        // Past the TTL nothing is retained, and the bytes are given back.
        let later = t0 + ttl;
        assert_eq!(seqs(0, later), Vec::<u64>::new());
        assert_eq!(states.history_bytes(), 0);
        assert!(!state.with_history(later, ttl, |h| h.covers(9, 10, later, ttl)));
    }

    #[test]
    fn forgetting_the_history_starts_a_new_epoch_and_seq_goes_on() {
        let (states, state) = state();
        let epoch = state.epoch();
        state.next_seq();
        state.retain(message(1, Instant::now()), 10, Duration::from_secs(60));
        state.forget_history();
        assert_ne!(state.epoch(), epoch);
        assert_eq!(states.history_bytes(), 0);
        assert_eq!(state.next_seq(), 2);
        // A dropped state gives its bytes back too.
        state.retain(message(2, Instant::now()), 10, Duration::from_secs(60));
        assert!(states.history_bytes() > 0);
        states.remove("r");
        drop(state);
        assert_eq!(states.history_bytes(), 0);
    }

    #[test]
    fn reactions_total_up_to_64_keys() {
        let mut reactions = Reactions::default();
        assert!(!reactions.take_changed());
        reactions.add("👏", 2).unwrap();
        reactions.add("❤️", 1).unwrap();
        reactions.add("👏", 1).unwrap();
        assert!(reactions.take_changed());
        assert!(!reactions.take_changed());
        let totals: serde_json::Value = serde_json::from_str(&reactions.totals_json()).unwrap();
        assert_eq!(totals, serde_json::json!({"👏": 3, "❤️": 1}));
        for n in 2..MAX_ROOM_REACTION_KEYS {
            reactions.add(&format!("k{n}"), 1).unwrap();
        }
        assert_eq!(reactions.add("one-too-many", 1), Err(TooManyKeys));
        reactions.add("👏", 1).unwrap();
    }
}
