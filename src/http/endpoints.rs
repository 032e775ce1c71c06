//! The plain HTTP endpoints served on the WebSocket port: health, metrics, the rooms API,
//! publishing from a backend, and the demo page (with its script and style sheet).
//!
//! A connection thread lands here when its request is not for `/ws`. Each request is answered
//! once and the connection closed; the request head and body were bounded in size and time
//! before this code sees them, so no endpoint can hold a thread for long.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::http::metrics;
use crate::http::{self, Request, Response, CSS, HTML, JAVASCRIPT, JSON, PROMETHEUS, TEXT};
use crate::relay::broadcaster::{Message, MessageKind};
use crate::relay::hub::is_valid_room_name;
use crate::shared::Shared;
use tungstenite::Bytes;

/// The demo page: no external assets, and no inline script or style either. Its script and
/// style sheet are separate files from this same binary, so the page's Content-Security-Policy
/// can say `script-src 'self'` and forbid every inline script: markup that ever slipped into
/// the page could not run. (The alternative, hashes of inline blocks, would need SHA-256 code
/// in the crate and a hash to keep in step with every edit; two more paths need neither.)
pub const DEMO_PAGE: &str = include_str!("demo.html");
/// The demo page's script, `GET /demo.js`.
pub const DEMO_SCRIPT: &str = include_str!("demo.js");
/// The demo page's style sheet, `GET /demo.css`.
pub const DEMO_STYLE: &str = include_str!("demo.css");
/// The browser client for `roomcast.v1`, `GET /roomcast.js`: an ES module the demo page
/// imports, and other sites may too.
pub const CLIENT_SCRIPT: &str = include_str!("roomcast.js");

/// What a request path names, before its method is considered.
#[derive(Debug, PartialEq, Eq)]
pub enum Resource<'a> {
    Demo,
    DemoScript,
    DemoStyle,
    ClientScript,
    Health,
    Metrics,
    Rooms,
    Room(&'a str),
    RoomMessages(&'a str),
    /// `POST /api/rooms/<room>/disconnect`: moderation (PROTOCOL §6).
    RoomDisconnect(&'a str),
    /// `GET /api/rooms/<room>/history`: the retained messages (PROTOCOL §6).
    RoomHistory(&'a str),
}

impl Resource<'_> {
    /// The methods the resource answers, for routing and for `405`'s `Allow`.
    pub fn allowed_method(&self) -> &'static str {
        match self {
            Resource::RoomMessages(_) | Resource::RoomDisconnect(_) => "POST",
            _ => "GET",
        }
    }

    /// Whether the resource needs the API token when one is configured. The full room list
    /// and the metrics tell an outsider how big every room is and how the server is doing;
    /// a single room's count stays public, since the demo page polls it from every viewer.
    /// Without a token configured, only publishing is off; the rest stays open.
    pub fn is_token_protected(&self) -> bool {
        matches!(
            self,
            Resource::Metrics
                | Resource::Rooms
                | Resource::RoomMessages(_)
                | Resource::RoomDisconnect(_)
                | Resource::RoomHistory(_)
        )
    }
}

/// Maps a path to a resource. Room names are validated here, so handlers get only valid ones.
pub fn resource(path: &str) -> Result<Resource<'_>, Response> {
    let resource = match path {
        "/" | "/index.html" => Resource::Demo,
        "/demo.js" => Resource::DemoScript,
        "/demo.css" => Resource::DemoStyle,
        "/roomcast.js" => Resource::ClientScript,
        "/healthz" => Resource::Health,
        "/metrics" => Resource::Metrics,
        "/api/rooms" => Resource::Rooms,
        _ => match path.strip_prefix("/api/rooms/") {
            Some(rest) => {
                if let Some(room) = rest.strip_suffix("/messages") {
                    Resource::RoomMessages(room)
                } else if let Some(room) = rest.strip_suffix("/disconnect") {
                    Resource::RoomDisconnect(room)
                } else if let Some(room) = rest.strip_suffix("/history") {
                    Resource::RoomHistory(room)
                } else {
                    Resource::Room(rest)
                }
            }
            None => return Err(Response::status(404)),
        },
    };
    if let Resource::Room(room)
    | Resource::RoomMessages(room)
    | Resource::RoomDisconnect(room)
    | Resource::RoomHistory(room) = resource
    {
        if !is_valid_room_name(room) {
            return Err(Response::status(400)
                .with_body("bad room name: use 1-64 of A-Z a-z 0-9 _ . - (but not . or ..)\n"));
        }
    }
    Ok(resource)
}

