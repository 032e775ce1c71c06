//! The three threads that talk to Redis (cargo feature `redis`), each on its own blocking
//! connection so none waits behind another:
//!
//! - **redis-publisher** takes events off the bounded publish queue, numbers them into the
//!   backplane's ledger, and runs the sequencing script (`sequence.lua`) on each batch, one
//!   round trip: messages get their room's next `seq` and history entry and go to their
//!   room's channel, taps are added to the room's totals, snapshot requests are answered on
//!   this instance's control channel, and anything else (a close) gets a marker there. While
//!   the link is degraded it delivers them to the local broadcaster instead, in the same
//!   order.
//! - **redis-subscriber** holds a `PSUBSCRIBE roomcast:room:*` and a `SUBSCRIBE` of this
//!   instance's control channel, and feeds every message, from every instance, into the
//!   broadcaster's channel: other instances' messages as they come (each once), this
//!   instance's own out of the ledger. This is the only way a room message reaches the
//!   broadcaster while the link is up. Each time its connection begins or ends it tells the
//!   broadcaster (`Event::StreamBroken`): what Redis published in between never arrived. It also `SUBSCRIBE`s the moderation channel and acts
//!   on other instances' disconnects and bans, and loads the bans kept in Redis each time it
//!   connects (`cluster`).
//! - **redis-presence** writes this instance's room counts (clients and users) to its
//!   presence hash with a TTL, extends the Redis state of its rooms by `--room-ttl`, reads the
//!   other instances' hashes, and deletes its own at shutdown. Between heartbeats it hands
//!   the endpoint's moderation commands to Redis.
//!
//! Each reconnects on its own with exponential backoff; `Backplane::set_side` turns the
//! publisher's and subscriber's state into "up" or "degraded". Every blocking call has a
//! timeout, so each thread notices shutdown within `POLL` (or one command's `IO_TIMEOUT`).
//! A thread that panics takes its side of the link down as it unwinds (`OnExit`), so a dead
//! thread never leaves the link claiming "up"; the panic itself reaches whoever joins it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, warn};
use redis::{Client, Connection, RedisResult};

use crate::backplane::cluster::{self, Local};
use crate::backplane::{
    self, keys, Arrival, Backplane, Dropped, Origins, Outgoing, Sequence, Side,
    INSTANCE_KEY_PREFIX, MAX_HELD_EVENTS,
};
use crate::error::Error;
use crate::relay::broadcaster::{Event, Events};
use crate::relay::broadcaster::{Message, Order};
use crate::relay::hub::is_valid_room_name;
use crate::shutdown::Shutdown;
use crate::supervisor::Supervisor;
use crate::v1::codec::Presence;

/// How long a blocking Redis read waits before the thread checks for shutdown, and how long
/// the publisher waits for a message before it looks at the link again.
const POLL: Duration = Duration::from_millis(200);
/// Deadline for connecting, and for any command's reply on the publisher and presence
/// connections: a Redis that takes longer is treated as gone.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection backoff: first and longest pause.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most events in one pipelined round trip, and most payload bytes.
const MAX_PIPELINE: usize = 512;
const MAX_PIPELINE_BYTES: usize = 1024 * 1024;
/// A presence-hash field that is not a valid room name, so an instance with no clients still
/// has a hash and still counts as an instance.
const ALIVE_FIELD: &str = "@alive";

