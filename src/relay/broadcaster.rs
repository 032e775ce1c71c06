//! The broadcaster: the one thread that turns received messages into frames for rooms.
//!
//! It drains the event channel a batch at a time, encodes each message once, gathers a batch's
//! messages for a room into one shared chunk, queues that chunk in every member's outbox, and
//! flushes each touched client once per batch with a non-blocking send.
//! Because it is the only thread that orders messages, every member of a room sees that room's
//! messages in the same order. Because it never blocks on a socket, one stalled client cannot
//! delay anyone: its bytes wait in its outbox, retried on a short tick, until it drains, grows
//! past its bound, or stays backlogged past `--slow-timeout` and is evicted.
//!
//! It also numbers every room's messages (`room_state`): each gets the room's next `seq`. A
//! room with v1 members gets a second encoding of each message, the JSON `message` frame that
//! carries that `seq` and the sender (`v1::codec`); a room without them costs nothing more.
//!
//! Its tick also drives the heartbeat (pinging quiet clients) and, at shutdown, the
//! `1001 going away` closes and the grace period.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use log::{debug, info};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Bytes;

use crate::backplane::{Backplane, Outgoing};
use crate::config::Config;
use crate::relay::budget::{Budget, Permit};
use crate::relay::client::{encode, Client};
use crate::relay::hub::Hub;
use crate::relay::outbox::{Flush, Latest, Push};
use crate::relay::room_state::{
    messages_json, Retained, RoomState, RoomStates, Snapshot, LOCAL_SEQ_BASE,
    MAX_ROOM_REACTION_KEYS,
};
use crate::shutdown::Shutdown;
use crate::stats::{Eviction, Stats};
use crate::v1::codec::Presence;

/// Bound of the event channel, in events; `budget::EVENT_QUEUE_BYTES` bounds its payload
/// bytes. When connection threads produce faster than the broadcaster relays, they block on
/// `send`, which is the backpressure we want; the bounds only size the shock absorber (a few
/// milliseconds of peak traffic).
pub const EVENT_QUEUE_CAPACITY: usize = 4096;
/// Events handled before the touched clients are flushed. Larger batches mean fewer syscalls
/// per frame under load; the bound keeps latency and the dirty list in check.
pub(crate) const MAX_BATCH: usize = 1024;
/// Upper bound of a room's chunk of gathered frames (see `Broadcaster::gather`): large enough
/// that a busy batch of small messages becomes one chunk, small enough to stay cache-friendly.
pub(crate) const MAX_CHUNK: usize = 64 * 1024;
/// Bytes gathered into rooms' chunks (both encodings, all rooms) before every chunk is fanned
/// out, even mid-batch. Without it a batch of 1,024 maximum-size messages to 1,024 rooms
/// would hold them all, twice, at once; with it the gathering costs a known bound, which the
/// capacity preflight counts once.
pub(crate) const MAX_GATHERED_BYTES: usize = 8 * 1024 * 1024;
/// How long queued presence and reactions frames wait for a batch to take them along.
const LIVE_FLUSH_DELAY: Duration = Duration::from_millis(20);
/// What a welcome holds besides its history, at most, before the reaction totals.
const WELCOME_ENVELOPE_BYTES: usize = 4096;
/// How long one encoding of a room's join history serves the joins that follow it.
const JOIN_HISTORY_REUSE: Duration = Duration::from_secs(1);
/// Payloads at least this large are retained as they are, sharing their allocation (their
/// own by then); smaller ones are copied (see `gather`).
const SHARED_PAYLOAD_BYTES: usize = 4096;
/// How long a join waits for its room's snapshot from Redis before it is answered from what
/// this instance has. Redis answers in a round trip; this is for a Redis that stopped
/// answering without the link noticing yet.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);

/// How often backlogged clients are retried. Short, because a healthy client that briefly
/// filled its socket buffer should not wait long; long enough that a thousand stalled clients
/// cost a thousand failing `sendmsg` calls 100 times a second, not once per batch.
const BACKLOG_RETRY: Duration = Duration::from_millis(10);
/// Bounds of the heartbeat sweep interval, which is a quarter of `--ping-interval`.
const MIN_SWEEP: Duration = Duration::from_millis(10);
const MAX_SWEEP: Duration = Duration::from_secs(1);
/// How often the broadcaster looks at due room checks, and how soon a room found with members
/// is looked at again (so its state expires at most this long after `--room-ttl`).
const ROOM_STATE_CHECK: Duration = Duration::from_secs(1);
/// Rooms with state held at most. Past it, the states of rooms without members go first,
/// those idle longest before the others, whatever their `--room-ttl`: a client cycling through
/// room names can make states only as fast as it joins or publishes, but for ten minutes.
/// About 300 B each: at most some 30 MiB.
pub const MAX_ROOM_STATES: usize = 100_000;
/// Room checks done per tick at most, so a burst of due checks never stalls relaying.
const ROOM_CHECKS_PER_TICK: usize = 10_000;
/// How often shutdown re-checks whether every client has gone during the grace period.
const GRACE_STEP: Duration = Duration::from_millis(10);

/// Frames gathered for one room within a batch, in each encoding the room's members need.
#[derive(Debug, Default)]
struct Chunk {
    /// For plain members: the messages as sent.
    bytes: Vec<u8>,
    /// For v1 members: the same messages as `message` frames; empty when the room had no v1
    /// members as they were gathered.
    v1: Vec<u8>,
    messages: u64,
}

/// The kind of a data message; the relay keeps it (text stays text, binary stays binary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
    /// A JSON value (a v1 `publish`, or a backend's `application/json` body): a text frame
    /// for plain members, the `data` of a v1 `message`.
    Json,
}

/// A room message on its way to the broadcaster.
#[derive(Clone, Debug)]
pub struct Message {
    pub room: Arc<str>,
    pub kind: MessageKind,
    pub payload: Bytes,
    /// The sender's encoded identity (`Identity::from_json`); `None` for the server (a
    /// backend publish).
    pub from: Option<Arc<str>>,
    /// Who gives it its place in the room's sequence.
    pub order: Order,
}

/// Where a message's `seq` comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// The broadcaster numbers it: without Redis always; with Redis only while Redis cannot
    /// be reached, under a local epoch (see `RoomState::start_local_epoch`).
    #[default]
    Here,
    /// Redis numbered it (`backplane`'s sequencing script): every instance shows the same
    /// `seq` and `ts` for it. Boxed: every event on the broadcaster's channel is as large as
    /// its largest kind, and a message without Redis should not pay for the stamp.
    Redis(Box<Stamp>),
    /// Published to Redis by something other than roomcast, outside any room's sequence: plain
    /// members get it as always, v1 members cannot (a v1 `message` needs a `seq`).
    Unsequenced,
}

/// A message's place as Redis assigned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub epoch: Arc<str>,
    /// At least 1.
    pub seq: u64,
    pub ts_ms: u64,
}

/// What the broadcaster keeps per room beyond a batch.
#[derive(Debug)]
struct Room {
    state: Arc<RoomState>,
    /// Whether the room had v1 members when last looked at: messages gathered for it get the
    /// v1 encoding too. Set when a v1 client is welcomed, refreshed at every fan-out.
    has_v1_members: bool,
    /// Last time the room had members or a message; its state goes `--room-ttl` after.
    last_active: Instant,
    /// The counts of the last `presence` frame, and when it went out.
    presence_sent: Option<Presence>,
    presence_at: Option<Instant>,
    /// When the last `reactions` frame went out.
    reactions_at: Option<Instant>,
    /// The history JSON of the last plain join, for the next joins while nothing changed.
    join_history: Option<JoinHistory>,
    /// Whose numbering the state follows.
    source: Source,
    /// With Redis: reaction taps counted here and not yet sent to Redis, which sums every
    /// instance's (see `Broadcaster::send_taps`).
    taps: BTreeMap<String, u64>,
    /// With Redis: the room's `seq` when the subscriber's stream last broke, while its
    /// welcomed members may have missed what came after it (see `stream_broken`).
    seen_before_break: Option<u64>,
}

/// Whose epoch and `seq` a room's state holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// This instance's own: there is no Redis, or it could not be reached when the room
    /// needed a number or a welcome.
    Own,
    /// Redis's. `complete`: the history held here is all Redis retains, because it was
    /// followed without a gap from the epoch's first message or from a snapshot. Otherwise a
    /// join waits for a snapshot first (`Broadcaster::welcome`).
    Redis { complete: bool },
}

/// Joins (and history requests) waiting for a room's snapshot from Redis.
#[derive(Debug)]
struct PendingSync {
    /// When they are answered from what this instance has, snapshot or not.
    deadline: Instant,
    /// Whether the snapshot has been asked for (at most `backplane::snapshots_in_flight` are
    /// at once; the rest wait their turn in `Broadcaster::sync_queue`).
    requested: bool,
    /// A join's snapshot creates the room's state in Redis; a history request's or a
    /// catch-up's does not.
    create: bool,
    /// Whether the request on its way is a join's (it creates the state).
    requested_create: bool,
    welcomes: Vec<(Arc<Client>, Option<Resume>)>,
    /// Frames for parked clients (`error` replies), sent after their welcomes.
    replies: Vec<(Arc<Client>, Bytes)>,
    waiters: Vec<Sender<()>>,
}

impl PendingSync {
    /// Whether its deadline counts: once asked for, or while someone waits. A catch-up
    /// nobody waits for (see `Broadcaster::stream_broken`) waits its turn in line however
    /// long it takes: its clock starts when it is asked for.
    fn can_be_overdue(&self) -> bool {
        self.requested || !self.welcomes.is_empty() || !self.waiters.is_empty()
    }
}

