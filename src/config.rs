//! Command-line configuration: every limit the server enforces, its default, its range, and
//! the parsing of flags and of their environment variables.
//!
//! Every flag has a safe default so `roomcast` with no arguments is a sensible server, and an
//! upper bound, so no value can overflow a deadline or an allocation later on. Each flag can
//! also be set by an environment variable (`--max-clients` ↔ `ROOMCAST_MAX_CLIENTS`), which
//! keeps secrets out of `ps`; a flag on the command line wins. `--help` prints the same table
//! as the README.

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

use crate::http::origin::Origin;
use crate::v1::token::{self, Perm};

/// Where the server listens unless `--listen` says otherwise: loopback, so a first
/// `cargo run` never exposes anything to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9001";
/// Largest message a client may send. Chat lines and reactions are far smaller; a limit keeps
/// one client from making the server buffer (and relay) megabytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Sustained messages per second per client (token bucket refill rate).
pub const DEFAULT_RATE: u32 = 50;
/// Messages a client may send at once before the sustained rate applies.
pub const DEFAULT_BURST: u32 = 100;
/// Per-client backlog of unsent bytes before the client is evicted as slow.
/// Never below `OUTBOX_MESSAGE_MULTIPLE × max_message_bytes`.
pub const DEFAULT_OUTBOX_BYTES: usize = 1024 * 1024;
/// The largest `--max-message-bytes` accepted. Tungstenite reserves a frame's announced length
/// before reading it, so the message limit bounds that allocation; beyond 1 GiB a single client
/// could make the server reserve absurd amounts (or overflow the reservation outright).
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 1 << 30;
/// The outbox holds at least this many maximum-size messages, so a single legal message can
/// never evict a healthy client.
pub const OUTBOX_MESSAGE_MULTIPLE: usize = 2;
/// The largest header of a server frame (2 bytes and an 8-byte length; server frames are not
/// masked).
pub const MAX_FRAME_HEADER_BYTES: usize = 10;
/// Room the outbox always has besides two maximum-size messages, whatever the flags: the
/// `101` response and a few control frames (a pong carries up to 125 bytes) between them.
pub const MIN_OUTBOX_BYTES: usize = 4096;
/// How long a client may stay backlogged (bytes queued that the kernel will not take).
pub const DEFAULT_SLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the whole HTTP request head, so slowloris clients cannot hold a thread.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A client quiet for this long is pinged. Must be less than `DEFAULT_IDLE_TIMEOUT`,
/// so a live client always has a chance to answer before it is dropped.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);
/// A client from which nothing (not even a pong) arrives for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown waits for clients to take their close frames before cutting sockets.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a crashed instance's clients still count in the cluster-wide room counts (the TTL
/// of its presence hash in Redis, refreshed every third of it).
pub const DEFAULT_REDIS_TTL: Duration = Duration::from_secs(15);
/// How long a room's state (epoch, seq) is kept after its last member leaves (PROTOCOL §5).
pub const DEFAULT_ROOM_TTL: Duration = Duration::from_secs(600);
/// Messages a room keeps for `welcome.history` and resumes (PROTOCOL §5).
pub const DEFAULT_HISTORY: usize = 50;
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(600);
pub const DEFAULT_HISTORY_BUDGET: usize = 64 << 20;
pub const DEFAULT_PRESENCE_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_REACTION_INTERVAL: Duration = Duration::from_millis(250);
pub const DEFAULT_REACTION_RATE: u32 = 20;
pub const DEFAULT_REACTION_BURST: u32 = 40;
/// How long a token from `roomcast token` is valid unless `--ttl` says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60 * 60);
/// Whether this build has the Redis backplane (cargo feature `redis`).
pub const HAS_REDIS: bool = cfg!(feature = "redis");

// The ranges. Every size and duration has an upper bound: a deadline computed as
// `Instant::now() + timeout` panics on overflow, and a size multiplies into allocations, so an
// absurd value must be refused at start rather than hit by the first client. Each bound is far
// beyond any sensible setting, so it refuses typos, not choices.

/// `--max-clients` and `--max-clients-per-ip`: every client is a thread, and Linux caps
/// `pid_max` (and so the threads of the whole system) at 2^22.
pub const MAX_CLIENTS_RANGE: RangeInclusive<usize> = 1..=1 << 22;
/// `--max-clients-per-ip`; 0 is off.
pub const MAX_CLIENTS_PER_IP_RANGE: RangeInclusive<usize> = 0..=1 << 22;
/// `--max-message-bytes` (see `MAX_MESSAGE_BYTES_LIMIT`).
pub const MAX_MESSAGE_BYTES_RANGE: RangeInclusive<usize> = 1..=MAX_MESSAGE_BYTES_LIMIT;
/// `--rate`, messages per second per client; 0 is off. A million a second is more than one
/// client can send over loopback: a larger limit would never bind, so use 0.
pub const RATE_RANGE: RangeInclusive<u32> = 0..=1_000_000;
/// `--burst`, messages at once; at least 1 while `--rate` is on (checked in `validate`).
pub const BURST_RANGE: RangeInclusive<u32> = 0..=1_000_000;
/// `--outbox-bytes`, the unsent bytes one client may pin. Below `OUTBOX_MESSAGE_MULTIPLE`
/// messages it is raised (so 0 means "that minimum"); 4 GiB for one client is already more
/// than the machines this runs on have.
pub const OUTBOX_BYTES_RANGE: RangeInclusive<usize> = 0..=4 << 30;
/// `--handshake-timeout`: a request head that takes an hour is an attack, not a client.
pub const HANDSHAKE_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(60 * 60);
/// `--slow-timeout`: an hour of backlog is a dead client.
pub const SLOW_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(60 * 60);
/// `--ping-interval`, below `--idle-timeout` (checked in `validate`), whose bound is twice
/// this: a ping twice a day is no heartbeat any more.
pub const PING_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(12 * 60 * 60);
/// `--idle-timeout`: a day of silence is longer than any stream.
pub const IDLE_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(24 * 60 * 60);
/// `--shutdown-grace`: orchestrators kill a process long before ten minutes (systemd's
/// default stop timeout is 90 s, Kubernetes' grace period 30 s).
pub const SHUTDOWN_GRACE_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(10 * 60);
/// `--redis-ttl`: the heartbeat (a third of it) must leave Redis time to answer, and a crashed
/// instance's clients should not linger for more than an hour.
pub const REDIS_TTL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(300)..=Duration::from_secs(60 * 60);
/// The publish API token, in bytes. 16 random bytes are beyond guessing even at the rate a
/// server answers; a token must also fit easily in the 16 KiB request head that carries it.
pub const API_TOKEN_BYTES_RANGE: RangeInclusive<usize> = 16..=4096;

/// `--max-connections-per-user`; 0 is off. No user can hold more connections than the server
/// has threads, so the bound is `MAX_CLIENTS_RANGE`'s.
pub const MAX_CONNECTIONS_PER_USER_RANGE: RangeInclusive<usize> = 0..=1 << 22;
/// `--room-ttl`: under a second, a viewer whose page reloads would find a new epoch; a room's
/// state kept for more than a day after everyone left is a leak, not a feature.
pub const ROOM_TTL_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 60 * 60);
/// `--history`: 0 turns history off; ten thousand messages is a long scroll back, and each
/// is held in memory (bounded in all by `--history-budget`).
pub const HISTORY_RANGE: RangeInclusive<usize> = 0..=10_000;
/// `--history-ttl`: as `--room-ttl`.
pub const HISTORY_TTL_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 60 * 60);
/// `--history-budget`: all rooms' history bytes together; 16 GiB is past any machine this
/// runs on.
pub const HISTORY_BUDGET_RANGE: RangeInclusive<usize> = 0..=16 << 30;
/// The smallest `--history-budget` but 0 (off).
pub const MIN_HISTORY_BUDGET: usize = 1 << 20;
/// `--presence-interval`, `--reaction-interval`: faster than 50 ms is faster than a page
/// redraws a counter; slower than a minute is no longer live.
pub const LIVE_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(50)..=Duration::from_secs(60);
/// `--reaction-rate`/`--reaction-burst` taps per user; 0 rate is unlimited.
pub const REACTION_RATE_RANGE: RangeInclusive<u32> = 0..=100_000;
pub const REACTION_BURST_RANGE: RangeInclusive<u32> = 1..=100_000;
/// Keys `--reaction-keys` may list: a room counts at most this many distinct keys anyway.
pub const MAX_REACTION_KEYS: usize = 64;
/// A join-token secret, in bytes (see `token::MIN_SECRET_BYTES`); the upper bound only keeps a
/// secret file from being something else.
pub const TOKEN_SECRET_BYTES_RANGE: RangeInclusive<usize> = token::MIN_SECRET_BYTES..=4096;
/// `roomcast token --ttl`: past 30 days a join token is a password, and leaks like one.
pub const TOKEN_TTL_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(30 * 24 * 60 * 60);

/// The environment variable that sets the publish API token (`env_var("--api-token")`).
pub const API_TOKEN_ENV: &str = "ROOMCAST_API_TOKEN";
/// The environment variable that sets the join-token secret (`env_var("--token-secret")`).
pub const TOKEN_SECRET_ENV: &str = "ROOMCAST_TOKEN_SECRET";
/// What every environment variable's name starts with.
pub const ENV_PREFIX: &str = "ROOMCAST_";

/// Every flag that takes a value, in `--help` order. Each has an environment variable, named
/// by `env_var`.
pub const FLAGS: &[&str] = &[
    "--listen",
    "--max-clients",
    "--max-clients-per-ip",
    "--max-message-bytes",
    "--rate",
    "--burst",
    "--outbox-bytes",
    "--slow-timeout",
    "--handshake-timeout",
    "--ping-interval",
    "--idle-timeout",
    "--shutdown-grace",
    "--allowed-origin",
    "--api-token",
    "--api-token-file",
    "--log-level",
    "--log-file",
    "--redis",
    "--redis-ttl",
    // roomcast.v1 (PROTOCOL.md).
    "--token-secret",
    "--token-secret-file",
    "--token-secret-previous",
    "--max-connections-per-user",
    "--room-ttl",
    "--history",
    "--history-ttl",
    "--history-budget",
    "--presence-interval",
    "--reaction-interval",
    "--reaction-rate",
    "--reaction-burst",
    "--reaction-keys",
];

/// The flags of `roomcast token`, which take no environment variables of their own (the
/// secret's two flags read `ROOMCAST_TOKEN_SECRET` and `ROOMCAST_TOKEN_SECRET_FILE`).
pub const TOKEN_COMMAND_FLAGS: &[&str] = &[
    "--room",
    "--sub",
    "--name",
    "--perm",
    "--ttl",
    "--token-secret",
    "--token-secret-file",
];