/// Starts the three threads, on `config.redis`. They stop on `shutdown`; the caller joins
/// them.
pub(crate) fn start(
    config: &crate::Config,
    backplane: Arc<Backplane>,
    outgoing: Receiver<Outgoing>,
    events: Events,
    local: Local,
    supervisor: &Arc<Supervisor>,
    shutdown: &Shutdown,
) -> Result<Vec<JoinHandle<()>>, Error> {
    let url = config.redis.as_deref().unwrap_or_default();
    let client = Client::open(url).map_err(|err| {
        Error::Config(crate::ConfigError {
            flag: "--redis".into(),
            problem: format!(
                "{:?} is not a Redis URL like redis://127.0.0.1:6379/0 ({err})",
                crate::config::redact_url(url)
            ),
        })
    })?;
    // Each thread runs under the supervisor's watch: a panic in one fails the server (see
    // `supervisor`) instead of leaving an instance that relays nothing across the cluster.
    let spawn = |name: &'static str, run: Box<dyn FnOnce() + Send>| {
        let watch = supervisor.watch(name, shutdown.clone());
        thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _watch = watch;
                run()
            })
            .map_err(Error::io("spawning a redis thread"))
    };
    let publisher = {
        let settings = ScriptSettings::new(config);
        let (client, backplane, events, shutdown) = (
            client.clone(),
            backplane.clone(),
            events.clone(),
            shutdown.clone(),
        );
        spawn(
            "redis-publisher",
            Box::new(move || {
                publish(
                    &client, &backplane, &settings, &outgoing, &events, &shutdown,
                )
            }),
        )
    };
    let mut threads = vec![publisher];
    let local = Arc::new(local);
    let subscriber = {
        let (client, backplane, local, shutdown) = (
            client.clone(),
            backplane.clone(),
            local.clone(),
            shutdown.clone(),
        );
        spawn(
            "redis-subscriber",
            Box::new(move || subscribe(&client, &backplane, &events, &local, &shutdown)),
        )
    };
    threads.push(subscriber);
    let presence = {
        let shutdown = shutdown.clone();
        spawn(
            "redis-presence",
            Box::new(move || presence(&client, &backplane, &local, &shutdown)),
        )
    };
    threads.push(presence);
    // All three or none: a thread that could not start leaves the others stopped and joined,
    // not running on behind an error.
    if threads.iter().any(Result::is_err) {
        shutdown.trigger();
        let mut first_error = None;
        for thread in threads {
            match thread {
                Ok(handle) => {
                    let _ = handle.join();
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        return Err(first_error.expect("one spawn failed"));
    }
    Ok(threads.into_iter().flatten().collect())
}

/// A side's connection is gone: at shutdown the link simply closes; otherwise (a failure, a
/// panic) it is an outage, logged and counted.
fn side_down(backplane: &Backplane, side: Side, shutdown: &Shutdown) {
    if shutdown.is_triggered() {
        backplane.leave(side);
    } else {
        backplane.set_side(side, false);
    }
}

/// Runs its closure when dropped: at the end of a thread's body, and also while a panic
/// unwinds it. The panic still reaches the joiner (`JoinHandle::join` returns it).
struct OnExit<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnExit<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// The publisher: numbers every event it takes off the queue into the ledger, then publishes
/// it (link up) or delivers it locally (degraded). It never sleeps while events wait: a
/// reconnection is attempted between batches, when due.
fn publish(
    client: &Client,
    backplane: &Backplane,
    settings: &ScriptSettings,
    outgoing: &Receiver<Outgoing>,
    events: &Events,
    shutdown: &Shutdown,
) {
    let _down = OnExit(|| side_down(backplane, Side::Publisher, shutdown));
    let mut link = PublisherLink::new();
    while !shutdown.is_triggered() {
        link.reconnect_if_due(client, backplane, events);
        if !backplane.is_up() {
            // Degraded: Redis will not bring held events back, so this instance's members
            // get them now, in order.
            backplane.deliver_all(events);
        }
        if backplane.held() >= MAX_HELD_EVENTS {
            // The subscriber is far behind (the broadcaster is slow, or Redis is). Taking more
            // would only grow the ledger: the queue fills and drops instead. A marker still
            // goes out, so held events Redis will never bring back (it lost them) are
            // released when the marker returns, rather than parking the publisher for good.
            link.keep_alive(client, backplane);
            backplane.wait_for_ledger_room(POLL);
            continue;
        }
        let first = match outgoing.recv_timeout(POLL) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                link.keep_alive(client, backplane);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let batch = take_batch(first, outgoing);
        // Encoded before it is held, from the numbers it is about to get (only this thread
        // holds, so they cannot change in between).
        let pipeline = link
            .script
            .as_deref()
            .filter(|_| backplane.is_up())
            .map(|script| Pipeline::for_batch(backplane, settings, script, &batch));
        backplane.hold(batch);
        let published = pipeline.is_some();
        if let Some(pipeline) = pipeline {
            link.publish(client, backplane, &pipeline);
        }
        // A batch Redis never saw (the link was down as it was taken, even if it came up
        // since) is this instance's to deliver, as is any once the link is down.
        if !published || !backplane.is_up() {
            backplane.deliver_all(events);
        }
    }
}

/// The publisher's connection, and when to try again without one.
struct PublisherLink {
    con: Option<Connection>,
    /// The sequencing script's SHA1, from `SCRIPT LOAD` when the connection was made.
    script: Option<String>,
    /// When the connection last went unanswered: the next is made only once the subscriber
    /// has heard from Redis since (see `Backplane::heard_from_redis_since`).
    failed_at: Option<Instant>,
    backoff: Backoff,
    retry_at: Instant,
    last_reply: Instant,
}

impl PublisherLink {
    fn new() -> PublisherLink {
        PublisherLink {
            con: None,
            script: None,
            failed_at: None,
            backoff: Backoff::new("publisher"),
            retry_at: Instant::now(),
            last_reply: Instant::now(),
        }
    }

    /// Connects when due, and only once the subscriber is connected: that proves Redis
    /// reachable, so an unreachable Redis costs the publisher no connect timeouts while it
    /// delivers locally (the subscriber, which then has nothing to deliver, pays them).
    fn reconnect_if_due(&mut self, client: &Client, backplane: &Backplane, events: &Events) {
        if self.con.is_some()
            || Instant::now() < self.retry_at
            || !backplane.is_connected(Side::Subscriber)
            || !self
                .failed_at
                .is_none_or(|at| backplane.heard_from_redis_since(at))
        {
            return;
        }
        let connected = connect(client).and_then(|mut con| {
            let script = load_script(&mut con)?;
            Ok((con, script))
        });
        match connected {
            Ok((con, script)) => {
                self.con = Some(con);
                self.script = Some(script);
                self.last_reply = Instant::now();
                self.backoff.succeeded();
                self.failed_at = None;
                if backplane.set_side(Side::Publisher, true) {
                    let _ = events.send(Event::LinkUp);
                }
            }
            Err(err) => self.failed(&err, backplane),
        }
    }

    fn failed(&mut self, err: &redis::RedisError, backplane: &Backplane) {
        self.con = None;
        // A Redis that did not answer may accept a connection and answer nothing again; one
        // that closed the connection or refused it says so at once.
        if err.is_timeout() {
            self.failed_at = Some(Instant::now());
        }
        backplane.set_side(Side::Publisher, false);
        self.retry_at = Instant::now() + self.backoff.pause_after(err);
    }

    /// One batch, one round trip. A failed write on a connection Redis closed since its last
    /// use sent nothing, so the batch is retried once on a fresh connection before the link
    /// counts as down. When part of the first attempt did reach Redis, the retry carries it
    /// again under the same numbers, and the script runs only what it has not run yet.
    fn publish(&mut self, client: &Client, backplane: &Backplane, pipeline: &Pipeline) {
        let Some(con) = self.con.as_mut() else {
            return;
        };
        let result = pipeline.run(con).or_else(|err| {
            if err.is_timeout() {
                // Redis is slow or gone, not a closed connection: a retry would only wait as
                // long again before the link is called down.
                return Err(err);
            }
            let mut fresh = connect(client)?;
            let failed = pipeline.run(&mut fresh)?;
            *con = fresh;
            Ok(failed)
        });
        match result {
            Ok(failed) => {
                self.last_reply = Instant::now();
                backplane.count_published(pipeline.messages);
                if failed > 0 {
                    backplane.count_script_failures(failed);
                }
            }
            Err(err) => self.failed(&err, backplane),
        }
    }

    /// Nothing to send for a poll period. If events are still held with the link up, a marker
    /// for the last one makes the subscriber deliver whatever Redis will not bring back (it
    /// cannot, as far as we know: this is a safety net). Otherwise an idle connection is
    /// pinged, so a Redis that went away is noticed (and reported) now rather than when the
    /// next message fails.
    ///
    /// Like a batch, a command that fails on a connection Redis closed since its last use (a
    /// Redis restarted while this connection sat idle) is tried once on a fresh one before
    /// the link counts as down.
    fn keep_alive(&mut self, client: &Client, backplane: &Backplane) {
        let Some(con) = self.con.as_mut() else {
            return;
        };
        let command = if backplane.is_up() && backplane.held() > 0 {
            let mut marker = redis::cmd("PUBLISH");
            marker
                .arg(backplane.control_channel())
                .arg(backplane::encode_marker(backplane.last_numbered()));
            marker
        } else if self.last_reply.elapsed() >= backplane.heartbeat {
            redis::cmd("PING")
        } else {
            return;
        };
        let result = command.exec(con).or_else(|err| {
            if err.is_timeout() {
                return Err(err);
            }
            let mut fresh = connect(client)?;
            command.exec(&mut fresh)?;
            *con = fresh;
            Ok(())
        });
        match result {
            Ok(()) => self.last_reply = Instant::now(),
            Err(err) => self.failed(&err, backplane),
        }
    }
}

/// The sequencing script (see its header): one run per batch.
const SEQUENCE_SCRIPT: &str = include_str!("sequence.lua");

/// A batch as one run of the sequencing script, and how many of its events are room messages.
struct Pipeline {
    commands: redis::Cmd,
    messages: usize,
}

impl Pipeline {
    /// Numbers the batch from `last_numbered() + 1`, as `Backplane::hold` will, and writes it
    /// as the script's arguments. `script` is the script's SHA1, as `SCRIPT LOAD` gave it.
    fn for_batch(
        backplane: &Backplane,
        settings: &ScriptSettings,
        script: &str,
        batch: &[Outgoing],
    ) -> Pipeline {
        let first = backplane.last_numbered() + 1;
        let last = first + batch.len() as u64 - 1;
        let mut commands = redis::cmd("EVALSHA");
        commands
            .arg(script)
            .arg(0)
            .arg(backplane.origin.to_string())
            .arg(crate::relay::room_state::new_epoch())
            .arg(settings.history)
            .arg(settings.history_ttl_ms)
            .arg(settings.room_ttl_ms)
            .arg(backplane.control_channel())
            .arg(last)
            .arg(crate::relay::room_state::MAX_ROOM_REACTION_KEYS)
            .arg(settings.snapshot_bytes);
        let mut messages = 0;
        for (seq, event) in (first..).zip(batch) {
            match event {
                Outgoing::Message(message, _) => {
                    messages += 1;
                    commands.arg("M").arg(seq).arg(&*message.room).arg(
                        backplane::encode_sequenced(
                            backplane.origin,
                            seq,
                            message.kind,
                            &message.payload,
                            message.from.as_deref(),
                        ),
                    );
                }
                Outgoing::Local(_) => {
                    commands.arg("K").arg(seq);
                }
                Outgoing::Reactions { room, taps } => {
                    commands.arg("R").arg(seq).arg(&**room).arg(taps.len());
                    for (key, taps) in taps {
                        commands.arg(key.as_str()).arg(*taps);
                    }
                }
                Outgoing::NewEpoch { room, epoch } => {
                    commands.arg("E").arg(seq).arg(&**room).arg(&**epoch);
                }
                Outgoing::Snapshot { room, create } => {
                    let op = if *create { "S" } else { "Q" };
                    commands.arg(op).arg(seq).arg(&**room);
                }
            }
        }
        Pipeline { commands, messages }
    }
}

impl Pipeline {
    /// Runs the script. A Redis that lost its script cache (restarted, or `SCRIPT FLUSH`)
    /// gets it again, under the same SHA1, and the batch runs once.
    /// Returns how many of its events the script could not run (see `sequence.lua`).
    fn run(&self, con: &mut Connection) -> RedisResult<u64> {
        match self.commands.query(con) {
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                load_script(con)?;
                self.commands.query(con)
            }
            done => done,
        }
    }
}

/// Loads the sequencing script; returns its SHA1.
fn load_script(con: &mut Connection) -> RedisResult<String> {
    redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(SEQUENCE_SCRIPT)
        .query(con)
}

/// The flags the sequencing script applies, in the units it takes.
struct ScriptSettings {
    history: usize,
    history_ttl_ms: u64,
    room_ttl_ms: u64,
    /// History bytes a snapshot carries at most: what a welcome here can show (half an
    /// outbox), and never so much that Redis closes the subscriber for its output buffer.
    snapshot_bytes: usize,
}

impl ScriptSettings {
    fn new(config: &crate::Config) -> ScriptSettings {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        ScriptSettings {
            history: if config.history_budget > 0 {
                config.history
            } else {
                0
            },
            history_ttl_ms: ms(config.history_ttl),
            room_ttl_ms: ms(config.room_ttl),
            snapshot_bytes: backplane::snapshot_bytes(config),
        }
    }
}

/// The first event plus whatever else is queued, up to the pipeline's bounds.
fn take_batch(first: Outgoing, outgoing: &Receiver<Outgoing>) -> Vec<Outgoing> {
    let mut bytes = first.payload_len();
    let mut batch = vec![first];
    while batch.len() < MAX_PIPELINE && bytes < MAX_PIPELINE_BYTES {
        let Ok(event) = outgoing.try_recv() else {
            break;
        };
        bytes += event.payload_len();
        batch.push(event);
    }
    batch
}

/// The subscriber: every room message of every instance, in Redis's order, into the
/// broadcaster's channel.
fn subscribe(
    client: &Client,
    backplane: &Backplane,
    events: &Events,
    local: &Local,
    shutdown: &Shutdown,
) {
    let _down = OnExit(|| side_down(backplane, Side::Subscriber, shutdown));
    let mut reconnect = Backoff::new("subscriber");
    let mut origins = Origins::default();
    while !shutdown.is_triggered() {
        let result = connect(client).and_then(|mut con| {
            let mut pubsub = con.as_pubsub();
            pubsub.set_read_timeout(Some(POLL))?;
            // Each returns once Redis confirms, so everything published after the link is up
            // comes back through this connection.
            pubsub.subscribe(backplane.control_channel())?;
            pubsub.subscribe(keys::MODERATION_CHANNEL)?;
            pubsub.psubscribe(format!("{}*", backplane::ROOM_CHANNEL_PREFIX))?;
            // After subscribing: a ban published while this connection was away is in the
            // hash now, and one published from now on comes through the channel.
            cluster::load_bans(&mut connect(client)?, backplane, local)?;
            // Ahead of everything this connection brings: what Redis published while there
            // was none never reached this instance.
            let _ = events.send(Event::StreamBroken);
            backplane.heard_from_redis();
            if backplane.set_side(Side::Subscriber, true) {
                let _ = events.send(Event::LinkUp);
            }
            reconnect.succeeded();
            listen(
                &mut pubsub,
                backplane,
                events,
                local,
                &mut origins,
                shutdown,
            )
        });
        side_down(backplane, Side::Subscriber, shutdown);
        // What this connection has not brought back it never will: deliver it here, in order.
        backplane.deliver_all(events);
        if !shutdown.is_triggered() {
            let _ = events.send(Event::StreamBroken);
        }
        if let Err(err) = result {
            reconnect.failed(&err, shutdown);
        }
    }
}

/// Forwards room messages until shutdown, until the broadcaster stops, or until the
/// connection fails or goes silent for the presence TTL.
fn listen(
    pubsub: &mut redis::PubSub<'_>,
    backplane: &Backplane,
    events: &Events,
    local: &Local,
    origins: &mut Origins,
    shutdown: &Shutdown,
) -> RedisResult<()> {
    let mut last_heard = Instant::now();
    let mut last_ping = Instant::now();
    while !shutdown.is_triggered() {
        match pubsub.get_message() {
            Ok(message) => {
                last_heard = Instant::now();
                backplane.heard_from_redis();
                if !forward(&message, backplane, events, local, origins) {
                    return Ok(()); // the broadcaster has stopped
                }
            }
            Err(err) if err.is_timeout() => {}
            Err(err) => return Err(err),
        }
        // A quiet link is pinged, so a Redis that vanished without closing the connection is
        // noticed; any reply, or any message, counts as hearing from it.
        if last_ping.elapsed() >= backplane.heartbeat {
            last_ping = Instant::now();
            match pubsub.ping::<redis::Value>() {
                Ok(_) => {
                    last_heard = Instant::now();
                    backplane.heard_from_redis();
                }
                Err(err) if err.is_timeout() => {}
                Err(err) => return Err(err),
            }
        }
        if last_heard.elapsed() > backplane.presence_ttl {
            return Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no reply from redis within the presence TTL",
            )));
        }
    }
    Ok(())
}