/// A room's join history as last encoded, and what it depends on.
#[derive(Debug)]
struct JoinHistory {
    seq: u64,
    epoch: Arc<str>,
    budget: usize,
    /// When it was encoded: reused for `JOIN_HISTORY_REUSE` at most, so a message aging out
    /// under `--history-ttl` is not shown for long.
    at: Instant,
    json: Arc<str>,
}

/// What a reconnecting v1 client asks for: the messages after `since` in `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    pub since: u64,
    pub epoch: String,
}

/// What connection threads (and the publish endpoint, and the Redis subscriber) send the
/// broadcaster.
#[derive(Debug)]
pub enum Event {
    /// A complete message for everyone in `room`, the sender included. Sent with
    /// [`Events::send_message`], which takes the payload's bytes from the channel's byte
    /// budget; `permit` gives them back when the broadcaster drops the event.
    Message {
        message: Message,
        permit: Permit,
        /// Told the message's `seq` once it has one (the publish endpoint answers with it).
        numbered: Option<Sender<u64>>,
    },
    /// A v1 client has joined its room and is owed its `welcome` (see `Broadcaster::welcome`).
    Welcome {
        client: Arc<Client>,
        resume: Option<Resume>,
    },
    /// A reaction tap in `room`, already within its user's bucket and an allowed key.
    React { room: Arc<str>, key: String },
    /// With Redis: a room's reaction totals as Redis summed them, in its epoch `epoch`, whose
    /// last `seq` was `seq` then.
    Totals {
        room: Arc<str>,
        epoch: Arc<str>,
        seq: u64,
        totals: BTreeMap<String, u64>,
    },
    /// With Redis: taps this instance counted that Redis will not sum (it could not be
    /// reached): they count here only.
    Tally {
        room: Arc<str>,
        taps: Vec<(String, u64)>,
    },
    /// With Redis: the room as Redis held it at this point of its stream (asked for by a join
    /// here), or `None` when Redis could not answer.
    Snapshot {
        room: Arc<str>,
        snapshot: Option<Snapshot>,
    },
    /// `done` is told once the room's history here is Redis's (the history endpoint waits for
    /// it), or once it is clear it cannot be soon.
    Sync { room: Arc<str>, done: Sender<()> },
    /// The Redis subscriber's connection ended, or a new one began: whatever Redis published
    /// in between never reached this instance, so no room's history here is known complete.
    StreamBroken,
    /// The Redis link is up again: snapshots waiting for it can be asked for.
    LinkUp,
    /// A frame for one client only (a v1 `error`), sent this way rather than queued by the
    /// connection thread so it keeps its place: behind the welcome and behind the messages
    /// the client sent before the frame it answers.
    Reply { client: Arc<Client>, frame: Bytes },
    /// The server closes `client` (protocol error, limit, idle). Sent through the channel
    /// rather than queued directly so the close lands behind every message the client sent
    /// before it: per-sender order holds even for the client's own echo. `done` reports
    /// that the close frame is queued.
    Close {
        client: Arc<Client>,
        code: CloseCode,
        reason: &'static str,
        done: Sender<()>,
    },
    /// A send made by the client's own connection thread (the `101`, a pong, a close reply)
    /// left bytes the kernel would not take. From now on the broadcaster retries them on its
    /// tick, like any backlog it left itself. The sender has already set
    /// `client.is_backlog_tracked`, so each client is handed over once.
    Backlogged(Arc<Client>),
}

/// The broadcaster has stopped (shutdown, or it failed): nothing more can be relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stopped;

/// The sending side of the broadcaster's channel, with its byte budget. Cloned to every
/// connection thread (through `Shared`), the publish endpoint and the Redis threads.
#[derive(Clone, Debug)]
pub struct Events {
    sender: Sender<Event>,
    budget: Arc<Budget>,
}

impl Events {
    /// The channel and its byte budget: the sending side for everyone, the receiving side for
    /// the broadcaster.
    pub fn channel(capacity: usize, bytes: usize) -> (Events, Receiver<Event>) {
        let (sender, receiver) = crossbeam_channel::bounded(capacity);
        let events = Events {
            sender,
            budget: Budget::new(bytes),
        };
        (events, receiver)
    }

    /// Sends a message to its room, blocking while the channel is full in events or in bytes.
    /// `numbered`, if given, is told the message's `seq`.
    pub fn send_message(
        &self,
        message: Message,
        numbered: Option<Sender<u64>>,
    ) -> Result<(), Stopped> {
        let permit = self.budget.acquire(message.payload.len()).ok_or(Stopped)?;
        self.send(Event::Message {
            message,
            permit,
            numbered,
        })
    }

    /// Sends a control event, blocking while the channel is full.
    pub fn send(&self, event: Event) -> Result<(), Stopped> {
        self.sender.send(event).map_err(|_| Stopped)
    }

    /// Sends a control event, waiting until `deadline` at most for room in the channel.
    pub fn send_deadline(&self, event: Event, deadline: Instant) -> Result<(), Stopped> {
        self.sender
            .send_deadline(event, deadline)
            .map_err(|_| Stopped)
    }

    /// Hands a backlog a connection thread left to the broadcaster, unless it already has it.
    ///
    /// Out of line: it is rare, and a channel send inlined into the connection thread's read
    /// loop widens that frame for every idle connection (see `connection::serve`).
    #[cold]
    #[inline(never)]
    pub fn hand_over_backlog(&self, client: &Arc<Client>) {
        if !client.is_backlog_tracked.swap(true, Ordering::SeqCst) {
            // Fails only when the broadcaster has stopped; then nobody needs to retry it.
            let _ = self.send(Event::Backlogged(client.clone()));
        }
    }

    /// Events waiting for the broadcaster.
    pub fn len(&self) -> usize {
        self.sender.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sender.is_empty()
    }

    /// Payload bytes waiting for the broadcaster.
    pub fn bytes_in_flight(&self) -> usize {
        self.budget.in_flight()
    }

    /// Makes every further `send_message` fail and wakes those waiting for the budget. The
    /// broadcaster's thread does this as it ends, however it ends.
    pub fn close_budget(&self) {
        self.budget.close();
    }
}

/// The broadcaster's state. Created by `Server::run`, owned by the broadcaster thread.
pub struct Broadcaster {
    hub: Arc<Hub>,
    stats: Arc<Stats>,
    config: Arc<Config>,
    /// Rooms with state, this thread's view: it alone numbers messages and drops states.
    rooms: HashMap<Arc<str>, Room>,
    /// The same states, for readers on other threads.
    room_states: Arc<RoomStates>,
    /// Rooms that have had v1 members since their last live tick: they get `presence` and
    /// `reactions` frames. A room leaves the set at a tick that finds none.
    live_rooms: HashSet<Arc<str>>,
    /// How often live rooms are looked at for presence and reactions to send.
    live_every: Duration,
    /// When queued presence and reactions frames are flushed if no batch has taken them.
    live_flush_due: Option<Instant>,
    /// When to look at each room with state next, soonest first; one entry per room. A
    /// room with members is looked at every `ROOM_STATE_CHECK`, one without at the end of its
    /// `--room-ttl`, so expiry costs what expires, never a walk of every room.
    room_checks: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    /// Clients given a frame in the current batch and not yet flushed.
    dirty: Vec<Arc<Client>>,
    /// Clients whose outbox was full when a frame was queued under the hub's lock; settled
    /// (flushed, then queued again or evicted) right after the lock is released.
    overflowed: Vec<Arc<Client>>,
    /// The same for the v1 encoding of a chunk.
    overflowed_v1: Vec<Arc<Client>>,
    /// Frames gathered per room during the current batch, fanned out at its end (or earlier,
    /// see `gather`). Emptied after every batch.
    chunks: HashMap<Arc<str>, Chunk>,
    /// Bytes held in `chunks` now, bounded by `MAX_GATHERED_BYTES`.
    gathered: usize,
    /// Largest chunk: at most half the outbox bound, so one chunk can never overflow an
    /// outbox that the client has drained, and at most `MAX_CHUNK`.
    chunk_limit: usize,
    /// A chunk at least this large is flushed to its room as soon as it is queued rather than
    /// at the end of the batch, so a burst of large messages reaches the kernel (and the
    /// reader) as it is relayed instead of piling up in outboxes first.
    early_flush: usize,
    /// Clients whose kernel send buffer was full at the last attempt.
    backlog: Vec<Arc<Client>>,
    ping: Bytes,
    sweep_every: Duration,
    /// The server's draining flag (see `Shared::draining`), set here as shutdown begins.
    draining: Arc<AtomicBool>,
    /// The Redis link, with `--redis`: rooms' numbers, history and totals follow Redis.
    backplane: Option<Arc<Backplane>>,
    /// Rooms waiting for a snapshot from Redis, with the joins waiting for it.
    syncs: HashMap<Arc<str>, PendingSync>,
    /// Rooms in `syncs` whose snapshot is not asked for yet, oldest first.
    sync_queue: std::collections::VecDeque<Arc<str>>,
    /// Snapshots asked for and not yet arrived.
    snapshots_in_flight: usize,
    /// With Redis: rooms with taps not yet sent, and when they go next.
    tapped: HashSet<Arc<str>>,
    taps_due: Option<Instant>,
    /// Unit tests only: runs inside `retry_backlog` at its one racy moment, just before a
    /// client's tracked flag is cleared, to play a connection thread's send there.
    #[cfg(test)]
    before_untracking: Option<ClientHook>,
}

/// A test's stand-in for another thread, run at a chosen moment (see `before_untracking`).
#[cfg(test)]
type ClientHook = Box<dyn FnMut(&Arc<Client>)>;

