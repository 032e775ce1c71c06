#!/usr/bin/env bash
# Installs PyJWT, what Python backends mint join tokens with, into a virtualenv under
# target/pyjwt (once), and prints that virtualenv's interpreter. scripts/test.sh exports it
# as PYJWT_PYTHON for the interop test in src/v1/token.rs, which mints a token with PyJWT and
# verifies it with roomcast's own check, and decodes one of ours with PyJWT.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="$PWD/target/pyjwt"
# Pinned, so a new release cannot change what the test means; 2.10 is the current line.
version="2.10.1"

if ! "$venv/bin/python" -c "import jwt, sys; sys.exit(jwt.__version__ != '$version')" 2>/dev/null; then
    echo "pyjwt: installing PyJWT $version into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "PyJWT==$version" >&2
fi
echo "$venv/bin/python"