/// One message from Redis into the broadcaster's channel, or counted as dropped. Returns
/// false once the broadcaster has stopped.
fn forward(
    message: &redis::Msg,
    backplane: &Backplane,
    events: &Events,
    local: &Local,
    origins: &mut Origins,
) -> bool {
    let channel = message.get_channel_name();
    let payload: Vec<u8> = message.get_payload().unwrap_or_default();
    if !message.from_pattern() && channel == keys::MODERATION_CHANNEL {
        cluster::receive(&payload, backplane, local);
        return true;
    }
    if !message.from_pattern() && channel == backplane.control_channel() {
        forward_control(&payload, backplane, events);
        return true;
    }
    backplane.received.fetch_add(1, Ordering::Relaxed);
    let Some(room) = backplane::room_of_channel(channel) else {
        backplane.count_drop(Dropped::Malformed);
        return true;
    };
    match payload.first() {
        Some(b'V') => forward_stamped(room, payload, backplane, events, origins),
        Some(b'A') => forward_totals(room, &payload, backplane, events, origins),
        _ => forward_unsequenced(room, payload, backplane, events, origins),
    }
}

/// On this instance's control channel: a marker (Redis has passed this point of our own
/// sequence) or the snapshot of a room a join here asked for.
fn forward_control(payload: &[u8], backplane: &Backplane, events: &Events) {
    let delivered = if let Some(seq) = backplane::decode_marker(payload) {
        backplane.deliver_through(seq, None, events).ok()
    } else if let Some((seq, room, snapshot)) =
        backplane::decode_snapshot(payload, crate::relay::broadcaster::unix_ms())
    {
        let arrived = Arrival::Snapshot { room, snapshot };
        backplane.deliver_through(seq, Some(arrived), events).ok()
    } else {
        None
    };
    if delivered.is_none() {
        backplane.count_drop(Dropped::Malformed);
    }
}

