//! Presence and moderation across instances (`--redis`): a moderator's disconnect or ban on
//! one instance reaches the user on every instance, including instances started after the
//! ban; presence counts clients and users cluster-wide; the heartbeat keeps a room's state in
//! Redis alive while it has members.
//!
//! Built only with `--features redis`. Each test starts its own redis-server (see
//! `RedisServer`) and its instances in this process.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tungstenite::Message;

use roomcast::v1::token::mint;
use roomcast::Config;

use crate::support::*;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
const API_TOKEN: &str = "backend-token-0123456789";
/// Short presence TTL, so a heartbeat comes every half second (a third of it).
const TTL: Duration = Duration::from_millis(1500);
/// Generous bound for the link to come up, or a heartbeat to carry a count.
const LINK_WAIT: Duration = Duration::from_secs(20);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `sub`, valid in every room for an hour.
fn token(sub: &str) -> String {
    let claims = json!({"sub": sub, "room": "*", "exp": now_secs() + 3600});
    format!("token={}", mint(SECRET.as_bytes(), &claims))
}

fn cluster_config(redis: &RedisServer) -> Config {
    Config {
        redis: Some(redis.url()),
        redis_ttl: TTL,
        rate: 0,
        token_secrets: vec![SECRET.into()],
        api_token: Some(API_TOKEN.into()),
        ..test_config()
    }
}

/// Starts an instance and waits until its link is up (so its subscriber listens).
fn instance(redis: &RedisServer) -> TestServer {
    start_linked(cluster_config(redis))
}

/// `POST /api/rooms/<room>/disconnect` with `body`; the status and the body.
fn disconnect(server: &TestServer, room: &str, body: serde_json::Value) -> (u16, String) {
    let bearer = format!("Bearer {API_TOKEN}");
    let response = http(
        server.addr,
        "POST",
        &format!("/api/rooms/{room}/disconnect"),
        &[("Authorization", bearer.as_str())],
        body.to_string().as_bytes(),
    );
    (response.status, response.text())
}

/// The status of a v1 upgrade to `room` with `query`.
fn upgrade_status(server: &TestServer, room: &str, query: &str) -> u16 {
    let mut request = upgrade_request(&format!("/ws/{room}?{query}"));
    request.insert_str(request.len() - 2, "Sec-WebSocket-Protocol: roomcast.v1\r\n");
    status_of(&response_head(server.addr, &request))
}

