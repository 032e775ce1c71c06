//! Test support: a real server on `127.0.0.1:0` in this process, real WebSocket clients over
//! TCP, and waits on conditions instead of sleeps. Every client has a read timeout, so a test
//! that would otherwise hang fails instead.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use roomcast::relay::hub::Hub;
use roomcast::{Config, Server, Shutdown, Stats, Summary};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// The real binary, built by cargo for integration tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_roomcast");

/// How long any single client read may wait before the test fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub type Client = WebSocket<TcpStream>;

/// A server running in this process; shut down and joined on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    pub hub: Arc<Hub>,
    pub shutdown: Shutdown,
    thread: Option<JoinHandle<Summary>>,
}

/// Test defaults: production limits, but short timeouts so nothing in a test waits long.
pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shutdown_grace: Duration::from_secs(2),
        ..Config::default()
    }
}

pub fn start(config: Config) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Server::new(listener, config).unwrap();
    let addr = server.local_addr();
    let (stats, hub) = (server.stats(), server.hub());
    let shutdown = Shutdown::new();
    let handle = shutdown.clone();
    let thread = thread::Builder::new()
        .name(format!("server-{}", addr.port()))
        .spawn(move || server.run(&handle).unwrap())
        .unwrap();
    TestServer {
        addr,
        stats,
        hub,
        shutdown,
        thread: Some(thread),
    }
}

impl TestServer {
    pub fn url(&self, room: &str) -> String {
        format!("ws://{}/ws/{room}", self.addr)
    }

    /// Connects a WebSocket client to `room`; panics if the upgrade fails.
    pub fn connect(&self, room: &str) -> Client {
        self.try_connect(room)
            .unwrap_or_else(|e| panic!("connect to {room}: {e}"))
    }

    /// Connects to an arbitrary path rather than a room.
    pub fn connect_path(&self, path: &str) -> Client {
        let stream = TcpStream::connect(self.addr).unwrap();
        upgrade(stream, &format!("ws://{}{path}", self.addr)).unwrap()
    }

    pub fn try_connect(&self, room: &str) -> Result<Client, tungstenite::Error> {
        let stream = TcpStream::connect(self.addr).unwrap();
        upgrade(stream, &self.url(room))
    }

    /// Stops the server and returns its summary once every thread has been joined.
    pub fn stop(mut self) -> Summary {
        self.shutdown.trigger();
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("server thread panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.shutdown.trigger();
            let _ = thread.join();
        }
    }
}

/// Runs the client side of the handshake over an already connected stream.
pub fn upgrade(stream: TcpStream, url: &str) -> Result<Client, tungstenite::Error> {
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    match tungstenite::client(url, stream) {
        Ok((ws, _response)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            panic!("blocking handshake interrupted")
        }
    }
}

/// Reads the next data message, skipping control frames.
pub fn next_data(client: &mut Client) -> Message {
    loop {
        match client.read().expect("read a message") {
            Message::Ping(_) | Message::Pong(_) => continue,
            message => return message,
        }
    }
}

