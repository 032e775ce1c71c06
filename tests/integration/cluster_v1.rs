//! `roomcast.v1` across instances (PROTOCOL §7, issue 13): one room, one `seq` sequence, one
//! epoch, one history and one set of reaction totals, whichever instance a client is on, and
//! what a client sees while Redis is down and once it is back.
//!
//! Built only with `--features redis`. Each test starts its own `redis-server` (persistence
//! off) and its instances in this process, and checks behaviour over real sockets only: what
//! v1 clients, plain clients and the HTTP API see, never the internals.

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message;

use roomcast::Config;

use crate::support::*;

/// The backend API token (at least 16 bytes, as `--api-token` wants).
const API_TOKEN: &str = "cluster-token-0123456789";
/// Short presence TTL, so an instance notices a dead Redis within seconds.
const TTL: Duration = Duration::from_millis(1500);
/// Generous bound for the link to come up, go down or come back (reconnect backoff peaks at 5 s).
const LINK_WAIT: Duration = Duration::from_secs(20);
/// Bound for anything that should follow a message within a few Redis round trips.
const SETTLE: Duration = Duration::from_secs(10);
/// Every seq an instance gives out on its own while Redis is unreachable is above this
/// (2^40): far beyond any seq Redis gave the room, so a resume with one is never recovered.
const LOCAL_SEQ_FLOOR: u64 = 1 << 40;

/// An instance of the cluster: no message rate (the tests send bursts on purpose), unlimited
/// reaction taps, totals pushed every 50 ms.
fn cluster_config(redis: &RedisServer) -> Config {
    Config {
        redis: Some(redis.url()),
        redis_ttl: TTL,
        rate: 0,
        reaction_rate: 0,
        reaction_interval: Duration::from_millis(50),
        api_token: Some(API_TOKEN.into()),
        ..test_config()
    }
}

/// Starts an instance and waits until its link is up (publisher and subscriber connected).
fn instance(redis: &RedisServer) -> TestServer {
    start_linked(cluster_config(redis))
}

fn bearer() -> String {
    format!("Bearer {API_TOKEN}")
}

fn metric(server: &TestServer, sample: &str) -> u64 {
    metric_sample(server, API_TOKEN, sample)
}

const MALFORMED: &str = r#"roomcast_redis_dropped_total{reason="malformed"}"#;

/// `GET /api/rooms/<room>` (public), parsed.
fn room_info(server: &TestServer, room: &str) -> Value {
    let response = http(server.addr, "GET", &format!("/api/rooms/{room}"), &[], b"");
    assert_eq!(response.status, 200, "{}", response.text());
    serde_json::from_slice(&response.body).unwrap()
}

/// `GET /api/rooms/<room>/history?<query>` with the API token, parsed; it must answer 200.
fn history_api(server: &TestServer, room: &str, query: &str) -> Value {
    let bearer = bearer();
    let auth = [("Authorization", bearer.as_str())];
    let path = format!("/api/rooms/{room}/history?{query}");
    let response = http(server.addr, "GET", &path, &auth, b"");
    assert_eq!(response.status, 200, "{path}: {}", response.text());
    serde_json::from_slice(&response.body).unwrap()
}

/// A backend's `POST /api/rooms/<room>/messages` with a JSON body: `202`; returns its body.
fn post_json(server: &TestServer, room: &str, body: &Value) -> Value {
    let bearer = bearer();
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    let path = format!("/api/rooms/{room}/messages");
    let response = http(
        server.addr,
        "POST",
        &path,
        &headers,
        body.to_string().as_bytes(),
    );
    assert_eq!(response.status, 202, "{}", response.text());
    serde_json::from_slice(&response.body).unwrap()
}

/// `PUBLISH channel payload` as a raw Redis client would, whoever subscribes.
fn publish_raw(redis: &RedisServer, channel: &str, payload: &[u8]) {
    let reply = redis.command(&[b"PUBLISH", channel.as_bytes(), payload]);
    assert!(reply.starts_with(':'), "PUBLISH answered {reply}");
}

fn seq_of(frame: &Value) -> u64 {
    frame["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seq: {frame}"))
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(seq_of).collect()
}