/// Everything the server needs to know, fixed at start-up and shared read-only by every thread.
///
/// `Debug` is written by hand so that a `{:?}` of a config never shows the API token or the
/// Redis password.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None` derives the limit from the machine at start-up (see `capacity`).
    pub max_clients: Option<usize>,
    /// 0 turns the per-IP cap off.
    pub max_clients_per_ip: usize,
    pub max_message_bytes: usize,
    /// Messages per second; 0 turns rate limiting off.
    pub rate: u32,
    pub burst: u32,
    pub outbox_bytes: usize,
    pub slow_timeout: Duration,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Empty allows any origin (and clients that send none).
    pub allowed_origins: Vec<Origin>,
    /// Bearer token for `POST /api/rooms/<room>/messages`; `None` turns that endpoint off.
    /// From `--api-token`, `--api-token-file` or their variables; `parse_args` holds it to
    /// `API_TOKEN_BYTES_RANGE` of printable ASCII. A secret: never logged.
    pub api_token: Option<String>,
    pub log_level: LevelFilter,
    pub log_file: Option<PathBuf>,
    /// `redis://[USER:PASSWORD@]HOST:PORT/DB` of the backplane shared with other instances;
    /// `None` runs alone. It may hold a password: print it only through `redact_url`.
    pub redis: Option<String>,
    pub redis_ttl: Duration,
    /// HS256 secrets that sign join tokens (`--token-secret`, then
    /// `ROOMCAST_TOKEN_SECRET_PREVIOUS` while rotating); empty is open mode, where anyone may
    /// join any room. Secrets: never logged.
    pub token_secrets: Vec<String>,
    /// Connections one user (a token's `sub`) may hold at once; 0 turns the cap off.
    pub max_connections_per_user: usize,
    /// How long a room's state (epoch, seq) outlives its last member.
    pub room_ttl: Duration,
    /// Messages each room keeps (0: none), none older than `history_ttl`, all rooms' together
    /// within `history_budget` bytes.
    pub history: usize,
    pub history_ttl: Duration,
    pub history_budget: usize,
    /// Each room's `presence` and `reactions` frames go out at most once per interval.
    pub presence_interval: Duration,
    pub reaction_interval: Duration,
    /// Taps per second and burst per user; excess taps are dropped and counted.
    pub reaction_rate: u32,
    pub reaction_burst: u32,
    /// The reaction keys allowed; empty allows any.
    pub reaction_keys: Vec<String>,
    /// Test-only failure hook, never set from the command line: the broadcaster panics when it
    /// relays a message to this room. The supervision tests use it to check that a dead
    /// broadcaster takes the server down loudly instead of leaving it up and relaying nothing.
    #[doc(hidden)]
    pub test_panic_in_room: Option<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a valid address"),
            max_clients: None,
            max_clients_per_ip: 0,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
            outbox_bytes: DEFAULT_OUTBOX_BYTES,
            slow_timeout: DEFAULT_SLOW_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            allowed_origins: Vec::new(),
            api_token: None,
            log_level: LevelFilter::Info,
            log_file: None,
            redis: None,
            redis_ttl: DEFAULT_REDIS_TTL,
            token_secrets: Vec::new(),
            max_connections_per_user: 0,
            room_ttl: DEFAULT_ROOM_TTL,
            history: DEFAULT_HISTORY,
            history_ttl: DEFAULT_HISTORY_TTL,
            history_budget: DEFAULT_HISTORY_BUDGET,
            presence_interval: DEFAULT_PRESENCE_INTERVAL,
            reaction_interval: DEFAULT_REACTION_INTERVAL,
            reaction_rate: DEFAULT_REACTION_RATE,
            reaction_burst: DEFAULT_REACTION_BURST,
            reaction_keys: Vec::new(),
            test_panic_in_room: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured without `..`, so a field added later does not compile until it is
        // listed here, and whoever adds it decides whether it is a secret.
        let Config {
            listen,
            max_clients,
            max_clients_per_ip,
            max_message_bytes,
            rate,
            burst,
            outbox_bytes,
            slow_timeout,
            handshake_timeout,
            ping_interval,
            idle_timeout,
            shutdown_grace,
            allowed_origins,
            api_token,
            log_level,
            log_file,
            redis,
            redis_ttl,
            token_secrets,
            max_connections_per_user,
            room_ttl,
            history,
            history_ttl,
            history_budget,
            presence_interval,
            reaction_interval,
            reaction_rate,
            reaction_burst,
            reaction_keys,
            test_panic_in_room,
        } = self;
        f.debug_struct("Config")
            .field("listen", listen)
            .field("max_clients", max_clients)
            .field("max_clients_per_ip", max_clients_per_ip)
            .field("max_message_bytes", max_message_bytes)
            .field("rate", rate)
            .field("burst", burst)
            .field("outbox_bytes", outbox_bytes)
            .field("slow_timeout", slow_timeout)
            .field("handshake_timeout", handshake_timeout)
            .field("ping_interval", ping_interval)
            .field("idle_timeout", idle_timeout)
            .field("shutdown_grace", shutdown_grace)
            .field("allowed_origins", allowed_origins)
            .field("api_token", &api_token.as_ref().map(|_| "***"))
            .field("log_level", log_level)
            .field("log_file", log_file)
            .field("redis", &redis.as_deref().map(redact_url))
            .field("redis_ttl", redis_ttl)
            .field("token_secrets", &vec!["***"; token_secrets.len()])
            .field("max_connections_per_user", max_connections_per_user)
            .field("room_ttl", room_ttl)
            .field("history", history)
            .field("history_ttl", history_ttl)
            .field("history_budget", history_budget)
            .field("presence_interval", presence_interval)
            .field("reaction_interval", reaction_interval)
            .field("reaction_rate", reaction_rate)
            .field("reaction_burst", reaction_burst)
            .field("reaction_keys", reaction_keys)
            .field("test_panic_in_room", test_panic_in_room)
            .finish()
    }
}

impl Config {
    /// The outbox bound actually enforced: the configured one, raised if needed so that
    /// `OUTBOX_MESSAGE_MULTIPLE` maximum-size messages always fit, as frames (with their header
    /// and the outbox's charge per entry), with `MIN_OUTBOX_BYTES` to spare for the `101` and
    /// control frames (pings, pongs, the close) queued between them.
    pub fn effective_outbox_bytes(&self) -> usize {
        let frame = self
            .max_frame_bytes()
            .saturating_add(crate::relay::outbox::ENTRY_OVERHEAD_BYTES);
        self.outbox_bytes.max(
            OUTBOX_MESSAGE_MULTIPLE
                .saturating_mul(frame)
                .saturating_add(MIN_OUTBOX_BYTES),
        )
    }

    /// The largest frame one message can become, with its header: a plain frame of
    /// `--max-message-bytes`, or the v1 `message` frame of it, which is larger (a text of
    /// control characters escapes to 6 bytes a byte; see `codec::max_message_json_bytes`).
    pub fn max_frame_bytes(&self) -> usize {
        crate::v1::codec::max_message_json_bytes(self.max_message_bytes)
            .max(self.max_message_bytes)
            .saturating_add(MAX_FRAME_HEADER_BYTES)
    }