impl Broadcaster {
    pub fn new(
        hub: Arc<Hub>,
        stats: Arc<Stats>,
        config: Arc<Config>,
        room_states: Arc<RoomStates>,
        draining: Arc<AtomicBool>,
        backplane: Option<Arc<Backplane>>,
    ) -> Broadcaster {
        let sweep_every = (config.ping_interval / 4).clamp(MIN_SWEEP, MAX_SWEEP);
        // Fine enough that a change goes out well within its interval.
        let live_every = (config.presence_interval.min(config.reaction_interval) / 5)
            .clamp(MIN_SWEEP, Duration::from_millis(50));
        let chunk_limit = (config.effective_outbox_bytes() / 2).min(MAX_CHUNK);
        Broadcaster {
            hub,
            stats,
            config,
            rooms: HashMap::new(),
            room_states,
            live_rooms: HashSet::new(),
            live_every,
            live_flush_due: None,
            room_checks: BinaryHeap::new(),
            dirty: Vec::new(),
            overflowed: Vec::new(),
            overflowed_v1: Vec::new(),
            chunks: HashMap::new(),
            gathered: 0,
            chunk_limit,
            early_flush: chunk_limit / 2,
            backlog: Vec::new(),
            ping: encode(Frame::ping(Bytes::new())),
            sweep_every,
            draining,
            backplane,
            syncs: HashMap::new(),
            sync_queue: std::collections::VecDeque::new(),
            snapshots_in_flight: 0,
            tapped: HashSet::new(),
            taps_due: None,
            #[cfg(test)]
            before_untracking: None,
        }
    }

    /// Relays until shutdown, then closes every client within the grace period.
    pub fn run(mut self, events: Receiver<Event>, shutdown: &Shutdown) {
        let now = Instant::now();
        let mut next_sweep = now + self.sweep_every;
        let mut next_retry = now;
        let mut next_room_check = now + ROOM_STATE_CHECK;
        let mut next_live = now + self.live_every;
        loop {
            let mut due = if self.backlog.is_empty() {
                next_sweep
            } else {
                next_sweep.min(next_retry)
            };
            if !self.live_rooms.is_empty() {
                due = due.min(next_live);
            }
            if let Some(flush) = self.live_flush_due {
                due = due.min(flush);
            }
            if let Some(taps) = self.taps_due {
                due = due.min(taps);
            }
            if let Some(deadline) = self
                .syncs
                .values()
                .filter(|p| p.can_be_overdue())
                .map(|p| p.deadline)
                .min()
            {
                due = due.min(deadline);
            }
            let wait = due.saturating_duration_since(Instant::now());
            select! {
                recv(events) -> event => {
                    let Ok(event) = event else { break };
                    self.handle(event);
                    for event in events.try_iter().take(MAX_BATCH - 1) {
                        self.handle(event);
                    }
                    self.fan_out_all();
                    self.flush_dirty();
                }
                recv(shutdown.receiver()) -> _ => break,
                default(wait) => {}
            }
            // Backlogged clients are retried on their own tick, not after every batch: with
            // many stalled clients, a retry per batch would cost each message that many
            // failing sends.
            let now = Instant::now();
            if now >= next_retry && !self.backlog.is_empty() {
                self.retry_backlog(now);
                next_retry = now + BACKLOG_RETRY;
            }
            if now >= next_sweep {
                self.sweep();
                next_sweep = now + self.sweep_every;
            }
            if now >= next_room_check {
                self.expire_rooms(now);
                next_room_check = now + ROOM_STATE_CHECK;
            }
            if now >= next_live {
                self.send_live(now);
                next_live = now + self.live_every;
            }
            if self.taps_due.is_some_and(|due| now >= due) {
                self.send_taps(now);
            }
            if !self.syncs.is_empty() {
                self.answer_overdue_syncs(now);
            }
            if self.live_flush_due.is_some_and(|due| now >= due) {
                self.flush_dirty();
            }
        }
        self.close_all(&events);
    }

    /// Gathers a message into its room's chunk, queues a close behind the messages before
    /// it, or takes over a connection thread's backlog.
    fn handle(&mut self, event: Event) {
        match event {
            Event::Message {
                message,
                permit,
                numbered,
            } => {
                let seq = self.gather(message);
                // The payload is copied into the room's chunk: its bytes leave the budget.
                drop(permit);
                if let Some(numbered) = numbered {
                    let _ = numbered.send(seq);
                }
            }
            Event::Welcome { client, resume } => self.welcome(client, resume),
            Event::React { room, key } => self.react(room, &key),
            Event::Totals {
                room,
                epoch,
                seq,
                totals,
            } => self.set_totals(&room, &epoch, seq, totals),
            Event::Tally { room, taps } => {
                let room = self.room(&room, Instant::now());
                let mut reactions = room.state.reactions.lock();
                for (key, taps) in taps {
                    // A key past the room's cap was dropped and counted when it was tapped.
                    let _ = reactions.add(&key, taps);
                }
            }
            Event::Snapshot { room, snapshot } => self.snapshot_arrived(room, snapshot),
            Event::StreamBroken => self.stream_broken(),
            Event::LinkUp => self.link_up(),
            Event::Sync { room, done } => {
                if !self.park_for_snapshot(&room, Parked::Waiter(done.clone())) {
                    let _ = done.send(());
                }
            }
            Event::Close {
                client,
                code,
                reason,
                done,
            } => {
                // Whatever this client's room has gathered came before the close: send it first.
                self.fan_out(&client.room);
                client.queue_close(code, reason);
                let _ = done.send(());
            }
            Event::Backlogged(client) => self.backlog.push(client),
            Event::Reply { client, frame } => {
                // A client waiting for its welcome (its room's snapshot) gets the reply after it.
                let parked = self.syncs.get_mut(&client.room).filter(|pending| {
                    !client.is_welcomed()
                        && pending
                            .welcomes
                            .iter()
                            .any(|(c, _)| Arc::ptr_eq(c, &client))
                });
                if let Some(pending) = parked {
                    pending.replies.push((client, frame));
                    return;
                }
                self.fan_out(&client.room);
                if let Push::Queued { .. } = client.queue_or_evict(frame) {
                    self.dirty.push(client);
                }
            }
        }
    }

    /// The room's state, created (with a fresh epoch) if it has none.
    fn room(&mut self, name: &Arc<str>, now: Instant) -> &mut Room {
        let (room_states, room_checks) = (&self.room_states, &mut self.room_checks);
        let room = self.rooms.entry(name.clone()).or_insert_with(|| {
            let state = room_states.create(name.clone());
            room_checks.push(Reverse((now + ROOM_STATE_CHECK, name.clone())));
            Room {
                state,
                has_v1_members: false,
                last_active: now,
                presence_sent: None,
                presence_at: None,
                reactions_at: None,
                join_history: None,
                source: Source::Own,
                taps: BTreeMap::new(),
                seen_before_break: None,
            }
        });
        room.last_active = now;
        room
    }

    /// Numbers a message and encodes it onto the end of its room's chunk; returns its `seq`.
    ///
    /// The same bytes serve every member of one protocol (server frames are unmasked), and
    /// gathering a batch's messages for a room into one chunk means each member costs one
    /// queue entry, one lock and one iovec per batch rather than per message. A chunk that
    /// would outgrow `chunk_limit` is fanned out first.
    fn gather(&mut self, message: Message) -> u64 {
        let Message {
            room: name,
            kind,
            payload,
            from,
            order,
        } = message;
        if let Some(panic_room) = &self.config.test_panic_in_room {
            // The test-only failure hook (see `Config::test_panic_in_room`).
            assert!(
                *panic_room != *name,
                "test hook: panic on a message to {name}"
            );
        }
        let now = Instant::now();
        let history = if self.config.history_budget > 0 {
            self.config.history
        } else {
            0
        };
        let history_ttl = self.config.history_ttl;
        let with_redis = self.backplane.is_some();
        let link_down = self.backplane.as_ref().is_some_and(|b| !b.is_up());
        let order = match order {
            // This instance numbers the room alone while it cannot publish (Redis still
            // reaching its subscriber): other instances' messages take its numbers too, rather
            // than the room's state flipping between its epoch and Redis's at every message.
            Order::Redis(_)
                if link_down
                    && self
                        .rooms
                        .get(&name)
                        .is_some_and(|room| room.source == Source::Own) =>
            {
                Order::Here
            }
            order => order,
        };
        if let Order::Redis(stamp) = &order {
            match follow_stamp(self.room(&name, now), stamp) {
                Followed::Adopted => self.rejoin(&name, None),
                Followed::Rewound => {
                    self.ask_for_new_epoch(&name, &stamp.epoch);
                    self.rejoin(&name, None);
                }
                Followed::Gap { seen } => {
                    let resume = Resume {
                        since: seen,
                        epoch: stamp.epoch.to_string(),
                    };
                    self.rejoin(&name, Some(resume));
                }
                Followed::Next => {}
            }
        }
        let room = self.room(&name, now);
        let (seq, ts_ms) = match order {
            Order::Here => {
                if with_redis && (room.source != Source::Own || room.state.seq() < LOCAL_SEQ_BASE) {
                    // Redis could not number it (the link is down, or went down with it on
                    // its way): this instance's own numbers, under its own epoch.
                    room.state.start_local_epoch();
                    room.source = Source::Own;
                    room.join_history = None;
                }
                let ts_ms = if room.has_v1_members || history > 0 {
                    unix_ms()
                } else {
                    0
                };
                (Some(room.state.next_seq()), ts_ms)
            }
            Order::Redis(stamp) => {
                room.state.set_seq(stamp.seq);
                (Some(stamp.seq), stamp.ts_ms)
            }
            Order::Unsequenced => (None, 0),
        };
        let has_v1_members = room.has_v1_members && seq.is_some();
        let history = if seq.is_some() { history } else { 0 };
        let seq = seq.unwrap_or(0);
        if history > 0 {
            // The parts, not the encoded frame: a plain-only room pays no JSON for its
            // history, and a frame is made only when a join or a resume asks for it.
            let retained = Retained {
                seq,
                ts_ms,
                from: from.clone(),
                kind,
                // A small payload is a slice of the connection's read buffer, which it would
                // keep whole (2 KiB) for as long as it is retained: copied, the budget counts
                // what it really holds.
                payload: if payload.len() < SHARED_PAYLOAD_BYTES {
                    Bytes::copy_from_slice(&payload)
                } else {
                    payload.clone()
                },
                at: now,
            };
            room.state.retain(retained, history, history_ttl);
        }
        let opcode = match kind {
            MessageKind::Text | MessageKind::Json => OpCode::Data(Data::Text),
            MessageKind::Binary => OpCode::Data(Data::Binary),
        };
        let v1 = has_v1_members.then(|| {
            let mut json = Vec::with_capacity(payload.len() + 128);
            crate::v1::codec::push_message(&mut json, seq, ts_ms, from.as_deref(), kind, &payload);
            Frame::message(json, OpCode::Data(Data::Text), true)
        });
        if history > 0 && self.room_states.history_bytes() > self.config.history_budget {
            self.give_up_history();
        }
        let frame = Frame::message(payload, opcode, true);
        let frame_len = frame.len();
        let v1_len = v1.as_ref().map_or(0, Frame::len);
        let is_full = self.chunks.get(&name).is_some_and(|chunk| {
            chunk.messages > 0
                && (chunk.bytes.len() + frame.len() > self.chunk_limit
                    || chunk.v1.len() + v1_len > self.chunk_limit)
        });
        if is_full {
            self.fan_out(&name);
        }
        let chunk = self.chunks.entry(name).or_default();
        chunk.bytes.reserve(frame.len());
        frame
            .format(&mut chunk.bytes)
            .expect("writing into a Vec cannot fail");
        if let Some(v1) = v1 {
            chunk.v1.reserve(v1.len());
            v1.format(&mut chunk.v1)
                .expect("writing into a Vec cannot fail");
        }
        chunk.messages += 1;
        self.stats.messages_relayed.fetch_add(1, Ordering::Relaxed);
        self.gathered += frame_len + v1_len;
        if self.gathered >= MAX_GATHERED_BYTES {
            self.fan_out_all();
        }
        seq
    }

