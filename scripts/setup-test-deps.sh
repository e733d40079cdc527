#!/usr/bin/env bash
# Test dependencies beyond cargo: headless Chromium (Debian's package) and the browser test's
# Node packages (playwright-core, pinned in tests/browser/package-lock.json). Idempotent and
# quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing chromium (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
  if ! "${SUDO[@]}" apt-get install -y --no-install-recommends chromium; then
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends chromium
  fi
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "error: node and npm are needed for the browser test (apt-get install -y nodejs npm)" >&2
  exit 1
fi

# Reinstall when node_modules is missing or older than the lock file.
stamp=tests/browser/node_modules/.package-lock.json
if [ ! -f "$stamp" ] || [ tests/browser/package-lock.json -nt "$stamp" ]; then
  echo "setup: npm ci in tests/browser" >&2
  npm ci --prefix tests/browser --no-audit --no-fund
fi