fn epoch_of(client: &V1Client) -> String {
    client.welcome["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("no epoch: {}", client.welcome))
        .to_string()
}

/// The welcome's `history`, as a list of message frames.
fn history_of(client: &V1Client) -> Vec<Value> {
    client.welcome["history"]
        .as_array()
        .unwrap_or_else(|| panic!("no history: {}", client.welcome))
        .clone()
}

/// The next `n` message frames (presence and reactions skipped).
fn messages(client: &mut V1Client, n: usize) -> Vec<Value> {
    (0..n).map(|_| client.next_message()).collect()
}

fn assert_consecutive(frames: &[Value], what: &str) {
    let seqs = seqs(frames);
    assert!(
        seqs.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "{what}: seqs not consecutive: {seqs:?}"
    );
}

/// Connects `resume` with `?since=<since>&epoch=<epoch>` on `server` and checks it got exactly
/// `missed`, once each and in order: the welcome says `recovered: true`, its history is the
/// first of them and its `seq` the last of those, and any the instance had not yet received
/// when it answered (it learns them from Redis a moment after another instance's member did)
/// follow as live messages. Returns the client.
fn assert_resumes_exactly(
    server: &TestServer,
    room: &str,
    since: u64,
    epoch: &str,
    missed: &[Value],
) -> V1Client {
    let mut back = server.connect_v1(room, &format!("since={since}&epoch={epoch}"));
    let welcome = back.welcome.clone();
    assert_eq!(welcome["recovered"], true, "not recovered: {welcome}");
    assert_eq!(welcome["epoch"], epoch, "{welcome}");
    let history = history_of(&back);
    assert!(
        history.len() <= missed.len() && history[..] == missed[..history.len()],
        "the resume's history is not the gap: got {history:?}, missed {missed:?}"
    );
    assert_eq!(
        seq_of(&welcome),
        since + history.len() as u64,
        "the welcome's seq does not match its history: {welcome}"
    );
    let rest = messages(&mut back, missed.len() - history.len());
    assert_eq!(
        &rest[..],
        &missed[history.len()..],
        "after the welcome, not the rest of the gap"
    );
    back
}

/// Reads frames until a `reactions` frame carries `expected` (or `within` passes), checking
/// that no totals on the way ever went above it. Returns the last totals seen.
fn await_totals(client: &mut V1Client, expected: &Value, within: Duration) -> Value {
    let never_above = |totals: &Value| {
        let totals = totals.as_object().expect("totals are an object");
        for (key, total) in totals {
            let limit = expected[key].as_u64().unwrap_or(0);
            assert!(
                total.as_u64().unwrap() <= limit,
                "{key} counted {total}, more than the {limit} taps sent"
            );
        }
    };
    let mut last = client.welcome["reactions"].clone();
    if last == *expected {
        return last;
    }
    let stream = client.ws.get_mut();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match client.ws.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                assert_ne!(frame["type"], "message", "taps are never relayed");
                if frame["type"] == "reactions" {
                    never_above(&frame["totals"]);
                    last = frame["totals"].clone();
                    if last == *expected {
                        break;
                    }
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("a watcher's connection failed: {e}"),
        }
    }
    client
        .ws
        .get_mut()
        .set_read_timeout(Some(READ_TIMEOUT))
        .unwrap();
    last
}

/// Who sent a message of test 1, and its number in that sender's sequence.
fn source_of(frame: &Value) -> (String, u64) {
    if let Some(text) = frame["text"].as_str() {
        let (source, n) = text.split_once(':').expect("a plain text is source:n");
        return (source.to_string(), n.parse().unwrap());
    }
    let data = &frame["data"];
    (
        data["src"].as_str().expect("data names its source").into(),
        data["n"].as_u64().expect("data numbers itself"),
    )
}

