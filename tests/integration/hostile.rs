//! Hostile clients. In every test a bystander in another room keeps exchanging messages during
//! the attack (each one checked), and afterwards the server's threads, clients and rooms are
//! back to zero: the attack cost the server nothing it kept.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// Sends one client's bytes after a valid upgrade and returns the close code it gets.
fn close_code_after(server: &TestServer, bytes: &[u8]) -> Option<u16> {
    let mut raw = server.connect("attack").into_inner();
    raw.write_all(bytes).unwrap();
    // Half-close, so the server's lingering close sees our end at once.
    raw.shutdown(Shutdown::Write).unwrap();
    read_frames_until_closed(&mut raw)
        .last()
        .and_then(RawFrame::close_code)
}

#[test]
fn protocol_violations_get_their_close_codes() {
    let server = start(test_config());
    let bystander = Bystander::start(&server);
    let text = |payload: &[u8]| client_frame(true, 0, 0x1, payload, true);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked client frame",
            client_frame(true, 0, 0x1, b"hi", false),
            1002,
        ),
        (
            "invalid UTF-8 in a text message",
            text(&[b'o', b'k', 0xff, 0xfe]),
            1007,
        ),
        (
            "fragmented control frame",
            client_frame(false, 0, 0x9, b"", true),
            1002,
        ),
        (
            "continuation without a start",
            client_frame(true, 0, 0x0, b"x", true),
            1002,
        ),
        (
            "reserved bit RSV1",
            client_frame(true, 0b100, 0x1, b"x", true),
            1002,
        ),
        (
            "reserved bit RSV3",
            client_frame(true, 0b001, 0x2, b"x", true),
            1002,
        ),
        (
            "reserved data opcode",
            client_frame(true, 0, 0x3, b"x", true),
            1002,
        ),
        (
            "reserved control opcode",
            client_frame(true, 0, 0xb, b"", true),
            1002,
        ),
        (
            "control frame over 125 bytes",
            client_frame(true, 0, 0x9, &[0; 126], true),
            1002,
        ),
        (
            "garbage after a valid upgrade",
            b"\xde\xad\xbe\xef not a frame at all".to_vec(),
            1002,
        ),
        // The frame limit is checked on the header, before any payload is read or reserved.
        (
            "a 16 MiB frame header over the 64 KiB limit",
            client_frame_header(16 << 20),
            1009,
        ),
    ];
    for (name, bytes, expected) in cases {
        assert_eq!(close_code_after(&server, &bytes), Some(expected), "{name}");
    }
    bystander.finish();
    server.assert_back_to_baseline();
}

/// Just the header of a masked binary frame announcing `len` bytes.
fn client_frame_header(len: u64) -> Vec<u8> {
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    header
}

