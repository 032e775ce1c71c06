//! In-process shutdown: the handle closes every client with 1001, and `run` returns with every
//! thread joined and the port free.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;

#[test]
fn shutdown_closes_every_client_with_1001_and_joins_everything() {
    // A long grace period: if shutdown wrongly waited it out, the assertion below would
    // catch it with a wide margin for a loaded machine.
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(30);
    let server = start(config);
    let addr = server.addr;
    let mut clients: Vec<Client> = (0..5)
        .map(|i| server.connect(&format!("room{}", i % 2)))
        .collect();
    // One connection still in its handshake must not hold shutdown up until its deadline.
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /ws/x HTTP/1.1\r\n").unwrap();
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .threads()
        == 6));
    let stats = server.stats.clone();
    let hub = server.hub.clone();

    let started = Instant::now();
    let closer = std::thread::spawn(move || server.stop());
    for client in &mut clients {
        assert_eq!(expect_close(client), CloseCode::Away);
        // Complete the close handshake, as a well-behaved client does.
        let _ = client.close(None);
        while client.read().is_ok() {}
    }
    let summary = closer.join().unwrap();
    // The clients answered at once, so shutdown did not wait out the 30 s grace period.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(summary.clients_served, 5);
    assert_eq!(stats.threads(), 0);
    assert_eq!(hub.client_count(), 0);
    TcpListener::bind(addr).expect("the port is free again");
}

/// A client that never answers its close is cut when the grace period ends.
#[test]
fn shutdown_cuts_unresponsive_clients_after_the_grace_period() {
    let mut config = test_config();
    config.shutdown_grace = Duration::from_millis(300);
    let server = start(config);
    let mut mute = server.connect("mute").into_inner();
    let stats = server.stats.clone();
    let started = Instant::now();
    server.stop();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(stats.threads(), 0);
    let frames = read_frames_until_closed(&mut mute);
    assert_eq!(frames.last().and_then(RawFrame::close_code), Some(1001));
}

/// A connection still in its handshake when shutdown begins may finish it and join a room
/// after the broadcaster's first round of closes; it must be closed with 1001 too, not left to
/// be cut at the end of the grace period.
#[test]
fn a_client_that_joins_during_shutdown_is_closed_too() {
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(30);
    let server = start(config);
    // Holds the grace period open: it never answers its close.
    let mute = server.connect("late").into_inner();
    let mut late = TcpStream::connect(server.addr).unwrap();
    let request = upgrade_request("/ws/late");
    let (first, rest) = request.split_at(20);
    late.write_all(first.as_bytes()).unwrap();
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .threads()
        == 2));

    let stats = server.stats.clone();
    let started = Instant::now();
    let closer = std::thread::spawn(move || server.stop());
    // Once the mute client has its close, shutdown is under way; only then finish the head.
    let mut mute_reader = mute.try_clone().unwrap();
    mute_reader.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut mute_reader, &mut buf).unwrap();
    assert_eq!(parse_frames(&buf[..n])[0].close_code(), Some(1001));
    late.write_all(rest.as_bytes()).unwrap();

    let mut received = Vec::new();
    late.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let close = loop {
        let n = std::io::Read::read(&mut late, &mut buf).unwrap();
        assert!(
            n > 0,
            "closed without a close frame: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&received);
        if let Some(head_end) = text.find("\r\n\r\n") {
            assert!(text.starts_with("HTTP/1.1 101"), "{text}");
            if let Some(frame) = parse_frames(&received[head_end + 4..]).first() {
                break frame.close_code();
            }
        }
    };
    assert_eq!(close, Some(1001));
    // Both leave; shutdown then ends long before its 30 s grace.
    drop((mute, mute_reader, late));
    closer.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(stats.threads(), 0);
}