/// Answers one plain HTTP request: resolves the resource, checks the method and, where the
/// resource is protected, the token; reads a body only where one is expected, and responds.
pub(crate) fn answer(
    shared: &Shared,
    socket: &TcpStream,
    request: &Request,
    leftover: Vec<u8>,
    deadline: Instant,
) -> Response {
    let resource = match resource(&request.path) {
        Ok(resource) => resource,
        Err(response) => return response,
    };
    // History holds what the rooms said, with who said it: without an API token nobody could
    // be allowed to read it, so it is off like the rest of the backend API.
    if let Resource::RoomMessages(_) | Resource::RoomDisconnect(_) | Resource::RoomHistory(_) =
        resource
    {
        if !is_publish_enabled(shared) {
            return Response::status(404)
                .with_body(
                    "the backend API is off: start roomcast with --api-token-file, ROOMCAST_API_TOKEN or --api-token\n",
                );
        }
    }
    if request.method != resource.allowed_method() {
        return Response::status(405).with_header("Allow", resource.allowed_method());
    }
    // Authenticate before reading any body: an unauthorised client gets nothing read, and a
    // client waiting on `Expect: 100-continue` gets its 401 without a 100 first.
    if resource.is_token_protected()
        && shared.config.api_token.is_some()
        && !is_authorized(shared, request)
    {
        return Response::status(401).with_header("WWW-Authenticate", "Bearer");
    }
    let body = match resource {
        Resource::RoomMessages(_) | Resource::RoomDisconnect(_) => {
            let limit = match resource {
                Resource::RoomDisconnect(_) => MAX_DISCONNECT_BODY_BYTES,
                _ => shared.config.max_message_bytes,
            };
            match http::read_body(socket, request, leftover, limit, deadline) {
                Ok(body) => body,
                Err(status) => return Response::status(status),
            }
        }
        _ => Vec::new(),
    };
    let response = respond(shared, request, &resource, body);
    match resource {
        Resource::Demo => with_page_policy(response, request.header("Host")),
        _ => response,
    }
}

/// The demo page's security headers. The policy allows only this server's own script, style
/// sheet and WebSocket: no inline script (so injected markup cannot run), no plugins, no
/// `<base>` rewriting, no form posts elsewhere, and no framing by other sites (clickjacking).
/// `Referrer-Policy` keeps the page's URL, with its room and nick, from leaking to other sites.
fn with_page_policy(response: Response, host: Option<&str>) -> Response {
    let policy = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'{}; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'",
        websocket_sources(host)
    );
    response
        .with_header("Content-Security-Policy", policy)
        .with_header("Referrer-Policy", "no-referrer")
        .with_header("X-Frame-Options", "DENY")
}

/// ` ws://HOST wss://HOST` for the host the page was requested from, or nothing.
///
/// CSP Level 3 lets `'self'` match `ws:` and `wss:` on the page's own host, and current
/// browsers follow it; browsers built on CSP Level 2 did not, and there the page's WebSocket
/// would be refused. Naming the host covers them. The `Host` header is
/// the client's text, so it is used only when it is a plain CSP host-source (dot-separated
/// labels of letters, digits and hyphens, an optional port): anything else, an IPv6 literal
/// included, is left out rather than escaped, and `'self'` alone stays.
fn websocket_sources(host: Option<&str>) -> String {
    match host {
        Some(host) if is_plain_host_source(host) => format!(" ws://{host} wss://{host}"),
        _ => String::new(),
    }
}

fn is_plain_host_source(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let is_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let is_port =
        |port: &str| (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit());
    name.len() <= 253 && name.split('.').all(is_label) && port.is_none_or(is_port)
}

