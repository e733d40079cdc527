#!/usr/bin/env bash
# Translation (decode) speed, ours vs the PyTorch reference, side by side on this machine.
#   bash bench/compare_translate.sh                 # SIZE=small ITERS=10
# Same work on both sides: 20 random source words (+SOS/EOS), exactly 20 generated tokens (EOS ignored),
# batch 1 and 32. Ours decodes with the KV cache (greedy and beam 4, f16-stored weights, per compute
# dtype); the reference re-runs the decoder over the whole prefix every step (the tutorial's way) and
# has greedy only. Both pinned to the same CPUs, 2 threads. Needs ../shared/bench/pytorch_ref's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-small}
ITERS=${ITERS:-10}
CPUS=${CPUS:-0-1}
REF=../shared/bench/pytorch_ref
PY=${PY:-$HOME/.cache/pytorch-ref-venv/bin/python}
OUT=${OUT:-target/compare}
mkdir -p "$OUT"
cargo build --release --quiet
[ -x "$PY" ] || bash "$REF/setup.sh"
ref_size=$SIZE; [ "$SIZE" = tutorial ] && ref_size=full
taskset -c "$CPUS" target/release/ampserve bench translate --size "$SIZE" --beam 1,4 --batch 1,32 \
  --compute fp32,f16,bf16 --iters "$ITERS" | tee "$OUT/ours-decode.jsonl"
: > "$OUT/ref-decode.jsonl"
taskset -c "$CPUS" "$PY" "$REF/bench.py" --size "$ref_size" --modes '' \
  --decode-modes "${REF_MODES:-fp32}" --decode-batch 32 --threads 2 \
  --out "$OUT/ref-decode.jsonl" >/dev/null
python3 - "$OUT/ours-decode.jsonl" "$OUT/ref-decode.jsonl" <<'PY'
import json, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ref = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
ref = [r for r in ref if r.get("kind") == "decode" and r.get("status") == "ok" and not r["src_padded_to_seq_len"]]
print("| side | mode | beam | batch | p50 ms | p95 ms | sentences/s | same output as fp32 |")
print("|---|---|---|---|---|---|---|---|")
for o in ours:
    agree = "-" if o["agree_vs_fp32"] is None else f"{100 * o['agree_vs_fp32']:.0f}%"
    print(f"| ampserve (KV cache) | {o['compute']} | {o['beam']} | {o['batch']} | {o['p50_ms']:.1f} | {o['p95_ms']:.1f} | {o['sent_per_s']:.1f} | {agree} |")
for r in ref:
    print(f"| PyTorch ref (no cache) | {r['mode']} | 1 | {r['decode_batch']} | {r['latency_ms_median']:.1f} | - | {r['sentences_per_s']:.1f} | - |")
base = {(o["compute"], o["beam"], o["batch"]): o for o in ours}
for r in ref:
    if r["mode"] == "fp32":
        o = base.get(("fp32", 1, r["decode_batch"]))
        if o:
            print(f"\ngreedy fp32 batch {r['decode_batch']}: ours {o['sent_per_s']:.1f} sent/s vs PyTorch {r['sentences_per_s']:.1f} -> {o['sent_per_s'] / r['sentences_per_s']:.2f}x")
PY
