//! The server and its acceptor: bind, size the capacity, accept, refuse politely when full, and
//! give each connection a small-stack thread of its own (see `workers`). Also the orderly
//! shutdown: drain (keep accepting, admit no new clients) while the broadcaster closes every
//! client, then stop accepting and join every thread.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown as Both, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};
use parking_lot::Mutex;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::backplane::{Backplane, Outgoing};
use crate::capacity;
use crate::config::Config;
use crate::error::Error;
use crate::http::Response;
use crate::relay::broadcaster::{self, Broadcaster, Events, EVENT_QUEUE_CAPACITY};
use crate::relay::budget::EVENT_QUEUE_BYTES;
use crate::relay::connection::{self, RETRY_AFTER_SECS};
use crate::relay::hub::Hub;
use crate::shared::Shared;
use crate::shutdown::Shutdown;
use crate::stats::{Refusal, Stats};
use crate::supervisor::Supervisor;
use crate::workers::Workers;

/// Listen backlog asked for; the kernel caps it at `net.core.somaxconn`. std's `bind` uses
/// 128, which a burst of thousands of connects per second overflows (clients see resets).
const LISTEN_BACKLOG: i32 = 4096;
/// First and longest pause after `accept` fails for lack of resources (`EMFILE`, `ENFILE`,
/// `ENOBUFS`, `ENOMEM`) or a thread cannot be spawned (see `Backoff`).
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often the drain loop checks whether the broadcaster has finished, between accepts.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How long a refused socket stays half-open for the client's request to arrive.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);
/// Refused sockets lingering at once, at most. Each holds a descriptor, so the bound must stay
/// well inside `capacity`'s descriptor reserve.
const MAX_LINGERING_REFUSALS: usize = 32;

/// What the server did, returned by `run` and logged at shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub connections_accepted: u64,
    pub clients_served: u64,
    pub messages_relayed: u64,
    pub messages_delivered: u64,
}

/// A bound, configured server, ready to `run`.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    events: Receiver<broadcaster::Event>,
    /// The publish queue's receiving end, for the Redis publisher thread (with `--redis`).
    outgoing: Option<Receiver<Outgoing>>,
    max_clients: usize,
}

