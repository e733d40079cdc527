#!/usr/bin/env bash
# The GPU check of issue #7, for ONE run on the GPU machine (an H200 with PyTorch installed),
# from the repository root of a copy of the working tree that carries target/gpu. It never builds:
# `bash scripts/build-cuda.sh` (on a machine without a GPU) stages everything it runs:
#   target/gpu/ampserve.gz        the release binary built with --features cuda (stripped, gzipped
#                                 to fit the device tool's 64 MiB carry; unpacked here to a temp dir)
#   target/gpu/ampserve-tests.gz  the library's unit tests, same build
#   target/gpu/bench/pytorch_ref/bench.py   the PyTorch reference (a copy of ../shared/bench/...)
#   target/gpu/BUILD_INFO.txt     commit and toolchain of the build
# (plain, uncompressed ampserve / ampserve-tests there are used as they are).
#
# Stages, each under its own `timeout` and a global deadline (GPU_CHECK_BUDGET_S, default 480 s,
# so the whole run fits one 9-minute device call with margin); a failing stage is recorded and
# the next one runs. The tutorial size (the write-up's setting) comes first, so a short call still
# measures what matters most:
#   env        nvidia-smi, torch's CUDA, the shared libraries the binary resolves
#   tests      the device unit tests (`cuda_tests::*`: every fused CUDA kernel against its CPU twin,
#              the multi-tensor Adam, the overflow skip; `worker::tests`); a CUDA-SKIPPED is a failure
#   errors     `--device cuda:7` on a one-GPU machine must fail with a clear message
#   tutorial   ampserve bench train --size tutorial, fp32,f16,bf16, TUT_STEPS (50) after TUT_WARMUP (5)
#   torch_tutorial  bench.py --size full (the same preset), same steps
#   small      ampserve bench train --size small, SMALL_STEPS (200) after SMALL_WARMUP (20)
#   torch_small  bench.py --device cuda --size small, same steps
#   ab_reference  the tutorial f16 row again with AMPSERVE_REFERENCE_OPS=1 (fused kernels off)
#   batch64    the tutorial f16 row at batch 64 (--batch 64), ours and torch_batch64 (bench.py)
# Output: $OUT/gpu-results.json (./gpu-results.json when OUT is unset) with every JSON line, the
# side-by-side ratios and each stage's status, plus gpu-check.log (the full console log).
#
# Device tool call (from the lead's checkout, after build-cuda.sh there):
#   run(command="bash scripts/gpu-check.sh", carry=["target/gpu"], timeout_s=560)
set -u
cd "$(dirname "$0")/.."
T_START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DEADLINE=$((T_START + BUDGET))
G=${AMPSERVE_GPU_DIR:-target/gpu}
DEST=${OUT:-.}
mkdir -p "$DEST"
RESULTS=$DEST/gpu-results.json
LOGFILE=$DEST/gpu-check.log
W=$(mktemp -d)
SMALL_STEPS=${SMALL_STEPS:-200}
SMALL_WARMUP=${SMALL_WARMUP:-20}
TUT_STEPS=${TUT_STEPS:-50}
TUT_WARMUP=${TUT_WARMUP:-5}
exec > >(tee "$LOGFILE") 2>&1
export PYTHONUNBUFFERED=1
# stripped binaries: backtraces would be frames of <unknown>, noise around the error messages
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0

STAGES=$W/stages.jsonl
: > "$STAGES"
# stage NAME MAX_SECONDS OUTFILE CMD...: run CMD under timeout min(MAX, time left - 20 s)
stage() {
  local name=$1 max=$2 out=$3
  shift 3
  local now left lim t0 rc
  now=$(date +%s)
  left=$((DEADLINE - now - 20))
  lim=$((max < left ? max : left))
  echo
  echo "=== stage $name (limit ${lim}s): $*"
  if [ "$lim" -lt 5 ]; then
    echo "skipped: no time left"
    printf '{"stage":"%s","rc":null,"seconds":0,"error":"skipped: no time left in the %ss budget"}\n' "$name" "$BUDGET" >> "$STAGES"
    return 0
  fi
  t0=$(date +%s)
  timeout --kill-after=5 "$lim" "$@" > >(tee "$out") 2>&1
  rc=$?
  sleep 0.2 # let tee finish
  local err=""
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then err="timed out after ${lim}s"; elif [ $rc -ne 0 ]; then err="exit status $rc"; fi
  printf '{"stage":"%s","rc":%d,"seconds":%d,"error":%s}\n' "$name" "$rc" "$(($(date +%s) - t0))" \
    "$([ -n "$err" ] && printf '"%s"' "$err" || echo null)" >> "$STAGES"
  echo "--- stage $name: rc=$rc ${err}"
  return 0
}

