#!/usr/bin/env bash
# Scale-out test: three `lorahost serve` replicas on loopback behind nginx configured by
# deploy/nginx (njs routing), checking what deploy/README.md promises:
#   - uploads and deletes through nginx reach every replica;
#   - each adapter's requests (completions and chats, streamed or not) all land on one replica,
#     so its adapter cache keeps hitting, while base-model requests are spread;
#   - streamed responses pass through nginx unbuffered;
#   - kill -9 of a replica under running requests: a non-streamed one is retried elsewhere and
#     succeeds, a stream is cut off; then its adapters' requests still succeed, each on one other
#     replica, no other adapter moves, and an upload answers 503 until the replica is back;
#   - once it is back, repeating the upload completes it and its adapters return to it;
#   - a replica's refusal (a tenant's quota) reaches the client as it is.
# Usage: scripts/scaleout-test.sh [path/to/lorahost]   (default target/release/lorahost)
# Needs python3 (the HTTP side below is Python, standard library only) and installs nginx and its
# njs module with apt-get if they are missing (run as root then). Uses the default model, which
# `lorahost serve` fetches into its cache if it is not there yet.
set -euo pipefail

REPLICAS=3
# The host cache of each replica holds two of the six test adapters (rank 4 on q_proj and
# v_proj: 232,320 bytes each in the cache's int8 form). With affinity each replica serves just
# its own two; without, every replica would cycle through all six and keep reloading.
ADAPTER_CACHE_BYTES=$((232320 * 5 / 2))
NJS_MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so

