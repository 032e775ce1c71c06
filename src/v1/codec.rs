//! The JSON frames of `roomcast.v1` (PROTOCOL §3, §4): parsing what a client sends, encoding
//! what the server sends.
//!
//! Encoding is by hand around `serde_json`'s string escaping rather than through a
//! `serde_json::Value`: a `Value` would sort keys, lose the exact text of numbers a client
//! published (`1e400`, 20-digit ids), and cost an allocation per node, for frames the
//! broadcaster writes once per room and message.

use std::fmt::Write as _;

use serde_json::value::RawValue;

use crate::relay::broadcaster::MessageKind;
use crate::v1::identity::Identity;

/// The subprotocol name a client offers in `Sec-WebSocket-Protocol`.
pub const SUBPROTOCOL: &str = "roomcast.v1";

/// What a v1 client asks for.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// `{"type":"publish","data":…}`: `data` as the client wrote it.
    Publish(&'a RawValue),
    /// `{"type":"react","key":"❤️"}`.
    React(String),
}

/// Parses one text frame from a v1 client. The error is the `message` of a `bad_request`.
pub fn parse(text: &str) -> Result<Incoming<'_>, &'static str> {
    let Ok(fields) = serde_json::from_str::<std::collections::HashMap<String, &RawValue>>(text)
    else {
        return Err(if serde_json::from_str::<&RawValue>(text).is_ok() {
            "a frame must be a JSON object with a \"type\""
        } else {
            "not valid JSON"
        });
    };
    let kind = fields
        .get("type")
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
    match kind.as_deref() {
        Some("publish") => match fields.get("data") {
            Some(data) => Ok(Incoming::Publish(data)),
            None => Err("publish needs \"data\""),
        },
        Some("react") => {
            let key = fields
                .get("key")
                .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
            match key {
                Some(key)
                    if (1..=MAX_REACTION_KEY_BYTES).contains(&key.len())
                        && !key.chars().any(char::is_control) =>
                {
                    Ok(Incoming::React(key))
                }
                _ => Err("react needs a \"key\" of 1-32 bytes, no control characters"),
            }
        }
        Some(_) => Err("unknown \"type\": use publish or react"),
        None => Err("a frame must be a JSON object with a \"type\""),
    }
}

/// Longest reaction key, in bytes of UTF-8 (PROTOCOL §3).
pub const MAX_REACTION_KEY_BYTES: usize = 32;

/// Deepest nesting of arrays and objects a published `data` may have. Far more than any chat
/// payload needs, and under the 128 levels at which common JSON parsers (serde_json's default,
/// for one) give up, so one client cannot publish what the others cannot read.
pub const MAX_DATA_DEPTH: usize = 64;

/// The JSON text of `raw` without insignificant whitespace: what a plain client receives for
/// a v1 publish. Keeps key order and the exact text of every number and string, which a
/// round trip through `serde_json::Value` would not. `None` when it nests deeper than
/// `MAX_DATA_DEPTH`.
pub fn minify(raw: &RawValue) -> Option<String> {
    let text = raw.get();
    let mut compact = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut depth = 0usize;
    for c in text.chars() {
        if in_string {
            compact.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            compact.push(c);
            match c {
                '"' => in_string = true,
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_DATA_DEPTH {
                        return None;
                    }
                }
                ']' | '}' => depth -= 1,
                _ => {}
            }
        }
    }
    Some(compact)
}

/// A JSON string literal, escaped by hand: cheaper than `serde_json` on the stack of a
/// connection thread at its upgrade (see `Identity::new`), and used by the HTTP side too.
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

/// Appends a JSON string literal.
fn push_string(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(out, text).expect("writing into a Vec cannot fail");
}

/// Appends a `message` frame's JSON (PROTOCOL §4): `from` is the sender's encoded identity,
/// `None` for the server. The body field follows the message's kind: `data` for JSON, `text`
/// for text, `binary` (standard base64) for binary.
pub fn push_message(
    out: &mut Vec<u8>,
    seq: u64,
    ts_ms: u64,
    from: Option<&str>,
    kind: MessageKind,
    payload: &[u8],
) {
    use std::io::Write as _;
    let from = from.unwrap_or(SERVER_SENDER);
    write!(
        out,
        r#"{{"type":"message","seq":{seq},"ts":{ts_ms},"from":{from},"#
    )
    .expect("writing into a Vec cannot fail");
    match kind {
        MessageKind::Json => {
            out.extend_from_slice(b"\"data\":");
            out.extend_from_slice(payload);
        }
        MessageKind::Text => {
            out.extend_from_slice(b"\"text\":");
            // Text payloads were checked as UTF-8 where they entered (tungstenite, the publish
            // endpoint, the Redis decoder); a lossy view is only a guard.
            push_string(out, &String::from_utf8_lossy(payload));
        }
        MessageKind::Binary => {
            out.extend_from_slice(b"\"binary\":\"");
            push_base64(out, payload);
            out.push(b'"');
        }
    }
    out.push(b'}');
}

