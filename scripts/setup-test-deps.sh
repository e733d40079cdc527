#!/usr/bin/env bash
# Test dependencies beyond cargo: headless Chromium (Debian's package) and the browser test's
# Node packages (playwright-core, pinned in tests/browser/package-lock.json). Idempotent and
# quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fonts are only a "Recommends" of chromium: without one, screenshots show boxes for text.
if [ ! -x /usr/bin/chromium ] || [ ! -d /usr/share/fonts/truetype/dejavu ]; then
  echo "setup: installing chromium and fonts-dejavu-core (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
  pkgs=(chromium fonts-dejavu-core)
  if ! "${SUDO[@]}" apt-get install -y --no-install-recommends "${pkgs[@]}"; then
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends "${pkgs[@]}"
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