/// PROTOCOL §7: Redis assigns each room's `seq`, so a message has the same `seq`, `ts` and
/// `from` on every instance, in one order, whatever sent it: a v1 publish, a plain client's
/// text, or a backend's POST to any instance. Before, each instance numbered the room itself,
/// under an epoch of its own and with its own clock.
#[test]
fn one_seq_sequence_is_seen_identically_on_every_instance() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b, c) = (instance(&redis), instance(&redis), instance(&redis));
    let mut members = vec![
        a.connect_v1("stage", "name=member-a"),
        b.connect_v1("stage", "name=member-b"),
        c.connect_v1("stage", "name=member-c"),
    ];
    let epoch = epoch_of(&members[0]);
    for member in &members {
        assert_eq!(epoch_of(member), epoch, "one epoch for the room everywhere");
        assert_eq!(member.welcome["seq"], members[0].welcome["seq"]);
    }
    let start_seq = seq_of(&members[0].welcome);

    // Four senders at once, on all three instances.
    const PER_SENDER: u64 = 30;
    let mut v1_on_a = a.connect_v1("stage", "name=sender-a");
    let mut plain_on_b = b.connect("stage");
    let mut v1_on_c = c.connect_v1("stage", "name=sender-c");
    let senders = vec![
        thread::spawn(move || {
            for n in 0..PER_SENDER {
                v1_on_a.publish(json!({"src": "v1-a", "n": n}));
            }
            Box::new(v1_on_a) as Box<dyn Send>
        }),
        thread::spawn(move || {
            for n in 0..PER_SENDER {
                plain_on_b
                    .send(Message::text(format!("plain-b:{n}")))
                    .unwrap();
            }
            Box::new(plain_on_b) as Box<dyn Send>
        }),
        thread::spawn(move || {
            for n in 0..PER_SENDER {
                v1_on_c.publish(json!({"src": "v1-c", "n": n}));
            }
            Box::new(v1_on_c) as Box<dyn Send>
        }),
    ];
    // The backend's, from this thread, among them.
    for n in 0..PER_SENDER {
        post_json(&c, "stage", &json!({"src": "api-c", "n": n}));
    }
    // Kept open until every member has read everything: a sender that closed early could
    // race its last messages.
    let _senders: Vec<Box<dyn Send>> = senders.into_iter().map(|s| s.join().unwrap()).collect();

    let total = 4 * PER_SENDER as usize;
    let seen: Vec<Vec<Value>> = members.iter_mut().map(|m| messages(m, total)).collect();
    let expected_seqs: Vec<u64> = (start_seq + 1..=start_seq + total as u64).collect();
    assert_eq!(seqs(&seen[0]), expected_seqs, "seqs are consecutive");
    for (i, frames) in seen.iter().enumerate().skip(1) {
        for (k, (here, there)) in seen[0].iter().zip(frames).enumerate() {
            assert_eq!(
                here, there,
                "message {k}: instance A and instance {i} disagree (seq, ts, from or body)"
            );
        }
    }
    // Every sender's messages once each, in its order; the backend's from the server.
    let mut by_source: HashMap<String, Vec<u64>> = HashMap::new();
    for frame in &seen[0] {
        let (source, n) = source_of(frame);
        if source == "api-c" {
            assert_eq!(frame["from"], json!({"server": true}));
        }
        by_source.entry(source).or_default().push(n);
    }
    for source in ["v1-a", "plain-b", "v1-c", "api-c"] {
        assert_eq!(
            by_source.get(source),
            Some(&(0..PER_SENDER).collect::<Vec<_>>()),
            "{source}'s messages lost, repeated or reordered"
        );
    }
    // The API agrees on every instance.
    let last = *expected_seqs.last().unwrap();
    for server in [&a, &b, &c] {
        assert!(
            wait_until(SETTLE, || {
                let info = room_info(server, "stage");
                info["epoch"] == epoch.as_str() && info["seq"] == last
            }),
            "GET /api/rooms/stage: {}",
            room_info(server, "stage")
        );
    }
}

