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

/// Starts an instance and waits until its link is up (publisher and subscriber connected).
fn instance(config: Config) -> TestServer {
    start_linked(config)
}

/// One sample on `/metrics` (redis_config sets an API token, and with one /metrics needs it).
fn metric(server: &TestServer, sample: &str) -> u64 {
    metric_sample(server, "secret", sample)
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
        // Counted when Redis answers the publisher, which may be just after it delivered.
        assert!(wait_until(LINK_WAIT, || metric(
            server,
            "roomcast_redis_published_total"
        ) >= PER_SENDER as u64));
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
    // Counted when Redis answers the publisher, which may be just after it delivered the
    // message to the subscribers.
    assert!(wait_until(LINK_WAIT, || metric(
        &b,
        "roomcast_redis_published_total"
    ) >= 1));
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

    // Not roomcast's format (no kind byte), text that is not UTF-8, a bad room name: dropped.
    redis.publish("roomcast:room:feed", b"Xhello");
    redis.publish("roomcast:room:feed", b"T\xff\xfe");
    redis.publish("roomcast:room:bad room", b"Thi");
    // The documented format reaches the room, kind included.
    redis.publish("roomcast:room:feed", b"Tfrom redis-cli");
    redis.publish("roomcast:room:feed", b"B\x00\x01");
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

/// A message published to Redis directly, larger than this instance's `--max-message-bytes`,
/// fits no outbox: relayed, it would evict every member of the room as "slow". It is dropped
/// and counted instead, and the room goes on.
#[test]
fn a_message_from_redis_over_the_size_limit_is_dropped_not_fanned_out() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = instance(redis_config(&redis));
    let mut member = server.connect("feed");
    let mut huge = vec![b'T'];
    huge.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    redis.publish("roomcast:room:feed", &huge);
    redis.publish("roomcast:room:feed", b"Tafter");
    assert_eq!(next_text(&mut member), "after");
    assert_eq!(
        metric(
            &server,
            r#"roomcast_redis_dropped_total{reason="too_large"}"#
        ),
        1
    );
    assert_eq!(server.stats.evictions(roomcast::stats::Eviction::Slow), 0);
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

/// The channels matching `pattern` that someone subscribes to, as `PUBSUB CHANNELS` lists them.
fn subscribed_channels(redis: &RedisServer, pattern: &str) -> Vec<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let request = format!(
        "*3\r\n$6\r\nPUBSUB\r\n$8\r\nCHANNELS\r\n${}\r\n{pattern}\r\n",
        pattern.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let count: usize = line.trim_end().trim_start_matches('*').parse().unwrap();
    (0..count)
        .map(|_| {
            line.clear();
            reader.read_line(&mut line).unwrap(); // $<length>
            line.clear();
            reader.read_line(&mut line).unwrap();
            line.trim_end().to_string()
        })
        .collect()
}

/// The frames a raw client gets after sending `bytes` and half-closing: everything up to the
/// server's close.
fn frames_after(server: &TestServer, room: &str, bytes: &[u8]) -> Vec<RawFrame> {
    use std::io::Write;
    let mut raw = server.connect(room).into_inner();
    raw.write_all(bytes).unwrap();
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    read_frames_until_closed(&mut raw)
}

/// With `--redis` a client's messages travel through Redis and back, so a close the server
/// decides on (a bad frame, a message over the limit, the rate) must take the same way to stay
/// behind them. Sent straight to the broadcaster, as it once was, the close overtook them: the
/// client got its close and, its outbox sealed, never the echoes of its last messages.
#[test]
fn a_server_close_with_redis_comes_after_the_clients_own_echoes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const SENT: usize = 20;
    let server = instance(Config {
        max_message_bytes: 1024,
        // The burst takes exactly the messages before the offence; the refill (1/s) is far
        // slower than one write of them all.
        rate: 1,
        burst: SENT as u32,
        ..redis_config(&redis)
    });
    let elsewhere = instance(redis_config(&redis));
    let mut witness = elsewhere.connect("closing");
    let text = |payload: &[u8]| client_frame(true, 0, 0x1, payload, true);
    let messages: Vec<u8> = (0..SENT)
        .flat_map(|i| text(format!("m{i}").as_bytes()))
        .collect();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("invalid UTF-8", text(&[b'o', b'k', 0xff]), 1007),
        (
            "a message over --max-message-bytes",
            client_frame(true, 0, 0x2, &[0; 1025], true),
            1009,
        ),
        ("one message over the rate", text(b"one too many"), 1008),
    ];
    for (name, offence, code) in cases {
        let mut bytes = messages.clone();
        bytes.extend_from_slice(&offence);
        let frames = frames_after(&server, "closing", &bytes);
        let texts: Vec<String> = frames
            .iter()
            .take_while(|frame| frame.opcode == 0x1)
            .map(|frame| String::from_utf8_lossy(&frame.payload).into_owned())
            .collect();
        let expected: Vec<String> = (0..SENT).map(|i| format!("m{i}")).collect();
        assert_eq!(texts, expected, "{name}: echoes missing before the close");
        assert_eq!(
            frames.get(SENT).and_then(RawFrame::close_code),
            Some(code),
            "{name}: no close {code} right after the echoes: {frames:?}"
        );
        // They went through Redis: the other instance's member got them too, and nothing of
        // the offence.
        for i in 0..SENT {
            assert_eq!(next_text(&mut witness), format!("m{i}"), "{name}");
        }
    }
    // The server keeps serving others.
    let mut other = server.connect("after");
    other.send(Message::text("still relaying")).unwrap();
    assert_eq!(next_text(&mut other), "still relaying");
    assert_eq!(health(&server), "ok\n");
}

