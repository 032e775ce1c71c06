//! The `roomcast.v1` protocol over real sockets: negotiation, welcome, messages in mixed rooms,
//! error frames, close codes. Token-protected behaviour is in `identity.rs`.

use std::time::Duration;

use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use roomcast::Config;

use crate::support::*;

#[test]
fn a_v1_client_is_welcomed_and_gets_its_own_publish_with_a_seq() {
    let server = start(test_config());
    let mut ann = server.connect_v1("stage", "name=Ann");
    let welcome = ann.welcome.clone();
    assert_eq!(welcome["room"], "stage");
    assert_eq!(welcome["you"]["name"], "Ann");
    assert_eq!(welcome["you"]["verified"], false);
    assert_eq!(welcome["you"]["perm"], "post");
    assert!(welcome["you"]["id"].as_str().unwrap().starts_with("anon-"));
    assert_eq!(welcome["seq"], 0);
    assert_eq!(welcome["recovered"], false);
    assert_eq!(welcome["history"], json!([]));
    assert_eq!(welcome["presence"], json!({"clients": 1, "users": 1}));
    let epoch = welcome["epoch"].as_str().unwrap();
    assert!(!epoch.is_empty() && epoch.len() <= 32);
    assert!(epoch
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));

    ann.publish(json!({"text": "hi", "n": 12345678901234567890u64}));
    let message = ann.next_message();
    assert_eq!(message["seq"], 1);
    assert_eq!(
        message["from"],
        json!({"id": welcome["you"]["id"], "name": "Ann", "verified": false})
    );
    assert_eq!(message["data"]["text"], "hi");
    assert!(message["ts"].as_u64().unwrap() > 1_700_000_000_000);
}