# --- the staged files (unpack .gz copies; executables may lose their mode in transit)
for f in ampserve ampserve-tests; do
  if [ ! -e "$G/$f" ] && [ -e "$G/$f.gz" ]; then gzip -dc "$G/$f.gz" > "$W/$f" && chmod +x "$W/$f"; fi
done
BIN=$G/ampserve; [ -e "$W/ampserve" ] && BIN=$W/ampserve
TESTS=$G/ampserve-tests; [ -e "$W/ampserve-tests" ] && TESTS=$W/ampserve-tests
[ -e "$BIN" ] && ! [ -x "$BIN" ] && cp "$BIN" "$W/ampserve.x" && chmod +x "$W/ampserve.x" && BIN=$W/ampserve.x
[ -e "$TESTS" ] && ! [ -x "$TESTS" ] && cp "$TESTS" "$W/ampserve-tests.x" && chmod +x "$W/ampserve-tests.x" && TESTS=$W/ampserve-tests.x
BENCH_PY=""
for c in "${PYTORCH_REF:-}" "$G/bench/pytorch_ref/bench.py" shared/bench/pytorch_ref/bench.py ../shared/bench/pytorch_ref/bench.py; do
  if [ -n "$c" ] && [ -f "$c" ]; then BENCH_PY=$c; break; fi
done

# --- shared libraries: cuBLAS & co from the PyTorch install (CUDA 13 wheels), the driver's libcuda
LIBDIRS=$(python3 - <<'EOF' 2>/dev/null
import glob, os
dirs = []
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
try:
    import torch
    roots.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
except Exception:
    pass
for r in roots:
    for pat in ("libcublas.so.*", "libcublasLt.so.*", "libcurand.so.*", "libcudart.so.*", "libnvrtc.so.*"):
        for f in glob.glob(os.path.join(r, "**", pat), recursive=True):
            d = os.path.dirname(f)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
EOF
)
if [ -z "$LIBDIRS" ]; then
  LIBDIRS=$(find / -xdev -name 'libcublas.so.13' -printf '%h\n' 2>/dev/null | head -1)
fi
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64; do
  [ -d "$d" ] && LIBDIRS="$LIBDIRS:$d"
done
export LD_LIBRARY_PATH="${LIBDIRS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
echo "binary: $BIN   tests: $TESTS   bench.py: ${BENCH_PY:-<missing>}"
export AMPSERVE_BUILD_INFO=$G/BUILD_INFO.txt
cat "$AMPSERVE_BUILD_INFO" 2>/dev/null

stage env 40 "$W/env.txt" bash -c '
  rc=0
  nvidia-smi || rc=1
  nvidia-smi -L
  python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())" || rc=1
  echo "--- this machine: $(ldd --version | head -1) (BUILD_INFO.txt gives the newest GLIBC the binaries need)"
  echo "--- ldd $1"; ldd "$1" | grep -E "cuda|cublas|curand|nvrtc|not found"
  ldd "$1" | grep -q "not found" && rc=1
  exit $rc' _ "$BIN"

# --nocapture: a test that skips prints CUDA-SKIPPED, which must show in the log to count as a failure
stage tests 120 "$W/tests.txt" "$TESTS" cuda_tests worker::tests --test-threads=1 --nocapture

stage errors 20 "$W/errors.txt" bash -c '
  out=$("$1" bench train --device cuda:7 --size tiny --precision fp32 --steps 1 --warmup 0 2>&1); rc=$?
  echo "$out"
  [ $rc -ne 0 ] && echo "$out" | grep -q "cannot open device .cuda:7."' _ "$BIN"

stage tutorial 100 "$W/tutorial.jsonl" "$BIN" bench train --device cuda:0 --size tutorial \
  --precision fp32,f16,bf16 --steps "$TUT_STEPS" --warmup "$TUT_WARMUP"

if [ -n "$BENCH_PY" ]; then
  stage torch_tutorial 60 "$W/torch_tutorial.jsonl" python3 "$BENCH_PY" --device cuda --size full \
    --modes fp32,fp16,bf16 --decode-modes '' --steps "$TUT_STEPS" --warmup "$TUT_WARMUP"
