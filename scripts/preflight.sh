#!/usr/bin/env bash
# Pre-flight for binaries that travel to another machine (the GPU machine): the newest GLIBC and
# GLIBCXX symbol versions each binary needs, and its NEEDED shared libraries, so a mismatch with the
# target's glibc/libstdc++ is known before any device time is spent. Reads ELF headers only
# (objdump from binutils); gzipped binaries (target/gpu/*.gz) are unpacked to a temp file first.
#
# Usage: bash scripts/preflight.sh BIN [BIN ...]
set -euo pipefail
command -v objdump >/dev/null || { echo "error: objdump (binutils) is needed" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for bin in "$@"; do
  f=$bin
  if [[ $bin == *.gz ]]; then
    f=$tmp/$(basename "${bin%.gz}")
    gzip -dc "$bin" > "$f"
  fi
  [ -f "$f" ] || { echo "error: $bin not found" >&2; exit 1; }
  syms=$(objdump -T "$f")
  newest() {
    grep -oE "\b$1_[0-9]+(\.[0-9]+)*\b" <<<"$syms" | sed "s/^$1_//" | sort -uV | tail -1
  }
  echo "preflight: $(basename "$bin")"
  echo "  newest GLIBC symbol:   $(newest GLIBC || echo none)"
  echo "  newest GLIBCXX symbol: $(newest GLIBCXX || echo none)"
  echo "  NEEDED: $(objdump -p "$f" | awk '/NEEDED/ {print $2}' | paste -sd' ' -)"
done
echo "this machine: glibc $(ldd --version | head -1 | awk '{print $NF}')"