impl Server {
    /// Takes a bound listener (tests bind `127.0.0.1:0`), sizes its capacity, and logs it.
    pub fn new(listener: TcpListener, config: Config) -> Result<Server, Error> {
        config.validate()?;
        let local_addr = listener
            .local_addr()
            .map_err(Error::io("reading the listener's address"))?;
        widen_backlog(&listener);

        let capacity = capacity::preflight(&config);
        let derived = usize::try_from(capacity.max_clients()).unwrap_or(usize::MAX);
        let max_clients = match config.max_clients {
            Some(n) if n > derived => {
                warn!("--max-clients {n} is above what this machine holds ({capacity}); beyond that, connections are refused when a thread cannot be spawned");
                n
            }
            Some(n) => n,
            None => derived,
        };
        info!("capacity: {capacity}");
        info!(
            "limits: max clients {max_clients}, per IP {}, message {} B, rate {}/s burst {}, outbox {} B, slow {:?}, handshake {:?}, ping {:?}, idle {:?}",
            match config.max_clients_per_ip { 0 => "off".to_string(), n => n.to_string() },
            config.max_message_bytes,
            config.rate,
            config.burst,
            config.effective_outbox_bytes(),
            config.slow_timeout,
            config.handshake_timeout,
            config.ping_interval,
            config.idle_timeout,
        );
        match config.api_token {
            Some(_) => {
                info!("backend API on: POST /api/rooms/<room>/messages and /disconnect with the bearer token")
            }
            None => info!("backend API off (publish, disconnect): set --api-token-file, ROOMCAST_API_TOKEN or --api-token to enable it"),
        }
        match config.token_secrets.len() {
            0 => info!("open mode: anyone may join any room (set ROOMCAST_TOKEN_SECRET to require join tokens)"),
            1 => info!("join tokens required (HS256)"),
            _ => info!("join tokens required (HS256; the previous secret is accepted too)"),
        }
        if config.effective_outbox_bytes() > config.outbox_bytes {
            info!(
                "outbox raised to {} B: it must hold 2 of the largest frames a message can become (its v1 frame) and 4 KiB for control frames",
                config.effective_outbox_bytes()
            );
        }

        let (backplane, outgoing) = match &config.redis {
            Some(url) => {
                let instance = instance_name(local_addr);
                info!(
                    "redis backplane: {}, this instance is {instance:?}",
                    crate::config::redact_url(url)
                );
                if config.max_message_bytes > REDIS_COMFORTABLE_MESSAGE_BYTES {
                    warn!("--max-message-bytes is over 8 MiB: raise Redis's `client-output-buffer-limit pubsub` or Redis may drop the subscriber");
                }
                let (backplane, outgoing) =
                    Backplane::new(instance, config.max_message_bytes, config.redis_ttl);
                (Some(Arc::new(backplane)), Some(outgoing))
            }
            None => (None, None),
        };
        let bytes = EVENT_QUEUE_BYTES.max(config.max_message_bytes);
        let (sender, events) = Events::channel(EVENT_QUEUE_CAPACITY, bytes);
        let draining = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            config: Arc::new(config),
            hub: Arc::new(Hub::new()),
            stats: Arc::new(Stats::default()),
            events: sender,
            per_ip: Mutex::new(HashMap::new()),
            draining: draining.clone(),
            backplane,
            supervisor: Supervisor::new(draining),
            room_states: Arc::default(),
            users: Arc::new(crate::relay::users::Users::new()),
        });
        Ok(Server {
            listener,
            local_addr,
            shared,
            events,
            outgoing,
            max_clients,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The clients the acceptor admits at once.
    pub fn max_clients(&self) -> usize {
        self.max_clients
    }

    /// Live counters, readable while the server runs.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// The room map, readable while the server runs.
    pub fn hub(&self) -> Arc<Hub> {
        self.shared.hub.clone()
    }

    /// Serves until `shutdown` is triggered; returns once every thread it started has been
    /// joined and the listening socket is closed.
    pub fn run(self, shutdown: &Shutdown) -> Result<Summary, Error> {
        let Server {
            listener,
            local_addr,
            shared,
            events,
            outgoing,
            max_clients,
        } = self;
        info!("listening on ws://{local_addr}/ws/<room>");
        let redis_threads = start_redis_link(&shared, outgoing, shutdown)?;

        let broadcaster = {
            let (hub, stats, config, room_states, draining, backplane) = (
                shared.hub.clone(),
                shared.stats.clone(),
                shared.config.clone(),
                shared.room_states.clone(),
                shared.draining.clone(),
                shared.backplane.clone(),
            );
            let watch = shared.supervisor.watch("broadcaster", shutdown.clone());
            let budget = CloseBudgetOnExit(shared.events.clone());
            let stop = shutdown.clone();
            let spawned = thread::Builder::new()
                .name("broadcaster".into())
                .spawn(move || {
                    // Dropped in reverse order, however the thread ends: the budget closes
                    // (waiting senders give up), then the watch reports a panic.
                    let (_watch, _budget) = (watch, budget);
                    Broadcaster::new(hub, stats, config, room_states, draining, backplane)
                        .run(events, &stop)
                })
                .map_err(Error::io("spawning the broadcaster thread"));
            match spawned {
                Ok(thread) => thread,
                Err(err) => {
                    // The Redis threads are running: stop them before giving up.
                    shutdown.trigger();
                    for thread in redis_threads {
                        let _ = thread.join();
                    }
                    return Err(err);
                }
            }
        };

        shutdown.register_listener(local_addr);
        let (finished_tx, finished_rx) = crossbeam_channel::unbounded();
        let mut acceptor = Acceptor {
            shared: shared.clone(),
            max_clients,
            connections: HashMap::new(),
            workers: Workers::new(shared.stats.clone()),
            refused: VecDeque::new(),
            refusal_log: RefusalLog::default(),
            backoff: Backoff::default(),
            finished_tx,
            finished_rx,
            next_id: AtomicU64::new(1),
        };
        // Checked after registering: a trigger that came before the registration is seen here,
        // one that comes after will connect to the listener and wake `accept`.
        while !shutdown.is_triggered() {
            // Every accepted connection is handled, even one that arrives with the shutdown:
            // it may be a real client. The shutdown handle's own wake-up connection closes at
            // once, so its thread reads end-of-file and exits.
            let accepted = listener.accept();
            acceptor.handle(accepted);
        }

        // Drain: the broadcaster is now closing every client. Keep accepting meanwhile, so a
        // load balancer's health check reads "503 draining" and a new client gets a 503 with
        // Retry-After, rather than both meeting a refused connection.
        info!("draining: admitting no new clients, closing existing ones");
        let is_nonblocking = listener.set_nonblocking(true).is_ok();
        if is_nonblocking {
            acceptor.drain(&listener, || broadcaster.is_finished());
        }
        let broadcaster_failed = broadcaster.join().is_err();
        if broadcaster_failed {
            // The broadcaster died without closing anyone: do its last job from here, still
            // answering "503" meanwhile. 1011: the server hit a condition it cannot handle.
            let hub = shared.hub.clone();
            let grace = shared.config.shutdown_grace;
            let close = move || {
                broadcaster::close_everyone(&hub, CloseCode::Error, "internal error", grace, || {})
            };
            match thread::Builder::new()
                .name("closer".into())
                .spawn(close.clone())
            {
                Ok(closer) => {
                    if is_nonblocking {
                        acceptor.drain(&listener, || closer.is_finished());
                    }
                    let _ = closer.join();
                }
                // No thread to spare: close them from here, without answering meanwhile.
                Err(_) => close(),
            }
        }
        shutdown.unregister_listener(local_addr);
        drop(listener);
        for (_, socket) in acceptor.refused.drain(..) {
            drain_and_close(socket);
        }
        info!("stopped accepting");

        for thread in redis_threads {
            // A panic was reported by the thread's watch as it happened.
            let _ = thread.join();
        }
        // The broadcaster has closed and cut every upgraded client. Connections still in their
        // handshake are cut here, so none waits out its handshake deadline.
        for socket in acceptor.connections.values().filter_map(Weak::upgrade) {
            let _ = socket.shutdown(Both::Both);
        }
        let panicked = acceptor.workers.join_all();
        if panicked > 0 {
            error!("{panicked} connection threads panicked");
        }

        let stats = &shared.stats;
        let summary = Summary {
            connections_accepted: stats.connections_accepted.load(Ordering::Relaxed),
            clients_served: stats.clients_served.load(Ordering::Relaxed),
            messages_relayed: stats.messages_relayed.load(Ordering::Relaxed),
            messages_delivered: stats.messages_delivered.load(Ordering::Relaxed),
        };
        info!(
            "shut down: {} connections accepted, {} clients served, {} messages relayed, {} deliveries",
            summary.connections_accepted, summary.clients_served, summary.messages_relayed, summary.messages_delivered
        );
        match shared.supervisor.failure() {
            Some(thread) => Err(Error::Failed { thread }),
            None => Ok(summary),
        }
    }
}

/// Closes the event channel's byte budget when dropped: held by the broadcaster thread, since
/// only the broadcaster gives bytes back, so senders waiting on the budget must not outlive it.
struct CloseBudgetOnExit(Events);

impl Drop for CloseBudgetOnExit {
    fn drop(&mut self) {
        self.0.close_budget();
    }
}

/// Above this message size Redis's default pub/sub output buffer limits (8 MiB soft) come close.
const REDIS_COMFORTABLE_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// A name for this instance in Redis that no other instance, here or on another host, shares:
/// its address, process id and start time.
fn instance_name(local_addr: SocketAddr) -> String {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos());
    format!("{local_addr}-{}-{started:x}", std::process::id())
}

