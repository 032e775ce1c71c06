#!/usr/bin/env bash
# How much of roomcast's traffic one Redis carries, for the capacity model in the README
# ("Capacity model: a 1,000,000-viewer event"). Prints Markdown tables.
#
#   scripts/cluster/redis-bench.sh            # about a minute, both cores flat out
#
# 1. PUBLISH of a 300 B message (a 200 B chat message as instances publish it: the sequenced
#    header, the sender, the v1 stamp) to one room's channel, with 0 to 100 pattern
#    subscribers (what each instance holds: PSUBSCRIBE roomcast:room:*), and once with 30
#    plain channel subscribers (SUBSCRIBE, what a per-room subscription would be).
# 2. EVALSHA of a script doing what the sequencing script does per message (HINCRBY the
#    room's seq, RPUSH the entry to its history, LTRIM, PEXPIRE, PUBLISH), in batches of 1,
#    16 and 64 messages per call, with 3 and 30 pattern subscribers.
# 3. On a three-node Redis Cluster: that a room's keys and its shard channel
#    roomcast:room:{ROOM} share a slot, that the script may SPUBLISH to it (and may not to a
#    channel of another slot), and what PUBLISH (broadcast to every node) costs the cluster
#    against SPUBLISH (the owning shard only).
#
# Subscribers are bash coprocesses reading their socket into /dev/null with cat (a reader
# far cheaper than redis-cli's formatting, so Redis, not the readers, is what is measured).
# redis-benchmark plays three instances: three connections, each with a pipeline of 16
# PUBLISHes or one script call in flight (as roomcast's publisher sends a batch a round
# trip); one more row gives the script 16 connections with 4 calls in flight each, to show
# what Redis does to its subscribers when script batches pile up faster than it writes them
# out. The rate and Redis's CPU are taken over each run. Nothing is pinned: Redis, redis-benchmark, the readers and the
# kernel share this machine's cores, so a row whose Redis CPU is well under 1.0 s/s was
# limited by the machine rather than by Redis.
#
# Ports (override with the environment): ROOMCAST_REDIS_BENCH_PORT (6395) for the single
# Redis, and the three after it for the cluster's nodes.
set -euo pipefail
cd "$(dirname "$0")/../.."

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
need redis-server redis-server
need redis-benchmark redis-tools
install_needed

port=${ROOMCAST_REDIS_BENCH_PORT:-6395}
work="$PWD/target/cluster/redis-bench"
rm -rf "$work"
mkdir -p "$work"
ticks=$(getconf CLK_TCK)
# How long each measured run should take, in seconds: long enough that start-up and the
# readers' first wake-ups do not count, short enough that the whole script stays near a minute.
run_seconds=3
# A 200 B chat message as an instance publishes it: 17 B of origin and number, about 40 B of
# sender, the kind byte, the JSON string, and the v1 stamp ("V<epoch> <seq> <ts>\n").
payload=$(head -c 300 /dev/zero | tr '\0' x)

servers=()
readers=()
stop_readers() {
    local pid
    for pid in "${readers[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    readers=()
}
stop_all() {
    stop_readers
    local pid
    for pid in "${servers[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    servers=()
}
trap stop_all EXIT
trap 'exit 1' INT TERM

# start_redis PORT [redis-server flags...]: a Redis with nothing persisted, up before return.
start_redis() {
    local at=$1
    shift
    (cd "$work" && exec redis-server --port "$at" --bind 127.0.0.1 --save "" --appendonly no \
        --loglevel warning "$@" >"$work/redis-$at.log" 2>&1) &
    servers+=($!)
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$at" ping 2>/dev/null)" = PONG ] && return 0
        sleep 0.05
    done
    echo "redis-bench: redis-server did not start on port $at:" >&2
    cat "$work/redis-$at.log" >&2
    exit 1
}

# subscribe PORT COUNT COMMAND ARG: COUNT readers, each one connection that sends COMMAND ARG
# (inline protocol) and then reads everything into /dev/null; waits until Redis counts them.
subscribe() {
    local at=$1 count=$2 command=$3 arg=$4 i
    for ((i = 0; i < count; i++)); do
        (
            exec 3<>"/dev/tcp/127.0.0.1/$at"
            printf '%s %s\r\n' "$command" "$arg" >&3
            exec cat <&3 >/dev/null
        ) &
        readers+=($!)
    done
    for _ in $(seq 200); do
        [ "$(subscribers "$at")" -ge "$count" ] && return 0
        sleep 0.02
    done
    echo "redis-bench: only $(subscribers "$at") of $count subscribers on port $at" >&2
    exit 1
}