/// PROTOCOL §4 and §7: the epoch and history live in Redis, so a client that read up to `S`
/// on instance A and resumes on instance B with `?since=S&epoch=E` gets exactly what it
/// missed. Before, B had a room state of its own: another epoch, so `recovered: false`.
#[test]
fn a_client_that_leaves_a_resumes_on_b_with_exactly_its_gap() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b, c) = (instance(&redis), instance(&redis), instance(&redis));
    let mut stayer = c.connect_v1("show", "name=stayer");
    let mut writer = c.connect_v1("show", "name=writer");
    let mut leaver = a.connect_v1("show", "name=leaver");
    let epoch = epoch_of(&leaver);
    assert_eq!(
        epoch_of(&stayer),
        epoch,
        "one epoch for the room everywhere"
    );

    for n in 0..5 {
        writer.publish(json!({"n": n}));
    }
    let read = messages(&mut leaver, 5);
    assert_eq!(messages(&mut stayer, 5), read);
    let since = seq_of(read.last().unwrap());
    drop(leaver);

    for n in 5..12 {
        writer.publish(json!({"n": n}));
    }
    let missed = messages(&mut stayer, 7);
    assert_consecutive(&missed, "the stayer's messages");
    assert_eq!(seq_of(&missed[0]), since + 1);
    let last = seq_of(missed.last().unwrap());

    // B never had a member of the room.
    let _back = assert_resumes_exactly(&b, "show", since, &epoch, &missed);

    // Resuming at the room's seq: recovered, nothing to catch up on.
    let current = b.connect_v1("show", &format!("since={last}&epoch={epoch}"));
    assert_eq!(current.welcome["recovered"], true, "{}", current.welcome);
    assert_eq!(current.welcome["history"], json!([]));
    assert_eq!(current.welcome["seq"], last);

    // The history API on B: the same messages, epoch and seq.
    let body = history_api(&b, "show", &format!("since={since}"));
    assert_eq!(body["epoch"], epoch.as_str(), "{body}");
    assert_eq!(body["seq"], last, "{body}");
    assert_eq!(body["messages"], Value::Array(missed), "{body}");
}

/// PROTOCOL §7: an instance started after a room's messages were sent learns the room from
/// Redis (epoch, seq, history), so a join through it is welcomed as one through the instance
/// that carried them. Before, the new instance started the room afresh: a new epoch, seq 0,
/// no history.
#[test]
fn an_instance_started_later_serves_the_rooms_history() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = instance(&redis);
    let mut writer = a.connect_v1("replay", "name=writer");
    let mut plain = a.connect("replay");
    for n in 0..8 {
        writer.publish(json!({"n": n}));
    }
    plain.send(Message::text("from plain")).unwrap();
    let sent = messages(&mut writer, 9);
    assert_consecutive(&sent, "the writer's messages");

    let via_a = a.connect_v1("replay", "");
    assert_eq!(history_of(&via_a), sent, "A's own join history");
    let d = instance(&redis);
    let mut via_d = d.connect_v1("replay", "");
    for field in ["epoch", "seq", "history", "recovered"] {
        assert_eq!(
            via_d.welcome[field], via_a.welcome[field],
            "{field}: a join via the later instance differs from one via A"
        );
    }
    assert_eq!(
        history_api(&d, "replay", "since=0"),
        history_api(&a, "replay", "since=0"),
        "the history API differs between the instances"
    );

    // And D carries the room on from there.
    writer.publish(json!("after"));
    let next = via_d.next_message();
    assert_eq!(seq_of(&next), seq_of(sent.last().unwrap()) + 1);
    assert_eq!(next, writer.next_message());
}

/// PROTOCOL §7: reaction totals sum every instance's taps, exactly, on every instance, and
/// live in Redis, so they outlive an instance. Before, each instance counted only its own
/// members' taps, and a restarted instance knew none.
#[test]
fn reaction_totals_are_exact_after_1000_taps_spread_over_three_instances() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut servers = vec![instance(&redis), instance(&redis), instance(&redis)];
    let mut watchers: Vec<V1Client> = servers
        .iter()
        .map(|server| server.connect_v1("cheers", ""))
        .collect();
    let epoch = epoch_of(&watchers[0]);
    // Two tappers on each instance, each a user of its own (open mode).
    let mut tappers: Vec<V1Client> = servers
        .iter()
        .flat_map(|server| {
            [
                server.connect_v1("cheers", ""),
                server.connect_v1("cheers", ""),
            ]
        })
        .collect();
    const TAPS: usize = 1000;
    let mut sent: HashMap<&str, u64> = HashMap::new();
    let tapper_count = tappers.len();
    for tap in 0..TAPS {
        let key = if tap % 5 < 3 { "❤️" } else { "👏" };
        tappers[tap % tapper_count].react(key);
        *sent.entry(key).or_default() += 1;
    }
    let expected = json!(sent);
    assert_eq!(expected, json!({"❤️": 600, "👏": 400}));

    for (i, watcher) in watchers.iter_mut().enumerate() {
        let last = await_totals(watcher, &expected, SETTLE);
        assert_eq!(
            last, expected,
            "instance {i}'s members never saw the cluster's totals"
        );
    }
    for (i, server) in servers.iter().enumerate() {
        assert!(
            wait_until(SETTLE, || room_info(server, "cheers")["reactions"]
                == expected),
            "GET /api/rooms/cheers on instance {i}: {}",
            room_info(server, "cheers")
        );
    }

    // Instance C stops (its members leave with it) and starts again: it knows nothing of the
    // room but what Redis keeps, and a client joining it gets the totals.
    drop(tappers.split_off(4));
    drop(watchers.pop());
    servers.pop().unwrap().stop();
    let restarted = instance(&redis);
    let joiner = restarted.connect_v1("cheers", "");
    assert_eq!(
        joiner.welcome["reactions"], expected,
        "the totals did not survive the restart"
    );
    assert_eq!(epoch_of(&joiner), epoch, "the room lived on on A and B");
    assert_eq!(room_info(&restarted, "cheers")["reactions"], expected);
}

