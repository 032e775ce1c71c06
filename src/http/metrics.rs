//! `GET /metrics`: the server's counters in the Prometheus text exposition format 0.0.4.
//!
//! Rendered by hand: the format is a few lines per metric (`# HELP`, `# TYPE`, samples), and a
//! metrics crate would be the largest dependency in the tree.

use std::fmt::Write;
use std::fs;
use std::sync::atomic::Ordering;

use crate::shared::Shared;
use crate::stats::{Eviction, Refusal};

/// Renders every metric. Each value is read once, so the page is a consistent-enough
/// snapshot for dashboards (counters are independent; exact cross-counter consistency is not
/// promised by Prometheus either).
pub(crate) fn render(shared: &Shared) -> String {
    let stats = &shared.stats;
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let mut out = String::with_capacity(4096);
    // Samples carry at most one label, `reason`, whose values are fixed identifiers (no
    // escaping needed).
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(Option<&str>, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (reason, value) in samples {
            match reason {
                Some(reason) => writeln!(out, "{name}{{reason=\"{reason}\"}} {value}"),
                None => writeln!(out, "{name} {value}"),
            }
            .expect("writing to a String cannot fail");
        }
    };

    metric(
        "roomcast_connections",
        "gauge",
        "WebSocket clients connected now.",
        &[(None, shared.hub.client_count() as u64)],
    );
    metric(
        "roomcast_connections_accepted_total",
        "counter",
        "TCP connections accepted, whatever became of them.",
        &[(None, load(&stats.connections_accepted))],
    );
    let refusals: Vec<_> = Refusal::ALL
        .iter()
        .map(|r| (Some(r.as_str()), stats.refusals(*r)))
        .collect();
    metric(
        "roomcast_connections_refused_total",
        "counter",
        "Connections answered 503 before any thread was spawned, by reason.",
        &refusals,
    );
    metric(
        "roomcast_rooms",
        "gauge",
        "Rooms with at least one client.",
        &[(None, shared.hub.room_count() as u64)],
    );
    metric(
        "roomcast_messages_received_total",
        "counter",
        "Messages received from WebSocket clients.",
        &[(None, load(&stats.messages_received))],
    );
    metric(
        "roomcast_messages_published_total",
        "counter",
        "Messages published by a backend through the HTTP API.",
        &[(None, load(&stats.messages_published))],
    );
    metric(
        "roomcast_messages_relayed_total",
        "counter",
        "Messages the broadcaster relayed to a room (once per message).",
        &[(None, load(&stats.messages_relayed))],
    );
    metric(
        "roomcast_messages_delivered_total",
        "counter",
        "Messages queued to receivers (once per receiver).",
        &[(None, load(&stats.messages_delivered))],
    );
    metric(
        "roomcast_bytes_sent_total",
        "counter",
        "Bytes written to WebSocket clients.",
        &[(None, load(&stats.bytes_sent))],
    );
    let evictions: Vec<_> = Eviction::ALL
        .iter()
        .map(|e| (Some(e.as_str()), stats.evictions(*e)))
        .collect();
    metric(
        "roomcast_evictions_total",
        "counter",
        "Clients the server removed, by reason.",
        &evictions,
    );
    metric(
        "roomcast_v1_clients",
        "gauge",
        "Connected clients speaking roomcast.v1.",
        &[(None, shared.hub.v1_client_count() as u64)],
    );
    metric(
        "roomcast_v1_errors_sent_total",
        "counter",
        "error frames sent to v1 clients (bad requests, missing rights).",
        &[(None, load(&stats.v1_errors_sent))],
    );
    let refusals: Vec<_> = stats
        .auth_refused
        .lock()
        .iter()
        .map(|(reason, count)| (Some(*reason), *count))
        .collect();
    if !refusals.is_empty() {
        metric(
            "roomcast_upgrades_refused_total",
            "counter",
            "WebSocket upgrades refused for their join token, a ban or the per-user cap, by reason.",
            &refusals,
        );
    }
    metric(
        "roomcast_reactions_total",
        "counter",
        "Reaction taps counted into a room's totals.",
        &[(None, load(&stats.reactions_counted))],
    );
    metric(
        "roomcast_reactions_dropped_total",
        "counter",
        "Reaction taps dropped, by reason: over the user's reaction bucket, a key --reaction-keys does not allow, a room's 65th key.",
        &[
            (Some("rate"), load(&stats.reactions_dropped_rate)),
            (Some("key"), load(&stats.reactions_dropped_key)),
            (Some("too_many_keys"), load(&stats.reactions_dropped_full)),
        ],
    );
    metric(
        "roomcast_live_frames_total",
        "counter",
        "presence and reactions frames sent, once per room and send (not per member).",
        &[
            (Some("presence"), load(&stats.presence_frames)),
            (Some("reactions"), load(&stats.reaction_frames)),
        ],
    );
    metric(
        "roomcast_resumes_total",
        "counter",
        "v1 joins with since and epoch, by whether they recovered every missed message.",
        &[
            (Some("recovered"), load(&stats.resumes_recovered)),
            (Some("not_recovered"), load(&stats.resumes_failed)),
        ],
    );
    metric(
        "roomcast_history_bytes",
        "gauge",
        "Bytes all rooms' retained messages hold (bounded by --history-budget).",
        &[(None, shared.room_states.history_bytes() as u64)],
    );
    metric(
        "roomcast_histories_given_up_total",
        "counter",
        "Rooms that gave their history up to --history-budget (and started a new epoch).",
        &[(None, load(&stats.histories_given_up))],
    );
    metric(
        "roomcast_room_snapshots_total",
        "counter",
        "With --redis: room snapshots joins asked Redis for (reason=requested), and those not in time (reason=missed: answered from this instance's state).",
        &[
            (Some("requested"), load(&stats.snapshots_requested)),
            (Some("missed"), load(&stats.snapshots_missed)),
        ],
    );
    metric(
        "roomcast_rewelcomes_total",
        "counter",
        "With --redis: v1 clients sent a new welcome because their room's epoch changed under them (Redis came back, or started empty).",
        &[(None, load(&stats.rewelcomes))],
    );
    metric(
        "roomcast_redis_script_failures_total",
        "counter",
        "With --redis: events the sequencing script could not run (a room key of another type in Redis); delivered on this instance only.",
        &[(
            None,
            shared
                .backplane
                .as_ref()
                .map_or(0, |b| b.script_failures.load(Ordering::Relaxed)),
        )],
    );
    metric(
        "roomcast_redis_unsequenced_total",
        "counter",
        "With --redis: messages published to Redis outside roomcast's sequence (raw PUBLISH): relayed to plain members only.",
        &[(
            None,
            shared
                .backplane
                .as_ref()
                .map_or(0, |b| b.unsequenced.load(Ordering::Relaxed)),
        )],
    );
    metric(
        "roomcast_room_states",
        "gauge",
        "Rooms with state (epoch and seq), members or not (see --room-ttl).",
        &[(None, shared.room_states.len() as u64)],
    );
    metric(
        "roomcast_bans",
        "gauge",
        "Bans held (see POST /api/rooms/<room>/disconnect).",
        &[(None, shared.users.ban_count() as u64)],
    );
    metric(
        "roomcast_broadcast_queue_depth",
        "gauge",
        "Messages waiting for the broadcaster.",
        &[(None, shared.events.len() as u64)],
    );
    metric(
        "roomcast_broadcast_queue_bytes",
        "gauge",
        "Payload bytes of the messages waiting for the broadcaster (bounded; see the README's Limits).",
        &[(None, shared.events.bytes_in_flight() as u64)],
    );
    metric(
        "roomcast_threads",
        "gauge",
        "Threads this server runs: one per connection, those waiting for the next connection, the acceptor and the broadcaster (and 3 for Redis).",
        &[(
            None,
            (stats.threads() + stats.idle_workers.load(Ordering::SeqCst) + 2) as u64
                + if shared.backplane.is_some() { 3 } else { 0 },
        )],
    );
    let memory = crate::capacity::memory_budget(&shared.config);
    metric(
        "roomcast_memory_per_client_budget_bytes",
        "gauge",
        "Memory the capacity preflight assumes one client costs at worst: full outbox, messages in flight, buffers, stack, allocator overhead.",
        &[(None, memory.per_client())],
    );
    metric(
        "roomcast_memory_queues_budget_bytes",
        "gauge",
        "Memory the capacity preflight sets aside once for the shared queues at worst (event channel, gathered chunks, Redis publish queue).",
        &[(None, memory.shared())],
    );
    if let Some(backplane) = &shared.backplane {
        metric(
            "roomcast_redis_up",
            "gauge",
            "1 when messages go through Redis, 0 when degraded (relaying to local clients only).",
            &[(None, u64::from(backplane.is_up()))],
        );
        metric(
            "roomcast_redis_outages_total",
            "counter",
            "Times the Redis link went down.",
            &[(None, load(&backplane.outages))],
        );
        metric(
            "roomcast_redis_published_total",
            "counter",
            "Messages this instance published to Redis.",
            &[(None, load(&backplane.published))],
        );
        metric(
            "roomcast_redis_received_total",
            "counter",
            "Messages received from Redis, from every instance.",
            &[(None, load(&backplane.received))],
        );
        metric(
            "roomcast_redis_dropped_total",
            "counter",
            "Messages dropped on the Redis path, by reason.",
            &[
                (Some("queue_full"), load(&backplane.dropped_queue_full)),
                (Some("malformed"), load(&backplane.dropped_malformed)),
                (Some("duplicate"), load(&backplane.dropped_duplicate)),
                (Some("too_large"), load(&backplane.dropped_too_large)),
            ],
        );
        metric(
            "roomcast_redis_publish_queue_depth",
            "gauge",
            "Messages waiting to be published to Redis.",
            &[(None, backplane.queue_depth() as u64)],
        );
        let rooms = shared.rooms();
        metric(
            "roomcast_cluster_connections",
            "gauge",
            "WebSocket clients across every instance (others as of their last heartbeat).",
            &[(None, rooms.iter().map(|(_, n)| *n as u64).sum())],
        );
        metric(
            "roomcast_cluster_rooms",
            "gauge",
            "Rooms with at least one client on any instance.",
            &[(None, rooms.len() as u64)],
        );
        metric(
            "roomcast_cluster_instances",
            "gauge",
            "Instances seen at the last heartbeat, this one included.",
            &[(None, backplane.instances() as u64)],
        );
    }
    if let Some(start) = process_start_time() {
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
            &[(None, start)],
        );
    }
    out
}

/// The process's start time in seconds since the Unix epoch: boot time (`btime` in
/// `/proc/stat`) plus the process's start in clock ticks after boot (`/proc/self/stat`).
fn process_start_time() -> Option<u64> {
    let boot: u64 = fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // Field 22, counted after the parenthesised command name (which may contain spaces).
    let ticks: u64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&t| t > 0)?;
    Some(boot + ticks / per_second)
}
