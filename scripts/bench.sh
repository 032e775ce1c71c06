#!/usr/bin/env bash
# The benchmark suite: a release roomcast and the load tool (examples/load.rs), pinned to
# different cores when there are two or more, on loopback. Prints a Markdown table.
#
#   scripts/bench.sh            # the standard suite (about three minutes)
#   scripts/bench.sh --smoke    # a few seconds per scenario, a few hundred clients: CI runs
#                               # this, and fails on any unclean result (loss, reordering,
#                               # corruption, a stalled client not evicted, a backlogged one
#                               # evicted, memory over the server's budget, a room that never
#                               # empties); no timing checks
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=""
[ "${1:-}" = "--smoke" ] && smoke=1

cargo build --release --locked --quiet --bins --examples
work="$PWD/target/bench"
mkdir -p "$work"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

pin_server=()
pin_tool=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null 2>&1; then
    pin_server=(taskset -c 0)
    pin_tool=(taskset -c 1)
fi

# The stalled scenario's server keeps backlogged clients for the whole run: they must stay
# under the outbox bound and the slow timeout, or they are evicted and the run is void.
# A 64 MiB outbox makes the capacity preflight budget 72 MiB a client (about 300 clients on
# this machine); the stalled clients' outboxes never hold more than a few KiB, so the client
# limit is set by hand.
stalled_server="--rate 0 --slow-timeout 120s --outbox-bytes 64MiB --max-clients 5000"

results=()
failed=0
# run NAME "SERVER FLAGS" LOAD ARGS...
run() {
    local name="$1" server_flags="$2"
    shift 2
    local log="$work/$name.server.log"
    # At info the server logs start-up and shutdown only, plus its warnings (refusals, evictions).
    # shellcheck disable=SC2086 # server_flags is a list of flags
    "${pin_server[@]}" ./target/release/roomcast --listen 127.0.0.1:0 --log-level info $server_flags 2>"$log" &
    local server=$!
    local addr=""
    for _ in $(seq 200); do
        addr=$(grep -o "listening on ws://[0-9.:]*" "$log" 2>/dev/null | sed 's|listening on ws://||') || true
        [ -n "$addr" ] && break
        sleep 0.05
    done
    [ -n "$addr" ] || { echo "bench: roomcast did not start:" >&2; cat "$log" >&2; exit 1; }
    echo "bench: $name: load $*" >&2
    local out status=0
    out=$("${pin_tool[@]}" timeout 600 ./target/release/examples/load "$@" --addr "$addr" --pid "$server" 2>&1) || status=$?
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    echo "$out" | grep -v "^RESULT" | sed 's/^/    /' >&2
    local result
    result=$(echo "$out" | grep "^RESULT" | tail -n 1)
    results+=("$name|$*|${result#RESULT }|$status")
    [ "$status" = 0 ] || failed=1
}

if [ -n "$smoke" ]; then
    run capacity "--rate 0" capacity --clients 300 --rooms 3 --hold 0.5
    run fanout-window "--rate 0" fanout --clients 200 --publishers 4 --window 16 --size 64 --duration 2
    run fanout-rate "--rate 0" fanout --clients 300 --publishers 1 --rate 10 --size 64 --duration 2
    # The same workload with every client on roomcast.v1 (welcome, publish, message frames).
    run fanout-v1 "--rate 0" fanout --clients 200 --publishers 4 --window 16 --size 64 --duration 2 --v1
    run slow "--rate 0 --slow-timeout 1s --outbox-bytes 128KiB" slow --clients 100 --publishers 2 --stalled 5 --size 1024 --rate 500 --duration 4
    run churn "--rate 0" churn --clients 20 --churners 10 --rate 50 --duration 2
    run rooms "--rate 0" rooms --rooms 20 --clients 200 --rate 20 --duration 2
    run stalled "$stalled_server" stalled --stalled 50 --stalled-rooms 5 --clients 200 --publishers 4 --window 16 --size 64 --duration 2
    run hoard "" hoard --clients 20 --size 65536 --duration 2
    run leave "--rate 0" leave --clients 500 --mode rst
    run leave-close "--rate 0" leave --clients 500 --mode close
    # A live stream's room at the server's defaults (rate limits and reaction buckets on): v1
    # reactions counted and pushed as totals, then the same taps relayed as plain messages.
    run stream "" stream --viewers 200 --chatters 10 --chat-rate 20 --tappers 20 --tap-rate 200 --duration 2
    run stream-relayed "" stream --viewers 200 --chatters 10 --chat-rate 20 --tappers 20 --tap-rate 200 --duration 2 --relayed
else
    run capacity "--rate 0" capacity --clients 15000 --rooms 10 --hold 3
    run fanout-window "--rate 0" fanout --clients 1000 --publishers 4 --window 16 --size 64 --duration 10
    run fanout-rate "--rate 0" fanout --clients 10000 --publishers 1 --rate 10 --size 64 --duration 10
    # The two fanout rows with every client on roomcast.v1: what the JSON envelope costs.
    run fanout-window-v1 "--rate 0" fanout --clients 1000 --publishers 4 --window 16 --size 64 --duration 10 --v1
    run fanout-rate-v1 "--rate 0" fanout --clients 10000 --publishers 1 --rate 10 --size 64 --duration 10 --v1
    run slow "--rate 0" slow --clients 500 --publishers 2 --stalled 20 --size 1024 --rate 250 --duration 20
    run churn "--rate 0" churn --clients 100 --churners 50 --rate 100 --duration 10
    run rooms "--rate 0" rooms --rooms 500 --clients 5000 --rate 20 --duration 10
    # The fanout-window workload beside 1,000 stalled (backlogged, never evicted) clients in
    # 10 other rooms, and its clean twin with the same server flags: compare their rates.
    run stalled-clean "$stalled_server" stalled --stalled 0 --clients 1000 --publishers 4 --window 16 --size 64 --duration 10
    run stalled "$stalled_server" stalled --stalled 1000 --stalled-rooms 10 --clients 1000 --publishers 4 --window 16 --size 64 --duration 10
    # Server defaults: its own rate limit and outbox bound are what stand against the hoarders.
    run hoard "" hoard --clients 200 --size 65000 --duration 10
    run leave "--rate 0" leave --clients 10000 --mode rst
    # A live stream's room of 10,000 viewers at the server's defaults: 50 chat messages/s and
    # 2,000 reaction taps/s (10/s from each of 200 tappers, under the default bucket of 20/s)
    # on roomcast.v1, then the same workload with the taps relayed as plain messages, then
    # both again with the taps alone (what reactions cost without the chat's fan-out).
    stream_load="stream --viewers 10000 --chatters 100 --chat-rate 50 --tappers 200 --tap-rate 2000 --duration 20"
    # shellcheck disable=SC2086 # stream_load is a list of arguments
    run stream "" $stream_load
    # shellcheck disable=SC2086
    run stream-relayed "" $stream_load --relayed
    # shellcheck disable=SC2086
    run stream-taps "" $stream_load --chat-rate 0
    # shellcheck disable=SC2086
    run stream-taps-relayed "" $stream_load --chat-rate 0 --relayed
fi

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
markdown_table "scenario|load tool arguments|result|exit" "${results[@]}"
exit "$failed"
