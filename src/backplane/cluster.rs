//! Presence and moderation across instances (with `--redis`): what each instance tells the
//! others about its rooms, and how a moderator's disconnect or ban, asked of one instance,
//! reaches the user's connections on all of them.
//!
//! ```text
//!  POST .../disconnect ─► local ban + 4003 ─► Handoff (bounded, try_send) ─► redis-presence:
//!                                               HSET roomcast:bans (a ban), PUBLISH roomcast:moderation
//!                                                                │
//!  every other instance's redis-subscriber ◄─────────────────────┘  ─► its ban + its 4003s
//! ```
//!
//! Presence rides on the heartbeat the presence thread already writes: per room, `"<clients>
//! <users>"` in the instance's hash, summed over the other instances by each reader.
//!
//! Bans live in Redis (`roomcast:bans`, field `<room>\n<user>`, value the ban's end in Unix
//! milliseconds) as well as in each instance's memory, so an instance that starts after a ban,
//! or whose subscriber was away when the command went by, loads them as its subscriber
//! connects. Ends are wall-clock times: instances whose clocks disagree by a second end a ban
//! a second apart.
//!
//! The formats and the enforcement compile without the `redis` feature; the few commands that
//! talk to Redis are at the bottom, behind it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};
use serde_json::value::RawValue;

use crate::backplane::{Backplane, Dropped};
use crate::http::moderation::{self, MAX_BAN_SECS, MAX_REASON_BYTES};
use crate::relay::broadcaster::Events;
use crate::relay::hub::{is_valid_room_name, Hub};
use crate::relay::users::Users;
use crate::v1::codec::Presence;

/// Moderation commands waiting for the presence thread to hand them to Redis. Moderators act
/// a few times a minute; a queue this deep filling up means Redis is not taking them at all.
pub const MODERATION_QUEUE: usize = 256;
/// Longest moderation command accepted from Redis: the longest a well-formed one can be (a
/// 128-byte user and a 123-byte reason, every byte escaped as `\u00XX`) with room to spare.
pub const MAX_COMMAND_BYTES: usize = 4096;
/// Longest user name a command may carry, as the endpoint allows.
pub const MAX_USER_BYTES: usize = 128;
/// Entries of `roomcast:bans` looked at per load at most: the hash holds at most `MAX_BANS`
/// (the script that writes it refuses more), so this bounds a load even when something else
/// filled it.
pub const MAX_BANS_LOADED: usize = 2 * crate::relay::users::MAX_BANS;

/// The counts of nobody.
pub const NO_ONE: Presence = Presence {
    clients: 0,
    users: 0,
};

/// Two counts together (an instance's and the others'). Users are summed too: a user
/// connected through two instances counts twice, which only one reader of every hash could
/// avoid.
pub fn add(a: Presence, b: Presence) -> Presence {
    Presence {
        clients: a.clients.saturating_add(b.clients),
        users: a.users.saturating_add(b.users),
    }
}

/// A room's counts as its instance writes them in its presence hash: `"<clients> <users>"`.
pub fn encode_presence(presence: Presence) -> String {
    format!("{} {}", presence.clients, presence.users)
}

/// The inverse of `encode_presence`. A bare number (what instances wrote before users were
/// counted) is taken as that many clients, each its own user; anything else is `None`.
pub fn decode_presence(value: &[u8]) -> Option<Presence> {
    let number = |digits: &[u8]| -> Option<usize> {
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    match value.iter().position(|&b| b == b' ') {
        Some(space) => Some(Presence {
            clients: number(&value[..space])?,
            users: number(&value[space + 1..])?,
        }),
        None => {
            let clients = number(value)?;
            Some(Presence {
                clients,
                users: clients,
            })
        }
    }
}

/// A moderator's disconnect (and ban) on its way to the other instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The instance it comes from (`Backplane::origin`): that one has done it already.
    pub origin: u64,
    pub room: String,
    pub user: String,
    /// At most `MAX_REASON_BYTES`, as the endpoint cut it.
    pub reason: String,
    /// When the ban ends, in Unix milliseconds; `None` only disconnects.
    pub ban_until_ms: Option<u64>,
}

