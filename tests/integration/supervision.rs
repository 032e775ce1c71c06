//! Supervision: a panic in the broadcaster must not leave a server that upgrades clients and
//! relays nothing. It must go unhealthy at once, close its clients, and stop with an error.

use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use roomcast::{Server, Shutdown};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use crate::support::*;

#[test]
fn a_panicking_broadcaster_takes_the_server_down_loudly() {
    let mut config = test_config();
    // The test-only hook: the broadcaster panics on the first message to this room.
    config.test_panic_in_room = Some("doomed".into());
    config.shutdown_grace = Duration::from_secs(3);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Server::new(listener, config).unwrap();
    let addr = server.local_addr();
    let shutdown = Shutdown::new();
    let handle = shutdown.clone();
    let running = thread::spawn(move || server.run(&handle));
    let url = |room: &str| format!("ws://{addr}/ws/{room}");

    // A client that never answers its close frame keeps the closing phase open for the whole
    // grace period, so the test can watch the server while it fails.
    let mute = upgrade(TcpStream::connect(addr).unwrap(), &url("elsewhere"))
        .unwrap()
        .into_inner();
    let mut doomed = upgrade(TcpStream::connect(addr).unwrap(), &url("doomed")).unwrap();
    assert_eq!(http(addr, "GET", "/healthz", &[], b"").status, 200);

    doomed.send(Message::text("boom")).unwrap();
    // Unhealthy at once, saying why; no new client is admitted.
    assert!(wait_until(Duration::from_secs(5), || {
        let health = http(addr, "GET", "/healthz", &[], b"");
        health.status == 503 && health.text().contains("broadcaster")
    }));
    let refused = raw_exchange(addr, upgrade_request("/ws/late").as_bytes());
    assert_eq!(status_of(&refused), 503, "{refused}");
    // Its clients are closed with 1011 (internal error), not left hanging.
    assert_eq!(expect_close(&mut doomed), CloseCode::Error);

    // `run` ends by itself (nobody triggered the shutdown handle) with an error that makes
    // `main` exit non-zero.
    let error = running
        .join()
        .expect("run returned")
        .expect_err("a failed server must not report success");
    assert_eq!(error.exit_code(), 1);
    assert!(error.to_string().contains("broadcaster"), "{error}");
    assert!(shutdown.is_triggered());
    drop(mute);
}
