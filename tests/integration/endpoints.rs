//! The plain HTTP endpoints on the WebSocket port: success, every error status, and bounds.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use tungstenite::{Bytes, Message};

use crate::support::*;

const TOKEN: &str = "s3cret-token";

fn with_token() -> TestServer {
    let mut config = test_config();
    config.api_token = Some(TOKEN.into());
    config.max_message_bytes = 1024;
    start(config)
}

fn publish(
    server: &TestServer,
    room: &str,
    content_type: &str,
    auth: Option<&str>,
    body: &[u8],
) -> HttpResponse {
    let mut headers = vec![("Content-Type", content_type)];
    let bearer;
    if let Some(token) = auth {
        bearer = format!("Bearer {token}");
        headers.push(("Authorization", bearer.as_str()));
    }
    http(
        server.addr,
        "POST",
        &format!("/api/rooms/{room}/messages"),
        &headers,
        body,
    )
}

#[test]
fn healthz_is_ok_while_serving_and_draining_during_shutdown() {
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(30);
    let server = start(config);
    let response = http(server.addr, "GET", "/healthz", &[], b"");
    assert_eq!((response.status, response.text().as_str()), (200, "ok\n"));

    // A client that never answers its close holds the drain open.
    let mute = server.connect("drain").into_inner();
    let addr = server.addr;
    let closer = std::thread::spawn(move || server.stop());
    assert!(
        wait_until(Duration::from_secs(10), || http(
            addr,
            "GET",
            "/healthz",
            &[],
            b""
        )
        .status
            == 503),
        "healthz never reported draining"
    );
    assert_eq!(http(addr, "GET", "/healthz", &[], b"").text(), "draining\n");
    // New clients are refused politely while draining.
    let refused = http(
        addr,
        "GET",
        "/ws/drain",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    );
    assert_eq!(refused.status, 503);
    assert!(refused.header("Retry-After").is_some());
    drop(mute);
    closer.join().unwrap();
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_traffic() {
    let server = start(test_config());
    let mut a = server.connect("m1");
    let _b = server.connect("m1");
    a.send(Message::text("count me")).unwrap();
    assert_eq!(next_text(&mut a), "count me");

    let response = http(server.addr, "GET", "/metrics", &[], b"");
    assert_eq!(response.status, 200);
    assert!(response
        .header("Content-Type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = response.text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("{name} {label:?} missing from\n{text}"));
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: unexpected {other:?}"),
        }
    };
    assert_eq!(value("roomcast_connections", None), 2.0);
    assert_eq!(value("roomcast_rooms", None), 1.0);
    assert_eq!(value("roomcast_messages_received_total", None), 1.0);
    assert_eq!(value("roomcast_messages_delivered_total", None), 2.0);
    assert!(value("roomcast_connections_accepted_total", None) >= 3.0);
    assert!(value("roomcast_bytes_sent_total", None) > 0.0);
    assert_eq!(value("roomcast_threads", None), 2.0 + 3.0); // two clients, this request, acceptor, broadcaster
    for reason in ["slow", "rate", "size", "idle"] {
        assert_eq!(
            value("roomcast_evictions_total", Some(("reason", reason))),
            0.0
        );
    }
    for reason in ["capacity", "per_ip", "spawn_failed"] {
        assert_eq!(
            value(
                "roomcast_connections_refused_total",
                Some(("reason", reason))
            ),
            0.0
        );
    }
    assert_eq!(value("roomcast_broadcast_queue_depth", None), 0.0);
    assert!(value("process_start_time_seconds", None) > 1.7e9);
    for metric in ["roomcast_connections", "roomcast_evictions_total"] {
        assert!(
            text.contains(&format!("# HELP {metric} "))
                && text.contains(&format!("# TYPE {metric} "))
        );
    }
    promtool_check(&text);
}

/// `promtool check metrics` is the reference linter. scripts/test.sh provides it; a plain
/// `cargo test` without it says so and relies on the parser above.
fn promtool_check(text: &str) {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(_) if std::env::var_os("ROOMCAST_REQUIRE_ALL").is_none() => {
            eprintln!(
                "skipping promtool check: {promtool} not found (scripts/test.sh installs it)"
            );
            return;
        }
        Err(e) => panic!("promtool required but not runnable: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn rooms_api_lists_rooms_and_counts_as_valid_json() {
    let server = start(test_config());
    let _clients = [
        server.connect("alpha"),
        server.connect("alpha"),
        server.connect("beta"),
    ];
    let response = http(server.addr, "GET", "/api/rooms", &[], b"");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("Content-Type"), Some("application/json"));
    let rooms: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(
        rooms,
        serde_json::json!([{"room": "alpha", "clients": 2}, {"room": "beta", "clients": 1}])
    );

    let one: serde_json::Value =
        serde_json::from_slice(&http(server.addr, "GET", "/api/rooms/alpha", &[], b"").body)
            .unwrap();
    assert_eq!(one, serde_json::json!({"room": "alpha", "clients": 2}));
    let empty: serde_json::Value =
        serde_json::from_slice(&http(server.addr, "GET", "/api/rooms/nobody", &[], b"").body)
            .unwrap();
    assert_eq!(empty, serde_json::json!({"room": "nobody", "clients": 0}));
    assert_eq!(
        http(server.addr, "GET", "/api/rooms/bad%20name", &[], b"").status,
        400
    );
    assert_eq!(
        http(server.addr, "POST", "/api/rooms", &[], b"").status,
        405
    );
}

#[test]
fn publish_relays_text_and_binary_through_the_rooms_single_order() {
    let server = with_token();
    let mut first = server.connect("news");
    let mut second = server.connect("news");
    let mut elsewhere = server.connect("other");

    first.send(Message::text("client before")).unwrap();
    // Its echo proves the server has read it: only then is its place before the publish fixed.
    assert_eq!(next_text(&mut first), "client before");
    let response = publish(
        &server,
        "news",
        "text/plain; charset=utf-8",
        Some(TOKEN),
        "from the backend ✓".as_bytes(),
    );
    assert_eq!(response.status, 202);
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body, serde_json::json!({"room": "news", "clients": 2}));
    first.send(Message::text("client after")).unwrap();
    // As above: once `first` has its own message back, the server has read it, so the next
    // publish comes after it in the room's order.
    assert_eq!(next_text(&mut first), "from the backend ✓");
    assert_eq!(next_text(&mut first), "client after");
    assert_eq!(
        publish(
            &server,
            "news",
            "application/json",
            Some(TOKEN),
            br#"{"type":"chat","text":"hi"}"#
        )
        .status,
        202
    );
    assert_eq!(
        publish(
            &server,
            "news",
            "application/octet-stream",
            Some(TOKEN),
            &[0, 255, 1]
        )
        .status,
        202
    );

    let expected = [
        Message::text("client before"),
        Message::text("from the backend ✓"),
        Message::text("client after"),
        Message::text(r#"{"type":"chat","text":"hi"}"#),
        Message::Binary(Bytes::from_static(&[0, 255, 1])),
    ];
    let got: Vec<Message> = (0..expected.len())
        .map(|_| next_data(&mut second))
        .collect();
    assert_eq!(got, expected, "the room's order");
    let got: Vec<Message> = (3..expected.len()).map(|_| next_data(&mut first)).collect();
    assert_eq!(got, expected[3..], "the same order for every member");
    elsewhere.send(Message::text("only mine")).unwrap();
    assert_eq!(next_text(&mut elsewhere), "only mine");
    assert_eq!(
        server
            .stats
            .messages_published
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

#[test]
fn publish_errors() {
    let server = with_token();
    let mut listener = server.connect("guarded");
    assert_eq!(
        publish(&server, "guarded", "text/plain", None, b"x").status,
        401
    );
    let wrong = publish(&server, "guarded", "text/plain", Some("s3cret-tokeN"), b"x");
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.header("WWW-Authenticate"), Some("Bearer"));
    assert_eq!(
        publish(&server, "guarded", "text/plain", Some(TOKEN), b"\xff\xfe").status,
        400
    );
    assert_eq!(
        publish(&server, "guarded", "text/plain", Some(TOKEN), &[b'a'; 1025]).status,
        413
    );
    assert_eq!(
        publish(&server, "bad name", "text/plain", Some(TOKEN), b"x").status,
        400
    );
    let get = http(server.addr, "GET", "/api/rooms/guarded/messages", &[], b"");
    assert_eq!((get.status, get.header("Allow")), (405, Some("POST")));
    // No Content-Length: 411.
    let raw = format!(
        "POST /api/rooms/guarded/messages HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    assert_eq!(status_of(&raw_exchange(server.addr, raw.as_bytes())), 411);
    // None of it reached the room.
    listener.send(Message::text("nothing before me")).unwrap();
    assert_eq!(next_text(&mut listener), "nothing before me");

    // Without a token configured, the endpoint does not exist.
    let open = start(test_config());
    assert_eq!(
        publish(&open, "guarded", "text/plain", Some(TOKEN), b"x").status,
        404
    );
}

#[test]
fn a_body_that_never_finishes_gets_408_at_the_deadline() {
    let mut config = test_config();
    config.api_token = Some(TOKEN.into());
    config.handshake_timeout = Duration::from_millis(300);
    let server = start(config);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let head = format!(
        "POST /api/rooms/r/messages HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nonly part"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut response = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut response);
    assert_eq!(status_of(&response), 408);
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .threads()
        == 0));
}

#[test]
fn malformed_and_oversized_heads_and_wrong_methods() {
    let server = start(test_config());
    assert_eq!(
        status_of(&raw_exchange(
            server.addr,
            b"\x16\x03\x01 not http at all\r\n\r\n"
        )),
        400
    );
    let huge = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(17 * 1024));
    assert_eq!(status_of(&raw_exchange(server.addr, huge.as_bytes())), 431);
    let post = http(server.addr, "POST", "/healthz", &[], b"");
    assert_eq!((post.status, post.header("Allow")), (405, Some("GET")));
    assert_eq!(
        http(server.addr, "GET", "/nothing-here", &[], b"").status,
        404
    );
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .threads()
        == 0));
}

#[test]
fn the_demo_page_is_self_contained_html() {
    let server = start(test_config());
    let response = http(server.addr, "GET", "/", &[], b"");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("Content-Type"),
        Some("text/html; charset=utf-8")
    );
    let page = response.text();
    assert!(page.contains("<title>roomcast"));
    // No CDN, no external assets: nothing is loaded from another origin.
    for external in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "@import",
        "url(http",
    ] {
        assert!(!page.contains(external), "external asset: {external}");
    }
}
