#!/usr/bin/env bash
# Fuzzes everything roomcast parses itself (request heads and routing; the command line) with
# cargo-fuzz (libFuzzer) on the nightly toolchain.
#
#   scripts/fuzz.sh              # each target for 10 minutes
#   scripts/fuzz.sh 30           # each target for 30 seconds (CI's smoke run uses 5)
#
# The targets live in scripts/fuzz (cargo fuzz --fuzz-dir), the growing corpus in
# scripts/fuzz/corpus (not committed), the seeds in scripts/fuzz/seeds (committed), and any
# crash in scripts/fuzz/artifacts. Exits non-zero on a crash.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

# Built first, unfiltered, so a target that no longer compiles says why (the run's output
# below is filtered down to libFuzzer's summary lines).
cargo +nightly fuzz build --fuzz-dir scripts/fuzz

for target in request_head command_line; do
    corpus="scripts/fuzz/corpus/$target"
    mkdir -p "$corpus"
    dict=()
    [ -f "scripts/fuzz/$target.dict" ] && dict=("-dict=scripts/fuzz/$target.dict")
    echo "fuzz: $target for ${seconds}s"
    cargo +nightly fuzz run --fuzz-dir scripts/fuzz "$target" "$corpus" "scripts/fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -max_len=20000 -print_final_stats=1 "${dict[@]}" 2>&1 \
        | grep -E "^(#[0-9]+ +DONE|stat::|==|SUMMARY|Done )|cov:.*ft:.*corp:.*exec/s" | tail -n 12
done