/// Reads until the close frame: its code and reason.
fn close_of(client: &mut V1Client) -> (u16, String) {
    loop {
        match client.ws.read() {
            Ok(Message::Close(Some(frame))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Ok(Message::Close(None)) => panic!("a close without a code"),
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

/// `/api/rooms/<room>` as JSON.
fn room_details(server: &TestServer, room: &str) -> serde_json::Value {
    let body = http(server.addr, "GET", &format!("/api/rooms/{room}"), &[], b"").text();
    serde_json::from_str(&body).unwrap()
}

fn metric(server: &TestServer, sample: &str) -> u64 {
    metric_sample(server, API_TOKEN, sample)
}

/// Waits until the `clients` of `room` on every one of `servers` is `clients`: each has heard
/// the others' heartbeats since they joined.
fn wait_for_cluster_count(servers: &[&TestServer], room: &str, clients: u64) {
    for server in servers {
        assert!(
            wait_until(LINK_WAIT, || room_details(server, room)["clients"]
                == clients),
            "the cluster count of {room} never reached {clients}: {}",
            room_details(server, room)
        );
    }
}

/// A ban asked of instance B reaches the user's connection on instance A: before, B closed
/// only its own connections and A's stayed open, so this read timed out without a close.
#[test]
fn a_ban_on_one_instance_closes_the_user_everywhere_and_bars_it_even_from_later_instances() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (instance(&redis), instance(&redis));
    let troll = token("tr\"oll\n é");
    let mut on_a = a.connect_v1("stage", &troll);
    let mut elsewhere = a.connect_v1("other", &troll);
    let mut fan = a.connect_v1("stage", &token("fan"));
    let mut on_b = b.connect_v1("stage", &troll);

    let reason = "spam, \"spam\" and spam ✓";
    let (status, body) = disconnect(
        &b,
        "stage",
        json!({"user": "tr\"oll\n é", "reason": reason, "ban_secs": 600}),
    );
    assert_eq!(status, 200);
    assert_eq!(
        body, r#"{"disconnected":1,"cluster":true}"#,
        "B's own count"
    );
    assert_eq!(close_of(&mut on_b), (4003, reason.to_string()));
    assert_eq!(
        close_of(&mut on_a),
        (4003, reason.to_string()),
        "the other instance's connection"
    );
    // A recorded the ban before it closed: a new token of the user is refused there now.
    assert_eq!(upgrade_status(&a, "stage", &troll), 403);
    assert_eq!(upgrade_status(&b, "stage", &troll), 403);
    // Only that room, only that user; A keeps serving.
    elsewhere.publish(json!("not banned here"));
    assert_eq!(elsewhere.next_message()["data"], "not banned here");
    fan.publish(json!("the fan stays"));
    assert_eq!(fan.next_message()["data"], "the fan stays");

    // The ban is kept in Redis, so an instance started after it refuses the user too.
    assert_eq!(
        redis.command(&[
            b"HEXISTS",
            b"roomcast:bans",
            "stage\ntr\"oll\n é".as_bytes()
        ]),
        ":1"
    );
    let c = instance(&redis);
    assert_eq!(upgrade_status(&c, "stage", &troll), 403);
    assert_eq!(upgrade_status(&c, "other", &troll), 101);
    assert_eq!(upgrade_status(&c, "stage", &token("fan")), 101);
}

/// A disconnect without a ban closes the user on all three instances, and the user may come
/// straight back. An anonymous id is not a user on the other instances (each numbers its own
/// `anon-<n>`), so a command from elsewhere never closes an anonymous connection.
#[test]
fn a_disconnect_without_a_ban_closes_the_user_on_all_three_instances() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let servers = [instance(&redis), instance(&redis), instance(&redis)];
    let mut users: Vec<V1Client> = servers
        .iter()
        .map(|server| server.connect_v1("live", &token("u42")))
        .collect();
    let mut bystanders: Vec<V1Client> = servers
        .iter()
        .map(|server| server.connect_v1("live", &token("u7")))
        .collect();

    let (status, body) = disconnect(&servers[1], "live", json!({"user": "u42"}));
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"disconnected":1,"cluster":true}"#);
    for (i, user) in users.iter_mut().enumerate() {
        assert_eq!(
            close_of(user),
            (4003, "removed by a moderator".to_string()),
            "instance {i}"
        );
    }
    for (server, bystander) in servers.iter().zip(&mut bystanders) {
        bystander.publish(json!("still here"));
        assert_eq!(bystander.next_message()["data"], "still here");
        // Not banned: the user comes back at once.
        assert_eq!(upgrade_status(server, "live", &token("u42")), 101);
    }
}

/// Anything on the moderation channel that is not a well-formed command is dropped and
/// counted, and the instance goes on serving; a well-formed one from another instance is
/// acted on, and one carrying a ban past a week is held to a week.
#[test]
fn garbage_on_the_moderation_channel_is_dropped_and_counted() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = instance(&redis);
    let mut member = server.connect_v1("feed", &token("reader"));
    let mut target = server.connect_v1("feed", &token("target"));
    let long_user = "u".repeat(129);
    let garbage: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        b"\xff\xfe".to_vec(),
        b"[]".to_vec(),
        br#"{"type":"disconnect"}"#.to_vec(),
        br#"{"type":"disconnect","origin":1,"room":"a b","user":"target","reason":""}"#.to_vec(),
        br#"{"type":"disconnect","origin":1,"room":"feed","user":"target"}"#.to_vec(),
        br#"{"type":"disconnect","origin":"1","room":"feed","user":"target","reason":""}"#.to_vec(),
        br#"{"type":"disconnect","origin":1,"room":"feed","user":"target","reason":"","ban_until_ms":"soon"}"#.to_vec(),
        format!(r#"{{"type":"disconnect","origin":1,"room":"feed","user":"{long_user}","reason":""}}"#)
            .into_bytes(),
        vec![b' '; 64 * 1024],
    ];
    for payload in &garbage {
        redis.publish("roomcast:moderation", payload);
    }
    // Redis delivers one connection's publishes in order: once this arrives, so has the
    // garbage before it.
    let end_of_century = 4_102_444_800_000u64;
    let command = json!({
        "type": "disconnect", "origin": 1, "room": "feed", "user": "target",
        "reason": "by hand", "ban_until_ms": end_of_century,
    });
    redis.publish("roomcast:moderation", command.to_string().as_bytes());
    assert_eq!(close_of(&mut target), (4003, "by hand".to_string()));
    assert_eq!(
        metric(
            &server,
            r#"roomcast_redis_dropped_total{reason="malformed"}"#
        ),
        garbage.len() as u64
    );
    assert_eq!(upgrade_status(&server, "feed", &token("target")), 403);
    member.publish(json!("still relaying"));
    assert_eq!(member.next_message()["data"], "still relaying");
    assert_eq!(health(&server), "ok\n", "garbage does not disturb the link");
    assert_eq!(metric(&server, "roomcast_bans"), 1);
}