else
  printf '{"stage":"torch_tutorial","rc":null,"seconds":0,"error":"bench.py not found"}\n' >> "$STAGES"
fi

stage small 90 "$W/small.jsonl" "$BIN" bench train --device cuda:0 --size small \
  --precision fp32,f16,bf16 --steps "$SMALL_STEPS" --warmup "$SMALL_WARMUP"

if [ -n "$BENCH_PY" ]; then
  stage torch_small 60 "$W/torch_small.jsonl" python3 "$BENCH_PY" --device cuda --size small \
    --modes fp32,fp16,bf16 --decode-modes '' --steps "$SMALL_STEPS" --warmup "$SMALL_WARMUP"
else
  printf '{"stage":"torch_small","rc":null,"seconds":0,"error":"bench.py not found (stage it with build-cuda.sh or set PYTORCH_REF)"}\n' >> "$STAGES"
fi

# A/B: the same tutorial f16 row with the reference compositions instead of the fused kernels.
stage ab_reference 40 "$W/ab_reference.jsonl" env AMPSERVE_REFERENCE_OPS=1 "$BIN" bench train \
  --device cuda:0 --size tutorial --precision f16 --steps "$TUT_STEPS" --warmup "$TUT_WARMUP"

# Batch 64: the H200 is mostly idle at the write-up's batch 8.
if "$BIN" bench train --help 2>/dev/null | grep -q -- '--batch'; then
  stage batch64 60 "$W/batch64.jsonl" "$BIN" bench train --device cuda:0 --size tutorial \
    --precision f16 --batch 64 --steps 20 --warmup 3
else
  printf '{"stage":"batch64","rc":null,"seconds":0,"error":"this build of bench train has no --batch"}\n' >> "$STAGES"
fi
if [ -n "$BENCH_PY" ]; then
  stage torch_batch64 50 "$W/torch_batch64.jsonl" python3 "$BENCH_PY" --device cuda --size full \
    --batch 64 --modes fp16 --decode-modes '' --steps 20 --warmup 3
fi

# --- one JSON file: stages, test counts, every record, the ratios
python3 - "$W" "$RESULTS" "$BUDGET" "$T_START" <<'EOF'
import json, os, re, sys, time
w, dest, budget, t_start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def text(name):
    try:
        with open(os.path.join(w, name), errors="replace") as f:
            return f.read()
    except OSError:
        return ""

def records(name):
    out = []
    for line in text(name).splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out

stages = {}
for r in records("stages.jsonl"):
    name = r.pop("stage")
    r["output_tail"] = text(name + ".txt" if name in ("env", "tests", "errors") else name + ".jsonl")[-3000:]
    stages[name] = r

t = text("tests.txt")
m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored", t)
tests = {
    "ran": bool(m),
    "passed": int(m.group(2)) if m else 0,
    "failed": int(m.group(3)) if m else 0,
    "cuda_skipped": t.count("CUDA-SKIPPED"),
    "failures": re.findall(r"^test (\S+) \.\.\. FAILED", t, re.M),
}
tests["ok"] = bool(m) and tests["failed"] == 0 and tests["cuda_skipped"] == 0 and tests["passed"] > 0
if "tests" in stages and tests["cuda_skipped"]:
    stages["tests"]["error"] = "tests skipped: no usable CUDA device in the test process"

def tagged(name, tag):
    out = [r for r in records(name) if r.get("kind") == "train"]
    for r in out:
        r["size"] = r.get("size", "?") + tag
    return out

ours = [r for f in ("tutorial.jsonl", "small.jsonl") for r in records(f) if r.get("kind") == "train"]
ours += tagged("ab_reference.jsonl", "+reference_ops") + tagged("batch64.jsonl", "+batch64")
torch = [r for f in ("torch_tutorial.jsonl", "torch_small.jsonl") for r in records(f)]
for r in records("torch_batch64.jsonl"):
    if r.get("kind") == "train":
        r["size"] = "tutorial+batch64"
    torch.append(r)
torch_env = [r for r in torch if r.get("kind") == "env"]
torch_train = [r for r in torch if r.get("kind") == "train"]

def key_ours(r):
    return (r["size"], r["precision"])

