#!/usr/bin/env bash
# Builds the GPU check's binaries here (no GPU needed) and packs them for the GPU machine:
# bench/gpu/dist/*.gz, git-ignored, carried to the device by the caller (see bench/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../../scripts/cuda-env.sh
source scripts/cuda-env.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
cargo build --release -p lorahost-bench --features cuda --bin gpu_kernels --bin gpu_model --bin gpu_e2e
mkdir -p bench/gpu/dist
for bin in gpu_kernels gpu_model gpu_e2e; do
  strip -o "bench/gpu/dist/$bin" "$CARGO_TARGET_DIR/release/$bin"
  gzip -9 -f "bench/gpu/dist/$bin"
done
ls -la bench/gpu/dist