/// The `from` of a backend publish.
const SERVER_SENDER: &str = r#"{"server":true}"#;

/// Room counts as `welcome` and `presence` report them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Presence {
    pub clients: usize,
    pub users: usize,
}

/// What a `welcome` brings a joining client besides who it is: the room's retained messages
/// (already JSON, the inside of the array), whether they are exactly what a resume missed,
/// the room's counts and its reaction totals (a JSON object).
#[derive(Clone, Copy, Debug)]
pub struct Backlog<'a> {
    pub history: &'a str,
    pub recovered: bool,
    pub presence: Presence,
    pub reactions: &'a str,
}

/// The first frame of a v1 session (PROTOCOL §4).
pub fn welcome(room: &str, you: &Identity, epoch: &str, seq: u64, backlog: Backlog<'_>) -> String {
    let mut out = String::with_capacity(256 + backlog.history.len());
    let _ = write!(
        out,
        r#"{{"type":"welcome","room":{room},"you":{{"id":{id},"name":{name},"verified":{verified},"perm":"{perm}"}},"epoch":{epoch},"seq":{seq},"recovered":{recovered},"history":[{history}],"presence":{{"clients":{clients},"users":{users}}},"reactions":{reactions}}}"#,
        room = json_string(room),
        id = json_string(&you.id),
        name = json_string(&you.name),
        verified = you.verified,
        perm = you.perm.as_str(),
        epoch = json_string(epoch),
        recovered = backlog.recovered,
        history = backlog.history,
        clients = backlog.presence.clients,
        users = backlog.presence.users,
        reactions = backlog.reactions,
    );
    out
}

/// A `presence` frame.
pub fn presence(counts: Presence) -> String {
    format!(
        r#"{{"type":"presence","clients":{},"users":{}}}"#,
        counts.clients, counts.users
    )
}

/// A `reactions` frame, `totals` being a JSON object of running totals.
pub fn reactions(totals: &str) -> String {
    format!(r#"{{"type":"reactions","totals":{totals}}}"#)
}

/// The two error codes of PROTOCOL §3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not valid JSON, not an object, an unknown `type`, a missing field.
    BadRequest,
    /// The client's `perm` does not allow it.
    Forbidden,
}

/// An `error` frame.
pub fn error(code: ErrorCode, message: &str) -> String {
    let code = match code {
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::Forbidden => "forbidden",
    };
    let message = json_string(message);
    format!(r#"{{"type":"error","code":"{code}","message":{message}}}"#)
}

/// Standard base64 with padding (RFC 4648 §4), the `binary` body of a message.
fn push_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    out.reserve(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        let sextet = |shift: u32| ALPHABET[(n >> shift & 63) as usize];
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if group.len() > 1 { sextet(6) } else { b'=' });
        out.push(if group.len() > 2 { sextet(0) } else { b'=' });
    }
}

