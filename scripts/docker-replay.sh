#!/usr/bin/env bash
# Replay the Dockerfile without Docker (no daemon on these machines): copy exactly what its COPY
# lines copy into an empty folder, run its build step there, lay out the runtime stage's files
# the same way, start the binary with the runtime stage's ENV, WORKDIR and CMD, check /healthz
# and run a tiny training job to the end. A file the build needs but no COPY brings fails here
# as it would in `docker build`. (tests/docker.rs checks the same coverage statically.)
#
# Usage (from anywhere): bash scripts/docker-replay.sh
#   REPLAY_DIR=DIR        where to lay out the copy (default: a new temp dir; kept afterwards)
#   CARGO_TARGET_DIR=DIR  reuse a build cache (a copy of target/), like the Dockerfile's cache mount
#   REPLAY_PROFILE=dev    build `cargo build --locked` instead of the Dockerfile's `--release`
#                         (reuses a debug cache; everything else is replayed unchanged)
#   PORT=N                port on 127.0.0.1 (default 18080); the image's 0.0.0.0 is never bound
# Paths that the image has at / (/src, /app, /data) live under REPLAY_DIR instead.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${REPLAY_DIR:-$(mktemp -d /tmp/ampserve-replay.XXXXXX)}
PORT=${PORT:-18080}
PROFILE=${REPLAY_PROFILE:-release}
mkdir -p "$ROOT"
echo "replaying $REPO/Dockerfile in $ROOT" >&2

# The Dockerfile as lines "stage<TAB>kind<TAB>a<TAB>b": COPY src dest (dest made absolute with the
# WORKDIR in force), ENV key value, WORKDIR dir, CMD/ENTRYPOINT words. --from copies are skipped
# (the binary is placed by the build step below).
plan=$(python3 - "$REPO/Dockerfile" <<'PY'
import json, os, shlex, sys
lines, cur = [], ""
for raw in open(sys.argv[1], encoding="utf-8"):
    t = raw.strip()
    if not cur and (not t or t.startswith("#")):
        continue
    if t.endswith("\\"):
        cur += t[:-1] + " "
        continue
    lines.append((cur + t).strip()); cur = ""
stage, wd = -1, "/"
for l in lines:
    instr, _, rest = l.partition(" ")
    instr = instr.upper()
    if instr == "FROM":
        stage += 1; wd = "/"
    elif instr == "WORKDIR":
        wd = os.path.normpath(os.path.join(wd, rest.strip()))
        print(f"{stage}\tWORKDIR\t{wd}\t")
    elif instr == "ENV":
        for kv in shlex.split(rest):
            k, _, v = kv.partition("=")
            print(f"{stage}\tENV\t{k}\t{v}")
    elif instr == "COPY":
        words = [w for w in rest.split()]
        if any(w.startswith("--from") for w in words):
            continue
        args = [w for w in words if not w.startswith("--")]
        srcs, dest = args[:-1], args[-1]
        as_dir = dest.endswith("/") or len(srcs) > 1
        dest = os.path.normpath(os.path.join(wd, dest))
        for s in srcs:
            s = s.rstrip("/")
            to = os.path.join(dest, os.path.basename(s)) if as_dir else dest
            print(f"{stage}\tCOPY\t{s}\t{to}")
    elif instr in ("CMD", "ENTRYPOINT"):
        words = json.loads(rest) if rest.strip().startswith("[") else shlex.split(rest)
        print(f"{stage}\t{instr}\t{' '.join(words)}\t")
    elif instr == "RUN" and "cargo build" in rest:
        print(f"{stage}\tBUILD\t{wd}\t")
PY
)
last_stage=$(printf '%s\n' "$plan" | cut -f1 | sort -n | tail -1)

# --- build stage: only the copied files, then the build step ---------------------------------
build_wd=$(printf '%s\n' "$plan" | awk -F'\t' '$1==0 && $2=="BUILD" {print $3}')
[ -n "$build_wd" ] || { echo "error: no 'RUN cargo build' in the first stage" >&2; exit 1; }
rm -rf "$ROOT$build_wd"
while IFS=$'\t' read -r st kind a b; do
  [ "$st" = 0 ] && [ "$kind" = COPY ] || continue
  mkdir -p "$(dirname "$ROOT$b")"
  cp -a "$REPO/$a" "$ROOT$b"