/// Slowloris: a request head trickling in one byte a second never completes, and without a
/// deadline on the whole head each connection would hold a thread for as long as it liked.
#[test]
fn slowloris_is_dropped_at_the_handshake_deadline() {
    const DEADLINE: Duration = Duration::from_secs(2);
    let mut config = test_config();
    config.handshake_timeout = DEADLINE;
    let server = start(config);
    let bystander = Bystander::start(&server);
    let started = Instant::now();
    let attackers: Vec<_> = (0..10)
        .map(|_| {
            let mut stream = TcpStream::connect(server.addr).unwrap();
            thread::spawn(move || {
                let head = upgrade_request("/ws/slow");
                let mut reader = stream.try_clone().unwrap();
                reader
                    .set_read_timeout(Some(Duration::from_millis(1000)))
                    .unwrap();
                let mut response = Vec::new();
                for byte in head.bytes() {
                    if stream.write_all(&[byte]).is_err() {
                        break;
                    }
                    // Waits a second between bytes, reading whatever the server says.
                    let mut buf = [0u8; 256];
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => response.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
                String::from_utf8_lossy(&response).into_owned()
            })
        })
        .collect();
    for attacker in attackers {
        assert_eq!(status_of(&attacker.join().unwrap()), 408);
    }
    let took = started.elapsed();
    assert!(took >= DEADLINE, "dropped before the deadline: {took:?}");
    // A whole head at a byte a second would take minutes; the deadline cut every one short.
    assert!(took < Duration::from_secs(30), "{took:?}");
    bystander.finish();
    server.assert_back_to_baseline();
}

#[test]
fn oversized_and_garbage_request_heads_are_answered_and_dropped() {
    let server = start(test_config());
    let bystander = Bystander::start(&server);
    let huge = format!(
        "GET /ws/x HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "p".repeat(20 * 1024)
    );
    assert_eq!(status_of(&raw_exchange(server.addr, huge.as_bytes())), 431);
    assert_eq!(status_of(&raw_exchange(server.addr, &[0u8; 512])), 400);
    assert_eq!(
        status_of(&raw_exchange(
            server.addr,
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"
        )),
        400
    );
    let many_headers: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
    let request = format!("GET /ws/x HTTP/1.1\r\n{many_headers}\r\n");
    assert_eq!(
        status_of(&raw_exchange(server.addr, request.as_bytes())),
        400
    );
    bystander.finish();
    server.assert_back_to_baseline();
}

/// A frame header announcing 16 MiB, then silence. Where the limit allows 16 MiB, the server
/// must still not commit 16 MiB per such connection, and each ends at the read deadline.
/// Measured on the real binary, so other tests' memory does not blur the number.
#[test]
fn lying_frame_headers_cost_no_memory_and_end_at_the_read_deadline() {
    const ATTACKERS: usize = 20;
    let process = Process::start(&[
        "--max-message-bytes",
        "16MiB",
        "--ping-interval",
        "300ms",
        "--idle-timeout",
        "1s",
    ]);
    let pid = process.child.id();
    let mut bystander = process.connect("bystanders");
    let before = rss_bytes(pid);
    let mut attackers: Vec<TcpStream> = (0..ATTACKERS)
        .map(|_| {
            let mut raw = process.connect("liars").into_inner();
            raw.write_all(&client_frame_header(16 << 20)).unwrap();
            raw.write_all(b"only a few bytes of the promised payload")
                .unwrap();
            raw
        })
        .collect();
    // The bystander keeps being served meanwhile, its pongs keeping it past the idle deadline.
    for i in 0..10 {
        bystander
            .send(tungstenite::Message::text(format!("still here {i}")))
            .unwrap();
        assert_eq!(next_text(&mut bystander), format!("still here {i}"));
        thread::sleep(Duration::from_millis(30));
    }
    let growth = rss_bytes(pid).saturating_sub(before);
    // 20 × 16 MiB would be 320 MiB; what is touched is the little that arrived.
    assert!(growth < 16 << 20, "RSS grew by {} MiB", growth >> 20);
    // Every attacker is closed at the idle deadline, while the bystander keeps exchanging
    // (which also keeps it answering pings, so it is never idle itself).
    let closing = thread::spawn(move || {
        for raw in &mut attackers {
            let frames = read_frames_until_closed(raw);
            assert_eq!(
                frames.last().and_then(RawFrame::close_code),
                Some(1001),
                "closed at the idle deadline"
            );
        }
    });
    let mut exchanged = 10;
    while !closing.is_finished() {
        bystander
            .send(tungstenite::Message::text(format!(
                "still here {exchanged}"
            )))
            .unwrap();
        assert_eq!(next_text(&mut bystander), format!("still here {exchanged}"));
        exchanged += 1;
        thread::sleep(Duration::from_millis(30));
    }
    closing.join().unwrap();
}

/// Pings count against the rate limit, so a ping flood is a rate violation: the flooder gets
/// at most a burst of pongs and then 1008, however many pings it sends.
#[test]
fn a_ping_flood_is_rate_limited_and_its_replies_bounded() {
    let server = start(test_config());
    let bystander = Bystander::start(&server);
    let mut raw = server.connect("flood").into_inner();
    let ping = client_frame(true, 0, 0x9, b"flood", true);
    let mut sent = 0;
    while sent < 20_000 && raw.write_all(&ping).is_ok() {
        sent += 1;
    }
    let _ = raw.shutdown(Shutdown::Write);
    let frames = read_frames_until_closed(&mut raw);
    let pongs = frames.iter().filter(|f| f.opcode == 0xa).count();
    assert!(pongs <= 101, "{pongs} pongs for a burst of 100");
    assert_eq!(frames.last().and_then(RawFrame::close_code), Some(1008));
    assert_eq!(server.stats.evictions(roomcast::stats::Eviction::Rate), 1);
    bystander.finish();
    server.assert_back_to_baseline();
}

/// 2,000 connections that never send a byte: each holds a thread until the handshake
/// deadline, then is dropped with its slot freed, and real clients get in meanwhile.
#[test]
fn two_thousand_silent_connections_are_dropped_and_real_clients_still_get_in() {
    const SILENT: usize = 2000;
    let mut config = test_config();
    config.handshake_timeout = Duration::from_secs(2);
    config.max_clients = Some(SILENT + 50);
    let server = start(config);
    let bystander = Bystander::start(&server);
    let mut silent: Vec<TcpStream> = (0..SILENT)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    assert!(wait_until(Duration::from_secs(10), || server
        .stats
        .threads()
        >= SILENT));
    // During the flood a newcomer gets in and is served.
    let mut newcomer = server.connect("during-flood");
    newcomer
        .send(tungstenite::Message::text("made it"))
        .unwrap();
    assert_eq!(next_text(&mut newcomer), "made it");
    drop(newcomer);
    for stream in &mut silent {
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        assert_eq!(status_of(&response), 408);
    }
    bystander.finish();
    server.assert_back_to_baseline();
}

/// Body framing two parsers could read two ways is the start of request smuggling: a proxy
/// in front that took another length than we do would see our "body" as its next request.
/// Every such request gets 400 (on any path, upgrades included), and nothing reaches a room.
#[test]
fn ambiguous_body_framing_gets_400_and_never_reaches_a_room() {
    const TOKEN: &str = "framing-token";
    let mut config = test_config();
    config.api_token = Some(TOKEN.into());
    let server = start(config);
    let bystander = Bystander::start(&server);
    let mut member = server.connect("framing");
    let publish = |framing: &str| {
        format!(
            "POST /api/rooms/framing/messages HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {TOKEN}\r\nContent-Type: text/plain\r\n{framing}\r\nhello"
        )
    };
    for framing in [
        "Content-Length: +5\r\n",
        "Content-Length: -5\r\n",
        "Content-Length: 5, 7\r\n",
        "Content-Length: 5, 5\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\nContent-Length: 7\r\n",
        "Content-Length: 0x5\r\n",
        "Content-Length: 5 5\r\n",
        "Content-Length: \r\n",
        "Content-Length: 184467440737095516160\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    ] {
        let response = raw_exchange(server.addr, publish(framing).as_bytes());
        assert_eq!(status_of(&response), 400, "{framing:?}: {response}");
    }
    // Transfer-Encoding alone is unambiguous but unsupported: a length is required.
    let chunked = raw_exchange(
        server.addr,
        publish("Transfer-Encoding: chunked\r\n").as_bytes(),
    );
    assert_eq!(status_of(&chunked), 411);
    // The same rule on requests that have no body to read, upgrades included.
    let health = "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n";
    assert_eq!(
        status_of(&raw_exchange(server.addr, health.as_bytes())),
        400
    );
    let upgrade =
        upgrade_request("/ws/framing").replace("\r\n\r\n", "\r\nContent-Length: 1, 2\r\n\r\n");
    assert_eq!(
        status_of(&raw_exchange(server.addr, upgrade.as_bytes())),
        400
    );
    // A plain length still works, padded or with leading zeros.
    let fine = raw_exchange(server.addr, publish("Content-Length:  005 \r\n").as_bytes());
    assert_eq!(status_of(&fine), 202, "{fine}");
    assert_eq!(next_text(&mut member), "hello");
    member
        .send(tungstenite::Message::text("only that one"))
        .unwrap();
    assert_eq!(next_text(&mut member), "only that one");
    drop(member);
    bystander.finish();
    server.assert_back_to_baseline();
}

/// `.` and `..` are path segments every browser and URL library resolves away (`/ws/..` is
/// `/`), so no page could ever name such a room: refused with 400 wherever a room is named.
/// Other names with dots are ordinary names and stay valid.
#[test]
fn the_dot_segments_are_refused_as_room_names() {
    const TOKEN: &str = "dots-token";
    let mut config = test_config();
    config.api_token = Some(TOKEN.into());
    let server = start(config);
    let bystander = Bystander::start(&server);
    for room in [".", ".."] {
        let ws = raw_exchange(
            server.addr,
            upgrade_request(&format!("/ws/{room}")).as_bytes(),
        );
        assert_eq!(status_of(&ws), 400, "/ws/{room}: {ws}");
        assert!(ws.contains("bad room name"), "{ws}");
        let count = format!("GET /api/rooms/{room} HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status_of(&raw_exchange(server.addr, count.as_bytes())), 400);
        let publish = format!(
            "POST /api/rooms/{room}/messages HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {TOKEN}\r\nContent-Length: 1\r\n\r\nx"
        );
        assert_eq!(
            status_of(&raw_exchange(server.addr, publish.as_bytes())),
            400
        );
    }
    assert_eq!(server.hub.room_count(), 1, "only the bystanders' room");
    for room in ["...", "a.b", ".hidden"] {
        let mut client = server.connect(room);
        client.send(tungstenite::Message::text(room)).unwrap();
        assert_eq!(next_text(&mut client), room);
    }
    bystander.finish();
    server.assert_back_to_baseline();
}
