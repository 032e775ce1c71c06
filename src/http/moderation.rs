//! Moderation: `POST /api/rooms/<room>/disconnect` (PROTOCOL §6). The backend names a user;
//! every connection of that user in the room is closed with `4003` and the moderator's
//! reason, and with `ban_secs` the user's tokens for that room are refused (`403`) until the
//! ban ends. With `--redis` the same happens on every other instance (`backplane::cluster`
//! carries the command and calls `enforce` there).

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;
use serde_json::value::RawValue;

use crate::http::Response;
use crate::relay::broadcaster::Events;
use crate::relay::client::Client;
use crate::relay::hub::Hub;
use crate::relay::users::{BansFull, Users};
use crate::shared::Shared;

/// Longest ban: a week. Bans are memory the server holds for each; anything longer is the
/// application's own business (stop minting the user's tokens).
pub const MAX_BAN_SECS: u64 = 7 * 24 * 3600;
/// A close frame's reason is at most 123 bytes (RFC 6455 §5.5: 125 minus the code).
pub const MAX_REASON_BYTES: usize = 123;
/// The reason when the moderator gives none.
const DEFAULT_REASON: &str = "removed by a moderator";
/// The close reason of a banned user's connection that joined as the ban landed.
pub const BANNED_REASON: &str = "banned from this room";

/// A parsed moderation request.
#[derive(Debug, PartialEq)]
struct Request {
    user: String,
    reason: String,
    ban: Option<Duration>,
}

/// Parses a request body. Read as one flat object of raw values, each field decoded on its
/// own: a `serde_json::Value` parses recursively, and on a connection thread's 64 KiB stack a
/// body nested a hundred levels deep would overflow it and abort the process.
fn parse(body: &[u8]) -> Result<Request, &'static str> {
    type Fields<'a> = std::collections::HashMap<String, &'a RawValue>;
    let fields: Fields<'_> =
        serde_json::from_slice(body).map_err(|_| "the body must be a JSON object")?;
    let field = |name: &str| {
        fields
            .get(name)
            .map(|raw| raw.get())
            .filter(|raw| *raw != "null")
    };
    let user = match field("user").map(serde_json::from_str::<String>) {
        Some(Ok(user)) if (1..=128).contains(&user.len()) => user,
        _ => return Err("\"user\" must be a string of 1-128 bytes"),
    };
    let reason = match field("reason").map(serde_json::from_str::<String>) {
        None => DEFAULT_REASON.to_string(),
        Some(Ok(reason)) => cut_at_char_boundary(&reason, MAX_REASON_BYTES),
        Some(Err(_)) => return Err("\"reason\" must be a string"),
    };
    let ban = match field("ban_secs").map(serde_json::from_str::<u64>) {
        None | Some(Ok(0)) => None,
        Some(Ok(secs)) if secs <= MAX_BAN_SECS => Some(Duration::from_secs(secs)),
        _ => return Err("\"ban_secs\" must be an integer from 0 to 604800"),
    };
    Ok(Request { user, reason, ban })
}

/// `text` cut to at most `max` bytes without splitting a character.
fn cut_at_char_boundary(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Which of a room's connections a disconnect of a user name reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Every connection whose id is the name: a verified user's, or the one anonymous
    /// connection this instance named `anon-<n>` (the endpoint, on its own instance).
    Any,
    /// Verified connections only (a command from another instance): an anonymous id names a
    /// connection on the instance that gave it out, and the same id here is somebody else.
    Verified,
}

/// One disconnect (and ban), as the endpoint or another instance asked for it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Disconnect<'a> {
    pub room: &'a str,
    pub user: &'a str,
    /// The close frame's reason, at most `MAX_REASON_BYTES`.
    pub reason: &'a str,
    pub ban: Option<Duration>,
    pub scope: Scope,
}

/// Bans the user from the room (with a ban), then closes its connections there with `4003`
/// and the reason: the one path of both the endpoint and the commands other instances send
/// through Redis. Returns how many it closed; a full ban list refuses the ban and closes
/// nothing.
///
/// The ban first: a reconnect racing the close below is refused, or removed as it joins (see
/// `connection::run`).
pub(crate) fn enforce(
    hub: &Hub,
    users: &Users,
    events: &Events,
    order: &Disconnect<'_>,
) -> Result<usize, BansFull> {
    if let Some(ban) = order.ban {
        users.ban(order.room, order.user, ban, Instant::now())?;
    }
    Ok(close_user(hub, events, order))
}

