#!/usr/bin/env bash
# The one script a GPU machine runs: `bash bench/gpu/check.sh OUT_DIR`. It builds nothing: it
# takes the binaries bench/gpu/build.sh packed into bench/gpu/dist/, runs the kernel parity
# checks and benchmarks, and writes OUT_DIR/results.md (plus each tool's own files). Exit status:
# 0 all parity checks passed, 1 a check failed, 2 the machine could not run them.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: check.sh OUT_DIR}"
mkdir -p "$out/bin"
log="$out/check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }

# The toolkit's libraries (cuBLAS, NVRTC) from a CUDA install or a PyTorch wheel; the driver's
# libcuda.so.1 is found by the loader as usual.
lib_dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
if py_nvidia="$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)"; then
  for d in "$py_nvidia"/nvidia/*/lib "$py_nvidia"/nvidia/cu13/lib; do [ -d "$d" ] && lib_dirs+=("$d"); done
fi
LD_LIBRARY_PATH="$(IFS=:; echo "${lib_dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"; } \
  | sed 's/^/gpu: /' | tee -a "$log"

status=0
for gz in "$here"/dist/*.gz; do
  [ -e "$gz" ] || { say "no binaries in $here/dist: run bench/gpu/build.sh first and carry bench/gpu/dist"; exit 2; }
  bin="$out/bin/$(basename "$gz" .gz)"
  gunzip -c "$gz" > "$bin" && chmod +x "$bin"
  missing="$(ldd "$bin" | grep 'not found' || true)"
  if [ -n "$missing" ]; then
    say "$(basename "$bin"): missing libraries:"; say "$missing"; status=2; continue
  fi
done
[ "$status" = 0 ] || exit "$status"

# Worst outcome so far wins: 1 (a check failed) over 2 (could not run) over 0.
record() { local rc="$1"; if [ "$rc" = 1 ]; then status=1; elif [ "$rc" != 0 ] && [ "$status" = 0 ]; then status=2; fi; }

# Rewritten after every stage, so a run cut short by the machine's time limit still leaves the
# stages that finished. The stages' timeouts add up to 500 s, under a 600 s command limit.
results() {
  {
    echo "# GPU check"
    echo
    grep '^gpu: ' "$log" | sed 's/^gpu: /GPU: /'
    echo
    for f in gpu_kernels_check.md gpu_kernels_bench.md gpu_model.md gpu_e2e.md; do [ -f "$out/$f" ] && cat "$out/$f"; done
    echo
    echo "exit status: $status ($1)"
  } > "$out/results.md"
}

say "== gpu_kernels: parity and benchmark"
timeout 200 "$out/bin/gpu_kernels" all --out "$out" 2>&1 | tee -a "$log"
record "${PIPESTATUS[0]}"
results "after gpu_kernels"

say "== gpu_model: the model's kernels, then the model on the GPU against the CPU"
timeout 100 "$out/bin/gpu_model" --out "$out" 2>&1 | tee -a "$log"
record "${PIPESTATUS[0]}"
results "after gpu_model"

say "== gpu_e2e: 7B-shaped bf16 model, 1 / 100 / 1000 adapters vs the base"
timeout 200 "$out/bin/gpu_e2e" --out "$out" 2>&1 | tee -a "$log"
record "${PIPESTATUS[0]}"
results "complete"
rm -rf "$out/bin"
say "results in $out/results.md (status $status)"
exit "$status"
