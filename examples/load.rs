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
//! cargo run --release --example load -- stalled --stalled 1000 --stalled-rooms 10 --clients 1000 --publishers 4 --window 16
//! cargo run --release --example load -- hoard --clients 200 --size 65000 --rate 50 --burst 100
//! cargo run --release --example load -- leave --clients 10000 --mode rst
//! cargo run --release --example load -- fanout --clients 1000 --publishers 4 --window 16 --size 64 --v1
//! cargo run --release --example load -- stream --viewers 10000 --chatters 100 --chat-rate 50 --tappers 200 --tap-rate 2000 --duration 20
//! cargo run --release --example load -- stream --viewers 10000 --chatters 100 --chat-rate 50 --tappers 200 --tap-rate 2000 --duration 20 --relayed
//! ```
//!
//! `stalled` is `fanout` (same measured workload, same report) beside `--stalled` clients in
//! `--stalled-rooms` other rooms that stopped reading after the handshake and whose outboxes
//! the tool has filled first, so the server holds them backlogged (and retries them) for the
//! whole run; `--stalled 0` is the clean twin. `hoard` is `--clients` clients, each alone in
//! its room, sending `--size` messages and never reading, so the server's echoes pile up in
//! their outboxes; it reports the server's peak memory per client. `leave` is `--clients`
//! clients of one room disconnecting at once (`--mode close|fin|rst`); it reports how long
//! the server takes to empty the room.
//!
//! `stream` is a live stream's room: `--viewers` in one fresh room (a name of its own per
//! run, since reaction totals count from the room's first join), among them `--chatters`
//! publishing `--chat-rate` messages a second between them and `--tappers` sending
//! `--tap-rate` reactions a second between them, spread evenly over time, on the `--keys` in
//! turn. It runs on `roomcast.v1`: every viewer checks the chat as `fanout` does and keeps
//! the last `reactions` totals, which must equal the taps sent per key within twice
//! `--reaction-interval` (the server's, default 250ms) plus a margin after the last tap. The
//! tool refuses a tap rate per tapper above `--reaction-rate` (the server's per-user bucket,
//! default 20/s), where the server would drop taps. `--relayed` runs the same workload the
//! plain way, as the demo page did before roomcast.v1: every tap a text message relayed to every viewer, each
//! of which every viewer must get.
//!
//! One thread and one `epoll` (through mio) drive every connection: the tool shares the
//! machine's `pid_max` with a thread-per-connection server, so it cannot spend a thread per
//! client. Every published message carries its send time, its publisher and a sequence number,
//! and a payload whose every byte is derived from those, so receivers check latency, loss,
//! per-publisher order and corruption. Every loop is bounded in count and time.
//!
//! `--v1` runs every scenario's clients on `roomcast.v1` (PROTOCOL.md): each offers the
//! subprotocol, insists that the `101` names it, and checks its `welcome` (its room, its
//! identity, its right to post) before it counts as connected. Messages go out as
//! `{"type":"publish","data":"..."}`, where `data` is a string of `--size` characters: the
//! pattern, then the header in hex. Receivers read `message` frames without a JSON parser (the
//! server's layout is checked against `serde_json` in the tests), and check the room's `seq`
//! rises with every message besides the per-publisher checks. `--token-secret SECRET` (or
//! `ROOMCAST_TOKEN_SECRET`) gives every client, plain or v1, a join token for its room with
//! a `sub` of its own (`load-<n>`), as a server with a secret requires of everyone.
//!
//! The last line of output is `RESULT key=value ...`, which `scripts/bench.sh` reads.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// Bytes of a message header: send time (ns since start), publisher id, sequence number.
const HEADER: usize = 8 + 4 + 8;
/// `--v1`: characters of the header that ends a message's `data` string, in hex: send time
/// (16), publisher (8), sequence number (16), and the string's own length (8), by which the
/// receiver finds where the string begins without searching the frame for it.
const V1_TRAILER: usize = 16 + 8 + 16 + 8;
/// `--v1`: the characters of a `data` string's pattern, one per payload byte's low six bits:
/// none needs escaping in JSON, so the string's length in the frame is its length.
const V1_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// How every `message` frame of the server begins (`roomcast::v1::codec::push_message`).
const V1_MESSAGE_PREFIX: &[u8] = br#"{"type":"message","#;
/// How long a minted join token is valid: longer than any run.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// `SO_RCVBUF` asked for by a stalled client (the kernel doubles it for its bookkeeping): a
/// small receive window, so the server's bytes back up into its outbox quickly.
const STALLED_RECEIVE_BUFFER: usize = 4096;
/// The MSS a stalled client announces: Ethernet's, not loopback's 64 KiB. The server's kernel
/// sizes a connection's send buffer from its congestion window in segments, so with
/// loopback's MSS each stalled connection soaked up 2.8 MB of kernel memory before its
/// outbox began to fill: 1,000 of them are past this machine's `tcp_mem` limit (2.2 GiB),
/// where every socket on the machine is squeezed. With 1,460 B it is about 50 KB, as over a
/// real network.
const STALLED_MSS: u32 = 1460;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the last publish the tool waits for deliveries still in flight.
const DRAIN: Duration = Duration::from_secs(3);
/// A filler's message: well under the server's default `--max-message-bytes` (64 KiB), large
/// enough that a stalled client's kernel buffers fill in a few messages.
const FILL_MESSAGE_BYTES: usize = 16 * 1024;
/// Messages a filler sends in its first step before it looks at the kernel's queues; each
/// step that was not enough doubles the next, up to `MAX_FILL_STEP`. A room is overfilled by
/// at most one step past the point where it became backlogged.
const FILL_STEP: u64 = 2;
const MAX_FILL_STEP: u64 = 32;
/// Fill sent into one stalled room, at most; reaching it means the kernel kept taking bytes
/// far beyond what its buffers should hold, and the set-up fails.
const MAX_FILL_BYTES: u64 = 64 * 1024 * 1024;
/// How long filling the stalled rooms may take.
const FILL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the fill is checked against the kernel's queues, and how long a room's last
/// echo must be past before its queues count: the server retries a backlogged client every
/// 10 ms, so by then it has sent whatever the kernel would take.
const FILL_SCAN: Duration = Duration::from_millis(50);
/// Sampling interval of the server's RSS while hoarders press on it (`VmHWM` catches the
/// peaks between samples).
const RSS_SAMPLE: Duration = Duration::from_millis(50);
/// Pause between polls of the rooms API while a room empties.
const LEAVE_POLL: Duration = Duration::from_millis(2);
/// How long a room may take to empty after its clients left.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server may take to let a newcomer in and relay its message.
const NEWCOMER_TIMEOUT: Duration = Duration::from_secs(10);
/// Every step of one HTTP request (connect, write, each read).
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of an HTTP response read, at most (the metrics page is a few KiB).
const MAX_HTTP_RESPONSE: u64 = 1024 * 1024;

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
    /// Rooms the `stalled` scenario spreads its stalled clients over (one filler each).
    stalled_rooms: usize,
    /// Messages a hoarder may send at once before `rate` paces it (the server's `--burst`).
    burst: f64,
    /// Whether a hoarder that was evicted is replaced, to keep `clients` hoarders connected.
    reconnect: bool,
    /// How the `leave` scenario's clients disconnect.
    leave_mode: LeaveMode,
    /// Every client speaks `roomcast.v1` (`--v1`): it offers the subprotocol, reads its
    /// `welcome`, publishes `{"type":"publish","data":...}` and reads `message` frames.
    v1: bool,
    /// The server's join-token secret (`--token-secret` or `ROOMCAST_TOKEN_SECRET`): every
    /// client then joins with a token of its own, plain clients too (PROTOCOL §2).
    token_secret: Option<Vec<u8>>,
    /// What the tool's room `n` is called on the server: `<room_prefix><n>`. `room` for every
    /// scenario but `stream`, whose one room must be fresh (its reaction totals count from
    /// the room's first join), so it gets a name of its own per run.
    room_prefix: String,
    /// The `stream` scenario's workload (`--chatters`, `--tappers`, ...).
    stream: StreamArgs,
}

/// The `stream` scenario: one room of `--viewers` (`clients`), among them `chatters` who
/// publish `chat_rate` messages a second between them and `tappers` who send `tap_rate`
/// reactions a second between them, each spread evenly over time.
#[derive(Clone, Debug, PartialEq)]
struct StreamArgs {
    chatters: usize,
    /// Chat messages per second, all chatters together.
    chat_rate: f64,
    tappers: usize,
    /// Reaction taps per second, all tappers together.
    tap_rate: f64,
    /// The reaction keys, tapped in turn (`--keys`, comma-separated).
    keys: Vec<String>,
    /// `--relayed`: the workload as the plain alternative, every tap a plain text message
    /// relayed to every viewer (as the demo page did before roomcast.v1), instead of v1 reactions.
    relayed: bool,
    /// The server's per-user reaction rate (its `--reaction-rate`): a tapper above it would
    /// have taps dropped, and the totals could not be exact.
    reaction_rate: f64,
    /// The server's `--reaction-interval`: how often at most it pushes a room's totals, so
    /// the last ones arrive within twice that after the last tap.
    reaction_interval: Duration,
}

impl Default for StreamArgs {
    fn default() -> StreamArgs {
        StreamArgs {
            chatters: 100,
            chat_rate: 50.0,
            tappers: 200,
            tap_rate: 2000.0,
            keys: ["❤️", "👏", "😂"].map(String::from).to_vec(),
            relayed: false,
            reaction_rate: SERVER_REACTION_RATE,
            reaction_interval: SERVER_REACTION_INTERVAL,
        }
    }
}

/// How a client leaves: a close handshake, a FIN without a close frame, or an RST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeaveMode {
    Close,
    Fin,
    Rst,
}

impl LeaveMode {
    fn name(self) -> &'static str {
        match self {
            LeaveMode::Close => "close",
            LeaveMode::Fin => "fin",
            LeaveMode::Rst => "rst",
        }
    }
}

/// The largest `--size` of the scenarios that check every delivered byte: their payloads are
/// generated per message, and a delivery is read into a 64 KiB scratch buffer.
const MAX_CHECKED_SIZE: usize = 60_000;
/// The largest `--size` of `hoard`, whose one frame is built once and never read back: far
/// above any sensible `--max-message-bytes`, so the tool never caps what the server allows.
const MAX_HOARD_SIZE: usize = 16 * 1024 * 1024;

/// The server's default `--reaction-rate` (PROTOCOL §3): taps a second per user.
const SERVER_REACTION_RATE: f64 = 20.0;
/// The server's default `--reaction-interval` (PROTOCOL §4).
const SERVER_REACTION_INTERVAL: Duration = Duration::from_millis(250);
/// What the `stream` scenario allows beyond twice the reaction interval for the last totals
/// to reach every viewer: the broadcaster's tick and one fan-out to a large room.
const SETTLE_MARGIN: Duration = Duration::from_millis(500);
/// Most distinct reaction keys a room counts (PROTOCOL §3).
const MAX_ROOM_KEYS: usize = 64;

/// The scenario and its flags from `args` (the command line after the program's name);
/// `token_secret` is `ROOMCAST_TOKEN_SECRET`'s value, which `--token-secret` overrides.
fn parse_args(
    args: impl IntoIterator<Item = String>,
    token_secret: Option<Vec<u8>>,
) -> Result<Args, String> {
    let mut it = args.into_iter();
    let scenario = it
        .next()
        .ok_or("usage: load SCENARIO [--flag value]... [--v1] (capacity, fanout, slow, churn, rooms, stalled, hoard, leave, stream)")?;
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
        stalled_rooms: 10,
        burst: 0.0,
        reconnect: true,
        leave_mode: LeaveMode::Rst,
        v1: false,
        token_secret: token_secret.filter(|secret| !secret.is_empty()),
        room_prefix: "room".into(),
        stream: StreamArgs::default(),
    };
    let is_stream = args.scenario == "stream";
    if is_stream {
        args.clients = 10_000;
        args.duration = Duration::from_secs(20);
    }
    while let Some(flag) = it.next() {
        // The two switches: every other flag takes a value.
        if flag == "--v1" {
            args.v1 = true;
            continue;
        }
        if flag == "--relayed" {
            args.stream.relayed = true;
            continue;
        }
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
            "--stalled-rooms" => args.stalled_rooms = value.parse().map_err(bad)?,
            "--burst" => args.burst = value.parse().map_err(|_| format!("bad --burst {value}"))?,
            "--reconnect" => {
                args.reconnect = match value.as_str() {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(format!("--reconnect takes yes or no, not {value}")),
                }
            }
            "--mode" => {
                args.leave_mode = match value.as_str() {
                    "close" => LeaveMode::Close,
                    "fin" => LeaveMode::Fin,
                    "rst" => LeaveMode::Rst,
                    _ => return Err(format!("--mode takes close, fin or rst, not {value}")),
                }
            }
            "--token-secret" => args.token_secret = Some(value.into_bytes()),
            "--viewers" => args.clients = value.parse().map_err(bad)?,
            "--chatters" => args.stream.chatters = value.parse().map_err(bad)?,
            "--chat-rate" => args.stream.chat_rate = parse_rate(&flag, &value)?,
            "--tappers" => args.stream.tappers = value.parse().map_err(bad)?,
            "--tap-rate" => args.stream.tap_rate = parse_rate(&flag, &value)?,
            "--keys" => args.stream.keys = value.split(',').map(String::from).collect(),
            "--reaction-rate" => args.stream.reaction_rate = parse_rate(&flag, &value)?,
            // In the server's own syntax (`250ms`, `1s`), as its flag of the same name takes it.
            "--reaction-interval" => {
                let range = Duration::from_millis(1)..=Duration::from_secs(3600);
                args.stream.reaction_interval =
                    roomcast::config::parse_duration(&flag, &value, &range)
                        .map_err(|e| e.to_string())?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if is_stream {
        check_stream(&mut args)?;
    } else if args.stream != StreamArgs::default() {
        return Err(
            "--relayed, --chatters, --tappers, --keys and their rates are for stream".into(),
        );
    }
    let max_size = if args.scenario == "hoard" {
        MAX_HOARD_SIZE
    } else {
        MAX_CHECKED_SIZE
    };
    // A v1 message's `data` is a string of `--size` characters ending in its header.
    let min_size = if args.v1 { V1_TRAILER } else { HEADER };
    if args.size < min_size || args.size > max_size {
        return Err(format!(
            "--size must be between {min_size} and {max_size} for {}{}",
            args.scenario,
            if args.v1 { " with --v1" } else { "" }
        ));
    }
    if args.scenario == "hoard" {
        // Each hoarder is alone in its room.
        args.rooms = args.clients;
    }
    if args.rooms == 0 || args.clients < args.rooms {
        return Err("need at least one client per room".into());
    }
    if args.scenario == "stalled" && args.stalled > 0 && args.stalled_rooms == 0 {
        return Err("--stalled-rooms must be at least 1".into());
    }
    if !args.addr.ip().is_loopback() {
        return Err("the load tool targets loopback addresses only".into());
    }
    Ok(args)
}

/// A rate flag's value: a finite number of events a second, 0 or more.
fn parse_rate(flag: &str, value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|rate| rate.is_finite() && *rate >= 0.0)
        .ok_or(format!("bad value for {flag}: {value}"))
}

