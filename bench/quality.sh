#!/usr/bin/env bash
# Translation quality per minute, ours vs the PyTorch reference, side by side on this machine.
#   BUDGET=600 CONFIG=configs/tiny.toml bash bench/quality.sh
# Trains ours (CONFIG with train.max_time_s = BUDGET) and then the reference
# (../shared/bench/pytorch_ref/quality/train_ref.py, same model sizes, batch, lr and max_len read from
# CONFIG) for the same wall-clock budget, one after the other, pinned to the same CPUs; exports our best
# checkpoint (AVERAGE_LAST=N averages the last N), translates TEST with it, and scores both hypothesis files with
# the reference's score.py (sacreBLEU 13a + chrF); BEAM=K decodes ours with beam search (the reference is greedy). Run it on an idle machine: timings under load are
# meaningless. SKIP_REF=1 runs our side only (scored by `ampserve eval`, the same metrics). REF_LR and
# REF_BATCH give the reference another learning rate or batch than CONFIG's (it trains at a constant lr with no
# warm-up, the tutorial's way, so a peak that suits our warm-up and decay may not suit it).
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-600}
CONFIG=${CONFIG:-configs/tiny.toml}
# The presets name corpora relative to a data root: the bundled data/ by default
# (DATA_ROOT=../shared/data for Multi30k and the `small` preset).
DATA_ROOT=${DATA_ROOT:-data}
TEST=${TEST:-$DATA_ROOT/tatoeba-en-it/test.en-it.tsv}
CPUS=${CPUS:-0-1}
AVERAGE_LAST=${AVERAGE_LAST:-}
# averaging ends at the latest checkpoint (the best one's neighbours may have been deleted)
CHECKPOINT=${CHECKPOINT:-$([ -n "$AVERAGE_LAST" ] && echo latest || echo best)}
REF=../shared/bench/pytorch_ref
PY=${PY:-$HOME/.cache/pytorch-ref-venv/bin/python}
BIN=${BIN:-target/release/ampserve}
OUT=${OUT:-target/quality/$(basename "$CONFIG" .toml)-${BUDGET}s-$(date +%s)}
[ "$BIN" = target/release/ampserve ] && cargo build --release --quiet
mkdir -p "$OUT"
echo "results in $OUT" >&2

# --- ours ---------------------------------------------------------------------------------------
taskset -c "$CPUS" "$BIN" train --config "$CONFIG" --data-root "$DATA_ROOT" --max-time-s "$BUDGET" --epochs 10000 \
  --out "$OUT/ours" --json > "$OUT/ours-train.jsonl"
"$BIN" export --run "$OUT/ours" --checkpoint "$CHECKPOINT" --out "$OUT/ours-model" \
  ${AVERAGE_LAST:+--average-last "$AVERAGE_LAST"} > "$OUT/ours-manifest.json"
taskset -c "$CPUS" "$BIN" eval --model "$OUT/ours-model" --tsv "$TEST" ${BEAM:+--beam "$BEAM"} \
  --hyps "$OUT/ours-hyps.txt" > "$OUT/ours-eval.json"
steps=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    e = json.loads(l)
    if e.get("type") == "finished": print(e["steps"])' "$OUT/ours-train.jsonl")
echo "ours: $steps steps; $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("BLEU %.2f chrF %.2f (ampserve eval)" % (r["bleu"], r["chrf"]))' "$OUT/ours-eval.json")" >&2
[ "${SKIP_REF:-0}" = 1 ] && exit 0

# --- the reference ------------------------------------------------------------------------------
if [ ! -x "$PY" ]; then
  bash "$REF/setup.sh"
  "$PY" -m pip install -r "$REF/quality/requirements.txt"
fi
# the same sizes and optimisation settings as CONFIG
read -r D L H F DROP B LR ML TRAIN VALID < <(python3 - "$CONFIG" "$DATA_ROOT" <<'PY'
import os, sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
root = sys.argv[2]
def corpus(p):
    return p if os.path.isabs(p) else os.path.join(root, p)
m, t, d = c.get("model", {}), c.get("train", {}), c.get("data", {})
print(m.get("d_model", 512), m.get("layers", 6), m.get("heads", 8), m.get("d_ff", 2048),
      m.get("dropout", 0.1), t.get("batch_size", 8), t.get("lr", 1e-4), d.get("max_len", 64),
      corpus(d.get("train", "tatoeba-en-it/train.en-it.tsv")),
      corpus(d.get("valid", "tatoeba-en-it/valid.en-it.tsv")))
PY
)
taskset -c "$CPUS" "$PY" "$REF/quality/train_ref.py" --train "$TRAIN" --valid "$VALID" --eval "$TEST" \
  --d-model "$D" --layers "$L" --heads "$H" --d-ff "$F" --dropout "$DROP" --batch "${REF_BATCH:-$B}" --lr "${REF_LR:-$LR}" \
  --max-len "$ML" --time-budget "$BUDGET" --precision fp32 --threads 2 --seed 0 --name ref \
  --out "$OUT/ref-results.jsonl" --outdir "$OUT/ref" > "$OUT/ref-train.log"

# --- both scored by the same scorer --------------------------------------------------------------
"$PY" "$REF/quality/score.py" "$TEST" "$OUT/ours-hyps.txt" --name ours > "$OUT/ours-score.json"
"$PY" "$REF/quality/score.py" "$TEST" "$OUT/ref/ref/hyp.txt" --name ref > "$OUT/ref-score.json"
python3 - "$OUT" "$steps" <<'PY'
import json, sys
out, steps = sys.argv[1], sys.argv[2]
ours = json.load(open(f"{out}/ours-score.json"))
ref = json.load(open(f"{out}/ref-score.json"))
ref_run = [json.loads(l) for l in open(f"{out}/ref-results.jsonl") if l.strip()][-1]
print("| system | steps | BLEU | chrF |")
print("|---|---|---|---|")
print(f"| ours | {steps} | {ours['bleu']:.2f} | {ours['chrf']:.2f} |")
print(f"| PyTorch reference | {ref_run.get('steps', '-')} | {ref['bleu']:.2f} | {ref['chrf']:.2f} |")
PY
