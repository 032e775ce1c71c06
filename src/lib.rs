//! roomcast: a synchronous, thread-per-connection WebSocket room relay for live chat,
//! reactions and viewer counts beside a live stream.
//!
//! Blocking I/O, one OS thread per connection, no async runtime. Every message a client sends
//! is relayed verbatim to every client in the same room, the sender included, and all members
//! of a room see its messages in one order.
//!
//! # Layout
//!
//! `src/` is grouped by the flow of a message. Follow one from socket to socket by reading
//! `relay` in the order of its table; the HTTP side and `v1` hang off it, and a newcomer to
//! blocking I/O can read the whole plain path without meeting any JSON.
//!
//! | module | role in the data flow |
//! | --- | --- |
//! | [`server`] | the acceptor: capacity checks, `503` when full, one small-stack thread per connection, shutdown and joins |
//! | `shared` | the state every connection thread shares (`Arc<Shared>`): config, hub, counters, the broadcaster's inbox |
//! | [`workers`] | the connection threads: one per connection, reused by the next connection when idle |
//! | **[`relay`]** | **the relay core** |
//! | [`relay::connection`] | a connection thread: route, admit, upgrade, join, read loop, leave, close |
//! | [`relay::hub`] | the `RwLock`'d map of rooms to their members, plain and v1 |
//! | [`relay::broadcaster`] | the one thread that numbers each message, encodes it once per protocol, and fans it out without blocking |
//! | [`relay::budget`] | the byte bound of the broadcaster's event channel |
//! | [`relay::client`] | one client as all threads share it: socket, outbox, identity, liveness clocks |
//! | [`relay::outbox`] | the per-client frame queue and its non-blocking `sendmsg`: the only path to a socket |
//! | [`relay::room_state`] | a room's epoch and `seq`, beyond its member list |
//! | [`relay::ratelimit`], [`relay::users`] | the token bucket; per-user limits, shared buckets and bans |
//! | **[`http`]** | **the HTTP side**: reading one request head under a deadline, plain responses |
//! | [`http::endpoints`], [`http::metrics`] | health, metrics, rooms API, publish, demo page |
//! | [`http::moderation`] | `POST /api/rooms/<room>/disconnect`: `4003` and bans |
//! | [`http::origin`] | `--allowed-origin` and the `Origin` header, compared as normalised origins |
//! | **[`v1`]** | **the `roomcast.v1` protocol**: join tokens ([`v1::token`]), identities ([`v1::identity`]), JSON frames ([`v1::codec`]) |
//! | [`backplane`] | with `--redis`: messages go through Redis so several instances share rooms (threads in `backplane::redis_link`) |
//! | [`capacity`] | start-up preflight: how many clients the fd, thread, mapping and memory limits allow |
//! | [`shutdown`], [`supervisor`] | the shutdown handle (which also wakes a blocked `accept()`); the watch on vital threads |
//! | [`config`], [`stats`], [`error`] | flags and defaults, counters, the error type |
//!
//! ```text
//!  acceptor ── accept() ──► hand to an idle conn thread, or spawn one (64 KiB stack)
//!  conn thread: read head ─► admit (token) ─► 101 into outbox ─► hub.join ─► loop { ws.read() ─► Event ─► channel }
//!  broadcaster: loop { select(channel, tick) ─► number, encode once per protocol, gather per room ─► queue in each member's outbox ─► sendmsg(MSG_DONTWAIT) }
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
pub mod capacity;
pub mod config;
pub mod error;
pub mod http;
pub mod relay;
pub mod server;
mod shared;
pub mod shutdown;
pub mod stats;
pub mod supervisor;
pub mod v1;
pub mod workers;

pub use config::{parse_args, Command, Config, ConfigError};
pub use error::Error;
pub use server::{run, Server, Summary};
pub use shutdown::Shutdown;
pub use stats::Stats;