    /// Queues a room's gathered chunk for every member, in the encoding of its protocol.
    fn fan_out(&mut self, name: &str) {
        let Some(chunk) = self.chunks.get_mut(name).filter(|chunk| chunk.messages > 0) else {
            return;
        };
        let bytes = into_shared(std::mem::take(&mut chunk.bytes));
        let v1 = into_shared(std::mem::take(&mut chunk.v1));
        self.gathered = self.gathered.saturating_sub(bytes.len() + v1.len());
        let messages = std::mem::take(&mut chunk.messages);
        let mut delivered = 0;
        let mut has_v1_members = false;
        let (dirty, overflowed, overflowed_v1) = (
            &mut self.dirty,
            &mut self.overflowed,
            &mut self.overflowed_v1,
        );
        // The read lock is held only while queuing (memory operations). Sends, and the
        // verdict on clients whose outbox is full, come after it is released.
        self.hub.with_room(name, |room| {
            for client in &room.plain {
                queue_gathered(client, &bytes, messages, &mut delivered, dirty, overflowed);
            }
            has_v1_members = !room.v1.is_empty();
            if v1.is_empty() {
                return;
            }
            for client in room.v1.iter().filter(|client| client.is_welcomed()) {
                queue_gathered(client, &v1, messages, &mut delivered, dirty, overflowed_v1);
            }
        });
        if let Some(room) = self.rooms.get_mut(name) {
            room.has_v1_members = has_v1_members;
        }
        delivered += messages * self.settle_overflowed(&bytes);
        if !v1.is_empty() {
            std::mem::swap(&mut self.overflowed, &mut self.overflowed_v1);
            delivered += messages * self.settle_overflowed(&v1);
        }
        self.stats
            .messages_delivered
            .fetch_add(delivered, Ordering::Relaxed);
        if bytes.len().max(v1.len()) >= self.early_flush {
            self.flush_dirty();
        }
    }

    /// Queues a v1 client's `welcome` (PROTOCOL §4) at its place in the room's order.
    ///
    /// The client joined the hub before this event was sent, unwelcomed, so `fan_out` has
    /// been skipping it: every message numbered before this moment is counted in the welcome's
    /// `seq` (and is in its history while retained), every message after goes to it as a
    /// frame. So it sees each message once and no gap between the two.
    fn welcome(&mut self, client: Arc<Client>, resume: Option<Resume>) {
        // Messages gathered before the join go out first, without this client.
        self.fan_out(&client.room);
        let room = client.room.clone();
        if self.backplane.as_ref().is_some_and(|b| !b.is_up()) {
            // Redis is out of reach: what this instance holds of the room may lag it by any
            // number of messages, so it cannot answer for Redis's epoch. The room goes on
            // under an epoch of its own (a resume across the outage is then not recovered).
            if let Some(state) = self.rooms.get_mut(&room) {
                if state.source != Source::Own {
                    state.state.start_local_epoch();
                    state.source = Source::Own;
                    state.join_history = None;
                }
            }
        }
        if let Err(Parked::Welcome(client, resume)) =
            self.park_for_snapshot_or_give_back(&room, Parked::Welcome(client, resume))
        {
            self.welcome_now(client, resume);
        }
    }

    /// The subscriber's stream broke (see `Event::StreamBroken`): every room that followed
    /// Redis may have missed messages. Joins ask for a snapshot from now on. Rooms with
    /// welcomed v1 members remember the `seq` their members saw, and ask for one as soon as
    /// the link is up (`link_up`), so those members are caught up with exactly what they
    /// missed, in a new welcome.
    fn stream_broken(&mut self) {
        if self.backplane.is_none() {
            return;
        }
        for (name, room) in &mut self.rooms {
            let Source::Redis { .. } = room.source else {
                continue;
            };
            room.source = Source::Redis { complete: false };
            room.join_history = None;
            if self.live_rooms.contains(name) && room.seen_before_break.is_none() {
                room.seen_before_break = Some(room.state.seq());
            }
        }
        self.link_up();
    }