    /// Checks every value against its range, and the relations between flags that no single
    /// flag can check alone. `parse_args` has already checked the ranges (naming the flag or
    /// variable the value came from); this catches a `Config` built in code, before a
    /// deadline overflows.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(max_clients) = self.max_clients {
            check_count("--max-clients", max_clients, &MAX_CLIENTS_RANGE)?;
        }
        check_count(
            "--max-clients-per-ip",
            self.max_clients_per_ip,
            &MAX_CLIENTS_PER_IP_RANGE,
        )?;
        check_bytes(
            "--max-message-bytes",
            self.max_message_bytes,
            &MAX_MESSAGE_BYTES_RANGE,
        )?;
        check_count("--rate", self.rate, &RATE_RANGE)?;
        check_count("--burst", self.burst, &BURST_RANGE)?;
        check_bytes("--outbox-bytes", self.outbox_bytes, &OUTBOX_BYTES_RANGE)?;
        for (flag, value, range) in [
            ("--slow-timeout", self.slow_timeout, &SLOW_TIMEOUT_RANGE),
            (
                "--handshake-timeout",
                self.handshake_timeout,
                &HANDSHAKE_TIMEOUT_RANGE,
            ),
            ("--ping-interval", self.ping_interval, &PING_INTERVAL_RANGE),
            ("--idle-timeout", self.idle_timeout, &IDLE_TIMEOUT_RANGE),
            (
                "--shutdown-grace",
                self.shutdown_grace,
                &SHUTDOWN_GRACE_RANGE,
            ),
            ("--redis-ttl", self.redis_ttl, &REDIS_TTL_RANGE),
            ("--room-ttl", self.room_ttl, &ROOM_TTL_RANGE),
            ("--history-ttl", self.history_ttl, &HISTORY_TTL_RANGE),
            (
                "--presence-interval",
                self.presence_interval,
                &LIVE_INTERVAL_RANGE,
            ),
            (
                "--reaction-interval",
                self.reaction_interval,
                &LIVE_INTERVAL_RANGE,
            ),
        ] {
            check_duration(flag, value, range)?;
        }
        check_count(
            "--max-connections-per-user",
            self.max_connections_per_user,
            &MAX_CONNECTIONS_PER_USER_RANGE,
        )?;
        check_count("--history", self.history, &HISTORY_RANGE)?;
        check_count(
            "--history-budget",
            self.history_budget,
            &HISTORY_BUDGET_RANGE,
        )?;
        if self.history_budget > 0 && self.history_budget < MIN_HISTORY_BUDGET {
            // A budget smaller than a few messages would give a room's history up, and renew
            // its epoch, at nearly every message.
            return Err(ConfigError::new(
                "--history-budget",
                "must be 0 (history off) or at least 1MiB",
            ));
        }
        check_count("--reaction-rate", self.reaction_rate, &REACTION_RATE_RANGE)?;
        check_count(
            "--reaction-burst",
            self.reaction_burst,
            &REACTION_BURST_RANGE,
        )?;
        if self.reaction_keys.len() > MAX_REACTION_KEYS {
            return Err(ConfigError::new(
                "--reaction-keys",
                format!(
                    "lists {} keys; at most {MAX_REACTION_KEYS}",
                    self.reaction_keys.len()
                ),
            ));
        }
        for secret in &self.token_secrets {
            check_token_secret("--token-secret", secret)?;
        }
        if self.ping_interval >= self.idle_timeout {
            return Err(ConfigError::new(
                "--ping-interval",
                format!(
                    "{} must be less than --idle-timeout ({}); the ping interval's default is {}, so set both",
                    show_duration(self.ping_interval),
                    show_duration(self.idle_timeout),
                    show_duration(DEFAULT_PING_INTERVAL),
                ),
            ));
        }
        if self.rate > 0 && self.burst == 0 {
            return Err(ConfigError::new(
                "--burst",
                "must be at least 1 when --rate is on",
            ));
        }
        if let Some(url) = &self.redis {
            if !HAS_REDIS {
                return Err(ConfigError::new(
                    "--redis",
                    "this roomcast was built without Redis support; rebuild with `cargo build --release --features redis`",
                ));
            }
            if !url.starts_with("redis://") || !is_redis_url(url) {
                return Err(ConfigError::new(
                    "--redis",
                    format!(
                        "{:?} is not a URL like redis://127.0.0.1:6379/0",
                        redact_url(url)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What the command line asked for: run with a config, mint a join token (`roomcast token`),
/// or print something and exit 0.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    Token(Box<TokenRequest>),
    Help,
    Version,
}

/// What `roomcast token` mints: one join token for `room` and `sub`, signed with the current
/// secret, valid for `ttl` from now. Every claim has passed the checks `token::verify` makes,
/// so the server never refuses the token for its contents.
///
/// `Debug` is written by hand: the secret never shows.
#[derive(Clone, PartialEq)]
pub struct TokenRequest {
    pub secret: String,
    /// A room name, or `token::ANY_ROOM`.
    pub room: String,
    pub sub: String,
    pub name: Option<String>,
    /// `None` leaves the claim out (the server reads it as `post`).
    pub perm: Option<Perm>,
    pub ttl: Duration,
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let TokenRequest {
            secret: _,
            room,
            sub,
            name,
            perm,
            ttl,
        } = self;
        f.debug_struct("TokenRequest")
            .field("secret", &"***")
            .field("room", room)
            .field("sub", sub)
            .field("name", name)
            .field("perm", perm)
            .field("ttl", ttl)
            .finish()
    }
}

/// A bad flag or value. Displays as one line naming the flag (or the environment variable the
/// value came from), as `main` prints it.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub flag: String,
    pub problem: String,
}

impl ConfigError {
    fn new(flag: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            flag: flag.to_string(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.flag, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// The environment variable of a flag: `ROOMCAST_` and the flag's name upper-cased, `-` as
/// `_` (`--max-clients` ↔ `ROOMCAST_MAX_CLIENTS`).
pub fn env_var(flag: &str) -> String {
    let name = flag.trim_start_matches('-').to_ascii_uppercase();
    format!("{ENV_PREFIX}{}", name.replace('-', "_"))
}

/// The `ROOMCAST_*` names among `names` that no flag reads: most likely typos
/// (`ROOMCAST_MAX_CLIENT`), which would otherwise leave a default silently in force.
/// `ROOMCAST_REQUIRE_ALL` belongs to the test suite and is not reported.
pub fn unknown_variables<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let known: Vec<String> = FLAGS.iter().map(|flag| env_var(flag)).collect();
    names
        .into_iter()
        .filter(|name| name.starts_with(ENV_PREFIX) && *name != "ROOMCAST_REQUIRE_ALL")
        .filter(|name| !known.iter().any(|k| k == name))
        .collect()
}

/// Parses the arguments after the program name, with the process environment for the flags
/// they leave out. See `parse_args_from`.
pub fn parse_args<I, S>(args: I) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    parse_args_from(args, |name| std::env::var_os(name))
}

/// One value for a flag, and where it came from.
struct Setting {
    flag: &'static str,
    /// What the user wrote: the flag, or its environment variable. Errors name this.
    source: String,
    value: String,
}

/// Parses the arguments after the program name; `env` looks up an environment variable (the
/// process's in `parse_args`, a map in tests).
///
/// Flags take their value either as the next argument (`--rate 10`) or inline
/// (`--rate=10`). Unknown flags and stray arguments are errors, never ignored: a typo in a
/// limit must not silently leave the default in force.
///
/// A flag left out of the command line is read from its variable (`env_var`); an empty
/// variable counts as unset. `--api-token` and `--api-token-file` set the same thing, so either
/// on the command line overrides both variables; so do `--token-secret` and
/// `--token-secret-file`.
///
/// A first argument `token` is the `roomcast token` subcommand (`parse_token_command`).
pub fn parse_args_from<I, S>(
    args: I,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut from_args = Vec::new();
    let mut args = args.into_iter().map(Into::into).peekable();
    if args.peek().is_some_and(|first| first == "token") {
        args.next();
        return parse_token_command(args, env);
    }
    while let Some(arg) = args.next() {
        let (flag, inline) = split_flag(&arg);
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            _ => {}
        }
        if !flag.starts_with("--") {
            return Err(ConfigError::new(flag, "unexpected argument (see --help)"));
        }
        let Some(&flag) = FLAGS.iter().find(|known| **known == flag) else {
            return Err(ConfigError::new(flag, "unknown flag (see --help)"));
        };
        let value = match inline {
            Some(value) => value.to_string(),
            None => args
                .next()
                .ok_or_else(|| ConfigError::new(flag, "needs a value"))?,
        };
        if value.is_empty() {
            return Err(ConfigError::new(flag, "must not be empty"));
        }
        from_args.push(Setting {
            flag,
            source: flag.to_string(),
            value,
        });
    }

    let mut settings = variables_left_out(FLAGS, &from_args, &env)?;
    // After the variables, so the command line has the last word.
    settings.extend(from_args);

    let mut config = Config::default();
    let (mut api_token, mut token_secret, mut previous_secret) = (Vec::new(), Vec::new(), None);
    for setting in &settings {
        match one_setting(setting.flag) {
            "--api-token" => api_token.push(setting),
            "--token-secret" => token_secret.push(setting),
            "--token-secret-previous" => previous_secret = Some(setting),
            _ => apply(&mut config, setting)?,
        }
    }
    if let Some(setting) = one_source(&api_token, "token")? {
        let value = match setting.flag {
            "--api-token-file" => read_secret_file(
                &setting.source,
                &setting.value,
                "a token",
                *API_TOKEN_BYTES_RANGE.end(),
            )?,
            _ => setting.value.clone(),
        };
        check_token(&setting.source, &value)?;
        config.api_token = Some(value);
    }
    if let Some(setting) = one_source(&token_secret, "secret")? {
        config.token_secrets.push(token_secret_of(setting)?);
    }
    if let Some(setting) = previous_secret {
        // Checked first, so a short previous secret is named as such.
        let previous = token_secret_of(setting)?;
        if config.token_secrets.is_empty() {
            return Err(ConfigError::new(
                &setting.source,
                format!(
                    "needs the current secret too ({TOKEN_SECRET_ENV}, --token-secret-file or --token-secret): the previous one only keeps tokens minted before a rotation valid"
                ),
            ));
        }
        config.token_secrets.push(previous);
    }
    config.validate().map_err(|mut err| {
        // A relation between flags fails on the value as given: name where it came from.
        if let Some(setting) = settings.iter().rev().find(|s| s.flag == err.flag) {
            err.flag.clone_from(&setting.source);
        }
        err
    })?;
    Ok(Command::Run(Box::new(config)))
}

/// Parses the arguments of `roomcast token` (after `token`): `--room ROOM --sub USER [--name
/// NAME] [--perm read|react|post] [--ttl DUR]`, and the secret from `--token-secret`,
/// `--token-secret-file` or their variables, as the server reads it. Each claim is held to the
/// rules `token::verify` applies, so what is minted is never refused for its contents.
fn parse_token_command(
    args: impl Iterator<Item = String>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Command, ConfigError> {
    let mut from_args = Vec::new();
    let mut args = args;
    while let Some(arg) = args.next() {
        let (flag, inline) = split_flag(&arg);
        if matches!(flag, "-h" | "--help") {
            return Ok(Command::Help);
        }
        let Some(&flag) = TOKEN_COMMAND_FLAGS.iter().find(|known| **known == flag) else {
            return Err(ConfigError::new(
                flag,
                "is not a flag of roomcast token (see --help)",
            ));
        };
        let value = match inline {
            Some(value) => value.to_string(),
            None => args
                .next()
                .ok_or_else(|| ConfigError::new(flag, "needs a value"))?,
        };
        from_args.push(Setting {
            flag,
            source: flag.to_string(),
            value,
        });
    }
    let last = |flag: &str| from_args.iter().rev().find(|given| given.flag == flag);

    let secret_flags = ["--token-secret", "--token-secret-file"];
    let variables = variables_left_out(&secret_flags, &from_args, &env)?;
    // The variables first, so the command line has the last word.
    let secrets: Vec<&Setting> = variables
        .iter()
        .chain(
            from_args
                .iter()
                .filter(|given| secret_flags.contains(&given.flag)),
        )
        .collect();
    let secret = match one_source(&secrets, "secret")? {
        Some(setting) => token_secret_of(setting)?,
        None => {
            return Err(ConfigError::new(
                "--token-secret",
                format!("roomcast token signs with the server's secret: set {TOKEN_SECRET_ENV} (or ROOMCAST_TOKEN_SECRET_FILE, or --token-secret-file PATH)"),
            ))
        }
    };

    let room = last("--room")
        .ok_or_else(|| ConfigError::new("--room", "is required: the room the token opens, or *"))?
        .value
        .clone();
    if !token::is_valid_room_claim(&room) {
        return Err(ConfigError::new(
            "--room",
            format!("{room:?} is not a room name ([A-Za-z0-9_.-]{{1,64}}, not . or ..) nor *"),
        ));
    }
    let sub = last("--sub")
        .ok_or_else(|| ConfigError::new("--sub", "is required: the user id"))?
        .value
        .clone();
    if !token::is_valid_sub(&sub) {
        return Err(ConfigError::new(
            "--sub",
            format!(
                "is {} bytes: a user id has 1 to {}",
                sub.len(),
                token::MAX_SUB_BYTES
            ),
        ));
    }
    let name = last("--name").map(|given| given.value.clone());
    if let Some(name) = name.as_deref().filter(|name| !token::is_valid_name(name)) {
        return Err(ConfigError::new(
            "--name",
            format!(
                "is {} bytes: a display name has at most {}",
                name.len(),
                token::MAX_NAME_BYTES
            ),
        ));
    }
    let perm = last("--perm")
        .map(|given| {
            Perm::parse(&given.value).ok_or_else(|| {
                ConfigError::new(
                    "--perm",
                    format!("{:?} is not one of read, react, post", given.value),
                )
            })
        })
        .transpose()?;
    let ttl = match last("--ttl") {
        Some(given) => parse_duration("--ttl", &given.value, &TOKEN_TTL_RANGE)?,
        None => DEFAULT_TOKEN_TTL,
    };
    Ok(Command::Token(Box::new(TokenRequest {
        secret,
        room,
        sub,
        // Empty is absent, as `token::verify` reads it.
        name: name.filter(|name| !name.is_empty()),
        perm,
        ttl,
    })))
}

/// Splits `--flag=value` into the flag and its inline value; anything else is all flag.
fn split_flag(arg: &str) -> (&str, Option<&str>) {
    match arg.split_once('=') {
        Some((flag, value)) if flag.starts_with("--") => (flag, Some(value)),
        _ => (arg, None),
    }
}

/// The variables of the `flags` that `from_args` leaves out, as settings; an empty variable
/// counts as unset. A flag given one way on the command line (`--api-token-file`) also leaves
/// out the variable of its other way (`ROOMCAST_API_TOKEN`): see `one_setting`.
fn variables_left_out(
    flags: &[&'static str],
    from_args: &[Setting],
    env: &impl Fn(&str) -> Option<OsString>,
) -> Result<Vec<Setting>, ConfigError> {
    let mut settings = Vec::new();
    for &flag in flags {
        let is_on_command_line = from_args
            .iter()
            .any(|given| one_setting(given.flag) == one_setting(flag));
        if is_on_command_line {
            continue;
        }
        let name = env_var(flag);
        let Some(value) = env(&name) else { continue };
        let value = value
            .into_string()
            .map_err(|_| ConfigError::new(&name, "is not valid UTF-8"))?;
        if !value.is_empty() {
            settings.push(Setting {
                flag,
                source: name,
                value,
            });
        }
    }
    Ok(settings)
}

/// The setting a flag gives: itself, or for a flag that reads a secret from a file, the flag
/// that gives it directly. The two ways are one setting: either on the command line overrides
/// both variables, and both at once are a conflict (`one_source`).
fn one_setting(flag: &'static str) -> &'static str {
    match flag {
        "--api-token-file" => "--api-token",
        "--token-secret-file" => "--token-secret",
        _ => flag,
    }
}

/// The one setting among `given` (the ways of one setting, in order, the command line last),
/// or a conflict naming both when it was given two ways. One way twice is no conflict: the
/// last wins, as for any flag.
fn one_source<'a>(given: &[&'a Setting], what: &str) -> Result<Option<&'a Setting>, ConfigError> {
    let mut chosen: Option<&Setting> = None;
    for &setting in given {
        if let Some(earlier) = chosen.filter(|earlier| earlier.flag != setting.flag) {
            return Err(ConfigError::new(
                &setting.source,
                format!("conflicts with {}: give the {what} one way", earlier.source),
            ));
        }
        chosen = Some(setting);
    }
    Ok(chosen)
}

/// A join-token secret from its setting (the value, or the file `--token-secret-file` names),
/// checked.
fn token_secret_of(setting: &Setting) -> Result<String, ConfigError> {
    let secret = match setting.flag {
        "--token-secret-file" => read_secret_file(
            &setting.source,
            &setting.value,
            "a secret",
            *TOKEN_SECRET_BYTES_RANGE.end(),
        )?,
        _ => setting.value.clone(),
    };
    check_token_secret(&setting.source, &secret)?;
    Ok(secret)
}

/// Sets one flag's value in `config`. Errors name `setting.source`.
fn apply(config: &mut Config, setting: &Setting) -> Result<(), ConfigError> {
    let (name, value) = (setting.source.as_str(), setting.value.as_str());
    match setting.flag {
        "--listen" => {
            config.listen = value.parse().map_err(|_| {
                ConfigError::new(
                    name,
                    format!("{value:?} is not an address like 127.0.0.1:9001"),
                )
            })?
        }
        "--max-clients" => {
            config.max_clients = match value {
                "auto" => None,
                _ => Some(parse_count(name, value, &MAX_CLIENTS_RANGE)?),
            }
        }
        "--max-clients-per-ip" => {
            config.max_clients_per_ip = parse_count(name, value, &MAX_CLIENTS_PER_IP_RANGE)?
        }
        "--max-message-bytes" => {
            config.max_message_bytes = parse_bytes(name, value, &MAX_MESSAGE_BYTES_RANGE)?
        }
        "--rate" => config.rate = parse_count(name, value, &RATE_RANGE)?,
        "--burst" => config.burst = parse_count(name, value, &BURST_RANGE)?,
        "--outbox-bytes" => config.outbox_bytes = parse_bytes(name, value, &OUTBOX_BYTES_RANGE)?,
        "--slow-timeout" => config.slow_timeout = parse_duration(name, value, &SLOW_TIMEOUT_RANGE)?,
        "--handshake-timeout" => {
            config.handshake_timeout = parse_duration(name, value, &HANDSHAKE_TIMEOUT_RANGE)?
        }
        "--ping-interval" => {
            config.ping_interval = parse_duration(name, value, &PING_INTERVAL_RANGE)?
        }
        "--idle-timeout" => config.idle_timeout = parse_duration(name, value, &IDLE_TIMEOUT_RANGE)?,
        "--shutdown-grace" => {
            config.shutdown_grace = parse_duration(name, value, &SHUTDOWN_GRACE_RANGE)?
        }
        "--allowed-origin" => {
            // A comma never occurs in an origin, so a list is unambiguous; it is the only way
            // to give several origins in the one variable.
            for item in value.split(',').map(str::trim) {
                if item.is_empty() {
                    return Err(ConfigError::new(name, "has an empty origin in its list"));
                }
                let origin = Origin::parse(item)
                    .map_err(|reason| ConfigError::new(name, format!("{item:?}: {reason}")))?;
                config.allowed_origins.push(origin);
            }
        }
        "--log-level" => {
            config.log_level = value.parse().map_err(|_| {
                ConfigError::new(
                    name,
                    format!("{value:?} is not one of off, error, warn, info, debug, trace"),
                )
            })?
        }
        "--log-file" => config.log_file = Some(PathBuf::from(value)),
        "--redis" => config.redis = Some(value.to_string()),
        "--redis-ttl" => config.redis_ttl = parse_duration(name, value, &REDIS_TTL_RANGE)?,
        "--max-connections-per-user" => {
            config.max_connections_per_user =
                parse_count(name, value, &MAX_CONNECTIONS_PER_USER_RANGE)?
        }
        "--room-ttl" => config.room_ttl = parse_duration(name, value, &ROOM_TTL_RANGE)?,
        "--history" => config.history = parse_count(name, value, &HISTORY_RANGE)?,
        "--history-ttl" => config.history_ttl = parse_duration(name, value, &HISTORY_TTL_RANGE)?,
        "--history-budget" => {
            config.history_budget = parse_bytes(name, value, &HISTORY_BUDGET_RANGE)?
        }
        "--presence-interval" => {
            config.presence_interval = parse_duration(name, value, &LIVE_INTERVAL_RANGE)?
        }
        "--reaction-interval" => {
            config.reaction_interval = parse_duration(name, value, &LIVE_INTERVAL_RANGE)?
        }
        "--reaction-rate" => config.reaction_rate = parse_count(name, value, &REACTION_RATE_RANGE)?,
        "--reaction-burst" => {
            config.reaction_burst = parse_count(name, value, &REACTION_BURST_RANGE)?
        }
        "--reaction-keys" => {
            let keys: Vec<String> = value.split(',').map(|key| key.trim().to_string()).collect();
            if let Some(bad) = keys
                .iter()
                .find(|key| !(1..=crate::v1::codec::MAX_REACTION_KEY_BYTES).contains(&key.len()))
            {
                return Err(ConfigError::new(
                    name,
                    format!("{bad:?}: a key is 1 to 32 bytes (comma-separated list)"),
                ));
            }
            if keys.len() > MAX_REACTION_KEYS {
                return Err(ConfigError::new(
                    name,
                    format!("lists {} keys; at most {MAX_REACTION_KEYS}", keys.len()),
                ));
            }
            config.reaction_keys = keys;
        }
        // The token and secret flags are read by `parse_args_from` itself; every other flag is
        // above.
        _ => return Err(ConfigError::new(name, "unknown flag (see --help)")),
    }
    Ok(())
}

/// Reads a secret (the API token, a join-token secret) from a file, as systemd's
/// `LoadCredential=` and secret mounts provide it: the whole file, less one trailing newline.
/// Bounded by `max_bytes`, so `/dev/zero` cannot hang start-up; `what` names the secret in
/// the error ("a token").
fn read_secret_file(
    name: &str,
    path: &str,
    what: &str,
    max_bytes: usize,
) -> Result<String, ConfigError> {
    let cannot_read =
        |err: std::io::Error| ConfigError::new(name, format!("cannot read {path:?}: {err}"));
    let limit = max_bytes + "\r\n".len();
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(cannot_read)?
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() > limit {
        return Err(ConfigError::new(
            name,
            format!("{path:?} is longer than {what} can be ({max_bytes} bytes)"),
        ));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| ConfigError::new(name, format!("{path:?} is not text")))?;
    let token = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    Ok(token.to_string())
}

/// Holds a token to `API_TOKEN_BYTES_RANGE` of printable ASCII. A shorter token can be
/// guessed; one with spaces or control characters could never match, because the
/// `Authorization` header it is compared with is trimmed. The error never shows the token.
fn check_token(name: &str, token: &str) -> Result<(), ConfigError> {
    if !API_TOKEN_BYTES_RANGE.contains(&token.len()) {
        return Err(ConfigError::new(
            name,
            format!(
                "the token is {} bytes: it must be between {} and {} (make one with `openssl rand -hex 16`)",
                token.len(),
                API_TOKEN_BYTES_RANGE.start(),
                API_TOKEN_BYTES_RANGE.end()
            ),
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            name,
            "the token must be printable ASCII without spaces (a token file may end in one newline)",
        ));
    }
    Ok(())
}

/// Holds a join-token secret to `TOKEN_SECRET_BYTES_RANGE`, without control characters (a
/// line break inside is a file that holds something else). It is used as its UTF-8 bytes, as
/// PyJWT and jsonwebtoken use a string secret. The error never shows the secret.
fn check_token_secret(name: &str, secret: &str) -> Result<(), ConfigError> {
    if !TOKEN_SECRET_BYTES_RANGE.contains(&secret.len()) {
        return Err(ConfigError::new(
            name,
            format!(
                "the secret is {} bytes: it must be between {} and {} (make one with `openssl rand -hex 32`)",
                secret.len(),
                TOKEN_SECRET_BYTES_RANGE.start(),
                TOKEN_SECRET_BYTES_RANGE.end()
            ),
        ));
    }
    if secret.chars().any(char::is_control) {
        return Err(ConfigError::new(
            name,
            "the secret must not contain control characters (a secret file may end in one newline)",
        ));
    }
    Ok(())
}

/// The secret-bearing flags given on the command line itself, where every local user can read
/// them (`ps`, `/proc/PID/cmdline`): `--api-token`, `--token-secret`,
/// `--token-secret-previous`, and `--redis` with credentials in its URL. `main` warns about
/// each; the variables and the `-file` flags keep them private.
pub fn secrets_on_command_line<S: AsRef<str>>(args: &[S]) -> Vec<&'static str> {
    let mut found = Vec::new();
    let mut args = args.iter().map(AsRef::as_ref);
    while let Some(arg) = args.next() {
        let (flag, inline) = split_flag(arg);
        if !FLAGS.contains(&flag) {
            continue;
        }
        let value = inline.or_else(|| args.next()).unwrap_or_default();
        match flag {
            "--api-token" => found.push("--api-token"),
            "--token-secret" => found.push("--token-secret"),
            "--token-secret-previous" => found.push("--token-secret-previous"),
            "--redis" if redact_url(value) != value => found.push("--redis"),
            _ => {}
        }
    }
    found
}

/// A URL fit to print: its user info (`user:password@`) shown as `user:***@`, or as `***@`
/// when it is a lone name (some clients read that as the password). Never fails, so even a
/// malformed URL can be echoed in its error: everything before the last `@` after the
/// scheme counts as user info, since a password may hold `/`, `?` or `#` unencoded.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + "://".len()),
        None => ("", url),
    };
    match rest.rfind('@') {
        None => url.to_string(),
        Some(at) => {
            let (user_info, host_and_path) = rest.split_at(at);
            match user_info.split_once(':') {
                Some((user, _password)) => format!("{scheme}{user}:***{host_and_path}"),
                None => format!("{scheme}***{host_and_path}"),
            }
        }
    }
}