pub fn next_text(client: &mut Client) -> String {
    match next_data(client) {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Reads until the server's close frame and returns its code.
pub fn expect_close(client: &mut Client) -> CloseCode {
    loop {
        match client.read() {
            Ok(Message::Close(Some(frame))) => return frame.code,
            Ok(Message::Close(None)) => panic!("close frame without a code"),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Sends raw bytes and returns everything the server sends until it closes (or the timeout).
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// The status code of a raw HTTP response.
pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A valid upgrade request head for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// A frame as the server sent it: opcode and payload (server frames are never masked).
#[derive(Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The status code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Reads raw bytes until the server closes the connection (or the read timeout), then parses
/// them into frames. For clients that must not answer pings, which tungstenite always does.
pub fn read_frames_until_closed(stream: &mut TcpStream) -> Vec<RawFrame> {
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    parse_frames(&bytes)
}

/// Parses complete unmasked frames; a truncated tail is ignored.
pub fn parse_frames(mut bytes: &[u8]) -> Vec<RawFrame> {
    let mut frames = Vec::new();
    while bytes.len() >= 2 {
        let opcode = bytes[0] & 0x0f;
        let (len, header) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 if bytes.len() >= 10 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if bytes.len() < header + len {
            break;
        }
        frames.push(RawFrame {
            opcode,
            payload: bytes[header..header + len].to_vec(),
        });
        bytes = &bytes[header + len..];
    }
    frames
}

/// A parsed HTTP response from `http`.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One plain HTTP/1.1 request over a fresh connection; the server closes after answering.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    let raw = raw_exchange_bytes(addr, &bytes);
    parse_http_response(&raw)
}

/// Sends raw bytes and returns every byte the server sends until it closes.
pub fn raw_exchange_bytes(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    response
}

pub fn parse_http_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    HttpResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// Encodes a client frame by hand, so tests can send what no WebSocket library would:
/// unmasked frames, reserved bits and opcodes, lying lengths.
pub fn client_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut frame = vec![(u8::from(fin) << 7) | ((rsv & 0x7) << 4) | (opcode & 0x0f)];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

/// A healthy client in its own room that keeps sending and receiving while a test attacks the
/// server, checking every message arrives, once and in order.
pub struct Bystander {
    stop: Arc<std::sync::atomic::AtomicBool>,
    exchanged: Arc<std::sync::atomic::AtomicUsize>,
    thread: JoinHandle<usize>,
}

impl Bystander {
    /// Paced under the default rate limit (50/s), so it is never the one rate-limited.
    const PACE: Duration = Duration::from_millis(25);

    /// Starts exchanging, and returns once the first exchange has succeeded: the bystander is
    /// being served before the attack begins.
    pub fn start(server: &TestServer) -> Bystander {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let mut client = server.connect("bystanders");
        let stop = Arc::new(AtomicBool::new(false));
        let exchanged = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (stop.clone(), exchanged.clone());
        let thread = thread::spawn(move || {
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                let text = format!("heartbeat {n}");
                client
                    .send(Message::text(text.clone()))
                    .expect("bystander send");
                assert_eq!(
                    next_text(&mut client),
                    text,
                    "bystander lost or reordered a message"
                );
                n += 1;
                count.store(n, Ordering::Relaxed);
                thread::sleep(Self::PACE);
            }
            let _ = client.close(None);
            while client.read().is_ok() {}
            n
        });
        let bystander = Bystander {
            stop,
            exchanged,
            thread,
        };
        bystander.wait_for_exchanges(1);
        bystander
    }

    fn wait_for_exchanges(&self, n: usize) {
        let exchanged = || self.exchanged.load(std::sync::atomic::Ordering::Relaxed);
        let done = wait_until(READ_TIMEOUT, || {
            exchanged() >= n || self.thread.is_finished()
        });
        assert!(
            done && exchanged() >= n,
            "the bystander was not served: {} exchanges",
            exchanged()
        );
    }

    /// Waits for at least one exchange after `start` returned (the server still serves it),
    /// stops it, and returns how many messages it exchanged in all.
    pub fn finish(self) -> usize {
        self.wait_for_exchanges(2);
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the bystander failed")
    }
}

impl TestServer {
    /// Waits until no connection thread, client or room is left: nothing leaked.
    pub fn assert_back_to_baseline(&self) {
        let settled = wait_until(Duration::from_secs(15), || {
            self.stats.threads() == 0 && self.hub.client_count() == 0 && self.hub.room_count() == 0
        });
        assert!(
            settled,
            "leaked: {} threads, {} clients, {} rooms",
            self.stats.threads(),
            self.hub.client_count(),
            self.hub.room_count()
        );
    }
}

/// `roomcast --listen 127.0.0.1:0 --log-level info ARGS`, with stderr piped and none of the
/// test's own `ROOMCAST_*` variables: the binary reads them, and a developer's settings must
/// not change an outcome. Tests add the variables they mean.
pub fn binary_command(args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ROOMCAST_") {
            command.env_remove(name);
        }
    }
    command
        .args(["--listen", "127.0.0.1:0", "--log-level", "info"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// A running `roomcast` process, killed on drop if a test fails midway.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    /// Every log line read so far.
    seen: Vec<String>,
}

impl Process {
    pub fn start(args: &[&str]) -> Process {
        Process::start_configured(args, |_| {})
    }

    /// Starts the binary, optionally with its soft and hard `RLIMIT_NOFILE` set to `files`.
    pub fn start_with_file_limit(args: &[&str], files: Option<u64>) -> Process {
        Process::start_configured(args, |command| {
            if let Some(files) = files {
                let limit = libc::rlimit {
                    rlim_cur: files,
                    rlim_max: files,
                };
                // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
                unsafe {
                    command.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                        0 => Ok(()),
                        _ => Err(std::io::Error::last_os_error()),
                    });
                }
            }
        })
    }

    /// Starts the binary once `configure` has adjusted the command (a `pre_exec`, the
    /// variables a test sets).
    pub fn start_configured(args: &[&str], configure: impl FnOnce(&mut Command)) -> Process {
        let mut command = binary_command(args);
        configure(&mut command);
        let mut child = command.spawn().unwrap();
        let lines = forward_lines(child.stderr.take().unwrap());
        let mut process = Process {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
            seen: Vec::new(),
        };
        let line = process.wait_for_line("listening on ws://");
        let addr = line.split("ws://").nth(1).unwrap().split('/').next();
        process.addr = addr.unwrap().parse().unwrap();
        process
    }

    /// Kills the process and returns every line it logged.
    pub fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The pipe closed with the process, so this ends.
        while let Ok(line) = self.lines.recv_timeout(READ_TIMEOUT) {
            self.seen.push(line);
        }
        std::mem::take(&mut self.seen)
    }

    /// Returns the first log line containing `needle`, among those already read or to come.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "roomcast never logged {needle:?}; it logged {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Every log line so far, after reading what arrives within `quiet` of the last one.
    pub fn lines_until_quiet(&mut self, quiet: Duration) -> &[String] {
        while let Ok(line) = self.lines.recv_timeout(quiet) {
            self.seen.push(line);
        }
        &self.seen
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child we spawned and have not yet reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Waits for the process to exit, returning its exit code and how long it took.
    pub fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("roomcast did not exit within {limit:?}");
    }

    pub fn connect(&self, room: &str) -> Client {
        upgrade(
            TcpStream::connect(self.addr).unwrap(),
            &format!("ws://{}/ws/{room}", self.addr),
        )
        .unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn forward_lines(stderr: ChildStderr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A private `redis-server` on a free loopback port, persistence off; killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one, or returns `None` (having said why) when `redis-server` is not installed and
    /// `ROOMCAST_REQUIRE_ALL` is unset. scripts/test.sh installs it and sets that variable.
    pub fn start() -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("ROOMCAST_REQUIRE_ALL").is_none(),
                "redis-server is required (ROOMCAST_REQUIRE_ALL is set)"
            );
            eprintln!("skipping a Redis test: no redis-server found (scripts/test.sh installs it)");
            return None;
        }
        for _ in 0..5 {
            // A port the kernel just handed out and we released: free unless another process
            // grabs it in between, in which case redis-server exits and we try another.
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut redis = RedisServer { port, child: None };
            if redis.spawn() {
                return Some(redis);
            }
        }
        panic!("could not start redis-server on a free port");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it at once (SIGKILL): the outage tests' "Redis goes down".
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty (no persistence).
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// Starts redis-server on `self.port`; returns whether it answers PING.
    fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let answers = wait_until(Duration::from_secs(10), || {
            if child.try_wait().ok().flatten().is_some() {
                return true; // exited: the port was taken
            }
            redis_ping(self.port)
        }) && child.try_wait().ok().flatten().is_none();
        if answers {
            self.child = Some(child);
        } else {
            let _ = child.kill();
            let _ = child.wait();
        }
        answers
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

impl RedisServer {
    /// `PUBLISH channel payload`, as a backend (or redis-cli) would; exactly one subscriber,
    /// the instance under test, must receive it.
    pub fn publish(&self, channel: &str, payload: &[u8]) {
        assert_eq!(
            self.command(&[b"PUBLISH", channel.as_bytes(), payload]),
            ":1"
        );
    }

    /// Sends one command in RESP and returns the raw reply line (`:1`, `+OK`, ...).
    pub fn command(&self, args: &[&[u8]]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        stream.write_all(&request).unwrap();
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        reply.trim_end().to_string()
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the server: a Redis that stops answering
    /// without closing its connections.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
    }
}

/// A `roomcast.v1` client: it offers the subprotocol, and speaks JSON frames.
pub struct V1Client {
    pub ws: Client,
    /// The `welcome`, the first frame of every v1 session.
    pub welcome: serde_json::Value,
}

impl TestServer {
    /// Connects a v1 client to `room`, with `query` (`token=...&name=...`, or empty) on the
    /// upgrade URL; panics unless the upgrade succeeds and a `welcome` arrives.
    pub fn connect_v1(&self, room: &str, query: &str) -> V1Client {
        self.try_connect_v1(room, query, &[])
            .unwrap_or_else(|e| panic!("v1 connect to {room}: {e}"))
    }

    /// Connects a v1 client with extra request headers.
    pub fn try_connect_v1(
        &self,
        room: &str,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<V1Client, tungstenite::Error> {
        let url = match query {
            "" => self.url(room),
            query => format!("{}?{query}", self.url(room)),
        };
        V1Client::connect(self.addr, &url, headers)
    }
}

impl V1Client {
    /// Upgrades offering `roomcast.v1` (tungstenite then insists the `101` names it) and reads
    /// the `welcome`.
    pub fn connect(
        addr: SocketAddr,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<V1Client, tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "roomcast.v1".parse().unwrap());
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let (ws, response) = match tungstenite::client(request, stream) {
            Ok(done) => done,
            Err(tungstenite::HandshakeError::Failure(e)) => return Err(e),
            Err(tungstenite::HandshakeError::Interrupted(_)) => {
                panic!("blocking handshake interrupted")
            }
        };
        assert_eq!(
            response
                .headers()
                .get("Sec-WebSocket-Protocol")
                .map(|v| v.to_str().unwrap()),
            Some("roomcast.v1")
        );
        let mut client = V1Client {
            ws,
            welcome: serde_json::Value::Null,
        };
        let welcome = client.next_frame();
        assert_eq!(welcome["type"], "welcome", "the first frame: {welcome}");
        client.welcome = welcome;
        Ok(client)
    }

    /// Sends one JSON text frame as given.
    pub fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("send a frame");
    }

    pub fn publish(&mut self, data: serde_json::Value) {
        let frame = serde_json::json!({"type": "publish", "data": data});
        self.send_raw(&frame.to_string());
    }

    pub fn react(&mut self, key: &str) {
        let frame = serde_json::json!({"type": "react", "key": key});
        self.send_raw(&frame.to_string());
    }

    /// The next frame, parsed; panics on anything but a JSON text frame.
    pub fn next_frame(&mut self) -> serde_json::Value {
        match next_data(&mut self.ws) {
            Message::Text(text) => serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("a v1 frame that is not JSON ({e}): {text}")),
            other => panic!("a v1 client got a non-text frame: {other:?}"),
        }
    }

    /// The next frame of `kind` (`message`, `error`, ...), skipping presence and reactions.
    pub fn next_of(&mut self, kind: &str) -> serde_json::Value {
        loop {
            let frame = self.next_frame();
            match frame["type"].as_str() {
                Some(t) if t == kind => return frame,
                Some("presence" | "reactions") => continue,
                _ => panic!("expected a {kind} frame, got {frame}"),
            }
        }
    }

    pub fn next_message(&mut self) -> serde_json::Value {
        self.next_of("message")
    }
}

