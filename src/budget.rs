//! The byte bound of the broadcaster's event channel.
//!
//! The channel holds at most `EVENT_QUEUE_CAPACITY` events, but a count alone does not bound
//! memory: 4,096 messages of a 64 MiB `--max-message-bytes` would be 256 GiB. So every message
//! on its way to the broadcaster also holds a [`Permit`] for its payload's bytes, taken from
//! one [`Budget`] before it is sent and given back when the broadcaster has copied it into its
//! room's frames (the permit travels inside the event and is returned on drop).
//!
//! A sender that finds the budget spent blocks until the broadcaster frees some, which is the
//! same backpressure as a full channel: its connection thread stops reading, and TCP flow
//! control slows the client down. An empty budget admits any one message, however large, so
//! the largest legal message always gets through.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// Bytes of message payload the event channel may hold at once (the largest message is
/// admitted even when it is bigger). About 16 ms of a saturated 1 GB/s loopback: enough to keep
/// the broadcaster fed, small enough not to matter next to the outboxes.
pub const EVENT_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// How often a blocked sender re-checks whether the budget was closed while it waited (closing
/// also wakes everyone; this is a safety net, not the mechanism).
const RECHECK: Duration = Duration::from_millis(100);

/// Bytes in flight towards the broadcaster. Shared as `Arc<Budget>` by every sender
/// (connection threads, the publish endpoint, the Redis threads) and the broadcaster.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    state: Mutex<State>,
    /// Signalled whenever bytes are returned or the budget closes.
    freed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    /// Set when the broadcaster stops: nothing will return bytes any more, so waiting senders
    /// give up instead of blocking forever.
    is_closed: bool,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
        })
    }

    /// Takes `bytes` from the budget, blocking while it is spent. `None` once it is closed.
    pub fn acquire(self: &Arc<Budget>, bytes: usize) -> Option<Permit> {
        let mut state = self.state.lock();
        loop {
            if state.is_closed {
                return None;
            }
            if state.in_flight == 0 || state.in_flight + bytes <= self.limit {
                state.in_flight += bytes;
                return Some(Permit {
                    budget: self.clone(),
                    bytes,
                });
            }
            self.freed.wait_for(&mut state, RECHECK);
        }
    }

    /// Refuses all further permits and wakes every waiting sender. Called when the broadcaster
    /// stops (also when it panics), since only it returns bytes.
    pub fn close(&self) {
        self.state.lock().is_closed = true;
        self.freed.notify_all();
    }

    /// Payload bytes on their way to the broadcaster now.
    pub fn in_flight(&self) -> usize {
        self.state.lock().in_flight
    }

    fn release(&self, bytes: usize) {
        self.state.lock().in_flight -= bytes;
        self.freed.notify_all();
    }
}

/// A claim on `bytes` of the budget, returned when dropped.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn bounds_bytes_but_always_admits_one_message() {
        let budget = Budget::new(100);
        let a = budget.acquire(60).unwrap();
        let b = budget.acquire(40).unwrap();
        assert_eq!(budget.in_flight(), 100);
        drop((a, b));
        // Larger than the whole budget, but the budget is empty: admitted.
        let big = budget.acquire(1000).unwrap();
        assert_eq!(budget.in_flight(), 1000);
        drop(big);
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn a_spent_budget_blocks_until_bytes_return() {
        let budget = Budget::new(100);
        let held = budget.acquire(80).unwrap();
        let waiter = {
            let budget = budget.clone();
            thread::spawn(move || budget.acquire(50).map(|p| p.bytes))
        };
        thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "80 + 50 > 100 must wait");
        drop(held);
        assert_eq!(waiter.join().unwrap(), Some(50));
    }

    #[test]
    fn closing_releases_every_waiter() {
        let budget = Budget::new(10);
        let _held = budget.acquire(10).unwrap();
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                thread::spawn(move || budget.acquire(5).is_none())
            })
            .collect();
        thread::sleep(Duration::from_millis(20));
        budget.close();
        for waiter in waiters {
            assert!(waiter.join().unwrap(), "a closed budget grants nothing");
        }
    }
}