# subscribers PORT: connections in a subscribed state.
subscribers() {
    redis-cli -p "$1" client list type pubsub | grep -c . || true
}

# cpu PORT: the CPU seconds (user + system) the Redis on PORT has used.
cpu() {
    local pid
    pid=$(redis-cli -p "$1" info server | tr -d '\r' | awk -F: '$1 == "process_id" { print $2 }')
    awk -v hz="$ticks" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$pid/stat"
}

# counter PORT NAME: a counter from INFO.
counter() {
    redis-cli -p "$1" info stats | tr -d '\r' | awk -F: -v name="$2" '$1 == name { print $2 }'
}

# How many connections redis-benchmark opens, and how many commands each keeps in flight.
connections=3
in_flight=16
# rate PORT REQUESTS ARGS...: redis-benchmark's requests per second for REQUESTS commands.
rate() {
    local at=$1 requests=$2
    shift 2
    redis-benchmark -p "$at" --csv -c "$connections" -P "$in_flight" -n "$requests" "$@" |
        tail -n 1 | cut -d, -f2 | tr -d '"'
}

rows=()
# measure LABEL SUBSCRIBERS MESSAGES_PER_CALL SHOWN COMMAND...: SHOWN is COMMAND as the table
# shows it, without the payloads: a short run to size the measured one
# to about run_seconds, then the measured run on the single Redis, with the CPU Redis used,
# the bytes it wrote (every subscriber's copy) and whether every subscriber kept up.
measure() {
    local label=$1 subs=$2 batch=$3 shown=$4
    shift 4
    local probe requests cpu_before out_before started calls elapsed cpu_used out_bytes left
    echo "redis-bench: $label" >&2
    probe=$(rate "$port" 2000 "$@")
    requests=$(awk -v r="$probe" -v s="$run_seconds" 'BEGIN { n = int(r * s); print (n < 2000 ? 2000 : n) }')
    cpu_before=$(cpu "$port")
    out_before=$(counter "$port" total_net_output_bytes)
    started=$(date +%s.%N)
    calls=$(rate "$port" "$requests" "$@")
    elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
    cpu_used=$(awk -v a="$cpu_before" -v b="$(cpu "$port")" -v t="$elapsed" 'BEGIN { printf "%.2f", (b - a) / t }')
    out_bytes=$(($(counter "$port" total_net_output_bytes) - out_before))
    left=$(subscribers "$port")
    rows+=("$(awk -v label="$label" -v shown="$shown" -v subs="$subs" -v batch="$batch" -v calls="$calls" \
        -v cpu="$cpu_used" -v out="$out_bytes" -v t="$elapsed" -v left="$left" \
        -v connections="$connections" -v in_flight="$in_flight" 'BEGIN {
            messages = calls * batch
            printf "%s|%s|%d × %d|%.0f|%.0f|%.0f|%.1f|%s|%d of %d", label, shown, connections, in_flight,
                calls, messages, messages * subs, out / t / 1048576, cpu, left, subs
        }')")
}

start_redis "$port"

# 1. PUBLISH with pattern subscribers, and with channel subscribers.
for subs in 0 3 10 30 100; do
    subscribe "$port" "$subs" PSUBSCRIBE 'roomcast:room:*'
    measure "PUBLISH, $subs pattern subscribers" "$subs" 1 "PUBLISH roomcast:room:stage <300 B>" \
        PUBLISH roomcast:room:stage "$payload"
    stop_readers
done
subscribe "$port" 30 SUBSCRIBE roomcast:room:stage
measure "PUBLISH, 30 channel subscribers" 30 1 "PUBLISH roomcast:room:stage <300 B>" \
    PUBLISH roomcast:room:stage "$payload"
stop_readers

