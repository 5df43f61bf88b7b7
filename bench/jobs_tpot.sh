#!/usr/bin/env bash
# Serving latency while a fine-tuning job trains in the background: the same loadgen workload
# (streaming completions over 5 rank-16 adapters, Poisson arrivals) against `lorahost serve`
# on the default model, first with no job, then while a long job trains on --train-threads 1.
# Prints one JSON line per case (loadgen's summary with "case" added) and the ratio of
# TPOT p99 (goal: <= 1.5).
# Usage: bench/jobs_tpot.sh [extra loadgen flags, e.g. --rate 2 --requests 60]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p lorahost -p lorahost-bench --bin lorahost --bin loadgen >&2
work=$(mktemp -d)
trap 'kill -TERM "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
port=18282
threads=${THREADS:-2}
./target/release/lorahost serve --port "$port" --threads "$threads" --train-threads 1 \
  --adapters-dir "$work/store" --max-waiting 4096 2>"$work/server.log" &
server=$!
until grep -q "serving" "$work/server.log"; do sleep 0.2; done
url="http://127.0.0.1:$port"
base=$(curl -s "$url/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

./target/release/loadgen --server "127.0.0.1:$port" --adapters 5 "$@" \
  | python3 -c 'import json,sys; d=json.loads(sys.stdin.readline()); d["case"]="no job"; print(json.dumps(d))' \
  | tee "$work/idle.json"

file=$(curl -s "$url/v1/files" -F purpose=fine-tune -F file=@server/tests/fixtures/train/facts/train.jsonl \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
job=$(curl -s "$url/v1/fine_tuning/jobs" -H 'content-type: application/json' \
  -d "{\"model\": \"$base\", \"training_file\": \"$file\", \"hyperparameters\": {\"batch_size\": 4}, \"lorahost\": {\"steps\": 100000}}" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
until curl -s "$url/v1/fine_tuning/jobs/$job/events?limit=1" | grep -q '"step"'; do sleep 0.5; done

./target/release/loadgen --server "127.0.0.1:$port" --adapters 5 --no-upload "$@" \
  | python3 -c 'import json,sys; d=json.loads(sys.stdin.readline()); d["case"]="job training"; print(json.dumps(d))' \
  | tee "$work/busy.json"
steps=$(curl -s "$url/v1/fine_tuning/jobs/$job/events?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["data"]["step"])')
curl -s -X POST "$url/v1/fine_tuning/jobs/$job/cancel" >/dev/null
python3 - "$work/idle.json" "$work/busy.json" "$steps" <<'PY'
import json, sys
idle, busy = (json.load(open(p)) for p in sys.argv[1:3])
print(json.dumps({"tpot_p99_ratio": busy["tpot_p99_s"] / idle["tpot_p99_s"],
                  "tpot_p50_ratio": busy["tpot_p50_s"] / idle["tpot_p50_s"],
                  "training_steps_during_load": int(sys.argv[3])}))
PY