/// Closes the user's connections in the room with `4003` and the reason, leaving its ban
/// list alone; returns how many.
pub(crate) fn close_user(hub: &Hub, events: &Events, order: &Disconnect<'_>) -> usize {
    // Collected under the hub's lock, closed after it: closing sends and shuts sockets down.
    let mut targets: Vec<Arc<Client>> = Vec::new();
    hub.for_each_member(order.room, |client| {
        let is_named = match order.scope {
            Scope::Any => *client.identity.id == *order.user,
            Scope::Verified => client.identity.user().is_some_and(|id| **id == *order.user),
        };
        // A client already closing (it left, or was closed) is not disconnected again.
        if is_named && !client.is_closing() {
            targets.push(client.clone());
        }
    });
    let mut disconnected = 0;
    for client in &targets {
        if client.remove_by_moderator(order.reason) {
            disconnected += 1;
            // The close may not all have left at once; the broadcaster retries a backlog.
            if client.has_backlog() {
                events.hand_over_backlog(client);
            }
        }
    }
    disconnected
}

/// Answers `POST /api/rooms/<room>/disconnect`: here at once, and with `--redis` on every
/// other instance through Redis (`backplane::cluster`), without waiting for it.
pub(crate) fn disconnect(shared: &Shared, room: &str, body: &[u8]) -> Response {
    let request = match parse(body) {
        Ok(request) => request,
        Err(problem) => return Response::status(400).with_body(format!("{problem}\n")),
    };
    if request.ban.is_some() && shared.config.token_secrets.is_empty() {
        // Open mode has no tokens to refuse and no user beyond one connection: a ban would be
        // a promise nothing keeps.
        return Response::status(400).with_body(
            "bans need join tokens: start roomcast with a token secret (ROOMCAST_TOKEN_SECRET)\n",
        );
    }
    let order = Disconnect {
        room,
        user: &request.user,
        reason: &request.reason,
        ban: request.ban,
        scope: Scope::Any,
    };
    let enforced = enforce(&shared.hub, &shared.users, &shared.events, &order);
    let Ok(disconnected) = enforced else {
        return Response::status(503).with_body(format!(
            "the ban list is full ({} bans); retry when some have expired\n",
            crate::relay::users::MAX_BANS
        ));
    };
    // The other instances do the same when their subscribers get the command, within a Redis
    // round trip; this reply does not wait for them.
    let cluster = shared.backplane.as_ref().map(|backplane| {
        let command = crate::backplane::cluster::Command {
            origin: backplane.origin,
            room: room.to_string(),
            user: request.user.clone(),
            reason: request.reason.clone(),
            ban_until_ms: request.ban.map(|ban| {
                let ban_ms = u64::try_from(ban.as_millis()).unwrap_or(u64::MAX);
                crate::backplane::cluster::unix_ms_now().saturating_add(ban_ms)
            }),
        };
        backplane.moderation.offer(command, backplane.is_up())
    });
    info!(
        "moderation: room {room}: user {:?} disconnected from {disconnected} connections{}{}",
        request.user,
        request.ban.map_or(String::new(), |ban| format!(
            ", banned for {}s",
            ban.as_secs()
        )),
        match cluster {
            Some(true) => ", and handed to the other instances",
            Some(false) => ", on this instance only",
            None => "",
        }
    );
    let body = match cluster {
        Some(cluster) => format!("{{\"disconnected\":{disconnected},\"cluster\":{cluster}}}"),
        None => format!("{{\"disconnected\":{disconnected}}}"),
    };
    Response::ok(crate::http::JSON, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_defaults_and_bounds() {
        assert_eq!(
            parse(br#"{"user":"u42"}"#),
            Ok(Request {
                user: "u42".into(),
                reason: DEFAULT_REASON.into(),
                ban: None
            })
        );
        let request = parse(br#"{"user":"u42","reason":"spam","ban_secs":600}"#).unwrap();
        assert_eq!(request.reason, "spam");
        assert_eq!(request.ban, Some(Duration::from_secs(600)));
        assert_eq!(parse(br#"{"user":"u","ban_secs":0}"#).unwrap().ban, None);
        for bad in [
            &br#"[]"#[..],
            b"not json",
            br#"{}"#,
            br#"{"user":""}"#,
            br#"{"user":7}"#,
            br#"{"user":"u","reason":7}"#,
            br#"{"user":"u","ban_secs":-1}"#,
            br#"{"user":"u","ban_secs":1.5}"#,
            br#"{"user":"u","ban_secs":604801}"#,
            br#"{"user":"u","ban_secs":"600"}"#,
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long_user = format!(r#"{{"user":"{}"}}"#, "u".repeat(129));
        assert!(parse(long_user.as_bytes()).is_err());
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let reason = "é".repeat(100); // 200 bytes
        let cut = cut_at_char_boundary(&reason, MAX_REASON_BYTES);
        assert_eq!(cut.len(), 122);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(cut_at_char_boundary("short", MAX_REASON_BYTES), "short");
    }
}
