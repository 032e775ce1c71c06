//! roomcast's load tool: the maximum-connection threshold test, and the benchmark scenarios,
//! against any running roomcast (loopback only).
//!
//! ```text
//! cargo run --release --example load -- capacity --addr 127.0.0.1:9001 --clients 15000 --rooms 10 --pid PID
//! cargo run --release --example load -- fanout --clients 1000 --publishers 4 --window 16 --size 64
//! cargo run --release --example load -- fanout --clients 10000 --publishers 1 --rate 10
//! cargo run --release --example load -- slow --clients 500 --publishers 2 --stalled 20 --size 1024 --rate 100
//! cargo run --release --example load -- churn --clients 100 --churners 50 --rate 100
//! cargo run --release --example load -- rooms --rooms 500 --clients 5000 --rate 20
//! ```
//!
//! One thread and one `epoll` (through mio) drive every connection: the tool shares the
//! machine's `pid_max` with a thread-per-connection server, so it cannot spend a thread per
//! client. Every published message carries its send time, its publisher and a sequence number,
//! and a payload whose every byte is derived from those, so receivers check latency, loss,
//! per-publisher order and corruption. Every loop is bounded in count and time.
//!
//! The last line of output is `RESULT key=value ...`, which `scripts/bench.sh` reads.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// Bytes of a message header: send time (ns since start), publisher id, sequence number.
const HEADER: usize = 8 + 4 + 8;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the last publish the tool waits for deliveries still in flight.
const DRAIN: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
struct Args {
    scenario: String,
    addr: SocketAddr,
    clients: usize,
    rooms: usize,
    publishers: usize,
    /// Messages per second per publisher; 0 with `window` means "as fast as the window allows".
    rate: f64,
    window: usize,
    size: usize,
    duration: Duration,
    stalled: usize,
    churners: usize,
    /// Handshakes started per second while ramping.
    connect_rate: f64,
    hold: Duration,
    pid: Option<u32>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let scenario = it
        .next()
        .ok_or("usage: load SCENARIO [--flag value]... (capacity, fanout, slow, churn, rooms)")?;
    let mut args = Args {
        scenario,
        addr: "127.0.0.1:9001".parse().unwrap(),
        clients: 1000,
        rooms: 1,
        publishers: 1,
        rate: 0.0,
        window: 0,
        size: 64,
        duration: Duration::from_secs(10),
        stalled: 0,
        churners: 0,
        connect_rate: 5000.0,
        hold: Duration::from_secs(2),
        pid: None,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |_| format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--addr" => args.addr = value.parse().map_err(|_| format!("bad --addr {value}"))?,
            "--clients" => args.clients = value.parse().map_err(bad)?,
            "--rooms" => args.rooms = value.parse().map_err(bad)?,
            "--publishers" => args.publishers = value.parse().map_err(bad)?,
            "--rate" => args.rate = value.parse().map_err(|_| format!("bad --rate {value}"))?,
            "--window" => args.window = value.parse().map_err(bad)?,
            "--size" => args.size = value.parse().map_err(bad)?,
            "--duration" => {
                args.duration = Duration::from_secs_f64(
                    value
                        .parse()
                        .map_err(|_| format!("bad --duration {value}"))?,
                )
            }
            "--stalled" => args.stalled = value.parse().map_err(bad)?,
            "--churners" => args.churners = value.parse().map_err(bad)?,
            "--connect-rate" => {
                args.connect_rate = value
                    .parse()
                    .map_err(|_| format!("bad --connect-rate {value}"))?
            }
            "--hold" => {
                args.hold = Duration::from_secs_f64(
                    value.parse().map_err(|_| format!("bad --hold {value}"))?,
                )
            }
            "--pid" => args.pid = Some(value.parse().map_err(|_| format!("bad --pid {value}"))?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.size < HEADER || args.size > 60_000 {
        return Err(format!("--size must be between {HEADER} and 60000"));
    }
    if args.rooms == 0 || args.clients < args.rooms {
        return Err("need at least one client per room".into());
    }
    if !args.addr.ip().is_loopback() {
        return Err("the load tool targets loopback addresses only".into());
    }
    Ok(args)
}

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Receiver,
    /// Receives too; `id` indexes the publisher tables.
    Publisher(usize),
    /// Never reads after the handshake (slow scenario).
    Stalled,
    /// Connects, leaves by `LeaveMode`, reconnects (churn scenario).
    Churner(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshaking,
    Open,
    Closing,
}

struct Conn {
    stream: TcpStream,
    role: Role,
    room: usize,
    phase: Phase,
    started: Instant,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Next expected sequence number per publisher (receivers).
    next_seq: Vec<u64>,
    /// When a stalled client's socket was closed by the server.
    evicted_at: Option<Duration>,
}

#[derive(Default)]
struct Tally {
    upgraded: u64,
    failures: BTreeMap<String, u64>,
    received: u64,
    lost: u64,
    reordered: u64,
    corrupted: u64,
    latency_us: Option<Histogram<u64>>,
}

impl Tally {
    fn fail(&mut self, kind: impl Into<String>) {
        *self.failures.entry(kind.into()).or_insert(0) += 1;
    }
}

struct Publisher {
    token: Token,
    room: usize,
    sent: u64,
    in_flight: usize,
}

struct Load {
    args: Args,
    poll: Poll,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    start: Instant,
    tally: Tally,
    publishers: Vec<Publisher>,
    /// Members per room (open receivers/publishers), for expected deliveries.
    members: Vec<u64>,
    last_stale_scan: Instant,
    /// The read buffer, reused: zero-filling 64 KiB per read would cost more than the read.
    scratch: Vec<u8>,
    /// Nanoseconds since `start` when the current batch of reads began, the receive time
    /// used for latency (one clock read per batch, not per message).
    batch_ns: u64,
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("load: {err}");
            std::process::exit(2);
        }
    };
    let mut load = Load::new(args.clone()).expect("epoll");
    let ok = match args.scenario.as_str() {
        "capacity" => load.capacity(),
        "fanout" | "slow" | "rooms" => load.fanout(),
        "churn" => load.churn(),
        other => {
            eprintln!("load: unknown scenario {other}");
            std::process::exit(2);
        }
    };
    std::process::exit(if ok { 0 } else { 1 });
}