/// What became of a message Redis numbered: ours comes out of the ledger in its place, one
/// from another instance goes to the broadcaster once. Returns false once the broadcaster
/// has stopped.
fn forward_stamped(
    room: &str,
    payload: Vec<u8>,
    backplane: &Backplane,
    events: &Events,
    origins: &mut Origins,
) -> bool {
    let Some((stamp, decoded)) = backplane::decode_stamped(payload) else {
        backplane.count_drop(Dropped::Malformed);
        return true;
    };
    let Some(sequence) = decoded.sequence else {
        backplane.count_drop(Dropped::Malformed);
        return true;
    };
    if decoded.payload.len() > backplane.max_message_bytes {
        // From an instance with a larger limit: it would fit no outbox here.
        backplane.count_drop(Dropped::TooLarge);
        return true;
    }
    let message = Message {
        room: room.into(),
        kind: decoded.kind,
        payload: decoded.payload,
        from: decoded.from,
        order: Order::Redis(Box::new(stamp)),
    };
    if sequence.origin == backplane.origin {
        match backplane.deliver_through(sequence.seq, Some(Arrival::Message(message)), events) {
            Ok(0) => backplane.count_drop(Dropped::Duplicate),
            Ok(_) => {}
            Err(_) => backplane.count_drop(Dropped::Malformed),
        }
        return true;
    }
    if !origins.is_new(sequence.origin, sequence.seq) {
        backplane.count_drop(Dropped::Duplicate);
        return true;
    }
    events.send_message(message, None).is_ok()
}

