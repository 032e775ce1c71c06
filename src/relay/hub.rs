//! The hub: every upgraded client, grouped by room, behind one `parking_lot::RwLock`.
//!
//! This is the map the Go server in our origin story wrote from many goroutines without a lock
//! (`fatal error: concurrent map writes`). Here the compiler makes that impossible: the map is
//! only reachable through the lock. Connection threads take the write lock to join and leave;
//! the broadcaster takes the read lock to walk a room. Both hold it for memory operations only:
//! the broadcaster queues frames into outboxes under it, but sends, evictions (socket shutdown)
//! and logging all happen after it is released, on lists it collected while holding it. A
//! writer waiting for the lock also holds up new readers (parking_lot is fair), so anything slow
//! under it would stall joins, leaves and every room's delivery at once.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::relay::client::{Client, Protocol};
use crate::v1::codec::Presence;

/// Rooms and their members. Shared as `Arc<Hub>` by the acceptor's connection threads and the
/// broadcaster; it lives as long as the server.
#[derive(Debug, Default)]
pub struct Hub {
    /// Written by connection threads (join on upgrade, leave on exit); read by the broadcaster
    /// for every message and every heartbeat sweep. An empty room is removed, so the map never
    /// outgrows the set of rooms with someone in them.
    rooms: RwLock<HashMap<Arc<str>, Room>>,
}

/// One room's members, kept apart by protocol: each protocol gets its own encoding of a
/// message (see `broadcaster`), so the broadcaster walks one list per encoding.
#[derive(Debug, Default)]
pub struct Room {
    pub plain: Vec<Arc<Client>>,
    pub v1: Vec<Arc<Client>>,
    /// Connections per verified user (`sub`), for the `users` count of presence.
    users: HashMap<Arc<str>, usize>,
    /// Members without a verified user: each is its own user.
    anonymous: usize,
}

impl Room {
    fn members_mut(&mut self, protocol: Protocol) -> &mut Vec<Arc<Client>> {
        match protocol {
            Protocol::Plain => &mut self.plain,
            Protocol::V1 => &mut self.v1,
        }
    }

