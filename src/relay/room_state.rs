//! What a room keeps beyond its member list: its epoch and its message sequence.
//!
//! Every message in a room, from a plain client, a v1 client or the backend, gets the room's
//! next `seq` from the broadcaster, the one thread that orders messages, so `seq` is the
//! room's order itself. The `epoch` names one life of that sequence: when a room's state is
//! dropped (`--room-ttl` after its last member left) a later join starts a new epoch, and a
//! client holding an old `seq` can tell its numbers mean nothing any more.
//!
//! The broadcaster alone creates, advances and drops states. The HTTP side reads them (a
//! room's `seq` in the rooms API) through the same `Arc`s, so a read never waits for the
//! broadcaster and the broadcaster never takes a lock to number a message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

/// One room's state, as readers see it.
#[derive(Debug)]
pub struct RoomState {
    /// Opaque, URL-safe (`[0-9a-f]{16}`), fresh for each life of the room.
    pub epoch: Arc<str>,
    /// The `seq` of the room's last message; 0 before the first.
    seq: AtomicU64,
}

impl RoomState {
    pub fn new() -> RoomState {
        RoomState {
            epoch: new_epoch().into(),
            seq: AtomicU64::new(0),
        }
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
}

impl Default for RoomState {
    fn default() -> RoomState {
        RoomState::new()
    }
}

/// Every room with state, for readers outside the broadcaster.
#[derive(Debug, Default)]
pub struct RoomStates {
    rooms: RwLock<HashMap<Arc<str>, Arc<RoomState>>>,
}

impl RoomStates {
    pub fn get(&self, room: &str) -> Option<Arc<RoomState>> {
        self.rooms.read().get(room).cloned()
    }

    pub(crate) fn insert(&self, room: Arc<str>, state: Arc<RoomState>) {
        self.rooms.write().insert(room, state);
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
}

/// 64 random bits from the kernel, in hex. Unique enough that a client never mistakes one
/// life of a room for another; not a secret.
fn new_epoch() -> String {
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

    #[test]
    fn epochs_are_url_safe_and_differ() {
        let (a, b) = (RoomState::new(), RoomState::new());
        assert_ne!(a.epoch, b.epoch);
        assert_eq!(a.epoch.len(), 16);
        assert!(a.epoch.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn seq_counts_from_one() {
        let state = RoomState::new();
        assert_eq!(state.seq(), 0);
        assert_eq!(state.next_seq(), 1);
        assert_eq!(state.next_seq(), 2);
        assert_eq!(state.seq(), 2);
    }
}
