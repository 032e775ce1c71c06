#!/usr/bin/env bash
# Runs the Autobahn TestSuite (wstest -m fuzzingclient, sections 1-10) against a freshly built
# roomcast on loopback. A client alone in its room gets its own messages back, so the relay is
# the echo server the suite expects.
#
# The suite is Python 2 only: it runs in a virtualenv made from pyenv's Python 2.7, with the
# pinned requirement set beside this script (the 25.10.1 sdist installs no dependencies on its
# own). Everything lives under target/autobahn; the report is target/autobahn/report/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."

work="$PWD/target/autobahn"
venv="$work/py27"
# Sections 1-10 of autobahntestsuite 25.10.1 hold this many cases; fewer in the report means
# wstest skipped some (for example because the server died).
expected_cases=301

python27=$(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/2.7*/bin/python2.7 2>/dev/null | head -n 1 || true)
if [ -z "$python27" ]; then
    echo "autobahn: no Python 2.7 under pyenv; the suite needs it" >&2
    exit 1
fi

if [ ! -x "$venv/bin/wstest" ]; then
    echo "autobahn: installing the test suite into $venv"
    rm -rf "$venv" "$work/bootstrap"
    mkdir -p "$work"
    # Python 2.7 has no venv module; virtualenv < 20.22 is the last that makes 2.7 environments.
    python3 -m venv "$work/bootstrap"
    "$work/bootstrap/bin/pip" install -q 'virtualenv<20.22'
    "$work/bootstrap/bin/virtualenv" -q -p "$python27" "$venv"
    "$venv/bin/pip" install -q --no-warn-script-location 'pip==20.3.4' 2>/dev/null || true
    "$venv/bin/pip" install -q -r scripts/autobahn/requirements-py27.txt
fi

cargo build --release --locked --quiet
log="$work/roomcast.log"
# Limits raised to what the suite sends: 16 MiB frames and messages (9.1.6, 9.2.6) and 4 MiB
# in 65,536 fragments (9.3.1, 9.4.1; roomcast has no fragment cap). Rate limiting off: the
# suite sends thousands of messages per connection.
./target/release/roomcast --listen 127.0.0.1:0 --max-message-bytes 16MiB --rate 0 \
    --log-level info 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    grep -q "listening on ws://" "$log" && break
    sleep 0.1
done
addr=$(grep -o "listening on ws://[0-9.:]*" "$log" | sed 's|listening on ws://||')
[ -n "$addr" ] || { echo "autobahn: roomcast did not start" >&2; cat "$log" >&2; exit 1; }

report="$work/report"
rm -rf "$report"
cat > "$work/fuzzingclient.json" <<JSON
{
  "outdir": "$report",
  "servers": [{"agent": "roomcast", "url": "ws://$addr/ws/autobahn"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
echo "autobahn: running sections 1-10 against ws://$addr/ws/autobahn"
(cd "$work" && timeout 900 "$venv/bin/wstest" -m fuzzingclient -s fuzzingclient.json > wstest.log 2>&1) || {
    echo "autobahn: wstest failed; its log:" >&2
    tail -n 30 "$work/wstest.log" >&2
    exit 1
}
kill -0 "$server" 2>/dev/null || { echo "autobahn: roomcast died during the run" >&2; exit 1; }
"$venv/bin/python" scripts/autobahn/summarize.py "$report" roomcast "$expected_cases"
