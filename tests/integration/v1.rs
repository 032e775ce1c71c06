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
            "react needs a \"key\" of 1-32 bytes, no control characters",
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

/// The welcome is the first frame of a session even for a client that sends a bad frame
/// together with its upgrade: the error reply goes through the broadcaster, behind it.
#[test]
fn the_welcome_comes_before_the_error_for_a_frame_sent_with_the_upgrade() {
    let server = start(test_config());
    for attempt in 0..30 {
        let texts = v1_frames_after_upgrade_with(server.addr, "/ws/r", br#"{"type":"nope"}"#, 2);
        let (first, second) = (&texts[0], &texts[1]);
        assert_eq!(
            (first["type"].as_str(), second["type"].as_str()),
            (Some("welcome"), Some("error")),
            "attempt {attempt}"
        );
    }
}

/// An error answers a frame in its place: after the client's earlier publish has come back.
#[test]
fn an_error_does_not_overtake_the_clients_earlier_publish() {
    let server = start(test_config());
    let mut client = server.connect_v1("r", "");
    for n in 0..20 {
        client.publish(json!(n));
        client.send_raw("not json");
        assert_eq!(client.next_message()["data"], n);
        assert_eq!(client.next_frame()["type"], "error");
    }
}

/// PROTOCOL §3: a reaction costs no message-rate token and is never a close.
#[test]
fn reactions_cost_no_message_rate_token() {
    let server = start(Config {
        rate: 1,
        burst: 5,
        ..test_config()
    });
    let mut fan = server.connect_v1("r", "");
    for _ in 0..200 {
        fan.react("❤️");
    }
    fan.publish(json!("still here"));
    assert_eq!(fan.next_message()["data"], "still here");
    // Bad frames still cost one each: the burst of 5 is spent by the publish and four more.
    for _ in 0..4 {
        fan.send_raw("{");
        assert_eq!(fan.next_of("error")["code"], "bad_request");
    }
    fan.send_raw("{");
    assert_eq!(expect_close(&mut fan.ws), CloseCode::Policy);
}

/// A legal message always reaches v1 members, even text whose v1 frame is six times its
/// size (control characters escape to `\u00XX`): the outbox is sized for that frame.
#[test]
fn a_v1_member_gets_a_maximum_size_text_of_control_characters() {
    let server = start(Config {
        max_message_bytes: 512 * 1024,
        ..test_config()
    });
    let mut v1 = server.connect_v1("r", "");
    let mut plain = server.connect("r");
    let text = "\u{1}".repeat(500_000);
    plain.send(Message::text(text.clone())).unwrap();
    plain.send(Message::text("after")).unwrap();
    let first = v1.next_message();
    assert_eq!(first["seq"], 1);
    assert_eq!(first["text"].as_str().map(str::len), Some(text.len()));
    assert_eq!(v1.next_message()["text"], "after");
}

/// A room's state outlives its last member by `--room-ttl`, then a join starts a new epoch;
/// while it has members it is kept however long that is.
#[test]
fn a_rooms_state_expires_room_ttl_after_its_last_member_left() {
    let server = start(Config {
        room_ttl: Duration::from_secs(1),
        ..test_config()
    });
    let mut stayer = server.connect_v1("kept", "");
    stayer.publish(json!("x"));
    stayer.next_message();
    let leaver = server.connect_v1("left", "");
    let epoch = leaver.welcome["epoch"].clone();
    drop(leaver);
    // Within the TTL the room keeps its epoch.
    assert!(wait_until(Duration::from_secs(2), || server
        .hub
        .room_size("left")
        == 0));
    let again = server.connect_v1("left", "");
    assert_eq!(again.welcome["epoch"], epoch);
    drop(again);
    std::thread::sleep(Duration::from_millis(3500));
    let later = server.connect_v1("left", "");
    assert_ne!(later.welcome["epoch"], epoch, "a new life of the room");
    assert_eq!(later.welcome["seq"], 0);
    // The room that kept a member kept its state past many TTLs.
    let joiner = server.connect_v1("kept", "");
    assert_eq!(joiner.welcome["epoch"], stayer.welcome["epoch"]);
    assert_eq!(joiner.welcome["seq"], 1);
}
