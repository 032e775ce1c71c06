//! Moderation: `POST /api/rooms/<room>/disconnect` (PROTOCOL §6). The backend names a user;
//! every connection of that user in the room is closed with `4003` and the moderator's
//! reason, and with `ban_secs` the user's tokens for that room are refused (`403`) until the
//! ban ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;
use serde_json::value::RawValue;

use crate::http::Response;
use crate::relay::client::Client;
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

/// Answers `POST /api/rooms/<room>/disconnect`.
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
    // The ban first: a reconnect racing the close below is refused, or removed as it joins
    // (see `connection::run`).
    if let Some(ban) = request.ban {
        if shared
            .users
            .ban(room, &request.user, ban, Instant::now())
            .is_err()
        {
            return Response::status(503).with_body(format!(
                "the ban list is full ({} bans); retry when some have expired\n",
                crate::relay::users::MAX_BANS
            ));
        }
    }
    // Collected under the hub's lock, closed after it: closing sends and shuts sockets down.
    let mut targets: Vec<Arc<Client>> = Vec::new();
    shared.hub.for_each_member(room, |client| {
        // A client already closing (it left, or was closed) is not disconnected again.
        if *client.identity.id == *request.user && !client.is_closing() {
            targets.push(client.clone());
        }
    });
    let mut disconnected = 0;
    for client in &targets {
        if client.remove_by_moderator(&request.reason) {
            disconnected += 1;
            // The close may not all have left at once; the broadcaster retries a backlog.
            if client.has_backlog() {
                shared.events.hand_over_backlog(client);
            }
        }
    }
    info!(
        "moderation: room {room}: user {:?} disconnected from {disconnected} connections{}",
        request.user,
        request.ban.map_or(String::new(), |ban| format!(
            ", banned for {}s",
            ban.as_secs()
        ))
    );
    Response::ok(
        crate::http::JSON,
        format!("{{\"disconnected\":{disconnected}}}"),
    )
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
