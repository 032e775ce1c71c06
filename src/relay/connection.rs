//! A connection thread: one per accepted socket, and the only thread that reads it.
//!
//! Its life, in order:
//! 1. read the HTTP request head under the handshake deadline (http.rs);
//! 2. route it: upgrade `/ws/<room>`, or answer a plain HTTP endpoint (endpoints.rs) or
//!    status, and close;
//! 3. queue the `101` in a fresh outbox, join the room, flush (so the client is a member the
//!    moment it sees the `101`, and no room message can overtake the `101`); a v1 client
//!    then has the broadcaster queue its `welcome`;
//! 4. loop: block in `read` until a whole message arrives, hand it to the broadcaster (a v1
//!    client's JSON request goes through `v1::codec` first);
//! 5. on close, error, timeout or eviction: leave the room, send a close frame if one is
//!    owed, and end.
//!
//! It never writes the socket itself after step 3. Tungstenite believes it writes to a
//! `ClientStream`, whose `Write` queues into the client's outbox; that is how the automatic
//! pong and close replies join the same single path as the broadcaster's frames.

use std::io::{self, Read, Write};
use std::net::{Shutdown as Both, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, trace};
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Bytes, Message, WebSocket};

use crate::http::endpoints;
use crate::http::origin::{self, Origin};
use crate::http::{self, HeadError, Request, Response};
use crate::relay::broadcaster::{Event, Events, Message as RoomMessage, MessageKind, Resume};
use crate::relay::client::{Client, Protocol, Session};
use crate::relay::hub::{is_valid_room_name, Hub};
use crate::relay::outbox::Flush;
use crate::relay::ratelimit::TokenBucket;
use crate::relay::users::{Seat, User};
use crate::shared::Shared;
use crate::stats::Eviction;
use crate::v1::codec::{self, ErrorCode, Incoming};
use crate::v1::identity::{self, Identity};

/// Tungstenite's read buffer per connection. Its default (128 KiB, allocated eagerly and
/// zero-filled on first read) would make 15,000 idle viewers cost 2 GiB. Measured with 5,000
/// idle clients: 4 KiB gives 15.2 KiB RSS per client, 2 KiB 13.2 KiB, 1 KiB 12.2 KiB. Chat
/// messages are small, and a larger one simply takes more `read` calls.
pub const READ_BUFFER_BYTES: usize = 2048;
/// The room of a bare `/ws`.
pub const DEFAULT_ROOM: &str = "lobby";
/// How long a closing connection waits for its close frame to leave and for the peer to
/// answer with its own close and FIN. Bounded, because the peer may be dead.
const LINGER: Duration = Duration::from_millis(1000);
/// Poll step while waiting for a backlogged close frame to leave during `LINGER`.
const LINGER_STEP: Duration = Duration::from_millis(10);
/// What a refused upgrade asks the client to wait before retrying, in seconds.
pub const RETRY_AFTER_SECS: u32 = 2;

/// Serves one accepted connection from its first byte to its end.
///
/// Its two phases, the handshake (read the head, decide, admit) and the session, are kept out
/// of line, and so are the steps inside them (`decide`, `session`, `close_in_order`,
/// `finish`, `respond_and_close`). A connection thread's stack pages, once touched, stay
/// resident for the connection's life, so what counts is the deepest moment of each phase:
/// inlined, all their locals would share one frame, on the stack for the whole session.
/// Measured with 3,000 idle clients, inlining the steps made every connection touch one more
/// 4 KiB page (17.3 instead of 13.3 KiB RSS per connection), and so did keeping the
/// handshake's locals in this frame beneath the session, or tungstenite's `WebSocket` in the
/// session's frame (see `new_websocket`).
pub(crate) fn serve(shared: &Shared, socket: Arc<TcpStream>, peer: SocketAddr, id: u64) {
    if let Some((admitted, leftover)) = handshake(shared, &socket, peer, id) {
        run(shared, socket, peer, id, admitted, leftover);
    }
}

/// Steps 1 and 2: reads the request head and decides what it gets. Returns the admitted
/// upgrade, or `None` once a plain response has been sent (or nothing could be).
#[inline(never)]
fn handshake<'a>(
    shared: &'a Shared,
    socket: &TcpStream,
    peer: SocketAddr,
    id: u64,
) -> Option<(Admitted<'a>, Vec<u8>)> {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let (request, leftover) = match http::read_request(socket, deadline) {
        Ok(read) => read,
        Err(error) => {
            debug!("connection {id} ({peer}): no request: {error:?}");
            let status = match error {
                HeadError::Timeout => 408,
                HeadError::TooLarge => 431,
                HeadError::Malformed => 400,
                HeadError::Disconnected | HeadError::Io(_) => return None,
            };
            respond_and_close(socket, &Response::status(status), deadline);
            return None;
        }
    };
    // Admission runs here rather than inside `decide`, so its frames (and the allocations an
    // identity makes) do not sit on top of `decide`'s: measured with page-fault profiles, that
    // nesting was the one call deep enough to touch a third stack page on every connection.
    let response = match decide(shared, socket, &request, leftover, deadline) {
        Decision::Upgrade(upgrade, leftover) => match admit(shared, &request, upgrade, id) {
            Ok(admitted) => return Some((admitted, leftover)),
            Err(response) => response,
        },
        Decision::Respond(response) => response,
    };
    debug!(
        "connection {id} ({peer}): {} {} -> {}",
        request.method, request.path, response.status
    );
    respond_and_close(socket, &response, deadline);
    None
}