/// Whether the `redis` crate accepts `url` (host, port, database, credentials). Connecting is
/// left to the backplane, which retries: Redis may come up after roomcast.
#[cfg(feature = "redis")]
fn is_redis_url(url: &str) -> bool {
    redis::Client::open(url).is_ok()
}

#[cfg(not(feature = "redis"))]
fn is_redis_url(_url: &str) -> bool {
    false
}

/// `problem` for a value outside its range, naming the range: what `main` prints after the
/// flag (or variable).
fn out_of_range(
    value: impl fmt::Display,
    low: impl fmt::Display,
    high: impl fmt::Display,
) -> String {
    format!("{value} is out of range: must be between {low} and {high}")
}

fn check_count<T: PartialOrd + fmt::Display>(
    name: &str,
    value: T,
    range: &RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::new(
        name,
        out_of_range(&value, range.start(), range.end()),
    ))
}

fn check_bytes(name: &str, value: usize, range: &RangeInclusive<usize>) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::new(
        name,
        out_of_range(
            show_bytes(value),
            show_bytes(*range.start()),
            show_bytes(*range.end()),
        ),
    ))
}

fn check_duration(
    name: &str,
    value: Duration,
    range: &RangeInclusive<Duration>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::new(
        name,
        out_of_range(
            show_duration(value),
            show_duration(*range.start()),
            show_duration(*range.end()),
        ),
    ))
}

/// Splits `"64KiB"` into `("64", "KiB")`; `None` when there is no leading digit.
fn digits_and_unit(value: &str) -> Option<(&str, &str)> {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    match digits_end {
        0 => None,
        _ => Some(value.split_at(digits_end)),
    }
}

/// Parses a whole number within `range`. Digits only: no sign, no spaces. A number too large
/// for any type is out of range, and says so.
pub fn parse_count<T>(name: &str, value: &str, range: &RangeInclusive<T>) -> Result<T, ConfigError>
where
    T: TryFrom<u64> + PartialOrd + fmt::Display,
{
    let too_large = || {
        ConfigError::new(
            name,
            out_of_range(format!("{value:?}"), range.start(), range.end()),
        )
    };
    match digits_and_unit(value) {
        Some((digits, "")) => {
            // Only digits are left, so the one way parsing can fail is overflow.
            let number: u64 = digits.parse().map_err(|_| too_large())?;
            let number = T::try_from(number).map_err(|_| too_large())?;
            if !range.contains(&number) {
                return Err(too_large());
            }
            Ok(number)
        }
        _ => Err(ConfigError::new(
            name,
            format!("{value:?} is not a whole number"),
        )),
    }
}

/// Parses a byte size within `range`: a whole number with an optional binary suffix
/// (`K`/`KiB`, `M`/`MiB`, `G`/`GiB`).
pub fn parse_bytes(
    name: &str,
    value: &str,
    range: &RangeInclusive<usize>,
) -> Result<usize, ConfigError> {
    let out_of_range = || {
        ConfigError::new(
            name,
            out_of_range(
                format!("{value:?}"),
                show_bytes(*range.start()),
                show_bytes(*range.end()),
            ),
        )
    };
    let bad = || {
        ConfigError::new(
            name,
            format!("{value:?} is not a size like 65536, 64KiB or 1MiB"),
        )
    };
    let (digits, unit) = digits_and_unit(value).ok_or_else(bad)?;
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(multiplier))
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(out_of_range)?;
    if !range.contains(&bytes) {
        return Err(out_of_range());
    }
    Ok(bytes)
}

