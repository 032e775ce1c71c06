//! Users across their connections: the connection cap, the shared rate limit and bans.
//!
//! A verified user (a token's `sub`) may hold several connections, or drop and reconnect in a
//! loop; the limits are about the user, not one socket, so they live here, keyed by `sub`,
//! rather than in a connection thread. Anonymous (open-mode) clients never come here: each is
//! its own user, limited by its own connection's bucket.
//!
//! One mutex guards the maps. It is taken at upgrades, leaves and moderation only; the
//! per-message rate check locks the user's own bucket, never the maps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::relay::ratelimit::TokenBucket;

/// Bans held at most. A raid of fresh accounts could otherwise grow the list without end;
/// expired bans are dropped first, and past this a new ban is refused (`503`), loudly.
pub const MAX_BANS: usize = 100_000;
/// Users remembered below which the map is never pruned.
const MIN_PRUNE_AT: usize = 1024;

/// One user's shared state.
#[derive(Debug)]
pub struct User {
    /// The message rate limit of all this user's connections together.
    pub bucket: Mutex<TokenBucket>,
    /// The reaction rate limit (`--reaction-rate`, `--reaction-burst`), likewise shared.
    pub reactions: Mutex<TokenBucket>,
    /// Connections held now. Changed only under the `Users` lock, so a check and its
    /// increment cannot interleave with another; atomic only so `User` needs no second lock.
    connections: AtomicUsize,
}

#[derive(Debug, Default)]
struct Maps {
    /// Users with connections, and users gone recently whose bucket has not refilled yet: a
    /// reconnect finds its old bucket, so reconnecting does not reset the rate limit.
    users: HashMap<Arc<str>, Arc<User>>,
    /// `(room, user)` → when the ban ends.
    bans: HashMap<(Arc<str>, Arc<str>), Instant>,
    /// The map size at which `users` is next pruned of idle users with full buckets.
    prune_at: usize,
}

/// Every user with a connection or a recent one, and every ban.
#[derive(Debug, Default)]
pub struct Users {
    maps: Mutex<Maps>,
}

/// Why a user may not connect now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooManyConnections;

/// The ban list is full of bans that have not expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BansFull;

