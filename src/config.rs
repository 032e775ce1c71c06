//! Command-line configuration: every limit the server enforces, its default, and flag parsing.
//!
//! Parsing uses `std::env` only. Every flag has a safe default so `roomcast` with no arguments
//! is a sensible server; `--help` prints the same table as the README.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

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
/// How long a client may stay backlogged (bytes queued that the kernel will not take).
pub const DEFAULT_SLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the whole HTTP request head, so slowloris clients cannot hold a thread.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A client quiet for this long is pinged. Must be less than `DEFAULT_IDLE_TIMEOUT`,
/// so a live client always has a chance to answer before it is dropped.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);
/// A client from which nothing (not even a pong) arrives for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The environment variable `main` reads the publish API token from when `--api-token` is absent.
pub const API_TOKEN_ENV: &str = "ROOMCAST_API_TOKEN";
/// How long shutdown waits for clients to take their close frames before cutting sockets.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a crashed instance's clients still count in the cluster-wide room counts (the TTL
/// of its presence hash in Redis, refreshed every third of it).
pub const DEFAULT_REDIS_TTL: Duration = Duration::from_secs(15);
/// Shortest `--redis-ttl`: the heartbeat (a third of it) must leave Redis time to answer.
pub const MIN_REDIS_TTL: Duration = Duration::from_millis(300);
/// Whether this build has the Redis backplane (cargo feature `redis`).
pub const HAS_REDIS: bool = cfg!(feature = "redis");

/// Everything the server needs to know, fixed at start-up and shared read-only by every thread.
#[derive(Clone, Debug)]
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
    pub allowed_origins: Vec<String>,
    /// Bearer token for `POST /api/rooms/<room>/messages`; `None` turns that endpoint off.
    /// From `--api-token`, else the `API_TOKEN_ENV` environment variable (read by `main`),
    /// which keeps the secret out of `ps` output.
    pub api_token: Option<String>,
    pub log_level: LevelFilter,
    pub log_file: Option<PathBuf>,
    /// `redis://HOST:PORT/DB` of the backplane shared with other instances; `None` runs alone.
    pub redis: Option<String>,
    pub redis_ttl: Duration,
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
            test_panic_in_room: None,
        }
    }
}

impl Config {
    /// The outbox bound actually enforced: the configured one, raised if needed so that
    /// `OUTBOX_MESSAGE_MULTIPLE` maximum-size messages always fit.
    pub fn effective_outbox_bytes(&self) -> usize {
        self.outbox_bytes
            .max(OUTBOX_MESSAGE_MULTIPLE.saturating_mul(self.max_message_bytes))
    }

    /// Checks relations between flags that no single flag can check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ping_interval >= self.idle_timeout {
            return Err(ConfigError::new(
                "--ping-interval",
                "must be less than --idle-timeout",
            ));
        }
        if !(1..=MAX_MESSAGE_BYTES_LIMIT).contains(&self.max_message_bytes) {
            return Err(ConfigError::new(
                "--max-message-bytes",
                "must be between 1 and 1GiB",
            ));
        }
        if self.rate > 0 && self.burst == 0 {
            return Err(ConfigError::new(
                "--burst",
                "must be at least 1 when --rate is on",
            ));
        }
        if self.max_clients == Some(0) {
            return Err(ConfigError::new("--max-clients", "must be at least 1"));
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
                    format!("{url:?} is not a URL like redis://127.0.0.1:6379/0"),
                ));
            }
        }
        if self.redis_ttl < MIN_REDIS_TTL {
            return Err(ConfigError::new("--redis-ttl", "must be at least 300ms"));
        }
        Ok(())
    }
}

/// What the command line asked for: run with a config, or print something and exit 0.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    Help,
    Version,
}

/// A bad flag or value. Displays as one line naming the flag, as `main` prints it.
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

