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
    assert_eq!(
        one,
        serde_json::json!({"room": "alpha", "clients": 2, "users": 2}),
        "plain clients in open mode are each their own user; no message yet, so no seq"
    );
    let empty: serde_json::Value =
        serde_json::from_slice(&http(server.addr, "GET", "/api/rooms/nobody", &[], b"").body)
            .unwrap();
    assert_eq!(
        empty,
        serde_json::json!({"room": "nobody", "clients": 0, "users": 0})
    );
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
    let mut body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    let seq = body["seq"]
        .as_u64()
        .expect("the 202 carries the message's seq");
    assert!(seq >= 1);
    body.as_object_mut().unwrap().remove("seq");
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

/// The page's headers: its policy allows only this server's own script, style sheet and
/// WebSocket, so markup injected into the page could not run; and the page has nothing inline
/// that such a policy would block (browser.rs proves the page still works under it).
#[test]
fn the_demo_page_is_served_with_a_strict_content_security_policy() {
    let server = start(test_config());
    let response = http(server.addr, "GET", "/", &[], b"");
    assert_eq!(response.status, 200);
    let policy = response
        .header("Content-Security-Policy")
        .expect("a Content-Security-Policy");
    let directives: Vec<&str> = policy.split(';').map(str::trim).collect();
    let ws = format!("ws://{0} wss://{0}", server.addr);
    for expected in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        &format!("connect-src 'self' {ws}"),
        "base-uri 'none'",
        "object-src 'none'",
        "frame-ancestors 'none'",
        "form-action 'none'",
    ] {
        assert!(directives.contains(&expected), "{expected:?} in {policy}");
    }
    assert!(!policy.contains("unsafe"), "{policy}");
    assert_eq!(response.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(response.header("Referrer-Policy"), Some("no-referrer"));
    assert_eq!(response.header("X-Frame-Options"), Some("DENY"));

    // Nothing inline: every script has a src, no style blocks, no style or handler attributes.
    let page = response.text();
    assert!(page.contains(r#"<script type="module" src="/demo.js"></script>"#));
    assert!(page.contains(r#"<link rel="stylesheet" href="/demo.css">"#));
    assert_eq!(
        page.matches("<script").count(),
        1,
        "one script, from /demo.js"
    );
    assert!(!page.contains("<style"));
    assert!(!page.contains(" style="));
    let handlers = page.match_indices(" on").filter(|(at, _)| {
        let name: String = page[at + 3..]
            .chars()
            .take_while(char::is_ascii_lowercase)
            .collect();
        !name.is_empty() && page[at + 3 + name.len()..].starts_with('=')
    });
    assert_eq!(handlers.count(), 0, "no inline event handler attributes");

    // With nosniff, a browser runs the script and applies the style sheet only under these
    // types; both come from the binary, so nothing is loaded from anywhere else.
    for (path, content_type, marker) in [
        (
            "/demo.js",
            "text/javascript; charset=utf-8",
            r#"import { connect } from "/roomcast.js";"#,
        ),
        (
            "/roomcast.js",
            "text/javascript; charset=utf-8",
            "new WebSocket(url, PROTOCOL)",
        ),
        ("/demo.css", "text/css; charset=utf-8", "#log"),
    ] {
        let asset = http(server.addr, "GET", path, &[], b"");
        assert_eq!(asset.status, 200, "{path}");
        assert_eq!(asset.header("Content-Type"), Some(content_type), "{path}");
        assert_eq!(asset.header("X-Content-Type-Options"), Some("nosniff"));
        assert!(asset.text().contains(marker), "{path}");
    }
    // Every other response is nosniff too: a JSON body is never run as a script.
    let rooms = http(server.addr, "GET", "/api/rooms/x", &[], b"");
    assert_eq!(rooms.header("X-Content-Type-Options"), Some("nosniff"));
}

/// A Host header that is not a plain host name never reaches the policy: the page keeps
/// `'self'` and the response is still one well-formed header (no injected directive).
#[test]
fn a_hostile_host_header_is_left_out_of_the_policy() {
    let server = start(test_config());
    let request = "GET / HTTP/1.1\r\nHost: evil.example; script-src *\r\n\r\n";
    let response = parse_http_response(&raw_exchange_bytes(server.addr, request.as_bytes()));
    assert_eq!(response.status, 200);
    let policy = response.header("Content-Security-Policy").unwrap();
    assert!(policy.contains("connect-src 'self'; "), "{policy}");
    assert!(
        !policy.contains("evil") && !policy.contains('*'),
        "{policy}"
    );
}

fn token_get(server: &TestServer, path: &str, authorization: Option<&str>) -> HttpResponse {
    let headers: Vec<(&str, &str)> = authorization
        .map(|value| ("Authorization", value))
        .into_iter()
        .collect();
    http(server.addr, "GET", path, &headers, b"")
}

/// With a token configured, the metrics and the full room list (the size of every room) are
/// the operator's; a single room's count stays public, since the demo page polls it.
#[test]
fn metrics_and_the_room_list_need_the_token_when_one_is_configured() {
    let server = with_token();
    let _member = server.connect("private");
    let bearer = format!("Bearer {TOKEN}");
    for path in ["/metrics", "/api/rooms"] {
        for refused in [None, Some("Bearer wrong-token"), Some(TOKEN)] {
            let response = token_get(&server, path, refused);
            assert_eq!(response.status, 401, "{path} with {refused:?}");
            assert_eq!(response.header("WWW-Authenticate"), Some("Bearer"));
            assert!(!response.text().contains("private"), "{path} leaked");
        }
        assert_eq!(
            token_get(&server, path, Some(&bearer)).status,
            200,
            "{path}"
        );
    }
    let rooms = token_get(&server, "/api/rooms", Some(&bearer));
    assert_eq!(rooms.text(), r#"[{"room":"private","clients":1}]"#);
    let one = token_get(&server, "/api/rooms/private", None);
    assert_eq!(
        (one.status, one.text().as_str()),
        (200, r#"{"room":"private","clients":1,"users":1}"#)
    );
    assert_eq!(token_get(&server, "/healthz", None).status, 200);
    assert_eq!(token_get(&server, "/", None).status, 200);

    // Without a token configured, they stay open as before.
    let open = start(test_config());
    assert_eq!(token_get(&open, "/metrics", None).status, 200);
    assert_eq!(token_get(&open, "/api/rooms", None).status, 200);
}

/// The scheme name is case-insensitive (RFC 9110 §11.1), with one or more spaces after it;
/// the token itself is compared exactly.
#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let server = with_token();
    let mut member = server.connect("schemes");
    for accepted in [
        format!("bearer {TOKEN}"),
        format!("BEARER {TOKEN}"),
        format!("Bearer   {TOKEN}"),
    ] {
        let response = publish_with(&server, "schemes", &accepted, accepted.as_bytes());
        assert_eq!(response.status, 202, "{accepted:?}");
        assert_eq!(next_text(&mut member), accepted);
    }
    for refused in [
        format!("Bearer{TOKEN}"),
        format!("Basic {TOKEN}"),
        format!("Bearer {}", TOKEN.to_uppercase()),
        format!("Bearer {TOKEN} extra"),
    ] {
        let response = publish_with(&server, "schemes", &refused, b"refused");
        assert_eq!(response.status, 401, "{refused:?}");
    }
    assert_eq!(
        token_get(&server, "/metrics", Some("bEaReR s3cret-token")).status,
        200
    );
    // None of the refused ones reached the room.
    member.send(Message::text("after the refusals")).unwrap();
    assert_eq!(next_text(&mut member), "after the refusals");
}

fn publish_with(server: &TestServer, room: &str, authorization: &str, body: &[u8]) -> HttpResponse {
    http(
        server.addr,
        "POST",
        &format!("/api/rooms/{room}/messages"),
        &[
            ("Authorization", authorization),
            ("Content-Type", "text/plain"),
        ],
        body,
    )
}

/// Reads one response head (through its blank line) from a raw socket, without waiting for
/// the connection to close: the 100 is an interim response on a connection that stays open.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match std::io::Read::read(stream, &mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("no complete head, got {other:?} after {head:?}"),
        }
    }
    String::from_utf8(head).unwrap()
}

/// `Expect: 100-continue` (curl sends it for bodies over 1 KiB and otherwise waits a second):
/// the client sends its body only after our 100, then gets the final 202.
#[test]
fn expect_100_continue_is_answered_before_the_body_is_read() {
    let server = with_token();
    let mut member = server.connect("patient");
    let body = "a".repeat(1000);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let head = format!(
        "POST /api/rooms/patient/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // Without the 100 this read would time out (and curl would wait a second).
    assert_eq!(read_head(&mut stream), "HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut rest);
    let response = parse_http_response(&rest);
    assert_eq!(response.status, 202);
    assert_eq!(next_text(&mut member), body);
}

/// A request that will be refused gets its final status at once, without a 100 inviting the
/// body; an expectation other than 100-continue gets 417. Nothing reaches the room.
#[test]
fn refused_expectations_get_their_final_status_without_a_100() {
    let mut config = test_config();
    config.api_token = Some(TOKEN.into());
    config.max_message_bytes = 1024;
    let server = start(config);
    let mut member = server.connect("refused");
    let cases = [
        ("Bearer wrong", "100-continue", 10, 401),
        (&format!("Bearer {TOKEN}")[..], "100-continue", 2000, 413),
        (&format!("Bearer {TOKEN}")[..], "200-ok", 10, 417),
        (&format!("Bearer {TOKEN}")[..], "100-continue, x", 10, 417),
    ];
    for (authorization, expect, length, status) in cases {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let head = format!(
            "POST /api/rooms/refused/messages HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\n\
             Content-Type: text/plain\r\nContent-Length: {length}\r\nExpect: {expect}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        let first = read_head(&mut stream);
        assert_eq!(status_of(&first), status, "{expect} {length}: {first}");
    }
    member.send(Message::text("nothing before me")).unwrap();
    assert_eq!(next_text(&mut member), "nothing before me");
}
