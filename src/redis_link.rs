//! The three threads that talk to Redis (cargo feature `redis`), each on its own blocking
//! connection so none waits behind another:
//!
//! - **redis-publisher** takes messages off the bounded publish queue and sends them as
//!   pipelined `PUBLISH`es, one round trip per batch.
//! - **redis-subscriber** holds a `PSUBSCRIBE roomcast:room:*` and feeds every message, from
//!   every instance, into the broadcaster's channel. This is the only way a room message
//!   reaches the broadcaster while the link is up.
//! - **redis-presence** writes this instance's room counts to its presence hash with a TTL,
//!   reads the other instances' hashes, and deletes its own at shutdown.
//!
//! Each reconnects on its own with exponential backoff; `Backplane::set_side` turns the
//! publisher's and subscriber's state into "up" or "degraded". Every blocking call has a
//! timeout, so each thread notices shutdown within `POLL`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, warn};
use redis::{Client, Connection, RedisResult};

use crate::backplane::{self, Backplane, Dropped, Outgoing, Side, INSTANCE_KEY_PREFIX};
use crate::broadcaster::Events;
use crate::error::Error;
use crate::hub::{is_valid_room_name, Hub};
use crate::shutdown::Shutdown;

/// How long a blocking Redis read waits before the thread checks for shutdown.
const POLL: Duration = Duration::from_millis(200);
/// Deadline for connecting, and for any command's reply on the publisher and presence
/// connections: a Redis that takes longer is treated as gone.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection backoff: first and longest pause.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most messages in one pipelined round trip, and most payload bytes.
const MAX_PIPELINE: usize = 512;
const MAX_PIPELINE_BYTES: usize = 1024 * 1024;
/// A presence-hash field that is not a valid room name, so an instance with no clients still
/// has a hash and still counts as an instance.
const ALIVE_FIELD: &str = "@alive";

/// Starts the three threads. They stop on `shutdown`; the caller joins them.
pub(crate) fn start(
    url: &str,
    backplane: Arc<Backplane>,
    outgoing: Receiver<Outgoing>,
    events: Events,
    hub: Arc<Hub>,
    shutdown: &Shutdown,
) -> Result<Vec<JoinHandle<()>>, Error> {
    let client = Client::open(url).map_err(|err| {
        Error::Config(crate::ConfigError {
            flag: "--redis".into(),
            problem: format!(
                "{:?} is not a Redis URL like redis://127.0.0.1:6379/0 ({err})",
                crate::config::redact_url(url)
            ),
        })
    })?;
    let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
        thread::Builder::new()
            .name(name.into())
            .spawn(run)
            .map_err(Error::io("spawning a redis thread"))
    };
    let publisher = {
        let (client, backplane, events, shutdown) = (
            client.clone(),
            backplane.clone(),
            events.clone(),
            shutdown.clone(),
        );
        spawn(
            "redis-publisher",
            Box::new(move || publish(&client, &backplane, &outgoing, &events, &shutdown)),
        )?
    };
    let subscriber = {
        let (client, backplane, shutdown) = (client.clone(), backplane.clone(), shutdown.clone());
        spawn(
            "redis-subscriber",
            Box::new(move || subscribe(&client, &backplane, &events, &shutdown)),
        )?
    };
    let presence = {
        let shutdown = shutdown.clone();
        spawn(
            "redis-presence",
            Box::new(move || presence(&client, &backplane, &hub, &shutdown)),
        )?
    };
    Ok(vec![publisher, subscriber, presence])
}