/// A room's totals, as Redis summed them after an instance's taps.
fn forward_totals(
    room: &str,
    payload: &[u8],
    backplane: &Backplane,
    events: &Events,
    origins: &mut Origins,
) -> bool {
    let Some(totals) = backplane::decode_totals(payload) else {
        backplane.count_drop(Dropped::Malformed);
        return true;
    };
    let arrived = Arrival::Totals {
        room: room.into(),
        epoch: totals.epoch,
        seq: totals.seq,
        totals: totals.totals,
    };
    let Sequence { origin, seq } = totals.sequence;
    if origin == backplane.origin {
        if backplane
            .deliver_through(seq, Some(arrived), events)
            .is_err()
        {
            backplane.count_drop(Dropped::Malformed);
        }
        return true;
    }
    if !origins.is_new(origin, seq) {
        backplane.count_drop(Dropped::Duplicate);
        return true;
    }
    arrived.deliver(events, None).is_ok()
}

/// A message in the plain form (a backend's `PUBLISH`) or the bare sequenced one: outside
/// any room's sequence, so it reaches plain members only (see `Order::Unsequenced`).
fn forward_unsequenced(
    room: &str,
    payload: Vec<u8>,
    backplane: &Backplane,
    events: &Events,
    origins: &mut Origins,
) -> bool {
    let Some(decoded) = backplane::decode(payload) else {
        backplane.count_drop(Dropped::Malformed);
        return true;
    };
    match decoded.sequence {
        // This instance publishes only through the script: a bare one "of ours" is forged.
        Some(Sequence { origin, .. }) if origin == backplane.origin => {
            backplane.count_drop(Dropped::Malformed);
            return true;
        }
        Some(Sequence { origin, seq }) if !origins.is_new(origin, seq) => {
            backplane.count_drop(Dropped::Duplicate);
            return true;
        }
        _ => {}
    }
    if decoded.payload.len() > backplane.max_message_bytes {
        backplane.count_drop(Dropped::TooLarge);
        return true;
    }
    backplane.unsequenced.fetch_add(1, Ordering::Relaxed);
    let message = Message {
        room: room.into(),
        kind: decoded.kind,
        payload: decoded.payload,
        from: decoded.from,
        order: Order::Unsequenced,
    };
    events.send_message(message, None).is_ok()
}

