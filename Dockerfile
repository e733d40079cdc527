# syntax=docker/dockerfile:1
#
# ampserve: multi-stage build. CPU image by default:
#   docker build -t ampserve .
# CUDA image (build and runtime stages on NVIDIA's CUDA images, `--features cuda`; set the
# compute capability of the target GPU because no GPU is visible during `docker build`):
#   docker build -t ampserve:cuda \
#     --build-arg FEATURES=cuda \
#     --build-arg BUILD_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04 \
#     --build-arg CUDA_COMPUTE_CAP=90 .
# CUDA 13.0 to match scripts/build-cuda.sh (cudarc knows CUDA <= 13.4; the H200 driver 580 is
# CUDA 13.0, so PTX from a newer nvcc would not load). The runtime image ships cuBLAS/cuRAND 13.
# Run (see docs/API.md); the image trains on the bundled sample corpus (/app/data) as is:
#   docker run --rm -p 8080:8080 -v ampserve-data:/data ampserve
#   docker run --rm -p 8080:8080 -v ampserve-data:/data -v /path/to/corpora:/corpora:ro \
#     -e AMPSERVE_DATA_ROOTS=/app/data,/corpora ampserve
#   docker run --rm --gpus all -p 8080:8080 -v ampserve-data:/data ampserve:cuda

ARG BUILD_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
ARG FEATURES=""
ARG CUDA_COMPUTE_CAP=""
ENV CARGO_HOME=/usr/local/cargo \
    RUSTUP_HOME=/usr/local/rustup \
    PATH=/usr/local/cargo/bin:$PATH \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
# The CUDA devel image has no Rust toolchain: install one (a no-op on the rust image).
RUN if ! command -v cargo >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends \
            curl ca-certificates build-essential pkg-config && \
        rm -rf /var/lib/apt/lists/* && \
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0; \
    fi
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo .cargo
COPY src src
# Embedded at compile time: the status page (build.rs lists static/, include_bytes! per file) and the migrations (sqlx::migrate!).
COPY static static
COPY migrations migrations
COPY configs configs
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked ${FEATURES:+--features "$FEATURES"} && \
    cp target/release/ampserve /usr/local/bin/ampserve

FROM ${RUNTIME_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && \
    rm -rf /var/lib/apt/lists/* && \
    useradd --system --create-home --home-dir /app ampserve && \
    mkdir -p /data && chown ampserve /data
COPY --from=build /usr/local/bin/ampserve /usr/local/bin/ampserve
COPY --chown=ampserve configs /app/configs
COPY --chown=ampserve data /app/data
WORKDIR /app
USER ampserve
# Migrations and the status page are embedded in the binary. The presets' corpus paths resolve
# against the data roots; the default root is `data` in the working directory (/app/data, the
# bundled sample corpus). AMPSERVE_DATA_ROOTS replaces it (list /app/data to keep it).
ENV AMPSERVE_DATA_DIR=/data \
    AMPSERVE_BIND=0.0.0.0:8080 \
    AMPSERVE_CONFIGS_DIR=/app/configs
VOLUME ["/data"]
EXPOSE 8080
ENTRYPOINT ["ampserve"]
CMD ["serve"]