/// Starts the threads that talk to Redis, with `--redis`.
#[cfg(feature = "redis")]
fn start_redis_link(
    shared: &Shared,
    outgoing: Option<Receiver<Outgoing>>,
    shutdown: &Shutdown,
) -> Result<Vec<JoinHandle<()>>, Error> {
    match (&shared.config.redis, &shared.backplane, outgoing) {
        (Some(_), Some(backplane), Some(outgoing)) => crate::backplane::redis_link::start(
            &shared.config,
            backplane.clone(),
            outgoing,
            shared.events.clone(),
            crate::backplane::cluster::Local {
                hub: shared.hub.clone(),
                users: shared.users.clone(),
                events: shared.events.clone(),
                room_ttl: shared.config.room_ttl,
            },
            &shared.supervisor,
            shutdown,
        ),
        _ => Ok(Vec::new()),
    }
}

/// Without the `redis` feature `Config::validate` refuses `--redis`, so there is nothing to start.
#[cfg(not(feature = "redis"))]
fn start_redis_link(
    _shared: &Shared,
    _outgoing: Option<Receiver<Outgoing>>,
    _shutdown: &Shutdown,
) -> Result<Vec<JoinHandle<()>>, Error> {
    Ok(Vec::new())
}

/// The accept loop's own state; lives on the thread that called `run`.
struct Acceptor {
    shared: Arc<Shared>,
    max_clients: usize,
    /// A weak handle to the socket of every connection being served, so shutdown can cut
    /// connections still in their handshake. Weak, so the descriptor closes as soon as the
    /// connection thread is done with it.
    connections: HashMap<u64, Weak<TcpStream>>,
    /// The connection threads, busy or waiting for a connection.
    workers: Workers,
    /// Refused sockets, write side already shut after the 503, kept open for
    /// `REFUSAL_LINGER` so the client's request can arrive and be read. Closing at once would
    /// often close with the request unread, and the kernel answers that with an RST that a
    /// client still writing its request sees as "connection reset" instead of our 503.
    refused: VecDeque<(Instant, TcpStream)>,
    /// One warning per episode of refusals, not one per refused connection.
    refusal_log: RefusalLog,
    /// The pause after resource exhaustion (see `Backoff`).
    backoff: Backoff,
    /// Connection ids of ended connections: each connection's `Slot` sends on drop, the
    /// acceptor reaps before each accept. Unbounded, but it never holds more ids than there
    /// were connections since the last accept.
    finished_tx: Sender<u64>,
    finished_rx: Receiver<u64>,
    next_id: AtomicU64,
}

