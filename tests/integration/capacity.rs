//! Admission: over `--max-clients` or `--max-clients-per-ip` the acceptor answers `503` with
//! `Retry-After` without spawning, and a freed slot is usable again.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tungstenite::Message;

use crate::support::*;

fn assert_refused_with_retry_after(result: Result<Client, tungstenite::Error>) {
    match result {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            let retry: u32 = response.headers()["Retry-After"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry > 0);
        }
        Err(other) => panic!("expected a 503, got error {other}"),
        Ok(_) => panic!("expected a 503, got an upgrade"),
    }
}

#[test]
fn the_client_over_max_clients_gets_503_and_a_freed_slot_is_reused() {
    let mut config = test_config();
    config.max_clients = Some(5);
    let server = start(config);
    let mut clients: Vec<Client> = (0..5).map(|_| server.connect("full")).collect();
    assert_refused_with_retry_after(server.try_connect("full"));
    // Refusal spawns nothing.
    assert_eq!(server.stats.threads(), 5);
    assert_eq!(
        server
            .stats
            .refused_capacity
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let mut leaving = clients.pop().unwrap();
    leaving.close(None).unwrap();
    while leaving.read().is_ok() {}
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .threads()
        == 4));
    let mut newcomer = server.connect("full");
    newcomer.send(Message::text("made it")).unwrap();
    assert_eq!(next_text(&mut newcomer), "made it");
    // The clients already in were not disturbed.
    assert_eq!(next_text(&mut clients[0]), "made it");
}

/// Connects from a chosen loopback address, so one test can be several client IPs.
fn connect_from(server: &TestServer, source: &str) -> Result<Client, tungstenite::Error> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&source.into()).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    upgrade(TcpStream::from(socket), &server.url("ips"))
}

#[test]
fn the_per_ip_cap_refuses_only_that_ip() {
    let mut config = test_config();
    config.max_clients_per_ip = 2;
    let server = start(config);
    let first = connect_from(&server, "127.0.0.1").unwrap();
    let _second = connect_from(&server, "127.0.0.1").unwrap();
    assert_refused_with_retry_after(connect_from(&server, "127.0.0.1"));
    // Another address is not affected.
    let mut elsewhere = connect_from(&server, "127.0.0.2").unwrap();
    elsewhere.send(Message::text("other ip")).unwrap();
    assert_eq!(next_text(&mut elsewhere), "other ip");
    // A freed slot for that IP is usable again.
    drop(first);
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .threads()
        == 2));
    connect_from(&server, "127.0.0.1").unwrap();
    assert_eq!(
        server
            .stats
            .refused_per_ip
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}