    pub fn len(&self) -> usize {
        self.plain.len() + self.v1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn presence(&self) -> Presence {
        Presence {
            clients: self.len(),
            users: self.users.len() + self.anonymous,
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.plain.iter().chain(&self.v1)
    }
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Adds a client to its room.
    pub fn join(&self, client: Arc<Client>) {
        let mut rooms = self.rooms.write();
        let room = rooms.entry(client.room.clone()).or_default();
        match client.identity.user() {
            Some(user) => *room.users.entry(user.clone()).or_default() += 1,
            None => room.anonymous += 1,
        }
        let members = room.members_mut(client.protocol);
        client.set_member_index(members.len());
        members.push(client);
    }

    /// Removes a client from its room; returns whether it was there.
    ///
    /// O(1): each client knows its index in the member list, so ten thousand viewers leaving
    /// at once cost ten thousand short write-lock holds, not a scan of the room each.
    pub fn leave(&self, client: &Client) -> bool {
        let mut rooms = self.rooms.write();
        let Some(room) = rooms.get_mut(&client.room) else {
            return false;
        };
        let members = room.members_mut(client.protocol);
        let index = client.member_index();
        if members
            .get(index)
            .is_none_or(|m| !std::ptr::eq(&**m, client))
        {
            return false;
        }
        // Order within a room's member list carries no meaning (delivery order is the order
        // of messages, not of members), so the last member moves into the gap; its index is
        // updated under the same lock.
        members.swap_remove(index);
        if let Some(moved) = members.get(index) {
            moved.set_member_index(index);
        }
        match client.identity.user() {
            Some(user) => {
                if let Some(count) = room.users.get_mut(user) {
                    *count -= 1;
                    if *count == 0 {
                        room.users.remove(user);
                    }
                }
            }
            None => room.anonymous -= 1,
        }
        if room.is_empty() {
            rooms.remove(&client.room);
        }
        true
    }

    /// Runs `f` on every member of `room`, plain and v1, while holding the read lock. `f`
    /// must not block.
    pub fn for_each_member(&self, room: &str, mut f: impl FnMut(&Arc<Client>)) {
        if let Some(room) = self.rooms.read().get(room) {
            room.iter().for_each(&mut f);
        }
    }

    /// Runs `f` on `room`'s members while holding the read lock. `f` must not block.
    pub fn with_room(&self, room: &str, f: impl FnOnce(&Room)) {
        if let Some(room) = self.rooms.read().get(room) {
            f(room);
        }
    }

    /// Runs `f` on the map of rooms while holding the read lock. `f` must not block.
    pub fn with_rooms(&self, f: impl FnOnce(&HashMap<Arc<str>, Room>)) {
        f(&self.rooms.read());
    }

    /// Runs `f` on every client of every room while holding the read lock. `f` must not block.
    pub fn for_each_client(&self, mut f: impl FnMut(&Arc<Client>)) {
        for room in self.rooms.read().values() {
            room.iter().for_each(&mut f);
        }
    }

    /// Every room with its member count, for the rooms API.
    pub fn rooms(&self) -> Vec<(String, usize)> {
        self.rooms
            .read()
            .iter()
            .map(|(name, room)| (name.to_string(), room.len()))
            .collect()
    }

    /// Every room with its clients and distinct users, for the presence heartbeat that
    /// tells the other instances (with `--redis`).
    pub fn presences(&self) -> Vec<(String, Presence)> {
        self.rooms
            .read()
            .iter()
            .map(|(name, room)| (name.to_string(), room.presence()))
            .collect()
    }

    /// Clients in all rooms.
    pub fn client_count(&self) -> usize {
        self.rooms.read().values().map(Room::len).sum()
    }

    /// v1 clients in all rooms.
    pub fn v1_client_count(&self) -> usize {
        self.rooms.read().values().map(|room| room.v1.len()).sum()
    }

    /// Members of one room.
    pub fn room_size(&self, room: &str) -> usize {
        self.rooms.read().get(room).map_or(0, Room::len)
    }

    /// Clients and distinct users in one room.
    pub fn presence(&self, room: &str) -> Presence {
        self.rooms.read().get(room).map_or(
            Presence {
                clients: 0,
                users: 0,
            },
            Room::presence,
        )
    }

    /// Rooms with at least one member.
    pub fn room_count(&self) -> usize {
        self.rooms.read().len()
    }
}

/// Room names as DESIGN §1 fixes them: `[A-Za-z0-9_.-]{1,64}`. Anything else would make room
/// names ambiguous in URLs, logs and metrics labels.
///
/// Except exactly `.` and `..`: browsers and URL libraries resolve those path segments away
/// (`/ws/..` becomes `/`), so a page could never reach such a room by its URL. Every other
/// name with dots (`a.b`, `...`, `.hidden`) is left alone by URL normalisation and stays valid.
pub fn is_valid_room_name(name: &str) -> bool {
    (1..=MAX_ROOM_NAME_LEN).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Longest room name accepted.
pub const MAX_ROOM_NAME_LEN: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;

    /// Clients on loopback sockets whose peers are dropped: the hub never touches sockets.
    fn clients(n: u64, room: &str) -> Vec<Arc<Client>> {
        let stats = Arc::new(Stats::default());
        (0..n)
            .map(|id| Arc::new(Client::on_loopback(id, room, 1024, stats.clone()).0))
            .collect()
    }

    /// `leave` finds members by the index each keeps; after any order of leaves, every index
    /// must still point at its own client.
    #[test]
    fn members_leave_in_any_order() {
        let hub = Hub::new();
        let members = clients(64, "r");
        for client in &members {
            hub.join(client.clone());
        }
        // A fixed shuffle: every 7th, wrapping, visits all 64 (7 and 64 are coprime).
        for (left, i) in (0..64).map(|k| (k * 7) % 64).enumerate() {
            assert!(hub.leave(&members[i]), "member {i} was not found");
            assert!(!hub.leave(&members[i]), "member {i} left twice");
            assert_eq!(hub.room_size("r"), 63 - left);
            let mut position = 0;
            hub.for_each_member("r", |m| {
                assert_eq!(m.member_index(), position, "client {} lost its index", m.id);
                position += 1;
            });
        }
        assert_eq!(hub.room_count(), 0, "an empty room is removed");
    }

    /// A client that is not a member but claims a member's index is not mistaken for it.
    #[test]
    fn leave_checks_identity_not_just_the_index() {
        let hub = Hub::new();
        let (a, b) = (clients(1, "r"), clients(1, "r"));
        hub.join(a[0].clone());
        // Same room, same index 0 and even the same id as `a`, but never joined: it must not
        // remove `a`.
        b[0].set_member_index(0);
        assert!(!hub.leave(&b[0]));
        assert_eq!(hub.room_size("r"), 1);
        assert!(hub.leave(&a[0]));
    }

    #[test]
    fn room_names() {
        for good in [
            "lobby",
            "a",
            "Stream_42.live-1",
            "a.b",
            "...",
            ".hidden",
            "..x",
            &"x".repeat(64),
        ] {
            assert!(is_valid_room_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a b",
            "a/b",
            "%41",
            "é",
            "room?",
            &"x".repeat(65),
        ] {
            assert!(!is_valid_room_name(bad), "{bad}");
        }
    }
}