fn respond(shared: &Shared, request: &Request, resource: &Resource<'_>, body: Vec<u8>) -> Response {
    match resource {
        Resource::Demo => Response::ok(HTML, DEMO_PAGE),
        Resource::Health if shared.supervisor.failure().is_some() => {
            let thread = shared.supervisor.failure().unwrap_or_default();
            Response::status(503).with_body(format!(
                "failed: the {thread} thread panicked; shutting down\n"
            ))
        }
        Resource::Health if shared.is_draining() => Response::status(503).with_body("draining\n"),
        Resource::Health if shared.backplane.as_ref().is_some_and(|b| !b.is_up()) => {
            // Still 200: this instance serves its own clients, and a load balancer that
            // pulled every instance because Redis is down would turn degraded into down.
            Response::ok(
                TEXT,
                "degraded: redis unreachable, relaying to this instance's clients only; roomcast.v1 rooms numbered here under a local epoch (seq above 2^40) until redis is back\n",
            )
        }
        Resource::Health => Response::ok(TEXT, "ok\n"),
        Resource::Metrics => Response::ok(PROMETHEUS, metrics::render(shared)),
        Resource::Rooms => Response::ok(JSON, rooms_json(shared)),
        Resource::DemoScript => Response::ok(JAVASCRIPT, DEMO_SCRIPT),
        Resource::DemoStyle => Response::ok(CSS, DEMO_STYLE),
        // A module script from another origin loads only with CORS; the file is public and
        // the same for everyone, and no credentials go with it, so any origin may have it.
        Resource::ClientScript => {
            Response::ok(JAVASCRIPT, CLIENT_SCRIPT).with_header("Access-Control-Allow-Origin", "*")
        }
        Resource::Room(room) => Response::ok(JSON, room_details_json(shared, room)),
        Resource::RoomMessages(room) => publish(shared, request, room, body),
        Resource::RoomDisconnect(room) => crate::http::moderation::disconnect(shared, room, &body),
        Resource::RoomHistory(room) => history(shared, request, room),
    }
}

/// Whether the publish endpoint is on; with no token configured it does not exist (404).
fn is_publish_enabled(shared: &Shared) -> bool {
    shared.config.api_token.is_some()
}

/// Checks `Authorization: Bearer <token>` against `--api-token`, in constant time.
fn is_authorized(shared: &Shared, request: &Request) -> bool {
    let Some(expected) = shared.config.api_token.as_deref() else {
        return false;
    };
    let presented = request
        .header("Authorization")
        .and_then(bearer_token)
        .unwrap_or_default();
    constant_time_eq(presented.as_bytes(), expected.as_bytes())
}

/// The token of an `Authorization: Bearer <token>` value. The scheme name is case-insensitive
/// (RFC 9110 §11.1: `bearer` and `BEARER` are the same scheme), and one or more spaces may
/// follow it; any other scheme is no bearer token at all.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("Bearer")
        .then(|| token.trim_start_matches(' '))
}

/// `POST /api/rooms/<room>/messages`: relays the body to the room through the broadcaster,
/// the same path as a client's message, so it takes its place in the room's single order.
fn publish(shared: &Shared, request: &Request, room: &str, body: Vec<u8>) -> Response {
    let kind = match message_kind(request.header("Content-Type"), &body) {
        Ok(kind) => kind,
        Err(response) => return response,
    };
    let message = Message {
        room: room.into(),
        kind,
        payload: Bytes::from(body),
        from: None,
        order: crate::relay::broadcaster::Order::Here,
    };
    // The broadcaster says which `seq` the message got: without Redis as it takes it from
    // its channel, with Redis once Redis has numbered it and it came back.
    let (numbered, seq) = crossbeam_channel::bounded(1);
    let relayed = match &shared.backplane {
        Some(backplane) => {
            backplane.publish(crate::backplane::Outgoing::Message(message, Some(numbered)))
        }
        None => match shared.events.send_message(message, Some(numbered)) {
            Ok(()) => crate::backplane::Relayed::Queued,
            Err(_) => crate::backplane::Relayed::Stopped,
        },
    };
    let seq = match relayed {
        crate::backplane::Relayed::Queued => seq.recv_timeout(SEQ_WAIT).ok(),
        _ => None,
    };
    match relayed {
        crate::backplane::Relayed::Queued => {}
        // Not accepted, so not counted as published: the backend can retry, unlike a
        // WebSocket sender, whose dropped message is only counted.
        crate::backplane::Relayed::Dropped => return Response::status(503)
            .with_header(
                "Retry-After",
                crate::relay::connection::RETRY_AFTER_SECS.to_string(),
            )
            .with_body(
                "the Redis publish queue is full (Redis is slower than the clients); retry later\n",
            ),
        crate::backplane::Relayed::Stopped => {
            return Response::status(503).with_body("shutting down\n")
        }
    }
    shared
        .stats
        .messages_published
        .fetch_add(1, Ordering::Relaxed);
    let mut body = room_json(room, shared.room_size(room));
    if let Some(seq) = seq {
        body.pop();
        body.push_str(&format!(",\"seq\":{seq}}}"));
    }
    Response::status(202).with_content(JSON, body)
}