/// Owned by a connection's job; its drop is the connection's last act, whatever way it ends
/// (return or panic): it releases the connection's slot and tells the acceptor it is over.
struct Slot {
    shared: Arc<Shared>,
    id: u64,
    ip: IpAddr,
    finished: Sender<u64>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        release_ip(&self.shared, self.ip);
        self.shared
            .stats
            .connection_threads
            .fetch_sub(1, Ordering::SeqCst);
        let _ = self.finished.send(self.id);
    }
}

impl Acceptor {
    /// Deals with one `accept` result: admit the connection, or back off from a failure that
    /// would repeat at once.
    fn handle(&mut self, accepted: io::Result<(TcpStream, SocketAddr)>) {
        self.reap();
        self.close_lingering_refusals(Instant::now());
        match accepted {
            Ok((socket, peer)) => match self.admit(socket, peer) {
                Ok(()) => self.backoff.reset(),
                Err(err) => self
                    .backoff
                    .wait(&format!("cannot spawn a connection thread: {err}")),
            },
            Err(err) if is_resource_exhaustion(&err) => self.backoff.wait(&format!(
                "accept failed: {err} ({} connections open)",
                self.shared.stats.threads()
            )),
            // The peer gave up between SYN and accept, or a signal interrupted us.
            Err(err) => debug!("accept: {err}"),
        }
    }

    /// Accepts (without blocking) and handles connections until `is_done`, polling every
    /// `DRAIN_POLL`. The listener must be non-blocking.
    fn drain(&mut self, listener: &TcpListener, is_done: impl Fn() -> bool) {
        while !is_done() {
            if is_readable(listener, DRAIN_POLL) {
                match listener.accept() {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    accepted => self.handle(accepted),
                }
            }
        }
    }