# 2. The sequencing script's work per message, in batches. KEYS: the room's state hash, its
# history list, the origin's last batch number; ARGV: the channel, then the messages.
script='
local now = redis.call("TIME")
local ts = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call("SET", KEYS[3], ts)
for i = 2, #ARGV do
    local seq = redis.call("HINCRBY", KEYS[1], "seq", 1)
    local entry = seq .. " " .. ts .. "\n" .. ARGV[i]
    redis.call("RPUSH", KEYS[2], entry)
    redis.call("LTRIM", KEYS[2], -50, -1)
    redis.call("PEXPIRE", KEYS[2], 600000)
    redis.call("PUBLISH", ARGV[1], "V1 " .. entry)
end
redis.call("PEXPIRE", KEYS[1], 600000)
return #ARGV - 1
'
sha=$(redis-cli -p "$port" script load "$script")
in_flight=1
for subs in 3 30; do
    subscribe "$port" "$subs" PSUBSCRIBE 'roomcast:room:*'
    for batch in 1 16 64; do
        messages=()
        for ((i = 0; i < batch; i++)); do messages+=("$payload"); done
        measure "sequencing script, $batch a call, $subs pattern subscribers" "$subs" "$batch" \
            "EVALSHA <script> 3 <state> <history> <origin> roomcast:room:stage <$batch × 300 B>" \
            EVALSHA "$sha" 3 'roomcast:v1:{stage}:state' 'roomcast:v1:{stage}:history' \
            roomcast:origin:bench roomcast:room:stage "${messages[@]}"
    done
    stop_readers
done
# Piled-up batches: Redis runs every call its connections have sent before it writes to the
# subscribers, and then writes each of them at most 64 KiB a pass of its event loop
# (NET_MAX_WRITES_PER_EVENT), so here each pass adds more to a subscriber's output buffer
# than it drains, until the buffer passes client-output-buffer-limit pubsub (32 MiB) and
# Redis closes the subscriber ("subscribers left").
connections=16
in_flight=4
subscribe "$port" 3 PSUBSCRIBE 'roomcast:room:*'
messages=()
for ((i = 0; i < 64; i++)); do messages+=("$payload"); done
measure "sequencing script, 64 a call, 3 pattern subscribers, piled up" 3 64 \
    "EVALSHA <script> 3 <state> <history> <origin> roomcast:room:stage <64 × 300 B>" \
    EVALSHA "$sha" 3 'roomcast:v1:{stage}:state' 'roomcast:v1:{stage}:history' \
    roomcast:origin:bench roomcast:room:stage "${messages[@]}"
stop_readers
connections=3
in_flight=16

markdown_table "run|command|connections × in flight|calls/s|messages/s|copies to subscribers/s|MiB/s to subscribers|Redis CPU s/s|subscribers left" "${rows[@]}"

# 3. A three-node Redis Cluster on loopback (no replicas).
nodes=($((port + 1)) $((port + 2)) $((port + 3)))
for node in "${nodes[@]}"; do
    start_redis "$node" --cluster-enabled yes --cluster-config-file "nodes-$node.conf" \
        --cluster-node-timeout 5000
done
redis-cli --cluster create "${nodes[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >"$work/cluster-create.log"
for _ in $(seq 200); do
    [ "$(redis-cli -p "${nodes[0]}" cluster info | tr -d '\r' | grep -c '^cluster_state:ok')" = 1 ] && break
    sleep 0.05