/// Steps 3 to 5: the WebSocket session of an admitted upgrade.
#[inline(never)]
fn run(
    shared: &Shared,
    socket: Arc<TcpStream>,
    peer: SocketAddr,
    id: u64,
    admitted: Admitted<'_>,
    leftover: Vec<u8>,
) {
    let Admitted {
        upgrade,
        identity,
        seat,
    } = admitted;
    let client = new_client(shared, &upgrade, socket, peer, id, identity);
    client.mark_heard();
    // Order matters: queue the 101 first, then become visible to the broadcaster, then flush.
    // Anything the broadcaster queues from now on lands behind the 101.
    client.queue_response(Bytes::from(upgrade.response));
    let membership = Membership::join(&shared.hub, &client);
    // A ban may have landed between `admit`'s check and the join, after the moderator had
    // walked the room: look again. The moderator bans (users lock) before it walks the room
    // (hub lock), and this joined (hub lock) before looking (users lock), so either the walk
    // saw this client or this sees the ban. The `101` may be out already, so it is a `4003`.
    if let Some(user) = client.identity.user() {
        if shared.users.is_banned(&client.room, user, Instant::now()) {
            client.remove_by_moderator(crate::http::moderation::BANNED_REASON);
        }
    }
    shared.stats.clients_served.fetch_add(1, Ordering::Relaxed);
    flush(&shared.events, &client);
    debug!(
        "client {id} ({peer}) joined room {} as {:?} ({:?})",
        client.room, client.identity.id, client.protocol
    );

    let ending = if client.protocol == Protocol::V1
        && shared
            .events
            .send(Event::Welcome {
                client: client.clone(),
                resume: upgrade.resume,
            })
            .is_err()
    {
        Ending::Close(CloseCode::Away, "server shutting down", None)
    } else {
        let user = seat.as_ref().map(|seat| &*seat.user);
        // Built here, not in `session`: tungstenite allocates its read buffer as it is made,
        // and an allocation can run deep inside malloc; one frame less under it measured one
        // stack page less per v1 connection.
        let ws = new_websocket(shared, &client, leftover);
        session(shared, &client, ws, user)
    };
    // Still a member here, so messages the client sent before the close are echoed to it.
    if let Ending::Close(code, reason, eviction) = ending {
        if let Some(eviction) = eviction {
            client.record_eviction(eviction);
        }
        close_in_order(shared, &client, code, reason);
    }
    drop(membership);
    // The user's connection place goes with the membership, not after the linger below: a
    // user at `--max-connections-per-user` may reconnect as soon as it has left the room.
    drop(seat);
    debug!("client {id} ({peer}) left room {}: {ending:?}", client.room);
    finish(&client, ending);
}

/// The shared `Client` of an admitted upgrade. Out of line: a `Client` is built on the stack
/// before it moves into its `Arc`, and that temporary would otherwise widen `run`'s frame for
/// the whole session.
#[inline(never)]
fn new_client(
    shared: &Shared,
    upgrade: &Upgrade,
    socket: Arc<TcpStream>,
    peer: SocketAddr,
    id: u64,
    identity: Identity,
) -> Arc<Client> {
    Arc::new(Client::new(
        id,
        Arc::from(upgrade.room.as_str()),
        peer,
        socket,
        shared.config.effective_outbox_bytes(),
        shared.stats.clone(),
        Session {
            protocol: upgrade.protocol,
            identity: Arc::new(identity),
        },
    ))
}

/// A client's place in the hub, given up on drop: on the normal path, and also if the
/// thread panics, so a dead client can never stay in a room.
struct Membership<'a> {
    hub: &'a Hub,
    client: &'a Arc<Client>,
}

impl<'a> Membership<'a> {
    fn join(hub: &'a Hub, client: &'a Arc<Client>) -> Membership<'a> {
        hub.join(client.clone());
        Membership { hub, client }
    }
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        self.hub.leave(self.client);
    }
}

/// What a request gets: a WebSocket session (with the bytes that followed its head), or one
/// plain HTTP response.
enum Decision {
    Upgrade(Upgrade, Vec<u8>),
    Respond(Response),
}

/// An upgrade that passed every check, with who is asking and, for a verified user, its
/// place among that user's connections.
struct Admitted<'a> {
    upgrade: Upgrade,
    identity: Identity,
    seat: Option<Seat<'a>>,
}

