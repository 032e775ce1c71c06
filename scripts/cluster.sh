#!/usr/bin/env bash
# A roomcast cluster on loopback: redis-server, three roomcast instances sharing rooms through
# it, and nginx as a round-robin WebSocket load balancer in front (scripts/cluster/nginx.conf).
#
#   scripts/cluster.sh            # start everything, print how to connect, stop on Ctrl-C
#   scripts/cluster.sh --bench    # measure the Redis hop and 3 instances against 1, then stop
#
# Ports (override with the environment): nginx ROOMCAST_CLUSTER_PORT (9000), Redis
# ROOMCAST_CLUSTER_REDIS_PORT (6390), instances ROOMCAST_CLUSTER_PORT+11..+13.
# Installs redis-server and nginx from Debian when missing (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

bench=""
[ "${1:-}" = "--bench" ] && bench=1

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

start_redis() {
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
        --loglevel warning >"$work/redis.log" 2>&1 &
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
    get  http://127.0.0.1:$port/api/rooms       cluster-wide counts
    get  http://127.0.0.1:$((port + 11))/healthz         one instance's health ("degraded" without Redis)

Press Ctrl-C to stop everything.
EOF
    # `wait` (unlike a foreground sleep) returns as soon as a trapped signal arrives. It also
    # returns if any process of the cluster dies, which stops the rest.
    status=0
    wait -n "${pids[@]}" || status=$?
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
# bench SETUP INSTANCES [roomcast flags...]: start the instances, measure (one instance also
# directly, without nginx, to isolate nginx's share), then stop everything.
bench() {
    local setup="$1" count="$2"
    shift 2
    start_instances "$count" --rate 0 "$@"
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
    stop_all
}

bench "1 instance, no Redis" 1
start_redis
bench "1 instance + Redis" 1 --redis "$redis_url"
start_redis
bench "3 instances + Redis" 3 --redis "$redis_url"

markdown_table "setup|load tool arguments|result|CPU seconds during the run" "${results[@]}"