impl Load {
    fn new(args: Args) -> io::Result<Load> {
        Ok(Load {
            members: vec![0; args.rooms],
            args,
            poll: Poll::new()?,
            conns: Vec::new(),
            free: Vec::new(),
            start: Instant::now(),
            tally: Tally {
                latency_us: Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
                ..Tally::default()
            },
            publishers: Vec::new(),
            last_stale_scan: Instant::now(),
            scratch: vec![0; 64 * 1024],
            batch_ns: 0,
        })
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    // ---- connections -------------------------------------------------------------------

    /// Starts a connection and its handshake; failures are tallied by kind.
    fn open(&mut self, room: usize, role: Role) -> Option<Token> {
        let stream = match TcpStream::connect(self.args.addr) {
            Ok(stream) => stream,
            Err(e) => {
                self.tally.fail(error_kind(&e));
                return None;
            }
        };
        let _ = stream.set_nodelay(true);
        if role == Role::Stalled {
            // A tiny receive window, so the server's bytes back up into its outbox quickly.
            let _ = socket2::SockRef::from(&stream).set_recv_buffer_size(4096);
        }
        let index = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let token = Token(index);
        let mut stream = stream;
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.tally.fail(error_kind(&e));
            self.free.push(index);
            return None;
        }
        let request = format!(
            "GET /ws/room{room} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            self.args.addr
        );
        self.conns[index] = Some(Conn {
            stream,
            role,
            room,
            phase: Phase::Handshaking,
            started: Instant::now(),
            rbuf: Vec::new(),
            wbuf: request.into_bytes(),
            next_seq: Vec::new(),
            evicted_at: None,
        });
        Some(token)
    }