/// A publish the queue had no room for was answered `202 Accepted` as if it were on its way.
/// It must say `503` with `Retry-After`, and count nothing as published.
#[test]
fn publish_answers_503_while_the_publish_queue_is_full_and_202_otherwise() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = instance(redis_config(&redis));
    let post = |body: &[u8]| {
        http(
            server.addr,
            "POST",
            "/api/rooms/flood/messages",
            &[
                ("Authorization", "Bearer secret"),
                ("Content-Type", "text/plain"),
            ],
            body,
        )
    };
    assert_eq!(post(b"before").status, 202);
    assert_eq!(metric(&server, "roomcast_messages_published_total"), 1);

    // A frozen Redis holds the publisher in its pipeline (for its 2 s reply deadline, then as
    // long again for a fresh connection), so the flood fills the queue and it stays full.
    let mut sender = server.connect("flood");
    redis.freeze(true);
    for seq in 0..6000 {
        sender.send(Message::text(format!("m{seq}"))).unwrap();
    }
    let full = wait_until(LINK_WAIT, || {
        metric(
            &server,
            r#"roomcast_redis_dropped_total{reason="queue_full"}"#,
        ) > 0
    });
    let refused = post(b"while full");
    redis.freeze(false);
    assert!(full, "the publish queue never overflowed");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.text().contains("publish queue is full"),
        "{}",
        refused.text()
    );
    assert!(refused.header("Retry-After").is_some());
    assert_eq!(
        metric(&server, "roomcast_messages_published_total"),
        1,
        "a dropped publish counted as published"
    );

    // Once Redis answers again, publishing is accepted again.
    assert!(
        wait_until(LINK_WAIT, || health(&server) == "ok\n"),
        "link never recovered"
    );
    assert!(
        wait_until(LINK_WAIT, || post(b"after").status == 202),
        "publishing never recovered"
    );
    drop(sender);
}

