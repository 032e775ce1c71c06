#!/usr/bin/env bash
# A roomcast cluster on loopback: redis-server, three roomcast instances sharing rooms through
# it, and nginx as a round-robin WebSocket load balancer in front (scripts/cluster/nginx.conf).
#
#   scripts/cluster.sh            # start everything, print how to connect, stop on Ctrl-C
#   scripts/cluster.sh --bench    # measure the Redis hop and 3 instances against 1, then stop
#   scripts/cluster.sh --bench stream   # only the stream rows (a live stream's room on v1)
#
# Ports (override with the environment): nginx ROOMCAST_CLUSTER_PORT (9000), Redis
# ROOMCAST_CLUSTER_REDIS_PORT (6390), instances ROOMCAST_CLUSTER_PORT+11..+13.
# Installs redis-server and nginx from Debian when missing (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

bench=""
only_stream=""
case "${1:-}" in
"") ;;
--bench)
    bench=1
    case "${2:-}" in
    "") ;;
    stream) only_stream=1 ;;
    *) echo "usage: scripts/cluster.sh [--bench [stream]]" >&2 && exit 2 ;;
    esac
    ;;
*) echo "usage: scripts/cluster.sh [--bench [stream]]" >&2 && exit 2 ;;
esac

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
need redis-server redis-server
need nginx nginx-light
install_needed

port=${ROOMCAST_CLUSTER_PORT:-9000}
redis_port=${ROOMCAST_CLUSTER_REDIS_PORT:-6390}
# roomcast reads ROOMCAST_* variables (and warns about ones no flag reads): these two are this
# script's own, so the instances do not inherit them.
unset ROOMCAST_CLUSTER_PORT ROOMCAST_CLUSTER_REDIS_PORT
redis_url="redis://127.0.0.1:$redis_port/0"
work="$PWD/target/cluster"
mkdir -p "$work/body" "$work/proxy"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "cluster: building roomcast with --features redis (release)"
cargo build --release --locked --quiet --features redis --bins --examples

pids=()
stop_all() {
    # Newest first: nginx, then the instances (each deletes its presence hash), then Redis.
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    pids=()
}
trap stop_all EXIT
trap 'echo; echo "cluster: stopping"; exit 0' INT TERM

