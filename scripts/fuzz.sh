#!/usr/bin/env bash
# Run each fuzz target for a bounded time (default 60 s each): ./scripts/fuzz.sh [seconds]
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Not part of CI or of
# the workspace build: fuzz/ is its own workspace. Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
seeds="fuzz/corpus"
mkdir -p "$seeds/spec_parser" "$seeds/tsv_reader" "$seeds/translate_request"
# Seeds from the repository: the presets as JSON bodies, a real corpus slice, a translate body.
echo '{"config": "tiny", "name": "seed", "train": {"max_steps": 10}}' >"$seeds/spec_parser/preset.json"
for f in configs/*.toml; do cp "$f" "$seeds/spec_parser/$(basename "$f")"; done
head -n 50 data/tatoeba-en-it/valid.en-it.tsv >"$seeds/tsv_reader/tatoeba.tsv"
echo '{"model": 1, "texts": ["A man is riding a bike."], "beam_size": 4, "alpha": 0.6}' \
  >"$seeds/translate_request/texts.json"
for target in spec_parser tsv_reader translate_request; do
  echo "== $target (${secs}s)"
  cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$seeds/$target" -- \
    -max_total_time="$secs" -max_len=65536 -rss_limit_mb=4096
done
