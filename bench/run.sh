#!/usr/bin/env bash
# End-to-end CPU benchmark, side by side in one script: the machine's limits (STREAM triad,
# f32 GEMM), llama.cpp on the same GGUF (llama-bench, llama-batched-bench), lorahost's `e2e`
# benchmark for --dtype auto and f32, and peak RSS of `lorahost generate`.
#
#   bash bench/run.sh            # OUT=bench/out/<date>; LLAMA_BIN=/tmp/cpubase/build/bin
#
# llama.cpp is built from PyPI by ../shared/anchors/cpu/build_llamacpp.sh (WORK=/tmp/cpubase).
# Run on a quiet machine: other jobs distort 2-thread timings badly.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$ROOT/../shared/anchors/cpu}
LLAMA_BIN=${LLAMA_BIN:-/tmp/cpubase/build/bin}
OUT=${OUT:-$ROOT/bench/out/$(date +%Y%m%d-%H%M%S)}
REPS=${REPS:-3}
mkdir -p "$OUT"
cd "$ROOT"
cargo build --release -p lorahost -p lorahost-bench
MODEL=$(./target/release/lorahost generate --prompt x --max-tokens 1 >/dev/null && ls "${LORAHOST_CACHE:-$HOME/.cache/lorahost}/models/SmolLM2-135M-Instruct.Q4_1.gguf")

echo "== machine limits" | tee "$OUT/limits.txt"
gcc -O3 -march=native -fopenmp "$ANCHORS/stream.c" -o "$OUT/stream"
OMP_NUM_THREADS=2 "$OUT/stream" 134217728 5 | tee -a "$OUT/limits.txt"
[ -x "$OUT/venv/bin/python" ] || python3 -m venv "$OUT/venv"
"$OUT/venv/bin/pip" install -q numpy threadpoolctl
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=2 "$OUT/venv/bin/python" "$ANCHORS/gemm.py" 4096 | tee -a "$OUT/limits.txt"

if [ -x "$LLAMA_BIN/llama-bench" ]; then
  echo "== llama.cpp" | tee "$OUT/llamacpp.txt"
  for r in $(seq 1 "$REPS"); do
    "$LLAMA_BIN/llama-bench" -m "$MODEL" -t 2 --repack 0 -fa 0 -p 128,1024 -n 128 -r 3 -o md | tee -a "$OUT/llamacpp.txt"
    for npl in 1 8 32 64; do
      "$LLAMA_BIN/llama-batched-bench" -m "$MODEL" -t 2 -tb 2 -nr -fa off -c $((npl * 256)) -b 2048 -ub 512 \
        -npp 128 -ntg 128 -npl "$npl" 2>/dev/null | grep -E '^\|' | tail -1 | tee -a "$OUT/llamacpp.txt"
    done
  done
else
  echo "llama.cpp not built at $LLAMA_BIN; skipping it" | tee "$OUT/llamacpp.txt"
fi

echo "== lorahost" | tee "$OUT/lorahost.txt"
./target/release/e2e --reps "$REPS" --model "$MODEL" | tee -a "$OUT/lorahost.txt"

echo "== peak RSS of lorahost generate (128 tokens)" | tee "$OUT/rss.txt"
for dtype in auto f32; do
  /usr/bin/time -f "$dtype: %M KiB max RSS" ./target/release/lorahost generate --model "$MODEL" --dtype "$dtype" \
    --prompt "Once upon a time" --max-tokens 128 --ignore-eos > /dev/null 2>> "$OUT/rss.txt"
done
cat "$OUT/rss.txt"
echo "results in $OUT"