/// A subscriber that reconnects (here: Redis dropped it) loads the bans kept in Redis, so a
/// ban it missed while away is enforced; ended bans and entries that are not bans are deleted.
#[test]
fn a_reconnecting_subscriber_loads_the_bans_it_missed() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = instance(&redis);
    let in_an_hour = (now_secs() + 3600) * 1000;
    // As another instance records a ban whose PUBLISH this one did not hear.
    redis.command(&[
        b"HSET",
        b"roomcast:bans",
        b"room\nmissed",
        in_an_hour.to_string().as_bytes(),
        b"room\nended",
        b"1000",
        b"garbage",
        b"x",
    ]);
    assert_eq!(upgrade_status(&server, "room", &token("missed")), 101);
    assert_eq!(
        redis.command(&[b"CLIENT", b"KILL", b"TYPE", b"pubsub"]),
        ":1"
    );
    assert!(
        wait_until(LINK_WAIT, || upgrade_status(
            &server,
            "room",
            &token("missed")
        ) == 403),
        "the missed ban was never loaded"
    );
    assert_eq!(upgrade_status(&server, "room", &token("ended")), 101);
    assert_eq!(
        redis.command(&[b"HEXISTS", b"roomcast:bans", b"room\nended"]),
        ":0"
    );
    assert_eq!(
        redis.command(&[b"HEXISTS", b"roomcast:bans", b"garbage"]),
        ":0"
    );
    assert_eq!(
        metric(
            &server,
            r#"roomcast_redis_dropped_total{reason="malformed"}"#
        ),
        1
    );
    assert!(wait_until(LINK_WAIT, || health(&server) == "ok\n"));
}

/// With Redis down the disconnect still happens here, and the reply says it went no further.
#[test]
fn a_disconnect_while_redis_is_down_is_local_and_says_so() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let server = instance(&redis);
    let mut user = server.connect_v1("r", &token("u1"));
    redis.kill();
    assert!(
        wait_until(LINK_WAIT, || health(&server).starts_with("degraded")),
        "healthz never reported degraded"
    );
    let (status, body) = disconnect(&server, "r", json!({"user": "u1", "ban_secs": 60}));
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"disconnected":1,"cluster":false}"#);
    assert_eq!(
        close_of(&mut user),
        (4003, "removed by a moderator".to_string())
    );
    assert_eq!(upgrade_status(&server, "r", &token("u1")), 403);
}