/// How long the publish endpoint waits for the broadcaster to number its message. It does so
/// as it takes the message from its channel (with Redis: a round trip later), so only a
/// broadcaster or a Redis far behind takes long; the `202` then goes without its `seq`
/// rather than keep the backend waiting.
const SEQ_WAIT: Duration = Duration::from_secs(1);
/// How long the history endpoint waits, with Redis, for the room's history to be Redis's:
/// longer than the broadcaster waits for a snapshot, so it is told either way.
const SYNC_WAIT: Duration = Duration::from_secs(3);
/// A moderation request is a small JSON object.
const MAX_DISCONNECT_BODY_BYTES: usize = 4096;

/// `GET /api/rooms/<room>`: its member count, distinct users (both cluster-wide with
/// `--redis`), and while it has state, its `seq`.
fn room_details_json(shared: &Shared, room: &str) -> String {
    let presence = shared.presence(room);
    let mut body = room_json(room, presence.clients);
    body.pop();
    body.push_str(&format!(",\"users\":{}", presence.users));
    if let Some(state) = shared.room_states.get(room) {
        body.push_str(&format!(
            ",\"epoch\":{},\"seq\":{}",
            crate::v1::codec::json_string(&state.epoch()),
            state.seq()
        ));
        body.push_str(&format!(
            ",\"reactions\":{}",
            state.reactions.lock().totals_json()
        ));
    }
    body.push('}');
    body
}

/// `GET /api/rooms/<room>/history?since=S&limit=N`: the first `N` retained messages after
/// `S`, oldest first, as `message` frames; `404` for a room without state.
fn history(shared: &Shared, request: &Request, room: &str) -> Response {
    if shared.backplane.is_some() {
        // The room's history here may not be all Redis retains (this instance came late to
        // its stream): the broadcaster makes it so first, or says it cannot soon.
        let (done, synced) = crossbeam_channel::bounded(1);
        let sync = crate::relay::broadcaster::Event::Sync {
            room: room.into(),
            done,
        };
        if shared
            .events
            .send_deadline(sync, Instant::now() + SEQ_WAIT)
            .is_ok()
        {
            let _ = synced.recv_timeout(SYNC_WAIT);
        }
    }
    let Some(state) = shared.room_states.get(room) else {
        return Response::status(404).with_body("no such room (or its state has expired)\n");
    };
    let config = &shared.config;
    let number = |name: &str| request.query_param(name).map(|value| value.parse::<u64>());
    let since = match number("since") {
        None => 0,
        Some(Ok(since)) => since,
        Some(Err(_)) => return Response::status(400).with_body("since must be a seq\n"),
    };
    let limit = match number("limit") {
        None => config.history,
        Some(Ok(limit)) => (limit as usize).min(config.history),
        Some(Err(_)) => return Response::status(400).with_body("limit must be a number\n"),
    };
    let now = Instant::now();
    let ttl = config.history_ttl;
    // One snapshot: the messages and the epoch they belong to, read under one lock.
    let (messages, epoch) = state.with_history_and_epoch(now, ttl, |history, epoch| {
        let mut messages = history.after(since, now, ttl);
        messages.truncate(limit);
        (messages, epoch.to_string())
    });
    let mut body = Vec::new();
    body.extend_from_slice(b"{\"room\":");
    body.extend_from_slice(crate::v1::codec::json_string(room).as_bytes());
    body.extend_from_slice(b",\"epoch\":");
    body.extend_from_slice(crate::v1::codec::json_string(&epoch).as_bytes());
    body.extend_from_slice(format!(",\"seq\":{},\"messages\":[", state.seq()).as_bytes());
    body.extend_from_slice(
        crate::relay::room_state::messages_json(&messages, usize::MAX)
            .0
            .as_bytes(),
    );
    body.extend_from_slice(b"]}");
    Response::ok(JSON, String::from_utf8_lossy(&body).into_owned())
}

