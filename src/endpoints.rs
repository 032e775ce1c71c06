//! The plain HTTP endpoints served on the WebSocket port: health, metrics, the rooms API,
//! publishing from a backend, and the demo page.
//!
//! A connection thread lands here when its request is not for `/ws`. Each request is answered
//! once and the connection closed; the request head and body were bounded in size and time
//! before this code sees them, so no endpoint can hold a thread for long.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::broadcaster::MessageKind;
use crate::http::{self, Request, Response, HTML, JSON, PROMETHEUS, TEXT};
use crate::hub::is_valid_room_name;
use crate::metrics;
use crate::server::Shared;
use tungstenite::Bytes;

/// The demo page: one self-contained file, no external assets.
pub const DEMO_PAGE: &str = include_str!("demo.html");

/// What a request path names, before its method is considered.
#[derive(Debug, PartialEq, Eq)]
pub enum Resource<'a> {
    Demo,
    Health,
    Metrics,
    Rooms,
    Room(&'a str),
    RoomMessages(&'a str),
}

impl Resource<'_> {
    /// The methods the resource answers, for routing and for `405`'s `Allow`.
    pub fn allowed_method(&self) -> &'static str {
        match self {
            Resource::RoomMessages(_) => "POST",
            _ => "GET",
        }
    }
}

/// Maps a path to a resource. Room names are validated here, so handlers get only valid ones.
pub fn resource(path: &str) -> Result<Resource<'_>, Response> {
    let resource = match path {
        "/" | "/index.html" => Resource::Demo,
        "/healthz" => Resource::Health,
        "/metrics" => Resource::Metrics,
        "/api/rooms" => Resource::Rooms,
        _ => match path.strip_prefix("/api/rooms/") {
            Some(rest) => match rest.strip_suffix("/messages") {
                Some(room) => Resource::RoomMessages(room),
                None => Resource::Room(rest),
            },
            None => return Err(Response::status(404)),
        },
    };
    if let Resource::Room(room) | Resource::RoomMessages(room) = resource {
        if !is_valid_room_name(room) {
            return Err(
                Response::status(400).with_body("bad room name: use 1-64 of A-Z a-z 0-9 _ . -\n")
            );
        }
    }
    Ok(resource)
}

/// Answers one plain HTTP request: resolves the resource, checks the method (and, to publish,
/// the token), reads a body only where one is expected, and responds.
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
    if let Resource::RoomMessages(_) = resource {
        if !is_publish_enabled(shared) {
            return Response::status(404)
                .with_body("publishing is off: start roomcast with --api-token\n");
        }
    }
    if request.method != resource.allowed_method() {
        return Response::status(405).with_header("Allow", resource.allowed_method());
    }
    let body = match resource {
        Resource::RoomMessages(_) => {
            // Authenticate before reading the body: an unauthorised client gets nothing read.
            if !is_authorized(shared, request) {
                return Response::status(401).with_header("WWW-Authenticate", "Bearer");
            }
            match http::read_body(
                socket,
                request,
                leftover,
                shared.config.max_message_bytes,
                deadline,
            ) {
                Ok(body) => body,
                Err(status) => return Response::status(status),
            }
        }
        _ => Vec::new(),
    };
    respond(shared, request, &resource, body)
}

fn respond(shared: &Shared, request: &Request, resource: &Resource<'_>, body: Vec<u8>) -> Response {
    match resource {
        Resource::Demo => Response::ok(HTML, DEMO_PAGE),
        Resource::Health if shared.is_draining() => Response::status(503).with_body("draining\n"),
        Resource::Health if shared.backplane.as_ref().is_some_and(|b| !b.is_up()) => {
            // Still 200: this instance serves its own clients, and a load balancer that
            // pulled every instance because Redis is down would turn degraded into down.
            Response::ok(
                TEXT,
                "degraded: redis unreachable, relaying to this instance's clients only\n",
            )
        }
        Resource::Health => Response::ok(TEXT, "ok\n"),
        Resource::Metrics => Response::ok(PROMETHEUS, metrics::render(shared)),
        Resource::Rooms => Response::ok(JSON, rooms_json(shared)),
        Resource::Room(room) => Response::ok(JSON, room_json(room, shared.room_size(room))),
        Resource::RoomMessages(room) => publish(shared, request, room, body),
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
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    constant_time_eq(presented.as_bytes(), expected.as_bytes())
}

/// `POST /api/rooms/<room>/messages`: relays the body to the room through the broadcaster,
/// the same path as a client's message, so it takes its place in the room's single order.
fn publish(shared: &Shared, request: &Request, room: &str, body: Vec<u8>) -> Response {
    let kind = match message_kind(request.header("Content-Type"), &body) {
        Ok(kind) => kind,
        Err(response) => return response,
    };
    match shared.relay(room.into(), kind, Bytes::from(body)) {
        crate::backplane::Relayed::Queued => {}
        // Not accepted, so not counted as published: the backend can retry, unlike a
        // WebSocket sender, whose dropped message is only counted.
        crate::backplane::Relayed::Dropped => return Response::status(503)
            .with_header(
                "Retry-After",
                crate::connection::RETRY_AFTER_SECS.to_string(),
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
    Response::status(202).with_content(JSON, room_json(room, shared.room_size(room)))
}

/// Text for `text/*` and `application/json` bodies that are valid UTF-8 (a text frame must
/// be, RFC 6455 §8.1), binary for everything else.
fn message_kind(content_type: Option<&str>, body: &[u8]) -> Result<MessageKind, Response> {
    let media_type = content_type
        .and_then(|value| value.split(';').next())
        .map(|value| value.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let is_text = media_type.starts_with("text/") || media_type == "application/json";
    match (is_text, std::str::from_utf8(body).is_ok()) {
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
    format!("{{\"room\":{},\"clients\":{clients}}}", json_string(room))
}

/// A JSON string literal. Room names are already restricted to safe characters; escaping
/// anyway keeps this correct if that rule ever loosens.
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
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
        assert_eq!(resource("/nope").unwrap_err().status, 404);
        assert_eq!(Resource::RoomMessages("x").allowed_method(), "POST");
    }

    #[test]
    fn text_or_binary_by_content_type() {
        assert_eq!(
            message_kind(Some("text/plain; charset=utf-8"), b"hi").unwrap(),
            MessageKind::Text
        );
        assert_eq!(
            message_kind(Some("Application/JSON"), b"{}").unwrap(),
            MessageKind::Text
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
        assert_eq!(json_string("a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\n\\u0001é\"");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
