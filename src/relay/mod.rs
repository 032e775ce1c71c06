//! The relay core: from a connection thread reading a message, through the broadcaster, to
//! every member's socket. Read in this order: `connection`, `hub`, `broadcaster`, `client`,
//! `outbox`; the rest are the bounds and state they keep.

pub mod broadcaster;
pub mod budget;
pub mod client;
pub mod connection;
pub mod hub;
pub mod outbox;
pub mod ratelimit;
pub mod room_state;
pub mod users;
