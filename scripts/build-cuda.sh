#!/usr/bin/env bash
# Build `ampserve --features cuda` (release) on a machine WITHOUT a GPU or system CUDA, from PyPI
# wheels only, following ../shared/notes/cuda-build.md:
#   - CUDA 13.0 toolkit wheels (cudarc 0.19 knows CUDA <= 13.4; the H200 driver 580 is CUDA 13.0)
#   - unversioned .so symlinks so -lcublas etc. link
#   - a libcuda.so.1 STUB (every cu* symbol cudarc declares, returning 999) to link against;
#     at run time the GPU machine's real driver is used. Never ship the stub.
# Status: written from the measured recipe in that note; not yet run end to end from this script.
# Usage: bash scripts/build-cuda.sh        (TK=DIR to choose the toolkit folder)
# Result: target/release/ampserve with the CUDA kernels inside (sm_90, Hopper).
set -euo pipefail
cd "$(dirname "$0")/.."
TK=${TK:-$HOME/.cache/ampserve-cuda-tk}
CU=$TK/nvidia/cu13
if [ ! -x "$CU/bin/nvcc" ]; then
  echo "installing the CUDA 13.0 toolkit wheels into $TK (about 675 MB)"
  python3 -m pip install --quiet --no-deps --target "$TK" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.1.0.3 \
    nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
fi
for l in cublas cublasLt curand cudart nvrtc; do
  f=$(ls "$CU/lib/lib$l.so."* 2>/dev/null | sort | head -1 || true)
  [ -n "$f" ] && ln -sf "$(basename "$f")" "$CU/lib/lib$l.so"
done
# libcuda stub from the symbols cudarc declares
cargo fetch -q
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort | tail -1)
mkdir -p "$CU/lib/stubs"
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
  | awk '{print "int " $1 "(void) { return 999; }"}' > "$CU/lib/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so.1" "$CU/lib/stubs/libcuda_stub.c"
ln -sf libcuda.so.1 "$CU/lib/stubs/libcuda.so"
export PATH="$CU/bin:$PATH" CUDA_HOME="$CU" CUDA_PATH="$CU" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH="$CU/lib/stubs:$CU/lib:${LIBRARY_PATH:-}"
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+avx2,+fma,+f16c -L native=$CU/lib -L native=$CU/lib/stubs"
nvcc --version | tail -2
cargo build --release --features cuda
echo "built target/release/ampserve with --features cuda"
echo "run it where a driver exists, with LD_LIBRARY_PATH pointing at libcublas.so.13 & co (see ../shared/notes/cuda-build.md)"
