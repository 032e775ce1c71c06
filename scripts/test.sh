#!/usr/bin/env bash
# The whole test suite: what the README's quick start and CI run.
#
# Everything the suite needs beyond a Rust toolchain is installed here when missing, so a
# fresh machine runs every test and skips none. Today the suite needs nothing else; later
# suites (browser, Autobahn, Redis) add their install steps to this script.
set -euo pipefail
cd "$(dirname "$0")/.."

# Connection tests open thousands of sockets; use the hard file limit if the soft one is low.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --locked --all-targets "$@"
# Doc tests are not part of --all-targets.
cargo test --locked --doc "$@"