#[inline(never)]
fn decide(
    shared: &Shared,
    socket: &TcpStream,
    request: &Request,
    leftover: Vec<u8>,
    deadline: Instant,
) -> Decision {
    if !is_websocket_path(&request.path) {
        return Decision::Respond(endpoints::answer(
            shared, socket, request, leftover, deadline,
        ));
    }
    match route(request, &shared.config.allowed_origins) {
        // While draining, the server finishes serving its clients but admits no new ones.
        Ok(_) if shared.is_draining() => Decision::Respond(
            Response::status(503)
                .with_header("Retry-After", RETRY_AFTER_SECS.to_string())
                .with_body("draining: the server is shutting down\n"),
        ),
        Ok(upgrade) => Decision::Upgrade(upgrade, leftover),
        Err(response) => Decision::Respond(response),
    }
}

/// Who may join: the join token (PROTOCOL §2), bans, and the per-user connection cap. Runs
/// after `route`, so a request that is not even a valid upgrade never costs an HMAC. Out of
/// line, like `decide`, so its frames are not part of the session's.
#[inline(never)]
fn admit<'a>(
    shared: &'a Shared,
    request: &Request,
    upgrade: Upgrade,
    id: u64,
) -> Result<Admitted<'a>, Response> {
    let config = &shared.config;
    let refuse = |status: u16, reason: &'static str, body: &str| {
        shared.stats.count_auth_refusal(reason);
        debug!(
            "connection {id}: upgrade to {} refused: {reason}",
            upgrade.room
        );
        let response = Response::status(status).with_body(format!("{body}\n"));
        if status == 401 {
            response.with_header("WWW-Authenticate", "Bearer")
        } else {
            response
        }
    };
    let identity = identity::identify(
        request,
        &upgrade.room,
        &config.token_secrets,
        id,
        std::time::SystemTime::now(),
    )
    .map_err(|refused| {
        let body = format!("join token refused: {}", refused.reason);
        refuse(refused.status, refused.reason, &body)
    })?;
    let Some(user) = identity.user().cloned() else {
        return Ok(Admitted {
            upgrade,
            identity,
            seat: None,
        });
    };
    let now = Instant::now();
    if shared.users.is_banned(&upgrade.room, &user, now) {
        return Err(refuse(
            403,
            "banned",
            "join token refused: banned from this room",
        ));
    }
    match shared.users.admit(
        &user,
        config.max_connections_per_user,
        (config.rate, config.burst),
        (config.reaction_rate, config.reaction_burst),
        now,
    ) {
        Ok(seat) => Ok(Admitted {
            upgrade,
            identity,
            seat: Some(seat),
        }),
        Err(_) => Err(refuse(
            503,
            "too_many_connections",
            "too many connections for this user",
        )
        .with_header("Retry-After", RETRY_AFTER_SECS.to_string())),
    }
}

/// `/ws` and everything under `/ws/` is the WebSocket endpoint; other paths are plain HTTP.
fn is_websocket_path(path: &str) -> bool {
    path == "/ws" || path.starts_with("/ws/")
}

/// The upgrade a valid request asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub room: String,
    /// `V1` when the client offered `roomcast.v1` (and the `101` names it).
    pub protocol: Protocol,
    /// `?since=<seq>&epoch=<epoch>`: a v1 client resuming (PROTOCOL §4).
    pub resume: Option<Resume>,
    /// The complete `101 Switching Protocols` response.
    pub response: Vec<u8>,
}

