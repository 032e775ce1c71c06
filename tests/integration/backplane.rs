//! The Redis backplane: several instances sharing rooms through a real `redis-server`.
//!
//! Built only with `--features redis` (scripts/test.sh runs the suite with and without it).
//! Each test starts its own redis-server on a free port with persistence off, and its own
//! instances in this process (the crash test also runs the real binary, to kill it).

use std::collections::HashSet;
use std::thread;
use std::time::Duration;

use roomcast::Config;
use tungstenite::{Bytes, Message};

use crate::support::*;

/// Short presence TTL so the crash test waits seconds, not the default 15 s.
const TTL: Duration = Duration::from_millis(1500);
/// Generous bound for the link to come up, go down or come back (reconnect backoff peaks at 5 s).
const LINK_WAIT: Duration = Duration::from_secs(20);

fn redis_config(redis: &RedisServer) -> Config {
    Config {
        redis: Some(redis.url()),
        redis_ttl: TTL,
        rate: 0,
        api_token: Some("secret".into()),
        ..test_config()
    }
}

fn health(server: &TestServer) -> String {
    http(server.addr, "GET", "/healthz", &[], b"").text()
}

/// Starts an instance and waits until its link is up (publisher and subscriber connected).
fn instance(config: Config) -> TestServer {
    let server = start(config);
    assert!(
        wait_until(LINK_WAIT, || health(&server) == "ok\n"),
        "link never came up: {}",
        health(&server)
    );
    server
}

/// The value of one sample on `/metrics`, named as it appears there: `name` or
/// `name{reason="..."}`.
fn metric(server: &TestServer, sample: &str) -> u64 {
    // redis_config sets an API token, and with one /metrics needs it.
    let auth = [("Authorization", "Bearer secret")];
    let page = http(server.addr, "GET", "/metrics", &auth, b"").text();
    page.lines()
        .find_map(|line| line.strip_prefix(&format!("{sample} ")))
        .unwrap_or_else(|| panic!("no {sample} in /metrics"))
        .parse()
        .unwrap()
}

/// The cluster-wide member count of `room`, as `/api/rooms/<room>` reports it.
fn room_size(server: &TestServer, room: &str) -> u64 {
    let body = http(server.addr, "GET", &format!("/api/rooms/{room}"), &[], b"").text();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["clients"].as_u64().unwrap()
}

#[test]
fn three_instances_deliver_every_message_once_in_one_order() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let servers: Vec<TestServer> = (0..3).map(|_| instance(redis_config(&redis))).collect();

    // Two members of "stage" on each instance, and one of "side" on each for isolation.
    let mut members: Vec<Client> = Vec::new();
    for server in &servers {
        members.push(server.connect("stage"));
        members.push(server.connect("stage"));
    }
    let mut side: Vec<Client> = servers.iter().map(|s| s.connect("side")).collect();
    for server in &servers {
        assert!(
            wait_until(LINK_WAIT, || room_size(server, "stage") == 6
                && room_size(server, "side") == 3),
            "cluster-wide counts never reached 6 and 3"
        );
    }

    // One publisher per instance, all at once.
    const PER_SENDER: usize = 200;
    let publishers: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, server)| {
            let mut client = server.connect("stage");
            thread::spawn(move || {
                for seq in 0..PER_SENDER {
                    client.send(Message::text(format!("{i}:{seq}"))).unwrap();
                }
                client
            })
        })
        .collect();
    let _publishers: Vec<Client> = publishers.into_iter().map(|p| p.join().unwrap()).collect();

    let total = 3 * PER_SENDER;
    let mut orders = Vec::new();
    for member in &mut members {
        let order: Vec<String> = (0..total).map(|_| next_text(member)).collect();
        let unique: HashSet<&String> = order.iter().collect();
        assert_eq!(unique.len(), total, "a message arrived twice or not at all");
        for sender in 0..3 {
            let seqs: Vec<usize> = order
                .iter()
                .filter_map(|m| m.strip_prefix(&format!("{sender}:")))
                .map(|s| s.parse().unwrap())
                .collect();
            assert_eq!(
                seqs,
                (0..PER_SENDER).collect::<Vec<_>>(),
                "sender {sender} out of order"
            );
        }
        orders.push(order);
    }
    for order in &orders[1..] {
        assert!(
            order == &orders[0],
            "members on different instances saw different orders"
        );
    }

    // Rooms stay isolated: "side" got none of it; its own message is the first it sees.
    side[2].send(Message::text("side only")).unwrap();
    for member in &mut side {
        assert_eq!(next_text(member), "side only");
    }
    for server in &servers {
        assert!(metric(server, "roomcast_redis_published_total") >= PER_SENDER as u64);
        assert_eq!(metric(server, "roomcast_redis_up"), 1);
        assert_eq!(metric(server, "roomcast_cluster_instances"), 3);
        // Other instances' counts are as of their last heartbeat.
        assert!(wait_until(LINK_WAIT, || metric(
            server,
            "roomcast_cluster_connections"
        ) == 6 + 3 + 3));
    }
}

