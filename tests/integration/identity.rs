//! Join tokens, rights, per-user limits and moderation over real sockets (PROTOCOL §2, §3, §6).
//! The token verifier's own unit tests (every RFC 8725 pitfall) are in `src/v1/token.rs`;
//! here each kind of refusal is checked end to end, with the server still serving others.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use roomcast::v1::token::mint;
use roomcast::Config;

use crate::support::*;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
const API_TOKEN: &str = "backend-token-0123456789";

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `sub` in `room`, valid for an hour, with extra claims merged in.
fn token(sub: &str, room: &str, extra: serde_json::Value) -> String {
    let mut claims = json!({"sub": sub, "room": room, "exp": now_secs() + 3600});
    for (key, value) in extra.as_object().unwrap() {
        claims[key] = value.clone();
    }
    mint(SECRET.as_bytes(), &claims)
}

fn secured() -> Config {
    Config {
        token_secrets: vec![SECRET.into()],
        api_token: Some(API_TOKEN.into()),
        ..test_config()
    }
}

/// The status of an upgrade to `path` with `headers`, offering v1 or not.
fn upgrade_status(server: &TestServer, path: &str, headers: &[(&str, &str)], v1: bool) -> u16 {
    let mut request = upgrade_request(path);
    let mut extra = String::new();
    if v1 {
        extra.push_str("Sec-WebSocket-Protocol: roomcast.v1\r\n");
    }
    for (name, value) in headers {
        extra.push_str(&format!("{name}: {value}\r\n"));
    }
    request.insert_str(request.len() - 2, &extra);
    status_of(&response_head(server.addr, &request))
}

#[test]
fn with_a_secret_every_upgrade_needs_a_valid_token_for_its_room() {
    let server = start(secured());
    let good = token("u1", "stage", json!({}));
    // Plain and v1 alike.
    for v1 in [false, true] {
        assert_eq!(
            upgrade_status(&server, "/ws/stage", &[], v1),
            401,
            "no token"
        );
        let path = format!("/ws/stage?token={good}");
        assert_eq!(upgrade_status(&server, &path, &[], v1), 101);
        let bearer = format!("Bearer {good}");
        let header = [("Authorization", bearer.as_str())];
        assert_eq!(upgrade_status(&server, "/ws/stage", &header, v1), 101);
        // `?token=` wins over the header, even when the header's is the valid one.
        assert_eq!(
            upgrade_status(&server, "/ws/stage?token=x.y.z", &header, v1),
            401
        );
    }
    let forged = {
        let (body, _signature) = good.rsplit_once('.').unwrap();
        format!("{body}.{}", "A".repeat(43))
    };
    let unsigned = {
        let mut parts = good.split('.');
        let _header = parts.next();
        // {"alg":"none","typ":"JWT"}
        format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            parts.next().unwrap()
        )
    };
    let expired = token("u1", "stage", json!({"exp": now_secs() - 120}));
    let future = token("u1", "stage", json!({"nbf": now_secs() + 120}));
    let other_secret = mint(
        b"another-secret-of-at-least-32-bytes!!",
        &json!({"sub": "u1", "room": "stage", "exp": now_secs() + 60}),
    );
    for (bad, why) in [
        (forged, "wrong signature"),
        (unsigned, "alg none"),
        (expired, "expired"),
        (future, "not yet valid"),
        (other_secret, "another secret"),
        ("not-a-token".to_string(), "malformed"),
    ] {
        let path = format!("/ws/stage?token={bad}");
        assert_eq!(upgrade_status(&server, &path, &[], true), 401, "{why}");
    }
    // A valid token for another room is a 403, and a "*" token opens any room.
    let path = format!("/ws/backstage?token={good}");
    assert_eq!(upgrade_status(&server, &path, &[], true), 403);
    let anywhere = token("u1", "*", json!({}));
    let path = format!("/ws/backstage?token={anywhere}");
    assert_eq!(upgrade_status(&server, &path, &[], true), 101);

    // Refused upgrades are counted by reason, and the server still serves.
    let refused = server.stats.auth_refused.lock().clone();
    assert!(refused.values().sum::<u64>() >= 10, "{refused:?}");
    let mut client = server.connect_v1("stage", &format!("token={good}"));
    client.publish(json!("still serving"));
    assert_eq!(client.next_message()["data"], "still serving");
}

