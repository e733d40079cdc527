#!/usr/bin/env python3
"""Read a run directory's event files with TensorBoard's own loader and compare its scalars with
metrics.jsonl / validations.jsonl (not CI: needs `pip install tensorboard`).

    python3 scripts/tensorboard-check.py runs/tiny-en-it-fp32-1764420000

Exits 1 on any difference (values compared as f32, non-finite grad norms as null in JSONL).
"""
import json, math, os, struct, sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run = sys.argv[1]
acc = EventAccumulator(run, size_guidance={"scalars": 0})
acc.Reload()
tb = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
f32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]
bad = 0

def check(tag, step, want):
    global bad
    got = tb.get(tag, {}).get(step)
    ok = got is not None and (
        (want is None and not math.isfinite(got)) or (want is not None and f32(want) == got))
    if not ok:
        bad += 1
        print(f"{tag}@{step}: tensorboard {got} vs jsonl {want}")

def jsonl(name):
    path = os.path.join(run, name)
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []

for m in jsonl("metrics.jsonl"):
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("train/tokens_per_s", "tokens_per_s"), ("amp/loss_scale", "loss_scale")]:
        check(tag, m["step"], m[key])
for v in jsonl("validations.jsonl"):
    for tag, key in [("valid/loss", "val_loss"), ("valid/bleu", "bleu"), ("valid/chrf", "chrf"),
                     ("valid/cer", "cer"), ("valid/wer", "wer")]:
        check(tag, v["step"], v[key])
print(f"{sum(len(v) for v in tb.values())} scalars in {len(tb)} tags; {bad} differences")
sys.exit(1 if bad else 0)