/// Decides what a request gets: an upgrade, or a plain HTTP status.
///
/// Checks run from the most general to the most specific (path, method, upgrade headers,
/// version, key, origin), so each status names the first thing wrong with the request.
pub fn route(request: &Request, allowed_origins: &[Origin]) -> Result<Upgrade, Response> {
    let room = match request.path.as_str() {
        "/ws" => DEFAULT_ROOM,
        path => match path.strip_prefix("/ws/") {
            Some(room) => room,
            None => return Err(Response::status(404)),
        },
    };
    if !is_valid_room_name(room) {
        return Err(Response::status(400)
            .with_body("bad room name: use 1-64 of A-Z a-z 0-9 _ . - (but not . or ..)\n"));
    }
    if request.method != "GET" {
        return Err(Response::status(405).with_header("Allow", "GET"));
    }
    let is_upgrade = request
        .header("Upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        && request.header_has_token("Connection", "upgrade");
    if !is_upgrade {
        return Err(Response::status(426)
            .with_header("Upgrade", "websocket")
            .with_header("Connection", "Upgrade")
            .with_body("this is a WebSocket endpoint: connect with a WebSocket client\n"));
    }
    if request.header("Sec-WebSocket-Version") != Some("13") {
        return Err(Response::status(426).with_header("Sec-WebSocket-Version", "13"));
    }
    let key = match request.header("Sec-WebSocket-Key") {
        Some(key) if is_valid_key(key) => key,
        _ => {
            return Err(Response::status(400).with_body("missing or malformed Sec-WebSocket-Key\n"))
        }
    };
    // Browsers always send Origin; the allow-list exists to stop other sites' pages from
    // connecting with a visitor's cookies. Non-browser clients may omit it (and could forge
    // it anyway), so a missing Origin is not a reason to refuse. Both sides are compared as
    // normalised origins (case, default port), and an Origin that does not parse matches none.
    if let Some(origin) = request.header("Origin") {
        if !allowed_origins.is_empty() && !origin::is_allowed(allowed_origins, origin) {
            return Err(Response::status(403).with_body("origin not allowed\n"));
        }
    }
    // A client offering only protocols we do not speak gets no protocol header back, and
    // decides itself whether to go on (RFC 6455 §4.2.2). Names are compared exactly.
    let protocol = if request.header_list_contains("Sec-WebSocket-Protocol", codec::SUBPROTOCOL) {
        Protocol::V1
    } else {
        Protocol::Plain
    };
    let protocol_header = match protocol {
        Protocol::V1 => "Sec-WebSocket-Protocol: roomcast.v1\r\n",
        Protocol::Plain => "",
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{protocol_header}\r\n",
        derive_accept_key(key.as_bytes())
    );
    Ok(Upgrade {
        room: room.to_string(),
        protocol,
        resume: resume_of(request),
        response: response.into_bytes(),
    })
}

/// The resume a request asks for with `since` and `epoch`. One that asks with a malformed
/// value (a `since` that is not a number, an epoch that cannot be one) still counts as a
/// resume, one that cannot recover.
fn resume_of(request: &Request) -> Option<Resume> {
    let since = request.query_param("since");
    let epoch = request.query_param("epoch");
    if since.is_none() && epoch.is_none() {
        return None;
    }
    let since = since.and_then(|since| since.parse().ok());
    let epoch = epoch.filter(|epoch| {
        (1..=32).contains(&epoch.len())
            && epoch
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    });
    Some(match (since, epoch) {
        (Some(since), Some(epoch)) => Resume { since, epoch },
        _ => Resume {
            since: u64::MAX,
            epoch: String::new(),
        },
    })
}

/// A key is the base64 encoding of 16 bytes: 22 significant characters and `==` (RFC 6455 §4.1).
fn is_valid_key(key: &str) -> bool {
    key.len() == 24
        && key.ends_with("==")
        && key[..22]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// How a WebSocket session ended, and so what the client is owed.
#[derive(Debug)]
enum Ending {
    /// The client sent a close frame; tungstenite and we have answered it.
    ClosedByClient,
    /// The TCP connection went away (FIN without close, RST), or we were evicted: nothing to
    /// send.
    Gone,
    /// A moderator removed the client: its `4003` close is queued, and must get out.
    Removed,
    /// We end it, with this close code and reason.
    Close(CloseCode, &'static str, Option<Eviction>),
}

/// Reads messages until the session ends. This is where the connection thread spends its life,
/// almost all of it blocked in `read`.
#[inline(never)]
fn session(
    shared: &Shared,
    client: &Arc<Client>,
    mut ws: Box<WebSocket<ClientStream>>,
    user: Option<&User>,
) -> Ending {
    let config = &shared.config;
    // The read deadline is the idle timeout: every byte received restarts it (it bounds each
    // read call), so it fires only when the client has been silent, pongs included, that long.
    if let Err(err) = client.socket().set_read_timeout(Some(config.idle_timeout)) {
        debug!("client {}: cannot set read timeout: {err}", client.id);
        return Ending::Gone;
    }
    let mut limit = match user {
        Some(user) => Limit::User(user),
        None => {
            let now = Instant::now();
            Limit::Connection(Box::new((
                TokenBucket::new(config.rate, config.burst, now),
                TokenBucket::new(config.reaction_rate, config.reaction_burst, now),
            )))
        }
    };

    loop {
        let message = match ws.read() {
            // Messages tungstenite had already buffered when the client was evicted are not
            // relayed either (see `ClientStream::read`).
            Ok(_) if client.eviction().is_some() => return ending_after_removal(client),
            Ok(message) => message,
            Err(error) => return ending_for(client, error),
        };
        // Data messages and pings take a token: pings too, so a ping flood (each of which
        // costs a pong) is a rate violation like any other flood. A v1 text frame is charged
        // once parsed (`v1_request`), since a reaction costs none (PROTOCOL §3).
        let is_counted = match (client.protocol, &message) {
            (Protocol::V1, Message::Text(_)) => false,
            (_, message) => matches!(
                message,
                Message::Text(_) | Message::Binary(_) | Message::Ping(_)
            ),
        };
        if is_counted && !limit.try_take(Instant::now()) {
            return Ending::Close(
                CloseCode::Policy,
                "rate limit exceeded",
                Some(Eviction::Rate),
            );
        }
        let (kind, payload) = match (client.protocol, message) {
            (Protocol::V1, Message::Text(text)) => {
                match v1_request(shared, client, &text, &mut limit) {
                    V1Outcome::Relay(kind, payload) => (kind, payload),
                    V1Outcome::Done => continue,
                    V1Outcome::OverRate => {
                        return Ending::Close(
                            CloseCode::Policy,
                            "rate limit exceeded",
                            Some(Eviction::Rate),
                        )
                    }
                }
            }
            (Protocol::V1, Message::Binary(_)) => {
                return Ending::Close(
                    CloseCode::Unsupported,
                    "binary frames are not part of roomcast.v1",
                    None,
                )
            }
            (Protocol::Plain, Message::Text(_) | Message::Binary(_))
                if !client.identity.perm.can_post() =>
            {
                return Ending::Close(
                    CloseCode::Policy,
                    "not allowed to post",
                    Some(Eviction::Forbidden),
                )
            }
            (Protocol::Plain, Message::Text(text)) => (MessageKind::Text, Bytes::from(text)),
            (Protocol::Plain, Message::Binary(data)) => (MessageKind::Binary, data),
            // Tungstenite has queued the pong; it is flushed at the top of the next `read`.
            (_, Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
            (_, Message::Close(frame)) => {
                // Answer with the client's own code (tungstenite has already replaced a code
                // that is not allowed on the wire by 1002). Queuing it ourselves seals the
                // outbox, so no room message can follow our close; tungstenite's identical
                // reply is then dropped by the sealed outbox.
                let code = frame.map_or(CloseCode::Normal, |f| f.code);
                client.queue_close(code, "");
                flush(&shared.events, client);
                continue;
            }
        };
        trace!(
            "client {} sent {} bytes to room {}",
            client.id,
            payload.len(),
            client.room
        );
        shared
            .stats
            .messages_received
            .fetch_add(1, Ordering::Relaxed);
        // On to the broadcaster, directly or through Redis (see `Shared::relay`). The local
        // path is a bounded channel: when the broadcaster is behind, this blocks, which stops
        // this thread reading, which lets TCP flow control push back on the sender. With
        // `--redis` a full publish queue drops the message (counted); the sender is not told,
        // the relay being best-effort under overload. It stops only during shutdown.
        let relayed = shared.relay(RoomMessage {
            room: client.room.clone(),
            kind,
            payload,
            from: Some(client.identity.from_json.clone()),
            order: crate::relay::broadcaster::Order::Here,
        });
        if relayed == crate::backplane::Relayed::Stopped {
            return Ending::Close(CloseCode::Away, "server shutting down", None);
        }
    }
}

/// Whose rates a message or a reaction counts against: the connection's own buckets
/// (messages, reactions), or, for a verified user, the buckets all of that user's connections
/// share (so neither a second connection nor a reconnect buys more). Boxed so the session's
/// frame stays small (see `serve`).
enum Limit<'a> {
    Connection(Box<(TokenBucket, TokenBucket)>),
    User(&'a User),
}

impl Limit<'_> {
    fn try_take(&mut self, now: Instant) -> bool {
        match self {
            Limit::Connection(buckets) => buckets.0.try_take(now),
            Limit::User(user) => user.bucket.lock().try_take(now),
        }
    }

    fn try_take_reaction(&mut self, now: Instant) -> bool {
        match self {
            Limit::Connection(buckets) => buckets.1.try_take(now),
            Limit::User(user) => user.reactions.lock().try_take(now),
        }
    }
}

/// The longest v1 text frame that is let through to the parser without a message token: a
/// `react` with a 32-byte key, even fully escaped, is well under it.
const MAX_TAP_FRAME_BYTES: usize = 256;

/// What one text frame of a v1 client comes to.
enum V1Outcome {
    /// A message for the room.
    Relay(MessageKind, Bytes),
    /// Answered (an `error` frame) or accepted with nothing to relay (a reaction).
    Done,
    /// Over the message rate: the client is closed with `1008`.
    OverRate,
}

/// Answers one text frame of a v1 client: the room message it asks for, or an `error` frame
/// for a request that is malformed or not allowed. Every frame but a reaction costs a message
/// token, the malformed and the forbidden included (PROTOCOL §3).
///
/// Out of line, so the JSON parser's stack frames exist only while a frame is parsed, not for
/// the whole session (see `serve`).
#[inline(never)]
fn v1_request(
    shared: &Shared,
    client: &Arc<Client>,
    text: &str,
    limit: &mut Limit<'_>,
) -> V1Outcome {
    let perm = client.identity.perm;
    // A frame too long to be a tap pays its message token before it is parsed, so a client
    // cannot make the server parse big frames for free by calling them reactions.
    let prepaid = text.len() > MAX_TAP_FRAME_BYTES;
    if prepaid && !limit.try_take(Instant::now()) {
        return V1Outcome::OverRate;
    }
    let request = codec::parse(text);
    if let Ok(Incoming::React(key)) = &request {
        // A permitted tap costs no message token and is never a close: over its own bucket,
        // or a key the room does not count, it is dropped and counted (PROTOCOL §3).
        if perm.can_react() {
            react(shared, client, key, limit);
            return V1Outcome::Done;
        }
    }
    // Everything else costs a token: the malformed and the forbidden (a tap without the
    // right included) as much as a publish.
    if !prepaid && !limit.try_take(Instant::now()) {
        return V1Outcome::OverRate;
    }
    let (code, message) = match request {
        Ok(Incoming::Publish(data)) if perm.can_post() => match codec::minify(data) {
            Some(data) => return V1Outcome::Relay(MessageKind::Json, Bytes::from(data)),
            None => (ErrorCode::BadRequest, "data nested deeper than 64 levels"),
        },
        Ok(Incoming::Publish(_)) => (ErrorCode::Forbidden, "your token does not allow posting"),
        Ok(Incoming::React(_)) => (ErrorCode::Forbidden, "your token does not allow reacting"),
        Err(reason) => (ErrorCode::BadRequest, reason),
    };
    let frame = crate::relay::client::encode_text(codec::error(code, message));
    // Through the broadcaster (and with `--redis` behind the client's publishes in the
    // publish queue), so the error never overtakes the welcome or an earlier message.
    let reply = Event::Reply {
        client: client.clone(),
        frame,
    };
    let deadline = Instant::now() + LINGER;
    if crate::backplane::relay_in_order(
        shared.backplane.as_deref(),
        &shared.events,
        reply,
        deadline,
    ) {
        shared.stats.v1_errors_sent.fetch_add(1, Ordering::Relaxed);
    }
    V1Outcome::Done
}

/// Hands a permitted reaction tap to the broadcaster, which counts it in the room's totals;
/// a tap over the user's reaction bucket or with a key outside `--reaction-keys` is dropped.
fn react(shared: &Shared, client: &Client, key: &str, limit: &mut Limit<'_>) {
    let stats = &shared.stats;
    let keys = &shared.config.reaction_keys;
    if !keys.is_empty() && !keys.iter().any(|allowed| allowed == key) {
        stats.reactions_dropped_key.fetch_add(1, Ordering::Relaxed);
    } else if !limit.try_take_reaction(Instant::now()) {
        stats.reactions_dropped_rate.fetch_add(1, Ordering::Relaxed);
    } else {
        // Blocks while the broadcaster is behind, as a message does: backpressure on a
        // client tapping faster than the server counts.
        let _ = shared.events.send(Event::React {
            room: client.room.clone(),
            key: key.to_string(),
        });
    }
}

/// How a session ends when the server has removed the client: a moderator's removal still
/// owes the client its close frame; every other removal (an eviction) leaves nothing to send.
fn ending_after_removal(client: &Client) -> Ending {
    match client.eviction() {
        Some(Eviction::Moderated) => Ending::Removed,
        _ => Ending::Gone,
    }
}

/// Tungstenite's side of a session, on the heap: on the stack it would be the largest local of
/// `session`, whose frame lives under every `read` for the whole session (see `serve`).
#[inline(never)]
fn new_websocket(
    shared: &Shared,
    client: &Arc<Client>,
    leftover: Vec<u8>,
) -> Box<WebSocket<ClientStream>> {
    let max_message_bytes = shared.config.max_message_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(max_message_bytes))
        // Tungstenite reserves a frame's announced length before reading its payload, so the
        // frame limit must not exceed the message limit or a lying header costs that much.
        .max_frame_size(Some(max_message_bytes));
    let stream = ClientStream {
        client: client.clone(),
        events: shared.events.clone(),
    };
    Box::new(WebSocket::from_partially_read(
        stream,
        leftover,
        Role::Server,
        Some(config),
    ))
}

/// Maps what ended `read` to what the client is owed.
fn ending_for(client: &Client, error: WsError) -> Ending {
    if client.eviction().is_some() {
        return ending_after_removal(client);
    }
    match error {
        WsError::ConnectionClosed | WsError::AlreadyClosed => Ending::ClosedByClient,
        WsError::Io(err)
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ending::Close(CloseCode::Away, "idle timeout", Some(Eviction::Idle))
        }
        WsError::Io(_) | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Ending::Gone
        }
        WsError::Capacity(_) => {
            Ending::Close(CloseCode::Size, "message too big", Some(Eviction::Size))
        }
        WsError::Utf8(_) => {
            Ending::Close(CloseCode::Invalid, "invalid UTF-8 in text message", None)
        }
        WsError::Protocol(_) => Ending::Close(CloseCode::Protocol, "protocol error", None),
        _ => Ending::Close(CloseCode::Error, "internal error", None),
    }
}

