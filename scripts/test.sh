#!/usr/bin/env bash
# The test suite: the Rust tests, then the status page in headless Chromium against the real
# server binary (tests/browser/page.test.mjs). Installs what the browser test needs first
# (scripts/setup-test-deps.sh: Debian's chromium, playwright-core from the npm registry) and
# starts the real PostgreSQL and S3-compatible servers (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
# PostgreSQL and an S3-compatible server on loopback (scripts/services.sh); the store, lease and
# multi-node tests run against them, and fail rather than skip without them.
eval "$(scripts/services.sh)"
export AMPSERVE_REQUIRE_POSTGRES=1
cargo test
# The browser test starts target/debug/ampserve, which cargo test has just built for the
# integration tests (a separate `cargo build` would compile everything again: dev-dependencies
# change the features of the test build).
node tests/browser/page.test.mjs
