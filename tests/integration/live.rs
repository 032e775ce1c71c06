//! Live rooms on v1 over real sockets (PROTOCOL §4–§6): history on join and resume, pushed
//! presence, aggregated reactions, and the history API.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message;

use roomcast::Config;

use crate::support::*;

const API_TOKEN: &str = "backend-token-0123456789";

fn seqs(frames: &Value) -> Vec<u64> {
    frames
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_join_gets_the_retained_history_oldest_first() {
    let server = start(Config {
        history: 3,
        ..test_config()
    });
    let mut writer = server.connect_v1("r", "");
    for n in 1..=5 {
        writer.publish(json!(n));
        writer.next_message();
    }
    let joiner = server.connect_v1("r", "");
    assert_eq!(joiner.welcome["seq"], 5);
    assert_eq!(joiner.welcome["recovered"], false);
    assert_eq!(seqs(&joiner.welcome["history"]), [3, 4, 5]);
    assert_eq!(joiner.welcome["history"][0]["data"], 3);
    assert_eq!(joiner.welcome["history"][0]["type"], "message");
}

#[test]
fn a_resume_inside_the_ring_gets_exactly_the_missed_messages_in_order() {
    let server = start(test_config());
    let mut stayer = server.connect_v1("r", "");
    let mut leaver = server.connect_v1("r", "");
    let epoch = leaver.welcome["epoch"].as_str().unwrap().to_string();
    let mut last_seen = 0;
    for n in 0..3 {
        stayer.publish(json!(n));
        last_seen = leaver.next_message()["seq"].as_u64().unwrap();
    }
    drop(leaver);
    for n in 3..8 {
        stayer.publish(json!(n));
    }
    let mut last = 0;
    for _ in 0..8 {
        last = stayer.next_message()["seq"].as_u64().unwrap();
    }
    let back = server.connect_v1("r", &format!("since={last_seen}&epoch={epoch}"));
    assert_eq!(back.welcome["recovered"], true);
    let missed = seqs(&back.welcome["history"]);
    assert_eq!(missed, ((last_seen + 1)..=last).collect::<Vec<_>>());
    let data: Vec<Value> = back.welcome["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(data, (3..8).map(|n| json!(n)).collect::<Vec<_>>());
    // Nothing it already had comes again: the next frame is a new message.
    let mut back = back;
    stayer.publish(json!("next"));
    let next = back.next_message();
    assert_eq!(
        (next["seq"].as_u64(), next["data"].as_str()),
        (Some(last + 1), Some("next"))
    );
    // Resuming at the room's seq recovers with an empty history.
    let current = server.connect_v1("r", &format!("since={}&epoch={epoch}", last + 1));
    assert_eq!(current.welcome["recovered"], true);
    assert_eq!(current.welcome["history"], json!([]));
    assert_eq!(
        server
            .stats
            .resumes_recovered
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn a_gap_out_of_the_ring_a_wrong_epoch_or_a_seq_ahead_is_not_recovered() {
    let server = start(Config {
        history: 3,
        ..test_config()
    });
    let mut writer = server.connect_v1("r", "");
    let epoch = writer.welcome["epoch"].as_str().unwrap().to_string();
    for n in 1..=10 {
        writer.publish(json!(n));
        writer.next_message();
    }
    for query in [
        format!("since=2&epoch={epoch}"),
        "since=9&epoch=0123456789abcdef".to_string(),
        format!("since=11&epoch={epoch}"),
        format!("since=x&epoch={epoch}"),
    ] {
        let client = server.connect_v1("r", &query);
        assert_eq!(client.welcome["recovered"], false, "{query}");
        assert_eq!(
            seqs(&client.welcome["history"]),
            [8, 9, 10],
            "{query}: the normal join history"
        );
    }
    // Inside the ring it does recover.
    let client = server.connect_v1("r", &format!("since=7&epoch={epoch}"));
    assert_eq!(client.welcome["recovered"], true);
    assert_eq!(seqs(&client.welcome["history"]), [8, 9, 10]);
}

#[test]
fn a_room_whose_state_expired_starts_a_new_epoch_and_a_resume_is_not_recovered() {
    let server = start(Config {
        room_ttl: Duration::from_secs(1),
        ..test_config()
    });
    let mut client = server.connect_v1("r", "");
    let epoch = client.welcome["epoch"].as_str().unwrap().to_string();
    client.publish(json!("before"));
    client.next_message();
    drop(client);
    std::thread::sleep(Duration::from_millis(3500));
    let back = server.connect_v1("r", &format!("since=1&epoch={epoch}"));
    assert_eq!(back.welcome["recovered"], false);
    assert_ne!(back.welcome["epoch"], epoch.as_str());
    assert_eq!(back.welcome["history"], json!([]));
}

#[test]
fn the_history_api_answers_since_and_limit_and_404_without_state() {
    let server = start(Config {
        api_token: Some(API_TOKEN.into()),
        ..test_config()
    });
    let mut client = server.connect_v1("r", "");
    for n in 1..=6 {
        client.publish(json!(n));
        client.next_message();
    }
    let bearer = format!("Bearer {API_TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let get = |path: &str| http(server.addr, "GET", path, &auth, b"");
    let body: Value =
        serde_json::from_slice(&get("/api/rooms/r/history?since=2&limit=3").body).unwrap();
    assert_eq!(body["room"], "r");
    assert_eq!(body["seq"], 6);
    assert_eq!(body["epoch"], client.welcome["epoch"]);
    assert_eq!(seqs(&body["messages"]), [3, 4, 5]);
    let all: Value = serde_json::from_slice(&get("/api/rooms/r/history").body).unwrap();
    assert_eq!(seqs(&all["messages"]), [1, 2, 3, 4, 5, 6]);
    assert_eq!(get("/api/rooms/nobody/history").status, 404);
    assert_eq!(get("/api/rooms/r/history?since=x").status, 400);
    assert_eq!(
        http(server.addr, "GET", "/api/rooms/r/history", &[], b"").status,
        401
    );
}

#[test]
fn a_crowd_joining_at_once_costs_a_few_presence_frames_and_the_last_is_right() {
    let server = start(test_config());
    let mut watcher = server.connect_v1("stage", "");
    let crowd: Vec<_> = (0..200).map(|_| server.connect("stage")).collect();
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(2500);
    watcher
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while Instant::now() < deadline {
        match watcher.ws.read() {
            Ok(Message::Text(text)) => frames.push(serde_json::from_str::<Value>(&text).unwrap()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    let presence: Vec<&Value> = frames.iter().filter(|f| f["type"] == "presence").collect();
    assert!(
        !presence.is_empty() && presence.len() <= 4,
        "{} presence frames",
        presence.len()
    );
    let last = presence.last().unwrap();
    assert_eq!(
        (last["clients"].as_u64(), last["users"].as_u64()),
        (Some(201), Some(201))
    );
    drop(crowd);
}

#[test]
fn reactions_are_totalled_and_pushed_a_few_times_never_relayed_one_by_one() {
    let server = start(Config {
        reaction_rate: 1000,
        reaction_burst: 200,
        ..test_config()
    });
    let mut watcher = server.connect_v1("r", "");
    let mut tappers: Vec<V1Client> = (0..10).map(|_| server.connect_v1("r", "")).collect();
    for (i, tapper) in tappers.iter_mut().enumerate() {
        for n in 0..100 {
            tapper.react(if (i + n) % 4 == 0 { "👏" } else { "❤️" });
        }
    }
    let expected = json!({"❤️": 750, "👏": 250});
    let mut arrivals = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let totals = loop {
        let frame = watcher.next_frame();
        assert_ne!(frame["type"], "message", "taps are never relayed");
        if frame["type"] == "reactions" {
            arrivals.push(Instant::now());
            if frame["totals"] == expected {
                break frame["totals"].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the totals never reached {expected}"
        );
    };
    assert_eq!(totals, expected);
    assert!(
        arrivals.len() < 40,
        "{} reactions frames for 1,000 taps",
        arrivals.len()
    );
    for pair in arrivals.windows(2) {
        // Never two within one 250 ms interval (with slack for the reader's own timing).
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(150),
            "{:?}",
            pair[1] - pair[0]
        );
    }
    let late = server.connect_v1("r", "");
    assert_eq!(
        late.welcome["reactions"], expected,
        "a joiner gets the totals"
    );
}

#[test]
fn taps_over_the_bucket_or_with_a_key_not_allowed_are_dropped_and_counted_not_closed() {
    let server = start(Config {
        reaction_rate: 1,
        reaction_burst: 5,
        reaction_keys: vec!["👏".into()],
        ..test_config()
    });
    let mut tapper = server.connect_v1("r", "");
    for _ in 0..50 {
        tapper.react("👏");
    }
    tapper.react("💩");
    tapper.publish(json!("still connected"));
    let mut totals = None;
    loop {
        let frame = tapper.next_frame();
        match frame["type"].as_str() {
            Some("reactions") => totals = Some(frame["totals"].clone()),
            Some("message") => break,
            _ => {}
        }
    }
    std::thread::sleep(Duration::from_millis(600));
    tapper.publish(json!("sync"));
    loop {
        let frame = tapper.next_frame();
        match frame["type"].as_str() {
            Some("reactions") => totals = Some(frame["totals"].clone()),
            Some("message") => break,
            _ => {}
        }
    }
    assert_eq!(totals, Some(json!({"👏": 5})));
    let stats = &server.stats;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.reactions_dropped_rate.load(Relaxed), 45);
    assert_eq!(stats.reactions_dropped_key.load(Relaxed), 1);
    assert_eq!(stats.reactions_counted.load(Relaxed), 5);
}

/// A client that stops reading while the totals change holds one pending reactions frame,
/// and when it reads again its last totals are the room's.
#[test]
fn a_stalled_client_gets_the_latest_totals_when_it_drains() {
    let server = start(Config {
        reaction_rate: 0,
        ..test_config()
    });
    let stalled = server.connect_v1("r", "");
    let mut tapper = server.connect_v1("r", "");
    let mut plain = server.connect("r");
    // Fill the stalled client's socket with messages, then tap while it reads nothing.
    let filler = "x".repeat(60_000);
    for _ in 0..60 {
        plain.send(Message::text(filler.clone())).unwrap();
        assert_eq!(next_text(&mut plain).len(), filler.len());
    }
    for _ in 0..500 {
        tapper.react("❤️");
        std::thread::sleep(Duration::from_micros(500));
    }
    std::thread::sleep(Duration::from_millis(600));
    let mut stalled = stalled;
    let mut last = None;
    let mut reactions_frames = 0;
    stalled
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    loop {
        match stalled.ws.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "reactions" {
                    reactions_frames += 1;
                    last = Some(frame["totals"].clone());
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(last, Some(json!({"❤️": 500})));
    assert!(reactions_frames <= 8, "{reactions_frames} reactions frames");
}

/// Without an API token nobody may read what rooms said: the history endpoint is off (404),
/// as the rest of the backend API is, join tokens or not.
#[test]
fn the_history_api_is_off_without_an_api_token() {
    let server = start(test_config());
    let mut client = server.connect_v1("r", "");
    client.publish(json!("private"));
    client.next_message();
    let response = http(server.addr, "GET", "/api/rooms/r/history", &[], b"");
    assert_eq!(response.status, 404);
    assert!(!response.text().contains("private"));
}
