#!/usr/bin/env bash
# Train-step speed, ours vs the PyTorch reference, side by side on this machine.
#   bash bench/compare.sh                 # SIZES="tiny small" PRECISIONS="fp32,bf16" STEPS=10
# Both sides run one after the other, pinned to the same CPUs (taskset), with 2 threads.
# Needs ../shared/bench/pytorch_ref (its setup.sh makes the venv: a 2.5 GB download).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"tiny small"}
PRECISIONS=${PRECISIONS:-"fp32,bf16,f16"}
STEPS=${STEPS:-10}
CPUS=${CPUS:-0-1}
REF=../shared/bench/pytorch_ref
PY=${PY:-$HOME/.cache/pytorch-ref-venv/bin/python}
OUT=${OUT:-target/compare}
mkdir -p "$OUT"
cargo build --release --quiet
[ -x "$PY" ] || bash "$REF/setup.sh"
: > "$OUT/ours.jsonl"; : > "$OUT/ref.jsonl"
for size in $SIZES; do
  taskset -c "$CPUS" target/release/ampserve bench train --size "$size" --precision "$PRECISIONS" \
    --steps "$STEPS" --warmup 2 | tee -a "$OUT/ours.jsonl"
  ref_size=$size; [ "$size" = tutorial ] && ref_size=full
  ref_modes=${PRECISIONS//f16/fp16}; ref_modes=${ref_modes//bfp16/bf16}
  taskset -c "$CPUS" "$PY" "$REF/bench.py" --size "$ref_size" --modes "$ref_modes" --decode-modes '' \
    --threads 2 --out "$OUT/ref.jsonl" >/dev/null || true
done
python3 - "$OUT/ours.jsonl" "$OUT/ref.jsonl" <<'PY'
import json, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ref = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
name = {"fp16": "f16", "full": "tutorial"}
r = {(name.get(x["size"], x["size"]), name.get(x["mode"], x["mode"])): x
     for x in ref if x.get("kind") == "train" and x.get("status") == "ok"}
print("| size | precision | ours tok/s | pytorch tok/s | ours/pytorch | ours vs our fp32 |")
print("|---|---|---|---|---|---|")
for o in ours:
    p = r.get((o["size"], o["precision"]))
    pt = p["tgt_tokens_per_s"] if p else None
    ratio = f"{o['tokens_per_s'] / pt:.2f}" if pt else "-"
    print(f"| {o['size']} | {o['precision']} | {o['tokens_per_s']:.0f} | {pt if pt else '-'} | {ratio} | {o['speedup_vs_fp32'] or 1:.2f} |")
PY