/// Parses the arguments after the program name.
///
/// Flags take their value either as the next argument (`--rate 10`) or inline
/// (`--rate=10`). Unknown flags and stray arguments are errors, never ignored: a typo in a
/// limit must not silently leave the default in force.
pub fn parse_args<I, S>(args: I) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut config = Config::default();
    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            _ => {}
        }
        if !flag.starts_with("--") {
            return Err(ConfigError::new(&flag, "unexpected argument (see --help)"));
        }
        let value = match inline {
            Some(value) => value,
            None => args
                .next()
                .ok_or_else(|| ConfigError::new(&flag, "needs a value"))?,
        };
        let value = value.as_str();
        let f = flag.as_str();
        match f {
            "--listen" => {
                config.listen = value.parse().map_err(|_| {
                    ConfigError::new(
                        f,
                        format!("{value:?} is not an address like 127.0.0.1:9001"),
                    )
                })?
            }
            "--max-clients" => {
                config.max_clients = match value {
                    "auto" => None,
                    _ => Some(parse_whole(f, value)?),
                }
            }
            "--max-clients-per-ip" => config.max_clients_per_ip = parse_whole(f, value)?,
            "--max-message-bytes" => config.max_message_bytes = parse_bytes(f, value)?,
            "--rate" => config.rate = parse_whole(f, value)?,
            "--burst" => config.burst = parse_whole(f, value)?,
            "--outbox-bytes" => config.outbox_bytes = parse_bytes(f, value)?,
            "--slow-timeout" => config.slow_timeout = parse_duration(f, value)?,
            "--handshake-timeout" => config.handshake_timeout = parse_duration(f, value)?,
            "--ping-interval" => config.ping_interval = parse_duration(f, value)?,
            "--idle-timeout" => config.idle_timeout = parse_duration(f, value)?,
            "--shutdown-grace" => config.shutdown_grace = parse_duration(f, value)?,
            "--allowed-origin" => {
                if value.is_empty() {
                    return Err(ConfigError::new(f, "must not be empty"));
                }
                config.allowed_origins.push(value.to_string())
            }
            "--api-token" => {
                if value.is_empty() {
                    return Err(ConfigError::new(f, "must not be empty"));
                }
                config.api_token = Some(value.to_string())
            }
            "--log-level" => {
                config.log_level = value.parse().map_err(|_| {
                    ConfigError::new(
                        f,
                        format!("{value:?} is not one of off, error, warn, info, debug, trace"),
                    )
                })?
            }
            "--log-file" => config.log_file = Some(PathBuf::from(value)),
            "--redis" => config.redis = Some(value.to_string()),
            "--redis-ttl" => config.redis_ttl = parse_duration(f, value)?,
            _ => return Err(ConfigError::new(f, "unknown flag (see --help)")),
        }
    }
    config.validate()?;
    Ok(Command::Run(Box::new(config)))
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

/// Parses a whole number of any unsigned type.
fn parse_whole<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::new(flag, format!("{value:?} is not a whole number")))
}

/// Splits `"64KiB"` into `(64, "KiB")`; `None` when there is no leading number.
fn number_and_unit(value: &str) -> Option<(u64, &str)> {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits_end);
    Some((number.parse().ok()?, unit))
}

/// Parses a byte size: a whole number with an optional binary suffix (`K`/`KiB`, `M`/`MiB`).
pub fn parse_bytes(flag: &str, value: &str) -> Result<usize, ConfigError> {
    let bad = || {
        ConfigError::new(
            flag,
            format!("{value:?} is not a size like 65536, 64KiB or 1MiB"),
        )
    };
    let (number, unit) = number_and_unit(value).ok_or_else(bad)?;
    let multiplier = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1024,
        "M" | "MiB" => 1024 * 1024,
        "G" | "GiB" => 1024 * 1024 * 1024,
        _ => return Err(bad()),
    };
    let bytes = number.checked_mul(multiplier).ok_or_else(bad)?;
    usize::try_from(bytes).map_err(|_| bad())
}

/// Parses a duration: a whole number with a unit (`ms`, `s`, `m`); a bare number is seconds.
pub fn parse_duration(flag: &str, value: &str) -> Result<Duration, ConfigError> {
    let bad = || {
        ConfigError::new(
            flag,
            format!("{value:?} is not a duration like 500ms, 10s or 2m"),
        )
    };
    let (number, unit) = number_and_unit(value).ok_or_else(bad)?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "" | "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.checked_mul(60).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    if duration.is_zero() {
        return Err(ConfigError::new(flag, "must be greater than zero"));
    }
    Ok(duration)
}