/// Redis dies mid-run and comes back empty. While it is down each instance relays its own
/// clients' messages under a local epoch with seqs above 2^40, so no resume is ever given a
/// gap that skips or invents messages; once it is back, the room has one sequence on every
/// instance again, under one new epoch, and resumes across instances are exact again.
#[test]
fn redis_killed_and_restarted_mid_run() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (instance(&redis), instance(&redis));
    let mut sender = a.connect_v1("outage", "name=sender");
    let mut on_a = a.connect_v1("outage", "name=on-a");
    let mut on_b = b.connect_v1("outage", "name=on-b");
    let epoch = epoch_of(&on_a);
    assert_eq!(epoch_of(&on_b), epoch, "one epoch for the room everywhere");

    for n in 0..3 {
        sender.publish(json!({"phase": "before", "n": n}));
    }
    let before = messages(&mut on_a, 3);
    assert_eq!(messages(&mut on_b, 3), before);
    let redis_seq = seq_of(before.last().unwrap());
    assert!(redis_seq < LOCAL_SEQ_FLOOR);

    redis.kill();
    for server in [&a, &b] {
        assert!(
            wait_until(LINK_WAIT, || health(server).starts_with("degraded")),
            "healthz never reported degraded: {}",
            health(server)
        );
    }
    // A still serves its own clients, numbered locally above 2^40.
    for n in 0..3 {
        sender.publish(json!({"phase": "outage", "n": n}));
    }
    let during = messages(&mut on_a, 3);
    assert_consecutive(&during, "local messages");
    for frame in &during {
        assert_eq!(frame["data"]["phase"], "outage");
        assert!(seq_of(frame) > LOCAL_SEQ_FLOOR, "a local seq: {frame}");
    }
    let local_seq = seq_of(during.last().unwrap());
    let joined_during = a.connect_v1("outage", "");
    let local_epoch = epoch_of(&joined_during);
    assert_ne!(
        local_epoch, epoch,
        "a welcome during the outage: the local epoch"
    );
    assert_eq!(joined_during.welcome["seq"], local_seq);
    drop(joined_during);

    // Resumes with what a client saw before or during the outage are never recovered, on
    // either instance: A's member saw local seqs the Redis epoch never had, B's member missed
    // A's local messages.
    for (server, since, name) in [
        (&b, local_seq, "A's member on B"),
        (&a, local_seq, "A's member on A"),
        (&a, redis_seq, "B's member on A"),
    ] {
        let resumed = server.connect_v1("outage", &format!("since={since}&epoch={epoch}"));
        assert_eq!(
            resumed.welcome["recovered"], false,
            "{name}: {}",
            resumed.welcome
        );
    }

    redis.restart();
    for server in [&a, &b] {
        assert!(
            wait_until(LINK_WAIT, || health(server) == "ok\n"),
            "link never recovered: {}",
            health(server)
        );
    }
    // Back: one sequence under one new epoch, on both instances.
    let mut fresh = a.connect_v1("outage", "name=fresh");
    let new_epoch = epoch_of(&fresh);
    assert_ne!(new_epoch, epoch, "Redis came back empty: a new epoch");
    assert_ne!(new_epoch, local_epoch, "Redis's epoch, not A's local one");
    for n in 0..3 {
        sender.publish(json!({"phase": "after", "n": n}));
    }
    let after = messages(&mut fresh, 3);
    assert_consecutive(&after, "messages after the outage");
    assert_eq!(seq_of(&after[0]), seq_of(&fresh.welcome) + 1);
    assert!(seq_of(after.last().unwrap()) < LOCAL_SEQ_FLOOR);
    // The members welcomed before the outage hold an epoch and seqs that lead nowhere now: each
    // is welcomed again into Redis's new epoch before its first message, so a client that
    // dedupes by seq does not take the new, lower numbers for messages it has seen.
    for (member, name) in [(&mut on_a, "A's member"), (&mut on_b, "B's member")] {
        let again = member.next_of("welcome");
        assert_eq!(again["epoch"], new_epoch.as_str(), "{name}: {again}");
        assert_eq!(again["recovered"], false, "{name}: {again}");
        assert!(seq_of(&again) < seq_of(&after[0]), "{name}: {again}");
    }
    assert_eq!(messages(&mut on_a, 3), after, "A's member");
    // B's member got none of A's local messages: the next it sees are these.
    assert_eq!(messages(&mut on_b, 3), after, "B's member");
    let last = seq_of(after.last().unwrap());
    for server in [&a, &b] {
        assert!(
            wait_until(SETTLE, || {
                let info = room_info(server, "outage");
                info["epoch"] == new_epoch.as_str() && info["seq"] == last
            }),
            "GET /api/rooms/outage: {}",
            room_info(server, "outage")
        );
    }

    // A client welcomed after the outage leaves A and resumes on B: exactly its gap.
    drop(fresh);
    for n in 3..6 {
        sender.publish(json!({"phase": "after", "n": n}));
    }
    let missed = messages(&mut on_b, 3);
    assert_eq!(seq_of(&missed[0]), last + 1);
    let _back = assert_resumes_exactly(&b, "outage", last, &new_epoch, &missed);
    // What A's member saw during the outage is still no ground for a recovery.
    let stale = b.connect_v1("outage", &format!("since={local_seq}&epoch={epoch}"));
    assert_eq!(stale.welcome["recovered"], false, "{}", stale.welcome);
}