done <<<"$plan"
echo "build context: $(cd "$ROOT$build_wd" && ls -A | tr '\n' ' ')" >&2
cd "$ROOT$build_wd"
if [ "$PROFILE" = release ]; then
  nice -n 10 cargo build --release --locked
else
  nice -n 10 cargo build --locked
fi
target=${CARGO_TARGET_DIR:-$ROOT$build_wd/target}
case "$target" in /*) ;; *) target=$ROOT$build_wd/$target ;; esac
mkdir -p "$ROOT/usr/local/bin"
cp "$target/$([ "$PROFILE" = release ] && echo release || echo debug)/ampserve" "$ROOT/usr/local/bin/ampserve"

# --- runtime stage: its COPY lines, ENV (paths under $ROOT, bind on loopback), WORKDIR, CMD ----
rm -rf "$ROOT/app" "$ROOT/data"
envs=()
workdir=/
entry=""
cmd=""
while IFS=$'\t' read -r st kind a b; do
  [ "$st" = "$last_stage" ] || continue
  case "$kind" in
    COPY) mkdir -p "$(dirname "$ROOT$b")"; cp -a "$REPO/$a" "$ROOT$b" ;;
    ENV)
      case "$a" in
        AMPSERVE_BIND) b=127.0.0.1:$PORT ;;
        *) case "$b" in /*) b=$ROOT$b ;; esac ;;
      esac
      envs+=("$a=$b") ;;
    WORKDIR) workdir=$a ;;
    ENTRYPOINT) entry=$a ;;
    CMD) cmd=$a ;;
  esac
done <<<"$plan"
[ "$entry" = ampserve ] || { echo "error: unexpected ENTRYPOINT '$entry'" >&2; exit 1; }
mkdir -p "$ROOT/data" "$ROOT$workdir"
cd "$ROOT$workdir"
echo "runtime: cd $workdir; ${envs[*]} ampserve $cmd" >&2
# shellcheck disable=SC2086
env "${envs[@]}" "$ROOT/usr/local/bin/ampserve" $cmd >"$ROOT/server.log" 2>&1 &
server=$!
stop() { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
trap stop EXIT
base=http://127.0.0.1:$PORT
for _ in $(seq 1 100); do
  curl -sf "$base/healthz" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$ROOT/server.log" >&2; echo "error: the server exited" >&2; exit 1; }
  sleep 0.2
done
echo "healthz: $(curl -sf "$base/healthz")" >&2

# A tiny job on the bundled sample corpus through the tiny preset, as a user of the image would.
job=$(curl -sf "$base/api/jobs" -H 'content-type: application/json' -d '{
  "config": "tiny", "name": "docker-replay",
  "data": {"max_train_pairs": 300},
  "model": {"d_model": 32, "layers": 1, "heads": 2, "d_ff": 64},
  "train": {"batch_size": 16, "max_steps": 20, "epochs": 1000, "warmup_steps": 10,
            "valid_every": 20, "valid_max_sentences": 20, "valid_samples": 1},
  "checkpoint": {"every_steps": 10, "keep_last": 1}}')
id=$(printf '%s' "$job" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "job $id submitted" >&2
status=""
for _ in $(seq 1 600); do
  status=$(curl -sf "$base/api/jobs/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  case "$status" in succeeded|failed|cancelled) break ;; esac
  sleep 1
done
curl -sf "$base/api/jobs/$id" | python3 -c 'import json,sys; j=json.load(sys.stdin); print({"id": j["id"], "status": j["status"], "step": j["progress"]["step"], "error": j["error"]})' >&2
[ "$status" = succeeded ] || { tail -20 "$ROOT/server.log" >&2; echo "error: job $id ended $status" >&2; exit 1; }
echo "docker replay passed: built from the copied files only, /healthz answered, job $id succeeded" >&2