def key_torch(r):
    size = "tutorial" if r.get("size") == "full" else r.get("size")
    prec = {"fp16": "f16"}.get(r.get("mode"), r.get("mode"))
    return (size, prec)

tmap = {key_torch(r): r for r in torch_train if r.get("status", "ok") == "ok"}
fp32_torch = {s: r.get("tgt_tokens_per_s") for (s, p), r in tmap.items() if p == "fp32"}
comparison = []
for r in ours:
    size, prec = key_ours(r)
    t_rec = tmap.get((size, prec))
    row = {
        "size": size,
        "precision": prec,
        "ours_step_ms_median": r.get("step_ms_median"),
        "ours_tokens_per_s": r.get("tokens_per_s"),
        "ours_speedup_vs_fp32": r.get("speedup_vs_fp32"),
        "ours_loss_first": r.get("loss_first"),
        "ours_loss_last": r.get("loss_last"),
        "ours_skipped_steps": r.get("skipped_steps"),
        "ours_device_ops_per_step": r.get("device_ops_per_step"),
        "ours_h2d_bytes_per_step": r.get("h2d_bytes_per_step"),
        "ours_host_syncs_per_step": r.get("host_syncs_per_step"),
        "torch_step_ms_median": None,
        "torch_tokens_per_s": None,
        "torch_speedup_vs_fp32": None,
        "torch_loss_first": None,
        "torch_loss_last": None,
        "ours_over_torch": None,
    }
    if t_rec:
        tps = t_rec.get("tgt_tokens_per_s")
        row.update(
            torch_step_ms_median=(t_rec.get("step_s_median") or 0) * 1e3 or None,
            torch_tokens_per_s=tps,
            torch_loss_first=t_rec.get("loss_first"),
            torch_loss_last=t_rec.get("loss_last"),
            torch_max_memory_allocated_mib=t_rec.get("max_memory_allocated_mib"),
        )
        if tps and fp32_torch.get(size):
            row["torch_speedup_vs_fp32"] = tps / fp32_torch[size]
        if tps and r.get("tokens_per_s"):
            row["ours_over_torch"] = r["tokens_per_s"] / tps
    comparison.append(row)

result = {
    "kind": "gpu-check",
    "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "wall_s": int(time.time()) - t_start,
    "budget_s": budget,
    "settings": {k: os.environ.get(k) for k in ("SMALL_STEPS", "SMALL_WARMUP", "TUT_STEPS", "TUT_WARMUP")},
    "ld_library_path": os.environ.get("LD_LIBRARY_PATH"),
    "build_info": None,
    "nvidia_smi": text("env.txt")[:4000],
    "stages": stages,
    "tests": tests,
    "ok": all(s.get("error") in (None, "") for s in stages.values()) and tests["ok"],
    "comparison": comparison,
    "ampserve": ours,
    "pytorch_env": torch_env,
    "pytorch": torch_train,
}
bi = os.environ.get("AMPSERVE_BUILD_INFO")
if bi and os.path.isfile(bi):
    with open(bi) as f:
        result["build_info"] = f.read()
with open(dest, "w") as f:
    json.dump(result, f, indent=1)
print()
print("=== summary (tokens/s; ratio = ours / PyTorch)")
print(f"{'size':9} {'prec':5} {'ours':>10} {'torch':>10} {'ratio':>6} {'ours/fp32':>9} {'torch/fp32':>10} {'ours loss':>17} {'torch loss':>17}")
fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
for c in comparison:
    print(f"{c['size']:9} {c['precision']:5} {fmt(c['ours_tokens_per_s'],0):>10} {fmt(c['torch_tokens_per_s'],0):>10} "
          f"{fmt(c['ours_over_torch'],2):>6} {fmt(c['ours_speedup_vs_fp32'],2):>9} {fmt(c['torch_speedup_vs_fp32'],2):>10} "
          f"{fmt(c['ours_loss_first'],3)+'->'+fmt(c['ours_loss_last'],3):>17} {fmt(c['torch_loss_first'],3)+'->'+fmt(c['torch_loss_last'],3):>17}")
print("tests:", json.dumps(tests))
for n, s in stages.items():
    print(f"stage {n}: rc={s.get('rc')} {s.get('seconds')}s {s.get('error') or 'ok'}")
print("overall ok:", result["ok"], "->", dest)
EOF
echo "total $(($(date +%s) - T_START)) s"
rm -rf "$W"
exit 0