    fn close(&mut self, token: Token, rst: bool) {
        if let Some(mut conn) = self.conns[token.0].take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            if rst {
                let _ = socket2::SockRef::from(&conn.stream).set_linger(Some(Duration::ZERO));
            }
            if conn.phase == Phase::Open && matches!(conn.role, Role::Receiver | Role::Publisher(_))
            {
                self.members[conn.room] -= 1;
            }
            self.free.push(token.0);
        }
    }

    fn open_count(&self, filter: impl Fn(&Conn) -> bool) -> usize {
        self.conns
            .iter()
            .flatten()
            .filter(|c| c.phase == Phase::Open && filter(c))
            .count()
    }

    /// One round of the event loop: waits up to `timeout`, then services every ready socket.
    fn turn(&mut self, events: &mut Events, timeout: Duration) {
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                panic!("poll: {e}");
            }
        }
        let ready: Vec<(Token, bool, bool, bool)> = events
            .iter()
            .map(|e| {
                (
                    e.token(),
                    e.is_readable(),
                    e.is_read_closed() || e.is_error(),
                    e.is_writable(),
                )
            })
            .collect();
        for (token, readable, closed, writable) in ready {
            if writable {
                self.flush(token);
            }
            if readable || closed {
                self.read(token, closed);
            }
        }
        // Handshakes that never finish are failures, not hangs. Checked every 100 ms, not
        // every turn: the scan walks every connection.
        if self.last_stale_scan.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last_stale_scan = Instant::now();
        let stale: Vec<Token> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.as_ref()
                    .filter(|c| {
                        c.phase == Phase::Handshaking && c.started.elapsed() > HANDSHAKE_TIMEOUT
                    })
                    .map(|_| Token(i))
            })
            .collect();
        for token in stale {
            self.tally.fail("timeout");
            self.close(token, false);
        }
    }

    fn flush(&mut self, token: Token) {
        let Some(conn) = self.conns[token.0].as_mut() else {
            return;
        };
        while !conn.wbuf.is_empty() {
            match conn.stream.write(&conn.wbuf) {
                Ok(0) => break,
                Ok(n) => {
                    conn.wbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break, // connect in progress
                Err(e) => {
                    let kind = error_kind(&e);
                    let handshaking = conn.phase == Phase::Handshaking;
                    if handshaking {
                        self.tally.fail(kind);
                    }
                    self.close(token, false);
                    return;
                }
            }
        }
    }

    fn send_frame(&mut self, token: Token, opcode: u8, payload: &[u8]) {
        let Some(conn) = self.conns[token.0].as_mut() else {
            return;
        };
        // Clients must mask (RFC 6455 §5.3); a zero key leaves the payload bytes as they are.
        conn.wbuf.push(0x80 | opcode);
        if payload.len() < 126 {
            conn.wbuf.push(0x80 | payload.len() as u8);
        } else {
            conn.wbuf.push(0x80 | 126);
            conn.wbuf
                .extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        conn.wbuf.extend_from_slice(&[0, 0, 0, 0]);
        conn.wbuf.extend_from_slice(payload);
        self.flush(token);
    }

    /// Reads what is ready. `peer_closed` is epoll's read-closed (or error) flag.
    fn read(&mut self, token: Token, peer_closed: bool) {
        let mut buf = std::mem::take(&mut self.scratch);
        self.read_into(token, peer_closed, &mut buf);
        self.scratch = buf;
    }

    fn read_into(&mut self, token: Token, peer_closed: bool, buf: &mut [u8]) {
        self.batch_ns = self.now_ns();
        loop {
            let Some(conn) = self.conns[token.0].as_mut() else {
                return;
            };
            if conn.role == Role::Stalled && conn.phase == Phase::Open {
                // Never read: only notice the server closing the socket (its eviction), which
                // epoll reports even while unread data sits in the buffer.
                if peer_closed && conn.evicted_at.is_none() {
                    conn.evicted_at = Some(self.start.elapsed());
                }
                return;
            }
            match conn.stream.read(buf) {
                Ok(0) => {
                    if conn.phase == Phase::Handshaking {
                        self.tally.fail("closed during handshake");
                    }
                    self.close(token, false);
                    return;
                }
                Ok(n) => {
                    conn.rbuf.extend_from_slice(&buf[..n]);
                    self.process(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    if conn.phase == Phase::Handshaking {
                        self.tally.fail(error_kind(&e));
                    }
                    self.close(token, false);
                    return;
                }
            }
        }
    }

    /// Consumes what has been read: the handshake response, then frames.
    fn process(&mut self, token: Token) {
        let Some(conn) = self.conns[token.0].as_mut() else {
            return;
        };
        if conn.phase == Phase::Handshaking {
            let Some(end) = conn.rbuf.windows(4).position(|w| w == b"\r\n\r\n") else {
                return;
            };
            let head = String::from_utf8_lossy(&conn.rbuf[..end]).into_owned();
            conn.rbuf.drain(..end + 4);
            match head.split_whitespace().nth(1) {
                Some("101") => {
                    conn.phase = Phase::Open;
                    self.tally.upgraded += 1;
                    if matches!(conn.role, Role::Receiver | Role::Publisher(_)) {
                        self.members[conn.room] += 1;
                    }
                    if let Role::Churner(mode) = conn.role {
                        self.leave(token, mode);
                        return;
                    }
                }
                Some(status) => {
                    self.tally.fail(format!("HTTP {status}"));
                    self.close(token, false);
                    return;
                }
                None => {
                    self.tally.fail("bad response");
                    self.close(token, false);
                    return;
                }
            }
        }
        // Frames: the server never masks, so the header is 2, 4 or 10 bytes. Parsed in place
        // by offset and drained once at the end: draining after each frame would shift the
        // whole buffer once per frame.
        let Some(conn) = self.conns[token.0].as_mut() else {
            return;
        };
        let rbuf = std::mem::take(&mut conn.rbuf);
        let mut at = 0;
        let mut ended = false;
        while rbuf.len() - at >= 2 {
            let frame = &rbuf[at..];
            let (len, header) = match frame[1] & 0x7f {
                126 if frame.len() >= 4 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
                127 if frame.len() >= 10 => (
                    u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if frame.len() < header + len {
                break;
            }
            let payload = &frame[header..header + len];
            at += header + len;
            match frame[0] & 0x0f {
                0x1 | 0x2 => self.receive(token, payload),
                0x9 => self.send_frame(token, 0xa, payload),
                0x8 => {
                    let closing = self.conns[token.0]
                        .as_ref()
                        .is_some_and(|c| c.phase == Phase::Closing);
                    if !closing {
                        self.tally.fail("closed by server");
                    }
                    self.close(token, false);
                    ended = true;
                    break;
                }
                _ => {}
            }
        }
        if let (false, Some(conn)) = (ended, self.conns[token.0].as_mut()) {
            let mut rbuf = rbuf;
            rbuf.drain(..at);
            conn.rbuf = rbuf;
        }
    }

    /// Checks one delivered message: order, loss, corruption, latency.
    fn receive(&mut self, token: Token, payload: &[u8]) {
        let now = self.batch_ns;
        if payload.len() < HEADER {
            self.tally.corrupted += 1;
            return;
        }
        let sent_ns = u64::from_be_bytes(payload[0..8].try_into().unwrap());
        let publisher = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
        let seq = u64::from_be_bytes(payload[12..20].try_into().unwrap());
        self.tally.received += 1;
        if !pattern_ok(&payload[HEADER..], seq) || publisher >= self.publishers.len() {
            self.tally.corrupted += 1;
            return;
        }
        if let Some(h) = self.tally.latency_us.as_mut() {
            let _ = h.record((now.saturating_sub(sent_ns) / 1000).max(1));
        }
        let Some(conn) = self.conns[token.0].as_mut() else {
            return;
        };
        if conn.next_seq.len() <= publisher {
            conn.next_seq.resize(publisher + 1, 0);
        }
        let expected = conn.next_seq[publisher];
        if seq > expected {
            self.tally.lost += seq - expected;
        } else if seq < expected {
            self.tally.reordered += 1;
        }
        conn.next_seq[publisher] = conn.next_seq[publisher].max(seq + 1);
        if conn.role == Role::Publisher(publisher) {
            self.publishers[publisher].in_flight =
                self.publishers[publisher].in_flight.saturating_sub(1);
        }
    }

    fn publish(&mut self, publisher: usize) {
        let (token, seq) = {
            let p = &mut self.publishers[publisher];
            p.sent += 1;
            p.in_flight += 1;
            (p.token, p.sent - 1)
        };
        let mut payload = Vec::with_capacity(self.args.size);
        payload.extend_from_slice(&self.now_ns().to_be_bytes());
        payload.extend_from_slice(&(publisher as u32).to_be_bytes());
        payload.extend_from_slice(&seq.to_be_bytes());
        payload.extend((0..self.args.size - HEADER).map(|i| pattern_byte(seq, i)));
        self.send_frame(token, 0x2, &payload);
    }

    /// A churner leaves: 0 = clean close handshake, 1 = FIN without a close frame, 2 = RST.
    fn leave(&mut self, token: Token, mode: u8) {
        match mode {
            0 => {
                if let Some(conn) = self.conns[token.0].as_mut() {
                    conn.phase = Phase::Closing;
                }
                self.send_frame(token, 0x8, &1000u16.to_be_bytes());
            }
            1 => {
                if let Some(conn) = self.conns[token.0].as_ref() {
                    let _ = conn.stream.shutdown(Shutdown::Write);
                }
                self.close(token, false);
            }
            _ => self.close(token, true),
        }
    }

    /// Opens `count` connections at `--connect-rate`, at most 256 handshakes in flight, and
    /// waits until every handshake has finished (or failed).
    fn ramp(
        &mut self,
        count: usize,
        role_of: impl Fn(usize) -> (usize, Role),
        events: &mut Events,
    ) {
        let started = Instant::now();
        let mut opened = 0;
        while opened < count || self.handshaking() > 0 {
            let allowed =
                ((started.elapsed().as_secs_f64() * self.args.connect_rate) as usize).min(count);
            while opened < allowed && self.handshaking() < 256 {
                let (room, role) = role_of(opened);
                self.open(room, role);
                opened += 1;
            }
            self.turn(events, Duration::from_millis(1));
            if started.elapsed() > Duration::from_secs(300) {
                eprintln!("load: ramp gave up after 300 s");
                break;
            }
        }
    }

    fn handshaking(&self) -> usize {
        self.conns
            .iter()
            .flatten()
            .filter(|c| c.phase == Phase::Handshaking)
            .count()
    }

    // ---- scenarios -----------------------------------------------------------------------

    fn capacity(&mut self) -> bool {
        let mut events = Events::with_capacity(4096);
        let baseline = self.args.pid.map(server_usage);
        let started = Instant::now();
        let rooms = self.args.rooms;
        self.ramp(
            self.args.clients,
            |i| (i % rooms, Role::Receiver),
            &mut events,
        );
        let ramp = started.elapsed();
        let held = self.open_count(|_| true);
        println!(
            "held {held} of {} connections; ramp {:.1?} ({:.0} connects/s)",
            self.args.clients,
            ramp,
            self.tally.upgraded as f64 / ramp.as_secs_f64()
        );
        println!("failures by kind: {:?}", self.tally.failures);
        let hold_until = Instant::now() + self.args.hold;
        while Instant::now() < hold_until {
            self.turn(&mut events, Duration::from_millis(10));
        }
        let mut per_conn = String::new();
        if let (Some(pid), Some((rss0, threads0))) = (self.args.pid, baseline) {
            let (rss, threads) = server_usage(pid);
            let n = held.max(1) as f64;
            let kib = rss.saturating_sub(rss0) as f64 / 1024.0 / n;
            let tpc = threads.saturating_sub(threads0) as f64 / n;
            println!("server: RSS {:.1} -> {:.1} MiB, {kib:.1} KiB per connection; {tpc:.3} threads per connection", rss0 as f64 / 1048576.0, rss as f64 / 1048576.0);
            per_conn = format!(
                " rss_kib_per_conn={kib:.1} threads_per_conn={tpc:.3} server_rss_mib={:.1}",
                rss as f64 / 1048576.0
            );
        }
        // Every held client must still be live: one message per room reaches every member.
        let mut first_in_room = vec![None; rooms];
        for (i, conn) in self.conns.iter().enumerate() {
            if let Some(conn) = conn.as_ref().filter(|c| c.phase == Phase::Open) {
                first_in_room[conn.room].get_or_insert(Token(i));
            }
        }
        for (room, token) in first_in_room.iter().enumerate() {
            if let Some(token) = *token {
                self.publishers.push(Publisher {
                    token,
                    room,
                    sent: 0,
                    in_flight: 0,
                });
                self.publish(self.publishers.len() - 1);
            }
        }
        let expected: u64 = self
            .members
            .iter()
            .zip(&first_in_room)
            .filter(|(_, t)| t.is_some())
            .map(|(m, _)| *m)
            .sum();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.tally.received < expected && Instant::now() < deadline {
            self.turn(&mut events, Duration::from_millis(10));
        }
        let live = self.tally.received;
        println!("still receiving: {live} of {held}");
        let failed: u64 = self.tally.failures.values().sum();
        println!(
            "RESULT scenario=capacity clients={} held={held} live={live} failed={failed} failures={:?} ramp_s={:.1}{per_conn}",
            self.args.clients,
            self.tally.failures,
            ramp.as_secs_f64()
        );
        live == held as u64 && held == self.args.clients && self.tally.corrupted == 0
    }

    fn fanout(&mut self) -> bool {
        let mut events = Events::with_capacity(4096);
        let args = self.args.clone();
        let rooms = args.rooms;
        // Publishers first (one room each, round robin), then receivers, then stalled clients.
        let publishers = if args.scenario == "rooms" {
            rooms
        } else {
            args.publishers
        };
        self.ramp(
            args.clients,
            |i| {
                if i < publishers {
                    (i % rooms, Role::Publisher(i))
                } else {
                    (i % rooms, Role::Receiver)
                }
            },
            &mut events,
        );
        for (i, conn) in self.conns.iter().enumerate() {
            if let Some(Conn {
                role: Role::Publisher(p),
                room,
                phase: Phase::Open,
                ..
            }) = conn
            {
                self.publishers.push(Publisher {
                    token: Token(i),
                    room: *room,
                    sent: 0,
                    in_flight: 0,
                });
                debug_assert_eq!(self.publishers.len() - 1, *p);
            }
        }
        if self.publishers.len() != publishers || self.open_count(|_| true) != args.clients {
            println!(
                "load: only {} of {} clients connected: {:?}",
                self.open_count(|_| true),
                args.clients,
                self.tally.failures
            );
            println!("RESULT scenario={} failed_to_connect=1", args.scenario);
            return false;
        }
        if args.stalled > 0 {
            let before = self.tally.upgraded;
            self.ramp(args.stalled, |_| (0, Role::Stalled), &mut events);
            assert_eq!(
                self.tally.upgraded - before,
                args.stalled as u64,
                "stalled clients connected"
            );
        }
        let cpu_before = args.pid.map(cpu_time);
        let mut peak_rss = args.pid.map_or(0, |pid| server_usage(pid).0);
        let started = Instant::now();
        let mut last_sample = started;
        while started.elapsed() < args.duration {
            let elapsed = started.elapsed().as_secs_f64();
            for p in 0..self.publishers.len() {
                if args.window > 0 {
                    while self.publishers[p].in_flight < args.window
                        && (args.rate == 0.0
                            || (self.publishers[p].sent as f64) < elapsed * args.rate)
                    {
                        self.publish(p);
                    }
                } else {
                    while (self.publishers[p].sent as f64) < elapsed * args.rate {
                        self.publish(p);
                    }
                }
            }
            self.turn(&mut events, Duration::from_micros(200));
            if let Some(pid) = args
                .pid
                .filter(|_| last_sample.elapsed() > Duration::from_millis(100))
            {
                peak_rss = peak_rss.max(server_usage(pid).0);
                last_sample = Instant::now();
            }
        }
        let publish_time = started.elapsed();
        let drain_until = Instant::now() + DRAIN;
        let expected = self.expected();
        while self.tally.received < expected && Instant::now() < drain_until {
            self.turn(&mut events, Duration::from_millis(5));
        }
        let took = started.elapsed();
        let cpu = args
            .pid
            .zip(cpu_before)
            .map(|(pid, before)| cpu_time(pid) - before);
        if let Some(pid) = args.pid {
            peak_rss = peak_rss.max(server_usage(pid).0);
        }
        // Loss: what every member should have got and did not (gaps count inside `lost`, the
        // tail after the last delivery here).
        let lost = expected.saturating_sub(self.tally.received);
        let h = self.tally.latency_us.take().unwrap();
        let sent: u64 = self.publishers.iter().map(|p| p.sent).sum();
        let per_second =
            self.tally.received as f64 / publish_time.as_secs_f64().min(took.as_secs_f64());
        let cpu_us = cpu.map(|c| c.as_secs_f64() * 1e6 / self.tally.received.max(1) as f64);
        println!(
            "{}: {} clients, {} publishers, {sent} messages of {} B in {:.1?}: {} deliveries ({per_second:.0}/s), lost {lost}, out of order {}, corrupted {}",
            args.scenario, args.clients, self.publishers.len(), args.size, publish_time, self.tally.received, self.tally.reordered, self.tally.corrupted
        );
        println!(
            "latency µs: p50 {} p90 {} p99 {} p99.9 {} max {}",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
        let mut extra = String::new();
        if let Some(cpu_us) = cpu_us {
            println!(
                "server CPU: {:.3} µs per delivery; peak RSS {:.1} MiB",
                cpu_us,
                peak_rss as f64 / 1048576.0
            );
            extra += &format!(
                " cpu_us_per_delivery={cpu_us:.3} peak_rss_mib={:.1}",
                peak_rss as f64 / 1048576.0
            );
        }
        let mut evicted_all = true;
        if args.stalled > 0 {
            let evictions: Vec<String> = self
                .conns
                .iter()
                .flatten()
                .filter(|c| c.role == Role::Stalled)
                .map(|c| {
                    c.evicted_at.map_or("not evicted".into(), |t| {
                        format!(
                            "{:.2}s",
                            t.saturating_sub(started.duration_since(self.start))
                                .as_secs_f64()
                        )
                    })
                })
                .collect();
            let evicted = evictions.iter().filter(|e| *e != "not evicted").count();
            evicted_all = evicted == args.stalled;
            println!(
                "stalled clients evicted: {evicted} of {} at {evictions:?}",
                args.stalled
            );
            extra += &format!(" stalled_evicted={evicted}/{}", args.stalled);
        }
        println!(
            "RESULT scenario={} clients={} publishers={} sent={sent} deliveries={} per_second={per_second:.0} lost={lost} reordered={} corrupted={} p50_us={} p90_us={} p99_us={} p999_us={} max_us={}{extra}",
            args.scenario,
            args.clients,
            self.publishers.len(),
            self.tally.received,
            self.tally.reordered,
            self.tally.corrupted,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
        lost == 0 && self.tally.reordered == 0 && self.tally.corrupted == 0 && evicted_all
    }

    /// Deliveries owed: each publisher's messages times the members of its room.
    fn expected(&self) -> u64 {
        self.publishers
            .iter()
            .map(|p| p.sent * self.members[p.room])
            .sum()
    }

    fn churn(&mut self) -> bool {
        let mut events = Events::with_capacity(4096);
        let args = self.args.clone();
        // Steady clients (the first is the publisher) in room 0; churners in room 1.
        self.members.resize(2, 0);
        self.ramp(
            args.clients,
            |i| {
                if i == 0 {
                    (0, Role::Publisher(0))
                } else {
                    (0, Role::Receiver)
                }
            },
            &mut events,
        );
        let token = self
            .conns
            .iter()
            .position(|c| {
                matches!(
                    c,
                    Some(Conn {
                        role: Role::Publisher(_),
                        ..
                    })
                )
            })
            .map(Token);
        let Some(token) = token else {
            println!("RESULT scenario=churn failed_to_connect=1");
            return false;
        };
        self.publishers.push(Publisher {
            token,
            room: 0,
            sent: 0,
            in_flight: 0,
        });
        let steady_failures: u64 = self.tally.failures.values().sum();
        let upgraded_before = self.tally.upgraded;
        let started = Instant::now();
        let mut mode = 0u8;
        while started.elapsed() < args.duration {
            while self.open_count(|c| matches!(c.role, Role::Churner(_))) + self.handshaking()
                < args.churners
            {
                mode = (mode + 1) % 3;
                self.open(1, Role::Churner(mode));
            }
            while (self.publishers[0].sent as f64) < started.elapsed().as_secs_f64() * args.rate {
                self.publish(0);
            }
            self.turn(&mut events, Duration::from_micros(200));
        }
        let churn_time = started.elapsed();
        let connects = self.tally.upgraded - upgraded_before;
        let drain_until = Instant::now() + DRAIN;
        while (self.tally.received < self.expected() || self.handshaking() > 0)
            && Instant::now() < drain_until
        {
            self.turn(&mut events, Duration::from_millis(5));
        }
        let lost = self.expected().saturating_sub(self.tally.received);
        let failed: u64 = self.tally.failures.values().sum::<u64>() - steady_failures;
        // The server must still answer a newcomer after the storm.
        let newcomer = self.open(0, Role::Receiver);
        let deadline = Instant::now() + Duration::from_secs(10);
        while newcomer.is_some_and(|t| {
            self.conns[t.0]
                .as_ref()
                .is_some_and(|c| c.phase == Phase::Handshaking)
        }) && Instant::now() < deadline
        {
            self.turn(&mut events, Duration::from_millis(5));
        }
        let answered = newcomer.is_some_and(|t| {
            self.conns[t.0]
                .as_ref()
                .is_some_and(|c| c.phase == Phase::Open)
        });
        let per_second = connects as f64 / churn_time.as_secs_f64();
        println!(
            "churn: {connects} connects in {churn_time:.1?} ({per_second:.0}/s), {failed} failed {:?}; steady clients lost {lost} of {}; a newcomer {}",
            self.tally.failures,
            self.expected(),
            if answered { "got in" } else { "was NOT answered" }
        );
        println!(
            "RESULT scenario=churn connects={connects} per_second={per_second:.0} failed={failed} steady_lost={lost} reordered={} corrupted={} newcomer={}",
            self.tally.reordered,
            self.tally.corrupted,
            if answered { "ok" } else { "unanswered" }
        );
        failed == 0
            && lost == 0
            && answered
            && self.tally.corrupted == 0
            && self.tally.reordered == 0
    }
}

/// Payload byte `i` of message `seq`: every byte depends on both (all eight bytes of a mixed
/// `seq`, and the position including its high bits), so a byte from another message, or a
/// shifted one, is caught. No division: the check runs for every delivered byte.
fn pattern_byte(seq: u64, i: usize) -> u8 {
    let mixed = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> ((i & 7) * 8)) as u8)
        .wrapping_add(i as u8)
        .wrapping_add((i >> 8) as u8)
}

fn pattern_ok(bytes: &[u8], seq: u64) -> bool {
    bytes
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern_byte(seq, i))
}

fn error_kind(e: &io::Error) -> String {
    match (e.kind(), e.raw_os_error()) {
        (_, Some(libc::EMFILE)) | (_, Some(libc::ENFILE)) => "EMFILE".into(),
        (io::ErrorKind::ConnectionRefused, _) => "refused".into(),
        (io::ErrorKind::ConnectionReset, _) | (io::ErrorKind::BrokenPipe, _) => "reset".into(),
        (io::ErrorKind::TimedOut, _) => "timeout".into(),
        (kind, _) => format!("{kind:?}"),
    }
}

/// A process's RSS in bytes and its thread count, from `/proc/PID/status`.
fn server_usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:") * 1024, field("Threads:"))
}

/// CPU time (user + system) a process has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<u64> = stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| {
        rest.split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect()
    });
    // After the state letter (not numeric, so filtered out): utime and stime are the 11th and
    // 12th numeric fields.
    let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}