/// The `stream` scenario's flags, checked against each other and against the server's
/// reaction bucket; v1 unless `--relayed`.
fn check_stream(args: &mut Args) -> Result<(), String> {
    let stream = &args.stream;
    if args.v1 && stream.relayed {
        return Err("stream runs on roomcast.v1 unless --relayed: not both".into());
    }
    args.v1 = !stream.relayed;
    if stream.chatters + stream.tappers > args.clients {
        return Err(format!(
            "--chatters {} and --tappers {} are among the --viewers {}: too many",
            stream.chatters, stream.tappers, args.clients
        ));
    }
    if stream.chat_rate > 0.0 && stream.chatters == 0 {
        return Err("--chat-rate needs --chatters".into());
    }
    if stream.tap_rate > 0.0 && stream.tappers == 0 {
        return Err("--tap-rate needs --tappers".into());
    }
    let keys = &stream.keys;
    if keys.is_empty() || keys.len() > MAX_ROOM_KEYS {
        return Err(format!("--keys takes 1 to {MAX_ROOM_KEYS} keys"));
    }
    if let Some(key) = keys
        .iter()
        .find(|k| !(1..=roomcast::v1::codec::MAX_REACTION_KEY_BYTES).contains(&k.len()))
    {
        return Err(format!("--keys: {key:?} is not 1-32 bytes"));
    }
    if (1..keys.len()).any(|i| keys[..i].contains(&keys[i])) {
        return Err("--keys: a key is listed twice".into());
    }
    // Every viewer is a user of its own (open mode, or a token with its own `sub`), so each
    // tapper has the whole per-user bucket to itself; taps beyond it would be dropped.
    let per_tapper = stream.tap_rate / stream.tappers.max(1) as f64;
    if !stream.relayed && per_tapper > stream.reaction_rate {
        return Err(format!(
            "{per_tapper:.1} taps/s per tapper is over the server's per-user reaction rate \
             ({}/s): add --tappers, or raise the server's --reaction-rate and pass the same \
             --reaction-rate here",
            stream.reaction_rate
        ));
    }
    Ok(())
}

impl Args {
    /// The server's name of the tool's room `room`.
    fn room_name(&self, room: usize) -> String {
        format!("{}{room}", self.room_prefix)
    }
}

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Receiver,
    /// Receives too; `id` indexes the publisher tables.
    Publisher(usize),
    /// Never reads after the handshake (slow and stalled scenarios).
    Stalled,
    /// Sends fill messages into a stalled room and reads (and discards) their echoes.
    Filler,
    /// Sends large messages and never reads after the handshake (hoard scenario).
    Hoarder,
    /// Connects, leaves by its `LeaveMode`, reconnects (churn scenario).
    Churner(LeaveMode),
    /// Receives too, and taps reactions; `id` indexes the tapper table (stream scenario).
    Tapper(usize),
}

impl Role {
    /// A member of its room that receives everything relayed there: what deliveries are
    /// owed to.
    fn is_member(self) -> bool {
        matches!(self, Role::Receiver | Role::Publisher(_) | Role::Tapper(_))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshaking,
    /// `--v1`: upgraded, waiting for the `welcome` that opens every v1 session. The client is
    /// not counted as a member before it: the server relays nothing to it until then.
    Welcoming,
    Open,
    Closing,
}

impl Phase {
    /// Not yet open: the handshake (or the welcome) is still to come, and may time out.
    fn is_connecting(self) -> bool {
        matches!(self, Phase::Handshaking | Phase::Welcoming)
    }
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
    /// When the `101` arrived.
    open_since: Option<Instant>,
    /// Bytes of the shared hoard frame still to write (hoarders; after `wbuf`).
    hoard_pending: usize,
    /// Hoard frames started by this hoarder, for its rate.
    hoard_sent: u64,
    /// `--v1`: the room's `seq` of the last message this client got (its `welcome`'s at
    /// first). A room numbers its messages in the one order every member sees, so each must
    /// be above the last.
    room_seq: u64,
    /// The `sub` of its join token (`--token-secret`), which its `welcome` must name.
    user: Option<String>,
    /// What a viewer of the stream scenario has seen of reactions and presence.
    viewer: Viewer,
}

/// A stream viewer's reaction and presence state. Empty (and untouched) in other scenarios.
#[derive(Debug, Default)]
struct Viewer {
    /// Per key of `--keys`: with v1, the last totals the server pushed (or its welcome
    /// held); with `--relayed`, the taps relayed to this viewer.
    totals: Vec<u64>,
    /// `reactions` frames received.
    reaction_frames: u32,
    /// `presence` frames received, and the last counts (`clients`, `users`) they or the
    /// welcome gave.
    presence_frames: u32,
    presence: Option<(u64, u64)>,
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
    /// Fill progress of the stalled scenario's rooms, indexed by room.
    fill: BTreeMap<usize, FillRoom>,
    /// The one frame every hoarder sends, built once (hoard scenario).
    hoard_frame: Vec<u8>,
    /// Hoarders the server closed or reset (hoard scenario).
    hoarders_evicted: u64,
    /// Hoard frames started, by every hoarder there has been (hoard scenario).
    hoard_messages: u64,
    /// Join tokens minted so far (`--token-secret`): the next client's `sub` is `load-<this>`.
    tokens_minted: u64,
    /// The stream scenario runs: viewers keep reaction totals and presence.
    is_stream: bool,
    /// Stream scenario: the tappers, by tapper id.
    tappers: Vec<Token>,
    /// Stream scenario: the text of a tap per key of `--keys`, a v1 `react` frame, or with
    /// `--relayed` the plain `reaction` message (which viewers receive verbatim).
    tap_payloads: Vec<Vec<u8>>,
    /// Stream scenario: taps sent, per key.
    taps_sent: Vec<u64>,
    /// `--relayed`: taps relayed to viewers, all viewers together.
    tap_deliveries: u64,
    /// The totals of the `reactions` frame being read, reused across frames.
    totals_scratch: Vec<u64>,
    /// Bytes read from the server on every connection (the stream scenario's wire cost per
    /// viewer: what a viewer's network and page take in).
    bytes_read: u64,
}

/// A stalled room's filler: what it sent into the room, and what came back to it. The
/// server relays a message to every member in one fan-out, so once the filler has its own
/// echo of a message, every stalled member's outbox has had that message queued too.
#[derive(Debug)]
struct FillRoom {
    filler: Token,
    sent: u64,
    echoed: u64,
    /// Bytes of the server frames of those echoes, which every stalled member was sent too
    /// (a v1 `message` frame is larger than the fill message it carries).
    echoed_bytes: u64,
    /// Bytes of the last echo's server frame: one more message's worth.
    echo_frame_bytes: u64,
    last_echo: Instant,
    /// Messages in the next step.
    step: u64,
    /// The last step's queues have been looked at (and were not enough).
    is_checked: bool,
    /// Every stalled member holds at least one fill message in the server's outbox.
    is_backlogged: bool,
}

impl FillRoom {
    /// The filler got its own echo of a fill message, a `payload`-byte server frame.
    fn echo(&mut self, payload: usize) {
        self.echoed += 1;
        self.echoed_bytes += server_frame_len(payload);
        self.echo_frame_bytes = server_frame_len(payload);
        self.last_echo = Instant::now();
    }
}

fn main() {
    let token_secret =
        std::env::var_os("ROOMCAST_TOKEN_SECRET").map(|secret| secret.into_encoded_bytes());
    let args = match parse_args(std::env::args().skip(1), token_secret) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("load: {err}");
            std::process::exit(2);
        }
    };
    let mut args = args;
    if args.scenario == "stream" {
        args.room_prefix = fresh_room_prefix();
    }
    let mut load = Load::new(args.clone()).expect("epoll");
    let ok = match args.scenario.as_str() {
        "capacity" => load.capacity(),
        "fanout" | "slow" | "rooms" | "stalled" => load.fanout(),
        "churn" => load.churn(),
        "hoard" => load.hoard(),
        "leave" => load.leave_all(),
        "stream" => load.stream(),
        other => {
            eprintln!("load: unknown scenario {other}");
            std::process::exit(2);
        }
    };
    std::process::exit(if ok { 0 } else { 1 });
}