# GET PATH from 127.0.0.1:PORT with bash's /dev/tcp; prints the response body.
get() {
    local response
    response=$( (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET %s HTTP/1.1\r\nHost: cluster\r\nConnection: close\r\n\r\n' "$2" >&3 && cat <&3) 2>/dev/null) || return 1
    printf '%s' "${response#*$'\r\n\r\n'}"
}

# wait_for PORT PATH TEXT: until GET PATH answers with TEXT in its body (10 s at most).
wait_for() {
    for _ in $(seq 200); do
        case "$(get "$1" "$2" || true)" in *"$3"*) return 0 ;; esac
        sleep 0.05
    done
    echo "cluster: 127.0.0.1:$1$2 never answered \"$3\"; logs in $work" >&2
    exit 1
}

redis_pid=""
start_redis() {
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
        --loglevel warning >>"$work/redis.log" 2>&1 &
    redis_pid=$!
    pids+=($!)
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && return 0
        sleep 0.05
    done
    echo "cluster: redis-server did not start on port $redis_port:" >&2
    cat "$work/redis.log" >&2
    exit 1
}

# start_instances N [roomcast flags...]: N instances on port+1..port+N, healthy before return.
start_instances() {
    local count=$1 i
    shift
    for ((i = 1; i <= count; i++)); do
        ./target/release/roomcast --listen "127.0.0.1:$((port + 10 + i))" "$@" \
            2>"$work/roomcast-$i.log" &
        pids+=($!)
    done
    for ((i = 1; i <= count; i++)); do
        wait_for $((port + 10 + i)) /healthz "ok"
    done
}

# start_nginx N: the load balancer on $port, round robin over the first N instances.
start_nginx() {
    local count=$1 i upstream=""
    for ((i = 1; i <= count; i++)); do
        upstream+="        server 127.0.0.1:$((port + 10 + i));"$'\n'
    done
    # The placeholder is a whole line; awk substitutes it without sed's escaping troubles.
    awk -v work="$work" -v port="$port" -v servers="${upstream%$'\n'}" '
        /@UPSTREAM_SERVERS@/ { print servers; next }
        { gsub(/@WORK@/, work); gsub(/@PORT@/, port); print }
    ' scripts/cluster/nginx.conf >"$work/nginx.conf"
    nginx -e stderr -p "$work" -c "$work/nginx.conf" 2>"$work/nginx.log" &
    pids+=($!)
    wait_for "$port" /healthz "ok"
}

if [ -z "$bench" ]; then
    start_redis
    start_instances 3 --redis "$redis_url"
    start_nginx 3
    cat <<EOF

roomcast cluster running (logs in $work):
    load balancer   ws://127.0.0.1:$port/ws/ROOM   (nginx, round robin)
    instances       127.0.0.1:$((port + 11)), :$((port + 12)), :$((port + 13))
    redis           $redis_url

Try it:
    open http://127.0.0.1:$port/ in two browser tabs: each reload may land on another
    instance, and they still share the room
    curl http://127.0.0.1:$port/api/rooms                cluster-wide counts
    curl http://127.0.0.1:$((port + 11))/healthz              one instance's health
    an outage: kill $redis_pid (Redis), watch /healthz say "degraded", then bring
    Redis back, empty, with
        redis-server --port $redis_port --bind 127.0.0.1 --save "" --appendonly no &

Press Ctrl-C to stop everything (a Redis started by hand too: stop it yourself).
EOF
    # `wait` (unlike a foreground sleep) returns as soon as a trapped signal arrives. It also
    # returns if an instance or nginx dies, which stops the rest; Redis may come and go (that
    # is what degraded mode is for).
    status=0
    watched=()
    for pid in "${pids[@]}"; do [ "$pid" = "$redis_pid" ] || watched+=("$pid"); done
    wait -n "${watched[@]}" || status=$?
    echo "cluster: a process exited (status $status); stopping the rest (logs in $work)" >&2
    exit 1
fi

# --bench: the same fan-out through nginx, on one instance without Redis, one with Redis,
# and three with Redis. Nothing is pinned: nginx, Redis, the instances and the load tool all
# share this machine's cores, as they would on one small box.
results=()
ticks=$(getconf CLK_TCK)
# CPU seconds (user + system) a process and its children (nginx's workers) have used so far.
cpu_seconds() {
    local pid total=0
    for pid in "$1" $(pgrep -P "$1"); do
        total=$(awk -v hz="$ticks" -v t="$total" '{ printf "%.2f", t + ($14 + $15) / hz }' "/proc/$pid/stat" 2>/dev/null || echo "$total")
    done
    echo "$total"
}
# measure NAME LOAD ARGS...: one load-tool run through nginx, with the CPU each process spent.
measure() {
    local name="$1"
    shift
    echo "cluster: $name: load $*" >&2
    local before=() pid i out cpu=""
    for pid in "${pids[@]}"; do before+=("$(cpu_seconds "$pid")"); done
    out=$(timeout 300 ./target/release/examples/load "$@" --addr "127.0.0.1:$target" 2>&1) || {
        echo "$out" >&2
        exit 1
    }
    for i in "${!pids[@]}"; do
        pid=${pids[i]}
        cpu+="$(ps -o comm= -p "$pid") $(awk -v a="${before[i]}" -v b="$(cpu_seconds "$pid")" 'BEGIN { printf "%.1f", b - a }')s, "
    done
    results+=("$name|$*|$(echo "$out" | grep "^RESULT" | tail -n 1 | sed 's/^RESULT //')|${cpu%, }")
}
light=(fanout --clients 100 --publishers 1 --rate 100 --size 64 --duration 10)

# A live stream's room on roomcast.v1, at a size this 2-core box runs beside nginx, Redis and
# the instances: 3,000 viewers, 50 chat messages/s of 200 B from 30 chatters, 1,000 reaction
# taps/s from 150 tappers (6.7/s each, under the default bucket of 20/s), for 15 s. Each
# viewer checks the chat (loss, order, seq, corruption, latency) and that its last reaction
# totals equal the taps sent, which across instances needs cluster-wide totals.
stream_load=(stream --v1 --viewers 3000 --chatters 30 --chat-rate 50 --size 200
    --tappers 150 --tap-rate 1000 --duration 15)
stream_results=()
stream_failed=0

# metric_sum COUNT NAME: NAME summed over every label set and over instances 1..COUNT, read
# from each instance's /metrics directly (the load tool reads one through nginx, which is
# whichever instance round robin picks).
metric_sum() {
    local count=$1 name=$2 i total=0 value
    for ((i = 1; i <= count; i++)); do
        value=$({ get $((port + 10 + i)) /metrics || true; } | awk -v name="$name" '
            $1 == name || index($1, name "{") == 1 { sum += $2 } END { printf "%.0f", sum }')
        total=$((total + ${value:-0}))
    done
    echo "$total"
}

# redis_counters: "PUBLISH calls, EVAL/EVALSHA calls, bytes in, bytes out" from INFO, or
# "0 0 0 0" when no Redis runs. Bytes out include every copy Redis sent to a subscriber.
redis_counters() {
    { redis-cli -p "$redis_port" info all 2>/dev/null || true; } | tr -d '\r' | awk -F'[:,=]' '
        $1 == "cmdstat_publish" { publish = $3 }
        $1 == "cmdstat_eval" || $1 == "cmdstat_evalsha" { eval += $3 }
        $1 == "total_net_input_bytes" { bytes_in = $2 }
        $1 == "total_net_output_bytes" { bytes_out = $2 }
        END { printf "%d %d %d %d\n", publish, eval, bytes_in, bytes_out }'
}

# field KEY RESULT: the value of KEY=value in a load tool RESULT line.
field() {
    grep -o "\b$1=[^ ]*" <<<"$2" | head -n 1 | cut -d= -f2
}

# measure_stream NAME COUNT USES_REDIS: one stream run through nginx on COUNT instances. Beside
# the load tool's chat latency and checks, it records what the instances counted and what
# went through Redis, and the CPU each process spent over the whole load tool run (the ramp
# and the settling after the workload included, hence its wall time beside it). A run that is not clean is recorded
# (its exit status is in the table) rather than stopping the bench.
measure_stream() {
    local name=$1 count=$2 uses_redis=$3
    local before=() pid i out status=0 cpu="" result redis_before redis_after started wall
    local taps_before published_before received_before
    echo "cluster: $name, stream: load ${stream_load[*]}" >&2
    for pid in "${pids[@]}"; do before+=("$(cpu_seconds "$pid")"); done
    taps_before=$(metric_sum "$count" roomcast_reactions_total)
    published_before=$(metric_sum "$count" roomcast_redis_published_total)
    received_before=$(metric_sum "$count" roomcast_redis_received_total)
    redis_before=$(redis_counters)
    started=$(date +%s.%N)
    out=$(timeout 120 ./target/release/examples/load "${stream_load[@]}" --addr "127.0.0.1:$port" 2>&1) || status=$?
    redis_after=$(redis_counters)
    wall=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    for i in "${!pids[@]}"; do
        pid=${pids[i]}
        cpu+="$(ps -o comm= -p "$pid") $(awk -v a="${before[i]}" -v b="$(cpu_seconds "$pid")" 'BEGIN { printf "%.1f", b - a }')s, "
    done
    echo "$out" | grep -v "^RESULT" | sed 's/^/    /' >&2
    [ "$status" = 0 ] || stream_failed=1
    result=$(echo "$out" | grep "^RESULT" | tail -n 1 | sed 's/^RESULT //')
    # One instance's /metrics through nginx says nothing of the cluster: counted taps are summed
    # from every instance below instead.
    result=$(sed -E 's/ server_taps_(counted|dropped)=[0-9]+//g' <<<"$result")
    local latency checks viewer redis="no Redis"
    latency="$(awk -v a="$(field chat_p50_us "$result")" -v b="$(field chat_p99_us "$result")" 'BEGIN { printf "%.1f / %.1f", a / 1000, b / 1000 }')"
    checks="lost $(field chat_lost "$result"), reordered $(field chat_reordered "$result"), corrupted $(field chat_corrupted "$result"), closed $(field viewers_closed "$result"), failures $(field failures "$result"); totals exact: $(field totals_exact "$result") ($(field totals_settle_ms "$result") ms); taps $(field taps_sent "$result") sent, $(($(metric_sum "$count" roomcast_reactions_total) - taps_before)) counted by the instances"
    viewer="$(field deliveries_per_second "$result") deliveries/s, $(field viewer_kib_per_s "$result") KiB/s"
    if [ "$uses_redis" = 1 ]; then
        read -r -a redis_before <<<"$redis_before"
        read -r -a redis_after <<<"$redis_after"
        redis="PUBLISH $((redis_after[0] - redis_before[0])), EVAL $((redis_after[1] - redis_before[1])); $((redis_after[2] - redis_before[2])) B in, $((redis_after[3] - redis_before[3])) B out; instances published $(($(metric_sum "$count" roomcast_redis_published_total) - published_before)), received $(($(metric_sum "$count" roomcast_redis_received_total) - received_before))"
    fi
    stream_results+=("$name|${stream_load[*]}|$latency|$checks|$viewer|$redis|${cpu%, } in ${wall} s|$status")
}

# bench SETUP INSTANCES [roomcast flags...]: start the instances, measure (one instance also
# directly, without nginx, to isolate nginx's share), then stop everything.
bench() {
    local setup="$1" count="$2" uses_redis=0
    shift 2
    [ "${1:-}" = --redis ] && uses_redis=1
    start_instances "$count" --rate 0 "$@"
    if [ -z "$only_stream" ]; then
        if [ "$count" = 1 ]; then
            target=$((port + 11))
            measure "$setup, direct (no nginx), light" "${light[@]}"
        fi
        target=$port
        start_nginx "$count"
        # Light load: the latency here is mostly the path itself, so the Redis hop shows.
        measure "$setup, light" "${light[@]}"
        measure "$setup, loaded" fanout --clients 1000 --publishers 4 --rate 50 --size 64 --duration 10
        measure "$setup, throughput" fanout --clients 1000 --publishers 4 --window 16 --size 64 --duration 10
    else
        start_nginx "$count"
    fi
    measure_stream "$setup" "$count" "$uses_redis"
    stop_all
}

bench "1 instance, no Redis" 1
start_redis
bench "1 instance + Redis" 1 --redis "$redis_url"
start_redis
bench "3 instances + Redis" 3 --redis "$redis_url"

if [ -z "$only_stream" ]; then
    markdown_table "setup|load tool arguments|result|CPU seconds during the run" "${results[@]}"
fi
markdown_table "setup|load tool arguments|chat p50 / p99 ms|checks|to the viewers|through Redis|CPU seconds during the run|exit" "${stream_results[@]}"
exit "$stream_failed"