done
slot_of() { redis-cli -p "${nodes[0]}" cluster keyslot "$1"; }
# owner_of SLOT: the port of the node that owns SLOT, from CLUSTER NODES (fields 9 on are its
# slot ranges, "lo-hi" or a single slot).
owner_of() {
    redis-cli -p "${nodes[0]}" cluster nodes | awk -v slot="$1" '{
        for (i = 9; i <= NF; i++) {
            n = split($i, range, "-")
            if (slot >= range[1] + 0 && slot <= range[n] + 0) { split($2, address, "[:@]"); print address[2]; exit }
        }
    }'
}
echo
echo "Redis Cluster of three nodes (${nodes[*]}):"
state_slot=$(slot_of 'roomcast:v1:{stage}:state')
echo "- slot of roomcast:v1:{stage}:state $state_slot, of roomcast:v1:{stage}:history $(slot_of 'roomcast:v1:{stage}:history'), of the shard channel roomcast:room:{stage} $(slot_of 'roomcast:room:{stage}'), of today's channel roomcast:room:stage $(slot_of roomcast:room:stage)"
owner=$(owner_of "$state_slot")
echo "- the room's slot is owned by the node on port $owner"
spublish='redis.call("HINCRBY", KEYS[1], "seq", 1) return redis.call("SPUBLISH", ARGV[1], ARGV[2])'
subscribe "$owner" 1 SSUBSCRIBE 'roomcast:room:{stage}'
echo "- the script SPUBLISHes to roomcast:room:{stage}: $(redis-cli -p "$owner" eval "$spublish" 1 'roomcast:v1:{stage}:state' 'roomcast:room:{stage}' hello 2>&1) subscriber(s) reached"
echo "- the script SPUBLISHes to roomcast:room:stage (another slot): $(redis-cli -p "$owner" eval "$spublish" 1 'roomcast:v1:{stage}:state' roomcast:room:stage hello 2>&1 | head -n 1)"
stop_readers
# One script call for several rooms of one shard: a batch's rooms are in different slots, which
# a plain script may not touch together; Redis 7's allow-cross-slot-keys flag lets it, as long
# as every slot is on the node that runs it.
other=""
for i in $(seq 1000); do
    if [ "$(owner_of "$(slot_of "roomcast:v1:{room$i}:state")")" = "$owner" ] &&
        [ "$(slot_of "roomcast:v1:{room$i}:state")" != "$state_slot" ]; then
        other="room$i"
        break
    fi
done
both='redis.call("HINCRBY", KEYS[1], "seq", 1) redis.call("HINCRBY", KEYS[2], "seq", 1) return "ok"'
echo "- one script for stage and $other (slots $state_slot and $(slot_of "roomcast:v1:{$other}:state"), both on port $owner): $(redis-cli -p "$owner" eval "$both" 2 'roomcast:v1:{stage}:state' "roomcast:v1:{$other}:state" 2>&1 | head -n 1)"
echo "- the same with #!lua flags=allow-cross-slot-keys: $(redis-cli -p "$owner" eval "#!lua flags=allow-cross-slot-keys
$both" 2 'roomcast:v1:{stage}:state' "roomcast:v1:{$other}:state" 2>&1 | head -n 1)"

# PUBLISH on a cluster goes to every node over the cluster bus, so each node's subscribers
# get it; SPUBLISH stays on the shard that owns the channel's slot. Three subscribers each:
# one per node for PUBLISH (instances spread their connections), all on the owner for
# SSUBSCRIBE.
cluster_rows=()
cluster_cpu() {
    local node total=0
    for node in "${nodes[@]}"; do total=$(awk -v t="$total" -v c="$(cpu "$node")" 'BEGIN { print t + c }'); done
    echo "$total"
}
# cluster_measure LABEL AT COMMAND...: the rate of COMMAND sent to node AT, and the CPU all
# three nodes used for it, per second and per message.
cluster_measure() {
    local label=$1 at=$2 probe requests before started calls elapsed used
    shift 2
    echo "redis-bench: cluster, $label" >&2
    probe=$(rate "$at" 2000 "$@")
    requests=$(awk -v r="$probe" -v s="$run_seconds" 'BEGIN { n = int(r * s); print (n < 2000 ? 2000 : n) }')
    before=$(cluster_cpu)
    started=$(date +%s.%N)
    calls=$(rate "$at" "$requests" "$@")
    elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
    used=$(awk -v a="$before" -v b="$(cluster_cpu)" 'BEGIN { print b - a }')
    cluster_rows+=("$(awk -v label="$label" -v shown="$1 $2 <300 B> to the owning node" -v calls="$calls" -v used="$used" -v t="$elapsed" -v n="$requests" 'BEGIN {
        printf "%s|%s|%.0f|%.2f|%.1f", label, shown, calls, used / t, used / n * 1e6
    }')")
}
for node in "${nodes[@]}"; do subscribe "$node" 1 SUBSCRIBE roomcast:room:stage; done
cluster_measure "PUBLISH, a subscriber on each node" "$owner" PUBLISH roomcast:room:stage "$payload"
stop_readers
subscribe "$owner" 3 SSUBSCRIBE 'roomcast:room:{stage}'
cluster_measure "SPUBLISH, 3 subscribers on its shard" "$owner" SPUBLISH 'roomcast:room:{stage}' "$payload"
stop_readers
markdown_table "run|command|messages/s|CPU of all nodes s/s|CPU of all nodes µs per message" "${cluster_rows[@]}"