impl Command {
    /// As published on `keys::MODERATION_CHANNEL`: one JSON object, so any user name and
    /// reason (quotes, newlines, any Unicode) goes through escaped and comes back exact, and
    /// `redis-cli SUBSCRIBE roomcast:moderation` reads it.
    pub fn encode(&self) -> Vec<u8> {
        let mut command = serde_json::json!({
            "type": "disconnect",
            "origin": self.origin,
            "room": self.room,
            "user": self.user,
            "reason": self.reason,
        });
        if let Some(until) = self.ban_until_ms {
            command["ban_until_ms"] = until.into();
        }
        command.to_string().into_bytes()
    }

    /// The inverse of `encode`; `None` for anything else: not one flat JSON object of a
    /// `disconnect`, a bad room name, a user or reason out of bounds, a ban end that is not a
    /// number. Parsed as raw values, one level deep, as the endpoint parses its body.
    pub fn decode(wire: &[u8]) -> Option<Command> {
        if wire.len() > MAX_COMMAND_BYTES {
            return None;
        }
        let fields: std::collections::HashMap<String, &RawValue> =
            serde_json::from_slice(wire).ok()?;
        let field = |name: &str| fields.get(name).map(|raw| raw.get());
        let string = |name: &str| serde_json::from_str::<String>(field(name)?).ok();
        if string("type")? != "disconnect" {
            return None;
        }
        let room = string("room").filter(|room| is_valid_room_name(room))?;
        let user = string("user").filter(|user| (1..=MAX_USER_BYTES).contains(&user.len()))?;
        let reason = string("reason").filter(|reason| reason.len() <= MAX_REASON_BYTES)?;
        let origin = serde_json::from_str::<u64>(field("origin")?).ok()?;
        let ban_until_ms = match field("ban_until_ms") {
            None => None,
            Some(raw) => Some(serde_json::from_str::<u64>(raw).ok()?),
        };
        Some(Command {
            origin,
            room,
            user,
            reason,
            ban_until_ms,
        })
    }
}

/// Now, in Unix milliseconds: the clock ban ends are written in, so that every instance reads
/// the same end.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// What is left of a ban ending at `until_ms`, as of `now_ms`, never more than the longest
/// ban the endpoint gives (a command or an entry from Redis claiming a century is cut to a
/// week); `None` once it has ended.
pub fn remaining(until_ms: u64, now_ms: u64) -> Option<Duration> {
    let left = until_ms.checked_sub(now_ms).filter(|left| *left > 0)?;
    Some(Duration::from_millis(left).min(Duration::from_secs(MAX_BAN_SECS)))
}

/// The field of a ban in `keys::BANS_KEY`. A room name has no newline, so the first one
/// separates it from the user, whatever the user's name holds.
pub fn ban_field(room: &str, user: &str) -> String {
    format!("{room}\n{user}")
}

/// The inverse of `ban_field`, with the entry's value: `(room, user, end)`, or `None` for an
/// entry that is not one of ours.
pub fn decode_ban(field: &[u8], value: &[u8]) -> Option<(String, String, u64)> {
    let field = std::str::from_utf8(field).ok()?;
    let (room, user) = field.split_once('\n')?;
    if !is_valid_room_name(room) || !(1..=MAX_USER_BYTES).contains(&user.len()) {
        return None;
    }
    let value = std::str::from_utf8(value).ok()?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((room.to_string(), user.to_string(), value.parse().ok()?))
}

/// The moderation commands on their way from the endpoint (any HTTP thread) to the presence
/// thread, which publishes them on its own connection. Bounded, and offered with `try_send`:
/// an HTTP thread never waits on Redis. Lives in the `Backplane`, both ends with it.
#[derive(Debug)]
pub struct Handoff {
    sender: Sender<Command>,
    pending: Receiver<Command>,
    /// A command did not reach Redis and that was logged; cleared (and logged) by the next
    /// one that does. So one warning per episode, not one per request.
    failing: AtomicBool,
}

