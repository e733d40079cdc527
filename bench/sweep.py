#!/usr/bin/env python3
"""Preset sweep for quality per minute (issue 17): one training run per point, scored on a test split.

    python3 bench/sweep.py --base configs/tiny.toml --points bench/sweep-tiny.txt \
        --test data/tatoeba-en-it/test.en-it.tsv --out target/sweep/tiny [--only NAME ...]

Each line of the points file is `name key=value ...` (TOML values: `train.lr=1e-3`, `data.tokenizer="bpe"`),
merged over the base preset. Budget per point: `--max-time-s` (wall clock, idle machine only), or
`--steps-from FILE` (a `name steps` file: the optimizer steps the same point made in that wall-clock budget on
the idle machine), which makes the quality of a point independent of the load while it trains. Every run is
exported twice (its best checkpoint by validation BLEU, and the average of the last `--average N` checkpoints),
each export translated and scored on the test split with `ampserve eval` (sacreBLEU 13a BLEU, chrF).
One JSON line per point goes to OUT/results.jsonl; a markdown table is printed at the end.
"""
import argparse, json, os, subprocess, sys, time, tomllib


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def write_toml(cfg, path):
    with open(path, "w") as f:
        for k, v in cfg.items():
            if not isinstance(v, dict):
                f.write(f"{k} = {toml_value(v)}\n")
        for sec, body in cfg.items():
            if isinstance(body, dict):
                f.write(f"\n[{sec}]\n")
                for k, v in body.items():
                    f.write(f"{k} = {toml_value(v)}\n")


def parse_points(path):
    points = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, *kvs = line.split()
        over = {}
        for kv in kvs:
            key, val = kv.split("=", 1)
            over[key] = tomllib.loads(f"v = {val}")["v"]
        points.append((name, over))
    return points


def run(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--points", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--bin", default="target/release/ampserve")
    ap.add_argument("--max-time-s", type=float, default=0)
    ap.add_argument("--steps-from")
    ap.add_argument("--average", type=int, default=5)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--beam", type=int, default=1, help="also score the averaged export with this beam (>1)")
    a = ap.parse_args()
    base = tomllib.load(open(a.base, "rb"))
    steps_for = {}
    if a.steps_from:
        for line in open(a.steps_from):
            if line.strip() and not line.startswith("#"):
                n, s = line.split()[:2]
                steps_for[n] = int(s)
    os.makedirs(a.out, exist_ok=True)
    nice = ["nice", "-n", str(a.nice)] if a.nice else []
    for name, over in parse_points(a.points):
        if a.only and name not in a.only:
            continue
        d = os.path.join(a.out, name)
        if os.path.exists(os.path.join(d, "done.json")):
            continue
        os.makedirs(d, exist_ok=True)
        cfg = json.loads(json.dumps(base))
        for key, val in over.items():
            sec, field = key.split(".", 1)
            cfg.setdefault(sec, {})[field] = val
        cfg["train"]["epochs"] = 10000
        cfg["train"].pop("early_stopping", None)
        ck = cfg.setdefault("checkpoint", {})
        ck["keep_last"] = max(ck.get("keep_last", 3), a.average)
        cfg_path = os.path.join(d, "config.toml")
        write_toml(cfg, cfg_path)
        train = nice + [a.bin, "train", "--config", cfg_path, "--data-root", a.data_root,
                        "--out", os.path.join(d, "run"), "--json"]
        if a.steps_from:
            train += ["--max-steps", str(steps_for[name])]
        if a.max_time_s:
            train += ["--max-time-s", str(a.max_time_s)]
        if os.path.exists(os.path.join(d, "run")):
            subprocess.run(["rm", "-rf", os.path.join(d, "run")], check=True)
        t0 = time.time()
        with open(os.path.join(d, "train.jsonl"), "w") as log:
            run(train, stdout=log)
        wall = time.time() - t0
        events = [json.loads(l) for l in open(os.path.join(d, "train.jsonl")) if l.startswith("{")]
        finished = [e for e in events if e.get("type") == "finished"][-1]
        row = {"name": name, "overrides": over, "steps": finished.get("steps"), "train_wall_s": round(wall, 1),
               "budget": {"max_time_s": a.max_time_s, "max_steps": steps_for.get(name)}}
        def score(label, model, beam=1):
            with open(os.path.join(d, f"eval-{label}.json"), "w") as f:
                run(nice + [a.bin, "eval", "--model", model, "--tsv", a.test, "--beam", str(beam),
                            "--hyps", os.path.join(d, f"hyps-{label}.txt")], stdout=f)
            r = json.load(open(os.path.join(d, f"eval-{label}.json")))
            row[label] = {"bleu": round(r["bleu"], 2), "chrf": round(r["chrf"], 2)}

        for label, extra in (("best", ["--checkpoint", "best", "--average-last", "1"]),
                             (f"avg{a.average}", ["--checkpoint", "latest", "--average-last", str(a.average)])):
            model = os.path.join(d, f"model-{label}")
            subprocess.run(["rm", "-rf", model], check=True)
            with open(os.path.join(d, f"manifest-{label}.json"), "w") as f:
                run([a.bin, "export", "--run", os.path.join(d, "run"), "--out", model] + extra, stdout=f)
            score(label, model)
        if a.beam > 1:
            score(f"avg{a.average}-beam{a.beam}", os.path.join(d, f"model-avg{a.average}"), a.beam)
        json.dump(row, open(os.path.join(d, "done.json"), "w"))
        with open(os.path.join(a.out, "results.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr)
    rows = [json.loads(l) for l in open(os.path.join(a.out, "results.jsonl"))] if os.path.exists(
        os.path.join(a.out, "results.jsonl")) else []
    avg = f"avg{a.average}"
    bm = f"{avg}-beam{a.beam}"
    print(f"| point | overrides | steps | best BLEU | best chrF | {avg} BLEU | {avg} chrF | {bm} BLEU | {bm} chrF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = " ".join(f"{k}={v}" for k, v in r["overrides"].items())
        b, v, w = r["best"], r.get(avg, {}), r.get(bm, {})
        print(f"| {r['name']} | {o} | {r['steps']} | {b['bleu']} | {b['chrf']} | {v.get('bleu')} | {v.get('chrf')} "
              f"| {w.get('bleu')} | {w.get('chrf')} |")


if __name__ == "__main__":
    main()
