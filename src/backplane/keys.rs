//! The names of everything roomcast keeps in Redis, in one place, so that a reader (or an
//! operator with `redis-cli`) finds them all here.
//!
//! A room's keys share the hash tag `{<room>}`: on a Redis Cluster they would all live on the
//! shard that owns the room, which is what lets one script touch them together.

/// Prefix of the channel each room publishes to: `roomcast:room:<room>`.
pub const ROOM_CHANNEL_PREFIX: &str = "roomcast:room:";
/// Prefix of each instance's control channel, `roomcast:control:<instance>`: the markers that
/// hold a close's place among the instance's messages, and the room snapshots it asked for.
pub const CONTROL_CHANNEL_PREFIX: &str = "roomcast:control:";
/// Prefix of each instance's presence hash, `roomcast:instance:<id>`: room → local counts.
pub const INSTANCE_KEY_PREFIX: &str = "roomcast:instance:";
/// The channel moderation commands travel on, to every instance.
pub const MODERATION_CHANNEL: &str = "roomcast:moderation";
/// The hash of every ban in force: field `<room>\n<user>`, value its end (Unix ms).
pub const BANS_KEY: &str = "roomcast:bans";
/// Prefix of the key holding the last number the sequencing script ran for one origin (one
/// life of one instance), so that a retried batch is never run twice.
pub const ORIGIN_KEY_PREFIX: &str = "roomcast:origin:";

/// A room's state: a hash with its `epoch` and its last `seq`.
pub fn state_key(room: &str) -> String {
    format!("roomcast:v1:{{{room}}}:state")
}

/// A room's retained messages, oldest first: a list capped at `--history`.
pub fn history_key(room: &str) -> String {
    format!("roomcast:v1:{{{room}}}:history")
}

/// A room's reaction totals: a hash, key → total.
pub fn reactions_key(room: &str) -> String {
    format!("roomcast:v1:{{{room}}}:reactions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooms_keys_share_its_hash_tag() {
        assert_eq!(state_key("stage"), "roomcast:v1:{stage}:state");
        assert_eq!(history_key("stage"), "roomcast:v1:{stage}:history");
        assert_eq!(reactions_key("stage"), "roomcast:v1:{stage}:reactions");
    }
}
