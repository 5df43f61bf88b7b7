#!/usr/bin/env bash
# S-LoRA style workload against `lorahost serve`: the same Poisson / zipf(1) request stream with
# 5, 100 and 1000 distinct rank-16 adapters, the host cache holding 100 of them. One JSON line
# per case on stdout (throughput, TTFT / TPOT p50 and p99, cache hit rate, loads per second).
# Usage: bench/loadgen.sh [extra loadgen flags, e.g. --rate 8 --requests 200]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p lorahost -p lorahost-bench --bin lorahost --bin loadgen >&2
work=$(mktemp -d)
trap 'kill -TERM "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
port=18181
# One rank-16 q_proj + v_proj adapter of the default model as the host cache holds it with
# --dtype auto (int8 A and Bᵀ plus one f32 scale per rank row; 3.7 MB as f32 safetensors).
adapter_bytes=929280
for n in 5 100 1000; do
  ./target/release/lorahost serve --port "$port" --adapters-dir "$work/store-$n" \
    --adapter-cache-bytes $((100 * adapter_bytes + adapter_bytes / 2)) --max-waiting 4096 2>"$work/server-$n.log" &
  server=$!
  until grep -q "serving" "$work/server-$n.log"; do sleep 0.2; done
  ./target/release/loadgen --server "127.0.0.1:$port" --adapters "$n" "$@"
  kill -TERM "$server"; wait "$server" || true
done