#[test]
fn binary_large_and_backend_payloads_survive_the_round_trip() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let config = || Config {
        max_message_bytes: 1024 * 1024,
        ..redis_config(&redis)
    };
    let (a, b) = (instance(config()), instance(config()));
    let mut sender = a.connect("media");
    let mut receiver = b.connect("media");

    let largest: Vec<u8> = (0..1024 * 1024)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let binary = Message::Binary(Bytes::from(largest));
    let text = Message::text("é ✓ 🎥 ".repeat(1000));
    let empty = Message::Binary(Bytes::new());
    for message in [&binary, &text, &empty] {
        sender.send(message.clone()).unwrap();
    }
    for message in [&binary, &text, &empty] {
        assert!(
            &next_data(&mut receiver) == message,
            "a payload changed on its way"
        );
        assert!(
            &next_data(&mut sender) == message,
            "the sender's own copy changed"
        );
    }

    // A backend publishing on instance B reaches members on A, through Redis.
    let published = http(
        b.addr,
        "POST",
        "/api/rooms/media/messages",
        &[
            ("Authorization", "Bearer secret"),
            ("Content-Type", "application/octet-stream"),
        ],
        b"\x00\xffbackend",
    );
    assert_eq!(published.status, 202);
    assert_eq!(
        next_data(&mut sender),
        Message::Binary(Bytes::from_static(b"\x00\xffbackend"))
    );
    assert!(metric(&b, "roomcast_redis_published_total") >= 1);
}

#[test]
fn redis_outage_degrades_to_local_relay_then_recovers() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (
        instance(redis_config(&redis)),
        instance(redis_config(&redis)),
    );
    let (mut a1, mut a2) = (a.connect("live"), a.connect("live"));
    let mut b1 = b.connect("live");
    a1.send(Message::text("before")).unwrap();
    for client in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(next_text(client), "before");
    }

    redis.kill();
    for server in [&a, &b] {
        assert!(
            wait_until(LINK_WAIT, || health(server).starts_with("degraded")),
            "healthz never reported degraded"
        );
        assert_eq!(http(server.addr, "GET", "/healthz", &[], b"").status, 200);
        assert_eq!(metric(server, "roomcast_redis_up"), 0);
        assert!(metric(server, "roomcast_redis_outages_total") >= 1);
    }
    // Degraded: each instance still relays among its own members.
    a1.send(Message::text("local")).unwrap();
    assert_eq!(next_text(&mut a1), "local");
    assert_eq!(next_text(&mut a2), "local");
    b1.send(Message::text("b alone")).unwrap();
    assert_eq!(next_text(&mut b1), "b alone");

    // Redis comes back: both instances resubscribe and cross-instance delivery resumes,
    // with no restart.
    redis.restart();
    for server in [&a, &b] {
        assert!(
            wait_until(LINK_WAIT, || health(server) == "ok\n"),
            "link never recovered"
        );
    }
    a2.send(Message::text("after")).unwrap();
    for client in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(next_text(client), "after");
    }
    // Nothing was delivered twice or leaked across during the outage: b1 saw only its own.
    assert_eq!(a.hub.client_count() + b.hub.client_count(), 3);
}

