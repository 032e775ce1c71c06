//! Admission: over `--max-clients` or `--max-clients-per-ip` the acceptor answers `503` with
//! `Retry-After` without spawning, and a freed slot is usable again. And the memory the
//! capacity preflight assumes per client holds against the worst a client can do.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tungstenite::Message;

use crate::slow::stalled_client;
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

/// A sample's value from a `/metrics` page.
fn gauge(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .parse()
        .unwrap()
}

/// A value in kB from `/proc/PID/status` (`VmHWM` is the peak resident set size), in bytes.
fn status_bytes(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// The worst a client can do to the server's memory: each client alone in its room, sending
/// maximum-size messages as fast as it can and never reading what the room sends back, so its
/// outbox fills up to the bound, its thread holds messages in flight, and the event channel
/// fills with messages waiting for the broadcaster. The server's peak RSS must stay under what
/// the capacity preflight assumed for that many clients (its two memory gauges). The flat
/// 64 KiB per client the preflight used to assume was far too little here: with the event
/// channel bounded only in events this peaked at 360-490 MiB for 100 clients; bounded in bytes
/// too, at 81-89 MiB, against 275 MiB assumed now.
#[test]
fn clients_flooding_their_own_rooms_stay_within_the_memory_the_preflight_assumed() {
    const CLIENTS: usize = 100;
    const MESSAGE_BYTES: usize = 64 * 1024; // the default --max-message-bytes
    /// Frames each flooder sends at most: far more than its outbox and socket buffers take.
    const MAX_FRAMES: usize = 400;
    /// Longest a flooder's write, or the wait for every eviction, may take.
    const FLOOD_DEADLINE: Duration = Duration::from_secs(30);
    let mut process = Process::start(&["--rate", "0", "--max-message-bytes", "64KiB"]);
    let assumption = process.wait_for_line("memory: assuming up to");
    let pid = process.child.id();
    let metrics = http(process.addr, "GET", "/metrics", &[], b"").text();
    let per_client = gauge(&metrics, "roomcast_memory_per_client_budget_bytes");
    let queues = gauge(&metrics, "roomcast_memory_queues_budget_bytes");
    let baseline = status_bytes(pid, "VmRSS:");

    let frame = Arc::new(client_frame(true, 0, 0x2, &[0x5a; MESSAGE_BYTES], true));
    let start = Arc::new(Barrier::new(CLIENTS));
    let flooders: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let url = format!("ws://{}/ws/alone-{i}", process.addr);
            // Never reads, with a tiny receive window: the room's echo piles up server-side.
            let mut stream = stalled_client(process.addr, &url);
            // A loaded machine may keep the server's reader blocked on the full event channel
            // for a while; a write timing out mid-frame would end a flooder before its
            // outbox overflowed.
            stream.set_write_timeout(Some(FLOOD_DEADLINE)).unwrap();
            let (frame, start) = (frame.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                // Ends when the server, having evicted it, resets the connection (or after
                // the write timeout, should the server stop reading altogether).
                let sent = (0..MAX_FRAMES)
                    .take_while(|_| stream.write_all(&frame).is_ok())
                    .count();
                // Kept open: a flooder that closed before its outbox overflowed would leave
                // instead of being evicted.
                (sent, stream)
            })
        })
        .collect();
    let (counts, _streams): (Vec<usize>, Vec<TcpStream>) =
        flooders.into_iter().map(|f| f.join().unwrap()).unzip();
    let sent: usize = counts.iter().sum();
    let evicted = || {
        let metrics = http(process.addr, "GET", "/metrics", &[], b"").text();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("roomcast_evictions_total{reason=\"slow\"} "))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
    };
    // Every flooder's outbox overflowed: each reached its worst case, though not all at once.
    assert!(
        wait_until(FLOOD_DEADLINE, || evicted() == CLIENTS),
        "{} of {CLIENTS} flooders evicted",
        evicted()
    );
    let peak = status_bytes(pid, "VmHWM:");
    let growth = peak.saturating_sub(baseline);
    let assumed = queues + CLIENTS as u64 * per_client;
    eprintln!(
        "{CLIENTS} flooders sent {sent} frames; server RSS {} KiB at rest, peak {} KiB: {} KiB \
         per client, against {} KiB per client + {} KiB shared assumed",
        baseline >> 10,
        peak >> 10,
        (growth / CLIENTS as u64) >> 10,
        per_client >> 10,
        queues >> 10
    );
    assert!(
        growth <= assumed,
        "peak RSS grew by {} MiB, over the {} MiB the preflight assumed ({assumption})",
        growth >> 20,
        assumed >> 20
    );

    // The server is still serving.
    let mut after = process.connect("after-the-flood");
    after.send(Message::text("still here")).unwrap();
    assert_eq!(next_text(&mut after), "still here");
}