/// A user's place, held for one connection's life: dropping it gives the place back.
#[derive(Debug)]
pub struct Seat<'a> {
    users: &'a Users,
    pub user: Arc<User>,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        let _maps = self.users.maps.lock();
        self.user.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Users {
    pub fn new() -> Users {
        Users::default()
    }

    /// Takes a connection place for `name`, unless it already holds `max_connections`
    /// (0: no cap). A new user starts with full buckets: `messages` and `reactions` are each a
    /// (rate per second, burst).
    pub fn admit(
        &self,
        name: &Arc<str>,
        max_connections: usize,
        messages: (u32, u32),
        reactions: (u32, u32),
        now: Instant,
    ) -> Result<Seat<'_>, TooManyConnections> {
        let mut maps = self.maps.lock();
        if maps.users.len() >= maps.prune_at.max(MIN_PRUNE_AT) {
            maps.users.retain(|_, user| {
                user.connections.load(Ordering::Relaxed) > 0
                    || !user.bucket.lock().is_full(now)
                    || !user.reactions.lock().is_full(now)
            });
            maps.prune_at = 2 * maps.users.len();
        }
        let user = maps
            .users
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(User {
                    bucket: Mutex::new(TokenBucket::new(messages.0, messages.1, now)),
                    reactions: Mutex::new(TokenBucket::new(reactions.0, reactions.1, now)),
                    connections: AtomicUsize::new(0),
                })
            })
            .clone();
        if max_connections > 0 && user.connections.load(Ordering::Relaxed) >= max_connections {
            return Err(TooManyConnections);
        }
        user.connections.fetch_add(1, Ordering::Relaxed);
        Ok(Seat { users: self, user })
    }

    /// Bans `user` from `room` for `duration` (a later, longer ban extends it).
    pub fn ban(
        &self,
        room: &str,
        user: &str,
        duration: Duration,
        now: Instant,
    ) -> Result<(), BansFull> {
        let mut maps = self.maps.lock();
        let key: (Arc<str>, Arc<str>) = (room.into(), user.into());
        if maps.bans.len() >= MAX_BANS && !maps.bans.contains_key(&key) {
            maps.bans.retain(|_, until| *until > now);
            if maps.bans.len() >= MAX_BANS {
                return Err(BansFull);
            }
        }
        let until = now + duration;
        let ban = maps.bans.entry(key).or_insert(until);
        *ban = (*ban).max(until);
        Ok(())
    }

    /// Whether `user` is banned from `room` at `now`. An expired ban is forgotten here.
    pub fn is_banned(&self, room: &str, user: &str, now: Instant) -> bool {
        let mut maps = self.maps.lock();
        let key: (Arc<str>, Arc<str>) = (room.into(), user.into());
        match maps.bans.get(&key) {
            Some(until) if *until > now => true,
            Some(_) => {
                maps.bans.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Bans held now (expired ones included until they are next looked at).
    pub fn ban_count(&self) -> usize {
        self.maps.lock().bans.len()
    }

    /// Users remembered now.
    pub fn user_count(&self) -> usize {
        self.maps.lock().users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_counts_live_connections() {
        let users = Users::new();
        let ann: Arc<str> = "ann".into();
        let now = Instant::now();
        let first = users.admit(&ann, 2, (10, 10), (10, 10), now).unwrap();
        let second = users.admit(&ann, 2, (10, 10), (10, 10), now).unwrap();
        assert_eq!(
            users.admit(&ann, 2, (10, 10), (10, 10), now).unwrap_err(),
            TooManyConnections
        );
        assert!(
            users
                .admit(&"bob".into(), 2, (10, 10), (10, 10), now)
                .is_ok(),
            "per user"
        );
        drop(first);
        let third = users.admit(&ann, 2, (10, 10), (10, 10), now).unwrap();
        assert!(
            Arc::ptr_eq(&second.user, &third.user),
            "one bucket per user"
        );
    }

    #[test]
    fn a_reconnect_finds_its_spent_bucket_and_full_buckets_are_forgotten() {
        let users = Users::new();
        let now = Instant::now();
        let ann: Arc<str> = "ann".into();
        let seat = users.admit(&ann, 0, (1, 3), (1, 3), now).unwrap();
        assert!((0..3).all(|_| seat.user.bucket.lock().try_take(now)));
        drop(seat);
        let again = users.admit(&ann, 0, (1, 3), (1, 3), now).unwrap();
        assert!(!again.user.bucket.lock().try_take(now), "still spent");
        drop(again);
        // Many users come and go with full buckets: the map stays bounded.
        let later = now + Duration::from_secs(10);
        for i in 0..10 * MIN_PRUNE_AT {
            drop(
                users
                    .admit(&format!("u{i}").into(), 0, (1, 3), (1, 3), later)
                    .unwrap(),
            );
        }
        assert!(
            users.user_count() <= 2 * MIN_PRUNE_AT,
            "{}",
            users.user_count()
        );
    }

    #[test]
    fn bans_expire_extend_and_are_bounded() {
        let users = Users::new();
        let now = Instant::now();
        users.ban("r", "ann", Duration::from_secs(10), now).unwrap();
        assert!(users.is_banned("r", "ann", now));
        assert!(!users.is_banned("other", "ann", now), "per room");
        assert!(!users.is_banned("r", "bob", now));
        users.ban("r", "ann", Duration::from_secs(1), now).unwrap();
        assert!(
            users.is_banned("r", "ann", now + Duration::from_secs(5)),
            "not shortened"
        );
        assert!(!users.is_banned("r", "ann", now + Duration::from_secs(11)));
        assert_eq!(users.ban_count(), 0, "an expired ban is forgotten");

        for i in 0..MAX_BANS {
            users
                .ban("r", &format!("u{i}"), Duration::from_secs(5), now)
                .unwrap();
        }
        assert_eq!(
            users.ban("r", "one-more", Duration::from_secs(5), now),
            Err(BansFull)
        );
        // Once those expire, there is room again.
        let later = now + Duration::from_secs(6);
        users
            .ban("r", "one-more", Duration::from_secs(5), later)
            .unwrap();
        assert_eq!(users.ban_count(), 1);
    }
}