    /// Admits a connection (spawns its thread) or refuses it with `503`. Returns an error only
    /// when the OS refused the thread, so the caller can back off.
    fn admit(&mut self, socket: TcpStream, peer: SocketAddr) -> io::Result<()> {
        let shared = self.shared.clone();
        shared
            .stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let refusal = if shared.stats.threads() >= self.max_clients {
            Some(Refusal::Capacity)
        } else if !claim_ip(&shared, peer.ip()) {
            Some(Refusal::PerIp)
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.refuse(socket, peer, reason);
            return Ok(());
        }
        // Small frames must not wait for the previous one's ACK (Nagle).
        let _ = socket.set_nodelay(true);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .connection_threads
            .fetch_add(1, Ordering::SeqCst);
        let slot = Slot {
            shared: shared.clone(),
            id,
            ip: peer.ip(),
            finished: self.finished_tx.clone(),
        };
        let socket = Arc::new(socket);
        self.connections.insert(id, Arc::downgrade(&socket));
        let thread_socket = socket.clone();
        let served = self.workers.run(Box::new(move || {
            let slot = slot;
            connection::serve(&slot.shared, thread_socket, peer, id);
        }));
        if let Err(err) = served {
            // The job, and with it the slot, was dropped: counters are already released.
            self.connections.remove(&id);
            match Arc::try_unwrap(socket) {
                Ok(socket) => self.refuse(socket, peer, Refusal::Spawn),
                Err(socket) => {
                    answer_503(&socket, Refusal::Spawn);
                    self.note_refusal(peer, Refusal::Spawn);
                }
            }
            return Err(err);
        }
        self.refusal_log.admitted();
        Ok(())
    }

    /// Answers `503` and lingers the socket (see `refused`).
    fn refuse(&mut self, socket: TcpStream, peer: SocketAddr, reason: Refusal) {
        answer_503(&socket, reason);
        self.note_refusal(peer, reason);
        self.linger(socket);
    }

    fn note_refusal(&mut self, peer: SocketAddr, reason: Refusal) {
        self.shared.stats.count_refusal(reason);
        debug!("refused {peer}: {}", reason.as_str());
        self.refusal_log.refused(reason, Instant::now());
    }

    fn linger(&mut self, socket: TcpStream) {
        if self.refused.len() >= MAX_LINGERING_REFUSALS {
            if let Some((_, oldest)) = self.refused.pop_front() {
                drain_and_close(oldest);
            }
        }
        self.refused.push_back((Instant::now(), socket));
    }

    /// Closes refused sockets whose linger time is over.
    fn close_lingering_refusals(&mut self, now: Instant) {
        while self
            .refused
            .front()
            .is_some_and(|(since, _)| now.duration_since(*since) >= REFUSAL_LINGER)
        {
            if let Some((_, socket)) = self.refused.pop_front() {
                drain_and_close(socket);
            }
        }
    }

    /// Forgets the connections that have ended.
    fn reap(&mut self) {
        for id in self.finished_rx.try_iter() {
            self.connections.remove(&id);
        }
    }
}

fn claim_ip(shared: &Shared, ip: IpAddr) -> bool {
    let cap = shared.config.max_clients_per_ip;
    if cap == 0 {
        return true;
    }
    let mut per_ip = shared.per_ip.lock();
    let count = per_ip.entry(ip).or_insert(0);
    if *count >= cap {
        return false;
    }
    *count += 1;
    true
}

fn release_ip(shared: &Shared, ip: IpAddr) {
    if shared.config.max_clients_per_ip == 0 {
        return;
    }
    let mut per_ip = shared.per_ip.lock();
    if let Some(count) = per_ip.get_mut(&ip) {
        *count -= 1;
        if *count == 0 {
            per_ip.remove(&ip);
        }
    }
}

/// Answers `503` with `Retry-After` from the acceptor thread itself, without spawning, and
/// half-closes. The caller lingers the socket (see `Acceptor::refused`).
///
/// The socket is made non-blocking first: a fresh socket's send buffer is empty, so the
/// response fits, and the acceptor must never wait on a client.
fn answer_503(socket: &TcpStream, reason: Refusal) {
    let response = Response::status(503)
        .with_header("Retry-After", RETRY_AFTER_SECS.to_string())
        .with_body(format!("server full ({}); retry later\n", reason.as_str()));
    if socket.set_nonblocking(true).is_ok() {
        let _ = (&*socket).write_all(&response.to_bytes());
    }
    let _ = socket.shutdown(Both::Write);
}

