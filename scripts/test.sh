#!/usr/bin/env bash
# The whole test suite: what the README's quick start and CI run.
#
# Installs what the suite needs beyond a Rust toolchain when it is missing, then runs every
# test with ROOMCAST_REQUIRE_ALL=1, under which a test that would skip for lack of a tool
# fails instead. (Plain `cargo test` runs the same tests and prints why it skips any.)
#   - Debian's chromium (+ an emoji font for the screenshot): the demo page's browser test
#   - promtool, unpacked from Debian's prometheus package: the reference /metrics linter
#   - the Autobahn TestSuite, in a Python 2.7 virtualenv (scripts/autobahn.sh installs it)
#   - nginx and caddy (+ openssl): the README's TLS proxy configs, run against roomcast
#   - redis-server: the Redis backplane tests (`--features redis`), each on its own private
#     redis-server (the package's own service is not used)
#   - cargo-fuzz, to build the fuzz targets and run each briefly (scripts/fuzz.sh installs it)
#   - systemd (for systemd-analyze): scripts/roomcast.service is verified; no systemd needs to
#     be running
#   - PyJWT, in a virtualenv (scripts/pyjwt.sh installs it): join tokens minted by Python
#     backends must verify, and ours must decode there
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
need chromium chromium
need nginx nginx-light
need caddy caddy
need openssl openssl
need redis-server redis-server
need systemd-analyze systemd
dpkg -s fonts-noto-color-emoji >/dev/null 2>&1 || needed+=(fonts-noto-color-emoji)
install_needed

# promtool ships inside Debian's prometheus package. Unpacking the .deb instead of installing
# it gets the one binary without creating a prometheus user or starting its service.
if ! command -v promtool >/dev/null 2>&1; then
    tools="$PWD/target/tools"
    if [ ! -x "$tools/usr/bin/promtool" ]; then
        echo "scripts/test.sh: unpacking promtool from Debian's prometheus package"
        mkdir -p "$tools"
        [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
        (cd "$tools" && rm -f prometheus_*.deb && apt-get download -qq prometheus && dpkg-deb -x prometheus_*.deb .)
    fi
    export PROMTOOL="$tools/usr/bin/promtool"
fi

# The join-token interop test runs PyJWT through this interpreter.
PYJWT_PYTHON=$(scripts/pyjwt.sh)
export PYJWT_PYTHON

# Connection tests open thousands of sockets; use the hard file limit if the soft one is low.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

export ROOMCAST_REQUIRE_ALL=1
# The minimal build first, then again with the Redis backplane: the suite must pass both ways.
cargo test --locked --all-targets "$@"
cargo test --locked --all-targets --features redis "$@"
# Doc tests are not part of --all-targets.
cargo test --locked --doc "$@"

# The systemd unit must pass `systemd-analyze verify` without a single warning: verify exits 0
# on most warnings (an unknown key, a bad value), so its output must be empty. It insists that
# ExecStart's binary exists, so it reads a copy pointing at the release build instead of
# /usr/local/bin/roomcast.
cargo build --locked --release --bin roomcast
unit_copy="$PWD/target/systemd/roomcast.service"
mkdir -p "$(dirname "$unit_copy")"
sed "s|/usr/local/bin/roomcast|$PWD/target/release/roomcast|" scripts/roomcast.service >"$unit_copy"
if ! verify_output=$(systemd-analyze verify "$unit_copy" 2>&1) || [ -n "$verify_output" ]; then
    echo "scripts/roomcast.service does not verify cleanly:" >&2
    echo "$verify_output" >&2
    exit 1
fi
echo "scripts/roomcast.service: systemd-analyze verify clean"

# The protocol conformance suite, sections 1-10, against the release build.
scripts/autobahn.sh

# The fuzz targets must keep building; a few seconds each replays the seeds and catches the
# shallowest regressions. The long runs are scripts/fuzz.sh's job.
scripts/fuzz.sh 5

# The README's TLS reverse-proxy configs, run as written: HTTPS and wss:// through each.
scripts/proxy/check.sh

# The load tool against a release build, every scenario small and short: it must report clean
# results (no loss, reordering or corruption; stalled clients evicted). No timing is asserted.
scripts/bench.sh --smoke
