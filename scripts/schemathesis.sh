#!/usr/bin/env bash
# Property-based check of the API against its own description (not run in CI: it needs
# schemathesis from PyPI and a few minutes). Starts a server on a fresh data dir, runs
# `schemathesis run` against /openapi.json, and fails on any 5xx.
# Usage: scripts/schemathesis.sh [extra schemathesis args]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-18089}"
command -v schemathesis >/dev/null || pip install --quiet schemathesis
cargo build --quiet
DATA="$(mktemp -d)"
target/debug/ampserve serve --bind "127.0.0.1:$PORT" --data-dir "$DATA" >"$DATA/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.2
done
schemathesis run "http://127.0.0.1:$PORT/openapi.json" --checks not_a_server_error "$@"
