//! Legal bursts: no traffic inside the limits may evict a client that reads as fast as it can.
//!
//! The broadcaster once judged an outbox's bound after queuing a whole batch and before
//! flushing any of it, so one sender's paste of 20 large messages (well inside the default
//! size, rate and burst limits) counted against every member at once and emptied the room.
//! These tests send such bursts with the default limits and check that every member that
//! reads gets everything, and that a member that does not read is still evicted.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use roomcast::stats::Eviction;
use tungstenite::Message;

use crate::slow::{assert_one_evicted, stalled_client};
use crate::support::*;

/// A payload that says which message it is in every byte, so loss, reordering and corruption
/// all show.
fn payload(index: usize, size: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..size).map(|i| (index * 31 + i) as u8).collect();
    bytes[..4].copy_from_slice(&(index as u32).to_be_bytes());
    bytes
}

/// The burst's payloads, made once and shared, so a reader's check is a `memcmp` and the
/// reader really reads as fast as it can (building each expected payload byte by byte in a
/// debug build would make the test's own readers the slow clients).
fn payloads(messages: usize, size: usize) -> Arc<Vec<Vec<u8>>> {
    Arc::new((0..messages).map(|index| payload(index, size)).collect())
}

/// A member that reads on its own thread as fast as it can and returns how many of the
/// `expected` messages it received intact and in order (it stops at the first wrong one),
/// with the client itself, still connected.
fn reader(mut client: Client, expected: Arc<Vec<Vec<u8>>>) -> JoinHandle<(usize, Client)> {
    thread::spawn(move || {
        for (index, payload) in expected.iter().enumerate() {
            match client.read() {
                Ok(Message::Binary(data)) if data[..] == payload[..] => {}
                _ => return (index, client),
            }
        }
        (expected.len(), client)
    })
}

/// How many messages a reader got; its client stays connected in `keep`.
fn received(reader: JoinHandle<(usize, Client)>, keep: &mut Vec<Client>) -> usize {
    let (count, client) = reader.join().unwrap();
    keep.push(client);
    count
}

/// The sender is a member too (it gets its own echo), and it reads concurrently like any real
/// client: its frames go out on a clone of its socket, written by hand (masked, as a client
/// must), while its WebSocket reads on its own thread.
fn send_burst(
    server: &TestServer,
    room: &str,
    messages: usize,
    size: usize,
) -> JoinHandle<(usize, Client)> {
    let expected = payloads(messages, size);
    let client = server.connect(room);
    let mut writer = client.get_ref().try_clone().unwrap();
    // Encoded first and written in one go, so the burst reaches the server as fast as the
    // socket allows (masking byte by byte in a debug build would otherwise pace it).
    let burst: Vec<u8> = expected
        .iter()
        .flat_map(|payload| client_frame(true, 0, 0x2, payload, true))
        .collect();
    let echoes = reader(client, expected);
    writer.write_all(&burst).unwrap();
    echoes
}

fn assert_burst_delivered(readers: usize, messages: usize, size: usize) {
    let server = start(test_config());
    let room = "burst";
    let expected = payloads(messages, size);
    let members: Vec<_> = (0..readers)
        .map(|_| reader(server.connect(room), expected.clone()))
        .collect();
    let sender = send_burst(&server, room, messages, size);
    let mut keep = Vec::new();
    for (i, member) in members.into_iter().enumerate() {
        assert_eq!(
            received(member, &mut keep),
            messages,
            "reader {i} lost messages"
        );
    }
    assert_eq!(
        received(sender, &mut keep),
        messages,
        "the sender lost its echoes"
    );
    assert_eq!(
        server.stats.evictions(Eviction::Slow),
        0,
        "a reader was evicted"
    );
    assert_eq!(server.hub.room_size(room), readers + 1);
}

/// The reported repro: 3 readers, one sender, 20 × 60 KB as fast as it can, default flags.
/// Before the fix every member was evicted as "too slow".
#[test]
fn twenty_large_messages_evict_no_reader() {
    assert_burst_delivered(3, 20, 60_000);
}

/// The whole default burst (100 messages) of maximum-size messages (64 KiB) into 5 readers:
/// 6.4 MiB for each, six times the outbox bound.
#[test]
fn the_whole_default_burst_at_the_size_limit_reaches_every_reader() {
    assert_burst_delivered(5, 100, 64 * 1024);
}

/// The other half: a member that stops reading is still evicted by the byte bound during the
/// same kind of burst, with default flags, while the readers get everything.
#[test]
fn a_member_that_stops_reading_is_still_evicted_by_bytes() {
    const MESSAGES: usize = 100;
    const SIZE: usize = 60_000;
    let server = start(test_config());
    let room = "burst";
    let stalled: TcpStream = stalled_client(server.addr, &server.url(room));
    let expected = payloads(MESSAGES, SIZE);
    let members: Vec<_> = (0..3)
        .map(|_| reader(server.connect(room), expected.clone()))
        .collect();
    let sender = send_burst(&server, room, MESSAGES, SIZE);
    let mut keep = Vec::new();
    for member in members {
        assert_eq!(received(member, &mut keep), MESSAGES);
    }
    assert_eq!(received(sender, &mut keep), MESSAGES);
    assert_one_evicted(&server, room, 4);
    drop(stalled);
}

/// And by the clock: a member that stops reading with a backlog far under the byte bound is
/// evicted after `--slow-timeout`, even though no later message tips it over the bound.
#[test]
fn a_member_that_stops_reading_is_still_evicted_by_the_clock() {
    const SIZE: usize = 60_000;
    let mut config = test_config();
    config.slow_timeout = Duration::from_millis(500);
    // Room for the whole burst: only the clock can evict.
    config.outbox_bytes = 64 * 1024 * 1024;
    let server = start(config);
    let room = "burst";
    let _stalled = stalled_client(server.addr, &server.url(room));
    // 6 MB: more than the kernel takes for a peer that does not read (the server's send
    // buffer autotunes to about 1.3 MB on loopback), far less than the 64 MiB outbox.
    let messages = 100;
    let reading = reader(server.connect(room), payloads(messages, SIZE));
    let sender = send_burst(&server, room, messages, SIZE);
    let mut keep = Vec::new();
    assert_eq!(received(reading, &mut keep), messages);
    assert_eq!(received(sender, &mut keep), messages);
    assert_one_evicted(&server, room, 2);
}
