#!/usr/bin/env bash
# Compiles every CUDA source under kernels/cuda/ to PTX and on to sm_90 machine code (ptxas), and
# lint-checks the `cuda` build of the kernels crate, so a kernel or launcher that does not compile
# cannot land. Needs no GPU: the compilers come from PyPI (scripts/cuda-env.sh ptx).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cuda-env.sh
source scripts/cuda-env.sh ptx
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for src in kernels/cuda/*.cu; do
  name="$(basename "$src" .cu)"
  nvcc -ptx -O3 -std=c++17 "-arch=sm_${CUDA_COMPUTE_CAP}" "$src" -o "$out/$name.ptx"
  ptxas "-arch=sm_${CUDA_COMPUTE_CAP}" -v "$out/$name.ptx" -o "$out/$name.cubin" 2>&1 \
    | grep -E "Compiling entry|registers|spill" | sed "s|^|$name: |"
done
cargo clippy --release -p lorahost-kernels --features cuda --all-targets -- -D warnings
echo "cuda kernels: compiled and lint-clean"
