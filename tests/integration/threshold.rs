//! The maximum-connection threshold test the Go server failed with `concurrent map writes`:
//! clients join and leave in a storm while publishers broadcast to a room of steady clients.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tungstenite::Message;

use crate::support::*;

const CHURNERS: usize = 64;
const STEADY: usize = 8;
const PUBLISHERS: usize = 2;
const PER_PUBLISHER: usize = 1500;
const STORM: Duration = Duration::from_secs(4);

#[test]
fn join_leave_storm_loses_nothing_and_leaks_nothing() {
    let mut config = test_config();
    config.rate = 0;
    let server = Arc::new(start(config));
    let baseline_threads = server.stats.threads();
    assert_eq!(baseline_threads, 0);

    let steady: Vec<Client> = (0..STEADY).map(|_| server.connect("arena")).collect();
    let receivers: Vec<_> = steady
        .into_iter()
        .map(|mut client| {
            thread::spawn(move || {
                let mut next_seq = [0usize; PUBLISHERS];
                for _ in 0..PUBLISHERS * PER_PUBLISHER {
                    let text = next_text(&mut client);
                    let (publisher, seq) = text.split_once(':').unwrap();
                    let (publisher, seq): (usize, usize) =
                        (publisher.parse().unwrap(), seq.parse().unwrap());
                    // Per-sender order, and no gaps: anything else is loss or reordering.
                    assert_eq!(
                        seq, next_seq[publisher],
                        "publisher {publisher} out of order"
                    );
                    next_seq[publisher] += 1;
                }
                client
            })
        })
        .collect();

    let storming = Arc::new(AtomicBool::new(true));
    let cycles = Arc::new(AtomicUsize::new(0));
    let churners: Vec<_> = (0..CHURNERS)
        .map(|i| {
            let (server, storming, cycles) = (server.clone(), storming.clone(), cycles.clone());
            thread::spawn(move || {
                let mut n = 0;
                while storming.load(Ordering::Relaxed) {
                    let room = if n % 2 == 0 { "arena" } else { "side" };
                    let mut client = server.connect(room);
                    match (i + n) % 3 {
                        // A clean close handshake.
                        0 => {
                            let _ = client.close(None);
                            while client.read().is_ok() {}
                        }
                        // FIN without a close frame.
                        1 => drop(client.into_inner()),
                        // RST: linger 0 makes close() reset the connection.
                        _ => {
                            let stream: TcpStream = client.into_inner();
                            SockRef::from(&stream)
                                .set_linger(Some(Duration::ZERO))
                                .unwrap();
                            drop(stream);
                        }
                    }
                    n += 1;
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // Every publisher joins before any sends: one that joined late would rightly miss the
    // other's first messages and then wait for a count it can never reach.
    let publisher_clients: Vec<Client> = (0..PUBLISHERS).map(|_| server.connect("arena")).collect();
    let publishers: Vec<_> = publisher_clients
        .into_iter()
        .enumerate()
        .map(|(p, mut client)| {
            thread::spawn(move || {
                let pace = STORM / PER_PUBLISHER as u32;
                let started = Instant::now();
                for seq in 0..PER_PUBLISHER {
                    client.send(Message::text(format!("{p}:{seq}"))).unwrap();
                    if let Some(wait) = (pace * seq as u32).checked_sub(started.elapsed()) {
                        thread::sleep(wait);
                    }
                }
                // Stay in the room, reading, so the publisher is never a slow client.
                for _ in 0..PUBLISHERS * PER_PUBLISHER {
                    next_text(&mut client);
                }
                client
            })
        })
        .collect();

    let publishers: Vec<Client> = publishers.into_iter().map(|p| p.join().unwrap()).collect();
    storming.store(false, Ordering::Relaxed);
    for churner in churners {
        churner.join().unwrap();
    }
    let steady: Vec<Client> = receivers.into_iter().map(|r| r.join().unwrap()).collect();
    assert!(
        cycles.load(Ordering::Relaxed) > CHURNERS,
        "the storm must actually churn"
    );

    let expected = STEADY + PUBLISHERS;
    assert!(
        wait_until(Duration::from_secs(10), || server.hub.client_count()
            == expected),
        "hub holds {} clients, expected {expected}",
        server.hub.client_count()
    );
    assert_eq!(
        server.hub.room_count(),
        1,
        "the churners' room was removed when it emptied"
    );
    assert!(
        wait_until(Duration::from_secs(10), || server.stats.threads()
            == baseline_threads + expected),
        "{} connection threads alive, expected {}",
        server.stats.threads(),
        baseline_threads + expected
    );
    eprintln!(
        "threshold: {} join/leave cycles during the storm",
        cycles.load(Ordering::Relaxed)
    );
    drop((steady, publishers));
}