#[test]
fn plain_and_v1_clients_share_a_room_in_one_order() {
    let server = start(test_config());
    let mut plain = server.connect("mixed");
    let mut v1 = server.connect_v1("mixed", "");
    assert_eq!(v1.welcome["presence"]["clients"], 2);

    // Each sent once the one before is back, so the room's order is the order sent.
    // The plain client gets its own messages verbatim, the v1 publish as compact JSON text.
    plain.send(Message::text("from plain")).unwrap();
    assert_eq!(next_text(&mut plain), "from plain");
    plain.send(Message::binary(vec![0u8, 1, 2, 255])).unwrap();
    assert_eq!(next_data(&mut plain), Message::binary(vec![0u8, 1, 2, 255]));
    v1.send_raw(r#"{"type":"publish","data": { "b" : [1, 2.50, "x y"] } }"#);
    assert_eq!(next_text(&mut plain), r#"{"b":[1,2.50,"x y"]}"#);

    // The v1 client: all three as message frames, numbered in that order.
    let text = v1.next_message();
    assert_eq!(
        (text["seq"].as_u64(), text["text"].as_str()),
        (Some(1), Some("from plain"))
    );
    assert_eq!(text["from"]["verified"], false);
    let binary = v1.next_message();
    assert_eq!(
        (binary["seq"].as_u64(), binary["binary"].as_str()),
        (Some(2), Some("AAEC/w=="))
    );
    let data = v1.next_message();
    assert_eq!(data["seq"], 3);
    assert_eq!(data["data"], json!({"b": [1, 2.5, "x y"]}));
}

#[test]
fn a_late_joiner_is_welcomed_with_the_rooms_seq_and_misses_nothing_after_it() {
    let server = start(test_config());
    let mut first = server.connect_v1("r", "");
    for n in 0..5 {
        first.publish(json!(n));
    }
    for n in 0..5 {
        assert_eq!(first.next_message()["data"], n);
    }
    let mut late = server.connect_v1("r", "");
    assert_eq!(late.welcome["seq"], 5);
    assert_eq!(
        late.welcome["epoch"], first.welcome["epoch"],
        "one life of the room"
    );
    first.publish(json!("after"));
    let message = late.next_message();
    assert_eq!(
        (message["seq"].as_u64(), message["data"].as_str()),
        (Some(6), Some("after"))
    );
}

#[test]
fn bad_requests_get_error_frames_and_the_session_goes_on() {
    let server = start(test_config());
    let mut client = server.connect_v1("r", "");
    for (frame, message) in [
        ("not json", "not valid JSON"),
        ("[1,2]", "a frame must be a JSON object with a \"type\""),
        (
            r#"{"type":"shout"}"#,
            "unknown \"type\": use publish or react",
        ),
        (r#"{"type":"publish"}"#, "publish needs \"data\""),
        (
            r#"{"type":"react","key":""}"#,
            "react needs a \"key\" of 1-32 bytes",
        ),
    ] {
        client.send_raw(frame);
        let error = client.next_of("error");
        assert_eq!(error["code"], "bad_request", "{frame}");
        assert_eq!(error["message"], message, "{frame}");
    }
    client.publish(json!("still here"));
    assert_eq!(client.next_message()["data"], "still here");
    assert_eq!(
        server
            .stats
            .v1_errors_sent
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
}

#[test]
fn a_binary_frame_from_a_v1_client_closes_it_with_1003() {
    let server = start(test_config());
    let mut client = server.connect_v1("r", "");
    let mut other = server.connect_v1("r", "");
    client.ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(expect_close(&mut client.ws), CloseCode::Unsupported);
    other.publish(json!("others go on"));
    assert_eq!(other.next_message()["data"], "others go on");
    assert!(wait_until(Duration::from_secs(5), || server
        .hub
        .client_count()
        == 1));
}

#[test]
fn a_client_offering_only_unknown_protocols_gets_no_protocol_header_and_speaks_plain() {
    let server = start(test_config());
    let mut request = upgrade_request("/ws/r");
    request.insert_str(
        request.len() - 2,
        "Sec-WebSocket-Protocol: chat, roomcast.v2, ROOMCAST.V1\r\n",
    );
    let response = response_head(server.addr, &request);
    assert_eq!(status_of(&response), 101);
    assert!(
        !response
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol"),
        "{response}"
    );

    let mut offered = upgrade_request("/ws/r");
    offered.insert_str(
        offered.len() - 2,
        "Sec-WebSocket-Protocol: chat, roomcast.v1\r\n",
    );
    let response = response_head(server.addr, &offered);
    assert!(
        response.contains("Sec-WebSocket-Protocol: roomcast.v1\r\n"),
        "{response}"
    );
}

#[test]
fn a_backend_publish_reaches_v1_clients_from_the_server_with_its_json_as_data() {
    let token = "backend-token-0123456789";
    let server = start(Config {
        api_token: Some(token.into()),
        ..test_config()
    });
    let mut v1 = server.connect_v1("news", "");
    let mut plain = server.connect("news");
    let bearer = format!("Bearer {token}");
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    let response = http(
        server.addr,
        "POST",
        "/api/rooms/news/messages",
        &headers,
        br#"{"headline": "x"}"#,
    );
    assert_eq!(response.status, 202);
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body["seq"], 1);
    let message = v1.next_message();
    assert_eq!(message["from"], json!({"server": true}));
    assert_eq!(message["data"], json!({"headline": "x"}));
    assert_eq!(message["seq"], 1);
    assert_eq!(
        next_text(&mut plain),
        r#"{"headline": "x"}"#,
        "plain clients get it verbatim"
    );

    let text_headers = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "text/plain"),
    ];
    http(
        server.addr,
        "POST",
        "/api/rooms/news/messages",
        &text_headers,
        b"plain words",
    );
    assert_eq!(v1.next_message()["text"], "plain words");
    let room: serde_json::Value =
        serde_json::from_slice(&http(server.addr, "GET", "/api/rooms/news", &[], b"").body)
            .unwrap();
    assert_eq!(room["seq"], 2);
    assert_eq!(room["epoch"], v1.welcome["epoch"]);
    assert_eq!(room["users"], 2);
}

#[test]
fn deeply_nested_data_is_refused_and_does_not_overflow_a_connection_threads_stack() {
    let server = start(test_config());
    let mut client = server.connect_v1("r", "");
    let mut reader = server.connect_v1("r", "");
    for (depth, relayed) in [(64usize, true), (65, false), (30_000, false)] {
        let data = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        client.send_raw(&format!(r#"{{"type":"publish","data":{data}}}"#));
        if relayed {
            assert!(reader.next_message()["data"].is_array());
            client.next_message();
        } else {
            let error = client.next_of("error");
            assert_eq!(error["code"], "bad_request", "depth {depth}");
        }
    }
    client.publish(json!("after"));
    assert_eq!(
        reader.next_message()["data"],
        "after",
        "nothing deep was relayed"
    );
}

/// Sends an upgrade request and reads the response head only: the session it opens stays up,
/// so reading to the end (as `raw_exchange` does) would wait for the idle timeout.
fn response_head(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "the head ended early");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}