/// Anything on a room channel that claims Redis's sequence but is not well formed (a forged
/// stamp, a truncated header, a seq or ts that is not a number) is dropped and counted as
/// `malformed` on every instance, and takes no place in the room's sequence. A raw plain
/// `PUBLISH roomcast:room:R "T..."` is not in the sequence either: plain members get it, v1
/// members do not. Before, v1 members got it as a message numbered by each instance.
#[test]
fn forged_and_unsequenced_messages_on_a_room_channel_take_no_seq() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (instance(&redis), instance(&redis));
    let mut writer = a.connect_v1("feed", "name=writer");
    let mut on_a = a.connect_v1("feed", "");
    let mut on_b = b.connect_v1("feed", "");
    let mut plain = b.connect("feed");
    let real = |writer: &mut V1Client, on_a: &mut V1Client, on_b: &mut V1Client, n: u64| {
        writer.publish(json!(format!("real {n}")));
        let here = on_a.next_message();
        assert_eq!(
            here["data"],
            format!("real {n}"),
            "a v1 member got something else before real {n}: {here}"
        );
        assert_eq!(on_b.next_message(), here, "A and B disagree");
        here
    };
    let first = real(&mut writer, &mut on_a, &mut on_b, 1);
    assert_eq!(next_text(&mut plain), r#""real 1""#);

    let malformed_before = [metric(&a, MALFORMED), metric(&b, MALFORMED)];
    // A valid sequenced form from an origin no instance has, behind each broken stamp.
    let mut sequenced = b"S".to_vec();
    sequenced.extend_from_slice(&0xF0F0_F0F0_F0F0_F0F0u64.to_be_bytes());
    sequenced.extend_from_slice(&1u64.to_be_bytes());
    sequenced.extend_from_slice(b"Tforged");
    let stamped = |header: &[u8]| [header, &sequenced[..]].concat();
    let forgeries: Vec<Vec<u8>> = vec![
        b"Vbogus".to_vec(),
        b"Vabc 12".to_vec(),
        stamped(b"Vabc x1 1700000000000\n"),
        stamped(b"Vabc 2 soon\n"),
    ];
    for forgery in &forgeries {
        publish_raw(&redis, "roomcast:room:feed", forgery);
    }
    let second = real(&mut writer, &mut on_a, &mut on_b, 2);
    assert_eq!(seq_of(&second), seq_of(&first) + 1, "a forgery took a seq");
    assert_eq!(
        next_text(&mut plain),
        r#""real 2""#,
        "a forgery reached plain"
    );
    for (server, before) in [&a, &b].into_iter().zip(malformed_before) {
        let counted = || metric(server, MALFORMED) - before;
        assert!(wait_until(SETTLE, || counted() >= forgeries.len() as u64));
        assert_eq!(counted(), forgeries.len() as u64, "malformed drops");
    }

    // The documented plain form, straight to Redis: plain members only.
    publish_raw(&redis, "roomcast:room:feed", b"Thello");
    let third = real(&mut writer, &mut on_a, &mut on_b, 3);
    assert_eq!(
        seq_of(&third),
        seq_of(&second) + 1,
        "the raw publish took a seq"
    );
    assert_eq!(next_text(&mut plain), "hello", "plain members get it");
    assert_eq!(next_text(&mut plain), r#""real 3""#);
    for server in [&a, &b] {
        assert_eq!(health(server), "ok\n", "garbage does not disturb the link");
    }
}

/// `GET .../history` on an instance that never had a member of the room, and came after its
/// messages: it asks Redis (without creating state Redis does not have), so it answers with
/// the room's history, and `404` for a room nobody has used.
#[test]
fn the_history_api_of_a_later_instance_reads_redis_and_creates_no_room() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = instance(&redis);
    let mut writer = a.connect_v1("ledger", "name=writer");
    for n in 0..5 {
        writer.publish(json!({"n": n}));
    }
    let sent = messages(&mut writer, 5);
    let d = instance(&redis);
    let via_d = history_api(&d, "ledger", "since=2");
    assert_eq!(via_d, history_api(&a, "ledger", "since=2"));
    assert_eq!(via_d["messages"].as_array().unwrap(), &sent[2..].to_vec());

    let auth = [("Authorization", bearer())];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let unknown = http(d.addr, "GET", "/api/rooms/nobody-here/history", &auth, b"");
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    // Asked twice, still nothing: the first request created no state in Redis.
    let again = http(a.addr, "GET", "/api/rooms/nobody-here/history", &auth, b"");
    assert_eq!(again.status, 404, "{}", again.text());
}