/// The presence heartbeat: publish this instance's counts, read everyone else's. Between
/// heartbeats, hand the endpoint's moderation commands to Redis as they come.
fn presence(client: &Client, backplane: &Backplane, local: &Local, shutdown: &Shutdown) {
    // Without this thread the other instances cannot be seen; old counts would only mislead.
    let _forget = OnExit(|| backplane.set_remote_rooms(0, HashMap::new()));
    let key = format!("{INSTANCE_KEY_PREFIX}{}", backplane.instance);
    let mut con: Option<Connection> = None;
    let mut next_heartbeat = Instant::now();
    loop {
        if Instant::now() >= next_heartbeat {
            if con.is_none() {
                con = connect(client).ok();
            }
            if let Some(connection) = con.as_mut() {
                if let Err(err) = heartbeat(connection, &key, backplane, local) {
                    debug!("presence heartbeat failed: {err}");
                    con = None;
                }
            }
            if con.is_none() {
                // Without Redis the other instances cannot be seen; old counts would only mislead.
                backplane.set_remote_rooms(0, HashMap::new());
            }
            next_heartbeat = Instant::now() + backplane.heartbeat;
        }
        let timeout = next_heartbeat.saturating_duration_since(Instant::now());
        crossbeam_channel::select! {
            // Never a message: ready (disconnected) once shutdown begins.
            recv(shutdown.receiver()) -> _ => break,
            recv(backplane.moderation.pending()) -> command => {
                if let Ok(command) = command {
                    send_moderation(client, &mut con, backplane, &command);
                }
            }
            default(timeout) => {}
        }
    }
    if let Some(connection) = con.as_mut() {
        // What the endpoint answered `"cluster":true` for still goes out.
        for command in backplane.moderation.pending().try_iter() {
            if cluster::send(connection, &command).is_err() {
                break;
            }
        }
        // Leaving the cluster: our clients stop counting at once rather than after the TTL.
        let _ = redis::cmd("DEL").arg(&key).exec(connection);
    }
}