/// Most bytes read from a refused socket before it is closed: a request head is at most
/// `http::MAX_HEAD_BYTES`, and a peer streaming more must not keep the acceptor reading.
const REFUSAL_DRAIN_BYTES: usize = 32 * 1024;

/// Reads (and discards) whatever has arrived, without blocking and up to
/// `REFUSAL_DRAIN_BYTES`, then closes.
fn drain_and_close(socket: TcpStream) {
    let mut sink = [0u8; 1024];
    let mut drained = 0;
    while drained < REFUSAL_DRAIN_BYTES {
        match (&socket).read(&mut sink) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// How often a long episode of refusals is summarised while it lasts.
const REFUSAL_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Logs refusals by episode: a warning when refusing begins, a summary with the count every
/// `REFUSAL_REPORT_EVERY` while it goes on, and one line when a connection is admitted again.
/// A flood of connections at the limit is thus a handful of log lines, not one per connection
/// (each refused peer is still logged at debug).
#[derive(Debug, Default)]
struct RefusalLog {
    /// When the current episode began; `None` between episodes.
    since: Option<Instant>,
    /// Refusals since the last line logged, and in the whole episode.
    unreported: u64,
    total: u64,
    last_report: Option<Instant>,
}

impl RefusalLog {
    fn refused(&mut self, reason: Refusal, now: Instant) {
        self.total += 1;
        let Some(last_report) = self.last_report else {
            warn!(
                "refusing connections ({}): answering 503 until there is room again",
                reason.as_str()
            );
            self.since = Some(now);
            self.last_report = Some(now);
            return;
        };
        self.unreported += 1;
        if now.duration_since(last_report) >= REFUSAL_REPORT_EVERY {
            warn!(
                "still refusing connections: {} more refused in the last {:?} (last reason: {})",
                self.unreported,
                now.duration_since(last_report),
                reason.as_str()
            );
            self.unreported = 0;
            self.last_report = Some(now);
        }
    }

    fn admitted(&mut self) {
        if let Some(since) = self.since.take() {
            info!(
                "admitting connections again: {} refused in {:?}",
                self.total,
                since.elapsed()
            );
            *self = RefusalLog::default();
        }
    }
}

/// Pauses the accept loop after failures that repeat until something frees up, doubling
/// each time: prompt recovery when a descriptor or thread frees, no busy loop while none
/// does, and one warning per episode rather than one per failure.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn wait(&mut self, what: &str) {
        let pause = BACKOFF_MIN
            .saturating_mul(1 << self.failures.min(16))
            .min(BACKOFF_MAX);
        if self.failures == 0 {
            warn!("{what}; backing off (up to {BACKOFF_MAX:?} between attempts) until it clears");
        } else {
            debug!("{what}; backing off {pause:?}");
        }
        self.failures += 1;
        thread::sleep(pause);
    }

    fn reset(&mut self) {
        if self.failures > 0 {
            info!("accepting again after {} failed attempts", self.failures);
            self.failures = 0;
        }
    }
}

/// Errors after which `accept` will fail again immediately until something frees up.
fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Waits up to `timeout` for a connection to accept.
fn is_readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, owned by this frame, for the duration of the call.
    unsafe { libc::poll(&mut poll, 1, millis) > 0 }
}

/// Calling `listen` again on a listening socket only updates its backlog (Linux), so a
/// listener from `TcpListener::bind` can be widened in place.
fn widen_backlog(listener: &TcpListener) {
    // SAFETY: the fd is a valid listening socket owned by `listener` for this whole call.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        warn!(
            "cannot widen the listen backlog: {}",
            io::Error::last_os_error()
        );
    }
}

/// Runs a server on `listener` until `shutdown` is triggered.
pub fn run(listener: TcpListener, config: Config, shutdown: &Shutdown) -> Result<Summary, Error> {
    Server::new(listener, config)?.run(shutdown)
}