/// Queues our close frame behind every message this client sent before it, by sending the
/// close the way those messages went: through the broadcaster, and with `--redis` through the
/// publish queue and Redis (see `backplane::relay_in_order`). Without this, a client that sends a
/// message and then a bad frame would get the close but never its own message back (Autobahn
/// 3.2, 4.x and 5.15 check exactly that). Falls back to queuing directly when the broadcaster
/// is gone (shutdown) or the close is not queued within `LINGER`.
#[inline(never)]
fn close_in_order(shared: &Shared, client: &Arc<Client>, code: CloseCode, reason: &'static str) {
    let (done, queued) = crossbeam_channel::bounded(1);
    let event = Event::Close {
        client: client.clone(),
        code,
        reason,
        done,
    };
    let deadline = Instant::now() + LINGER;
    let is_queued = crate::backplane::relay_in_order(
        shared.backplane.as_deref(),
        &shared.events,
        event,
        deadline,
    ) && queued.recv_deadline(deadline).is_ok();
    if !is_queued {
        client.queue_close(code, reason);
    }
}

/// Sends what the ending owes the client, then closes the TCP connection.
///
/// The server closes TCP first after a close handshake (RFC 6455 §7.1.1). Before that, the
/// close frame must actually leave: we flush it (bounded by `LINGER`). When we started the
/// close, the client may still be sending, so we then half-close and read until its FIN:
/// unread bytes in our receive buffer would turn our close into an RST that could destroy
/// the close frame in flight. When the client started it, its close frame was its last, so
/// nothing is left unread and the socket can close at once (a FIN, after our frame).
#[inline(never)]
fn finish(client: &Client, ending: Ending) {
    let removed = matches!(ending, Ending::Removed);
    let client_closed = match ending {
        Ending::Gone => {
            let _ = client.socket().shutdown(Both::Both);
            return;
        }
        // Our close frame is already queued, by `close_in_order` or by the close reply.
        Ending::ClosedByClient => true,
        // A close we started (for a removal, queued by the moderator's request): the client
        // may still be sending, so we drain until its FIN (reads still work after the
        // moderator's `shutdown(Read)`).
        Ending::Close(..) | Ending::Removed => false,
    };
    let deadline = Instant::now() + LINGER;
    while client.flush() == Flush::Backlogged && Instant::now() < deadline {
        std::thread::sleep(LINGER_STEP);
    }
    let socket = client.socket();
    if client.has_backlog() {
        // The peer would not take even our close frame (dead, or not reading): a FIN would
        // wait behind a full send buffer for minutes. Reset instead, as an eviction does.
        client.abort_on_close();
        let _ = socket.shutdown(Both::Both);
        return;
    }
    if !client_closed {
        let peer_closed = if removed {
            // The moderator shut our read side down to wake this thread. Our FIN now would
            // make the kernel answer the peer's in-flight frames (its close reply among them)
            // with a reset, which can destroy the 4003 still on its way: wait for its FIN
            // with the connection open instead.
            wait_for_peer_fin(socket, deadline)
        } else {
            let _ = socket.shutdown(Both::Write);
            drain_until(socket, deadline)
        };
        if !peer_closed && unsent_bytes(socket) > 0 {
            // No FIN back within the linger, and what we sent is still in our send buffer:
            // the peer is not reading. Reset rather than leave an orphan holding the buffer.
            client.abort_on_close();
        }
    }
    let _ = socket.shutdown(Both::Both);
}