impl Default for Handoff {
    fn default() -> Handoff {
        let (sender, pending) = crossbeam_channel::bounded(MODERATION_QUEUE);
        Handoff {
            sender,
            pending,
            failing: AtomicBool::new(false),
        }
    }
}

impl Handoff {
    /// Queues `command` for Redis unless the link is down or the queue is full; returns
    /// whether it was queued (the endpoint's `"cluster"`).
    pub fn offer(&self, command: Command, is_link_up: bool) -> bool {
        let why = if !is_link_up {
            "the redis link is down"
        } else {
            match self.sender.try_send(command) {
                Ok(()) => return true,
                Err(_) => "the moderation queue is full",
            }
        };
        self.failed(why);
        false
    }

    /// What the presence thread waits on, besides shutdown and its next heartbeat.
    pub fn pending(&self) -> &Receiver<Command> {
        &self.pending
    }

    /// A command did not reach Redis: warns, once per episode.
    pub fn failed(&self, why: &str) {
        if !self.failing.swap(true, Ordering::Relaxed) {
            warn!(
                "moderation: {why}: disconnects and bans reach only this instance's clients until redis takes them again"
            );
        }
    }

    /// A command reached Redis: ends an episode of failures.
    pub fn reached_redis(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            info!("moderation: commands reach redis again");
        }
    }
}

/// This instance's side of cluster presence and moderation: the rooms it reports, the
/// connections and bans it enforces, how long its rooms' state lives in Redis. Given to the
/// Redis threads at start; they hold it until they end.
pub struct Local {
    pub hub: Arc<Hub>,
    pub users: Arc<Users>,
    pub events: Events,
    /// `--room-ttl`: the heartbeat extends each room's state in Redis by this much.
    pub room_ttl: Duration,
}

/// A moderation command from Redis (the subscriber, for `keys::MODERATION_CHANNEL`):
/// malformed ones are dropped and counted, this instance's own are already done, and any
/// other is done here: the ban recorded, then the user's connections in the room closed.
///
/// Only verified connections are closed: an anonymous id (`anon-<n>`) is one connection on
/// the instance that gave it out, and the same id elsewhere is somebody else.
pub fn receive(wire: &[u8], backplane: &Backplane, local: &Local) {
    let Some(command) = Command::decode(wire) else {
        backplane.count_drop(Dropped::Malformed);
        return;
    };
    if command.origin == backplane.origin {
        return;
    }
    let ban = command
        .ban_until_ms
        .and_then(|until| remaining(until, unix_ms_now()));
    let order = moderation::Disconnect {
        room: &command.room,
        user: &command.user,
        reason: &command.reason,
        ban,
        scope: moderation::Scope::Verified,
    };
    let closed = match moderation::enforce(&local.hub, &local.users, &local.events, &order) {
        Ok(closed) => closed,
        Err(_full) => {
            warn!(
                "moderation from another instance: the ban list is full ({} bans): user {:?} is disconnected from room {} but not banned here",
                crate::relay::users::MAX_BANS,
                command.user,
                command.room
            );
            moderation::close_user(&local.hub, &local.events, &order)
        }
    };
    info!(
        "moderation from another instance: room {}: user {:?} disconnected from {closed} connections{}",
        command.room,
        command.user,
        ban.map_or(String::new(), |ban| format!(", banned for {}s", ban.as_secs()))
    );
}

/// What became of one entry of `roomcast:bans` as the subscriber loaded it.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// In force: recorded in this instance's ban list.
    Banned,
    /// Over: deleted from Redis.
    Ended,
    /// Not a ban (a field without a room and a user, an end that is not a number): deleted
    /// from Redis, and counted as `malformed`.
    Malformed,
    /// The local ban list is full: loading stops.
    Full,
}

/// Records one entry of `roomcast:bans` in `users`, as of `now_ms`.
pub fn load_ban(users: &Users, field: &[u8], value: &[u8], now_ms: u64) -> Loaded {
    let Some((room, user, until)) = decode_ban(field, value) else {
        return Loaded::Malformed;
    };
    let Some(left) = remaining(until, now_ms) else {
        return Loaded::Ended;
    };
    match users.ban(&room, &user, left, Instant::now()) {
        Ok(()) => Loaded::Banned,
        Err(_) => Loaded::Full,
    }
}