/// Parses a duration within `range`: a whole number with a unit (`ms`, `s`, `m`, `h`); a bare
/// number is seconds. One too large to represent is out of range, never a panic later.
pub fn parse_duration(
    name: &str,
    value: &str,
    range: &RangeInclusive<Duration>,
) -> Result<Duration, ConfigError> {
    let out_of_range = || {
        ConfigError::new(
            name,
            out_of_range(
                format!("{value:?}"),
                show_duration(*range.start()),
                show_duration(*range.end()),
            ),
        )
    };
    let bad = || {
        ConfigError::new(
            name,
            format!("{value:?} is not a duration like 500ms, 10s, 2m or 1h"),
        )
    };
    let (digits, unit) = digits_and_unit(value).ok_or_else(bad)?;
    let seconds_per_unit = match unit {
        "ms" => None,
        "" | "s" => Some(1),
        "m" => Some(60),
        "h" => Some(60 * 60),
        _ => return Err(bad()),
    };
    let number: u64 = digits.parse().map_err(|_| out_of_range())?;
    let duration = match seconds_per_unit {
        None => Duration::from_millis(number),
        Some(seconds) => Duration::from_secs(number.checked_mul(seconds).ok_or_else(out_of_range)?),
    };
    if !range.contains(&duration) {
        return Err(out_of_range());
    }
    Ok(duration)
}

/// A size as the flags take it, in the largest binary unit that divides it.
fn show_bytes(bytes: usize) -> String {
    for (unit, size) in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

/// A duration as the flags take it, in the largest unit that divides it (`Debug` for one
/// built in code with a fraction of a millisecond).
fn show_duration(duration: Duration) -> String {
    if duration.subsec_nanos() % 1_000_000 != 0 {
        return format!("{duration:?}");
    }
    let millis = duration.as_millis();
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if millis >= size && millis % size == 0 {
            return format!("{}{unit}", millis / size);
        }
    }
    format!("{millis}ms")
}

/// `"1ms to 1h"`: a duration range as `--help` shows it.
fn durations(range: &RangeInclusive<Duration>) -> String {
    format!(
        "{} to {}",
        show_duration(*range.start()),
        show_duration(*range.end())
    )
}

/// `"1B to 1GiB"`: a size range as `--help` shows it.
fn sizes(range: &RangeInclusive<usize>) -> String {
    format!(
        "{} to {}",
        show_bytes(*range.start()),
        show_bytes(*range.end())
    )
}

