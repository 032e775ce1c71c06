//! The slow-client policy: a client that stops reading is evicted, never waited for, and the
//! memory it can pin is bounded by its outbox.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use roomcast::stats::Eviction;
use socket2::{Domain, Socket, Type};
use tungstenite::Message;

use crate::support::*;

/// A client that completes the handshake and then never reads, with a tiny receive buffer so
/// the server's bytes pile up in its outbox quickly.
pub fn stalled_client(addr: std::net::SocketAddr, url: &str) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    // Set before connect, so the tiny window is what the handshake advertises.
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    upgrade(TcpStream::from(socket), url).unwrap().into_inner()
}

/// Waits until exactly one client has been evicted as slow and `room` is back to `members`.
pub fn assert_one_evicted(server: &TestServer, room: &str, members: usize) {
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .evictions(Eviction::Slow)
        == 1));
    assert!(wait_until(Duration::from_secs(5), || server
        .hub
        .room_size(room)
        == members));
}

/// Without eviction, the broadcaster would either block on the stalled socket (freezing the
/// room) or queue for it without bound (eating memory).
#[test]
fn a_client_that_never_reads_is_evicted_while_a_healthy_one_gets_everything() {
    // 12 MiB in all: more than the kernel's autotuned send buffer (up to 4 MiB here) plus
    // the outbox bound, so the outbox must overflow.
    const MESSAGES: usize = 3000;
    const SIZE: usize = 4096;
    let mut config = test_config();
    config.rate = 0;
    config.max_message_bytes = 16 * 1024;
    config.outbox_bytes = 64 * 1024;
    config.slow_timeout = Duration::from_secs(60); // the byte bound, not the clock, must act
    let server = start(config);
    let stalled = stalled_client(server.addr, &server.url("slow"));
    let mut healthy = server.connect("slow");
    let mut publisher = server.connect("slow");

    let receiving = thread::spawn(move || {
        let mut count = 0;
        for expected in 0..MESSAGES {
            let Message::Binary(payload) = next_data(&mut healthy) else {
                panic!("expected binary")
            };
            assert_eq!(payload.len(), SIZE);
            assert_eq!(
                u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize,
                expected
            );
            count += 1;
        }
        (count, healthy)
    });
    for i in 0..MESSAGES as u32 {
        let mut payload = vec![0u8; SIZE];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        publisher.send(Message::binary(payload)).unwrap();
        // The publisher is a member too; it must keep reading or it would be slow itself.
        next_data(&mut publisher);
    }
    let (received, _healthy) = receiving.join().unwrap();
    assert_eq!(received, MESSAGES, "the healthy client lost messages");
    assert_one_evicted(&server, "slow", 2);
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .threads()
        == 2));
    drop(stalled);
}

/// The clock half of the policy: a client backlogged past `--slow-timeout` is evicted even
/// when its backlog stays under the byte bound.
#[test]
fn a_client_backlogged_past_the_slow_timeout_is_evicted() {
    let mut config = test_config();
    config.rate = 0;
    config.outbox_bytes = 64 * 1024 * 1024;
    config.slow_timeout = Duration::from_millis(300);
    let server = start(config);
    let _stalled = stalled_client(server.addr, &server.url("clock"));
    let mut publisher = server.connect("clock");
    // Enough to fill the stalled client's socket buffers, far less than its outbox bound.
    let mut sent = 0;
    while server.stats.evictions(Eviction::Slow) == 0 && sent < 20_000 {
        publisher.send(Message::binary(vec![1u8; 4096])).unwrap();
        next_data(&mut publisher);
        sent += 1;
        if sent % 200 == 0 {
            thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(wait_until(Duration::from_secs(5), || server
        .stats
        .evictions(Eviction::Slow)
        == 1));
    assert!(server.stats.bytes_sent.load(Ordering::Relaxed) > 0);
}

/// A backlog the connection thread leaves itself: pongs to a client that pinged and stopped
/// reading. With no room traffic and no heartbeat due, only the hand-over to the broadcaster
/// (which retries backlogs on its tick) can deliver them once the client reads again; before
/// it, they waited for the next heartbeat sweep to notice them.
#[test]
fn a_backlog_left_by_the_connection_thread_is_delivered_without_other_traffic() {
    const PINGS: usize = 60_000;
    const PAYLOAD: usize = 125;
    let mut config = test_config();
    config.rate = 0;
    config.outbox_bytes = 64 * 1024 * 1024;
    config.slow_timeout = Duration::from_secs(60);
    // No ping from the server during the test, so no sweep-driven send either.
    config.ping_interval = Duration::from_secs(1800);
    config.idle_timeout = Duration::from_secs(3600);
    let server = start(config);
    let mut stream = stalled_client(server.addr, &server.url("pongs"));
    // 7.6 MB of pongs: more than the kernel buffers of a peer that is not reading (the
    // server's send buffer autotunes up to 4 MiB).
    let ping = client_frame(true, 0, 0x9, &[7u8; PAYLOAD], true);
    stream.write_all(&ping.repeat(PINGS)).unwrap();
    // Let the connection thread answer every ping and go back to waiting for more, so the
    // last of its own sends is long over when this client starts reading.
    let mut last = u64::MAX;
    assert!(wait_until(READ_TIMEOUT, || {
        thread::sleep(Duration::from_millis(200));
        let sent = server.stats.bytes_sent.load(Ordering::Relaxed);
        std::mem::replace(&mut last, sent) == sent
    }));

    let pong_len = 2 + PAYLOAD;
    let mut received = vec![0u8; PINGS * pong_len];
    stream
        .read_exact(&mut received)
        .expect("every pong arrives");
    let frames = parse_frames(&received);
    assert_eq!(frames.len(), PINGS);
    assert!(frames
        .iter()
        .all(|f| f.opcode == 0xA && f.payload == [7u8; PAYLOAD]));
    assert_eq!(server.stats.evictions(Eviction::Slow), 0);
}
