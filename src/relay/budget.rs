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

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::{self, Thread};
use std::time::Duration;

use parking_lot::Mutex;

/// Bytes of message payload the event channel may hold at once (the largest message is
/// admitted even when it is bigger). About 16 ms of a saturated 1 GB/s loopback: enough to keep
/// the broadcaster fed, small enough not to matter next to the outboxes.
pub const EVENT_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// How often a waiting sender re-checks on its own. Waking is by `unpark`; this only bounds
/// the cost of a wake-up that never comes.
const RECHECK: Duration = Duration::from_millis(100);

/// Bytes in flight towards the broadcaster. Shared as `Arc<Budget>` by every sender
/// (connection threads, the publish endpoint, the Redis threads) and the broadcaster.
///
/// Senders that must wait are served in arrival order: a large message waits its turn rather
/// than forever behind a stream of small ones that each fit, and a release wakes only the
/// sender at the head of the line, not every waiter.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    /// Senders waiting for room, oldest first.
    waiting: VecDeque<Waiter>,
    next_ticket: u64,
    /// Set when the broadcaster stops: nothing will return bytes any more, so waiting senders
    /// give up instead of blocking forever.
    is_closed: bool,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    bytes: usize,
    thread: Thread,
}

impl State {
    /// Whether `bytes` more fit: always when nothing is in flight, so the largest legal
    /// message gets through however big it is.
    fn fits(&self, limit: usize, bytes: usize) -> bool {
        self.in_flight == 0 || self.in_flight + bytes <= limit
    }

    /// Wakes the sender at the head of the line if its message fits now.
    fn wake_head(&self, limit: usize) {
        if let Some(head) = self.waiting.front() {
            if self.fits(limit, head.bytes) {
                head.thread.unpark();
            }
        }
    }
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            state: Mutex::new(State::default()),
        })
    }

    /// Takes `bytes` from the budget, blocking while it is spent or others wait before this
    /// sender. `None` once it is closed.
    pub fn acquire(self: &Arc<Budget>, bytes: usize) -> Option<Permit> {
        let mut state = self.state.lock();
        if state.is_closed {
            return None;
        }
        if state.waiting.is_empty() && state.fits(self.limit, bytes) {
            return Some(self.grant(&mut state, bytes));
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.waiting.push_back(Waiter {
            ticket,
            bytes,
            thread: thread::current(),
        });
        loop {
            if state.is_closed {
                state.waiting.retain(|w| w.ticket != ticket);
                return None;
            }
            let is_head = state.waiting.front().is_some_and(|w| w.ticket == ticket);
            if is_head && state.fits(self.limit, bytes) {
                state.waiting.pop_front();
                let permit = self.grant(&mut state, bytes);
                // The next in line may fit too.
                state.wake_head(self.limit);
                return Some(permit);
            }
            // Unlocked while parked; an `unpark` that comes first is not lost (it makes the
            // next park return at once).
            drop(state);
            thread::park_timeout(RECHECK);
            state = self.state.lock();
        }
    }

    fn grant(self: &Arc<Budget>, state: &mut State, bytes: usize) -> Permit {
        state.in_flight += bytes;
        Permit {
            budget: self.clone(),
            bytes,
        }
    }

    /// Refuses all further permits and wakes every waiting sender. Called when the broadcaster
    /// stops (also when it panics), since only it returns bytes.
    pub fn close(&self) {
        let mut state = self.state.lock();
        state.is_closed = true;
        for waiter in &state.waiting {
            waiter.thread.unpark();
        }
    }

    /// Payload bytes on their way to the broadcaster now.
    pub fn in_flight(&self) -> usize {
        self.state.lock().in_flight
    }

    fn release(&self, bytes: usize) {
        let mut state = self.state.lock();
        state.in_flight -= bytes;
        state.wake_head(self.limit);
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

    /// A message as large as the whole budget fits only when nothing is in flight; a stream of
    /// small ones that each fit must not keep it waiting forever.
    #[test]
    fn waiters_are_served_in_order_so_a_large_message_is_not_starved() {
        let budget = Budget::new(100);
        let held = budget.acquire(10).unwrap();
        let large = {
            let budget = budget.clone();
            thread::spawn(move || budget.acquire(100).map(|p| p.bytes))
        };
        // Wait until the large message is in line.
        while budget.state.lock().waiting.is_empty() {
            thread::sleep(Duration::from_millis(1));
        }
        // A small sender arriving now queues behind it instead of overtaking it.
        let small = {
            let budget = budget.clone();
            thread::spawn(move || budget.acquire(10).map(|p| p.bytes))
        };
        while budget.state.lock().waiting.len() < 2 {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(!large.is_finished() && !small.is_finished());
        drop(held);
        assert_eq!(large.join().unwrap(), Some(100));
        assert_eq!(small.join().unwrap(), Some(10));
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
