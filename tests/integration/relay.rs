//! The relay contract (DESIGN §1): verbatim, to the whole room and only the room, one order.

use std::thread;
use std::time::Duration;

use tungstenite::{Bytes, Message};

use crate::support::*;

#[test]
fn text_binary_and_empty_messages_come_back_verbatim_to_the_room_only() {
    let server = start(test_config());
    let mut alice = server.connect("stage");
    let mut bob = server.connect("stage");
    let mut other_room = server.connect("backstage");

    let messages = [
        Message::text("hello, room"),
        Message::binary(vec![0u8, 159, 146, 150, 255]),
        Message::text(""),
        Message::binary(Vec::new()),
        Message::text("ünïcödé ❤️"),
    ];
    for message in &messages {
        alice.send(message.clone()).unwrap();
        // The sender gets its own message, and so does every other member.
        assert_eq!(&next_data(&mut alice), message);
        assert_eq!(&next_data(&mut bob), message);
    }
    // Another room got nothing: a message sent there now is the first thing it reads.
    other_room.send(Message::text("marker")).unwrap();
    assert_eq!(next_text(&mut other_room), "marker");
    assert_eq!(
        server
            .stats
            .messages_relayed
            .load(std::sync::atomic::Ordering::Relaxed),
        6
    );
}

#[test]
fn a_one_mebibyte_message_is_relayed_when_the_limit_allows_it() {
    let mut config = test_config();
    config.max_message_bytes = 2 * 1024 * 1024;
    let server = start(config);
    let mut sender = server.connect("big");
    let mut receiver = server.connect("big");
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    sender.send(Message::binary(payload.clone())).unwrap();
    assert_eq!(
        next_data(&mut receiver),
        Message::Binary(Bytes::from(payload.clone()))
    );
    assert_eq!(
        next_data(&mut sender),
        Message::Binary(Bytes::from(payload))
    );
}

#[test]
fn the_bare_ws_path_is_the_lobby() {
    let server = start(test_config());
    let mut bare = server.connect_path("/ws");
    let mut named = server.connect("lobby");
    named.send(Message::text("hi lobby")).unwrap();
    assert_eq!(next_text(&mut bare), "hi lobby");
}

/// Guards the broadcaster's central promise: it is the single point that orders a room, so
/// concurrent senders cannot make two members disagree on the order.
#[test]
fn all_members_see_one_order_with_concurrent_senders() {
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 500;
    let mut config = test_config();
    config.rate = 0;
    let server = start(config);
    let receivers: Vec<_> = (0..3).map(|_| server.connect("order")).collect();
    let senders: Vec<_> = (0..SENDERS).map(|_| server.connect("order")).collect();

    let recorders: Vec<_> = receivers
        .into_iter()
        .map(|mut client| {
            thread::spawn(move || {
                (0..SENDERS * PER_SENDER)
                    .map(|_| next_text(&mut client))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let sending: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(s, mut client)| {
            thread::spawn(move || {
                for seq in 0..PER_SENDER {
                    client.send(Message::text(format!("{s}:{seq}"))).unwrap();
                }
                // Keep reading so this member is never a slow client.
                for _ in 0..SENDERS * PER_SENDER {
                    next_text(&mut client);
                }
            })
        })
        .collect();
    for s in sending {
        s.join().unwrap();
    }
    let sequences: Vec<Vec<String>> = recorders.into_iter().map(|r| r.join().unwrap()).collect();
    assert_eq!(sequences[0], sequences[1]);
    assert_eq!(sequences[0], sequences[2]);
    // And each sender's own order is kept within the shared order.
    for s in 0..SENDERS {
        let seqs: Vec<usize> = sequences[0]
            .iter()
            .filter_map(|m| m.strip_prefix(&format!("{s}:")))
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(seqs, (0..PER_SENDER).collect::<Vec<_>>());
    }
}

/// Full duplex: the broadcaster writes while the connection thread sits in `read`. Without
/// the outbox design, a client that never sends would never be written to.
#[test]
fn a_client_that_never_sends_receives_within_a_second() {
    let server = start(test_config());
    let mut listener = server.connect("duplex");
    let mut talker = server.connect("duplex");
    listener
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    talker.send(Message::text("are you there")).unwrap();
    assert_eq!(next_text(&mut listener), "are you there");
}

/// Pongs travel the same outbox as broadcasts; both must arrive, and frames must stay intact.
#[test]
fn pings_get_pongs_while_broadcasts_flow() {
    let mut config = test_config();
    config.rate = 0;
    let server = start(config);
    let mut pinger = server.connect("flow");
    let mut publisher = server.connect("flow");
    let publishing = thread::spawn(move || {
        for i in 0..2000 {
            publisher
                .send(Message::text(format!("broadcast {i}")))
                .unwrap();
        }
        publisher
    });
    let mut pongs = 0;
    let mut broadcasts = 0;
    for i in 0..20u8 {
        pinger.send(Message::Ping(Bytes::from(vec![i]))).unwrap();
        loop {
            match pinger.read().unwrap() {
                Message::Pong(payload) => {
                    assert_eq!(&payload[..], &[i]);
                    pongs += 1;
                    break;
                }
                Message::Text(_) => broadcasts += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // Kept open until the end: dropping a socket with unread data makes the kernel send RST
    // and discard the publisher's own unsent messages, which would look like loss here.
    let _publisher = publishing.join().unwrap();
    while broadcasts < 2000 {
        match pinger.read().unwrap() {
            Message::Text(_) => broadcasts += 1,
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pongs, 20);
}

/// Requests that are not upgrades to a valid room get a plain HTTP status before any upgrade.
#[test]
fn bad_paths_and_plain_gets_get_http_errors() {
    let server = start(test_config());
    let status = |request: &str| status_of(&raw_exchange(server.addr, request.as_bytes()));
    assert_eq!(status(&upgrade_request("/ws/bad%20room")), 400);
    assert_eq!(
        status(&upgrade_request(&format!("/ws/{}", "x".repeat(65)))),
        400
    );
    assert_eq!(status(&upgrade_request("/elsewhere")), 404);
    let plain_get = raw_exchange(server.addr, b"GET /ws/room HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&plain_get), 426);
    assert!(plain_get.contains("Upgrade: websocket"));
    // The server kept serving: a real client still gets in afterwards.
    let mut client = server.connect("after");
    client.send(Message::text("still here")).unwrap();
    assert_eq!(next_text(&mut client), "still here");
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .threads()
        == 1));
}