/// Writes a plain HTTP response and closes, with the same lingering as `finish`.
#[inline(never)]
fn respond_and_close(socket: &TcpStream, response: &Response, deadline: Instant) {
    let timeout = deadline
        .saturating_duration_since(Instant::now())
        .max(LINGER_STEP);
    if response.write_to(socket, timeout).is_ok() {
        let _ = socket.shutdown(Both::Write);
        let _ = drain_until(socket, Instant::now() + LINGER.min(timeout));
    }
    let _ = socket.shutdown(Both::Both);
}

/// Reads and discards until end-of-file or `deadline`; returns whether the peer closed.
fn drain_until(socket: &TcpStream, deadline: Instant) -> bool {
    let mut sink = [0u8; 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || socket.set_read_timeout(Some(remaining)).is_err() {
            return false;
        }
        match (&*socket).read(&mut sink) {
            Ok(0) => return true,
            Err(_) => return false,
            Ok(_) => {}
        }
    }
}

/// After a read-side shutdown (reads return at once: queued data, then end-of-file), reads and
/// discards what arrives until the peer's FIN shows in the TCP state or `deadline`; returns
/// whether the peer closed.
fn wait_for_peer_fin(socket: &TcpStream, deadline: Instant) -> bool {
    let mut sink = [0u8; 1024];
    while Instant::now() < deadline {
        let _ = socket.set_read_timeout(Some(LINGER_STEP));
        match (&*socket).read(&mut sink) {
            Ok(n) if n > 0 => continue,
            Err(err) if err.kind() != io::ErrorKind::WouldBlock => return false,
            _ => {}
        }
        if peer_sent_fin(socket) {
            return true;
        }
        std::thread::sleep(LINGER_STEP);
    }
    false
}

