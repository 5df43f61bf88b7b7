#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS each (default 60; CI's smoke run), from the seed
# corpora in fuzz/seeds/ plus what earlier runs here found (fuzz/corpus/, git-ignored). A crash,
# a timeout (10 s for one input) or an allocation past 2 GiB fails the run; libFuzzer leaves the
# input in fuzz/artifacts/TARGET/.
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
#
# FUZZ_SEED=N fixes libFuzzer's random seed, so a run from the same corpus tries the same inputs
# in the same order: CI's run is one anybody can repeat. Without it, each run explores anew.
#
# cargo fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain take
# them. Without a sanitizer (`-s none`) the build stays within CI's time; crashes are panics,
# aborts, hangs and runaway memory.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(ls fuzz_targets | sed 's/\.rs$//')
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
  cargo fuzz build -s none "$t"
done
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "fuzz: $t for ${seconds}s"
  log="corpus/$t.log"
  if ! cargo fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- ${FUZZ_SEED:+-seed="$FUZZ_SEED"} \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 > "$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED (the input is in fuzz/artifacts/$t/)"
    exit 1
  fi
  grep -E '^(Done|stat::peak_rss_mb)' "$log" | sed "s/^/fuzz: $t: /"
done
echo "fuzz: ${#targets[@]} targets clean for ${seconds}s each"