#[test]
fn a_verified_client_is_who_its_token_says_on_every_message() {
    let server = start(secured());
    let ann = token("u42", "stage", json!({"name": "Ann"}));
    let mut reader = server.connect_v1(
        "stage",
        &format!("token={}", token("u7", "stage", json!({"perm": "read"}))),
    );
    let mut writer = server.connect_v1("stage", &format!("token={ann}&name=Mallory"));
    assert_eq!(
        writer.welcome["you"],
        json!({"id": "u42", "name": "Ann", "verified": true, "perm": "post"}),
        "the token's name, not the ?name= asked for"
    );
    assert_eq!(reader.welcome["you"]["perm"], "read");
    assert_eq!(
        reader.welcome["you"]["name"], "u7",
        "no name claim: the sub"
    );
    writer.publish(json!({"text": "hi"}));
    let message = reader.next_message();
    assert_eq!(
        message["from"],
        json!({"id": "u42", "name": "Ann", "verified": true})
    );
    // A plain client with a token: its messages carry its identity too.
    let mut plain = {
        let url = format!(
            "{}?token={}",
            server.url("stage"),
            token("u9", "stage", json!({}))
        );
        upgrade(std::net::TcpStream::connect(server.addr).unwrap(), &url).unwrap()
    };
    plain.send(Message::text("plain words")).unwrap();
    let message = reader.next_message();
    assert_eq!(message["from"]["id"], "u9");
    assert_eq!(message["text"], "plain words");
}

#[test]
fn rights_are_enforced_for_v1_with_errors_and_for_plain_with_1008() {
    let server = start(secured());
    let mut viewer = server.connect_v1(
        "r",
        &format!("token={}", token("v", "r", json!({"perm": "read"}))),
    );
    viewer.publish(json!("nope"));
    assert_eq!(viewer.next_of("error")["code"], "forbidden");
    viewer.react("👏");
    assert_eq!(viewer.next_of("error")["code"], "forbidden");

    let mut reactor = server.connect_v1(
        "r",
        &format!("token={}", token("x", "r", json!({"perm": "react"}))),
    );
    reactor.publish(json!("nope"));
    assert_eq!(reactor.next_of("error")["code"], "forbidden");

    let url = format!(
        "{}?token={}",
        server.url("r"),
        token("p", "r", json!({"perm": "read"}))
    );
    let mut plain_viewer =
        upgrade(std::net::TcpStream::connect(server.addr).unwrap(), &url).unwrap();
    plain_viewer.send(Message::text("nope")).unwrap();
    assert_eq!(expect_close(&mut plain_viewer), CloseCode::Policy);

    // Nothing they tried reached the room (it would have come first); a poster gets through.
    let mut poster = server.connect_v1("r", &format!("token={}", token("w", "r", json!({}))));
    poster.publish(json!("allowed"));
    assert_eq!(viewer.next_message()["data"], "allowed");
}

#[test]
fn the_rate_limit_is_per_user_across_connections_and_reconnects() {
    let server = start(Config {
        rate: 1,
        burst: 4,
        ..secured()
    });
    let query = format!("token={}", token("u1", "r", json!({})));
    let (mut a, mut b) = (
        server.connect_v1("r", &query),
        server.connect_v1("r", &query),
    );
    for _ in 0..2 {
        a.publish(json!("a"));
        b.publish(json!("b"));
    }
    // Four messages spent the user's burst of four: the fifth, from either, is over it.
    for _ in 0..4 {
        a.next_message();
    }
    a.publish(json!("over"));
    assert_eq!(expect_close(&mut a.ws), CloseCode::Policy);

    // Reconnecting does not refill the bucket.
    drop(b);
    let mut again = server.connect_v1("r", &query);
    again.publish(json!("still over"));
    assert_eq!(expect_close(&mut again.ws), CloseCode::Policy);

    // Another user has its own bucket.
    let mut other = server.connect_v1("r", &format!("token={}", token("u2", "r", json!({}))));
    other.publish(json!("fine"));
    assert_eq!(other.next_message()["data"], "fine");
}

#[test]
fn max_connections_per_user_refuses_with_503_until_one_leaves() {
    let server = start(Config {
        max_connections_per_user: 2,
        ..secured()
    });
    let query = format!("token={}", token("u1", "r", json!({})));
    let first = server.connect_v1("r", &query);
    let _second = server.connect_v1("r", &query);
    let path = format!("/ws/r?{query}");
    assert_eq!(upgrade_status(&server, &path, &[], true), 503);
    let other = format!("/ws/r?token={}", token("u2", "r", json!({})));
    assert_eq!(upgrade_status(&server, &other, &[], true), 101, "per user");
    drop(first);
    assert!(wait_until(Duration::from_secs(5), || {
        upgrade_status(&server, &path, &[], true) == 101
    }));
}

