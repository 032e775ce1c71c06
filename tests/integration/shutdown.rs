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

/// A connection still in its handshake when shutdown begins gets a polite 503 with
/// Retry-After when it finishes (the server is draining), not a hang or a reset.
#[test]
fn a_handshake_finished_during_shutdown_gets_503() {
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
    late.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut response = Vec::new();
    let _ = std::io::Read::read_to_end(&mut late, &mut response);
    let response = parse_http_response(&response);
    assert_eq!(response.status, 503);
    assert!(response.header("Retry-After").is_some());

    // The mute client leaves; shutdown then ends long before its 30 s grace.
    drop((mute, mute_reader));
    closer.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(stats.threads(), 0);
}