#[cfg(feature = "redis")]
pub(crate) use with_redis::{load_bans, send};

/// The commands that talk to Redis.
#[cfg(feature = "redis")]
mod with_redis {
    use log::{debug, warn};
    use redis::{Connection, RedisResult};

    use super::{load_ban, unix_ms_now, Command, Loaded, Local, MAX_BANS_LOADED};
    use crate::backplane::{keys, Backplane, Dropped};

    /// Records a ban in `keys::BANS_KEY` unless a later end is there already, and only while
    /// the hash holds fewer than `ARGV[3]` entries once the ended ones are deleted (a new one
    /// past that is refused: 0).
    const RECORD_BAN: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local known = tonumber(current)
  if known == nil or known < tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  end
  return 1
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  -- Full: the bans that have ended go first (rare, so one walk of the hash is affordable).
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local fields = redis.call('HGETALL', KEYS[1])
  for f = 1, #fields, 2 do
    local ends = tonumber(fields[f + 1])
    if ends == nil or ends <= now then
      redis.call('HDEL', KEYS[1], fields[f])
    end
  end
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
";

    /// Hands one command to Redis, in one round trip: the ban first (so an instance whose
    /// subscriber connects between the two still finds it), then the `PUBLISH` every other
    /// instance's subscriber acts on.
    pub(crate) fn send(con: &mut Connection, command: &Command) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        if let Some(until) = command.ban_until_ms {
            pipe.cmd("EVAL")
                .arg(RECORD_BAN)
                .arg(1)
                .arg(keys::BANS_KEY)
                .arg(super::ban_field(&command.room, &command.user))
                .arg(until)
                .arg(crate::relay::users::MAX_BANS);
        }
        pipe.cmd("PUBLISH")
            .arg(keys::MODERATION_CHANNEL)
            .arg(command.encode())
            .ignore();
        let recorded: Vec<i64> = pipe.query(con)?;
        if recorded.first() == Some(&0) {
            warn!(
                "moderation: {} holds {} bans: the ban of {:?} in room {} reaches the instances running now, not those started later",
                keys::BANS_KEY,
                crate::relay::users::MAX_BANS,
                command.user,
                command.room
            );
        }
        Ok(())
    }

    /// Loads every ban in force from `keys::BANS_KEY` into this instance's ban list, and
    /// deletes the ended ones (and anything that is not a ban). Walked with `HSCAN`, a page
    /// at a time, so a long list never blocks Redis for the others.
    pub(crate) fn load_bans(
        con: &mut Connection,
        backplane: &Backplane,
        local: &Local,
    ) -> RedisResult<()> {
        let now_ms = unix_ms_now();
        let (mut cursor, mut seen, mut banned) = (0u64, 0usize, 0usize);
        loop {
            let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("HSCAN")
                .arg(keys::BANS_KEY)
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query(con)?;
            let mut stale: Vec<&[u8]> = Vec::new();
            for entry in page.chunks_exact(2) {
                seen += 1;
                match load_ban(&local.users, &entry[0], &entry[1], now_ms) {
                    Loaded::Banned => banned += 1,
                    Loaded::Ended => stale.push(&entry[0]),
                    Loaded::Malformed => {
                        backplane.count_drop(Dropped::Malformed);
                        stale.push(&entry[0]);
                    }
                    Loaded::Full => {
                        warn!(
                            "moderation: the ban list is full ({} bans): stopped loading {}",
                            crate::relay::users::MAX_BANS,
                            keys::BANS_KEY
                        );
                        return Ok(());
                    }
                }
            }
            if !stale.is_empty() {
                redis::cmd("HDEL")
                    .arg(keys::BANS_KEY)
                    .arg(stale)
                    .exec(con)?;
            }
            if next == 0 || seen >= MAX_BANS_LOADED {
                break;
            }
            cursor = next;
        }
        debug!("moderation: loaded {banned} bans from {}", keys::BANS_KEY);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_values_round_trip_and_a_bare_number_is_clients_and_users() {
        let presence = Presence {
            clients: 7,
            users: 3,
        };
        assert_eq!(encode_presence(presence), "7 3");
        assert_eq!(decode_presence(b"7 3"), Some(presence));
        assert_eq!(
            decode_presence(b"5"),
            Some(Presence {
                clients: 5,
                users: 5
            })
        );
        for bad in [
            &b""[..],
            b" ",
            b"7 ",
            b" 3",
            b"7 3 1",
            b"-1 2",
            b"+1",
            b"x",
            b"99999999999999999999999",
        ] {
            assert_eq!(
                decode_presence(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(add(presence, NO_ONE), presence);
        assert_eq!(
            add(presence, presence),
            Presence {
                clients: 14,
                users: 6
            }
        );
    }

    fn command() -> Command {
        Command {
            origin: u64::MAX,
            room: "stage".into(),
            user: "u\n\"42\" é\u{0}".into(),
            reason: "spam\r\n{\"x\":1}".into(),
            ban_until_ms: Some(1_700_000_000_000),
        }
    }

    #[test]
    fn commands_round_trip_whatever_their_user_and_reason_hold() {
        let command = command();
        assert_eq!(Command::decode(&command.encode()), Some(command.clone()));
        let without_ban = Command {
            ban_until_ms: None,
            ..command
        };
        assert_eq!(
            Command::decode(&without_ban.encode()),
            Some(without_ban.clone())
        );
        // The longest legal command fits, escaped byte by byte.
        let longest = Command {
            user: "\u{1}".repeat(MAX_USER_BYTES),
            reason: "\u{1}".repeat(MAX_REASON_BYTES),
            ..without_ban
        };
        let wire = longest.encode();
        assert!(wire.len() <= MAX_COMMAND_BYTES, "{}", wire.len());
        assert_eq!(Command::decode(&wire), Some(longest));
    }

    #[test]
    fn malformed_commands_are_refused() {
        let good = String::from_utf8(command().encode()).unwrap();
        assert!(Command::decode(good.as_bytes()).is_some());
        let long_user = format!(
            r#"{{"type":"disconnect","origin":1,"room":"r","user":"{}","reason":""}}"#,
            "u".repeat(MAX_USER_BYTES + 1)
        );
        let long_reason = format!(
            r#"{{"type":"disconnect","origin":1,"room":"r","user":"u","reason":"{}"}}"#,
            "r".repeat(MAX_REASON_BYTES + 1)
        );
        let huge = format!(
            r#"{{"type":"disconnect","origin":1,"room":"r","user":"u","reason":"","pad":"{}"}}"#,
            " ".repeat(MAX_COMMAND_BYTES)
        );
        for bad in [
            "",
            "not json",
            "[]",
            "{}",
            r#"{"type":"ban","origin":1,"room":"r","user":"u","reason":""}"#,
            r#"{"origin":1,"room":"r","user":"u","reason":""}"#,
            r#"{"type":"disconnect","room":"r","user":"u","reason":""}"#,
            r#"{"type":"disconnect","origin":-1,"room":"r","user":"u","reason":""}"#,
            r#"{"type":"disconnect","origin":"1","room":"r","user":"u","reason":""}"#,
            r#"{"type":"disconnect","origin":1,"room":"a b","user":"u","reason":""}"#,
            r#"{"type":"disconnect","origin":1,"room":"r","user":"","reason":""}"#,
            r#"{"type":"disconnect","origin":1,"room":"r","user":7,"reason":""}"#,
            r#"{"type":"disconnect","origin":1,"room":"r","user":"u"}"#,
            r#"{"type":"disconnect","origin":1,"room":"r","user":"u","reason":"","ban_until_ms":"5"}"#,
            r#"{"type":"disconnect","origin":1,"room":"r","user":"u","reason":"","ban_until_ms":1.5}"#,
            &long_user,
            &long_reason,
            &huge,
        ] {
            assert_eq!(Command::decode(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(Command::decode(b"{\"type\":\"disconnect\xff\"}"), None);
    }

    #[test]
    fn a_ban_lasts_what_is_left_of_it_and_never_more_than_a_week() {
        assert_eq!(remaining(10_000, 4_000), Some(Duration::from_secs(6)));
        assert_eq!(remaining(4_000, 4_000), None);
        assert_eq!(remaining(3_000, 4_000), None);
        assert_eq!(
            remaining(u64::MAX, 0),
            Some(Duration::from_secs(MAX_BAN_SECS))
        );
    }

    #[test]
    fn ban_entries_name_their_room_and_user_and_garbage_is_malformed() {
        let field = ban_field("stage", "u\n2");
        assert_eq!(
            decode_ban(field.as_bytes(), b"123"),
            Some(("stage".into(), "u\n2".into(), 123))
        );
        for (field, value) in [
            (&b"stage"[..], &b"123"[..]),
            (b"a b\nu", b"123"),
            (b"stage\n", b"123"),
            (b"stage\nu", b""),
            (b"stage\nu", b"12x"),
            (b"stage\nu", b"-5"),
            (b"stage\n\xff", b"5"),
        ] {
            assert_eq!(decode_ban(field, value), None);
        }

        let users = Users::new();
        let now = 1_000_000;
        let in_force = (now + 60_000).to_string();
        assert_eq!(
            load_ban(&users, field.as_bytes(), in_force.as_bytes(), now),
            Loaded::Banned
        );
        assert!(users.is_banned("stage", "u\n2", Instant::now()));
        let over = (now - 1).to_string();
        assert_eq!(
            load_ban(&users, b"stage\nold", over.as_bytes(), now),
            Loaded::Ended
        );
        assert!(!users.is_banned("stage", "old", Instant::now()));
        assert_eq!(load_ban(&users, b"junk", b"1", now), Loaded::Malformed);
    }

    #[test]
    fn a_command_from_another_instance_is_done_and_our_own_and_garbage_are_not() {
        let (backplane, _outgoing) = Backplane::new("i".into(), 1024, Duration::from_secs(3));
        let (events, _received) = Events::channel(16, 1 << 16);
        let local = Local {
            hub: Arc::new(Hub::new()),
            users: Arc::new(Users::new()),
            events,
            room_ttl: Duration::from_secs(60),
        };
        let in_an_hour = unix_ms_now() + 3_600_000;
        let ban = |origin: u64, user: &str| Command {
            origin,
            room: "r".into(),
            user: user.into(),
            reason: "spam".into(),
            ban_until_ms: Some(in_an_hour),
        };
        receive(&ban(backplane.origin, "mine").encode(), &backplane, &local);
        assert!(
            !local.users.is_banned("r", "mine", Instant::now()),
            "this instance did its own already"
        );
        receive(
            &ban(backplane.origin ^ 1, "theirs").encode(),
            &backplane,
            &local,
        );
        assert!(local.users.is_banned("r", "theirs", Instant::now()));
        let ended = Command {
            ban_until_ms: Some(1),
            ..ban(backplane.origin ^ 1, "late")
        };
        receive(&ended.encode(), &backplane, &local);
        assert!(!local.users.is_banned("r", "late", Instant::now()));
        assert_eq!(backplane.dropped_malformed.load(Ordering::Relaxed), 0);
        receive(b"{\"type\":\"disconnect\"}", &backplane, &local);
        assert_eq!(backplane.dropped_malformed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_command_is_handed_over_only_with_the_link_up_and_room_in_the_queue() {
        let handoff = Handoff::default();
        assert!(!handoff.offer(command(), false), "link down");
        assert!(handoff.pending().is_empty());
        for _ in 0..MODERATION_QUEUE {
            assert!(handoff.offer(command(), true));
        }
        assert!(!handoff.offer(command(), true), "queue full");
        assert_eq!(handoff.pending().len(), MODERATION_QUEUE);
        handoff.reached_redis();
        assert!(!handoff.failing.load(Ordering::Relaxed));
    }
}
