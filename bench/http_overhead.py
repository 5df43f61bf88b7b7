"""HTTP overhead: the same greedy 256-token completion through `lorahost generate` (the engine's
own prefill + decode time, from `--json`) and streamed through `lorahost serve` (client wall time
from sending the request to `data: [DONE]`), alternated, medians. Standard library only.

Usage (lorahost built with `cargo build --release -p lorahost`):
    python3 bench/http_overhead.py [--rounds 5] [--tokens 256] [--lorahost target/release/lorahost]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "The history of the printing press begins"


def via_generate(args):
    out = subprocess.run([args.lorahost, "generate", "--prompt", PROMPT, "--max-tokens", str(args.tokens),
                          "--ignore-eos", "--json"], check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["completion_tokens"] == args.tokens, r
    return r["prefill_seconds"] + r["decode_seconds"]


def via_serve(url, model, tokens):
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req) as resp:
        for line in resp:
            if line.strip() == b"data: [DONE]":
                break
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--port", type=int, default=18383)
    p.add_argument("--lorahost", default=os.path.join(HERE, "..", "target", "release", "lorahost"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as store:
        log = open(os.path.join(store, "server.log"), "w+")
        server = subprocess.Popen([args.lorahost, "serve", "--port", str(args.port), "--adapters-dir",
                                   os.path.join(store, "adapters")], stderr=log)
        try:
            url = f"http://127.0.0.1:{args.port}"
            for _ in range(600):
                try:
                    models = json.load(urllib.request.urlopen(url + "/v1/models"))
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                sys.exit("the server did not start")
            model = models["data"][0]["id"]
            via_serve(url, model, 8)  # warm-up
            gen, http = [], []
            for _ in range(args.rounds):
                gen.append(via_generate(args))
                http.append(via_serve(url, model, args.tokens))
        finally:
            server.terminate()
            server.wait()
    median = lambda xs: sorted(xs)[len(xs) // 2]
    print(f"{args.tokens} greedy tokens, {args.rounds} alternating rounds (median [min-max])")
    print("| path | seconds |")
    print("|---|---:|")
    print(f"| `generate` (engine prefill + decode) | {median(gen):.3f} [{min(gen):.3f}-{max(gen):.3f}] |")
    print(f"| `serve`, streamed, client wall time | {median(http):.3f} [{min(http):.3f}-{max(http):.3f}] |")
    print(f"| extra time of HTTP | {100 * (median(http) / median(gen) - 1):+.1f} % (medians), "
          f"{100 * (min(http) / min(gen) - 1):+.1f} % (minimums) |")


if __name__ == "__main__":
    main()