impl Load {
    fn new(args: Args) -> io::Result<Load> {
        let is_stream = args.scenario == "stream";
        let keys = if is_stream { args.stream.keys.len() } else { 0 };
        let tap_payloads = args.stream.keys[..keys]
            .iter()
            .map(|key| tap_payload(key, args.stream.relayed))
            .collect();
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
            fill: BTreeMap::new(),
            hoard_frame: Vec::new(),
            hoarders_evicted: 0,
            hoard_messages: 0,
            tokens_minted: 0,
            is_stream,
            tappers: Vec::new(),
            tap_payloads,
            taps_sent: vec![0; keys],
            tap_deliveries: 0,
            totals_scratch: Vec::new(),
            bytes_read: 0,
        })
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    // ---- connections -------------------------------------------------------------------

    /// Starts a connection and its handshake; failures are tallied by kind.
    fn open(&mut self, room: usize, role: Role) -> Option<Token> {
        let stream = match connect(self.args.addr, role == Role::Stalled) {
            Ok(stream) => stream,
            Err(e) => {
                self.tally.fail(error_kind(&e));
                return None;
            }
        };
        let _ = stream.set_nodelay(true);
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
        // Without a token and `--v1` both are empty: the plain request, byte for byte.
        let (query, user) = match self.join_token(room) {
            Some((token, user)) => (format!("?token={token}"), Some(user)),
            None => (String::new(), None),
        };
        let protocol = if self.args.v1 {
            "Sec-WebSocket-Protocol: roomcast.v1\r\n"
        } else {
            ""
        };
        let request = format!(
            "GET /ws/{}{room}{query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{protocol}\r\n",
            self.args.room_prefix, self.args.addr
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
            open_since: None,
            hoard_pending: 0,
            hoard_sent: 0,
            room_seq: 0,
            user,
            viewer: Viewer {
                totals: vec![0; self.taps_sent.len()],
                ..Viewer::default()
            },
        });
        Some(token)
    }

    /// A join token for the next client of `room` and its `sub` (`load-<n>`, a user of its
    /// own, so the server's per-user rate limit and connection cap see one connection each),
    /// valid for an hour; `None` without `--token-secret`.
    fn join_token(&mut self, room: usize) -> Option<(String, String)> {
        let secret = self.args.token_secret.as_deref()?;
        let user = format!("load-{}", self.tokens_minted);
        self.tokens_minted += 1;
        let claims = join_claims(
            &user,
            &self.args.room_name(room),
            std::time::SystemTime::now(),
        );
        Some((roomcast::v1::token::mint(secret, &claims), user))
    }

    fn close(&mut self, token: Token, rst: bool) {
        if let Some(mut conn) = self.conns[token.0].take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            if rst {
                let _ = socket2::SockRef::from(&conn.stream).set_linger(Some(Duration::ZERO));
            }
            if conn.phase == Phase::Open && conn.role.is_member() {
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
                    .filter(|c| c.phase.is_connecting() && c.started.elapsed() > HANDSHAKE_TIMEOUT)
                    .map(|_| Token(i))
            })
            .collect();
        for token in stale {
            self.tally.fail("timeout");
            self.close(token, false);
        }
    }

    /// Writes what is queued: `wbuf`, then (hoarders) the rest of the shared hoard frame.
    fn flush(&mut self, token: Token) {
        let Some(conn) = self.conns[token.0].as_mut() else {
            return;
        };
        loop {
            let unsent = if !conn.wbuf.is_empty() {
                &conn.wbuf[..]
            } else if conn.hoard_pending > 0 {
                &self.hoard_frame[self.hoard_frame.len() - conn.hoard_pending..]
            } else {
                break;
            };
            match conn.stream.write(unsent) {
                Ok(0) => break,
                Ok(n) if !conn.wbuf.is_empty() => {
                    conn.wbuf.drain(..n);
                }
                Ok(n) => conn.hoard_pending -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break, // connect in progress
                Err(e) => {
                    let kind = error_kind(&e);
                    match (conn.phase, conn.role) {
                        (Phase::Handshaking | Phase::Welcoming, _) => self.tally.fail(kind),
                        // The server reset a hoarder it evicted.
                        (Phase::Open, Role::Hoarder) => self.hoarders_evicted += 1,
                        _ => {}
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
        client_frame(&mut conn.wbuf, opcode, payload);
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
            if matches!(conn.role, Role::Stalled | Role::Hoarder) && conn.phase == Phase::Open {
                // Never read: only notice the server closing the socket (its eviction), which
                // epoll reports even while unread data sits in the buffer.
                if peer_closed && conn.evicted_at.is_none() {
                    conn.evicted_at = Some(self.start.elapsed());
                    if conn.role == Role::Hoarder {
                        // Its slot (and room) goes to a replacement, if there is to be one.
                        self.hoarders_evicted += 1;
                        self.close(token, false);
                    }
                }
                return;
            }
            match conn.stream.read(buf) {
                Ok(0) => {
                    if conn.phase.is_connecting() {
                        self.tally.fail("closed during handshake");
                    }
                    self.close(token, false);
                    return;
                }
                Ok(n) => {
                    conn.rbuf.extend_from_slice(&buf[..n]);
                    self.bytes_read += n as u64;
                    self.process(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    if conn.phase.is_connecting() {
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
                // A v1 session opens with its welcome, among the frames below.
                Some("101") if self.args.v1 => {
                    if !names_v1(&head) {
                        self.tally
                            .fail("101 without Sec-WebSocket-Protocol: roomcast.v1");
                        self.close(token, false);
                        return;
                    }
                    conn.phase = Phase::Welcoming;
                }
                Some("101") => {
                    if !self.opened(token) {
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
        let (role, room) = (conn.role, conn.room);
        let v1 = self.args.v1;
        let relayed = self.args.stream.relayed;
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
                opcode @ (0x1 | 0x2) if v1 => {
                    self.receive_v1(token, opcode, payload);
                    if self.conns[token.0].is_none() {
                        // Closed over what it got (or a churner that left on its welcome).
                        ended = true;
                        break;
                    }
                }
                0x1 | 0x2 if role == Role::Filler => {
                    if let Some(fill) = self.fill.get_mut(&room) {
                        fill.echo(payload.len());
                    }
                }
                // `stream --relayed`: the taps, the only text messages the tool relays.
                0x1 if relayed => self.receive_tap(token, payload),
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

    /// A connection has opened: upgraded (plain) or welcomed (`--v1`). False when it was a
    /// churner, which leaves at once.
    fn opened(&mut self, token: Token) -> bool {
        let Some(conn) = self.conns[token.0].as_mut() else {
            return false;
        };
        conn.phase = Phase::Open;
        conn.open_since = Some(Instant::now());
        self.tally.upgraded += 1;
        if conn.role.is_member() {
            self.members[conn.room] += 1;
        }
        if let Role::Churner(mode) = conn.role {
            self.leave(token, mode);
            return false;
        }
        true
    }

    /// Handles one data frame from the server to a v1 client: its welcome first, then
    /// `message` frames (checked like plain deliveries, plus the room's order by `seq`),
    /// presence and reaction counts (kept by stream viewers, skipped by other scenarios).
    /// Anything else is a failure by its kind, and a welcome that is missing or wrong closes
    /// the client.
    fn receive_v1(&mut self, token: Token, opcode: u8, payload: &[u8]) {
        let Some(conn) = self.conns[token.0].as_mut() else {
            return;
        };
        if opcode != 0x1 {
            // PROTOCOL §1: one JSON object per text frame.
            self.tally.fail("binary frame to a v1 client");
            return;
        }
        if conn.phase == Phase::Welcoming {
            match check_welcome(
                payload,
                &self.args.room_name(conn.room),
                conn.user.as_deref(),
            ) {
                Ok(welcome) => {
                    conn.room_seq = welcome.seq;
                    if self.is_stream {
                        conn.viewer.presence = welcome.presence;
                        let keys = &self.args.stream.keys;
                        for (key, count) in &welcome.reactions {
                            match keys.iter().position(|k| k == key) {
                                Some(i) => conn.viewer.totals[i] = *count,
                                None => self.tally.fail("a reaction key the tool never tapped"),
                            }
                        }
                    }
                    self.opened(token);
                }
                Err(what) => {
                    self.tally.fail(format!("bad welcome: {what}"));
                    self.close(token, false);
                }
            }
            return;
        }
        if conn.role == Role::Filler {
            if payload.starts_with(V1_MESSAGE_PREFIX) {
                if let Some(fill) = self.fill.get_mut(&conn.room) {
                    fill.echo(payload.len());
                }
            }
            return;
        }
        match v1_frame(payload) {
            V1Frame::Message(message) => {
                if message.seq <= conn.room_seq {
                    self.tally.reordered += 1;
                }
                conn.room_seq = conn.room_seq.max(message.seq);
                let Some(header) = message.header else {
                    self.tally.corrupted += 1;
                    return;
                };
                self.tally.received += 1;
                let publisher = header.publisher as usize;
                if !v1_pattern_ok(message.pattern, header.seq) || publisher >= self.publishers.len()
                {
                    self.tally.corrupted += 1;
                    return;
                }
                self.deliver(token, header.sent_ns, publisher, header.seq);
            }
            V1Frame::Presence { clients, users } => {
                conn.viewer.presence_frames += 1;
                conn.viewer.presence = Some((clients, users));
            }
            V1Frame::Reactions(totals) if self.is_stream => self.take_totals(token, totals),
            V1Frame::Reactions(_) => {}
            V1Frame::Other => self.tally.fail(unexpected_v1_frame(payload)),
        }
    }

    /// A stream viewer got a `reactions` frame: its totals replace the last ones. Totals run
    /// since the room's epoch began, so none may fall, and every key must be one the tool
    /// taps.
    fn take_totals(&mut self, token: Token, object: &[u8]) {
        let Load {
            args,
            conns,
            tally,
            totals_scratch: fresh,
            ..
        } = self;
        let Some(conn) = conns[token.0].as_mut() else {
            return;
        };
        fresh.clear();
        fresh.resize(args.stream.keys.len(), 0);
        let mut unknown = false;
        let read = read_totals(object, |key, count| {
            match args.stream.keys.iter().position(|k| k.as_bytes() == key) {
                Some(i) => fresh[i] = count,
                None => unknown = true,
            }
        });
        if read.is_none() {
            tally.fail("a reactions frame in an unknown layout");
            return;
        }
        if unknown {
            tally.fail("a reaction key the tool never tapped");
        }
        if fresh
            .iter()
            .zip(&conn.viewer.totals)
            .any(|(new, old)| new < old)
        {
            tally.fail("reaction totals went down");
        }
        conn.viewer.totals.copy_from_slice(fresh);
        conn.viewer.reaction_frames += 1;
    }

    /// `--relayed`: a stream viewer got a plain text message, which must be one of the
    /// tool's taps, relayed verbatim.
    fn receive_tap(&mut self, token: Token, payload: &[u8]) {
        let Some(conn) = self.conns[token.0].as_mut() else {
            return;
        };
        match self.tap_payloads.iter().position(|tap| tap == payload) {
            Some(key) => {
                conn.viewer.totals[key] += 1;
                self.tap_deliveries += 1;
            }
            None => self.tally.corrupted += 1,
        }
    }

    /// Checks one delivered message: order, loss, corruption, latency.
    fn receive(&mut self, token: Token, payload: &[u8]) {
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
        self.deliver(token, sent_ns, publisher, seq);
    }

    /// Records an intact delivery of message `seq` of `publisher`, sent at `sent_ns`: its
    /// latency, and loss or reordering by the publisher's sequence.
    #[inline]
    fn deliver(&mut self, token: Token, sent_ns: u64, publisher: usize, seq: u64) {
        let now = self.batch_ns;
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
        self.publish_sized(publisher, self.args.size);
    }

    fn publish_sized(&mut self, publisher: usize, size: usize) {
        let (token, seq) = {
            let p = &mut self.publishers[publisher];
            p.sent += 1;
            p.in_flight += 1;
            (p.token, p.sent - 1)
        };
        if self.args.v1 {
            let header = V1Header {
                sent_ns: self.now_ns(),
                publisher: publisher as u32,
                seq,
            };
            let frame = v1_publish(size, Some(header));
            self.send_frame(token, 0x1, &frame);
            return;
        }
        let mut payload = Vec::with_capacity(size);
        payload.extend_from_slice(&self.now_ns().to_be_bytes());
        payload.extend_from_slice(&(publisher as u32).to_be_bytes());
        payload.extend_from_slice(&seq.to_be_bytes());
        payload.extend((0..size - HEADER).map(|i| pattern_byte(seq, i)));
        self.send_frame(token, 0x2, &payload);
    }

    /// A client leaves: a clean close handshake, a FIN without a close frame, or an RST.
    fn leave(&mut self, token: Token, mode: LeaveMode) {
        match mode {
            LeaveMode::Close => {
                if let Some(conn) = self.conns[token.0].as_mut() {
                    conn.phase = Phase::Closing;
                }
                self.send_frame(token, 0x8, &1000u16.to_be_bytes());
            }
            LeaveMode::Fin => {
                if let Some(conn) = self.conns[token.0].as_ref() {
                    let _ = conn.stream.shutdown(Shutdown::Write);
                }
                self.close(token, false);
            }
            LeaveMode::Rst => self.close(token, true),
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
            .filter(|c| c.phase.is_connecting())
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
        let beside = args.scenario == "stalled" && args.stalled > 0;
        if beside && !self.stall_beside(&mut events) {
            println!("RESULT scenario=stalled setup_failed=1");
            return false;
        }
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
        let measured = |c: &Conn| c.role.is_member();
        if self.publishers.len() != publishers || self.open_count(measured) != args.clients {
            println!(
                "load: only {} of {} clients connected: {:?}",
                self.open_count(measured),
                args.clients,
                self.tally.failures
            );
            println!("RESULT scenario={} failed_to_connect=1", args.scenario);
            return false;
        }
        if args.stalled > 0 && args.scenario != "stalled" {
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
        let mut stalled_kept = true;
        if args.scenario == "stalled" {
            let queues = socket_queues();
            let stalled: Vec<&Conn> = self
                .conns
                .iter()
                .flatten()
                .filter(|c| c.role == Role::Stalled)
                .collect();
            let connected = stalled.iter().filter(|c| c.evicted_at.is_none()).count();
            let backlogged = stalled
                .iter()
                .filter(|c| c.evicted_at.is_none())
                .filter(|c| self.stalled_outbox_estimate(c, &queues) > 0)
                .count();
            stalled_kept = connected == args.stalled;
            println!(
                "stalled clients beside: {connected} of {} still connected, {backlogged} still backlogged{}",
                args.stalled,
                if stalled_kept {
                    ""
                } else {
                    " (WARNING: the server evicted some during the run; raise its --slow-timeout and --outbox-bytes)"
                }
            );
            extra += &format!(
                " stalled={} stalled_rooms={} stalled_connected={connected} stalled_backlogged={backlogged}",
                args.stalled,
                if args.stalled > 0 { args.stalled_rooms.min(args.stalled) } else { 0 }
            );
        } else if args.stalled > 0 {
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
        lost == 0
            && self.tally.reordered == 0
            && self.tally.corrupted == 0
            && evicted_all
            && stalled_kept
    }

    /// The `stalled` scenario's set-up: `--stalled` clients that stop reading after the
    /// handshake, spread over `--stalled-rooms` rooms beside the measured ones, and in each of
    /// those rooms a filler that sends messages until every stalled member is backlogged:
    /// until the server holds bytes for it in its outbox, beyond what the kernel buffers on
    /// both ends of its connection took. Those clients are then retried by the server for the
    /// whole measurement. False when they cannot all be connected and backlogged.
    fn stall_beside(&mut self, events: &mut Events) -> bool {
        let args = self.args.clone();
        let rooms = args.stalled_rooms.min(args.stalled);
        let first_room = args.rooms;
        self.members.resize(first_room + rooms, 0);
        self.ramp(
            rooms + args.stalled,
            |i| {
                if i < rooms {
                    (first_room + i, Role::Filler)
                } else {
                    (first_room + (i - rooms) % rooms, Role::Stalled)
                }
            },
            events,
        );
        let fillers: Vec<(usize, Token)> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.as_ref()
                    .filter(|c| c.role == Role::Filler && c.phase == Phase::Open)
                    .map(|c| (c.room, Token(i)))
            })
            .collect();
        let stalled = self.open_count(|c| c.role == Role::Stalled);
        if fillers.len() != rooms || stalled != args.stalled {
            println!(
                "load: only {} of {rooms} fillers and {stalled} of {} stalled clients connected: {:?}",
                fillers.len(),
                args.stalled,
                self.tally.failures
            );
            return false;
        }
        let now = Instant::now();
        for (room, filler) in fillers {
            self.fill.insert(
                room,
                FillRoom {
                    filler,
                    sent: 0,
                    echoed: 0,
                    echoed_bytes: 0,
                    echo_frame_bytes: server_frame_len(FILL_MESSAGE_BYTES),
                    last_echo: now,
                    step: FILL_STEP,
                    is_checked: false,
                    is_backlogged: false,
                },
            );
        }
        // In steps: a few messages into each room not yet backlogged, then, once they have
        // all come back to the filler and settled, a look at the kernel's queues.
        let (fill_opcode, fill_message) = if args.v1 {
            (0x1, v1_publish(FILL_MESSAGE_BYTES, None))
        } else {
            (0x2, vec![0u8; FILL_MESSAGE_BYTES])
        };
        let started = Instant::now();
        let mut last_scan = started;
        while self.fill.values().any(|f| !f.is_backlogged) && started.elapsed() < FILL_TIMEOUT {
            for fill in self.fill.values_mut() {
                let can_step = !fill.is_backlogged
                    && fill.echoed == fill.sent
                    && (fill.sent == 0 || fill.is_checked)
                    && fill.sent * server_frame_len(FILL_MESSAGE_BYTES) < MAX_FILL_BYTES;
                if can_step {
                    if let Some(conn) = self.conns[fill.filler.0].as_mut() {
                        for _ in 0..fill.step {
                            client_frame(&mut conn.wbuf, fill_opcode, &fill_message);
                        }
                    }
                    fill.sent += fill.step;
                    fill.step = (fill.step * 2).min(MAX_FILL_STEP);
                    fill.is_checked = false;
                }
            }
            let fillers: Vec<Token> = self.fill.values().map(|f| f.filler).collect();
            for filler in fillers {
                self.flush(filler);
            }
            self.turn(events, Duration::from_millis(1));
            if last_scan.elapsed() < FILL_SCAN {
                continue;
            }
            last_scan = Instant::now();
            // A step has settled when all of it has come back to the filler a while ago: the
            // server has long since tried to send it to every member.
            let queues = socket_queues();
            let settled: Vec<usize> = self
                .fill
                .iter()
                .filter(|(_, f)| {
                    !f.is_backlogged
                        && !f.is_checked
                        && f.echoed == f.sent
                        && f.last_echo.elapsed() >= FILL_SCAN
                })
                .map(|(room, _)| *room)
                .collect();
            for room in settled {
                let least = self
                    .conns
                    .iter()
                    .flatten()
                    .filter(|c| c.role == Role::Stalled && c.room == room)
                    .map(|c| self.stalled_outbox_estimate(c, &queues))
                    .min()
                    .unwrap_or(0);
                if let Some(fill) = self.fill.get_mut(&room) {
                    fill.is_checked = true;
                    // A whole message beyond what the kernel holds: backlogged with margin.
                    fill.is_backlogged = least >= fill.echo_frame_bytes as i64;
                }
            }
        }
        let backlogged_rooms = self.fill.values().filter(|f| f.is_backlogged).count();
        let evicted = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.role == Role::Stalled && c.evicted_at.is_some())
            .count();
        // What the kernel holds for a stalled client: the bytes in its receive queue plus
        // those in the server's send queue.
        let queues = socket_queues();
        let held: Vec<(u64, u64)> = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.role == Role::Stalled)
            .filter_map(|c| stalled_queues(c, &queues))
            .collect();
        let n = held.len().max(1) as u64;
        let min_outbox = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.role == Role::Stalled)
            .map(|c| self.stalled_outbox_estimate(c, &queues))
            .min()
            .unwrap_or(0);
        let fill_bytes: Vec<u64> = self
            .fill
            .values()
            .map(|f| f.sent * server_frame_len(FILL_MESSAGE_BYTES))
            .collect();
        println!(
            "stalled: {} clients in {rooms} rooms, {}/{rooms} rooms backlogged in {:.1?}, {evicted} evicted; \
             each room took {}..{} B of fill; per client the kernel holds {} B received unread (max {}) \
             and {} B in the server's send queue (max {}); the server's outbox holds at least {min_outbox} B",
            args.stalled,
            backlogged_rooms,
            started.elapsed(),
            fill_bytes.iter().min().unwrap_or(&0),
            fill_bytes.iter().max().unwrap_or(&0),
            held.iter().map(|h| h.0).sum::<u64>() / n,
            held.iter().map(|h| h.0).max().unwrap_or(0),
            held.iter().map(|h| h.1).sum::<u64>() / n,
            held.iter().map(|h| h.1).max().unwrap_or(0),
        );
        backlogged_rooms == rooms && evicted == 0
    }

    /// Bytes the server still holds in its outbox for a stalled client: the fill relayed to
    /// its room (as far as the filler's echoes prove), less what is in the kernel's queues
    /// on both ends. Positive means backlogged; 0 or less means the kernel took everything.
    fn stalled_outbox_estimate(
        &self,
        conn: &Conn,
        queues: &HashMap<(SocketAddr, SocketAddr), (u64, u64)>,
    ) -> i64 {
        let Some(fill) = self.fill.get(&conn.room) else {
            return 0;
        };
        let Some((received, sending)) = stalled_queues(conn, queues) else {
            return 0;
        };
        fill.echoed_bytes as i64 - received as i64 - sending as i64
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
        let modes = [LeaveMode::Fin, LeaveMode::Rst, LeaveMode::Close];
        let mut opened = 0;
        while started.elapsed() < args.duration {
            while self.open_count(|c| matches!(c.role, Role::Churner(_))) + self.handshaking()
                < args.churners
            {
                self.open(1, Role::Churner(modes[opened % modes.len()]));
                opened += 1;
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
                .is_some_and(|c| c.phase.is_connecting())
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

    /// `hoard`: `--clients` clients, each alone in its room, send `--size` messages and never
    /// read, so every echo piles up in the sender's own outbox until the server evicts it.
    /// Each hoarder sends as fast as the server's rate limit allows when told that limit
    /// (`--rate`, `--burst`), or as fast as its socket takes (`--rate 0`). An evicted hoarder
    /// is replaced (`--reconnect yes`), so `--clients` of them press on the server for the
    /// whole `--duration`. Reports the server's peak memory per hoarder, and fails when the
    /// growth exceeds what the server's preflight assumed (if its metrics publish the figures):
    /// the queues once plus the per-client figure for each connection held at the peak.
    fn hoard(&mut self) -> bool {
        let mut events = Events::with_capacity(4096);
        let args = self.args.clone();
        let Some(pid) = args.pid else {
            println!("load: hoard measures the server's memory, so it needs --pid");
            println!("RESULT scenario=hoard no_pid=1");
            return false;
        };
        let addr = args.addr;
        let (baseline, baseline_threads) = server_usage(pid);
        let evictions_before = evictions(addr);
        // The preflight's two figures: per connection, and once for the shared queues.
        let gauges = http_get(addr, "/metrics").ok().map(|(_, text)| text);
        let gauge = |name: &str| gauges.as_deref().and_then(|text| metric(text, name));
        let budget = gauge("roomcast_memory_per_client_budget_bytes");
        let queues_budget = gauge("roomcast_memory_queues_budget_bytes").unwrap_or(0.0);
        if args.v1 {
            client_frame(&mut self.hoard_frame, 0x1, &v1_publish(args.size, None));
        } else {
            let payload: Vec<u8> = (0..args.size).map(|i| pattern_byte(0, i)).collect();
            client_frame(&mut self.hoard_frame, 0x2, &payload);
        }
        let frame_len = self.hoard_frame.len();
        let started = Instant::now();
        let mut opened = 0usize;
        let mut peak_rss = baseline;
        let mut peak_threads = baseline_threads;
        let mut last_sample = started;
        while started.elapsed() < args.duration {
            // Keep `--clients` hoarders, one per room: a room whose hoarder is gone is free.
            let mut in_use = vec![false; args.clients];
            for conn in self.conns.iter().flatten() {
                if conn.role == Role::Hoarder {
                    in_use[conn.room] = true;
                }
            }
            let allowed =
                args.clients + (started.elapsed().as_secs_f64() * args.connect_rate) as usize;
            for room in (0..args.clients).filter(|r| !in_use[*r]) {
                let may_open = opened
                    < allowed.min(if args.reconnect {
                        usize::MAX
                    } else {
                        args.clients
                    });
                if !may_open || self.handshaking() >= 256 {
                    break;
                }
                self.open(room, Role::Hoarder);
                opened += 1;
            }
            // Each hoarder starts its next message once the last is written, within its rate.
            let now = Instant::now();
            let ready: Vec<Token> = self
                .conns
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let c = c.as_ref()?;
                    let since = c.open_since?;
                    let may_send = args.rate == 0.0
                        || (c.hoard_sent as f64)
                            < args.burst + now.duration_since(since).as_secs_f64() * args.rate;
                    (c.role == Role::Hoarder
                        && c.phase == Phase::Open
                        && c.hoard_pending == 0
                        && c.wbuf.is_empty()
                        && may_send)
                        .then_some(Token(i))
                })
                .collect();
            for token in ready {
                if let Some(conn) = self.conns[token.0].as_mut() {
                    conn.hoard_pending = frame_len;
                    conn.hoard_sent += 1;
                    self.hoard_messages += 1;
                }
                self.flush(token);
            }
            self.turn(&mut events, Duration::from_micros(500));
            if last_sample.elapsed() >= RSS_SAMPLE {
                let (rss, threads) = server_usage(pid);
                peak_rss = peak_rss.max(rss);
                peak_threads = peak_threads.max(threads);
                last_sample = Instant::now();
            }
        }
        let hoarding = started.elapsed();
        peak_rss = peak_rss.max(server_usage(pid).0);
        let high_water = server_peak_rss(pid);
        let messages = self.hoard_messages;
        let hoarders: Vec<Token> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.role == Role::Hoarder))
            .map(|(i, _)| Token(i))
            .collect();
        for token in hoarders {
            self.close(token, true);
        }
        let connected = self.tally.upgraded;
        let newcomer = self.newcomer_relays(&mut events);
        let evicted_by_server: Vec<String> = evictions(addr)
            .iter()
            .map(|(reason, n)| {
                let before = evictions_before.get(reason).copied().unwrap_or(0.0);
                format!("{reason}:{}", n - before)
            })
            .collect();
        let per_client = high_water.saturating_sub(baseline) / args.clients as u64;
        // What the preflight assumed for this load: the queues once, plus its per-client
        // figure for every connection held at the peak (evicted hoarders still ending while
        // their replacements join count too: each holds a thread and its buffers).
        let peak_connections =
            (args.clients as u64).max(peak_threads.saturating_sub(baseline_threads));
        let assumed = budget.map(|b| queues_budget + b * peak_connections as f64);
        let within = assumed.map(|a| high_water.saturating_sub(baseline) as f64 <= a);
        let mib = |b: u64| b as f64 / 1048576.0;
        println!(
            "hoard: {} hoarders × {} B messages for {hoarding:.1?}: {connected} connections, {messages} messages started, \
             {} evictions seen, server evictions {{{}}}; failures {:?}; server threads peaked at {} more than before \
             (evicted connections still ending while their replacements join)",
            args.clients,
            args.size,
            self.hoarders_evicted,
            evicted_by_server.join(", "),
            self.tally.failures,
            peak_threads.saturating_sub(baseline_threads)
        );
        println!(
            "server memory: RSS {:.1} MiB before, {:.1} MiB peak sampled, {:.1} MiB high-water mark (VmHWM): \
             {:.1} KiB per hoarder; budget {}; a newcomer {}",
            mib(baseline),
            mib(peak_rss),
            mib(high_water),
            per_client as f64 / 1024.0,
            match (budget, within) {
                (Some(b), Some(true)) => format!(
                    "{:.1} MiB queues + {:.1} KiB per client × {peak_connections} connections at the peak = {:.1} MiB, kept",
                    queues_budget / 1048576.0, b / 1024.0, assumed.unwrap_or(0.0) / 1048576.0
                ),
                (Some(b), _) => format!(
                    "{:.1} MiB queues + {:.1} KiB per client × {peak_connections} connections at the peak = {:.1} MiB, EXCEEDED",
                    queues_budget / 1048576.0, b / 1024.0, assumed.unwrap_or(0.0) / 1048576.0
                ),
                (None, _) => "not published by the server (no roomcast_memory_per_client_budget_bytes)".into(),
            },
            if newcomer { "was relayed to" } else { "was NOT relayed to" }
        );
        println!(
            "RESULT scenario=hoard clients={} size={} connections={connected} messages={messages} evictions_seen={} \
             server_evictions={} baseline_rss_mib={:.1} peak_rss_mib={:.1} hwm_mib={:.1} per_client_peak_kib={:.1} \
             budget_kib={} assumed_mib={} within_budget={} newcomer={} peak_extra_threads={}",
            args.clients,
            args.size,
            self.hoarders_evicted,
            evicted_by_server.join(","),
            mib(baseline),
            mib(peak_rss),
            mib(high_water),
            per_client as f64 / 1024.0,
            budget.map_or("none".into(), |b| format!("{:.1}", b / 1024.0)),
            assumed.map_or("none".into(), |a| format!("{:.1}", a / 1048576.0)),
            within.map_or("unknown", |w| if w { "yes" } else { "no" }),
            if newcomer { "ok" } else { "failed" },
            peak_threads.saturating_sub(baseline_threads)
        );
        connected >= args.clients as u64 && newcomer && within != Some(false)
    }

    /// `leave`: `--clients` clients join one room, then all leave at once by `--mode`.
    /// Reports the time from the first leave until the server's rooms API says the room is
    /// empty, polled on a fresh connection every few milliseconds, and the server's CPU time
    /// in that window (with `--pid`).
    fn leave_all(&mut self) -> bool {
        let mut events = Events::with_capacity(4096);
        let args = self.args.clone();
        self.ramp(args.clients, |_| (0, Role::Receiver), &mut events);
        let joined = self.open_count(|c| c.role == Role::Receiver);
        let counted = room_clients(args.addr, &args.room_name(0));
        if joined != args.clients || counted.as_ref().ok() != Some(&(joined as u64)) {
            println!(
                "load: {joined} of {} clients joined, the server counts {counted:?}: {:?}",
                args.clients, self.tally.failures
            );
            println!("RESULT scenario=leave failed_to_connect=1");
            return false;
        }
        let members: Vec<Token> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.role == Role::Receiver))
            .map(|(i, _)| Token(i))
            .collect();
        let cpu_before = args.pid.map(cpu_time);
        let started = Instant::now();
        for token in members {
            self.leave(token, args.leave_mode);
        }
        let issued = started.elapsed();
        let mut polls = 0u64;
        let mut remaining = joined as u64;
        // How long the last poll took: the room emptied at most this long before it answered.
        let mut poll_took;
        let emptied = loop {
            // Services the close replies (`--mode close`); otherwise just paces the polls.
            self.turn(&mut events, LEAVE_POLL);
            polls += 1;
            let asked = Instant::now();
            let answer = room_clients(args.addr, &args.room_name(0));
            poll_took = asked.elapsed();
            match answer {
                Ok(0) => break Some(started.elapsed()),
                Ok(n) => remaining = n,
                Err(e) => self.tally.fail(format!("poll: {}", error_kind(&e))),
            }
            if started.elapsed() > LEAVE_TIMEOUT {
                break None;
            }
        };
        let cpu = args
            .pid
            .zip(cpu_before)
            .map(|(pid, before)| cpu_time(pid).saturating_sub(before));
        let left: Vec<Token> = (0..self.conns.len())
            .filter(|i| self.conns[*i].is_some())
            .map(Token)
            .collect();
        for token in left {
            self.close(token, false);
        }
        let newcomer = self.newcomer_relays(&mut events);
        let cpu_ms = cpu.map_or("unknown".into(), |c| format!("{}", c.as_millis()));
        match emptied {
            Some(t) => println!(
                "leave: {joined} clients of one room left by {} in {issued:.1?}; the server's room was empty \
                 {t:.1?} after the first left ({polls} polls, the last took {poll_took:.1?}); server CPU {cpu_ms} ms; \
                 a newcomer {}",
                args.leave_mode.name(),
                if newcomer { "was relayed to" } else { "was NOT relayed to" }
            ),
            None => println!(
                "leave: {joined} clients left by {}, but the server still counted {remaining} after {LEAVE_TIMEOUT:?}",
                args.leave_mode.name()
            ),
        }
        println!(
            "RESULT scenario=leave clients={joined} mode={} issue_ms={:.1} empty_ms={} server_cpu_ms={cpu_ms} polls={polls} \
             last_poll_ms={:.1} failures={:?} newcomer={}",
            args.leave_mode.name(),
            issued.as_secs_f64() * 1e3,
            emptied.map_or("never".into(), |t| format!("{:.1}", t.as_secs_f64() * 1e3)),
            poll_took.as_secs_f64() * 1e3,
            self.tally.failures,
            if newcomer { "ok" } else { "failed" }
        );
        emptied.is_some() && newcomer
    }

    /// `stream`: one room of `--viewers`, the first `--chatters` of them publishing
    /// `--chat-rate` messages a second between them and the next `--tappers` tapping
    /// `--tap-rate` reactions a second between them (each spread evenly over time, the keys
    /// in turn). Every viewer checks the chat like a fanout receiver (loss, per-publisher and
    /// room order, corruption, latency) and keeps the reaction totals: with v1 the last ones
    /// the server pushed, which must equal the taps sent per key within twice the reaction
    /// interval (plus a margin) after the last tap; with `--relayed` the taps relayed to it,
    /// each of which it must get. Reports the server's CPU over the workload.
    fn stream(&mut self) -> bool {
        let mut events = Events::with_capacity(4096);
        let args = self.args.clone();
        let stream = &args.stream;
        let (chatters, tappers) = (stream.chatters, stream.tappers);
        self.ramp(
            args.clients,
            |i| {
                if i < chatters {
                    (0, Role::Publisher(i))
                } else if i < chatters + tappers {
                    (0, Role::Tapper(i - chatters))
                } else {
                    (0, Role::Receiver)
                }
            },
            &mut events,
        );
        let ramp_failures: u64 = self.tally.failures.values().sum();
        let mut chat = vec![None; chatters];
        let mut taps = vec![None; tappers];
        for (i, conn) in self.conns.iter().enumerate() {
            match conn
                .as_ref()
                .filter(|c| c.phase == Phase::Open)
                .map(|c| c.role)
            {
                Some(Role::Publisher(p)) => chat[p] = Some(Token(i)),
                Some(Role::Tapper(t)) => taps[t] = Some(Token(i)),
                _ => {}
            }
        }
        let connected = self.open_count(|c| c.role.is_member());
        let chat: Option<Vec<Token>> = chat.into_iter().collect();
        let taps: Option<Vec<Token>> = taps.into_iter().collect();
        let (Some(chat), Some(taps)) = (chat, taps) else {
            println!(
                "load: not every chatter and tapper connected: {:?}",
                self.tally.failures
            );
            println!("RESULT scenario=stream failed_to_connect=1");
            return false;
        };
        if connected != args.clients {
            println!(
                "load: only {connected} of {} viewers connected: {:?}",
                args.clients, self.tally.failures
            );
            println!("RESULT scenario=stream failed_to_connect=1");
            return false;
        }
        self.publishers = chat
            .into_iter()
            .map(|token| Publisher {
                token,
                room: 0,
                sent: 0,
                in_flight: 0,
            })
            .collect();
        self.tappers = taps;
        let mode = if stream.relayed { "relayed" } else { "v1" };
        println!(
            "stream ({mode}): {} viewers in {}, {chatters} chatting {}/s, {tappers} tapping {}/s on {}",
            args.clients,
            args.room_name(0),
            stream.chat_rate,
            stream.tap_rate,
            stream.keys.join(" ")
        );

        let reactions_before = reaction_counters(args.addr);
        let cpu_before = args.pid.map(cpu_time);
        let own_cpu_before = cpu_time(std::process::id());
        let mut peak_rss = args.pid.map_or(0, |pid| server_usage(pid).0);
        let started = Instant::now();
        let mut last_sample = started;
        let bytes_before = self.bytes_read;
        let (mut chat_sent, mut taps_started) = (0u64, 0u64);
        let keys = stream.keys.len() as u64;
        while started.elapsed() < args.duration {
            let elapsed = started.elapsed().as_secs_f64();
            while (chat_sent as f64) < elapsed * stream.chat_rate {
                self.publish((chat_sent % chatters as u64) as usize);
                chat_sent += 1;
            }
            // Tap n goes to tapper n mod T: each tapper taps every T/rate seconds, and the
            // tappers take their turns evenly in between.
            while (taps_started as f64) < elapsed * stream.tap_rate {
                let tapper = (taps_started % tappers as u64) as usize;
                self.tap(tapper, (taps_started % keys) as usize);
                taps_started += 1;
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
        let run = started.elapsed();
        let cpu = args
            .pid
            .zip(cpu_before)
            .map(|(pid, before)| cpu_time(pid).saturating_sub(before));
        let own_cpu = cpu_time(std::process::id()).saturating_sub(own_cpu_before);
        let viewer_kib_per_s = (self.bytes_read - bytes_before) as f64
            / 1024.0
            / args.clients as f64
            / run.as_secs_f64();

        // The last chat messages and totals are still on their way: the chat has `DRAIN` to
        // arrive; v1 totals must be exact within twice the reaction interval and a margin
        // (the server pushes a room's totals at most once an interval), relayed taps are
        // messages like the chat.
        let settle_from = Instant::now();
        let drain_until = settle_from + DRAIN;
        let totals_within = if stream.relayed {
            DRAIN
        } else {
            2 * stream.reaction_interval + SETTLE_MARGIN
        };
        let mut totals_settled = None;
        loop {
            if totals_settled.is_none() && self.totals_match() {
                totals_settled = Some(settle_from.elapsed());
            }
            let chat_done = self.tally.received >= self.expected();
            let now = Instant::now();
            let totals_done = totals_settled.is_some() || now >= settle_from + totals_within;
            if (chat_done || now >= drain_until) && totals_done {
                break;
            }
            self.turn(&mut events, Duration::from_millis(5));
        }
        if let Some(pid) = args.pid {
            peak_rss = peak_rss.max(server_usage(pid).0);
        }
        let totals_exact = totals_settled.is_some_and(|t| t <= totals_within);
        // What the server says it counted and dropped of the taps (v1), when it says.
        let server_taps = reaction_counters(args.addr).zip(reactions_before).map(
            |((counted, dropped), (counted0, dropped0))| (counted - counted0, dropped - dropped0),
        );

        let viewers: Vec<&Viewer> = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.role.is_member() && c.phase == Phase::Open)
            .map(|c| &c.viewer)
            .collect();
        let live = viewers.len();
        let closed = args.clients - live;
        let taps_sent: u64 = self.taps_sent.iter().sum();
        let expected = self.expected();
        let lost = expected.saturating_sub(self.tally.received);
        let taps_lost = (taps_sent * live as u64).saturating_sub(self.tap_deliveries);
        let n = live.max(1) as f64;
        let frames_mean = viewers
            .iter()
            .map(|v| v.reaction_frames as f64)
            .sum::<f64>()
            / n;
        let frames_max = viewers.iter().map(|v| v.reaction_frames).max().unwrap_or(0);
        let presence_mean = viewers
            .iter()
            .map(|v| v.presence_frames as f64)
            .sum::<f64>()
            / n;
        // Every viewer's last counts should be the whole room: each is a user of its own.
        let whole_room = Some((args.clients as u64, args.clients as u64));
        let presence_exact = viewers.iter().all(|v| v.presence == whole_room);
        let failures: u64 = self.tally.failures.values().sum::<u64>() - ramp_failures;
        let h = self.tally.latency_us.take().expect("taken once, here");
        let seconds = run.as_secs_f64();
        let per_second = (self.tally.received + self.tap_deliveries) as f64 / seconds;
        let mib = |b: u64| b as f64 / 1048576.0;

        println!(
            "chat: {chat_sent} messages sent, {} delivered of {expected}, lost {lost}, out of order {}, corrupted {}; \
             latency µs p50 {} p99 {} max {}",
            self.tally.received,
            self.tally.reordered,
            self.tally.corrupted,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
        let per_key: Vec<String> = stream
            .keys
            .iter()
            .zip(&self.taps_sent)
            .map(|(key, n)| format!("{key} {n}"))
            .collect();
        if stream.relayed {
            println!(
                "taps: {taps_sent} sent ({}), {} relayed to viewers, {taps_lost} missing",
                per_key.join(", "),
                self.tap_deliveries
            );
        } else {
            println!(
                "taps: {taps_sent} sent ({}); every viewer's last totals {} ({}); \
                 reactions frames per viewer: mean {frames_mean:.1}, max {frames_max}",
                per_key.join(", "),
                if totals_exact {
                    "equal them"
                } else {
                    "do NOT all equal them"
                },
                match totals_settled {
                    Some(t) => format!(
                        "{:.0} ms after the run, within {totals_within:?}",
                        t.as_secs_f64() * 1e3
                    ),
                    None => format!("not within {totals_within:?}"),
                },
            );
            println!(
                "presence frames per viewer: mean {presence_mean:.1}; every viewer's last counts {}",
                if presence_exact { "are the whole room" } else { "are NOT all the whole room" }
            );
            if let Some((counted, dropped)) = server_taps {
                println!(
                    "the server counted {counted} taps and dropped {dropped} (roomcast_reactions_dropped_total){}",
                    if dropped > 0 { ": raise its --reaction-rate, or add --tappers" } else { "" }
                );
            }
        }
        println!(
            "{} deliveries in {run:.1?} ({per_second:.0}/s), {viewer_kib_per_s:.1} KiB/s to each viewer; \
             {closed} viewers closed; failures {:?}; the tool's own CPU {:.2} s/s",
            self.tally.received + self.tap_deliveries,
            self.tally.failures,
            own_cpu.as_secs_f64() / seconds
        );
        let mut extra = String::new();
        if let Some(cpu) = cpu {
            let cpu = cpu.as_secs_f64();
            println!(
                "server CPU: {cpu:.2} s over the run, {:.3} s per second; peak RSS {:.1} MiB",
                cpu / seconds,
                mib(peak_rss)
            );
            extra += &format!(
                " server_cpu_s={cpu:.2} server_cpu_per_s={:.3} peak_rss_mib={:.1}",
                cpu / seconds,
                mib(peak_rss)
            );
        }
        let taps = if stream.relayed {
            format!(
                "taps_sent={taps_sent} tap_deliveries={} taps_lost={taps_lost}",
                self.tap_deliveries
            )
        } else {
            format!(
                "taps_sent={taps_sent} totals_exact={} totals_settle_ms={} reaction_frames_mean={frames_mean:.1} \
                 reaction_frames_max={frames_max} presence_frames_mean={presence_mean:.1} presence_exact={}",
                if totals_exact { "yes" } else { "no" },
                totals_settled.map_or("never".into(), |t| format!("{:.0}", t.as_secs_f64() * 1e3)),
                if presence_exact { "yes" } else { "no" }
            ) + &server_taps.map_or(String::new(), |(counted, dropped)| {
                format!(" server_taps_counted={counted} server_taps_dropped={dropped}")
            })
        };
        println!(
            "RESULT scenario=stream mode={mode} viewers={} chatters={chatters} tappers={tappers} chat_sent={chat_sent} \
             chat_delivered={} chat_lost={lost} chat_reordered={} chat_corrupted={} chat_p50_us={} chat_p99_us={} \
             chat_max_us={} {taps} deliveries_per_second={per_second:.0} viewer_kib_per_s={viewer_kib_per_s:.1} viewers_closed={closed} failures={failures} \
             tool_cpu_per_s={:.3}{extra}",
            args.clients,
            self.tally.received,
            self.tally.reordered,
            self.tally.corrupted,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max(),
            own_cpu.as_secs_f64() / seconds
        );
        let clean = lost == 0
            && self.tally.reordered == 0
            && self.tally.corrupted == 0
            && closed == 0
            && failures == 0;
        clean
            && if stream.relayed {
                taps_lost == 0
            } else {
                totals_exact
            }
    }

    /// Whether every stream viewer's totals are the taps sent per key: with v1 the last
    /// totals pushed to it, with `--relayed` the taps relayed to it.
    fn totals_match(&self) -> bool {
        self.conns
            .iter()
            .flatten()
            .filter(|c| c.role.is_member() && c.phase == Phase::Open)
            .all(|c| c.viewer.totals == self.taps_sent)
    }

    /// Tapper `tapper` taps key `key` of `--keys` once.
    fn tap(&mut self, tapper: usize, key: usize) {
        let token = self.tappers[tapper];
        let Some(conn) = self.conns[token.0].as_mut() else {
            return;
        };
        client_frame(&mut conn.wbuf, 0x1, &self.tap_payloads[key]);
        self.taps_sent[key] += 1;
        self.flush(token);
    }

    /// Whether the server still serves: a new client in a new room gets in, and its message
    /// comes back to it intact.
    fn newcomer_relays(&mut self, events: &mut Events) -> bool {
        let room = self.members.len();
        self.members.push(0);
        let id = self.publishers.len();
        let Some(token) = self.open(room, Role::Publisher(id)) else {
            return false;
        };
        let deadline = Instant::now() + NEWCOMER_TIMEOUT;
        let phase = |load: &Load| load.conns[token.0].as_ref().map(|c| c.phase);
        while phase(self).is_some_and(Phase::is_connecting) && Instant::now() < deadline {
            self.turn(events, Duration::from_millis(5));
        }
        if phase(self) != Some(Phase::Open) {
            return false;
        }
        self.publishers.push(Publisher {
            token,
            room,
            sent: 0,
            in_flight: 0,
        });
        let corrupted = self.tally.corrupted;
        self.publish_sized(id, HEADER + 64);
        while self.publishers[id].in_flight > 0
            && phase(self) == Some(Phase::Open)
            && Instant::now() < deadline
        {
            self.turn(events, Duration::from_millis(5));
        }
        let relayed = self.publishers[id].in_flight == 0 && self.tally.corrupted == corrupted;
        self.close(token, false);
        relayed
    }
}

/// A room name no earlier run used: the stream scenario's room must be fresh, since its
/// reaction totals count every tap since the room's state began, and a room keeps its state
/// for `--room-ttl` after its last member left.
fn fresh_room_prefix() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "stream-{:x}-{}-",
        since_epoch.as_micros(),
        std::process::id()
    )
}

/// A stalled client's kernel queues: bytes in its own receive queue, and bytes in the send
/// queue of the server's end of its connection.
fn stalled_queues(
    conn: &Conn,
    queues: &HashMap<(SocketAddr, SocketAddr), (u64, u64)>,
) -> Option<(u64, u64)> {
    let local = conn.stream.local_addr().ok()?;
    let server = conn.stream.peer_addr().ok()?;
    let received = queues.get(&(local, server))?.1;
    let sending = queues.get(&(server, local))?.0;
    Some((received, sending))
}

/// Every TCP connection's kernel queues on this machine, by (local, remote) address: the send
/// queue (written, not yet acknowledged) and the receive queue (arrived, not yet read), as
/// `ss` shows them (Send-Q, Recv-Q), read from `/proc/net/tcp` and `/proc/net/tcp6`.
fn socket_queues() -> HashMap<(SocketAddr, SocketAddr), (u64, u64)> {
    let mut queues = HashMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(queue)) = (
                fields.get(1).and_then(|a| proc_net_addr(a)),
                fields.get(2).and_then(|a| proc_net_addr(a)),
                fields.get(4).and_then(|q| q.split_once(':')),
            ) else {
                continue;
            };
            let hex = |h: &str| u64::from_str_radix(h, 16).unwrap_or(0);
            queues.insert((local, remote), (hex(queue.0), hex(queue.1)));
        }
    }
    queues
}

/// An address as `/proc/net/tcp{,6}` prints it: each 32-bit word of the address in the
/// machine's byte order as hex, a colon, the port as hex.
fn proc_net_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in 0..ip.len() / 8 {
        let word = u32::from_str_radix(ip.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Starts a non-blocking connect. A stalled client's receive buffer and MSS are set before the
/// SYN: tcp(7) says a buffer size must be set before `connect` to take effect (the window the
/// connection advertises is chosen during the handshake), and the MSS is announced in the SYN.
fn connect(addr: SocketAddr, small_receive_buffer: bool) -> io::Result<TcpStream> {
    if !small_receive_buffer {
        return TcpStream::connect(addr);
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_recv_buffer_size(STALLED_RECEIVE_BUFFER)?;
    socket.set_tcp_mss(STALLED_MSS)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Appends a client frame. Clients must mask (RFC 6455 §5.3); a zero key leaves the payload
/// bytes as they are.
fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

/// What the tool embeds in a v1 message for its checks (the plain payload's header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct V1Header {
    sent_ns: u64,
    publisher: u32,
    seq: u64,
}

/// A v1 `publish` frame's JSON whose `data` is a string of `size` characters: the pattern
/// of message `header.seq`, then the header in hex (`V1_TRAILER`). Without a header (fill and
/// hoard messages, never checked) the whole string is pattern.
fn v1_publish(size: usize, header: Option<V1Header>) -> Vec<u8> {
    const START: &[u8] = br#"{"type":"publish","data":""#;
    let mut frame = Vec::with_capacity(START.len() + size + 2);
    frame.extend_from_slice(START);
    match header {
        Some(header) => {
            let pattern = size - V1_TRAILER;
            frame.extend((0..pattern).map(|i| v1_pattern_char(header.seq, i)));
            push_hex(&mut frame, header.sent_ns, 16);
            push_hex(&mut frame, header.publisher.into(), 8);
            push_hex(&mut frame, header.seq, 16);
            push_hex(&mut frame, size as u64, 8);
        }
        None => frame.extend((0..size).map(|i| v1_pattern_char(0, i))),
    }
    frame.extend_from_slice(b"\"}");
    frame
}

/// Character `i` of message `seq`'s `data` pattern: `pattern_byte`, in `V1_ALPHABET`.
fn v1_pattern_char(seq: u64, i: usize) -> u8 {
    V1_ALPHABET[usize::from(pattern_byte(seq, i) & 63)]
}

fn v1_pattern_ok(chars: &[u8], seq: u64) -> bool {
    chars
        .iter()
        .enumerate()
        .all(|(i, c)| *c == v1_pattern_char(seq, i))
}

/// Appends the low `digits` hex digits of `value`, most significant first.
fn push_hex(out: &mut Vec<u8>, value: u64, digits: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend(
        (0..digits)
            .rev()
            .map(|d| HEX[(value >> (d * 4) & 15) as usize]),
    );
}

/// The value of 8 lowercase hex digits, `None` if any is not one. On the receive path for
/// every delivery (six times), so all eight at once in one `u64` (SWAR) rather than a branch
/// per digit, which a profile of the tool showed as its largest parsing cost.
fn parse_hex8(digits: &[u8; 8]) -> Option<u32> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOW_NIBBLES: u64 = 0x0f * ONES;
    const HIGH_NIBBLES: u64 = 0xf0 * ONES;
    let chars = u64::from_be_bytes(*digits);
    // Per byte: the low nibble, plus 9 for letters (bit 6 set: 'a' is 0x61 → 1 + 9 = 10).
    let nibbles = (chars & LOW_NIBBLES) + 9 * ((chars >> 6) & ONES);
    // Valid only if re-encoding each value gives back the very character ('0'..'9' are
    // 0x30 + v, 'a'..'f' are 0x57 + v): this rejects upper case, 'g'..'z', punctuation,
    // and, through the first test, letters whose value would pass 15. No byte carries into
    // the next: every value is at most 24 before the test.
    let is_letter = ((nibbles + 6 * ONES) >> 4) & ONES;
    if nibbles & HIGH_NIBBLES != 0 || nibbles + 0x30 * ONES + 0x27 * is_letter != chars {
        return None;
    }
    // Pack the eight nibbles, most significant first: pairs into bytes, bytes into halves.
    let bytes = (nibbles | nibbles >> 4) & 0x00ff_00ff_00ff_00ff;
    let halves = (bytes | bytes >> 8) & 0x0000_ffff_0000_ffff;
    Some((halves | halves >> 16) as u32)
}

/// The value of 16 lowercase hex digits.
fn parse_hex16(digits: &[u8; 16]) -> Option<u64> {
    let (high, low) = digits.split_at(8);
    let high = parse_hex8(high.try_into().ok()?)?;
    let low = parse_hex8(low.try_into().ok()?)?;
    Some(u64::from(high) << 32 | u64::from(low))
}

/// A decimal number at the start of `text`, and the bytes after it; `None` without digits
/// or past `u64::MAX`.
fn parse_decimal(text: &[u8]) -> Option<(u64, &[u8])> {
    let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let value = text[..digits].iter().try_fold(0u64, |value, digit| {
        value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })?;
    Some((value, &text[digits..]))
}

/// A server frame to a v1 client, classified on the hot path without a JSON parser.
#[derive(Debug, PartialEq, Eq)]
enum V1Frame<'a> {
    Message(V1Message<'a>),
    /// `{"type":"presence","clients":N,"users":M}`.
    Presence {
        clients: u64,
        users: u64,
    },
    /// `{"type":"reactions","totals":{...}}`: the totals object, braces included, for
    /// `read_totals`.
    Reactions(&'a [u8]),
    /// Anything else: a welcome out of turn, an error, a frame in an unknown layout.
    Other,
}

/// A `message` frame as the tool reads it.
#[derive(Debug, PartialEq, Eq)]
struct V1Message<'a> {
    /// The room's sequence number.
    seq: u64,
    /// The header the tool put at the end of `data`, and the pattern before it; `None` when
    /// `data` is not a string in the tool's layout (someone else's message, or corruption).
    header: Option<V1Header>,
    pattern: &'a [u8],
}

/// Reads a server frame cheaply, relying on the layout of the server's encoder
/// (`roomcast::v1::codec::push_message`, checked against `serde_json` in the tests below):
/// `{"type":"message","seq":N,...,"data":"..."}` with `data` last. The `seq` is the number
/// right after the prefix, and `data` is found from the frame's end through the length its
/// trailer states, so no byte of the sender's identity or of the pattern is searched.
fn v1_frame(frame: &[u8]) -> V1Frame<'_> {
    let Some(rest) = frame.strip_prefix(V1_MESSAGE_PREFIX) else {
        return v1_counts(frame).unwrap_or(V1Frame::Other);
    };
    let Some(rest) = rest.strip_prefix(br#""seq":"#) else {
        return V1Frame::Other;
    };
    let Some((seq, rest)) = parse_decimal(rest).filter(|(_, rest)| rest.first() == Some(&b','))
    else {
        return V1Frame::Other;
    };
    let (header, pattern) = v1_data(rest).unwrap_or((None, &[]));
    V1Frame::Message(V1Message {
        seq,
        header,
        pattern,
    })
}

/// How the server's `reactions` frame begins, up to its totals object, and its `presence`
/// frame, up to the client count (PROTOCOL §4).
const V1_REACTIONS_PREFIX: &[u8] = br#"{"type":"reactions","totals":"#;
const V1_PRESENCE_PREFIX: &[u8] = br#"{"type":"presence","clients":"#;

/// A `presence` or `reactions` frame in the server's layout: a stream viewer gets several
/// a second, each of 10,000 viewers, so they are read like `message` frames, by their known
/// layout, without a JSON parser (checked against `serde_json` in the tests below).
fn v1_counts(frame: &[u8]) -> Option<V1Frame<'_>> {
    if let Some(rest) = frame.strip_prefix(V1_REACTIONS_PREFIX) {
        let totals = rest.strip_suffix(b"}")?;
        let is_object = totals.len() >= 2 && totals[0] == b'{' && totals.ends_with(b"}");
        return is_object.then_some(V1Frame::Reactions(totals));
    }
    let rest = frame.strip_prefix(V1_PRESENCE_PREFIX)?;
    let (clients, rest) = parse_decimal(rest)?;
    let (users, rest) = parse_decimal(rest.strip_prefix(br#","users":"#)?)?;
    (rest == b"}").then_some(V1Frame::Presence { clients, users })
}

/// Reads a totals object as the server writes it (`{"❤️":1234,"👏":56}`, no whitespace)
/// without a JSON parser, calling `total` with each key, unescaped, and its count. `None`
/// when it is not such an object (`total` may have seen the keys before the fault).
fn read_totals(object: &[u8], mut total: impl FnMut(&[u8], u64)) -> Option<()> {
    let mut rest = object.strip_prefix(b"{")?;
    if rest == b"}" {
        return Some(());
    }
    loop {
        let quoted = rest;
        let body = quoted.strip_prefix(b"\"")?;
        // The key ends at its first quote that no backslash escapes.
        let mut end = 0;
        let mut escaped = false;
        loop {
            match *body.get(end)? {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => break,
                _ => {}
            }
            end += 1;
        }
        let key = &body[..end];
        let (count, after) = parse_decimal(body[end + 1..].strip_prefix(b":")?)?;
        if key.contains(&b'\\') {
            // Only a key with a quote, a backslash or a control character is escaped: rare
            // enough for the JSON parser.
            let key: String = serde_json::from_slice(&quoted[..end + 2]).ok()?;
            total(key.as_bytes(), count);
        } else {
            total(key, count);
        }
        match after.split_first()? {
            (b',', next) => rest = next,
            (b'}', []) => return Some(()),
            _ => return None,
        }
    }
}

/// The text a stream tapper sends for one tap on `key`: a v1 `react` frame, or with
/// `relayed` the plain message the demo page relayed for a reaction before roomcast.v1.
fn tap_payload(key: &str, relayed: bool) -> Vec<u8> {
    let key = serde_json::to_string(key).expect("a string always serialises");
    if relayed {
        format!(r#"{{"type":"reaction","emoji":{key}}}"#).into_bytes()
    } else {
        format!(r#"{{"type":"react","key":{key}}}"#).into_bytes()
    }
}

/// The tool's `data` string at the end of `frame`: its header and pattern. `None` (or no
/// header) when the frame does not end in `,"data":"<the stated length of characters>"}`.
fn v1_data(frame: &[u8]) -> Option<(Option<V1Header>, &[u8])> {
    const KEY: &[u8] = br#","data":""#;
    let body = frame.strip_suffix(b"\"}")?;
    let trailer = body.get(body.len().checked_sub(V1_TRAILER)?..)?;
    let (sent_ns, trailer) = trailer.split_first_chunk::<16>()?;
    let (publisher, trailer) = trailer.split_first_chunk::<8>()?;
    let (seq, length) = trailer.split_first_chunk::<16>()?;
    let length = usize::try_from(parse_hex8(length.try_into().ok()?)?).ok()?;
    let start = body.len().checked_sub(length)?;
    if length < V1_TRAILER || body.get(start.checked_sub(KEY.len())?..start)? != KEY {
        return None;
    }
    let header = V1Header {
        sent_ns: parse_hex16(sent_ns)?,
        publisher: parse_hex8(publisher)?,
        seq: parse_hex16(seq)?,
    };
    Some((Some(header), &body[start..body.len() - V1_TRAILER]))
}

/// The claims of `user`'s join token for the room named `room`, minted at `now`: no `name`
/// (the server shows the `sub`) and no `perm` (the default, `post`, which publishers need).
fn join_claims(user: &str, room: &str, now: std::time::SystemTime) -> serde_json::Value {
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    serde_json::json!({
        "sub": user,
        "exp": now + TOKEN_LIFETIME.as_secs(),
        "room": room,
    })
}

/// Whether a `101`'s head names `roomcast.v1` in its `Sec-WebSocket-Protocol`.
fn names_v1(head: &str) -> bool {
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-protocol")
                && value.trim() == roomcast::v1::codec::SUBPROTOCOL
        })
}

/// What a v1 client's `welcome` tells the tool.
#[derive(Debug, PartialEq, Eq)]
struct Welcome {
    /// The room's `seq` at the client's place in the order: every later message's exceeds it.
    seq: u64,
    /// The room's counts at the join (`clients`, `users`), if the welcome holds them.
    presence: Option<(u64, u64)>,
    /// The room's reaction totals at the join, by key.
    reactions: BTreeMap<String, u64>,
}

/// Checks a v1 client's first frame: a `welcome` to the room named `room`, for its token's
/// user when it sent one (anonymous otherwise), allowed to post.
fn check_welcome(frame: &[u8], room: &str, user: Option<&str>) -> Result<Welcome, String> {
    let welcome: serde_json::Value =
        serde_json::from_slice(frame).map_err(|_| "the first frame is not JSON".to_string())?;
    if welcome["type"] != "welcome" {
        return Err(format!("the first frame is {}", welcome["type"]));
    }
    if welcome["room"] != room {
        return Err("it names another room".into());
    }
    let you = &welcome["you"];
    match user {
        Some(user) if you["id"] != user || you["verified"] != true => {
            return Err("not the token's user (does the server have the secret?)".into())
        }
        None if !you["id"].is_string() || you["verified"] != false => {
            return Err("no anonymous identity".into())
        }
        _ => {}
    }
    if you["perm"] != "post" {
        return Err(format!("perm {}, not \"post\"", you["perm"]));
    }
    let seq = welcome["seq"]
        .as_u64()
        .ok_or_else(|| "no seq".to_string())?;
    let presence = &welcome["presence"];
    let presence = presence["clients"].as_u64().zip(presence["users"].as_u64());
    let reactions = match &welcome["reactions"] {
        serde_json::Value::Null => BTreeMap::new(),
        totals => serde_json::from_value(totals.clone())
            .map_err(|_| format!("reactions {totals} are not totals"))?,
    };
    Ok(Welcome {
        seq,
        presence,
        reactions,
    })
}

/// A failure kind for a v1 frame the tool did not expect.
fn unexpected_v1_frame(frame: &[u8]) -> String {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(frame) else {
        return "a v1 frame that is not JSON".into();
    };
    match json["type"].as_str() {
        Some("error") => format!("error frame: {}", json["code"]),
        Some(kind @ ("message" | "presence" | "reactions")) => {
            format!("a {kind} frame in an unknown layout")
        }
        Some(other) => format!("unexpected {other} frame"),
        None => "a v1 frame without a type".into(),
    }
}

/// Bytes a server frame with a `payload`-byte payload takes on the wire (unmasked).
fn server_frame_len(payload: usize) -> u64 {
    let header = match payload {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    };
    (header + payload) as u64
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
    (
        status_field(&status, "VmRSS:") * 1024,
        status_field(&status, "Threads:"),
    )
}

/// A process's peak RSS in bytes (`VmHWM`, the kernel's high-water mark, which catches peaks
/// between samples).
fn server_peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&status, "VmHWM:") * 1024
}

/// The number after `name` in `/proc/PID/status` text (kB for memory fields), 0 if absent.
fn status_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// One plain HTTP GET on a fresh connection (the server answers one request per
/// connection): the status and the body. Every step is bounded by `HTTP_TIMEOUT`.
fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.take(MAX_HTTP_RESPONSE).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("response head not complete"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    Ok((status, body.to_string()))
}

/// Members of the room named `room` as the server counts them (`GET /api/rooms/<room>`).
fn room_clients(addr: SocketAddr, room: &str) -> io::Result<u64> {
    let (status, body) = http_get(addr, &format!("/api/rooms/{room}"))?;
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if status != 200 {
        return Err(bad(format!("HTTP {status}")));
    }
    let json: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| bad(format!("rooms API: {e}")))?;
    json["clients"]
        .as_u64()
        .ok_or_else(|| bad(format!("rooms API: no client count in {body}")))
}

/// A sample's value in Prometheus text (`name` or `name{labels}`, exactly as given).
fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(name, _)| *name == sample)
        .and_then(|(_, value)| value.parse().ok())
}

