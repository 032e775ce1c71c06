//! Each limit of DESIGN §3, with short values: the offender gets its close code or is dropped,
//! and everyone else keeps being served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use roomcast::stats::Eviction;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use crate::support::*;

/// A bystander in another room: proves the server still serves others after each offence.
fn assert_still_serving(server: &TestServer) {
    let mut bystander = server.connect("bystanders");
    bystander.send(Message::text("still serving")).unwrap();
    assert_eq!(next_text(&mut bystander), "still serving");
}

#[test]
fn an_oversized_message_gets_close_1009() {
    let mut config = test_config();
    config.max_message_bytes = 1024;
    let server = start(config);
    let mut witness = server.connect("size");
    let mut offender = server.connect("size");
    offender.send(Message::binary(vec![7u8; 1024])).unwrap(); // exactly the limit: fine
    assert_eq!(next_data(&mut witness), Message::binary(vec![7u8; 1024]));
    offender.send(Message::binary(vec![7u8; 1025])).unwrap();
    assert_eq!(expect_close(&mut offender), CloseCode::Size);
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .evictions(Eviction::Size)
        == 1));
    // The oversized message was relayed to no one.
    witness.send(Message::text("next")).unwrap();
    assert_eq!(next_text(&mut witness), "next");
    assert_still_serving(&server);
    assert!(wait_until(Duration::from_secs(5), || server
        .hub
        .room_size("size")
        == 1));
}

#[test]
fn a_client_over_its_rate_gets_close_1008() {
    let mut config = test_config();
    config.rate = 5;
    config.burst = 5;
    let server = start(config);
    let mut offender = server.connect("rate");
    for i in 0..20 {
        // The server may close before all 20 are written; later sends may then fail.
        if offender.send(Message::text(format!("{i}"))).is_err() {
            break;
        }
    }
    assert_eq!(expect_close(&mut offender), CloseCode::Policy);
    assert_eq!(server.stats.evictions(Eviction::Rate), 1);
    assert_still_serving(&server);
}

/// Without the handshake deadline, a connection that sends nothing would hold a thread forever.
#[test]
fn silent_and_half_sent_heads_are_dropped_at_the_handshake_timeout() {
    let mut config = test_config();
    config.handshake_timeout = Duration::from_millis(300);
    let server = start(config);
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).unwrap();
    let mut half = TcpStream::connect(server.addr).unwrap();
    half.write_all(b"GET /ws/room HTTP/1.1\r\nHost: loc")
        .unwrap();
    for stream in [&mut silent, &mut half] {
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        assert_eq!(status_of(&response), 408, "{response:?}");
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .threads()
        == 0));
    assert_still_serving(&server);
}

/// A client that completed the handshake but never answers pings is closed once
/// `--idle-timeout` passes. It reads raw bytes, because tungstenite would answer the pings.
#[test]
fn a_client_that_stops_answering_pings_is_closed_after_the_idle_timeout() {
    let mut config = test_config();
    config.ping_interval = Duration::from_millis(150);
    config.idle_timeout = Duration::from_millis(1000);
    let server = start(config);
    let mut mute = server.connect("idle").into_inner();
    // A responsive client: reading makes tungstenite answer pings, so it outlives the deadline.
    let mut lively = server.connect("idle");
    lively
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        match lively.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("the responsive client was dropped: {e}"),
        }
    }
    assert!(pings >= 2, "a quiet client is pinged every --ping-interval");
    let frames = read_frames_until_closed(&mut mute);
    assert!(
        frames.iter().any(|f| f.opcode == 0x9),
        "the mute client was pinged first: {frames:?}"
    );
    assert_eq!(
        frames.last().and_then(RawFrame::close_code),
        Some(1001),
        "{frames:?}"
    );
    assert_eq!(server.stats.evictions(Eviction::Idle), 1);
    assert_eq!(server.hub.room_size("idle"), 1);
    assert!(server.stats.bytes_sent.load(Ordering::Relaxed) > 0);
}

/// A connection flood at the limit is a handful of log lines, not one per refused connection:
/// one warning when refusing begins, one line with the count when it ends.
#[test]
fn refusals_are_logged_once_per_episode_with_a_count() {
    const REFUSED: usize = 40;
    let mut server = Process::start(&["--max-clients", "1"]);
    let held = server.connect("full");
    for _ in 0..REFUSED {
        let response = raw_exchange(server.addr, upgrade_request("/ws/full").as_bytes());
        assert_eq!(status_of(&response), 503);
    }
    let refusal_lines = server
        .lines_until_quiet(Duration::from_millis(300))
        .iter()
        .filter(|line| line.contains("refus"))
        .count();
    assert_eq!(refusal_lines, 1, "one warning for the whole episode");
    // Room again: the next client is admitted, and the episode is summed up in one line.
    drop(held);
    let url = format!("ws://{}/ws/full", server.addr);
    let mut admitted = None;
    assert!(wait_until(READ_TIMEOUT, || {
        admitted = upgrade(TcpStream::connect(server.addr).unwrap(), &url).ok();
        admitted.is_some()
    }));
    let summary = server.wait_for_line("admitting connections again");
    // At least the flood; a retry above may have come before the held client's exit.
    let count: usize = summary
        .split("again: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {summary:?}"));
    assert!(count >= REFUSED, "{summary}");
    drop(admitted);
}

/// The smallest limits the flags allow still leave room for the `101` and control frames:
/// once, a tiny outbox swallowed the `101` (the client hung) and a frame's header made the
/// first legal message overflow an empty outbox.
#[test]
fn tiny_message_and_outbox_limits_still_upgrade_relay_and_pong() {
    let mut config = test_config();
    config.max_message_bytes = 40;
    config.outbox_bytes = 100;
    let server = start(config);
    let mut a = server.connect("tiny");
    let mut b = server.connect("tiny");
    let text = "x".repeat(40);
    a.send(Message::text(text.clone())).unwrap();
    assert_eq!(next_text(&mut a), text);
    assert_eq!(next_text(&mut b), text);
    a.send(Message::Ping(vec![7u8; 30].into())).unwrap();
    match a.read().unwrap() {
        Message::Pong(payload) => assert_eq!(&payload[..], &[7u8; 30][..]),
        other => panic!("expected the pong, got {other:?}"),
    }
    assert_eq!(server.stats.evictions(Eviction::Slow), 0);
}
