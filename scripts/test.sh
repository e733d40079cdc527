#!/usr/bin/env bash
# The test suite: the Rust tests, then the status page in headless Chromium against the real
# server binary (tests/browser/page.test.mjs). Installs what the browser test needs first
# (scripts/setup-test-deps.sh: Debian's chromium, playwright-core from the npm registry).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
cargo test
# The binary the browser test starts (cargo test has built it already; this only makes sure).
cargo build --bin ampserve
node tests/browser/page.test.mjs