/// The server's reaction counters, taps counted and dropped (for any reason), `None` when
/// its metrics cannot be read or have none.
fn reaction_counters(addr: SocketAddr) -> Option<(u64, u64)> {
    let (_, text) = http_get(addr, "/metrics").ok()?;
    let counted = metric(&text, "roomcast_reactions_total")?;
    let dropped: f64 = text
        .lines()
        .filter(|l| l.starts_with("roomcast_reactions_dropped_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    Some((counted as u64, dropped as u64))
}

/// The server's eviction counters by reason, empty when its metrics cannot be read.
fn evictions(addr: SocketAddr) -> BTreeMap<String, f64> {
    let text = http_get(addr, "/metrics")
        .map(|(_, t)| t)
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("roomcast_evictions_total{reason=\""))
        .filter_map(|l| {
            let (reason, rest) = l.split_once("\"}")?;
            Some((reason.to_string(), rest.trim().parse().ok()?))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use roomcast::relay::broadcaster::MessageKind;
    use roomcast::v1::codec;

    /// The data of a publish the tool sends, as the server's codec reads it.
    fn published_data(frame: &[u8]) -> String {
        let text = std::str::from_utf8(frame).expect("a publish is UTF-8");
        match codec::parse(text) {
            Ok(codec::Incoming::Publish(data)) => data.get().to_string(),
            other => panic!("the server would not take {text}: {other:?}"),
        }
    }

    /// The `message` frame the server's own encoder makes of that data.
    fn server_message(seq: u64, from: &str, data: &str) -> Vec<u8> {
        let mut out = Vec::new();
        codec::push_message(
            &mut out,
            seq,
            1_764_230_000_123,
            Some(from),
            MessageKind::Json,
            data.as_bytes(),
        );
        out
    }

    /// The cheap reading of a message frame must agree with a JSON parser on every field it
    /// takes: without this, a change in the server's encoding (or a slip in the offsets)
    /// would show as corruption or loss in every benchmark row, or worse, pass unnoticed.
    #[test]
    fn the_hot_path_reads_what_serde_json_reads() {
        let senders = [
            r#"{"id":"anon-1","name":"anon-1","verified":false}"#,
            // Names that hold what the reader looks for: it must not be fooled by them.
            r#"{"id":"load-7","name":"\",\"data\":\"x\"}","verified":true}"#,
            r#"{"id":"u","name":"{\"type\":\"message\",\"seq\":1,","verified":true}"#,
        ];
        for size in [V1_TRAILER, 64, 1000, MAX_CHECKED_SIZE] {
            for (seq, from) in [
                (1, senders[0]),
                (1_000_042, senders[1]),
                (u64::MAX, senders[2]),
            ] {
                let header = V1Header {
                    sent_ns: 123_456_789_012,
                    publisher: 3,
                    seq: 77,
                };
                let publish = v1_publish(size, Some(header));
                let data = published_data(&publish);
                let frame = server_message(seq, from, &data);
                let json: serde_json::Value = serde_json::from_slice(&frame).unwrap();
                let V1Frame::Message(message) = v1_frame(&frame) else {
                    panic!("not read as a message: {}", String::from_utf8_lossy(&frame));
                };
                assert_eq!(Some(message.seq), json["seq"].as_u64());
                assert_eq!(message.header, Some(header));
                let text = json["data"].as_str().expect("data is a string");
                assert_eq!(text.len(), size);
                assert_eq!(message.pattern, &text.as_bytes()[..size - V1_TRAILER]);
                assert!(v1_pattern_ok(message.pattern, header.seq));
                assert!(!v1_pattern_ok(message.pattern, header.seq + 1) || size == V1_TRAILER);
            }
        }
    }

    /// A message the tool did not publish, or one cut short or shifted, is read as a message
    /// without a header (counted as corrupted), never as someone else's intact delivery.
    #[test]
    fn data_in_another_layout_has_no_header() {
        let header = V1Header {
            sent_ns: 5,
            publisher: 0,
            seq: 9,
        };
        let from = r#"{"id":"anon-1","name":"anon-1","verified":false}"#;
        let good = published_data(&v1_publish(100, Some(header)));
        // One pattern character dropped: the stated length no longer reaches the key.
        let short = format!("\"{}", &good[2..]);
        let not_ours = [
            r#"{"text":"hi"}"#.to_string(),
            "42".to_string(),
            r#""short""#.to_string(),
            short,
            // The same string inside an object: not the frame's last field.
            format!(r#"{{"data":{good}}}"#),
        ];
        for data in not_ours {
            let frame = server_message(8, from, &data);
            assert_eq!(
                v1_frame(&frame),
                V1Frame::Message(V1Message {
                    seq: 8,
                    header: None,
                    pattern: &[],
                }),
                "{data}"
            );
        }
        let mut text_body = Vec::new();
        codec::push_message(&mut text_body, 8, 1, None, MessageKind::Text, b"hello");
        assert!(matches!(
            v1_frame(&text_body),
            V1Frame::Message(V1Message { header: None, .. })
        ));
        assert_eq!(
            v1_frame(br#"{"type":"presence","clients":2,"users":2}"#),
            V1Frame::Presence {
                clients: 2,
                users: 2
            }
        );
        assert_eq!(
            v1_frame(br#"{"type":"reactions","totals":{"x":1}}"#),
            V1Frame::Reactions(br#"{"x":1}"#)
        );
        for other in [
            &br#"{"type":"welcome","room":"room0"}"#[..],
            br#"{"type":"error","code":"bad_request","message":"no"}"#,
            br#"{"type":"message","ts":1,"seq":2}"#,
            br#"{"type":"message","seq":x,"#,
            b"not json",
        ] {
            assert_eq!(v1_frame(other), V1Frame::Other);
        }
        assert_eq!(
            unexpected_v1_frame(br#"{"type":"error","code":"bad_request","message":"no"}"#),
            r#"error frame: "bad_request""#
        );
    }

    /// Fill and hoard messages carry no header, and the server still takes them.
    #[test]
    fn unchecked_publishes_are_valid_too() {
        assert_eq!(published_data(&v1_publish(5, None)).len(), 5 + 2);
        assert_eq!(
            published_data(&v1_publish(FILL_MESSAGE_BYTES, None)).len(),
            FILL_MESSAGE_BYTES + 2
        );
    }

    #[test]
    fn the_welcome_is_checked() {
        let welcome = |you: &str, room: &str| {
            format!(
                r#"{{"type":"welcome","room":"{room}","you":{you},"epoch":"e","seq":41,"recovered":false,"history":[],"presence":{{"clients":1,"users":1}},"reactions":{{}}}}"#
            )
        };
        let anon = r#"{"id":"anon-3","name":"anon-3","verified":false,"perm":"post"}"#;
        let load = r#"{"id":"load-3","name":"load-3","verified":true,"perm":"post"}"#;
        let seq =
            |frame: String, user| check_welcome(frame.as_bytes(), "room2", user).map(|w| w.seq);
        assert_eq!(seq(welcome(anon, "room2"), None), Ok(41));
        assert_eq!(seq(welcome(load, "room2"), Some("load-3")), Ok(41));
        for (frame, room, user) in [
            (welcome(anon, "room2"), "room3", None),
            (welcome(anon, "room2"), "room2", Some("load-3")),
            (welcome(load, "room2"), "room2", Some("load-4")),
            (welcome(load, "room2"), "room2", None),
            (
                welcome(&anon.replace("post", "read"), "room2"),
                "room2",
                None,
            ),
            (r#"{"type":"message","seq":1}"#.to_string(), "room2", None),
            ("[]".to_string(), "room2", None),
        ] {
            assert!(
                check_welcome(frame.as_bytes(), room, user).is_err(),
                "{frame}"
            );
        }
    }

    fn parse(line: &str, secret: Option<&str>) -> Result<Args, String> {
        parse_args(
            line.split_whitespace().map(String::from),
            secret.map(|s| s.as_bytes().to_vec()),
        )
    }

    /// `--v1` is the one flag without a value: the flag after it must not be taken for one.
    #[test]
    fn v1_is_a_switch_and_narrows_the_size() {
        let args = parse("fanout --v1 --clients 5", None).unwrap();
        assert!(args.v1);
        assert_eq!(args.clients, 5);
        let args = parse("fanout --clients 5 --v1", None).unwrap();
        assert!(args.v1);
        assert!(!parse("fanout", None).unwrap().v1);
        // The v1 header is longer than the plain one: a size between the two is refused.
        assert!(parse("fanout --size 20", None).is_ok());
        let refused = parse("fanout --v1 --size 47", None).err().unwrap();
        assert_eq!(
            refused,
            "--size must be between 48 and 60000 for fanout with --v1"
        );
        assert!(parse("fanout --v1 --size 48", None).is_ok());
    }

    #[test]
    fn the_token_secret_comes_from_the_flag_or_the_environment() {
        assert_eq!(parse("fanout", None).unwrap().token_secret, None);
        assert_eq!(parse("fanout", Some("")).unwrap().token_secret, None);
        let from_env = parse("fanout", Some("env-secret")).unwrap();
        assert_eq!(from_env.token_secret.as_deref(), Some(&b"env-secret"[..]));
        let from_flag = parse("fanout --token-secret flag-secret", Some("env-secret")).unwrap();
        assert_eq!(from_flag.token_secret.as_deref(), Some(&b"flag-secret"[..]));
        assert!(parse("fanout --token-secret", None).is_err());
    }

    /// PROTOCOL §2: `sub`, `exp` in seconds and `room` are required; a distinct `sub` per
    /// client keeps the per-user limits per connection.
    #[test]
    fn join_claims_name_the_user_the_room_and_an_hour() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_764_230_000);
        let claims = join_claims("load-7", "room3", now);
        assert_eq!(
            claims,
            serde_json::json!({"sub": "load-7", "exp": 1_764_233_600u64, "room": "room3"})
        );
    }

    #[test]
    fn only_a_101_that_names_v1_is_v1() {
        let head = |protocol: &str| {
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n{protocol}Sec-WebSocket-Accept: x")
        };
        assert!(names_v1(&head("Sec-WebSocket-Protocol: roomcast.v1\r\n")));
        assert!(names_v1(&head("sec-websocket-protocol:roomcast.v1 \r\n")));
        assert!(!names_v1(&head("")));
        assert!(!names_v1(&head("Sec-WebSocket-Protocol: roomcast.v2\r\n")));
    }

    /// The digit-at-a-time reading `parse_hex8` replaces, as the reference.
    fn hex_reference(digits: &[u8]) -> Option<u64> {
        digits.iter().try_fold(0u64, |value, digit| {
            let nibble = match digit {
                b'0'..=b'9' => digit - b'0',
                b'a'..=b'f' => digit - b'a' + 10,
                _ => return None,
            };
            Some(value << 4 | u64::from(nibble))
        })
    }

    /// Every byte value in every position, among valid digits: the SWAR reading must take
    /// exactly the lowercase hex digits and read them as the reference does.
    #[test]
    fn hex_reads_like_the_reference() {
        for base in [*b"00000000", *b"0123abcd", *b"ffffffff", *b"9a9a9a9a"] {
            for at in 0..8 {
                for byte in 0..=255u8 {
                    let mut digits = base;
                    digits[at] = byte;
                    assert_eq!(
                        parse_hex8(&digits).map(u64::from),
                        hex_reference(&digits),
                        "{:?}",
                        String::from_utf8_lossy(&digits)
                    );
                }
            }
        }
        for value in [0, 1, 0xdead_beef, 0x0123_4567_89ab_cdef, u64::MAX] {
            let mut out = Vec::new();
            push_hex(&mut out, value, 16);
            assert_eq!(parse_hex16(&out.try_into().unwrap()), Some(value));
        }
    }

    /// The totals a `reactions` frame holds, as the cheap reader reads them.
    fn fast_totals(frame: &[u8]) -> Option<BTreeMap<String, u64>> {
        let V1Frame::Reactions(object) = v1_frame(frame) else {
            return None;
        };
        let mut totals = BTreeMap::new();
        read_totals(object, |key, count| {
            let key = String::from_utf8(key.to_vec()).expect("keys are UTF-8");
            assert!(totals.insert(key, count).is_none(), "a key read twice");
        })?;
        Some(totals)
    }

    /// A `reactions` frame around totals that `serde_json` wrote, in the layout of
    /// PROTOCOL §4.
    fn reactions_frame(totals: &BTreeMap<String, u64>) -> Vec<u8> {
        let totals = serde_json::to_string(totals).unwrap();
        format!(r#"{{"type":"reactions","totals":{totals}}}"#).into_bytes()
    }

    /// Every viewer reads several reactions and presence frames a second, so they are read
    /// without a JSON parser; the reading must agree with one on every key (escaped ones
    /// included) and count. Without this, a slip would show as inexact totals in every
    /// stream run, or pass a wrong total unnoticed.
    #[test]
    fn counts_frames_read_what_serde_json_reads() {
        let mut cases: Vec<BTreeMap<String, u64>> = vec![
            BTreeMap::new(),
            [("❤️", 1234), ("👏", 56), ("😂", 0)]
                .map(|(k, n)| (k.to_string(), n))
                .into(),
            // Keys that hold what the reader looks for, and what JSON escapes.
            [
                r#"a"b"#,
                r"back\slash",
                "line\nfeed",
                "\u{1}",
                r#"":1,"x"#,
                "}",
                "é",
            ]
            .iter()
            .enumerate()
            .map(|(i, k)| (k.to_string(), i as u64 * 1000 + 7))
            .collect(),
            [("x".to_string(), u64::MAX)].into(),
        ];
        cases.push(
            (0..MAX_ROOM_KEYS)
                .map(|i| (format!("k{i}"), i as u64))
                .collect(),
        );
        for totals in cases {
            let frame = reactions_frame(&totals);
            let json: serde_json::Value = serde_json::from_slice(&frame).unwrap();
            let parsed: BTreeMap<String, u64> =
                serde_json::from_value(json["totals"].clone()).unwrap();
            assert_eq!(parsed, totals);
            assert_eq!(
                fast_totals(&frame).as_ref(),
                Some(&totals),
                "{}",
                String::from_utf8_lossy(&frame)
            );
        }
        for (clients, users) in [(0, 0), (1, 1), (10_000, 9_999), (u64::MAX, 3)] {
            let frame = serde_json::json!({"clients": clients, "users": users}).to_string();
            // serde_json orders keys by name: the server's order is the protocol's.
            let frame = frame.replace(r#"{"clients""#, r#"{"type":"presence","clients""#);
            let json: serde_json::Value = serde_json::from_str(&frame).unwrap();
            assert_eq!(json["type"], "presence");
            assert_eq!(
                v1_frame(frame.as_bytes()),
                V1Frame::Presence {
                    clients: json["clients"].as_u64().unwrap(),
                    users: json["users"].as_u64().unwrap()
                },
                "{frame}"
            );
        }
    }

    /// The same agreement on frames made by the server's own encoders: `codec::presence`,
    /// and `codec::reactions` around totals written as the room state writes them
    /// (`Reactions::totals_json`: `codec::json_string` keys, in key order).
    #[test]
    fn counts_frames_from_the_servers_encoder_are_read() {
        use roomcast::v1::codec::Presence;
        let frame = codec::presence(Presence {
            clients: 10_000,
            users: 9_998,
        });
        assert_eq!(
            v1_frame(frame.as_bytes()),
            V1Frame::Presence {
                clients: 10_000,
                users: 9_998
            }
        );
        let totals: BTreeMap<String, u64> = [
            ("❤️", 1234u64),
            ("👏", 56),
            (r#"q"uote"#, 1),
            ("tab\there", 2),
            ("\u{1f}", 3),
        ]
        .map(|(k, n)| (k.to_string(), n))
        .into();
        let object: Vec<String> = totals
            .iter()
            .map(|(key, n)| format!("{}:{n}", codec::json_string(key)))
            .collect();
        let frame = codec::reactions(&format!("{{{}}}", object.join(",")));
        let json: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(json["type"], "reactions");
        assert_eq!(fast_totals(frame.as_bytes()), Some(totals));
        assert_eq!(
            fast_totals(codec::reactions("{}").as_bytes()),
            Some(BTreeMap::new())
        );
    }

    /// What the server never writes is refused, never read as some other totals: a viewer
    /// then counts a failure rather than a wrong total.
    #[test]
    fn counts_in_another_layout_are_refused() {
        for totals in [
            r#"{ "x":1}"#,
            r#"{"x": 1}"#,
            r#"{"x":1.5}"#,
            r#"{"x":-1}"#,
            r#"{"x":"1"}"#,
            r#"{"x":1,}"#,
            r#"{"x":1}}"#,
            r#"{"x":{"y":1}}"#,
            r#"{"x:1}"#,
            r#"{"x\":1}"#,
            r#"{x:1}"#,
            r#"{"x":18446744073709551616}"#,
            r#"["x",1]"#,
            "",
        ] {
            let frame = format!(r#"{{"type":"reactions","totals":{totals}}}"#);
            assert_eq!(fast_totals(frame.as_bytes()), None, "{frame}");
        }
        for frame in [
            r#"{"type":"presence","clients":1}"#,
            r#"{"type":"presence","clients":1,"users":1,"x":2}"#,
            r#"{"type":"presence","clients":-1,"users":1}"#,
            r#"{"type":"presence","users":1,"clients":1}"#,
            r#"{"type":"reactions","totals":{}"#,
            r#"{"type":"reactions"}"#,
        ] {
            assert_eq!(v1_frame(frame.as_bytes()), V1Frame::Other, "{frame}");
        }
        assert_eq!(
            unexpected_v1_frame(br#"{"type":"reactions","totals":{"x":1.5}}"#),
            "a reactions frame in an unknown layout"
        );
    }

    /// A viewer starts from the counts its welcome holds (PROTOCOL §4): a viewer that joins
    /// a room with taps in it must not count them again.
    #[test]
    fn the_welcome_gives_the_rooms_counts() {
        let welcome = |reactions: &str| {
            format!(
                r#"{{"type":"welcome","room":"r","you":{{"id":"anon-1","name":"anon-1","verified":false,"perm":"post"}},"epoch":"e","seq":3,"recovered":false,"history":[],"presence":{{"clients":12,"users":9}},"reactions":{reactions}}}"#
            )
        };
        let got = check_welcome(welcome(r#"{"❤️":120,"👏":7}"#).as_bytes(), "r", None).unwrap();
        assert_eq!(
            got,
            Welcome {
                seq: 3,
                presence: Some((12, 9)),
                reactions: [("❤️".to_string(), 120), ("👏".to_string(), 7)].into(),
            }
        );
        assert!(check_welcome(welcome("{}").as_bytes(), "r", None)
            .unwrap()
            .reactions
            .is_empty());
        for bad in [r#"{"x":-1}"#, "[1]", r#""many""#] {
            assert!(
                check_welcome(welcome(bad).as_bytes(), "r", None).is_err(),
                "{bad}"
            );
        }
    }

    /// A v1 tap is a `react` the server's codec takes; a relayed one is the plain `reaction`
    /// message the demo page sent before roomcast.v1, whose key a page finds in `emoji`.
    #[test]
    fn taps_are_what_the_server_and_a_plain_page_read() {
        for key in ["❤️", "👏", r#"a"b"#, "x"] {
            let tap = String::from_utf8(tap_payload(key, false)).unwrap();
            match codec::parse(&tap) {
                Ok(codec::Incoming::React(read)) => assert_eq!(read, key),
                other => panic!("the server would not take {tap}: {other:?}"),
            }
            let relayed: serde_json::Value =
                serde_json::from_slice(&tap_payload(key, true)).unwrap();
            assert_eq!(
                relayed,
                serde_json::json!({"type": "reaction", "emoji": key})
            );
        }
    }

    #[test]
    fn stream_flags_are_checked_against_each_other_and_the_bucket() {
        let args = parse("stream", None).unwrap();
        assert!(args.v1, "stream is v1 unless --relayed");
        assert_eq!(args.clients, 10_000);
        assert_eq!(args.duration, Duration::from_secs(20));
        assert_eq!(args.stream, StreamArgs::default());
        assert_eq!(args.stream.keys, ["❤️", "👏", "😂"]);
        let args = parse(
            "stream --viewers 500 --chatters 10 --chat-rate 5 --tappers 20 --tap-rate 100 \
             --keys a,b --relayed --reaction-interval 100ms --duration 2",
            None,
        )
        .unwrap();
        assert!(!args.v1 && args.stream.relayed);
        assert_eq!(args.clients, 500);
        assert_eq!((args.stream.chatters, args.stream.tappers), (10, 20));
        assert_eq!((args.stream.chat_rate, args.stream.tap_rate), (5.0, 100.0));
        assert_eq!(args.stream.keys, ["a", "b"]);
        assert_eq!(args.stream.reaction_interval, Duration::from_millis(100));
        // 2,000 taps/s over 50 tappers is 40 each, over the server's default 20.
        let refused = parse("stream --tappers 50", None).err().unwrap();
        assert!(
            refused.starts_with(
                "40.0 taps/s per tapper is over the server's per-user reaction rate (20/s)"
            ),
            "{refused}"
        );
        assert!(parse("stream --tappers 50 --reaction-rate 40", None).is_ok());
        // Relayed taps are messages, under the message rate limit instead.
        assert!(parse("stream --tappers 50 --relayed", None).is_ok());
        for (line, error) in [
            (
                "stream --v1 --relayed",
                "stream runs on roomcast.v1 unless --relayed: not both",
            ),
            (
                "stream --viewers 250",
                "--chatters 100 and --tappers 200 are among the --viewers 250: too many",
            ),
            ("stream --chatters 0", "--chat-rate needs --chatters"),
            ("stream --tappers 0", "--tap-rate needs --tappers"),
            ("stream --keys a,,b", "--keys: \"\" is not 1-32 bytes"),
            ("stream --keys a,b,a", "--keys: a key is listed twice"),
            ("stream --tap-rate -1", "bad value for --tap-rate: -1"),
            ("stream --chat-rate inf", "bad value for --chat-rate: inf"),
            (
                "fanout --tappers 5",
                "--relayed, --chatters, --tappers, --keys and their rates are for stream",
            ),
            (
                "fanout --relayed",
                "--relayed, --chatters, --tappers, --keys and their rates are for stream",
            ),
        ] {
            assert_eq!(parse(line, None).err().as_deref(), Some(error), "{line}");
        }
        let long = "k".repeat(33);
        assert!(parse(&format!("stream --keys {long}"), None).is_err());
        let many: Vec<String> = (0..=MAX_ROOM_KEYS).map(|i| i.to_string()).collect();
        assert!(parse(&format!("stream --keys {}", many.join(",")), None).is_err());
        assert!(parse("stream --reaction-interval 0", None).is_err());
        assert!(parse(
            "stream --tap-rate 0 --tappers 0 --chat-rate 0 --chatters 0",
            None
        )
        .is_ok());
    }

    #[test]
    fn decimals_read_up_to_the_first_other_byte() {
        assert_eq!(parse_decimal(b"1043,"), Some((1043, &b","[..])));
        assert_eq!(
            parse_decimal(b"18446744073709551615"),
            Some((u64::MAX, &b""[..]))
        );
        assert_eq!(parse_decimal(b"18446744073709551616,"), None);
        assert_eq!(parse_decimal(b",1"), None);
    }
}