#[test]
fn a_moderator_disconnects_a_user_with_4003_and_bans_it_from_the_room() {
    let server = start(secured());
    let troll = format!("token={}", token("troll", "*", json!({})));
    let (mut t1, mut t2) = (
        server.connect_v1("r", &troll),
        server.connect_v1("r", &troll),
    );
    let mut elsewhere = server.connect_v1("other", &troll);
    let mut fan = server.connect_v1("r", &format!("token={}", token("fan", "r", json!({}))));
    assert_eq!(fan.welcome["presence"], json!({"clients": 3, "users": 2}));

    let bearer = format!("Bearer {API_TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let body = br#"{"user":"troll","reason":"spam, spam and spam","ban_secs":600}"#;
    assert_eq!(
        http(server.addr, "POST", "/api/rooms/r/disconnect", &[], body).status,
        401,
        "the API token is required"
    );
    let response = http(server.addr, "POST", "/api/rooms/r/disconnect", &auth, body);
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), r#"{"disconnected":2}"#);
    for troll in [&mut t1, &mut t2] {
        let close = loop {
            match troll.ws.read() {
                Ok(Message::Close(Some(frame))) => break frame,
                Ok(_) => continue,
                Err(e) => panic!("no close frame: {e}"),
            }
        };
        assert_eq!(u16::from(close.code), 4003);
        assert_eq!(close.reason.as_str(), "spam, spam and spam");
    }
    // Banned from r, not from other, where its connection was left alone.
    assert_eq!(
        upgrade_status(&server, &format!("/ws/r?{troll}"), &[], true),
        403
    );
    elsewhere.publish(json!("not banned here"));
    assert_eq!(elsewhere.next_message()["data"], "not banned here");
    fan.publish(json!("the fan stays"));
    assert_eq!(fan.next_message()["data"], "the fan stays");
    assert!(wait_until(Duration::from_secs(5), || server
        .hub
        .room_size("r")
        == 1));

    // A ban without anyone connected, and bad requests.
    let ban_only = br#"{"user":"ghost","ban_secs":60}"#;
    let response = http(
        server.addr,
        "POST",
        "/api/rooms/r/disconnect",
        &auth,
        ban_only,
    );
    assert_eq!(response.text(), r#"{"disconnected":0}"#);
    let ghost = format!("/ws/r?token={}", token("ghost", "r", json!({})));
    assert_eq!(upgrade_status(&server, &ghost, &[], true), 403);
    for bad in [&b"{}"[..], b"[1]", br#"{"user":"u","ban_secs":-5}"#] {
        let response = http(server.addr, "POST", "/api/rooms/r/disconnect", &auth, bad);
        assert_eq!(response.status, 400, "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn open_mode_v1_clients_are_anonymous_each_their_own_user() {
    let server = start(Config {
        api_token: Some(API_TOKEN.into()),
        ..test_config()
    });
    let mut a = server.connect_v1("r", "name=Ann%20Smith");
    let b = server.connect_v1("r", &format!("name={}", "x".repeat(50)));
    assert_eq!(a.welcome["you"]["name"], "Ann Smith");
    assert_eq!(b.welcome["you"]["name"].as_str().unwrap().len(), 32);
    assert_eq!(b.welcome["presence"], json!({"clients": 2, "users": 2}));
    // A moderator can still remove an anonymous connection by its id.
    let id = b.welcome["you"]["id"].as_str().unwrap().to_string();
    let bearer = format!("Bearer {API_TOKEN}");
    let body = format!(r#"{{"user":"{id}"}}"#);
    let response = http(
        server.addr,
        "POST",
        "/api/rooms/r/disconnect",
        &[("Authorization", bearer.as_str())],
        body.as_bytes(),
    );
    assert_eq!(response.text(), r#"{"disconnected":1}"#);
    a.publish(json!("after"));
    assert_eq!(a.next_message()["data"], "after");
}

#[test]
fn metrics_count_v1_clients_refused_upgrades_by_reason_and_error_frames() {
    let server = start(secured());
    let mut client = server.connect_v1("r", &format!("token={}", token("u1", "r", json!({}))));
    client.send_raw("not json");
    client.next_of("error");
    let expired = token("u1", "r", json!({"exp": now_secs() - 600}));
    assert_eq!(
        upgrade_status(&server, &format!("/ws/r?token={expired}"), &[], true),
        401
    );
    assert_eq!(upgrade_status(&server, "/ws/r", &[], true), 401);
    let bearer = format!("Bearer {API_TOKEN}");
    let text = http(
        server.addr,
        "GET",
        "/metrics",
        &[("Authorization", bearer.as_str())],
        b"",
    )
    .text();
    for line in [
        "roomcast_v1_clients 1",
        "roomcast_v1_errors_sent_total 1",
        "roomcast_upgrades_refused_total{reason=\"expired\"} 1",
        "roomcast_upgrades_refused_total{reason=\"missing\"} 1",
        "roomcast_room_states 1",
        "roomcast_evictions_total{reason=\"moderated\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from\n{text}"
        );
    }
}

/// A moderation body nested deeply is refused, not parsed recursively on a 64 KiB stack
/// (which would abort the whole process); checked on the real binary.
#[test]
fn a_deeply_nested_moderation_body_does_not_abort_the_server() {
    let mut server = Process::start_configured(&["--listen", "127.0.0.1:0"], |command| {
        command.env("ROOMCAST_API_TOKEN", API_TOKEN);
    });
    let depth = 600; // 3 KB, under the 4 KiB body limit; 110 levels aborted the old parser
    let body = format!(
        r#"{{"user":"u","x":{}1{}}}"#,
        r#"{"a":"#.repeat(depth),
        "}".repeat(depth)
    );
    let bearer = format!("Bearer {API_TOKEN}");
    let response = http(
        server.addr,
        "POST",
        "/api/rooms/r/disconnect",
        &[("Authorization", bearer.as_str())],
        body.as_bytes(),
    );
    assert_eq!(response.status, 200, "the unknown field is skipped");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    assert_eq!(http(server.addr, "GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn a_ban_in_open_mode_is_refused_as_unenforceable() {
    let server = start(Config {
        api_token: Some(API_TOKEN.into()),
        ..test_config()
    });
    let bearer = format!("Bearer {API_TOKEN}");
    let response = http(
        server.addr,
        "POST",
        "/api/rooms/r/disconnect",
        &[("Authorization", bearer.as_str())],
        br#"{"user":"anon-1","ban_secs":60}"#,
    );
    assert_eq!(response.status, 400);
    assert!(response.text().contains("bans need join tokens"));
}

/// No connection of a banned user survives its ban, however its reconnects race the
/// moderator: one joining as the ban lands is removed as it joins.
#[test]
fn no_connection_of_a_banned_user_survives_its_ban() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let server = start(secured());
    let bearer = format!("Bearer {API_TOKEN}");
    for trial in 0..15 {
        let user = format!("troll{trial}");
        let token = token(&user, "r", json!({}));
        let stop = Arc::new(AtomicBool::new(false));
        let reconnectors: Vec<_> = (0..4)
            .map(|_| {
                let (addr, token, stop) = (server.addr, token.clone(), stop.clone());
                std::thread::spawn(move || {
                    let url = format!("ws://{addr}/ws/r?token={token}");
                    let mut held = Vec::new();
                    while !stop.load(Ordering::Relaxed) && held.len() < 24 {
                        let stream = std::net::TcpStream::connect(addr).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(2)))
                            .unwrap();
                        match upgrade(stream, &url) {
                            Ok(ws) => held.push(ws),
                            Err(_) => break,
                        }
                    }
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(10));
        let body = format!(r#"{{"user":"{user}","ban_secs":600}}"#);
        let response = http(
            server.addr,
            "POST",
            "/api/rooms/r/disconnect",
            &[("Authorization", bearer.as_str())],
            body.as_bytes(),
        );
        assert_eq!(response.status, 200);
        let gone = wait_until(Duration::from_secs(3), || server.hub.room_size("r") == 0);
        stop.store(true, Ordering::Relaxed);
        for thread in reconnectors {
            thread.join().unwrap();
        }
        assert!(gone, "trial {trial}: a banned user is still connected");
    }
}

/// A tap without the right to react is a forbidden frame like any other: it costs a message
/// token, so a read-only client cannot get error frames for free.
#[test]
fn forbidden_taps_cost_message_tokens_and_a_flood_of_them_closes() {
    let server = start(Config {
        rate: 1,
        burst: 3,
        ..secured()
    });
    let query = format!("token={}", token("v", "r", json!({"perm": "read"})));
    let mut viewer = server.connect_v1("r", &query);
    for _ in 0..3 {
        viewer.react("x");
        assert_eq!(viewer.next_of("error")["code"], "forbidden");
    }
    viewer.react("x");
    assert_eq!(expect_close(&mut viewer.ws), CloseCode::Policy);
    // A frame too long to be a tap pays before it is parsed, reaction or not.
    let mut fan = server.connect_v1("r", &format!("token={}", token("f", "r", json!({}))));
    let padded = format!(
        r#"{{"type":"react","key":"x","pad":"{}"}}"#,
        "p".repeat(1000)
    );
    for _ in 0..3 {
        fan.send_raw(&padded);
    }
    fan.send_raw(&padded);
    assert_eq!(expect_close(&mut fan.ws), CloseCode::Policy);
}