/// The `--help` text: every flag, its default, its range and what it bounds.
pub fn help() -> String {
    format!(
        "\
roomcast {version}: a thread-per-connection WebSocket room relay.

Clients connect to ws://HOST:PORT/ws/ROOM (ROOM is [A-Za-z0-9_.-]{{1,64}}; /ws alone is \"lobby\").
Every text or binary message is relayed verbatim to everyone in the room, the sender included.

USAGE:
    roomcast [FLAGS]
    roomcast token --room ROOM --sub USER [--name NAME] [--perm PERM] [--ttl DUR]

FLAGS (value as `--flag VALUE` or `--flag=VALUE`; [default; range]):
    --listen ADDR              address to listen on                    [{listen}]
    --max-clients N|auto       connections held at once; over it: 503  [auto, from fd/thread/memory
                                                                        limits; {max_clients}]
    --max-clients-per-ip N     connections per client IP; over it: 503 [0 = off; up to {per_ip_max}]
    --max-message-bytes SIZE   largest message accepted; over it: 1009 [64KiB; {message}]
    --rate N                   messages/s per client; over it: 1008    [{rate}, 0 = off; up to {rate_max}]
    --burst N                  messages a client may send at once      [{burst}; up to {burst_max}]
    --outbox-bytes SIZE        unsent bytes queued per client before   [1MiB, at least {multiple} v1 frames
                               it is evicted as slow (64 B more per     of --max-message-bytes + 4KiB;
                               queued frame)                            up to {outbox_max}]
    --slow-timeout DUR         time a client may stay backlogged       [10s; {slow}]
    --handshake-timeout DUR    deadline for the HTTP request head      [5s; {handshake}]
    --ping-interval DUR        ping clients quiet for this long        [20s, < --idle-timeout; {ping}]
    --idle-timeout DUR         close clients silent for this long      [60s; {idle}]
    --shutdown-grace DUR       time to flush close frames on shutdown  [5s; {grace}]
    --allowed-origin ORIGIN    allowed Origin: scheme://host[:port],   [any]
                               repeatable or comma-separated; 403 for
                               any other
    --api-token TOKEN          bearer token for POST /api/rooms/ROOM/  [off (404); {token} bytes
                               messages and .../disconnect, GET         of printable ASCII]
                               /metrics and /api/rooms;
                               visible in ps, so prefer the variable
                               or --api-token-file
    --api-token-file PATH      read the token from this file, less one [off]
                               trailing newline
    --log-level LEVEL          off, error, warn, info, debug, trace    [info]
    --log-file PATH            also append the log to this file        [stderr only]
    --redis URL                share rooms with other instances        [off; needs the `redis`
                               through Redis, e.g. redis://HOST:6379/0  cargo feature]
    --redis-ttl DUR            how long a crashed instance's clients   [15s; {redis_ttl}]
                               still count in cluster-wide room counts
    --token-secret SECRET      HS256 secret of join tokens: every      [off (open rooms); {secret}
                               upgrade then needs ?token= or a Bearer   bytes]
                               token (401/403 without a good one);
                               visible in ps, so prefer the variable
                               or --token-secret-file
    --token-secret-file PATH   read the secret from this file, less    [off]
                               one trailing newline
    --token-secret-previous SECRET
                               the secret before a rotation: tokens it [off; needs the current one]
                               signed still verify (prefer the
                               variable)
    --max-connections-per-user N
                               connections one user (a token's sub)    [0 = off; up to {per_user_max}]
                               holds at once; over it: 503
    --room-ttl DUR             how long a room's state (epoch, seq)    [10m; {room_ttl}]
                               outlives its last member
    --history N                messages a room keeps for joins and     [50; 0 = off; up to {history_max}]
                               resumes (v1)
    --history-ttl DUR          none older than this                    [10m; {history_ttl}]
    --history-budget SIZE      all rooms' history bytes together; over [64MiB; up to 16GiB]
                               it, the room idle longest loses its own
    --presence-interval DUR    a room's presence frame at most once    [1s; {live}]
                               per interval
    --reaction-interval DUR    a room's reaction totals at most once   [250ms; {live}]
                               per interval
    --reaction-rate N          reaction taps per second per user;      [20; 0 = unlimited]
                               excess taps are dropped and counted
    --reaction-burst N         taps a user may send at once            [40]
    --reaction-keys K1,K2,...  the only reaction keys counted          [any]
    -h, --help                 print this help
    -V, --version              print the version

roomcast token prints one join token signed with the secret above (its flag, file or variable):
    --room ROOM                the room it opens, or * for every room  [required]
    --sub USER                 the user id, 1 to {sub_max} bytes             [required]
    --name NAME                display name, at most {name_max} bytes          [the sub]
    --perm PERM                read, react or post                     [post]
    --ttl DUR                  expires this long after now             [1h; {token_ttl}]

SIZE is bytes with an optional K/KiB, M/MiB or G/GiB suffix; DUR is a number with ms, s, m or h
(bare = s). An out-of-range or malformed value exits with status 2, naming the flag.

ENVIRONMENT:
    Every flag can also be set by an environment variable: {prefix} and the flag's name in
    capitals, - as _ (--max-clients is {prefix}MAX_CLIENTS, --api-token is {token_env}).
    A flag on the command line wins over its variable; an empty variable counts as unset.
    {prefix}ALLOWED_ORIGIN takes a comma-separated list. Either token flag overrides both
    {token_env} and {prefix}API_TOKEN_FILE, and either secret flag both
    {secret_env} and {prefix}TOKEN_SECRET_FILE.
",
        version = env!("CARGO_PKG_VERSION"),
        listen = DEFAULT_LISTEN,
        max_clients = format_args!("{} to {}", MAX_CLIENTS_RANGE.start(), MAX_CLIENTS_RANGE.end()),
        per_ip_max = MAX_CLIENTS_PER_IP_RANGE.end(),
        message = sizes(&MAX_MESSAGE_BYTES_RANGE),
        rate = DEFAULT_RATE,
        rate_max = RATE_RANGE.end(),
        burst = DEFAULT_BURST,
        burst_max = BURST_RANGE.end(),
        multiple = OUTBOX_MESSAGE_MULTIPLE,
        outbox_max = show_bytes(*OUTBOX_BYTES_RANGE.end()),
        slow = durations(&SLOW_TIMEOUT_RANGE),
        handshake = durations(&HANDSHAKE_TIMEOUT_RANGE),
        ping = durations(&PING_INTERVAL_RANGE),
        idle = durations(&IDLE_TIMEOUT_RANGE),
        grace = durations(&SHUTDOWN_GRACE_RANGE),
        token = format_args!("{} to {}", API_TOKEN_BYTES_RANGE.start(), API_TOKEN_BYTES_RANGE.end()),
        redis_ttl = durations(&REDIS_TTL_RANGE),
        secret = format_args!("{} to {}", TOKEN_SECRET_BYTES_RANGE.start(), TOKEN_SECRET_BYTES_RANGE.end()),
        per_user_max = MAX_CONNECTIONS_PER_USER_RANGE.end(),
        room_ttl = durations(&ROOM_TTL_RANGE),
        history_max = HISTORY_RANGE.end(),
        history_ttl = durations(&HISTORY_TTL_RANGE),
        live = durations(&LIVE_INTERVAL_RANGE),
        sub_max = token::MAX_SUB_BYTES,
        name_max = token::MAX_NAME_BYTES,
        token_ttl = durations(&TOKEN_TTL_RANGE),
        prefix = ENV_PREFIX,
        token_env = API_TOKEN_ENV,
        secret_env = TOKEN_SECRET_ENV,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Parses with the given variables as the whole environment, so no test depends on (or
    /// changes) the process's own.
    fn run_with_env(args: &[&str], vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), OsString::from(value)))
            .collect();
        match parse_args_from(args.iter().copied(), |name| vars.get(name).cloned())? {
            Command::Run(config) => Ok(*config),
            other => panic!("expected Run, got {other:?}"),
        }
    }

    fn run(args: &[&str]) -> Result<Config, ConfigError> {
        run_with_env(args, &[])
    }

    fn origins(texts: &[&str]) -> Vec<Origin> {
        texts
            .iter()
            .map(|text| Origin::parse(text).expect("a valid origin"))
            .collect()
    }

    /// A file with `contents`, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            let path =
                std::env::temp_dir().join(format!("roomcast-config-{}-{name}", std::process::id()));
            std::fs::write(&path, contents).expect("the temp dir is writable");
            TempFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().expect("temp paths are UTF-8 here")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const TOKEN: &str = "0123456789abcdef-token";
    /// Join-token secrets of 32 bytes and more.
    const SECRET: &str = "0123456789abcdef0123456789abcdef-current";
    const PREVIOUS: &str = "0123456789abcdef0123456789abcdef-previous";

    #[test]
    fn no_flags_gives_documented_defaults() {
        let config = run(&[]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(config.max_clients, None);
        assert_eq!(config.max_message_bytes, 64 * 1024);
        assert_eq!((config.rate, config.burst), (50, 100));
        assert_eq!(config.effective_outbox_bytes(), 1024 * 1024);
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.api_token, None);
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn values_parse_in_both_spellings() {
        let config = run(&[
            "--rate=7",
            "--burst",
            "9",
            "--max-message-bytes",
            "2MiB",
            "--slow-timeout=250ms",
            "--idle-timeout=2h",
        ])
        .unwrap();
        assert_eq!((config.rate, config.burst), (7, 9));
        assert_eq!(config.max_message_bytes, 2 * 1024 * 1024);
        assert_eq!(config.slow_timeout, Duration::from_millis(250));
        assert_eq!(config.idle_timeout, Duration::from_secs(2 * 60 * 60));
    }

    #[test]
    fn outbox_never_below_two_messages() {
        // Two of the largest frames a message can become: its v1 `message` frame.
        let v1_frame = |max: usize| crate::v1::codec::max_message_json_bytes(max) + 10;
        let config = run(&["--max-message-bytes", "1M", "--outbox-bytes", "100K"]).unwrap();
        assert_eq!(
            config.effective_outbox_bytes(),
            2 * (v1_frame(1024 * 1024) + 64) + MIN_OUTBOX_BYTES
        );
        // Tiny limits still leave room for the handshake and control frames.
        let config = run(&["--max-message-bytes", "40", "--outbox-bytes", "100"]).unwrap();
        assert_eq!(
            config.effective_outbox_bytes(),
            2 * (v1_frame(40) + 64) + MIN_OUTBOX_BYTES
        );
        // The default outbox already holds two v1 frames of a default maximum message.
        assert_eq!(
            Config::default().effective_outbox_bytes(),
            DEFAULT_OUTBOX_BYTES
        );
        for max in [64 * 1024, 512 * 1024, 4 << 20] {
            let config = Config {
                max_message_bytes: max,
                ..Config::default()
            };
            assert!(
                config.effective_outbox_bytes() >= 2 * v1_frame(max),
                "{max}"
            );
        }
    }

    #[test]
    fn origins_repeat_and_take_lists() {
        let config = run(&[
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin=https://b.example, http://c.example:8080",
        ])
        .unwrap();
        assert_eq!(
            config.allowed_origins,
            origins(&[
                "https://a.example",
                "https://b.example",
                "http://c.example:8080"
            ])
        );
    }

    #[test]
    fn origins_are_normalised_at_start() {
        let config = run(&["--allowed-origin", "HTTPS://A.example:443"]).unwrap();
        assert_eq!(config.allowed_origins, origins(&["https://a.example"]));
        assert_eq!(config.allowed_origins[0].to_string(), "https://a.example");
    }

    #[test]
    fn malformed_origins_exit_with_the_reason() {
        for (value, reason) in [
            ("https://a.example/", "path"),
            ("https://a.example/path", "path"),
            ("a.example", "scheme"),
            ("ftp://a", "http or https"),
            ("https://", "no host"),
            ("https://a:99999", "port"),
            ("null", "scheme"),
            ("https://a.example,", "empty origin"),
        ] {
            let err = run(&["--allowed-origin", value]).unwrap_err();
            assert_eq!(err.flag, "--allowed-origin", "{value:?} gave {err}");
            assert!(err.problem.contains(reason), "{value:?} gave {err}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn errors_name_the_flag() {
        for (args, flag) in [
            (&["--bogus", "1"][..], "--bogus"),
            (&["--bogus"][..], "--bogus"),
            (&["--rate", "fast"][..], "--rate"),
            (&["--rate", "-1"][..], "--rate"),
            (&["--rate"][..], "--rate"),
            (&["--rate="][..], "--rate"),
            (&["--listen", "nowhere"][..], "--listen"),
            (&["--max-message-bytes", "12XB"][..], "--max-message-bytes"),
            (
                &["--max-message-bytes", "13010278877657708772"][..],
                "--max-message-bytes",
            ),
            (&["--max-message-bytes", "2GiB"][..], "--max-message-bytes"),
            (&["--idle-timeout", "0s"][..], "--idle-timeout"),
            (&["--idle-timeout", "5d"][..], "--idle-timeout"),
            (&["--ping-interval", "90s"][..], "--ping-interval"),
            (&["--rate", "5", "--burst", "0"][..], "--burst"),
            (&["stray"][..], "stray"),
        ] {
            let err = run(args).unwrap_err();
            assert_eq!(err.flag, flag, "{args:?} gave {err}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    /// For each flag: the lowest and highest values accepted, and the values just outside,
    /// which must be refused with the flag and the range on one line.
    #[test]
    fn every_size_duration_and_count_flag_is_bounded() {
        for (flag, lowest, highest, below, above, range) in [
            (
                "--max-clients",
                "1",
                "4194304",
                Some("0"),
                "4194305",
                "1 and 4194304",
            ),
            (
                "--max-clients-per-ip",
                "0",
                "4194304",
                None,
                "4194305",
                "0 and 4194304",
            ),
            (
                "--max-message-bytes",
                "1",
                "1GiB",
                Some("0"),
                "1073741825",
                "1B and 1GiB",
            ),
            ("--rate", "0", "1000000", None, "1000001", "0 and 1000000"),
            ("--burst", "1", "1000000", None, "1000001", "0 and 1000000"),
            (
                "--outbox-bytes",
                "0",
                "4GiB",
                None,
                "4097MiB",
                "0B and 4GiB",
            ),
            (
                "--slow-timeout",
                "1ms",
                "1h",
                Some("0ms"),
                "3601s",
                "1ms and 1h",
            ),
            (
                "--handshake-timeout",
                "1ms",
                "1h",
                Some("0"),
                "61m",
                "1ms and 1h",
            ),
            (
                "--ping-interval",
                "1ms",
                "12h",
                Some("0s"),
                "721m",
                "1ms and 12h",
            ),
            (
                "--idle-timeout",
                "2ms",
                "24h",
                Some("0s"),
                "86400001ms",
                "1ms and 24h",
            ),
            (
                "--shutdown-grace",
                "1ms",
                "10m",
                Some("0s"),
                "601s",
                "1ms and 10m",
            ),
            (
                "--redis-ttl",
                "300ms",
                "1h",
                Some("299ms"),
                "3601s",
                "300ms and 1h",
            ),
            (
                "--max-connections-per-user",
                "0",
                "4194304",
                None,
                "4194305",
                "0 and 4194304",
            ),
            (
                "--room-ttl",
                "1s",
                "24h",
                Some("999ms"),
                "86401s",
                "1s and 24h",
            ),
        ] {
            // The ping interval must stay below the idle timeout, whichever is being probed.
            let others: &[&str] = match flag {
                "--ping-interval" => &["--idle-timeout", "24h"],
                "--idle-timeout" => &["--ping-interval", "1ms"],
                _ => &[],
            };
            for ok in [lowest, highest] {
                let args = [&[flag, ok][..], others].concat();
                assert!(run(&args).is_ok(), "{args:?}: {:?}", run(&args));
            }
            for bad in below.into_iter().chain([above]) {
                let err = run(&[&[flag, bad][..], others].concat()).unwrap_err();
                assert_eq!(err.flag, flag, "{bad}: {err}");
                assert!(
                    err.problem.contains("out of range") && err.problem.contains(range),
                    "{flag} {bad}: {err}"
                );
            }
        }
    }

    /// `10000000000000000000` seconds parses as a `Duration` but overflows the first
    /// `Instant::now() + timeout`, which panicked every connection thread.
    #[test]
    fn huge_durations_are_refused_not_overflowed_later() {
        for value in [
            "10000000000000000000",
            "10000000000000000000s",
            "99999999999999999999",
            "18446744073709551615ms",
            "10000000000000000000m",
            "307445734561825861m",
            "5124095576030432h",
        ] {
            let err = run(&["--handshake-timeout", value]).unwrap_err();
            assert_eq!(err.flag, "--handshake-timeout");
            assert!(err.problem.contains("between 1ms and 1h"), "{value}: {err}");
        }
    }

    #[test]
    fn a_config_built_in_code_is_held_to_the_same_ranges() {
        let check = |config: Config, flag: &str| {
            let err = config.validate().unwrap_err();
            assert_eq!(err.flag, flag, "{err}");
            assert!(err.problem.contains("out of range"), "{err}");
        };
        check(
            Config {
                handshake_timeout: Duration::MAX,
                ..Config::default()
            },
            "--handshake-timeout",
        );
        check(
            Config {
                shutdown_grace: Duration::from_secs(3600),
                ..Config::default()
            },
            "--shutdown-grace",
        );
        check(
            Config {
                outbox_bytes: usize::MAX,
                ..Config::default()
            },
            "--outbox-bytes",
        );
        check(
            Config {
                max_clients: Some(0),
                ..Config::default()
            },
            "--max-clients",
        );
        check(
            Config {
                rate: u32::MAX,
                ..Config::default()
            },
            "--rate",
        );
        check(
            Config {
                redis_ttl: Duration::from_millis(100),
                ..Config::default()
            },
            "--redis-ttl",
        );
        check(
            Config {
                room_ttl: Duration::ZERO,
                ..Config::default()
            },
            "--room-ttl",
        );
        check(
            Config {
                max_connections_per_user: usize::MAX,
                ..Config::default()
            },
            "--max-connections-per-user",
        );
        let err = Config {
            token_secrets: vec!["short".into()],
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.flag, "--token-secret", "{err}");
        assert!(!err.problem.contains("short"), "{err}");
    }

    #[test]
    fn redis_needs_the_feature_and_a_url() {
        let result = run(&["--redis", "redis://127.0.0.1:6379/0"]);
        if HAS_REDIS {
            assert_eq!(
                result.unwrap().redis.as_deref(),
                Some("redis://127.0.0.1:6379/0")
            );
            for bad in ["localhost", "redis://127.0.0.1:notaport/0"] {
                assert_eq!(run(&["--redis", bad]).unwrap_err().flag, "--redis");
            }
        } else {
            let err = result.unwrap_err();
            assert_eq!(err.flag, "--redis");
            assert!(err.problem.contains("--features redis"), "{err}");
        }
    }

    #[test]
    fn a_malformed_redis_url_is_not_echoed_with_its_password() {
        let err = Config {
            redis: Some("redis://:hunter2secret@127.0.0.1:notaport/0".into()),
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.flag, "--redis");
        assert!(!err.to_string().contains("hunter2secret"), "{err}");
    }

    #[test]
    fn durations_and_sizes() {
        let any = Duration::ZERO..=Duration::MAX;
        assert_eq!(
            parse_duration("f", "2m", &any).unwrap(),
            Duration::from_secs(120)
        );
        assert_eq!(
            parse_duration("f", "3", &any).unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(
            parse_duration("f", "1h", &any).unwrap(),
            Duration::from_secs(3600)
        );
        assert!(parse_duration("f", "-1s", &any).is_err());
        assert!(parse_duration("f", "1.5s", &any).is_err());
        let bytes = 0..=usize::MAX;
        assert_eq!(parse_bytes("f", "64KiB", &bytes).unwrap(), 65536);
        assert!(parse_bytes("f", "99999999999999999999M", &bytes)
            .unwrap_err()
            .problem
            .contains("out of range"));
        assert!(parse_bytes("f", "17179869184G", &bytes).is_err());
        assert_eq!(show_duration(Duration::from_secs(90)), "90s");
        assert_eq!(show_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(show_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(show_bytes(3 << 20), "3MiB");
        assert_eq!(show_bytes(1025), "1025B");
    }

    #[test]
    fn env_var_names_follow_the_flags() {
        assert_eq!(env_var("--max-clients"), "ROOMCAST_MAX_CLIENTS");
        assert_eq!(env_var("--api-token"), API_TOKEN_ENV);
        assert_eq!(env_var("--api-token-file"), "ROOMCAST_API_TOKEN_FILE");
        assert_eq!(env_var("--allowed-origin"), "ROOMCAST_ALLOWED_ORIGIN");
    }

    #[test]
    fn a_variable_sets_its_flag_and_the_flag_wins() {
        let vars = [("ROOMCAST_MAX_CLIENTS", "7"), ("ROOMCAST_RATE", "3")];
        let config = run_with_env(&[], &vars).unwrap();
        assert_eq!((config.max_clients, config.rate), (Some(7), 3));
        let config = run_with_env(&["--max-clients", "9"], &vars).unwrap();
        assert_eq!((config.max_clients, config.rate), (Some(9), 3));
        // Every flag reads its variable.
        for (flag, value) in [
            ("--listen", "127.0.0.1:7000"),
            ("--max-clients-per-ip", "2"),
            ("--max-message-bytes", "1KiB"),
            ("--burst", "4"),
            ("--outbox-bytes", "8MiB"),
            ("--slow-timeout", "2s"),
            ("--handshake-timeout", "2s"),
            ("--ping-interval", "2s"),
            ("--idle-timeout", "90s"),
            ("--shutdown-grace", "2s"),
            ("--allowed-origin", "https://a.example"),
            ("--api-token", TOKEN),
            ("--log-level", "debug"),
            ("--log-file", "/tmp/roomcast.log"),
            ("--redis-ttl", "2s"),
            ("--token-secret", SECRET),
            ("--max-connections-per-user", "3"),
            ("--room-ttl", "2m"),
            ("--history", "7"),
            ("--history-ttl", "2m"),
            ("--history-budget", "1MiB"),
            ("--presence-interval", "2s"),
            ("--reaction-interval", "100ms"),
            ("--reaction-rate", "5"),
            ("--reaction-burst", "6"),
            ("--reaction-keys", "a,b"),
        ] {
            let from_env = run_with_env(&[], &[(&env_var(flag), value)]).unwrap();
            let from_flag = run(&[flag, value]).unwrap();
            assert_eq!(format!("{from_env:?}"), format!("{from_flag:?}"), "{flag}");
            assert_ne!(
                format!("{from_env:?}"),
                format!("{:?}", Config::default()),
                "{flag}"
            );
        }
    }

    #[test]
    fn an_empty_variable_is_unset() {
        let config = run_with_env(&[], &[("ROOMCAST_RATE", ""), (API_TOKEN_ENV, "")]).unwrap();
        assert_eq!(config.rate, DEFAULT_RATE);
        assert_eq!(config.api_token, None);
    }

    #[test]
    fn unknown_variables_are_reported() {
        let names = [
            "ROOMCAST_MAX_CLIENTS",
            "ROOMCAST_MAX_CLIENT",
            "ROOMCAST_API_TOKEN_FILE",
            "ROOMCAST_REQUIRE_ALL",
            "PATH",
        ];
        assert_eq!(unknown_variables(names), ["ROOMCAST_MAX_CLIENT"]);
    }

    #[test]
    fn a_bad_variable_is_named() {
        for (name, value) in [
            ("ROOMCAST_RATE", "fast"),
            ("ROOMCAST_HANDSHAKE_TIMEOUT", "10000000000000000000"),
            (
                "ROOMCAST_ALLOWED_ORIGIN",
                "https://a.example,https://b.example/",
            ),
            (API_TOKEN_ENV, "short"),
            ("ROOMCAST_PING_INTERVAL", "2m"),
        ] {
            let err = run_with_env(&[], &[(name, value)]).unwrap_err();
            assert_eq!(err.flag, name, "{err}");
        }
        // The flag wins, so a bad variable under a good flag is never read.
        assert!(run_with_env(&["--rate", "5"], &[("ROOMCAST_RATE", "fast")]).is_ok());
    }

    #[test]
    fn a_variable_that_is_not_utf8_is_named() {
        use std::os::unix::ffi::OsStringExt;
        let result = parse_args_from(Vec::<String>::new(), |name| {
            (name == "ROOMCAST_LOG_FILE").then(|| OsString::from_vec(vec![b'/', 0xff]))
        });
        assert_eq!(result.unwrap_err().flag, "ROOMCAST_LOG_FILE");
    }

    #[test]
    fn a_flag_list_of_origins_replaces_the_variables() {
        let vars = [(
            "ROOMCAST_ALLOWED_ORIGIN",
            "https://a.example, https://b.example",
        )];
        let config = run_with_env(&[], &vars).unwrap();
        assert_eq!(
            config.allowed_origins,
            origins(&["https://a.example", "https://b.example"])
        );
        let config = run_with_env(&["--allowed-origin", "https://c.example"], &vars).unwrap();
        assert_eq!(config.allowed_origins, origins(&["https://c.example"]));
    }

    #[test]
    fn the_token_comes_from_the_flag_the_variable_or_a_file() {
        assert_eq!(
            run(&["--api-token", TOKEN]).unwrap().api_token.as_deref(),
            Some(TOKEN)
        );
        assert_eq!(
            run_with_env(&[], &[(API_TOKEN_ENV, TOKEN)])
                .unwrap()
                .api_token
                .as_deref(),
            Some(TOKEN)
        );
        for (name, contents) in [
            ("lf", format!("{TOKEN}\n")),
            ("crlf", format!("{TOKEN}\r\n")),
            ("bare", TOKEN.to_string()),
        ] {
            let file = TempFile::new(name, contents.as_bytes());
            let from_flag = run(&["--api-token-file", file.path()]).unwrap();
            assert_eq!(from_flag.api_token.as_deref(), Some(TOKEN), "{name}");
            let from_env = run_with_env(&[], &[("ROOMCAST_API_TOKEN_FILE", file.path())]).unwrap();
            assert_eq!(from_env.api_token.as_deref(), Some(TOKEN), "{name}");
        }
    }

    #[test]
    fn either_token_flag_beats_both_variables() {
        let file = TempFile::new("beats", b"from-the-file-0123456789\n");
        let vars = [(API_TOKEN_ENV, TOKEN)];
        let config = run_with_env(&["--api-token-file", file.path()], &vars).unwrap();
        assert_eq!(
            config.api_token.as_deref(),
            Some("from-the-file-0123456789")
        );
        let vars = [("ROOMCAST_API_TOKEN_FILE", file.path())];
        let config = run_with_env(&["--api-token", TOKEN], &vars).unwrap();
        assert_eq!(config.api_token.as_deref(), Some(TOKEN));
    }

    #[test]
    fn bad_tokens_exit_naming_their_source_without_showing_them() {
        let file = TempFile::new("both", format!("{TOKEN}\n").as_bytes());
        let short = TempFile::new("short", b"tiny\n");
        let blank_line = TempFile::new("blank-line", format!("{TOKEN}\n\n").as_bytes());
        let huge = TempFile::new("huge", &[b'a'; 5000]);
        let missing = "/nonexistent/roomcast/token";
        for (args, vars, source, problem) in [
            (
                vec!["--api-token", TOKEN, "--api-token-file", file.path()],
                vec![],
                "--api-token-file",
                "conflicts with --api-token",
            ),
            (
                vec![],
                vec![
                    (API_TOKEN_ENV, TOKEN),
                    ("ROOMCAST_API_TOKEN_FILE", file.path()),
                ],
                "ROOMCAST_API_TOKEN_FILE",
                "conflicts with ROOMCAST_API_TOKEN",
            ),
            (
                vec!["--api-token", "s3cret"],
                vec![],
                "--api-token",
                "6 bytes",
            ),
            (
                vec![],
                vec![(API_TOKEN_ENV, "s3cret")],
                API_TOKEN_ENV,
                "between 16 and 4096",
            ),
            (
                vec!["--api-token-file", short.path()],
                vec![],
                "--api-token-file",
                "4 bytes",
            ),
            (
                vec!["--api-token", "0123456789 abcdef"],
                vec![],
                "--api-token",
                "printable ASCII",
            ),
            (
                vec!["--api-token-file", blank_line.path()],
                vec![],
                "--api-token-file",
                "printable ASCII",
            ),
            (
                vec!["--api-token-file", huge.path()],
                vec![],
                "--api-token-file",
                "longer than a token",
            ),
            (
                vec!["--api-token-file", missing],
                vec![],
                "--api-token-file",
                "cannot read",
            ),
            (
                vec![],
                vec![("ROOMCAST_API_TOKEN_FILE", missing)],
                "ROOMCAST_API_TOKEN_FILE",
                "cannot read",
            ),
            (vec!["--api-token", ""], vec![], "--api-token", "empty"),
        ] {
            let err = run_with_env(&args, &vars).unwrap_err();
            assert_eq!(err.flag, source, "{args:?} {vars:?}: {err}");
            assert!(err.problem.contains(problem), "{args:?} {vars:?}: {err}");
            for secret in [TOKEN, "s3cret", "tiny"] {
                assert!(!err.problem.contains(secret), "{err}");
            }
        }
    }

    #[test]
    fn v1_flags_default_to_open_rooms_and_parse() {
        let config = run(&[]).unwrap();
        assert!(config.token_secrets.is_empty());
        assert_eq!(config.max_connections_per_user, 0);
        assert_eq!(config.room_ttl, Duration::from_secs(600));
        let config = run(&["--max-connections-per-user=4", "--room-ttl", "90s"]).unwrap();
        assert_eq!(config.max_connections_per_user, 4);
        assert_eq!(config.room_ttl, Duration::from_secs(90));
    }

    /// The current secret comes first, the previous one after it: `token::verify` tries them
    /// in that order.
    #[test]
    fn token_secrets_come_from_a_flag_a_variable_or_a_file_current_first() {
        let secrets =
            |args: &[&str], vars: &[(&str, &str)]| run_with_env(args, vars).unwrap().token_secrets;
        assert_eq!(secrets(&["--token-secret", SECRET], &[]), [SECRET]);
        assert_eq!(secrets(&[], &[(TOKEN_SECRET_ENV, SECRET)]), [SECRET]);
        for (name, contents) in [
            ("secret-lf", format!("{SECRET}\n")),
            ("secret-crlf", format!("{SECRET}\r\n")),
            ("secret-bare", SECRET.to_string()),
        ] {
            let file = TempFile::new(name, contents.as_bytes());
            assert_eq!(
                secrets(&["--token-secret-file", file.path()], &[]),
                [SECRET]
            );
            let vars = [("ROOMCAST_TOKEN_SECRET_FILE", file.path())];
            assert_eq!(secrets(&[], &vars), [SECRET], "{name}");
        }
        let rotating = [
            (TOKEN_SECRET_ENV, SECRET),
            ("ROOMCAST_TOKEN_SECRET_PREVIOUS", PREVIOUS),
        ];
        assert_eq!(secrets(&[], &rotating), [SECRET, PREVIOUS]);
        assert_eq!(
            secrets(
                &[
                    "--token-secret-previous",
                    PREVIOUS,
                    "--token-secret",
                    SECRET
                ],
                &[]
            ),
            [SECRET, PREVIOUS]
        );
        // Any bytes but control characters: a passphrase with spaces is a secret too.
        let spaced = "correct horse battery staple, twice over";
        assert_eq!(secrets(&["--token-secret", spaced], &[]), [spaced]);
    }

    #[test]
    fn either_secret_flag_beats_both_variables() {
        let file = TempFile::new("secret-beats", format!("{PREVIOUS}\n").as_bytes());
        let vars = [(TOKEN_SECRET_ENV, SECRET)];
        let config = run_with_env(&["--token-secret-file", file.path()], &vars).unwrap();
        assert_eq!(config.token_secrets, [PREVIOUS]);
        let vars = [("ROOMCAST_TOKEN_SECRET_FILE", file.path())];
        let config = run_with_env(&["--token-secret", SECRET], &vars).unwrap();
        assert_eq!(config.token_secrets, [SECRET]);
    }

    #[test]
    fn bad_token_secrets_exit_naming_their_source_without_showing_them() {
        let short_secret = "0123456789abcdef0123456789abcde"; // 31 bytes
        let short = TempFile::new("secret-short", format!("{short_secret}\n").as_bytes());
        let blank_line = TempFile::new("secret-blank", format!("{SECRET}\n\n").as_bytes());
        let huge = TempFile::new("secret-huge", &[b'a'; 5000]);
        let file = TempFile::new("secret-both", SECRET.as_bytes());
        let missing = "/nonexistent/roomcast/secret";
        for (args, vars, source, problem) in [
            (
                vec!["--token-secret", short_secret],
                vec![],
                "--token-secret",
                "31 bytes: it must be between 32 and 4096",
            ),
            (
                vec![],
                vec![(TOKEN_SECRET_ENV, short_secret)],
                TOKEN_SECRET_ENV,
                "31 bytes",
            ),
            (
                vec!["--token-secret-file", short.path()],
                vec![],
                "--token-secret-file",
                "31 bytes",
            ),
            (
                vec![
                    "--token-secret",
                    SECRET,
                    "--token-secret-previous",
                    short_secret,
                ],
                vec![],
                "--token-secret-previous",
                "31 bytes",
            ),
            (
                vec![],
                vec![
                    (TOKEN_SECRET_ENV, SECRET),
                    ("ROOMCAST_TOKEN_SECRET_PREVIOUS", short_secret),
                ],
                "ROOMCAST_TOKEN_SECRET_PREVIOUS",
                "31 bytes",
            ),
            (
                vec![],
                vec![("ROOMCAST_TOKEN_SECRET_PREVIOUS", PREVIOUS)],
                "ROOMCAST_TOKEN_SECRET_PREVIOUS",
                "needs the current secret",
            ),
            (
                vec!["--token-secret-previous", PREVIOUS],
                vec![],
                "--token-secret-previous",
                "needs the current secret",
            ),
            (
                vec!["--token-secret", SECRET, "--token-secret-file", file.path()],
                vec![],
                "--token-secret-file",
                "conflicts with --token-secret: give the secret one way",
            ),
            (
                vec![],
                vec![
                    (TOKEN_SECRET_ENV, SECRET),
                    ("ROOMCAST_TOKEN_SECRET_FILE", file.path()),
                ],
                "ROOMCAST_TOKEN_SECRET_FILE",
                "conflicts with ROOMCAST_TOKEN_SECRET",
            ),
            (
                vec!["--token-secret-file", blank_line.path()],
                vec![],
                "--token-secret-file",
                "control characters",
            ),
            (
                vec!["--token-secret", &format!("{SECRET}\t")],
                vec![],
                "--token-secret",
                "control characters",
            ),
            (
                vec!["--token-secret-file", huge.path()],
                vec![],
                "--token-secret-file",
                "longer than a secret can be (4096 bytes)",
            ),
            (
                vec!["--token-secret-file", missing],
                vec![],
                "--token-secret-file",
                "cannot read",
            ),
            (
                vec!["--token-secret", ""],
                vec![],
                "--token-secret",
                "empty",
            ),
        ] {
            let err = run_with_env(&args, &vars).unwrap_err();
            assert_eq!(err.flag, source, "{args:?} {vars:?}: {err}");
            assert!(err.problem.contains(problem), "{args:?} {vars:?}: {err}");
            for secret in [SECRET, PREVIOUS, short_secret] {
                assert!(!err.problem.contains(secret), "{err}");
            }
        }
    }

    /// `roomcast token` with the parsed request, or the error.
    fn token_command(args: &[&str], vars: &[(&str, &str)]) -> Result<TokenRequest, ConfigError> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), OsString::from(value)))
            .collect();
        let args = ["token"].iter().chain(args).copied();
        match parse_args_from(args, |name| vars.get(name).cloned())? {
            Command::Token(request) => Ok(*request),
            other => panic!("expected Token, got {other:?}"),
        }
    }

    #[test]
    fn the_token_command_takes_its_claims_and_the_servers_secret() {
        let vars = [(TOKEN_SECRET_ENV, SECRET)];
        assert_eq!(
            token_command(&["--room", "stage", "--sub", "u42"], &vars).unwrap(),
            TokenRequest {
                secret: SECRET.into(),
                room: "stage".into(),
                sub: "u42".into(),
                name: None,
                perm: None,
                ttl: DEFAULT_TOKEN_TTL,
            }
        );
        let args = [
            "--room=*",
            "--sub",
            &"u".repeat(128),
            "--name",
            &"🎉".repeat(16),
            "--perm",
            "react",
            "--ttl",
            "10m",
        ];
        let request = token_command(&args, &vars).unwrap();
        assert_eq!(
            (request.room.as_str(), request.perm, request.ttl),
            ("*", Some(Perm::React), Duration::from_secs(600))
        );
        assert_eq!(request.name.as_deref().map(str::len), Some(64));
        // The secret from its file or flag, as the server reads it; other variables are not
        // the subcommand's business, bad or not.
        let file = TempFile::new("secret-token", format!("{PREVIOUS}\n").as_bytes());
        let vars = [
            ("ROOMCAST_TOKEN_SECRET_FILE", file.path()),
            ("ROOMCAST_RATE", "fast"),
        ];
        let request = token_command(&["--room", "a", "--sub", "b"], &vars).unwrap();
        assert_eq!(request.secret, PREVIOUS);
        let args = ["--room", "a", "--sub", "b", "--token-secret", SECRET];
        assert_eq!(token_command(&args, &vars).unwrap().secret, SECRET);
        let help = parse_args_from(["token", "--help"], |_| None).unwrap();
        assert!(matches!(help, Command::Help));
        // `token` anywhere but first is a stray argument, as before.
        assert_eq!(run(&["--rate", "5", "token"]).unwrap_err().flag, "token");
    }

    /// `roomcast token` refuses every claim `token::verify` would, naming the flag, so it
    /// never prints a token the server turns away.
    #[test]
    fn the_token_command_refuses_what_the_server_would() {
        let vars = [(TOKEN_SECRET_ENV, SECRET)];
        let long_sub = "u".repeat(129);
        let long_name = "n".repeat(65);
        for (args, flag, problem) in [
            (&["--sub", "u"][..], "--room", "is required"),
            (&["--room", "stage"][..], "--sub", "is required"),
            (
                &["--room", "a/b", "--sub", "u"][..],
                "--room",
                "not a room name",
            ),
            (
                &["--room", "..", "--sub", "u"][..],
                "--room",
                "not a room name",
            ),
            (
                &["--room", "**", "--sub", "u"][..],
                "--room",
                "not a room name",
            ),
            (
                &["--room", "", "--sub", "u"][..],
                "--room",
                "not a room name",
            ),
            (&["--room", "a", "--sub", ""][..], "--sub", "0 bytes"),
            (
                &["--room", "a", "--sub", &long_sub][..],
                "--sub",
                "129 bytes",
            ),
            (
                &["--room", "a", "--sub", "u", "--name", &long_name][..],
                "--name",
                "65 bytes",
            ),
            (
                &["--room", "a", "--sub", "u", "--perm", "admin"][..],
                "--perm",
                "read, react, post",
            ),
            (
                &["--room", "a", "--sub", "u", "--perm", "POST"][..],
                "--perm",
                "read, react, post",
            ),
            (
                &["--room", "a", "--sub", "u", "--ttl", "0s"][..],
                "--ttl",
                "between 1s and 720h",
            ),
            (
                &["--room", "a", "--sub", "u", "--ttl", "721h"][..],
                "--ttl",
                "between 1s and 720h",
            ),
            (
                &["--room", "a", "--sub", "u", "--ttl", "soon"][..],
                "--ttl",
                "not a duration",
            ),
            (&["--room", "a", "--sub"][..], "--sub", "needs a value"),
            (
                &["--room", "a", "--sub", "u", "--rate", "5"][..],
                "--rate",
                "not a flag of roomcast token",
            ),
            (
                &["--room", "a", "--sub", "u", "stray"][..],
                "stray",
                "not a flag of roomcast token",
            ),
        ] {
            let err = token_command(args, &vars).unwrap_err();
            assert_eq!(err.flag, flag, "{args:?}: {err}");
            assert!(err.problem.contains(problem), "{args:?}: {err}");
        }
        // Without a secret, or with one the server would refuse.
        let args = ["--room", "a", "--sub", "u"];
        let err = token_command(&args, &[]).unwrap_err();
        assert_eq!(err.flag, "--token-secret");
        assert!(err.problem.contains(TOKEN_SECRET_ENV), "{err}");
        let err = token_command(&args, &[(TOKEN_SECRET_ENV, "short")]).unwrap_err();
        assert_eq!(
            (err.flag.as_str(), err.problem.contains("5 bytes")),
            (TOKEN_SECRET_ENV, true)
        );
        let file = TempFile::new("secret-conflict", SECRET.as_bytes());
        let both = [
            &args[..],
            &["--token-secret", SECRET, "--token-secret-file", file.path()],
        ]
        .concat();
        assert_eq!(
            token_command(&both, &[]).unwrap_err().flag,
            "--token-secret-file"
        );
    }

    #[test]
    fn debug_never_shows_the_token_or_the_redis_password() {
        let config = Config {
            api_token: Some(TOKEN.into()),
            redis: Some("redis://admin:hunter2secret@10.0.0.5:6379/0".into()),
            ..Config::default()
        };
        let debug = format!("{config:?} {:?}", Command::Run(Box::new(config.clone())));
        assert!(!debug.contains(TOKEN), "{debug}");
        let with_secrets = Config {
            token_secrets: vec![SECRET.into(), PREVIOUS.into()],
            ..Config::default()
        };
        let request = TokenRequest {
            secret: SECRET.into(),
            room: "stage".into(),
            sub: "u42".into(),
            name: None,
            perm: None,
            ttl: DEFAULT_TOKEN_TTL,
        };
        let hidden = format!("{with_secrets:?} {:?}", Command::Token(Box::new(request)));
        assert!(
            !debug.contains(SECRET) && !debug.contains(PREVIOUS),
            "{debug}"
        );
        assert!(hidden.contains("u42"), "{hidden}");
        assert!(!debug.contains("hunter2secret"), "{debug}");
        assert!(
            debug.contains("redis://admin:***@10.0.0.5:6379/0"),
            "{debug}"
        );
        assert!(debug.contains("handshake_timeout"), "{debug}");
    }

    #[test]
    fn redacted_urls_keep_everything_but_the_secret() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            (
                "redis://:hunter2secret@127.0.0.1:1/0",
                "redis://:***@127.0.0.1:1/0",
            ),
            (
                "redis://user:hunter2secret@h:6379/2",
                "redis://user:***@h:6379/2",
            ),
            ("redis://hunter2secret@h", "redis://***@h"),
            // Unencoded `/` and `@` in the password, and no scheme at all: still hidden.
            ("redis://:hunter2/secret@h/0", "redis://:***@h/0"),
            ("redis://:hunter2@secret@h", "redis://:***@h"),
            ("redis:/:hunter2secret@h", "redis:***@h"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn secrets_on_the_command_line_are_found() {
        let found = |args: &[&str]| secrets_on_command_line(args);
        assert_eq!(found(&["--api-token", TOKEN]), ["--api-token"]);
        assert_eq!(found(&["--api-token=x"]), ["--api-token"]);
        assert!(found(&["--api-token-file", "/run/token"]).is_empty());
        assert_eq!(
            found(&["--token-secret", SECRET, "--token-secret-previous=x"]),
            ["--token-secret", "--token-secret-previous"]
        );
        assert!(found(&["--token-secret-file", "/run/secret"]).is_empty());
        assert_eq!(
            found(&["token", "--room", "a", "--token-secret", SECRET]),
            ["--token-secret"]
        );
        assert_eq!(found(&["--redis", "redis://:pw@h/0"]), ["--redis"]);
        assert!(found(&["--redis=redis://h/0", "--rate", "5"]).is_empty());
        // A flag's value is not mistaken for a flag.
        assert!(found(&["--log-file", "--api-token"]).is_empty());
    }

    #[test]
    fn help_mentions_every_flag_and_the_variables() {
        let text = help();
        for flag in FLAGS.iter().chain(TOKEN_COMMAND_FLAGS) {
            assert!(text.contains(flag), "help lacks {flag}");
        }
        assert!(
            text.contains("roomcast token --room ROOM --sub USER"),
            "{text}"
        );
        assert!(text.contains("ROOMCAST_MAX_CLIENTS"), "{text}");
        assert!(text.contains("wins over its variable"), "{text}");
        assert!(text.contains("1ms to 1h"), "{text}");
    }
}