/// The `--help` text: every flag, its default, and what it bounds.
pub fn help() -> String {
    format!(
        "\
roomcast {version}: a thread-per-connection WebSocket room relay.

Clients connect to ws://HOST:PORT/ws/ROOM (ROOM is [A-Za-z0-9_.-]{{1,64}}; /ws alone is \"lobby\").
Every text or binary message is relayed verbatim to everyone in the room, the sender included.

USAGE:
    roomcast [FLAGS]

FLAGS (value as `--flag VALUE` or `--flag=VALUE`):
    --listen ADDR              address to listen on                    [default: {listen}]
    --max-clients N|auto       connections held at once; over it: 503  [default: auto, from fd/thread/memory limits]
    --max-clients-per-ip N     connections per client IP; over it: 503 [default: 0 = off]
    --max-message-bytes SIZE   largest message accepted; over it: 1009 [default: 64KiB]
    --rate N                   messages/s per client; over it: 1008    [default: {rate}, 0 = off]
    --burst N                  messages a client may send at once      [default: {burst}]
    --outbox-bytes SIZE        unsent bytes queued per client before   [default: 1MiB, at least
                               it is evicted as slow                    {multiple} x --max-message-bytes]
    --slow-timeout DUR         time a client may stay backlogged       [default: 10s]
    --handshake-timeout DUR    deadline for the HTTP request head      [default: 5s]
    --ping-interval DUR        ping clients quiet for this long        [default: 20s, < --idle-timeout]
    --idle-timeout DUR         close clients silent for this long      [default: 60s]
    --shutdown-grace DUR       time to flush close frames on shutdown  [default: 5s]
    --allowed-origin ORIGIN    allowed Origin header; repeatable; 403  [default: any]
                               for others
    --api-token TOKEN          bearer token for POST /api/rooms/ROOM/   [default: $ROOMCAST_API_TOKEN,
                               messages (off without one: 404), and     else off]
                               for GET /metrics and /api/rooms
    --log-level LEVEL          off, error, warn, info, debug, trace    [default: info]
    --log-file PATH            also append the log to this file        [default: stderr only]
    --redis URL                share rooms with other instances        [default: off; needs the
                               through Redis, e.g. redis://HOST:6379/0  `redis` cargo feature]
    --redis-ttl DUR            how long a crashed instance's clients   [default: 15s]
                               still count in cluster-wide room counts
    -h, --help                 print this help
    -V, --version              print the version

SIZE is bytes with an optional K/KiB or M/MiB suffix; DUR is a number with ms, s or m (bare = s).
",
        version = env!("CARGO_PKG_VERSION"),
        listen = DEFAULT_LISTEN,
        rate = DEFAULT_RATE,
        burst = DEFAULT_BURST,
        multiple = OUTBOX_MESSAGE_MULTIPLE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, ConfigError> {
        match parse_args(args.iter().copied())? {
            Command::Run(config) => Ok(*config),
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn no_flags_gives_documented_defaults() {
        let config = run(&[]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(config.max_clients, None);
        assert_eq!(config.max_message_bytes, 64 * 1024);
        assert_eq!((config.rate, config.burst), (50, 100));
        assert_eq!(config.effective_outbox_bytes(), 1024 * 1024);
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
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
        ])
        .unwrap();
        assert_eq!((config.rate, config.burst), (7, 9));
        assert_eq!(config.max_message_bytes, 2 * 1024 * 1024);
        assert_eq!(config.slow_timeout, Duration::from_millis(250));
    }

    #[test]
    fn outbox_never_below_two_messages() {
        let config = run(&["--max-message-bytes", "1M", "--outbox-bytes", "100K"]).unwrap();
        assert_eq!(config.effective_outbox_bytes(), 2 * 1024 * 1024);
    }

    #[test]
    fn origins_repeat() {
        let config = run(&[
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin=https://b.example",
        ])
        .unwrap();
        assert_eq!(
            config.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
    }

    #[test]
    fn errors_name_the_flag() {
        for (args, flag) in [
            (&["--bogus", "1"][..], "--bogus"),
            (&["--rate", "fast"][..], "--rate"),
            (&["--rate"][..], "--rate"),
            (&["--listen", "nowhere"][..], "--listen"),
            (&["--max-message-bytes", "12XB"][..], "--max-message-bytes"),
            (
                &["--max-message-bytes", "13010278877657708772"][..],
                "--max-message-bytes",
            ),
            (&["--max-message-bytes", "2GiB"][..], "--max-message-bytes"),
            (&["--idle-timeout", "0s"][..], "--idle-timeout"),
            (&["--ping-interval", "90s"][..], "--ping-interval"),
            (&["stray"][..], "stray"),
        ] {
            let err = run(args).unwrap_err();
            assert_eq!(err.flag, flag, "{args:?} gave {err}");
            assert!(!err.to_string().contains('\n'));
        }
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
        assert_eq!(
            run(&["--redis-ttl", "100ms"]).unwrap_err().flag,
            "--redis-ttl"
        );
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("f", "2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("f", "3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("f", "-1s").is_err());
        assert_eq!(parse_bytes("f", "64KiB").unwrap(), 65536);
        assert!(parse_bytes("f", "99999999999999999999M").is_err());
    }

    #[test]
    fn help_mentions_every_flag() {
        let text = help();
        for flag in [
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
            "--log-level",
            "--log-file",
            "--redis",
            "--redis-ttl",
        ] {
            assert!(text.contains(flag), "help lacks {flag}");
        }
    }
}
