//! Holds N idle WebSocket connections to a running roomcast and reports what they cost it.
//!
//! ```text
//! cargo run --release -- --rate 0 &                 # the server
//! cargo run --release --example hold -- --addr 127.0.0.1:9001 --count 5000 --pid $!
//! ```
//!
//! One thread, one handshake at a time: the server and this tool share the machine's
//! `pid_max`, so the tool must not spend a thread per connection. It reports how many
//! connections got in, how the rest were refused (503, reset, timeout, EMFILE), and, given the
//! server's PID, its RSS and thread count per held connection. Then it checks that every held
//! connection still receives a message sent to its room, and closes them all.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

struct Args {
    addr: SocketAddr,
    count: usize,
    pid: Option<u32>,
    rooms: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: "127.0.0.1:9001".parse().unwrap(),
        count: 1000,
        pid: None,
        rooms: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value.parse().expect("--addr"),
            "--count" => args.count = value.parse().expect("--count"),
            "--pid" => args.pid = Some(value.parse().expect("--pid")),
            "--rooms" => args.rooms = value.parse().expect("--rooms"),
            _ => panic!("unknown flag {flag}; flags: --addr --count --pid --rooms"),
        }
    }
    args
}

/// What the server process costs, from `/proc/PID/status`.
fn server_usage(pid: u32) -> (u64, u64) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server /proc status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("VmRSS:") * 1024, field("Threads:"))
}

#[derive(Debug)]
enum Outcome {
    Upgraded(TcpStream),
    Refused503,
    OtherStatus(String),
    Failed(io::ErrorKind, Option<i32>),
}

fn handshake(addr: SocketAddr, room: &str) -> Outcome {
    let attempt = || -> io::Result<Outcome> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /ws/{room} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            head.push(byte[0]);
        }
        let status_line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(match status_line.split_whitespace().nth(1) {
            Some("101") => Outcome::Upgraded(stream),
            Some("503") => Outcome::Refused503,
            _ => Outcome::OtherStatus(status_line),
        })
    };
    attempt().unwrap_or_else(|e| Outcome::Failed(e.kind(), e.raw_os_error()))
}

/// Sends one masked text frame (clients must mask, RFC 6455 §5.3; a zero mask is legal).
fn send_text(stream: &mut TcpStream, text: &str) -> io::Result<()> {
    let mut frame = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(text.as_bytes());
    stream.write_all(&frame)
}

/// Reads frames until a text frame carrying `text` arrives (skipping pings).
fn receives(stream: &mut TcpStream, text: &str) -> bool {
    let mut header = [0u8; 2];
    loop {
        if stream.read_exact(&mut header).is_err() {
            return false;
        }
        let len = (header[1] & 0x7f) as usize;
        let mut payload = vec![0u8; len];
        if len >= 126 || stream.read_exact(&mut payload).is_err() {
            return false;
        }
        if header[0] & 0x0f == 0x1 {
            return payload == text.as_bytes();
        }
    }
}

fn main() {
    let args = parse_args();
    let baseline = args.pid.map(server_usage);
    let started = Instant::now();
    let mut held = Vec::with_capacity(args.count);
    let (mut refused, mut other, mut failures) = (0, Vec::new(), std::collections::BTreeMap::new());
    for i in 0..args.count {
        match handshake(args.addr, &format!("room{}", i % args.rooms)) {
            Outcome::Upgraded(stream) => held.push((i % args.rooms, stream)),
            Outcome::Refused503 => refused += 1,
            Outcome::OtherStatus(line) => other.push(line),
            Outcome::Failed(kind, errno) => {
                *failures
                    .entry(format!("{kind:?} (errno {errno:?})"))
                    .or_insert(0) += 1
            }
        }
    }
    let ramp = started.elapsed();
    println!(
        "held {} of {} connections in {:.1?} ({:.0}/s)",
        held.len(),
        args.count,
        ramp,
        args.count as f64 / ramp.as_secs_f64()
    );
    println!(
        "refused with 503: {refused}; other statuses: {}; failures: {failures:?}",
        other.len()
    );

    if let (Some(pid), Some((rss0, threads0))) = (args.pid, baseline) {
        std::thread::sleep(Duration::from_secs(1));
        let (rss, threads) = server_usage(pid);
        let n = held.len().max(1) as f64;
        println!(
            "server: RSS {:.1} MiB -> {:.1} MiB ({:.1} KiB per connection); threads {threads0} -> {threads} ({:.3} per connection)",
            rss0 as f64 / 1048576.0,
            rss as f64 / 1048576.0,
            (rss.saturating_sub(rss0)) as f64 / 1024.0 / n,
            (threads - threads0) as f64 / n
        );
    }

    // Every held connection must still be live: one message per room must reach all members.
    let mut alive = 0;
    for room in 0..args.rooms {
        let members: Vec<usize> = (0..held.len()).filter(|&i| held[i].0 == room).collect();
        let Some(&first) = members.first() else {
            continue;
        };
        let text = format!("hello room{room}");
        if send_text(&mut held[first].1, &text).is_err() {
            continue;
        }
        for &i in &members {
            alive += usize::from(receives(&mut held[i].1, &text));
        }
    }
    println!("still receiving: {alive} of {}", held.len());
    if alive != held.len() {
        std::process::exit(1);
    }
}