/// Sends a request and reads the response head only: an upgrade's session stays up, so
/// reading to the end (as `raw_exchange` does) would wait for the idle timeout.
pub fn response_head(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// `/healthz`'s body: `ok`, or what is degraded.
pub fn health(server: &TestServer) -> String {
    http(server.addr, "GET", "/healthz", &[], b"").text()
}

/// How long a Redis link may take to come up, go down or come back (reconnect backoff peaks
/// at 5 s).
pub const REDIS_LINK_WAIT: Duration = Duration::from_secs(20);

/// Starts an instance with `--redis` and waits until its link is up (publisher and
/// subscriber connected).
pub fn start_linked(config: Config) -> TestServer {
    let server = start(config);
    assert!(
        wait_until(REDIS_LINK_WAIT, || health(&server) == "ok\n"),
        "link never came up: {}",
        health(&server)
    );
    server
}

/// The value of one sample on `/metrics` (named as it appears there: `name` or
/// `name{reason="..."}`), fetched with the API token `api_token`.
pub fn metric_sample(server: &TestServer, api_token: &str, sample: &str) -> u64 {
    let bearer = format!("Bearer {api_token}");
    let page = http(
        server.addr,
        "GET",
        "/metrics",
        &[("Authorization", bearer.as_str())],
        b"",
    )
    .text();
    page.lines()
        .find_map(|line| line.strip_prefix(&format!("{sample} ")))
        .unwrap_or_else(|| panic!("no {sample} in /metrics"))
        .parse()
        .unwrap()
}

/// Upgrades to roomcast.v1 on `path` with `text` sent in the same write as the request, and
/// returns the first `count` JSON frames the server sends, presence and reactions frames left
/// out (they may come between any two others).
pub fn v1_frames_after_upgrade_with(
    addr: SocketAddr,
    path: &str,
    text: &[u8],
    count: usize,
) -> Vec<serde_json::Value> {
    let mut request = upgrade_request(path);
    request.insert_str(request.len() - 2, "Sec-WebSocket-Protocol: roomcast.v1\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend(client_frame(true, 0, 0x1, text, true));
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.write_all(&bytes).unwrap();
    let mut received = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed early");
        received.extend_from_slice(&buf[..n]);
        let Some(head) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let frames: Vec<serde_json::Value> = parse_frames(&received[head + 4..])
            .into_iter()
            .filter(|f| f.opcode == 0x1)
            .map(|f| serde_json::from_slice::<serde_json::Value>(&f.payload).unwrap())
            .filter(|f| !matches!(f["type"].as_str(), Some("presence" | "reactions")))
            .collect();
        if frames.len() >= count {
            return frames;
        }
    }
}
