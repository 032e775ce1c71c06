//! roomcast: a synchronous, thread-per-connection WebSocket room relay for live chat,
//! reactions and viewer counts beside a live stream.
//!
//! Blocking I/O, one OS thread per connection, no async runtime. Every message a client sends
//! is relayed verbatim to every client in the same room, the sender included, and all members
//! of a room see its messages in one order.
//!
//! # Layout
//!
//! Follow one message from socket to socket by reading the modules in this order:
//!
//! | module | role in the data flow |
//! | --- | --- |
//! | `shared` | the state every connection thread shares (`Arc<Shared>`): config, hub, counters, the broadcaster's inbox |
//! | [`server`] | the acceptor: capacity checks, `503` when full, one small-stack thread per connection, shutdown and joins |
//! | [`workers`] | the connection threads: one per connection, reused by the next connection when idle |
//! | [`capacity`] | start-up preflight: how many clients the fd, thread, mapping and memory limits allow |
//! | [`http`] | reading one request head under a deadline; plain responses |
//! | [`connection`] | a connection thread: route, upgrade, join, read loop, leave, close |
//! | [`endpoints`], [`metrics`] | the plain HTTP side: health, metrics, rooms API, publish, demo page |
//! | [`hub`] | the `RwLock`'d map of rooms to clients |
//! | [`broadcaster`] | the one thread that encodes each message once and fans it out without blocking |
//! | [`budget`] | the byte bound of the broadcaster's event channel |
//! | [`client`] | one client as all threads share it: socket, outbox, liveness clocks |
//! | [`outbox`] | the per-client frame queue and its non-blocking `sendmsg`: the only path to a socket |
//! | [`ratelimit`] | the per-client token bucket |
//! | [`backplane`] | with `--redis`: messages go through Redis so several instances share rooms (threads in `redis_link`) |
//! | [`shutdown`] | the shutdown handle, which also wakes a blocked `accept()` |
//! | [`supervisor`] | watches the broadcaster and Redis threads: a panic fails the server loudly |
//! | [`config`], [`stats`], [`error`] | flags and defaults, counters, the error type |
//! | [`origin`] | `--allowed-origin` and the `Origin` header, compared as normalised origins |
//!
//! ```text
//!  acceptor ── accept() ──► hand to an idle conn thread, or spawn one (64 KiB stack)
//!  conn thread: read head ─► 101 into outbox ─► hub.join ─► loop { ws.read() ─► Event ─► channel }
//!  broadcaster: loop { select(channel, tick) ─► encode once, gather per room ─► queue in each member's outbox ─► sendmsg(MSG_DONTWAIT) }
//! ```
//!
//! # Example
//!
//! ```no_run
//! use std::net::TcpListener;
//! let listener = TcpListener::bind("127.0.0.1:9001").unwrap();
//! let shutdown = roomcast::Shutdown::new();
//! let summary = roomcast::run(listener, roomcast::Config::default(), &shutdown).unwrap();
//! println!("relayed {} messages", summary.messages_relayed);
//! ```

pub mod backplane;
pub mod broadcaster;
pub mod budget;
pub mod capacity;
pub mod client;
pub mod config;
pub mod connection;
pub mod endpoints;
pub mod error;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod moderation;
pub mod origin;
pub mod outbox;
pub mod ratelimit;
#[cfg(feature = "redis")]
mod redis_link;
pub mod room_state;
pub mod server;
mod shared;
pub mod shutdown;
pub mod stats;
pub mod supervisor;
pub mod users;
pub mod v1;
pub mod workers;

pub use config::{parse_args, Command, Config, ConfigError};
pub use error::Error;
pub use server::{run, Server, Summary};
pub use shutdown::Shutdown;
pub use stats::Stats;