/// Users are counted per instance and summed: `/api/rooms/<room>` on either instance reports
/// both instances' clients and users. Before, `users` was this instance's alone.
#[test]
fn the_rooms_api_reports_cluster_wide_clients_and_users() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (instance(&redis), instance(&redis));
    // A: u1 twice and u2; B: u3 and a plain client of u4.
    let _a = [
        a.connect_v1("stage", &token("u1")),
        a.connect_v1("stage", &token("u1")),
        a.connect_v1("stage", &token("u2")),
    ];
    let _b = b.connect_v1("stage", &token("u3"));
    let stream = std::net::TcpStream::connect(b.addr).unwrap();
    let _plain = upgrade(stream, &format!("{}?{}", b.url("stage"), token("u4"))).unwrap();
    for server in [&a, &b] {
        assert!(
            wait_until(LINK_WAIT, || room_details(server, "stage")["users"] == 4),
            "users never summed: {}",
            room_details(server, "stage")
        );
        assert_eq!(room_details(server, "stage")["clients"], 5);
    }
    assert_eq!(room_details(&a, "nobody")["users"], 0);
}

/// Presence frames and welcomes count the whole cluster: the broadcaster adds
/// `Backplane::remote_presence` to its own counts (without it the welcome says 1 client).
#[test]
fn presence_frames_and_welcomes_count_the_whole_cluster() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (instance(&redis), instance(&redis));
    let _on_a = [
        a.connect_v1("stage", &token("u1")),
        a.connect_v1("stage", &token("u2")),
    ];
    wait_for_cluster_count(&[&a, &b], "stage", 2);
    let mut watcher = b.connect_v1("stage", &token("u3"));
    assert_eq!(
        watcher.welcome["presence"],
        json!({"clients": 3, "users": 3})
    );
    let _another = a.connect_v1("stage", &token("u4"));
    let counted = wait_until(LINK_WAIT, || {
        let frame = watcher.next_of("presence");
        frame["clients"] == 4 && frame["users"] == 4
    });
    assert!(
        counted,
        "the presence frame never counted the other instance"
    );
}

/// The heartbeat extends a room's state and reactions in Redis by `--room-ttl` while the
/// instance has members in the room, and leaves other rooms' keys alone.
#[test]
fn the_heartbeat_keeps_a_rooms_state_in_redis_alive_while_it_has_members() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    for room in ["busy", "empty"] {
        for (key, field) in [("state", "seq"), ("reactions", "👏")] {
            let key = format!("roomcast:v1:{{{room}}}:{key}");
            redis.command(&[b"HSET", key.as_bytes(), field.as_bytes(), b"1"]);
            redis.command(&[b"PEXPIRE", key.as_bytes(), b"5000"]);
        }
    }
    let server = start(Config {
        room_ttl: Duration::from_secs(600),
        ..cluster_config(&redis)
    });
    let _member = server.connect_v1("busy", &token("u1"));
    let pttl = |key: &str| -> i64 {
        let reply = redis.command(&[b"PTTL", key.as_bytes()]);
        reply.trim_start_matches(':').parse().unwrap()
    };
    for key in ["state", "reactions"] {
        let key = format!("roomcast:v1:{{busy}}:{key}");
        assert!(
            wait_until(LINK_WAIT, || pttl(&key) > 60_000),
            "{key} was not extended: {} ms left",
            pttl(&key)
        );
        let empty = key.replace("busy", "empty");
        assert!(pttl(&empty) <= 5000, "{empty} was extended");
    }
}

/// A bans hash full of bans that have ended does not refuse a new one: the ended ones go
/// first. Before, a long-running cluster stopped recording bans for later instances once
/// 100,000 had ever been issued.
#[test]
fn a_full_bans_hash_of_ended_bans_makes_room_for_a_new_one() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = instance(&redis);
    let fill = format!(
        "for i = 1, {} do redis.call('HSET', KEYS[1], 'old' .. i .. '\\n' .. 'u', 1) end",
        roomcast::relay::users::MAX_BANS
    );
    redis.command(&[b"EVAL", fill.as_bytes(), b"1", b"roomcast:bans"]);
    let (status, body) = disconnect(&a, "stage", json!({"user": "late", "ban_secs": 600}));
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"disconnected":0,"cluster":true}"#)
    );
    assert!(
        wait_until(LINK_WAIT, || redis.command(&[
            b"HEXISTS",
            b"roomcast:bans",
            b"stage\nlate"
        ]) == ":1"),
        "the new ban was not recorded"
    );
    assert_eq!(redis.command(&[b"HLEN", b"roomcast:bans"]), ":1");
}