/// The publisher: batches of pipelined `PUBLISH`es. Messages it cannot publish (the link is
/// degraded, or Redis is gone) go to the local broadcaster instead, so this instance's members
/// still get them.
fn publish(
    client: &Client,
    backplane: &Backplane,
    outgoing: &Receiver<Outgoing>,
    events: &Events,
    shutdown: &Shutdown,
) {
    let mut reconnect = Backoff::new("publisher");
    let mut con: Option<Connection> = None;
    let mut last_reply = Instant::now();
    while !shutdown.is_triggered() {
        let Some(connection) = con.as_mut() else {
            match connect(client) {
                Ok(connection) => {
                    con = Some(connection);
                    last_reply = Instant::now();
                    backplane.set_side(Side::Publisher, true);
                    reconnect.succeeded();
                }
                Err(err) => {
                    backplane.set_side(Side::Publisher, false);
                    let queued = outgoing.try_iter().inspect(|m| backplane.dequeued(m));
                    deliver_locally(queued, events);
                    reconnect.failed(&err, shutdown);
                }
            }
            continue;
        };
        let first = match outgoing.recv_timeout(POLL) {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => {
                // An idle connection is pinged, so a Redis that went away is noticed (and
                // reported) now rather than when the next message fails.
                if last_reply.elapsed() >= backplane.heartbeat {
                    match redis::cmd("PING").exec(connection) {
                        Ok(()) => last_reply = Instant::now(),
                        Err(err) => {
                            con = None;
                            backplane.set_side(Side::Publisher, false);
                            reconnect.failed(&err, shutdown);
                        }
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let batch = take_batch(first, outgoing, backplane);
        if !backplane.is_up() {
            // The subscriber is down: Redis would not bring these back to our members.
            deliver_locally(batch, events);
            continue;
        }
        // A failed write on a connection Redis closed since its last use sent nothing, so
        // the batch is retried once on a fresh connection before the link counts as down.
        let result = publish_batch(connection, &batch).or_else(|_| {
            let mut fresh = connect(client)?;
            publish_batch(&mut fresh, &batch)?;
            *connection = fresh;
            Ok(())
        });
        match result {
            Ok(()) => {
                last_reply = Instant::now();
                backplane.count_published(batch.len());
            }
            Err(err) => {
                con = None;
                backplane.set_side(Side::Publisher, false);
                // Some of the batch may have reached Redis before the failure; those come back
                // through the subscriber as well, so a member may see them twice. Losing them
                // instead would be worse.
                deliver_locally(batch, events);
                reconnect.failed(&err, shutdown);
            }
        }
    }
    backplane.set_side(Side::Publisher, false);
}

/// One round trip: every message of the batch as a pipelined `PUBLISH`.
fn publish_batch(con: &mut Connection, batch: &[Outgoing]) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    for message in batch {
        pipe.cmd("PUBLISH")
            .arg(backplane::room_channel(&message.room))
            .arg(backplane::encode(message.kind, &message.payload))
            .ignore();
    }
    pipe.exec(con)
}

/// The first message plus whatever else is queued, up to the pipeline's bounds.
fn take_batch(
    first: Outgoing,
    outgoing: &Receiver<Outgoing>,
    backplane: &Backplane,
) -> Vec<Outgoing> {
    backplane.dequeued(&first);
    let mut bytes = first.payload.len();
    let mut batch = vec![first];
    while batch.len() < MAX_PIPELINE && bytes < MAX_PIPELINE_BYTES {
        let Ok(message) = outgoing.try_recv() else {
            break;
        };
        backplane.dequeued(&message);
        bytes += message.payload.len();
        batch.push(message);
    }
    batch
}

/// Hands messages Redis will not relay for us to the local broadcaster.
fn deliver_locally(messages: impl IntoIterator<Item = Outgoing>, events: &Events) {
    for message in messages {
        let _ = events.send_message(message.room, message.kind, message.payload);
    }
}

/// The subscriber: every room message of every instance, in Redis's order, into the
/// broadcaster's channel.
fn subscribe(client: &Client, backplane: &Backplane, events: &Events, shutdown: &Shutdown) {
    let mut reconnect = Backoff::new("subscriber");
    while !shutdown.is_triggered() {
        let result = connect(client).and_then(|mut con| {
            let mut pubsub = con.as_pubsub();
            pubsub.set_read_timeout(Some(POLL))?;
            pubsub.psubscribe(format!("{}*", backplane::ROOM_CHANNEL_PREFIX))?;
            backplane.set_side(Side::Subscriber, true);
            reconnect.succeeded();
            listen(&mut pubsub, backplane, events, shutdown)
        });
        backplane.set_side(Side::Subscriber, false);
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
    shutdown: &Shutdown,
) -> RedisResult<()> {
    let mut last_heard = Instant::now();
    let mut last_ping = Instant::now();
    while !shutdown.is_triggered() {
        match pubsub.get_message() {
            Ok(message) => {
                last_heard = Instant::now();
                if !forward(&message, backplane, events) {
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
                Ok(_) => last_heard = Instant::now(),
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

/// One message from Redis into the broadcaster's channel, or counted as malformed. Returns
/// false once the broadcaster has stopped.
fn forward(message: &redis::Msg, backplane: &Backplane, events: &Events) -> bool {
    backplane.received.fetch_add(1, Ordering::Relaxed);
    let room = backplane::room_of_channel(message.get_channel_name());
    let payload: Vec<u8> = message.get_payload().unwrap_or_default();
    let Some((room, (kind, payload))) = room.zip(backplane::decode(payload)) else {
        backplane.count_drop(Dropped::Malformed);
        return true;
    };
    events.send_message(room.into(), kind, payload).is_ok()
}

/// The presence heartbeat: publish this instance's counts, read everyone else's.
fn presence(client: &Client, backplane: &Backplane, hub: &Hub, shutdown: &Shutdown) {
    let key = format!("{INSTANCE_KEY_PREFIX}{}", backplane.instance);
    let mut con: Option<Connection> = None;
    loop {
        if con.is_none() {
            con = connect(client).ok();
        }
        if let Some(connection) = con.as_mut() {
            if let Err(err) = heartbeat(connection, &key, backplane, hub) {
                debug!("presence heartbeat failed: {err}");
                con = None;
            }
        }
        if con.is_none() {
            // Without Redis the other instances cannot be seen; old counts would only mislead.
            backplane.set_remote_rooms(0, HashMap::new());
        }
        if !wait(shutdown, backplane.heartbeat) {
            break;
        }
    }
    // Leaving the cluster: our clients stop counting at once rather than after the TTL.
    if let Some(connection) = con.as_mut() {
        let _ = redis::cmd("DEL").arg(&key).exec(connection);
    }
}

fn heartbeat(con: &mut Connection, key: &str, backplane: &Backplane, hub: &Hub) -> RedisResult<()> {
    let ttl_ms = u64::try_from(backplane.presence_ttl.as_millis()).unwrap_or(u64::MAX);
    let mut pipe = redis::pipe();
    pipe.atomic().cmd("DEL").arg(key).ignore();
    let hset = pipe.cmd("HSET").arg(key).arg(ALIVE_FIELD).arg(1);
    for (room, clients) in hub.rooms() {
        hset.arg(room).arg(clients);
    }
    hset.ignore();
    pipe.cmd("PEXPIRE").arg(key).arg(ttl_ms).ignore();
    pipe.exec(con)?;

    let mut rooms: HashMap<String, usize> = HashMap::new();
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
            let counts: HashMap<String, usize> = redis::cmd("HGETALL").arg(other).query(con)?;
            // SCAN may return a key twice; an expired one comes back empty.
            if counts.contains_key(ALIVE_FIELD) {
                instances += 1;
            }
            for (room, clients) in counts {
                if is_valid_room_name(&room) {
                    *rooms.entry(room).or_default() += clients;
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

    fn failed(&mut self, err: &redis::RedisError, shutdown: &Shutdown) {
        if self.pause == BACKOFF_MIN {
            warn!("redis {}: {err}; reconnecting with backoff", self.side);
        } else {
            debug!(
                "redis {}: {err}; next attempt in {:?}",
                self.side, self.pause
            );
        }
        wait(shutdown, self.pause);
        self.pause = (self.pause * 2).min(BACKOFF_MAX);
    }

    fn succeeded(&mut self) {
        self.pause = BACKOFF_MIN;
    }
}