/// One moderation command to Redis, on the presence connection (made now if there is none),
/// retried once on a fresh connection: moderators act rarely, so the connection may have been
/// closed since its last use. A command that still fails is lost for the other instances,
/// and said so once per episode.
fn send_moderation(
    client: &Client,
    con: &mut Option<Connection>,
    backplane: &Backplane,
    command: &cluster::Command,
) {
    for _attempt in 0..2 {
        if con.is_none() {
            *con = connect(client).ok();
        }
        let Some(connection) = con.as_mut() else {
            break;
        };
        match cluster::send(connection, command) {
            Ok(()) => {
                backplane.moderation.reached_redis();
                return;
            }
            Err(err) => {
                debug!("moderation command to redis failed: {err}");
                *con = None;
            }
        }
    }
    backplane
        .moderation
        .failed("a command could not be written to redis");
}

fn heartbeat(
    con: &mut Connection,
    key: &str,
    backplane: &Backplane,
    local: &Local,
) -> RedisResult<()> {
    let ttl_ms = u64::try_from(backplane.presence_ttl.as_millis()).unwrap_or(u64::MAX);
    let room_ttl_ms = u64::try_from(local.room_ttl.as_millis()).unwrap_or(u64::MAX);
    let rooms = local.hub.presences();
    let mut pipe = redis::pipe();
    pipe.atomic().cmd("DEL").arg(key).ignore();
    let hset = pipe.cmd("HSET").arg(key).arg(ALIVE_FIELD).arg(1);
    for (room, presence) in &rooms {
        hset.arg(room).arg(cluster::encode_presence(*presence));
    }
    hset.ignore();
    pipe.cmd("PEXPIRE").arg(key).arg(ttl_ms).ignore();
    // A room's state in Redis lives while any instance has members in it, and `--room-ttl`
    // after the last one leaves (a missing key is left alone).
    for (room, _) in &rooms {
        for room_key in [keys::state_key(room), keys::reactions_key(room)] {
            pipe.cmd("PEXPIRE").arg(room_key).arg(room_ttl_ms).ignore();
        }
    }
    pipe.exec(con)?;

    let mut rooms: HashMap<String, Presence> = HashMap::new();
    let mut instances = 0;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{INSTANCE_KEY_PREFIX}*"))
            .arg("COUNT")
            .arg(100)
            .query(con)?;
        for other in keys.iter().filter(|other| *other != key) {
            // Bytes, not numbers: one field this instance cannot read (another version's, or
            // garbage) is skipped instead of failing the whole heartbeat.
            let counts: HashMap<Vec<u8>, Vec<u8>> = redis::cmd("HGETALL").arg(other).query(con)?;
            // SCAN may return a key twice; an expired one comes back empty.
            if counts.contains_key(ALIVE_FIELD.as_bytes()) {
                instances += 1;
            }
            for (room, value) in counts {
                let Ok(room) = String::from_utf8(room) else {
                    continue;
                };
                if let Some(presence) =
                    cluster::decode_presence(&value).filter(|_| is_valid_room_name(&room))
                {
                    let sum = rooms.entry(room).or_insert(cluster::NO_ONE);
                    *sum = cluster::add(*sum, presence);
                }
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    backplane.set_remote_rooms(instances, rooms);
    Ok(())
}

fn connect(client: &Client) -> RedisResult<Connection> {
    let con = client.get_connection_with_timeout(IO_TIMEOUT)?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

/// Sleeps for `duration` unless shutdown begins first; returns whether to go on.
fn wait(shutdown: &Shutdown, duration: Duration) -> bool {
    matches!(
        shutdown.receiver().recv_timeout(duration),
        Err(RecvTimeoutError::Timeout)
    )
}

/// Exponential reconnection backoff, with one warning per outage rather than one per attempt.
struct Backoff {
    side: &'static str,
    pause: Duration,
}

impl Backoff {
    fn new(side: &'static str) -> Backoff {
        Backoff {
            side,
            pause: BACKOFF_MIN,
        }
    }

    /// Logs the failure and returns how long to wait before the next attempt, doubling it for
    /// the one after.
    fn pause_after(&mut self, err: &redis::RedisError) -> Duration {
        let pause = self.pause;
        // A timed-out read says "Resource temporarily unavailable": say what it means.
        let err = match err.is_timeout() {
            true => format!("no reply within {IO_TIMEOUT:?}"),
            false => err.to_string(),
        };
        if pause == BACKOFF_MIN {
            warn!("redis {}: {err}; reconnecting with backoff", self.side);
        } else {
            debug!("redis {}: {err}; next attempt in {pause:?}", self.side);
        }
        self.pause = (pause * 2).min(BACKOFF_MAX);
        pause
    }

    /// `pause_after`, then the pause itself (cut short by shutdown).
    fn failed(&mut self, err: &redis::RedisError, shutdown: &Shutdown) {
        wait(shutdown, self.pause_after(err));
    }

    fn succeeded(&mut self) {
        self.pause = BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Redis thread that panics must not leave the link claiming "up", and the panic must
    /// reach the joiner.
    #[test]
    fn a_panicking_thread_takes_its_side_down_and_the_joiner_sees_the_panic() {
        let (backplane, _outgoing) = Backplane::new("i".into(), 1024, Duration::from_secs(3));
        backplane.set_side(Side::Subscriber, true);
        let joined = thread::scope(|scope| {
            scope
                .spawn(|| {
                    let _down = OnExit(|| {
                        backplane.set_side(Side::Publisher, false);
                    });
                    backplane.set_side(Side::Publisher, true);
                    assert!(backplane.is_up());
                    panic!("a bug in the publisher");
                })
                .join()
        });
        assert!(joined.is_err(), "the panic reached the joiner");
        assert!(!backplane.is_up(), "the link still claims to be up");
        assert_eq!(backplane.outages.load(Ordering::Relaxed), 1);
    }
}