/// Killing Redis while one client sends: its messages must reach every member in the order
/// it sent them, with none twice, across the fall back to local delivery and the return to
/// Redis. Before, a message sent just after the link went down went straight to the
/// broadcaster while older ones still sat in the publish queue or in the subscriber's socket,
/// and overtook them; the sender's own instance could also lose what Redis had accepted but
/// not yet brought back.
#[test]
fn one_senders_messages_stay_in_order_across_a_redis_outage() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (
        instance(redis_config(&redis)),
        instance(redis_config(&redis)),
    );
    let mut here = a.connect("order");
    let mut there = b.connect("order");
    let mut sender = a.connect("order");
    sender.send(Message::text("start")).unwrap();
    for member in [&mut here, &mut there] {
        assert_eq!(next_text(member), "start");
    }

    let (sent, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let sending = {
        let (sent, stop) = (sent.clone(), stop.clone());
        thread::spawn(move || {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) && seq < 100_000 {
                sender.send(Message::text(seq.to_string())).unwrap();
                seq += 1;
                sent.store(seq, Ordering::Relaxed);
                if seq % 10 == 0 {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            sender
        })
    };
    let sent_more = |n: usize| {
        let from = sent.load(Ordering::Relaxed);
        assert!(wait_until(LINK_WAIT, || sent.load(Ordering::Relaxed) >= from + n));
    };
    // Two outages in the middle of the stream. In the first Redis hangs, then dies, with a
    // batch in flight and messages queued behind it; in the second it dies at any moment.
    for hangs_first in [true, false] {
        sent_more(1000);
        if hangs_first {
            redis.freeze(true);
            assert!(wait_until(LINK_WAIT, || metric(
                &a,
                "roomcast_redis_publish_queue_depth"
            ) >= 200));
        }
        redis.kill();
        assert!(wait_until(LINK_WAIT, || health(&a).starts_with("degraded")));
        sent_more(1000);
        redis.restart();
        for server in [&a, &b] {
            assert!(
                wait_until(LINK_WAIT, || health(server) == "ok\n"),
                "link never recovered"
            );
        }
    }
    sent_more(1000);
    stop.store(true, Ordering::Relaxed);
    let mut sender = sending.join().unwrap();
    let total = sent.load(Ordering::Relaxed);
    sender.send(Message::text("end")).unwrap();

    let received = |member: &mut Client| -> Vec<usize> {
        let mut seqs = Vec::new();
        loop {
            match next_text(member).as_str() {
                "end" => return seqs,
                seq => seqs.push(seq.parse().unwrap()),
            }
        }
    };
    // On the sender's own instance nothing is lost: what Redis did not bring back is
    // delivered locally, in its place.
    let here_seqs = received(&mut here);
    assert!(
        here_seqs.windows(2).all(|w| w[0] < w[1]),
        "reordered or repeated on the sender's instance"
    );
    assert_eq!(
        here_seqs,
        (0..total).collect::<Vec<_>>(),
        "lost on the sender's instance"
    );
    // Elsewhere what was sent during the outage is missing, but nothing is out of order or
    // twice.
    let there_seqs = received(&mut there);
    assert!(
        there_seqs.windows(2).all(|w| w[0] < w[1]),
        "reordered or repeated on another instance"
    );
    assert_eq!(
        metric(&a, r#"roomcast_redis_dropped_total{reason="queue_full"}"#),
        0
    );
}

/// A message Redis carries twice (a publisher's retry after part of a batch got through) is
/// relayed once: each instance remembers the last number it relayed from every other.
/// Markers on an instance's control channel that it did not publish are ignored and counted;
/// one naming a position beyond anything the instance published must not make it take its
/// own later messages for ones already delivered.
#[test]
fn repeated_messages_and_forged_markers_from_redis_are_dropped_and_counted() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = instance(redis_config(&redis));
    let mut member = server.connect("feed");
    let sequenced = |origin: u64, seq: u64, text: &str| {
        let mut wire = b"S".to_vec();
        wire.extend_from_slice(&origin.to_be_bytes());
        wire.extend_from_slice(&seq.to_be_bytes());
        wire.push(b'T');
        wire.extend_from_slice(text.as_bytes());
        wire
    };
    redis.publish("roomcast:room:feed", &sequenced(7, 1, "first"));
    redis.publish("roomcast:room:feed", &sequenced(7, 1, "first"));
    redis.publish("roomcast:room:feed", &sequenced(7, 2, "second"));
    assert_eq!(next_text(&mut member), "first");
    assert_eq!(next_text(&mut member), "second");
    assert_eq!(
        metric(
            &server,
            r#"roomcast_redis_dropped_total{reason="duplicate"}"#
        ),
        1
    );

    let control = subscribed_channels(&redis, "roomcast:control:*");
    assert_eq!(
        control.len(),
        1,
        "one control channel per instance: {control:?}"
    );
    redis.publish(&control[0], b"marker 18446744073709551615");
    redis.publish(&control[0], b"marker 1x");
    redis.publish(&control[0], b"hello");
    member
        .send(Message::text("own, after the forgeries"))
        .unwrap();
    assert_eq!(next_text(&mut member), "own, after the forgeries");
    assert_eq!(
        metric(
            &server,
            r#"roomcast_redis_dropped_total{reason="malformed"}"#
        ),
        3
    );
    assert_eq!(health(&server), "ok\n", "forgeries do not disturb the link");
}