/// The largest `message` frame JSON a payload of `payload_bytes` can become: text escaped
/// `\u00XX` (6 bytes per byte) is the worst body, plus the envelope with its longest sender.
pub fn max_message_json_bytes(payload_bytes: usize) -> usize {
    // The envelope: type, a 20-digit seq and ts, and a sender of a 128-byte id and 64-byte
    // name, each escaped at worst 6 bytes per byte.
    const ENVELOPE: usize = 128 + 6 * (128 + 64);
    payload_bytes.saturating_mul(6).saturating_add(ENVELOPE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn frames_parse_into_requests_or_a_reason() {
        let Ok(Incoming::Publish(data)) = parse(r#"{"type":"publish","data":{"a": [1, 2]}}"#)
        else {
            panic!("a publish")
        };
        assert_eq!(data.get(), r#"{"a": [1, 2]}"#);
        assert!(
            matches!(parse(r#"{"key":"👏","type":"react"}"#), Ok(Incoming::React(key)) if key == "👏")
        );
        for (text, reason) in [
            ("{", "not valid JSON"),
            ("[1]", "a frame must be a JSON object with a \"type\""),
            (
                "\"publish\"",
                "a frame must be a JSON object with a \"type\"",
            ),
            ("{}", "a frame must be a JSON object with a \"type\""),
            (
                r#"{"type":7}"#,
                "a frame must be a JSON object with a \"type\"",
            ),
            (
                r#"{"type":"shout"}"#,
                "unknown \"type\": use publish or react",
            ),
            (r#"{"type":"publish"}"#, "publish needs \"data\""),
            (
                r#"{"type":"react"}"#,
                "react needs a \"key\" of 1-32 bytes, no control characters",
            ),
            (
                r#"{"type":"react","key":""}"#,
                "react needs a \"key\" of 1-32 bytes, no control characters",
            ),
            (
                r#"{"type":"react","key":3}"#,
                "react needs a \"key\" of 1-32 bytes, no control characters",
            ),
        ] {
            assert_eq!(parse(text).err(), Some(reason), "{text}");
        }
        let long_key = format!(r#"{{"type":"react","key":"{}"}}"#, "x".repeat(33));
        assert!(parse(&long_key).is_err());
    }

    #[test]
    fn minify_drops_whitespace_outside_strings_only() {
        let raw: &RawValue =
            serde_json::from_str("{ \"a b\" : [ 1 ,\n 2e400 ] ,\t\"c\":\"x \\\" y\\\\\" }")
                .unwrap();
        assert_eq!(
            minify(raw).as_deref(),
            Some(r#"{"a b":[1,2e400],"c":"x \" y\\"}"#)
        );
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let deep = nested(MAX_DATA_DEPTH);
        assert!(minify(serde_json::from_str(&deep).unwrap()).is_some());
        let deeper = nested(MAX_DATA_DEPTH + 1);
        assert!(minify(serde_json::from_str(&deeper).unwrap()).is_none());
        // Brackets inside strings are text, not nesting.
        let text = format!("\"{}\"", "[".repeat(200));
        assert!(minify(serde_json::from_str(&text).unwrap()).is_some());
    }

    fn message(kind: MessageKind, payload: &[u8], from: Option<&str>) -> serde_json::Value {
        let mut out = Vec::new();
        push_message(&mut out, 42, 1_764_230_000_123, from, kind, payload);
        serde_json::from_slice(&out).expect("a message frame is JSON")
    }

    #[test]
    fn messages_carry_seq_ts_sender_and_the_body_for_their_kind() {
        let from = r#"{"id":"u1","name":"Ann","verified":true}"#;
        let json = message(MessageKind::Json, br#"{"text":"hi"}"#, Some(from));
        assert_eq!(json["type"], "message");
        assert_eq!(json["seq"], 42);
        assert_eq!(json["ts"], 1_764_230_000_123u64);
        assert_eq!(json["from"]["id"], "u1");
        assert_eq!(json["data"]["text"], "hi");
        let text = message(MessageKind::Text, "\"quoted\"\n\u{1}é".as_bytes(), None);
        assert_eq!(text["text"], "\"quoted\"\n\u{1}é");
        assert_eq!(text["from"]["server"], true);
        for payload in [&b""[..], b"a", b"ab", b"abc", b"\x00\xff\x10\x80"] {
            let binary = message(MessageKind::Binary, payload, None);
            let expected = base64::engine::general_purpose::STANDARD.encode(payload);
            assert_eq!(binary["binary"], expected.as_str());
        }
    }

    #[test]
    fn the_size_bound_holds_for_the_worst_text() {
        let payload = vec![1u8; 1000];
        let long_sender = serde_json::json!({"id": "\u{1}".repeat(128), "name": "\u{1}".repeat(64), "verified": true}).to_string();
        let mut out = Vec::new();
        push_message(
            &mut out,
            u64::MAX,
            u64::MAX,
            Some(&long_sender),
            MessageKind::Text,
            &payload,
        );
        assert!(out.len() <= max_message_json_bytes(payload.len()));
    }

    #[test]
    fn welcome_and_error_frames_are_json() {
        let you = Identity::anonymous(3, Some("Ann"));
        let mut history = Vec::new();
        push_message(&mut history, 1041, 7, None, MessageKind::Text, b"earlier");
        let history = String::from_utf8(history).unwrap();
        let welcome: serde_json::Value = serde_json::from_str(&welcome(
            "stage",
            &you,
            "5f2c9a1e",
            1042,
            Backlog {
                history: &history,
                recovered: true,
                presence: Presence {
                    clients: 12,
                    users: 9,
                },
                reactions: r#"{"👏":3}"#,
            },
        ))
        .unwrap();
        assert_eq!(welcome["recovered"], true);
        assert_eq!(welcome["history"][0]["text"], "earlier");
        assert_eq!(welcome["reactions"]["👏"], 3);
        let presence: serde_json::Value = serde_json::from_str(&presence(Presence {
            clients: 3,
            users: 2,
        }))
        .unwrap();
        assert_eq!(
            presence,
            serde_json::json!({"type": "presence", "clients": 3, "users": 2})
        );
        let reactions: serde_json::Value = serde_json::from_str(&reactions("{}")).unwrap();
        assert_eq!(
            reactions,
            serde_json::json!({"type": "reactions", "totals": {}})
        );
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["you"]["id"], "anon-3");
        assert_eq!(welcome["you"]["perm"], "post");
        assert_eq!(welcome["seq"], 1042);
        assert_eq!(welcome["presence"]["users"], 9);

        let error: serde_json::Value =
            serde_json::from_str(&error(ErrorCode::Forbidden, "read \"only\"")).unwrap();
        assert_eq!(error["code"], "forbidden");
        assert_eq!(error["message"], "read \"only\"");
    }
}