/// The `202` of a backend publish through any instance carries the `seq` Redis gave the
/// message, the one every instance's members see.
#[test]
fn a_backend_publish_through_any_instance_answers_with_the_clusters_seq() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (instance(&redis), instance(&redis));
    let mut on_a = a.connect_v1("news", "");
    let mut on_b = b.connect_v1("news", "");
    for (n, server) in [&a, &b, &b, &a].into_iter().enumerate() {
        let answer = post_json(server, "news", &json!({ "n": n }));
        let seen_a = on_a.next_message();
        let seen_b = on_b.next_message();
        assert_eq!(seen_a, seen_b);
        assert_eq!(answer["seq"], seen_a["seq"], "{answer}");
    }
}

/// A join to a room this instance does not follow waits for the room's snapshot from Redis;
/// an `error` for a frame the client sent with its upgrade still comes after its welcome.
#[test]
fn the_welcome_comes_before_the_error_even_when_the_join_waits_for_a_snapshot() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = instance(&redis);
    for attempt in 0..10 {
        // A room of its own each time: the instance has no copy of it, so the join parks.
        let path = format!("/ws/fresh-{attempt}");
        let texts = v1_frames_after_upgrade_with(server.addr, &path, br#"{"type":"nope"}"#, 2);
        let (first, second) = (&texts[0], &texts[1]);
        assert_eq!(
            (first["type"].as_str(), second["type"].as_str()),
            (Some("welcome"), Some("error")),
            "attempt {attempt}"
        );
    }
    assert!(
        metric(
            &server,
            r#"roomcast_room_snapshots_total{reason="requested"}"#
        ) >= 10
    );
}