main() {
  cd "$(dirname "$0")/.."
  local bin=${1:-target/release/lorahost}
  [ -x "$bin" ] || fail "no lorahost binary at $bin"
  bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
  command -v python3 >/dev/null || fail "python3 is required"
  if ! command -v nginx >/dev/null || [ ! -e "$NJS_MODULE" ]; then
    log "installing nginx and libnginx-mod-http-js"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      nginx libnginx-mod-http-js >/dev/null
  fi

  work=$(mktemp -d)
  # nginx's workers run as an unprivileged user and must reach their temp directories in here.
  chmod 755 "$work"
  pids=()
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  local started=$SECONDS

  cat >"$work/keys.toml" <<'TOML'
[[keys]]
key = "sk-scaleout-tenant-5e1f0a9b"
tenant = "alice"

[[keys]]
key = "sk-scaleout-admin-7c3d2b8e"
tenant = "ops"
admin = true

# The six test adapters and one more.
[tenants.alice]
max_adapters = 7
TOML
  export USER_KEY=sk-scaleout-tenant-5e1f0a9b ADMIN_KEY=sk-scaleout-admin-7c3d2b8e

  # The first replica alone fetches the default model if it is not cached yet; the others then
  # find it there.
  local i
  start_replica "$bin" 0
  wait_replica 0
  for ((i = 1; i < REPLICAS; i++)); do start_replica "$bin" "$i"; done
  for ((i = 1; i < REPLICAS; i++)); do wait_replica "$i"; done

  local base_model nginx_port
  # The base model's id is the first entry of /v1/models.
  base_model=$(python3 -c 'import json, sys, urllib.request
r = urllib.request.Request(sys.argv[1] + "/v1/models", headers={"Authorization": "Bearer " + sys.argv[2]})
print(json.load(urllib.request.urlopen(r))["data"][0]["id"])' "http://${replica_addr[0]}" "$USER_KEY")
  nginx_port=$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
  mkdir -p "$work/nginx"
  # A failed replica is tried again after 3 s (10 s by default), so that failback shows soon.
  LISTEN=127.0.0.1:$nginx_port RUN_DIR=$work/nginx BASE_MODEL=$base_model FAIL_TIMEOUT=3s \
    ERROR_LOG=$work/nginx/error.log ACCESS_LOG=$work/nginx/access.log \
    sh deploy/nginx/render.sh "${replica_addr[@]}" >"$work/nginx/nginx.conf"
  nginx -t -q -e stderr -p "$work/nginx" -c "$work/nginx/nginx.conf"
  nginx -e stderr -p "$work/nginx" -c "$work/nginx/nginx.conf" 2>"$work/nginx.log" &
  pids+=($!)

  write_checker "$work/check.py"
  export ROUTER="http://127.0.0.1:$nginx_port" BASE_MODEL=$base_model
  export STATE="$work/state.json" ADAPTERS="$work/made" KILL_NOW="$work/kill-now"
  export REPLICA_URLS="${replica_addr[*]/#/http://}"
  local check=(python3 "$work/check.py")

  "${check[@]}" setup
  local victim
  victim=$("${check[@]}" affinity)
  # The replica dies under two running requests: the checker says when they are under way.
  "${check[@]}" inflight "$victim" &
  local inflight=$!
  until [ -e "$work/kill-now" ]; do
    kill -0 "$inflight" 2>/dev/null || { wait "$inflight"; fail "the in-flight phase ended early"; }
    sleep 0.05
  done
  log "kill -9 replica $victim (${replica_addr[victim]})"
  kill -9 "${replica_pid[victim]}"
  wait "${replica_pid[victim]}" 2>/dev/null || true
  forget "${replica_pid[victim]}"
  wait "$inflight"
  "${check[@]}" failover "$victim"
  # Back on the same port with the same store, which still holds what it had.
  start_replica "$bin" "$victim" "${replica_addr[victim]##*:}"
  wait_replica "$victim"
  "${check[@]}" recovery "$victim"
  # lorahost's own client (which `lorahost train --push` uses) through nginx.
  local client=("$bin" adapters --server "$ROUTER" --api-key "$USER_KEY")
  "${client[@]}" upload lora-cli "$ADAPTERS/lora-late" >/dev/null
  "${check[@]}" everywhere lora-cli yes
  "${client[@]}" delete lora-cli >/dev/null
  "${check[@]}" everywhere lora-cli no
  log "lorahost adapters upload/delete through nginx: on every replica, then on none"
  "${check[@]}" summary
  log "passed in $((SECONDS - started)) s"
}

log() { echo "scaleout-test: $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

cleanup() {
  local status=$? pid log
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$status" -ne 0 ]; then
    for log in "$work"/*.log "$work"/nginx/*.log; do
      [ -s "$log" ] && { echo "--- last lines of $log" >&2; tail -n 20 "$log" >&2; }
    done
  fi
  rm -rf "$work"
  exit "$status"
}

declare -a replica_pid replica_addr

# forget PID: a process that is gone, so that cleanup never signals whatever reuses its number.
forget() {
  local pid kept=()
  for pid in "${pids[@]}"; do [ "$pid" = "$1" ] || kept+=("$pid"); done
  pids=("${kept[@]}")
}

# start_replica BIN I [PORT]: its own adapters directory (lorahost locks it) and one compute
# thread (three replicas share the machine); the port is lorahost's pick unless given.
start_replica() {
  local bin=$1 i=$2 port=${3:-0} log="$work/replica-$2.log"
  : >"$log"
  "$bin" serve --host 127.0.0.1 --port "$port" --adapters-dir "$work/adapters-$i" \
    --api-keys "$work/keys.toml" --threads 1 --kv-cache-bytes $((64 << 20)) \
    --adapter-cache-bytes "$ADAPTER_CACHE_BYTES" --shutdown-timeout 2 >"$log" 2>&1 &
  pids+=($!)
  replica_pid[i]=$!
}

# wait_replica I: waits for "serving ... on http://127.0.0.1:PORT" and records the address.
wait_replica() {
  local i=$1 log="$work/replica-$1.log" deadline=$((SECONDS + 600)) line
  until line=$(grep -o 'serving .* on http://127\.0\.0\.1:[0-9]*' "$log"); do
    kill -0 "${replica_pid[i]}" 2>/dev/null || fail "replica $i exited"
    [ "$SECONDS" -lt "$deadline" ] || fail "replica $i did not start in 600 s"
    sleep 0.2
  done
  replica_addr[i]=${line##*http://}
}

write_checker() {
  cat >"$1" <<'PY'
"""The HTTP side of scripts/scaleout-test.sh: one phase per invocation, state kept in $STATE.

Where requests landed is read from the replicas' own /metrics
(lorahost_requests_total by model, the adapter cache counters), never from nginx's logs.
"""
import concurrent.futures
import http.client
import json
import os
import random
import re
import struct
import sys
import threading
import time
import urllib.parse

ROUTER = os.environ["ROUTER"]
REPLICAS = os.environ["REPLICA_URLS"].split()
BASE = os.environ["BASE_MODEL"]
STATE = os.environ["STATE"]
ADAPTERS = os.environ["ADAPTERS"]
USER_KEY = os.environ["USER_KEY"]
ADMIN_KEY = os.environ["ADMIN_KEY"]
KILL_NOW = os.environ["KILL_NOW"]

PER_REPLICA = 2          # adapters owned by each replica; the host cache holds exactly this many
REQUESTS_PER_ADAPTER = 8
MAX_TOKENS = 4
# SmolLM2-135M: 30 layers, hidden 576, 3 KV heads of 64 (v_proj's output is 192 wide).
LAYERS, HIDDEN, KV_DIM, RANK = 30, 576, 192, 4


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


def log(message):
    print("scaleout-test: " + message, file=sys.stderr, flush=True)


# --- HTTP -------------------------------------------------------------------------------------

def request(base, method, path, body=None, headers=None, key=USER_KEY, timeout=120):
    """(status, headers, body bytes) of one request; any status is returned, none raises."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    all_headers = {"Authorization": "Bearer " + key}
    all_headers.update(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def generation(model, kind, i):
    """One completion or chat through the router, streamed or not; returns nothing, checks all."""
    stream = kind in ("completion-stream", "chat-stream")
    body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if kind.startswith("chat"):
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": "Say something about the number %d." % i}]
    else:
        path = "/v1/completions"
        body["prompt"] = "Request %d of %s:" % (i, model)
    status, headers, data = request(ROUTER, "POST", path, body)
    check(status == 200, "%s for %s through nginx: %d %s" % (kind, model, status, data[:300]))
    if stream:
        check(headers.get("Content-Type", "").startswith("text/event-stream"),
              "%s for %s: Content-Type %r" % (kind, model, headers.get("Content-Type")))
        events = [e[6:] for e in data.decode().splitlines() if e.startswith("data: ")]
        check(events and events[-1] == "[DONE]", "%s for %s does not end with [DONE]" % (kind, model))
        check(all(json.loads(e)["model"] == model for e in events[:-1]), "stream names another model")
    else:
        check(json.loads(data)["model"] == model, "%s for %s answered for another model" % (kind, model))


KINDS = ["completion", "chat", "completion-stream", "chat-stream"]


def direct(replica, model, i):
    """A completion sent to one replica itself, bypassing nginx."""
    body = {"model": model, "prompt": "Request %d of %s:" % (i, model), "max_tokens": MAX_TOKENS}
    status, _, data = request(replica, "POST", "/v1/completions", body)
    check(status == 200, "completion for %s on %s: %d %s" % (model, replica, status, data[:300]))


def run_all(jobs, workers=6):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(*job) for job in jobs]:
            future.result()


def interleaved(models, per_model):
    """Requests for every model in turn (A B C A B C ...): the order that defeats an LRU cache
    smaller than the working set, so only affinity keeps it hitting."""
    return [(generation, m, KINDS[i % len(KINDS)], i) for i in range(per_model) for m in models]


# --- metrics ----------------------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-z_]+)(?:\{(.*)\})? ([0-9.eE+-]+)$')
LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def metrics(replica):
    status, _, data = request(replica, "GET", "/metrics", key=ADMIN_KEY)
    check(status == 200, "GET %s/metrics: %d" % (replica, status))
    out = {}
    for line in data.decode().splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = tuple(sorted(LABEL.findall(m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(sample, name, **labels):
    want = set(labels.items())
    return sum(v for (n, got), v in sample.items() if n == name and want <= set(got))


def snapshot(replicas):
    return {r: metrics(r) for r in replicas}


def requests_by_model(before, after, models):
    """{model: {replica: finished requests between the snapshots}}."""
    def finished(sample, model):
        return value(sample, "lorahost_requests_total", model=model, outcome="finished")
    return {m: {r: int(finished(after[r], m) - finished(before[r], m)) for r in after} for m in models}


def cache_delta(before, after, models):
    """{replica: {"requests", "hits", "misses"}} between the snapshots; a miss starts a load."""
    counts = requests_by_model(before, after, models)
    out = {}
    for r in after:
        def delta(name):
            return int(value(after[r], name) - value(before[r], name))
        out[r] = {"requests": sum(counts[m][r] for m in models),
                  "hits": delta("lorahost_adapter_cache_hits_total"),
                  "misses": delta("lorahost_adapter_cache_misses_total")}
    return out


def owner_of(counts, model, expected_total):
    landed = {r: n for r, n in counts[model].items() if n > 0}
    check(len(landed) == 1, "%s's requests landed on %d replicas: %s" % (model, len(landed), landed))
    (replica, n), = landed.items()
    check(n == expected_total, "%s: %d of %d requests finished on %s" % (model, n, expected_total, replica))
    return replica


# --- adapters ---------------------------------------------------------------------------------

def make_adapter(directory, seed):
    """A random rank-4 PEFT LoRA on q_proj and v_proj of every layer, written as safetensors
    (a little-endian u64 header length, a JSON header, then the raw f32 data)."""
    rng = random.Random(seed)
    tensors = []
    for layer in range(LAYERS):
        for module, out_dim in (("q_proj", HIDDEN), ("v_proj", KV_DIM)):
            prefix = "base_model.model.model.layers.%d.self_attn.%s." % (layer, module)
            tensors.append((prefix + "lora_A.weight", [RANK, HIDDEN]))
            tensors.append((prefix + "lora_B.weight", [out_dim, RANK]))
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape in tensors:
        count = shape[0] * shape[1]
        blobs.append(struct.pack("<%df" % count, *(rng.uniform(-0.05, 0.05) for _ in range(count))))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * count]}
        offset += 4 * count
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(blobs))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
              "target_modules": ["q_proj", "v_proj"], "bias": "none", "lora_dropout": 0.0}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def multipart(directory):
    boundary = "lorahost-%016x" % random.getrandbits(64)
    parts = []
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(directory, name), "rb") as f:
            content = f.read()
        parts.append(("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
                      "Content-Type: application/octet-stream\r\n\r\n" % (boundary, name, name)).encode()
                     + content + b"\r\n")
    body = b"".join(parts) + ("--%s--\r\n" % boundary).encode()
    return body, {"Content-Type": "multipart/form-data; boundary=" + boundary}


def upload(name, expect):
    body, headers = multipart(os.path.join(ADAPTERS, name))
    status, headers, data = request(ROUTER, "PUT", "/v1/adapters/" + name, body, headers)
    check(status in expect, "PUT %s through nginx: %d, expected %s: %s (fan-out: %s)"
          % (name, status, expect, data[:300], headers.get("X-Lorahost-Fanout")))
    return status, headers.get("X-Lorahost-Fanout", ""), data


def stored(replica):
    status, _, data = request(replica, "GET", "/v1/adapters")
    check(status == 200, "GET %s/v1/adapters: %d" % (replica, status))
    return {a["name"]: a["adapter_id"] for a in json.loads(data)["data"]}


def probe_owner(name, replicas):
    """The replica nginx routes `name` to: a request for an adapter that does not exist yet is
    answered 404 by exactly the replica its hash picked."""
    before = {r: value(metrics(r), "lorahost_http_responses_total", status="404") for r in replicas}
    status, _, _ = request(ROUTER, "POST", "/v1/completions", {"model": name, "prompt": "x", "max_tokens": 1})
    check(status == 404, "a request for the unknown adapter %s got %d, not 404" % (name, status))
    after = {r: value(metrics(r), "lorahost_http_responses_total", status="404") for r in replicas}
    hit = [r for r in replicas if after[r] > before[r]]
    check(len(hit) == 1, "the probe for %s reached %d replicas" % (name, len(hit)))
    return hit[0]


def wait_loaded(replicas):
    deadline = time.time() + 60
    while any(value(metrics(r), "lorahost_adapter_cache_loading") > 0 for r in replicas):
        check(time.time() < deadline, "adapter loads still running after 60 s")
        time.sleep(0.1)


# --- phases -----------------------------------------------------------------------------------

def save(state):
    with open(STATE, "w") as f:
        json.dump(state, f)


def load():
    with open(STATE) as f:
        return json.load(f)


def setup():
    deadline = time.time() + 30
    while request(ROUTER, "GET", "/health")[0] != 200:
        check(time.time() < deadline, "nginx does not answer /health")
        time.sleep(0.2)
    # Names chosen so that each replica owns the same number of adapters: the cache arithmetic
    # below (each replica's cache holds exactly its own adapters) then holds for any ports.
    owners, per = {}, {r: 0 for r in REPLICAS}
    for i in range(400):
        if len(owners) == PER_REPLICA * len(REPLICAS):
            break
        name = "lora-%03d" % i
        owner = probe_owner(name, REPLICAS)
        if per[owner] < PER_REPLICA:
            owners[name], per[owner] = owner, per[owner] + 1
    check(len(owners) == PER_REPLICA * len(REPLICAS),
          "400 adapter names did not spread over all replicas: %s" % per)
    names = sorted(owners)
    for seed, name in enumerate(names + ["lora-late"]):
        make_adapter(os.path.join(ADAPTERS, name), seed)

    for name in names:
        status, fanout, _ = upload(name, (201,))
        check(fanout.count("=201") == len(REPLICAS), "PUT %s fan-out: %s" % (name, fanout))
    # The same content again replaces it everywhere (a new generation): 200.
    status, fanout, _ = upload(names[0], (200,))
    check(fanout.count("=200") == len(REPLICAS), "PUT %s again, fan-out: %s" % (names[0], fanout))

    held = {r: stored(r) for r in REPLICAS}
    for name in names:
        ids = {held[r].get(name) for r in REPLICAS}
        check(None not in ids and len(ids) == 1, "%s is not on every replica with one content id: %s"
              % (name, {r: held[r].get(name) for r in REPLICAS}))
    # Reads through nginx go to any replica: all of them answer alike.
    status, _, data = request(ROUTER, "GET", "/v1/adapters/" + names[0])
    check(status == 200 and json.loads(data)["adapter_id"] == held[REPLICAS[0]][names[0]],
          "GET /v1/adapters/%s through nginx: %d %s" % (names[0], status, data[:300]))
    status, _, data = request(ROUTER, "GET", "/v1/models")
    listed = {m["id"] for m in json.loads(data)["data"]} if status == 200 else set()
    check(set(names) | {BASE} <= listed, "GET /v1/models through nginx: %d %s" % (status, data[:300]))
    # What the router refuses: per-replica fine-tuning, and metrics of whichever replica.
    for path, expected in (("/v1/fine_tuning/jobs", 501), ("/metrics", 404)):
        status, _, _ = request(ROUTER, "GET", path, key=ADMIN_KEY)
        check(status == expected, "GET %s through nginx: %d, expected %d" % (path, status, expected))

    wait_loaded(REPLICAS)
    for r in REPLICAS:
        resident = value(metrics(r), "lorahost_adapter_cache_resident")
        check(resident == PER_REPLICA, "%s's adapter cache holds %d adapters, the test expects %d: "
              "adjust adapter_cache_bytes to the host cache's adapter size" % (r, resident, PER_REPLICA))
    log("uploaded %d adapters through nginx; every replica holds all of them" % len(names))
    save({"owners": owners, "names": names})


def affinity():
    state = load()
    names, owners = state["names"], state["owners"]
    before = snapshot(REPLICAS)
    run_all(interleaved(names, REQUESTS_PER_ADAPTER))
    after = snapshot(REPLICAS)
    counts = requests_by_model(before, after, names)
    for name in names:
        replica = owner_of(counts, name, REQUESTS_PER_ADAPTER)
        check(replica == owners[name], "%s went to %s, its probe to %s" % (name, replica, owners[name]))
    cache = cache_delta(before, after, names)
    for r in REPLICAS:
        # Each replica serves its own two adapters only, and its cache holds two: at most one
        # load each (those evicted by the warm-up of later uploads), every other acquire a hit.
        check(cache[r]["misses"] <= PER_REPLICA, "%s missed its cache %d times with affinity: %s"
              % (r, cache[r]["misses"], cache[r]))
    log("affinity: each adapter's %d requests landed on one replica" % REQUESTS_PER_ADAPTER)

    # Base-model requests hash a random key: spread over the replicas.
    before_base = snapshot(REPLICAS)
    run_all([(generation, BASE, KINDS[i % 2], i) for i in range(12)], workers=3)
    base = requests_by_model(before_base, snapshot(REPLICAS), [BASE])[BASE]
    check(sum(base.values()) == 12 and sum(1 for n in base.values() if n > 0) >= 2,
          "base-model requests were not spread: %s" % base)
    log("base model: 12 requests spread as %s" % sorted(base.values()))

    # Streaming passes through unbuffered: the first event arrives long before the last.
    url = urllib.parse.urlsplit(ROUTER)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    body = {"model": names[0], "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True,
            "stream": True}
    start = time.time()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Authorization": "Bearer " + USER_KEY, "Content-Type": "application/json"})
    response = conn.getresponse()
    first, data = None, b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            break
        if first is None and b"data: " in chunk:
            first = time.time() - start
        data += chunk
    total = time.time() - start
    conn.close()
    events = data.count(b"data: ")
    check(events >= 33, "the stream had only %d events" % events)
    check(first is not None and first < total / 3,
          "stream through nginx was buffered: first event after %.3f s of %.3f s" % (first or -1, total))
    log("streaming: first event after %.0f ms of %.0f ms" % (first * 1000, total * 1000))

    # A body over client_body_buffer_size (1 MiB) is spooled to a temp file that njs cannot read:
    # it is spread like a base request, and still answered (here the replica refuses a prompt
    # that long with 422).
    status, _, data = request(ROUTER, "POST", "/v1/completions",
                              {"model": names[1], "prompt": "word " * 300000, "max_tokens": 1})
    check(status == 422, "a 1.5 MB request through nginx: %d %s" % (status, data[:300]))

    # For comparison, the same interleaved load on a random replica each: the caches thrash.
    rng = random.Random(7)
    before_random = snapshot(REPLICAS)
    jobs = []
    for i in range(REQUESTS_PER_ADAPTER):
        for name in names:
            jobs.append((direct, rng.choice(REPLICAS), name, i))
    run_all(jobs)
    random_cache = cache_delta(before_random, snapshot(REPLICAS), names)

    victim = owners[names[0]]
    state.update(affinity=counts, cache=cache, random_cache=random_cache, base=base,
                 stream_ms=[round(first * 1000), round(total * 1000)])
    save(state)
    print(REPLICAS.index(victim))


def inflight(victim_index):
    """Runs a streamed and a non-streamed request on the victim and has it killed under them:
    the stream, already answering, is cut off; the other request, not answered yet, is retried
    by nginx on the ring's next replica and succeeds."""
    state = load()
    name = state["names"][0]
    check(REPLICAS.index(state["owners"][name]) == victim_index, "the victim does not own " + name)
    body = {"model": name, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
    results = {}

    def plain():
        results["plain"] = request(ROUTER, "POST", "/v1/completions", body)

    def streamed():
        url = urllib.parse.urlsplit(ROUTER)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)),
                     {"Authorization": "Bearer " + USER_KEY, "Content-Type": "application/json"})
        response = conn.getresponse()
        data = b""
        try:
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    break
                data += chunk
                if data.count(b"data: ") >= 3 and not os.path.exists(KILL_NOW):
                    # Both requests run on the victim now: the plain one went first.
                    open(KILL_NOW, "w").close()
        except (http.client.HTTPException, OSError):
            pass
        results["stream"] = data
        conn.close()

    threads = [threading.Thread(target=plain)]
    threads[0].start()
    time.sleep(0.2)
    threads.append(threading.Thread(target=streamed))
    threads[1].start()
    for t in threads:
        t.join()
    check(os.path.exists(KILL_NOW), "the stream never started")
    status, _, data = results["plain"]
    check(status == 200 and json.loads(data)["usage"]["completion_tokens"] == 200,
          "a request running on the killed replica: %d %s" % (status, data[:300]))
    check(b"[DONE]" not in results["stream"], "a stream from the killed replica completed")
    log("in flight at kill -9: the non-streamed request was retried elsewhere and succeeded; "
        "the stream was cut off after %d events" % results["stream"].count(b"data: "))


def failover(victim_index):
    state = load()
    names, owners = state["names"], state["owners"]
    victim = REPLICAS[victim_index]
    survivors = [r for r in REPLICAS if r != victim]
    moved = [n for n in names if owners[n] == victim]
    before = snapshot(survivors)
    # The first request for a dead replica's adapter meets a refused connection; nginx retries it
    # on the next replica of the ring and skips the dead one from then on.
    run_all(interleaved(names, REQUESTS_PER_ADAPTER))
    counts = requests_by_model(before, snapshot(survivors), names)
    new_owner = {}
    for name in names:
        new_owner[name] = owner_of(counts, name, REQUESTS_PER_ADAPTER)
        if name not in moved:
            check(new_owner[name] == owners[name], "%s moved from %s to %s though its replica is up"
                  % (name, owners[name], new_owner[name]))
    log("failover: %s's adapters %s now each on one survivor, all requests answered; "
        "no other adapter moved" % (victim, moved))

    # An upload cannot reach the dead replica: 503, naming it; the survivors have stored it.
    status, fanout, data = upload("lora-late", (503,))
    error = json.loads(data)["error"]
    check(error["code"] == "replica_unavailable" and victim.split("//")[1] + "=502" in fanout,
          "upload with a replica down: %s, fan-out %s" % (error, fanout))
    for r in survivors:
        check("lora-late" in stored(r), "a survivor did not store the upload: %s" % r)
    log("upload with a replica down: 503 (%s)" % fanout)
    state.update(failover=counts, moved=moved, new_owner=new_owner)
    save(state)


def recovery(victim_index):
    state = load()
    names = state["names"]
    victim = REPLICAS[victim_index]
    # The restarted replica kept its store, but missed the upload that failed: repeating it
    # (idempotent) completes it, new on the victim, a replacement on the others.
    status, fanout, _ = upload("lora-late", (201,))
    held = {r: stored(r) for r in REPLICAS}
    check(len({held[r].get("lora-late") for r in REPLICAS} - {None}) == 1
          and all("lora-late" in held[r] for r in REPLICAS), "lora-late is not on every replica")
    for name in names:
        check(all(name in held[r] for r in REPLICAS), "%s is missing after the restart" % name)
    log("upload repeated after the restart: 201 (%s)" % fanout)

    # alice may hold 7 adapters (keys.toml), and now does: every replica refuses an 8th alike,
    # and the client gets the replicas' 429 as it is (without Retry-After: waiting frees no place).
    body, headers = multipart(os.path.join(ADAPTERS, "lora-late"))
    status, headers, data = request(ROUTER, "PUT", "/v1/adapters/lora-over", body, headers)
    fanout = headers.get("X-Lorahost-Fanout", "")
    check(status == 429 and json.loads(data)["error"]["code"] == "quota_exceeded"
          and not headers.get("Retry-After") and fanout.count("=429") == len(REPLICAS),
          "an upload over the quota: %d %s, fan-out %s" % (status, data[:300], fanout))
    check(not any("lora-over" in stored(r) for r in REPLICAS), "an upload over the quota was stored")
    log("upload over the tenant's quota: 429 from every replica, stored nowhere")

    # Once fail_timeout has passed, nginx lets one request try the replica again (concurrent ones
    # still go to the ring's next replica); when it succeeds, the replica is back in the ring.
    time.sleep(3.5)
    generation(state["moved"][0], "completion", 0)
    before = snapshot(REPLICAS)
    run_all(interleaved(state["moved"], REQUESTS_PER_ADAPTER))
    counts = requests_by_model(before, snapshot(REPLICAS), state["moved"])
    for name in state["moved"]:
        check(owner_of(counts, name, REQUESTS_PER_ADAPTER) == victim,
              "%s did not return to %s after its restart: %s" % (name, victim, counts[name]))
    log("failback: %s serves %s again" % (victim, state["moved"]))

    # A delete reaches every replica; a second one finds nothing anywhere.
    status, headers, data = request(ROUTER, "DELETE", "/v1/adapters/lora-late")
    check(status == 200, "DELETE through nginx: %d %s" % (status, data[:300]))
    for r in REPLICAS:
        check("lora-late" not in stored(r), "lora-late still on %s after the delete" % r)
    status, _, _ = request(ROUTER, "DELETE", "/v1/adapters/lora-late")
    check(status == 404, "a second DELETE: %d, expected 404" % status)
    status, _, _ = request(ROUTER, "POST", "/v1/completions", {"model": "lora-late", "prompt": "x"})
    check(status == 404, "a request for the deleted adapter: %d, expected 404" % status)
    log("delete through nginx: gone from every replica")


def everywhere(name, present):
    want = present == "yes"
    for r in REPLICAS:
        check((name in stored(r)) == want, "%s is %s on %s" % (name, "missing" if want else "still", r))


def summary():
    state = load()
    names, replicas = state["names"], REPLICAS
    short = {r: r.split("//")[1] for r in replicas}
    width = max(len(s) for s in short.values()) + 2
    print("requests per adapter and replica (%d each, with affinity):" % REQUESTS_PER_ADAPTER)
    print("  %-10s" % "adapter" + "".join(("%" + str(width) + "s") % short[r] for r in replicas)
          + "   after kill -9")
    for name in names:
        row = "".join(("%" + str(width) + "d") % state["affinity"][name][r] for r in replicas)
        print("  %-10s%s   %s" % (name, row, short[state["new_owner"][name]]))
    print("adapter cache per replica, the same requests with affinity and on a random replica")
    print("(hit rate = hits / (hits + misses); each miss is a load from disk):")
    print("  %-*s  %-26s  %s" % (width - 2, "", "with affinity", "on a random replica"))
    print("  %-*s  %-26s  %s" % (width - 2, "replica", *["requests  misses  hit rate"] * 2))
    for r in replicas:
        cells = ["%8d  %6d  %7.0f%%" % (c["requests"], c["misses"], rate(c))
                 for c in (state["cache"][r], state["random_cache"][r])]
        print("  %-*s  %-26s  %s" % (width - 2, short[r], cells[0], cells[1]))
    print("base model requests per replica: %s" % [state["base"][r] for r in replicas])
    print("stream through nginx: first event %d ms, last %d ms" % tuple(state["stream_ms"]))


def rate(c):
    total = c["hits"] + c["misses"]
    return 100.0 * c["hits"] / total if total else 0.0


if __name__ == "__main__":
    phase = sys.argv[1]
    try:
        if phase in ("inflight", "failover", "recovery"):
            globals()[phase](int(sys.argv[2]))
        else:
            globals()[phase](*sys.argv[2:])
    except Failure as e:
        log("FAILED (%s): %s" % (phase, e))
        sys.exit(1)
PY
}

main "$@"