#[test]
fn a_crashed_instance_ages_out_of_cluster_counts() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let survivor = instance(redis_config(&redis));
    let _local = survivor.connect("stage");

    let url = redis.url();
    let mut crashing = Process::start(&["--redis", &url, "--redis-ttl", "1500ms"]);
    crashing.wait_for_line("redis link up");
    let _remote: Vec<Client> = (0..3).map(|_| crashing.connect("stage")).collect();
    assert!(
        wait_until(LINK_WAIT, || room_size(&survivor, "stage") == 4),
        "the survivor never counted the other instance's clients"
    );
    assert_eq!(metric(&survivor, "roomcast_cluster_instances"), 2);

    crashing.signal(libc::SIGKILL);
    crashing.wait_exit(Duration::from_secs(5));
    // Its presence hash expires within the TTL; the survivor's next heartbeat (a third of
    // the TTL later) stops counting it.
    assert!(
        wait_until(TTL * 3, || room_size(&survivor, "stage") == 1),
        "the crashed instance's clients still count: {}",
        room_size(&survivor, "stage")
    );
    assert_eq!(metric(&survivor, "roomcast_cluster_instances"), 1);

    // An instance that stops cleanly deletes its hash at once instead.
    let leaving = instance(redis_config(&redis));
    let _client = leaving.connect("stage");
    assert!(wait_until(LINK_WAIT, || room_size(&survivor, "stage") == 2));
    // Triggered, not joined: joining would wait out the shutdown grace for the client that
    // never answers its close, by which time the TTL could have done the work instead.
    leaving.shutdown.trigger();
    assert!(
        wait_until(TTL / 2, || room_size(&survivor, "stage") == 1),
        "a cleanly stopped instance still counted after half the TTL"
    );
}

#[test]
fn a_backend_can_publish_through_redis_and_garbage_there_is_dropped() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = instance(redis_config(&redis));
    let mut member = server.connect("feed");

    // What a backend could publish with redis-cli; each reaches one subscriber (ours).
    let publish = |channel: &str, payload: &[u8]| {
        assert_eq!(
            redis.command(&[b"PUBLISH", channel.as_bytes(), payload]),
            ":1"
        );
    };
    // Not roomcast's format (no kind byte), text that is not UTF-8, a bad room name: dropped.
    publish("roomcast:room:feed", b"Xhello");
    publish("roomcast:room:feed", b"T\xff\xfe");
    publish("roomcast:room:bad room", b"Thi");
    // The documented format reaches the room, kind included.
    publish("roomcast:room:feed", b"Tfrom redis-cli");
    publish("roomcast:room:feed", b"B\x00\x01");
    assert_eq!(next_text(&mut member), "from redis-cli");
    assert_eq!(
        next_data(&mut member),
        Message::Binary(Bytes::from_static(b"\x00\x01"))
    );
    assert_eq!(
        metric(
            &server,
            r#"roomcast_redis_dropped_total{reason="malformed"}"#
        ),
        3
    );
    assert_eq!(health(&server), "ok\n", "garbage does not disturb the link");
}

#[test]
fn a_stalled_redis_overflows_the_publish_queue_without_blocking_clients() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (
        instance(redis_config(&redis)),
        instance(redis_config(&redis)),
    );
    let mut sender = a.connect("flood");

    // Redis stops answering but keeps its connections open: the publisher waits on its
    // pipeline while the sender keeps going. The queue (4,096 messages) overflows; the
    // sender's connection is never blocked by it.
    redis.freeze(true);
    for seq in 0..6000 {
        sender.send(Message::text(format!("m{seq}"))).unwrap();
    }
    assert!(
        wait_until(LINK_WAIT, || metric(
            &a,
            r#"roomcast_redis_dropped_total{reason="queue_full"}"#
        ) > 0),
        "the publish queue never overflowed"
    );
    redis.freeze(false);

    // The link recovers (if the publisher timed out it reconnects) and cross-instance
    // delivery works again, in a fresh room.
    for server in [&a, &b] {
        assert!(
            wait_until(LINK_WAIT, || health(server) == "ok\n"),
            "link never recovered"
        );
    }
    let mut there = b.connect("after");
    let mut here = a.connect("after");
    assert!(wait_until(LINK_WAIT, || room_size(&a, "after") == 2));
    here.send(Message::text("still relaying")).unwrap();
    assert_eq!(next_text(&mut there), "still relaying");
    assert_eq!(next_text(&mut here), "still relaying");
    drop(sender);
}
