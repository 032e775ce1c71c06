//! The `roomcast.v1` protocol (`PROTOCOL.md`): who a client is, and the JSON frames it speaks.
//!
//! Everything here is off the plain relay's path: a plain client never reaches this code.

pub mod codec;
pub mod identity;
pub mod token;