    /// The link is up (again): rooms whose members wait to be caught up get in line for a
    /// snapshot, and what waits in line is asked for.
    fn link_up(&mut self) {
        if !self.backplane.as_ref().is_some_and(|b| b.is_up()) {
            return;
        }
        let waiting: Vec<Arc<str>> = self
            .rooms
            .iter()
            .filter(|(name, room)| {
                room.seen_before_break.is_some() && !self.syncs.contains_key(*name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in waiting {
            self.queue_sync(&name, false);
        }
        self.request_snapshots();
    }

    /// With Redis, a room whose history here may not be all Redis retains (this instance
    /// joined its stream late, or lost part of it, or never saw it) asks Redis for a snapshot,
    /// which arrives in the room's order on this instance's control channel, and parks `what`
    /// until then. Returns whether it parked it.
    fn park_for_snapshot(&mut self, name: &Arc<str>, what: Parked) -> bool {
        self.park_for_snapshot_or_give_back(name, what).is_ok()
    }

    fn park_for_snapshot_or_give_back(
        &mut self,
        name: &Arc<str>,
        what: Parked,
    ) -> Result<(), Parked> {
        let Some(backplane) = self.backplane.clone() else {
            return Err(what);
        };
        let complete = self
            .rooms
            .get(name)
            .is_some_and(|room| room.source == Source::Redis { complete: true });
        if complete || !backplane.is_up() {
            return Err(what);
        }
        let create = matches!(what, Parked::Welcome(..));
        self.queue_sync(name, create);
        let pending = self.syncs.get_mut(name).expect("queued above if missing");
        pending.create |= create;
        if !pending.can_be_overdue() {
            // A catch-up waiting its turn: the clock starts for this join now.
            pending.deadline = Instant::now() + SNAPSHOT_WAIT;
        }
        match what {
            Parked::Welcome(client, resume) => pending.welcomes.push((client, resume)),
            Parked::Waiter(done) => pending.waiters.push(done),
        }
        Ok(())
    }

    /// Puts `name` in line for a snapshot, unless it is already, and asks for what fits.
    fn queue_sync(&mut self, name: &Arc<str>, create: bool) {
        if !self.syncs.contains_key(name) {
            self.syncs.insert(
                name.clone(),
                PendingSync {
                    deadline: Instant::now() + SNAPSHOT_WAIT,
                    requested: false,
                    create,
                    requested_create: false,
                    welcomes: Vec::new(),
                    replies: Vec::new(),
                    waiters: Vec::new(),
                },
            );
            self.sync_queue.push_back(name.clone());
        }
        self.request_snapshots();
    }

    /// Asks Redis for the next snapshots in line, while fewer than `MAX_SNAPSHOTS_IN_FLIGHT`
    /// are on their way and the publish queue takes them.
    fn request_snapshots(&mut self) {
        let Some(backplane) = self.backplane.clone() else {
            return;
        };
        // Each carries up to a welcome's worth of history, and all of them can land in this
        // instance's subscriber buffer in Redis at once: bounded in bytes
        // (`backplane::snapshots_in_flight`). The next goes as one arrives, so a thousand
        // rooms re-sync in a few hundred round trips.
        let most = crate::backplane::snapshots_in_flight(&self.config);
        while self.snapshots_in_flight < most && backplane.is_up() {
            let Some(name) = self.sync_queue.pop_front() else {
                return;
            };
            let Some(pending) = self.syncs.get_mut(&name).filter(|p| !p.requested) else {
                continue; // answered meanwhile
            };
            let request = Outgoing::Snapshot {
                room: name.clone(),
                create: pending.create,
            };
            if backplane.try_publish(request).is_err() {
                self.sync_queue.push_front(name);
                return;
            }
            pending.requested = true;
            pending.requested_create = pending.create;
            pending.deadline = Instant::now() + SNAPSHOT_WAIT;
            self.snapshots_in_flight += 1;
            self.stats
                .snapshots_requested
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A room's snapshot from Redis (or word that none will come): the state here becomes
    /// Redis's as of this point of the room's stream, and the joins waiting for it are
    /// answered.
    fn snapshot_arrived(&mut self, name: Arc<str>, snapshot: Option<Snapshot>) {
        if snapshot.is_none() && self.retry_as_join(&name) {
            return;
        }
        if snapshot.is_none() {
            // Redis has no state for the room (or could not answer): nothing to catch up from.
            if let Some(room) = self.rooms.get_mut(&name) {
                room.seen_before_break = None;
            }
        }
        if let Some(snapshot) = snapshot {
            let (limit, ttl) = (self.history_limit(), self.config.history_ttl);
            let room = self.room(&name, Instant::now());
            let rewound = *room.state.epoch() == *snapshot.epoch && room.state.seq() > snapshot.seq;
            let adopted = *room.state.epoch() != *snapshot.epoch || rewound;
            // Members who saw up to `seen` of this same life missed what came after it.
            let seen = (!adopted && snapshot.seq > room.state.seq()).then(|| Resume {
                since: room.state.seq(),
                epoch: snapshot.epoch.clone(),
            });
            room.state.replace(
                &snapshot.epoch,
                snapshot.seq,
                snapshot.messages,
                limit,
                ttl,
                snapshot.totals,
            );
            // A snapshot behind what this instance saw of the same life: Redis went back in
            // time (see `Followed::Rewound`). Not a life to resume in: a new epoch is asked for.
            room.source = Source::Redis { complete: !rewound };
            room.join_history = None;
            // Whatever its members missed while the stream was broken is in this snapshot.
            room.seen_before_break = None;
            if rewound {
                self.ask_for_new_epoch(&name, &snapshot.epoch);
            }
            if adopted {
                self.rewelcome(&name, None);
            } else if seen.is_some() {
                self.rewelcome(&name, seen);
            }
        }
        self.answer_sync(&name);
    }

    /// The room's state now follows another life of it (Redis came back after this instance
    /// numbered it alone, or Redis started empty): its welcomed v1 members hold an epoch and
    /// a `seq` that no longer lead anywhere, and would take the new life's lower numbers for
    /// messages they have seen. Each gets a new `welcome` (`recovered: false`), as a join
    /// would, before the new life's first message; what was gathered before goes out first.
    ///
    /// With `resume`, the members missed messages of the same life (the subscriber's stream
    /// broke): their new welcome resumes them from what they saw, so it holds exactly the
    /// missed messages (`recovered: true`) while the room retains them.
    fn rewelcome(&mut self, name: &Arc<str>, resume: Option<Resume>) {
        self.fan_out(name);
        let mut members = Vec::new();
        self.hub.with_room(name, |room| {
            members.extend(room.v1.iter().filter(|c| c.is_welcomed()).cloned());
        });
        if !members.is_empty() {
            debug!(
                "room {name}: a new epoch from redis, {} members welcomed again",
                members.len()
            );
            self.stats
                .rewelcomes
                .fetch_add(members.len() as u64, Ordering::Relaxed);
        }
        for client in members {
            self.welcome_now(client, resume.clone());
        }
    }

    /// The room's state just took another life of it from a message or totals, knowing none
    /// of that life's history: its welcomed v1 members join it again, as new joiners do (they
    /// wait, unwelcomed, for the room's snapshot, and are welcomed with its history), or are
    /// welcomed again at once when no snapshot can be asked for.
    ///
    /// With `resume` (a gap in the same life) they are welcomed as resuming from what they
    /// saw: the snapshot, which follows the gap in Redis's order, holds what they missed.
    fn rejoin(&mut self, name: &Arc<str>, resume: Option<Resume>) {
        self.fan_out(name);
        let mut members = Vec::new();
        self.hub.with_room(name, |room| {
            members.extend(room.v1.iter().filter(|c| c.is_welcomed()).cloned());
        });
        if members.is_empty() {
            return;
        }
        self.stats
            .rewelcomes
            .fetch_add(members.len() as u64, Ordering::Relaxed);
        for client in members {
            client.mark_unwelcomed();
            let parked = Parked::Welcome(client, resume.clone());
            if let Err(Parked::Welcome(client, resume)) =
                self.park_for_snapshot_or_give_back(name, parked)
            {
                self.welcome_now(client, resume);
            }
        }
    }

    /// Redis went back in time under `epoch` (restored from an older dump): the room needs a
    /// new epoch there, so no client resumes with numbers Redis has given out twice. Every
    /// instance that notices asks; the first one's request makes it.
    fn ask_for_new_epoch(&mut self, name: &Arc<str>, epoch: &str) {
        if let Some(backplane) = &self.backplane {
            let request = Outgoing::NewEpoch {
                room: name.clone(),
                epoch: epoch.into(),
            };
            if backplane.try_publish(request).is_ok() {
                debug!("room {name}: redis went back in time; asked for a new epoch");
            }
        }
    }

    /// A request that creates no state (a catch-up's, a history request's) came back empty
    /// while a join had come to wait for it: the join's request, which does create the room's
    /// state in Redis, is asked for instead. Returns whether it was.
    fn retry_as_join(&mut self, name: &str) -> bool {
        let Some((name, pending)) = self.syncs.get_key_value(name) else {
            return false;
        };
        if !pending.requested || pending.requested_create || !pending.create {
            return false;
        }
        let name = name.clone();
        let pending = self.syncs.get_mut(&name).expect("found above");
        pending.requested = false;
        pending.deadline = Instant::now() + SNAPSHOT_WAIT;
        self.snapshots_in_flight -= 1;
        self.sync_queue.push_front(name);
        self.request_snapshots();
        true
    }

    /// Answers what waits for `name`'s snapshot, from what this instance has now.
    fn answer_sync(&mut self, name: &str) {
        let Some(pending) = self.syncs.remove(name) else {
            return;
        };
        if pending.requested {
            self.snapshots_in_flight -= 1;
        }
        for (client, resume) in pending.welcomes {
            self.welcome_now(client, resume);
        }
        for (client, frame) in pending.replies {
            if let Push::Queued { .. } = client.queue_or_evict(frame) {
                self.dirty.push(client);
            }
        }
        for done in pending.waiters {
            let _ = done.send(());
        }
        self.request_snapshots();
    }

    /// Joins whose snapshot is overdue are answered without it.
    fn answer_overdue_syncs(&mut self, now: Instant) {
        let overdue: Vec<Arc<str>> = self
            .syncs
            .iter()
            .filter(|(_, pending)| pending.can_be_overdue() && now >= pending.deadline)
            .map(|(name, _)| name.clone())
            .collect();
        if overdue.is_empty() {
            return;
        }
        for name in overdue {
            self.stats.snapshots_missed.fetch_add(1, Ordering::Relaxed);
            self.answer_sync(&name);
        }
        // Catch-ups whose snapshot did not come get in line again.
        self.link_up();
    }

    /// A room's counts here, plus, with Redis, the other instances' as of their last
    /// heartbeat: what `presence` frames and welcomes show.
    fn with_remote(&self, name: &str, local: Presence) -> Presence {
        match &self.backplane {
            Some(backplane) => {
                let remote = backplane.remote_presence(name);
                Presence {
                    clients: local.clients + remote.clients,
                    users: local.users + remote.users,
                }
            }
            None => local,
        }
    }

    /// Messages a room retains: `--history`, unless the history budget is 0 (off).
    fn history_limit(&self) -> usize {
        if self.config.history_budget > 0 {
            self.config.history
        } else {
            0
        }
    }

    /// Redis's totals for a room; a newer life of the room (its epoch) is adopted with them.
    fn set_totals(
        &mut self,
        name: &Arc<str>,
        epoch: &str,
        seq: u64,
        totals: BTreeMap<String, u64>,
    ) {
        let link_down = self.backplane.as_ref().is_some_and(|b| !b.is_up());
        let room = self.room(name, Instant::now());
        let mut totals = totals;
        // This instance's taps not yet sent to Redis (see `react`) still count here.
        for (key, taps) in &room.taps {
            *totals.entry(key.clone()).or_default() += taps;
        }
        if link_down && room.source == Source::Own {
            // Numbered here until this instance can publish again (see `gather`): the totals
            // are news, the epoch they come with is not yet this room's.
            room.state.reactions.lock().set_totals(totals);
            return;
        }
        let adopted = room.source == Source::Own || *room.state.epoch() != *epoch;
        if adopted {
            room.state.adopt(epoch, seq);
            room.source = Source::Redis { complete: seq == 0 };
            room.join_history = None;
        }
        room.state.reactions.lock().set_totals(totals);
        if adopted {
            self.rejoin(name, None);
        }
    }

    /// With Redis: hands each room's taps since the last time to Redis, which adds them to the
    /// room's totals and sends every instance the sums. Twice per `--reaction-interval`, so
    /// a tap shows in every instance's totals within two intervals and a round trip.
    fn send_taps(&mut self, now: Instant) {
        self.taps_due = None;
        let Some(backplane) = self.backplane.clone() else {
            return;
        };
        if !backplane.is_up() {
            // Kept until Redis can sum them (see `react`).
            if !self.tapped.is_empty() {
                self.taps_due = Some(now + self.config.reaction_interval / 2);
            }
            return;
        }
        for name in std::mem::take(&mut self.tapped) {
            let Some(room) = self.rooms.get_mut(&name) else {
                continue;
            };
            let taps: Vec<(String, u64)> = std::mem::take(&mut room.taps).into_iter().collect();
            if taps.is_empty() {
                continue;
            }
            let outgoing = Outgoing::Reactions {
                room: name.clone(),
                taps,
            };
            if let Err(Outgoing::Reactions { taps, .. }) = backplane.try_publish(outgoing) {
                // The publish queue is full: they go with the next ones.
                room.taps.extend(taps);
                self.tapped.insert(name);
            }
        }
        if !self.tapped.is_empty() {
            self.taps_due = Some(now + self.config.reaction_interval / 2);
        }
    }

    /// The welcome itself, from this instance's state of the room (see `welcome`).
    fn welcome_now(&mut self, client: Arc<Client>, resume: Option<Resume>) {
        // What the room has gathered is in the history this welcome holds (a snapshot that
        // arrived in this batch) or came before the join: it goes out without this client.
        self.fan_out(&client.room);
        let now = Instant::now();
        let name = client.room.clone();
        let ttl = self.config.history_ttl;
        // At most half the outbox of history, less the rest of the welcome: with the `101`
        // and control frames, a welcome then always fits its client's empty outbox.
        self.live_rooms.insert(name.clone());
        let outbox = self.config.effective_outbox_bytes();
        let room = self.room(&name, now);
        room.has_v1_members = true;
        let state = room.state.clone();
        let reactions_json = state.reactions.lock().totals_json();
        // At most half the outbox of history, less the rest of the welcome (its identity at
        // most 2.6 KiB escaped, and the totals): with the `101` and control frames, a welcome
        // then always fits its client's empty outbox.
        let history_budget =
            (outbox / 2).saturating_sub(WELCOME_ENVELOPE_BYTES + reactions_json.len());
        let (epoch, seq) = (state.epoch(), state.seq());
        // A room that follows Redis with a possible hole here (its snapshot did not come in
        // time, or could not be asked for) may be behind Redis: no resume is recovered from it.
        let can_recover = room.source != Source::Redis { complete: false };
        // A crowd joining a quiet room shares one encoding of its history.
        let cached = room
            .join_history
            .as_ref()
            .filter(|c| {
                c.seq == seq
                    && c.epoch == epoch
                    && c.budget == history_budget
                    && now.saturating_duration_since(c.at) < JOIN_HISTORY_REUSE
            })
            .map(|c| c.json.clone());
        let (history, recovered) = state.with_history(now, ttl, |retained| {
            let wanted = resume.as_ref().filter(|resume| {
                can_recover
                    && *resume.epoch == *epoch
                    && retained.covers(resume.since, seq, now, ttl)
            });
            if let Some(resume) = wanted {
                // If the missed messages do not all fit, it is a normal join after all.
                if let (json, true) =
                    messages_json(&retained.after(resume.since, now, ttl), history_budget)
                {
                    return (Arc::<str>::from(json), true);
                }
            }
            let json = cached.unwrap_or_else(|| {
                messages_json(&retained.after(0, now, ttl), history_budget)
                    .0
                    .into()
            });
            (json, false)
        });
        if !recovered {
            room.join_history = Some(JoinHistory {
                seq,
                epoch: epoch.clone(),
                budget: history_budget,
                at: now,
                json: history.clone(),
            });
        }
        if resume.is_some() {
            self.stats.count_resume(recovered);
        }
        let reactions = reactions_json;
        let welcome = crate::v1::codec::welcome(
            &client.room,
            &client.identity,
            &epoch,
            seq,
            crate::v1::codec::Backlog {
                history: &history,
                recovered,
                presence: self.with_remote(&client.room, self.hub.presence(&client.room)),
                reactions: &reactions,
            },
        );
        client.mark_welcomed();
        let frame = crate::relay::client::encode_text(welcome);
        if let Push::Queued { .. } = client.queue_or_evict(frame) {
            self.dirty.push(client);
        }
    }

    /// Counts one reaction tap in its room's totals (sent on the next live tick).
    fn react(&mut self, name: Arc<str>, key: &str) {
        let now = Instant::now();
        let every = self.config.reaction_interval / 2;
        let with_redis = self.backplane.is_some();
        let link_down = self.backplane.as_ref().is_some_and(|b| !b.is_up());
        let room = self.room(&name, now);
        let added = if with_redis {
            // Counted here, summed in Redis (see `send_taps`). While Redis is out of reach the
            // tap shows in this instance's totals at once and waits to be summed when it is
            // back, so the totals do not fall back when Redis's arrive.
            if room.taps.len() < MAX_ROOM_REACTION_KEYS || room.taps.contains_key(key) {
                if link_down {
                    let _ = room.state.reactions.lock().add(key, 1);
                }
                *room.taps.entry(key.to_string()).or_default() += 1;
                self.tapped.insert(name);
                self.taps_due.get_or_insert(now + every);
                Ok(())
            } else {
                Err(crate::relay::room_state::TooManyKeys)
            }
        } else {
            room.state.reactions.lock().add(key, 1)
        };
        match added {
            Ok(()) => self.stats.reactions_counted.fetch_add(1, Ordering::Relaxed),
            Err(_) => self
                .stats
                .reactions_dropped_full
                .fetch_add(1, Ordering::Relaxed),
        };
    }

    /// The live tick: each room with v1 members gets a `presence` frame when its counts
    /// changed and a `reactions` frame when its totals did, each at most once per its
    /// interval. Frames of both kinds replace an unsent predecessor in a backlogged outbox,
    /// so a slow client holds one of each and gets the latest.
    fn send_live(&mut self, now: Instant) {
        let (presence_every, reactions_every) =
            (self.config.presence_interval, self.config.reaction_interval);
        let names: Vec<Arc<str>> = self.live_rooms.iter().cloned().collect();
        for name in names {
            let mut counts = None;
            self.hub.with_room(&name, |members| {
                if !members.v1.is_empty() {
                    counts = Some(members.presence());
                }
            });
            let counts = counts.map(|local| self.with_remote(&name, local));
            let (Some(counts), Some(room)) = (counts, self.rooms.get_mut(&name)) else {
                self.live_rooms.remove(&name);
                continue;
            };
            let due = |at: Option<Instant>, every| at.is_none_or(|at| now >= at + every);
            let mut frames = Vec::new();
            if room.presence_sent != Some(counts) && due(room.presence_at, presence_every) {
                room.presence_sent = Some(counts);
                room.presence_at = Some(now);
                frames.push((crate::v1::codec::presence(counts), Latest::Presence));
                self.stats.presence_frames.fetch_add(1, Ordering::Relaxed);
            }
            if due(room.reactions_at, reactions_every) {
                let mut reactions = room.state.reactions.lock();
                if reactions.take_changed() {
                    let totals = reactions.totals_json();
                    drop(reactions);
                    room.reactions_at = Some(now);
                    frames.push((crate::v1::codec::reactions(&totals), Latest::Reactions));
                    self.stats.reaction_frames.fetch_add(1, Ordering::Relaxed);
                }
            }
            for (json, class) in frames {
                let frame = crate::relay::client::encode_text(json);
                self.push_latest_to_room(&name, &frame, class);
            }
        }
        // Not flushed at once: the next batch's flush, a few milliseconds later in a busy
        // room, takes these frames along in the same `sendmsg` as its messages, instead of
        // a pass over every member of its own (measured at 10,000 viewers: a pass costs as
        // much as the messages of a batch). A quiet room's are flushed on the deadline.
        if !self.dirty.is_empty() {
            self.live_flush_due.get_or_insert(now + LIVE_FLUSH_DELAY);
        }
    }

    /// Queues a `Latest` frame for every welcomed v1 member of `name`.
    fn push_latest_to_room(&mut self, name: &str, frame: &Bytes, class: Latest) {
        let (dirty, overflowed) = (&mut self.dirty, &mut self.overflowed);
        self.hub.with_room(name, |room| {
            for client in room.v1.iter().filter(|client| client.is_welcomed()) {
                match client.queue_latest(frame.clone(), class) {
                    Push::Queued { was_empty: true } => dirty.push(client.clone()),
                    Push::Overflow => overflowed.push(client.clone()),
                    Push::Queued { was_empty: false } | Push::Closed => {}
                }
            }
        });
        self.settle_overflowed_as(frame, Some(class));
    }

    /// All rooms' history is over `--history-budget`: the rooms idle longest give theirs up
    /// (and get a new epoch) until a quarter of the budget is free, so one walk of the rooms
    /// pays for many messages.
    #[cold]
    fn give_up_history(&mut self) {
        let target = self.config.history_budget / 4 * 3;
        let mut idle: Vec<(Instant, Arc<str>)> = self
            .rooms
            .iter()
            .filter(|(_, room)| room.state.history_bytes() > 0)
            .map(|(name, room)| (room.last_active, name.clone()))
            .collect();
        idle.sort();
        let mut given_up = 0;
        for (_, name) in idle {
            if self.room_states.history_bytes() <= target {
                break;
            }
            if let Some(room) = self.rooms.get_mut(&name) {
                if room.source == Source::Own {
                    room.state.forget_history();
                } else {
                    // The epoch is Redis's: a later join here asks Redis for the history.
                    room.state.clear_history();
                    room.source = Source::Redis { complete: false };
                }
                room.join_history = None;
                given_up += 1;
            }
        }
        self.stats
            .histories_given_up
            .fetch_add(given_up, Ordering::Relaxed);
        debug!("history budget: {given_up} rooms gave their history up");
    }

    /// Drops the state of rooms without members for `--room-ttl` (a later join starts a new
    /// epoch), and past `MAX_ROOM_STATES` the states of memberless rooms due soonest. Each
    /// check looks at one room under a short read lock of the hub.
    fn expire_rooms(&mut self, now: Instant) {
        if self.rooms.len() > MAX_ROOM_STATES {
            self.evict_over_cap();
        }
        let ttl = self.config.room_ttl;
        for _ in 0..ROOM_CHECKS_PER_TICK {
            let Some(Reverse((due, _))) = self.room_checks.peek() else {
                return;
            };
            if *due > now {
                return;
            }
            let Some(Reverse((_, name))) = self.room_checks.pop() else {
                return;
            };
            let Some(room) = self.rooms.get_mut(&name) else {
                continue;
            };
            let next = if self.hub.room_size(&name) > 0 {
                room.last_active = now;
                // A busy room's history ages out as it is written; a quiet one's here, so what
                // `--history-ttl` has aged out does not count against the budget.
                room.state
                    .with_history(now, self.config.history_ttl, |_| ());
                now + ROOM_STATE_CHECK
            } else if now.saturating_duration_since(room.last_active) >= ttl {
                self.rooms.remove(&name);
                self.room_states.remove(&name);
                debug!("room {name}: state expired");
                continue;
            } else {
                room.last_active + ttl
            };
            self.room_checks.push(Reverse((next, name)));
        }
    }

    /// Over `MAX_ROOM_STATES`: the rooms without members idle longest lose their state, down
    /// to nine tenths of the cap, so one walk of the rooms pays for many new ones. Their
    /// entries in `room_checks` are skipped when they come up.
    #[cold]
    fn evict_over_cap(&mut self) {
        let mut idle: Vec<(Instant, Arc<str>)> = Vec::new();
        let rooms = &self.rooms;
        self.hub.with_rooms(|members| {
            idle = rooms
                .iter()
                .filter(|(name, _)| !members.contains_key(*name))
                .map(|(name, room)| (room.last_active, name.clone()))
                .collect();
        });
        idle.sort();
        let excess = self.rooms.len().saturating_sub(MAX_ROOM_STATES / 10 * 9);
        for (_, name) in idle.into_iter().take(excess) {
            self.rooms.remove(&name);
            self.room_states.remove(&name);
            self.live_rooms.remove(&name);
        }
        debug!("room states over {MAX_ROOM_STATES}: the idle longest dropped");
    }

    /// Judges the clients whose outbox had no room for `frame`: each first gets a send attempt
    /// (a reader keeping up has taken its backlog by now, or takes it now), then `frame` is
    /// queued again, and only a client it still does not fit is evicted as too slow. Returns
    /// how many took the frame. Runs after the hub's lock is released: it sends, shuts sockets
    /// down and logs.
    fn settle_overflowed(&mut self, frame: &Bytes) -> u64 {
        self.settle_overflowed_as(frame, None)
    }

    /// `settle_overflowed` for a frame of a `Latest` class (queued again as one, so it still
    /// replaces, and can be replaced by, its class's others).
    fn settle_overflowed_as(&mut self, frame: &Bytes, class: Option<Latest>) -> u64 {
        let limit = self.config.effective_outbox_bytes();
        if frame.len() + crate::relay::outbox::ENTRY_OVERHEAD_BYTES > limit {
            // No outbox could ever hold it (only a message from outside this instance's
            // limits can be this large): not the clients' fault, so nobody is evicted for it.
            debug!("dropped a {} B frame larger than any outbox", frame.len());
            self.overflowed.clear();
            return 0;
        }
        let mut queued = 0;
        for client in std::mem::take(&mut self.overflowed) {
            let pushed = match class {
                Some(class) => client.queue_latest_or_evict(frame.clone(), class),
                None => client.queue_or_evict(frame.clone()),
            };
            if let Push::Queued { .. } = pushed {
                queued += 1;
                // Flushed with the batch; if it stays backlogged it is tracked then.
                self.dirty.push(client);
            }
        }
        queued
    }

    /// Fans out every room's chunk at the end of a batch.
    fn fan_out_all(&mut self) {
        let rooms: Vec<Arc<str>> = self.chunks.keys().cloned().collect();
        for room in rooms {
            self.fan_out(&room);
        }
        self.chunks.clear();
        self.gathered = 0;
    }

    /// One non-blocking send per touched client: every frame of the batch in one `sendmsg`.
    fn flush_dirty(&mut self) {
        self.live_flush_due = None;
        let mut dirty = std::mem::take(&mut self.dirty);
        for client in dirty.drain(..) {
            if client.flush() == Flush::Backlogged {
                self.track_backlog(client);
            }
        }
        // Keep the allocation for the next batch.
        self.dirty = dirty;
    }

    fn track_backlog(&mut self, client: Arc<Client>) {
        if !client.is_backlog_tracked.swap(true, Ordering::SeqCst) {
            self.backlog.push(client);
        }
    }

    /// Retries backlogged clients; evicts those backlogged past `--slow-timeout`.
    fn retry_backlog(&mut self, now: Instant) {
        let slow_timeout = self.config.slow_timeout;
        #[cfg(test)]
        let hook = &mut self.before_untracking;
        self.backlog.retain(|client| {
            let keep = client.eviction().is_none()
                && client.flush() == Flush::Backlogged
                && match client.backlog_age(now) {
                    Some(age) if age > slow_timeout => {
                        client.evict(Eviction::Slow);
                        false
                    }
                    _ => true,
                };
            if keep {
                return true;
            }
            #[cfg(test)]
            if let Some(hook) = hook.as_mut() {
                hook(client);
            }
            client.is_backlog_tracked.store(false, Ordering::SeqCst);
            // Between the flush above and that store, the connection thread may have left a
            // new backlog (a pong into a buffer that filled again) and, finding the flag still
            // set, not handed it over. Look again now that the flag is clear: either we see
            // its bytes here, or it sees the clear flag and hands the client over itself.
            client.eviction().is_none()
                && client.has_backlog()
                && !client.is_backlog_tracked.swap(true, Ordering::SeqCst)
        });
    }

    /// The heartbeat: pings clients quiet for `--ping-interval`.
    fn sweep(&mut self) {
        let interval = self.config.ping_interval;
        let (dirty, overflowed, ping) = (&mut self.dirty, &mut self.overflowed, &self.ping);
        self.hub.for_each_client(|client| {
            if client.is_due_for_ping(interval) {
                match client.queue(ping.clone()) {
                    Push::Queued { was_empty: true } => dirty.push(client.clone()),
                    Push::Overflow => overflowed.push(client.clone()),
                    Push::Queued { was_empty: false } | Push::Closed => {}
                }
            }
        });
        let ping = self.ping.clone();
        self.settle_overflowed(&ping);
        self.flush_dirty();
    }

    /// Shutdown: queue `1001 going away` for everyone, give them `--shutdown-grace` to take it
    /// and answer, then cut whoever is left.
    fn close_all(&mut self, events: &Receiver<Event>) {
        // First, so that anyone who sees a 1001 also sees the server draining.
        self.draining.store(true, Ordering::SeqCst);
        info!("shutting down: closing {} clients", self.hub.client_count());
        close_everyone(
            &self.hub,
            CloseCode::Away,
            "server shutting down",
            self.config.shutdown_grace,
            // Messages still arriving have nowhere to go: every outbox is sealed by its close.
            || for _ in events.try_iter() {},
        );
    }
}

/// A chunk's bytes as one shared allocation for every outbox that holds it.
///
/// A Vec grown by doubling may own nearly twice what it holds, and every outbox that holds the
/// chunk keeps the whole allocation alive: the slack is given back first, so the outbox bound
/// (which counts what is held) is also what memory it costs.
/// What a message Redis numbered did to its room's state.
#[derive(Debug, PartialEq, Eq)]
enum Followed {
    /// The next message of the life the state follows.
    Next,
    /// The first one seen of another life of the room (another epoch): the state now
    /// follows that one.
    Adopted,
    /// After a gap: the members saw up to `seen`, and missed what came between.
    Gap { seen: u64 },
    /// At or below the state's `seq` in the same epoch, which no copy can be (the ledger and
    /// `Origins` drop those before they get here): Redis went back in time (restored from an
    /// older dump). The state follows it as a new life.
    Rewound,
}

/// Brings a room's state up to a message Redis numbered. A stamp from another life of the
/// room (its epoch) is adopted: the state follows Redis from it on, complete only when it is
/// that life's first message. A gap (messages this instance never received) leaves the
/// history incomplete: a later join asks Redis for a snapshot rather than offer a resume it
/// cannot serve.
fn follow_stamp(room: &mut Room, stamp: &Stamp) -> Followed {
    let state = &room.state;
    let followed = if room.source == Source::Own || *state.epoch() != *stamp.epoch {
        state.adopt(&stamp.epoch, stamp.seq - 1);
        room.source = Source::Redis {
            complete: stamp.seq == 1,
        };
        Followed::Adopted
    } else if stamp.seq <= state.seq() {
        state.adopt(&stamp.epoch, stamp.seq - 1);
        room.source = Source::Redis { complete: false };
        Followed::Rewound
    } else if stamp.seq != state.seq() + 1 {
        let seen = state.seq();
        state.clear_history();
        room.source = Source::Redis { complete: false };
        Followed::Gap { seen }
    } else {
        Followed::Next
    };
    room.join_history = None;
    // The `seq` itself is taken when the message is (`gather`): a member welcomed again now
    // must be told the one before it.
    state.set_seq(stamp.seq - 1);
    followed
}

/// What waits for a room's snapshot.
enum Parked {
    Welcome(Arc<Client>, Option<Resume>),
    Waiter(Sender<()>),
}

fn into_shared(mut bytes: Vec<u8>) -> Bytes {
    if bytes.capacity() - bytes.len() > bytes.len() / 8 {
        bytes.shrink_to_fit();
    }
    Bytes::from(bytes)
}

/// Queues a gathered chunk for one member under the hub's read lock: a memory operation only.
/// A client whose outbox was already non-empty is either in `dirty` already or backlogged (and
/// retried on the tick), so each client is listed once; one without room is judged later.
fn queue_gathered(
    client: &Arc<Client>,
    chunk: &Bytes,
    messages: u64,
    delivered: &mut u64,
    dirty: &mut Vec<Arc<Client>>,
    overflowed: &mut Vec<Arc<Client>>,
) {
    match client.queue(chunk.clone()) {
        Push::Queued { was_empty } => {
            *delivered += messages;
            if was_empty {
                dirty.push(client.clone());
            }
        }
        Push::Overflow => overflowed.push(client.clone()),
        Push::Closed => {}
    }
}

/// Milliseconds since the Unix epoch: a v1 message's `ts`.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Queues a close frame for every client, gives them `grace` to take it and answer, then cuts
/// whoever is left. Cutting (socket shutdown) is what wakes each connection thread from `read`
/// so it can exit and be joined. `between_steps` runs every `GRACE_STEP`.
///
/// The broadcaster runs this at shutdown; the acceptor's supervisor runs it when the
/// broadcaster itself has failed, since someone must still close the clients.
pub(crate) fn close_everyone(
    hub: &Hub,
    code: CloseCode,
    reason: &'static str,
    grace: Duration,
    mut between_steps: impl FnMut(),
) {
    let deadline = Instant::now() + grace;
    let mut clients = Vec::new();
    loop {
        between_steps();
        // Taken afresh each step (clients that answered have left), which also catches a
        // client that finished its handshake after shutdown began. Collected under the lock,
        // acted on after it.
        clients.clear();
        hub.for_each_client(|client| clients.push(client.clone()));
        if clients.is_empty() || Instant::now() >= deadline {
            break;
        }
        for client in &clients {
            if !client.is_closing() {
                client.queue_close(code, reason);
            }
            if client.has_backlog() {
                client.flush();
            }
        }
        std::thread::sleep(GRACE_STEP);
    }
    for client in &clients {
        let _ = client.socket().shutdown(std::net::Shutdown::Both);
    }
    debug!("grace period over: {} clients cut", clients.len());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;

    /// A client whose kernel send buffer is full (its peer never reads) but whose outbox is
    /// empty, already on the broadcaster's retry list.
    fn broadcaster_with_a_full_socket() -> (Broadcaster, Arc<Client>, Events, TcpStream) {
        let stats = Arc::new(Stats::default());
        let (client, peer) = Client::on_loopback(1, "r", 1 << 20, stats.clone());
        let client = Arc::new(client);
        let chunk = [0u8; 64 * 1024];
        // SAFETY: a valid socket and buffer; MSG_DONTWAIT so it stops at a full buffer.
        while unsafe {
            libc::send(
                client.socket().as_raw_fd(),
                chunk.as_ptr().cast(),
                chunk.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
        let hub = Arc::new(Hub::new());
        hub.join(client.clone());
        let config = Arc::new(Config::default());
        let mut broadcaster = Broadcaster::new(
            hub,
            stats,
            config,
            Arc::default(),
            Arc::new(AtomicBool::new(false)),
            None,
        );
        broadcaster.track_backlog(client.clone());
        let (events, _receiver) = Events::channel(16, 1 << 20);
        (broadcaster, client, events, peer)
    }

    /// The retry finds the outbox drained and is about to drop the client from its list when
    /// the connection thread queues a pong that the full socket does not take. The thread sees
    /// the client still tracked, so it does not hand it over; the retry must notice the new
    /// backlog itself, or the client would never be flushed again.
    #[test]
    fn a_backlog_left_while_the_retry_lets_go_is_kept() {
        let (mut broadcaster, client, events, _peer) = broadcaster_with_a_full_socket();
        broadcaster.before_untracking = Some(Box::new(move |client: &Arc<Client>| {
            client.queue_or_evict(Bytes::from_static(b"\x8a\x00"));
            assert_eq!(client.flush(), Flush::Backlogged);
            events.hand_over_backlog(client);
        }));
        broadcaster.retry_backlog(Instant::now());
        assert!(client.has_backlog());
        assert_eq!(broadcaster.backlog.len(), 1, "the client is still retried");
        assert!(client.is_backlog_tracked.load(Ordering::SeqCst));
    }

    /// A broadcaster over an empty hub, and the room states it keeps.
    fn broadcaster_without_members(config: Config) -> (Broadcaster, Arc<RoomStates>) {
        let room_states: Arc<RoomStates> = Arc::default();
        let broadcaster = Broadcaster::new(
            Arc::new(Hub::new()),
            Arc::new(Stats::default()),
            Arc::new(config),
            room_states.clone(),
            Arc::new(AtomicBool::new(false)),
            None,
        );
        (broadcaster, room_states)
    }

    fn text(room: &str) -> Message {
        Message {
            room: room.into(),
            kind: MessageKind::Text,
            payload: Bytes::from_static(b"x"),
            from: None,
            order: Order::Here,
        }
    }

    fn stamped(epoch: &str, seq: u64) -> Message {
        Message {
            order: Order::Redis(Box::new(Stamp {
                epoch: epoch.into(),
                seq,
                ts_ms: 1_764_230_000_000 + seq,
            })),
            ..text("r")
        }
    }

    /// A room's state follows Redis's numbers: consecutive stamps extend a complete history,
    /// a gap leaves the history incomplete (a join then asks for a snapshot), and so does a
    /// seq that went back (Redis restored from an older dump), another epoch is adopted.
    #[test]
    fn a_rooms_state_follows_the_stamps_redis_gives_its_messages() {
        let (mut broadcaster, room_states) = broadcaster_without_members(Config::default());
        assert_eq!(broadcaster.gather(stamped("e1", 1)), 1);
        assert_eq!(broadcaster.gather(stamped("e1", 2)), 2);
        let state = room_states.get("r").unwrap();
        let source = |b: &Broadcaster| b.rooms["r"].source;
        assert_eq!((&*state.epoch(), state.seq()), ("e1", 2));
        assert_eq!(source(&broadcaster), Source::Redis { complete: true });
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        assert_eq!(state.with_history(now, ttl, |h| h.len()), 2);

        assert_eq!(broadcaster.gather(stamped("e1", 5)), 5, "after a gap");
        assert_eq!(source(&broadcaster), Source::Redis { complete: false });
        assert_eq!(state.with_history(now, ttl, |h| h.len()), 1);

        // Back below its seq in the same epoch: Redis went back in time. The state follows
        // it, and knows its history incomplete.
        assert_eq!(broadcaster.gather(stamped("e1", 3)), 3, "rewound");
        assert_eq!((&*state.epoch(), state.seq()), ("e1", 3));
        assert_eq!(source(&broadcaster), Source::Redis { complete: false });

        // Another life of the room (Redis started empty): adopted, from its first message.
        assert_eq!(broadcaster.gather(stamped("e2", 1)), 1);
        assert_eq!((&*state.epoch(), state.seq()), ("e2", 1));
        assert_eq!(source(&broadcaster), Source::Redis { complete: true });

        // Without Redis a message numbered here simply follows, in the same epoch.
        assert_eq!(broadcaster.gather(text("r")), 2);
        assert_eq!(&*state.epoch(), "e2");
    }

    /// A client cycling through room names makes a state per name, but never more than
    /// `MAX_ROOM_STATES` stay, and those without members go once their TTL is over.
    #[test]
    fn room_states_are_capped_and_expire_after_their_ttl() {
        let (mut broadcaster, room_states) = broadcaster_without_members(Config {
            room_ttl: Duration::from_secs(60),
            ..Config::default()
        });
        for n in 0..MAX_ROOM_STATES + 500 {
            broadcaster.gather(text(&format!("r{n}")));
        }
        broadcaster.fan_out_all();
        let now = Instant::now();
        broadcaster.expire_rooms(now);
        let kept = MAX_ROOM_STATES / 10 * 9;
        assert_eq!(broadcaster.rooms.len(), kept);
        assert_eq!(room_states.len(), kept);
        assert!(
            room_states.get("r0").is_none(),
            "the idle longest went first"
        );
        assert!(room_states
            .get(&format!("r{}", MAX_ROOM_STATES + 499))
            .is_some());
        // Before the TTL nothing more goes; after it, every memberless room does (in ticks
        // of at most ROOM_CHECKS_PER_TICK).
        broadcaster.expire_rooms(now + Duration::from_secs(30));
        assert_eq!(broadcaster.rooms.len(), kept);
        for _ in 0..MAX_ROOM_STATES / ROOM_CHECKS_PER_TICK + 1 {
            broadcaster.expire_rooms(now + Duration::from_secs(61));
        }
        assert_eq!(broadcaster.rooms.len(), 0);
        assert!(room_states.is_empty());
    }

    /// A client cycling through 100,000 room names cannot hold more history than the budget:
    /// the rooms idle longest give theirs up, and get a new epoch.
    #[test]
    fn all_rooms_history_stays_within_its_budget() {
        let budget = 1 << 20;
        let (mut broadcaster, room_states) = broadcaster_without_members(Config {
            history_budget: budget,
            ..Config::default()
        });
        let big = |room: &str| Message {
            payload: Bytes::from(vec![b'x'; 1000]),
            ..text(room)
        };
        broadcaster.gather(big("first"));
        let first_epoch = room_states.get("first").unwrap().epoch();
        for n in 0..100_000 {
            broadcaster.gather(big(&format!("r{n}")));
            assert!(room_states.history_bytes() <= budget, "at room {n}");
            if n % 4096 == 0 {
                broadcaster.fan_out_all();
            }
        }
        broadcaster.fan_out_all();
        assert!(broadcaster.stats.histories_given_up.load(Ordering::Relaxed) > 0);
        let first = room_states.get("first").unwrap();
        assert_eq!(first.history_bytes(), 0, "the room idle longest went first");
        assert_ne!(first.epoch(), first_epoch, "and its epoch changed");
        assert_eq!(first.seq(), 1, "its seq goes on");
    }
}