/// Whether the peer's FIN has arrived (the socket is in `CLOSE_WAIT`, or past it).
fn peer_sent_fin(socket: &TcpStream) -> bool {
    // SAFETY: a zeroed tcp_info is a valid value; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket, a pointer to a tcp_info and its length, as TCP_INFO takes.
    let ok = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    } == 0;
    // TCP_CLOSE_WAIT (8), TCP_LAST_ACK (9), TCP_CLOSE (7): the peer has closed its side.
    !ok || matches!(info.tcpi_state, 7..=9)
}

/// Bytes the kernel still holds unsent (or unacknowledged) for this socket (`SIOCOUTQ`).
fn unsent_bytes(socket: &TcpStream) -> usize {
    let mut unsent: libc::c_int = 0;
    // SAFETY: a valid socket descriptor and a pointer to an int, as TIOCOUTQ (SIOCOUTQ) takes.
    let ok = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut unsent) } == 0;
    if ok {
        usize::try_from(unsent).unwrap_or(0)
    } else {
        0
    }
}

/// Sends what the kernel takes now from the connection thread itself (the `101`, a close
/// reply). A backlog left behind is handed to the broadcaster at once, which alone retries
/// backlogs: otherwise bytes stuck behind a full socket buffer would wait for the next
/// message to the room, or for nothing at all.
fn flush(events: &Events, client: &Arc<Client>) {
    if client.flush() == Flush::Backlogged {
        events.hand_over_backlog(client);
    }
}

