#!/usr/bin/env bash
# Build `ampserve --features cuda` (release) on a machine WITHOUT a GPU or system CUDA, from PyPI
# wheels only (see ../shared/notes/cuda-build.md for why each step is there):
#   - CUDA 13.0 toolkit wheels (cudarc 0.19 knows CUDA <= 13.4; the H200's driver 580 is CUDA 13.0,
#     so newer PTX would not load there), installed once into $TK (default ~/.cache/ampserve-cuda-tk);
#   - unversioned .so symlinks so that -lcublas & co link;
#   - a libcuda.so.1 STUB (every cu* symbol cudarc declares, each returning 999) to link against.
#     At run time the GPU machine's real driver is used. Never ship the stub.
#
# Usage (from anywhere; runs in the repository root):
#   bash scripts/build-cuda.sh            release binary + device test binary, staged in target/gpu/
#   bash scripts/build-cuda.sh CMD ARGS   run CMD in the CUDA build environment instead, e.g.
#       bash scripts/build-cuda.sh cargo clippy --release --features cuda --all-targets -- -D warnings
#     (use --release: it reuses the PTX that nvcc built; a dev-profile command runs nvcc again)
#   TK=DIR                                toolkit folder (default ~/.cache/ampserve-cuda-tk)
#   CUDA_COMPUTE_CAP=90                   the target GPU (90: Hopper, H100/H200)
#
# Result of the default mode:
#   target/release/ampserve          the CUDA build (PTX kernels inside), with debug info
#   target/gpu/ampserve.gz           the same, stripped and gzipped (what travels to a GPU machine)
#   target/gpu/ampserve-tests.gz     the library's unit tests, release, --features cuda, likewise
#   target/gpu/bench/pytorch_ref/    a copy of ../shared/bench/pytorch_ref (bench.py, README)
# `scripts/gpu-check.sh` runs those on the GPU machine; the folder target/gpu is all it needs
# besides the scripts (carry it: `carry: ["target/gpu"]`).
#
# The cargo config's rustflags (.cargo/config.toml) stay in force: RUSTFLAGS is deliberately NOT
# set, so the CPU build's dependencies in target/release are reused. Builds run under `nice`.
set -euo pipefail
cd "$(dirname "$0")/.."
TK=${TK:-$HOME/.cache/ampserve-cuda-tk}
CU=$TK/nvidia/cu13
if [ ! -x "$CU/bin/nvcc" ]; then
  echo "installing the CUDA 13.0 toolkit wheels into $TK (about 1.2 GB on disk)" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$TK" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.1.0.3 \
    nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
fi
for l in cublas cublasLt curand cudart nvrtc; do
  f=$(ls "$CU/lib/lib$l.so."* 2>/dev/null | sort | head -1 || true)
  if [ -z "$f" ]; then
    echo "error: $CU/lib has no lib$l.so.* (incomplete toolkit in $TK? delete it and rerun)" >&2
    exit 1
  fi
  ln -sf "$(basename "$f")" "$CU/lib/lib$l.so"
done

# The libcuda stub, from the driver API symbols of the cudarc version in Cargo.lock.
if [ ! -f "$CU/lib/stubs/libcuda.so.1" ]; then
  ver=$(awk '/^name = "cudarc"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)
  cargo fetch -q
  CUDARC="${CARGO_HOME:-$HOME/.cargo}/registry/src/$(ls "${CARGO_HOME:-$HOME/.cargo}/registry/src" | head -1)/cudarc-$ver"
  [ -f "$CUDARC/src/driver/sys/mod.rs" ] || { echo "error: cudarc $ver sources not found at $CUDARC" >&2; exit 1; }
  mkdir -p "$CU/lib/stubs"
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' > "$CU/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so.1" "$CU/lib/stubs/libcuda_stub.c"
  ln -sf libcuda.so.1 "$CU/lib/stubs/libcuda.so"
fi

# cudarc's build script reads `nvcc --version` (-> cuda-13000) and adds $CUDA_HOME/lib and
# $CUDA_HOME/lib/stubs to the link search path; candle-kernels' build finds nvcc on PATH.
export PATH="$CU/bin:$PATH" CUDA_HOME="$CU" CUDA_PATH="$CU" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH="$CU/lib/stubs:$CU/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

if [ $# -gt 0 ]; then
  exec nice -n 19 "$@"
fi

nvcc --version | tail -2
t0=$(date +%s)
nice -n 19 cargo build --release --features cuda
t1=$(date +%s)
echo "cargo build --release --features cuda: $((t1 - t0)) s"
# The lib's unit tests (the ones that touch the device are `cuda_*`), release profile.
tests=$(nice -n 19 cargo test --release --features cuda --lib --no-run --message-format=json \
  | jq -r 'select(.reason == "compiler-artifact" and .profile.test == true and .target.name == "ampserve") | .executable' \
  | tail -1)
t2=$(date +%s)
echo "cargo test --release --features cuda --lib --no-run: $((t2 - t1)) s"
[ -x "$tests" ] || { echo "error: no test executable found" >&2; exit 1; }
G=$CARGO_TARGET_DIR/gpu
rm -rf "$G"
mkdir -p "$G/bench"
# Stripped, each is about 62 MB (candle's CUDA kernels inside); gzip brings the pair to about
# 34 MB, under the device tool's 64 MiB carry. gpu-check.sh unpacks them.
for pair in "ampserve:$CARGO_TARGET_DIR/release/ampserve" "ampserve-tests:$tests"; do
  strip -o "$G/${pair%%:*}" "${pair#*:}"
  gzip -9 "$G/${pair%%:*}"
done
if [ -f ../shared/bench/pytorch_ref/bench.py ]; then
  mkdir -p "$G/bench/pytorch_ref"
  cp ../shared/bench/pytorch_ref/bench.py ../shared/bench/pytorch_ref/README.md "$G/bench/pytorch_ref/"
fi
{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), glibc $(ldd --version | head -1 | awk '{print $NF}')"
  echo "features: cuda; CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; $(nvcc --version | tail -2 | head -1)"
  echo "tests: $(basename "$tests")"
} > "$G/BUILD_INFO.txt"
du -sh "$G"/* | sed 's/^/staged: /'
# What the binaries need of the GPU machine (glibc, libstdc++, shared libraries), known before
# any device time is spent; also kept in BUILD_INFO.txt, which travels with them.
bash scripts/preflight.sh "$G/ampserve.gz" "$G/ampserve-tests.gz" | tee -a "$G/BUILD_INFO.txt"
echo "built target/release/ampserve with --features cuda (needs libcuda.so.1 from a driver and"
echo "libcublas.so.13 & co on LD_LIBRARY_PATH; scripts/gpu-check.sh sets that up on the GPU machine)"