/// Text for `text/*` bodies that are valid UTF-8 (a text frame must be, RFC 6455 §8.1), JSON
/// for an `application/json` body that parses (a v1 client gets it as `data`; one that does
/// not parse is text), binary for everything else.
fn message_kind(content_type: Option<&str>, body: &[u8]) -> Result<MessageKind, Response> {
    let media_type = content_type
        .and_then(|value| value.split(';').next())
        .map(|value| value.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let is_text = media_type.starts_with("text/") || media_type == "application/json";
    match (is_text, std::str::from_utf8(body).is_ok()) {
        (true, true)
            if media_type == "application/json"
                && serde_json::from_slice::<&serde_json::value::RawValue>(body).is_ok() =>
        {
            Ok(MessageKind::Json)
        }
        (true, true) => Ok(MessageKind::Text),
        (true, false) => {
            Err(Response::status(400).with_body("a text content type needs a UTF-8 body\n"))
        }
        (false, _) => Ok(MessageKind::Binary),
    }
}

fn rooms_json(shared: &Shared) -> String {
    let mut rooms = shared.rooms();
    rooms.sort();
    let entries: Vec<String> = rooms
        .iter()
        .map(|(room, clients)| room_json(room, *clients))
        .collect();
    format!("[{}]", entries.join(","))
}

fn room_json(room: &str, clients: usize) -> String {
    format!(
        "{{\"room\":{},\"clients\":{clients}}}",
        crate::v1::codec::json_string(room)
    )
}

/// Compares two byte strings in time that depends only on their lengths, so response timing
/// does not reveal how much of a guessed token was right. (A token's length is not secret.)
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_resources() {
        assert_eq!(resource("/").unwrap(), Resource::Demo);
        assert_eq!(resource("/healthz").unwrap(), Resource::Health);
        assert_eq!(resource("/api/rooms").unwrap(), Resource::Rooms);
        assert_eq!(
            resource("/api/rooms/stage").unwrap(),
            Resource::Room("stage")
        );
        assert_eq!(
            resource("/api/rooms/stage/messages").unwrap(),
            Resource::RoomMessages("stage")
        );
        assert_eq!(resource("/api/rooms/a b").unwrap_err().status, 400);
        assert_eq!(resource("/api/rooms/a/b").unwrap_err().status, 400);
        assert_eq!(resource("/api/rooms/").unwrap_err().status, 400);
        assert_eq!(resource("/api/rooms/.").unwrap_err().status, 400);
        assert_eq!(resource("/api/rooms/..").unwrap_err().status, 400);
        assert_eq!(resource("/api/rooms/../messages").unwrap_err().status, 400);
        assert_eq!(resource("/api/rooms/a.b").unwrap(), Resource::Room("a.b"));
        assert_eq!(resource("/demo.js").unwrap(), Resource::DemoScript);
        assert_eq!(resource("/demo.css").unwrap(), Resource::DemoStyle);
        assert_eq!(resource("/roomcast.js").unwrap(), Resource::ClientScript);
        assert!(!Resource::ClientScript.is_token_protected());
        assert_eq!(resource("/nope").unwrap_err().status, 404);
        assert_eq!(Resource::RoomMessages("x").allowed_method(), "POST");
        assert_eq!(
            resource("/api/rooms/stage/disconnect").unwrap(),
            Resource::RoomDisconnect("stage")
        );
        assert_eq!(Resource::RoomDisconnect("x").allowed_method(), "POST");
        assert!(Resource::RoomDisconnect("x").is_token_protected());
    }

    #[test]
    fn text_or_binary_by_content_type() {
        assert_eq!(
            message_kind(Some("text/plain; charset=utf-8"), b"hi").unwrap(),
            MessageKind::Text
        );
        assert_eq!(
            message_kind(Some("Application/JSON"), b"{}").unwrap(),
            MessageKind::Json
        );
        assert_eq!(
            message_kind(Some("application/json"), b"{not json").unwrap(),
            MessageKind::Text,
            "a JSON-typed body that does not parse is text"
        );
        assert_eq!(
            message_kind(Some("application/octet-stream"), b"\xff").unwrap(),
            MessageKind::Binary
        );
        assert_eq!(message_kind(None, b"hi").unwrap(), MessageKind::Binary);
        assert_eq!(
            message_kind(Some("text/plain"), b"\xff\xfe")
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(
            crate::v1::codec::json_string("a\"b\\c\n\u{1}é"),
            "\"a\\\"b\\\\c\\n\\u0001é\""
        );
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER   abc"), Some("abc"));
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer\tabc"), None);
    }

    #[test]
    fn only_plain_hosts_reach_the_policy() {
        assert_eq!(
            websocket_sources(Some("127.0.0.1:9001")),
            " ws://127.0.0.1:9001 wss://127.0.0.1:9001"
        );
        assert_eq!(
            websocket_sources(Some("live.example.com")),
            " ws://live.example.com wss://live.example.com"
        );
        for hostile in [
            "",
            "a;script-src *",
            "a b",
            "evil.example/x",
            "*",
            "[::1]:9001",
            "a..b",
            ".a",
            "a:",
            "a:123456",
            "a:1:2",
            "a'",
        ] {
            assert_eq!(websocket_sources(Some(hostile)), "", "{hostile:?}");
        }
        assert_eq!(websocket_sources(None), "");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