/// What tungstenite reads from and writes to: reads come from the socket, writes go to the
/// outbox (and are flushed without blocking; see `flush`).
struct ClientStream {
    client: Arc<Client>,
    events: Events,
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // An evicted client is done: what it sent and the kernel still buffers (megabytes on
        // loopback) must not go on being relayed. Shutting the socket down wakes a blocked
        // read but does not discard what was already received, so this is end-of-file.
        if self.client.eviction().is_some() {
            return Ok(0);
        }
        let n = self.client.socket().read(buf)?;
        if n > 0 {
            self.client.mark_heard();
        }
        Ok(n)
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Tungstenite hands over whole frames (pong or close replies), so queuing `buf` as one
        // entry keeps frames intact in the shared stream. Whatever the outbox does with it is
        // right: a sealed outbox drops it (nothing may follow our close frame), and an
        // overflow (after a send attempt) evicts the client. Either way tungstenite must see
        // it as written.
        self.client.queue_or_evict(Bytes::copy_from_slice(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        flush(&self.events, &self.client);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: String::new(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    const UPGRADE: &[(&str, &str)] = &[
        ("Upgrade", "WebSocket"),
        ("Connection", "keep-alive, Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn upgrades_to_the_named_room_with_the_rfc_accept_key() {
        let upgrade = route(&request("GET", "/ws/stream-1", UPGRADE), &[]).unwrap();
        assert_eq!(upgrade.room, "stream-1");
        let text = String::from_utf8(upgrade.response).unwrap();
        // The worked example of RFC 6455 §1.3.
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert_eq!(
            route(&request("GET", "/ws", UPGRADE), &[]).unwrap().room,
            "lobby"
        );
    }

    fn ok_origin() -> Origin {
        Origin::parse("https://ok.example").expect("a valid origin")
    }

    #[test]
    fn statuses_for_bad_requests() {
        let status = |r: Request| route(&r, &[ok_origin()]).unwrap_err().status;
        assert_eq!(status(request("GET", "/", UPGRADE)), 404);
        assert_eq!(status(request("GET", "/wsx", UPGRADE)), 404);
        assert_eq!(status(request("GET", "/ws/", UPGRADE)), 400);
        assert_eq!(status(request("GET", "/ws/a/b", UPGRADE)), 400);
        assert_eq!(status(request("POST", "/ws/a", UPGRADE)), 405);
        assert_eq!(status(request("GET", "/ws/a", &[])), 426);
        let mut old_version = UPGRADE.to_vec();
        old_version[2] = ("Sec-WebSocket-Version", "8");
        assert_eq!(status(request("GET", "/ws/a", &old_version)), 426);
        let mut bad_key = UPGRADE.to_vec();
        bad_key[3] = ("Sec-WebSocket-Key", "short");
        assert_eq!(status(request("GET", "/ws/a", &bad_key)), 400);
        let mut foreign = UPGRADE.to_vec();
        foreign.push(("Origin", "https://evil.example"));
        assert_eq!(status(request("GET", "/ws/a", &foreign)), 403);
        let mut allowed = UPGRADE.to_vec();
        allowed.push(("Origin", "https://ok.example"));
        assert!(route(&request("GET", "/ws/a", &allowed), &[ok_origin()]).is_ok());
    }
}
