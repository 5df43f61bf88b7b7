"""`lorahost serve` against llama-server on the same machine and workload: N concurrent
completions (a 128-token prompt given as token ids, 128 new tokens, greedy, EOS ignored), in
one script, one server at a time. lorahost runs it on the base and with the requests spread over
32 rank-8 q/k/v/o adapters; llama-server on the base (it runs requests of different adapters in
separate batches, so its base figure bounds its adapter figures from above). Standard library
only; llama-server from ../shared/anchors/cpu/build_llamacpp.sh.

Usage:
    python3 bench/server_vs_llama.py --llama-server /tmp/cpubase/build/bin/llama-server [-n 64]
        [--lorahost target/release/lorahost] [--model MODEL.gguf]
"""
import argparse
import json
import os
import random
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = " ".join(f"Item {k}: the quick brown fox jumps over the lazy dog near river {k * 7 % 101}."
                for k in range(4000))


def default_model():
    cache = os.environ.get("LORAHOST_CACHE", os.path.expanduser("~/.cache/lorahost"))
    return os.path.join(cache, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def call(url, path, body=None, timeout=3600):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_up(url, path):
    for _ in range(1200):
        try:
            call(url, path, timeout=5)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not start")


def burst(n, one):
    """Runs `one(i)` for i < n at once; returns (wall seconds, generated tokens)."""
    counts = [0] * n

    def worker(i):
        counts[i] = one(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(counts)


def write_adapter(path, seed, rank=8):
    """A random PEFT LoRA (rank 8 on q/k/v/o of all 30 layers of the default model), f32."""
    rng = random.Random(seed)
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
    header, blobs, offset = {}, [], 0
    for layer in range(30):
        for name, (out, inp) in shapes.items():
            for part, shape in (("A", (rank, inp)), ("B", (out, rank))):
                count = shape[0] * shape[1]
                blob = struct.pack(f"<{count}f", *(rng.uniform(-0.02, 0.02) for _ in range(count)))
                key = f"base_model.model.model.layers.{layer}.self_attn.{name}.lora_{part}.weight"
                header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
                blobs.append(blob)
                offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 16,
                   "target_modules": list(shapes)}, f)


def upload(url, name, path):
    boundary = "lorahostbench"
    body = b""
    for part in ("adapter_config.json", "adapter_model.safetensors"):
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{part}\"; filename=\"{part}\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode()
        body += open(os.path.join(path, part), "rb").read() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + f"/v1/adapters/{name}", data=body, method="PUT",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    urllib.request.urlopen(req, timeout=600).read()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--llama-server", required=True)
    p.add_argument("--lorahost", default=os.path.join(HERE, "..", "target", "release", "lorahost"))
    p.add_argument("--model", default=default_model())
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    n, new = args.n, args.tokens
    results = {}
    with tempfile.TemporaryDirectory() as work:
        # llama-server (settings of ../shared/anchors/cpu/server_lora_bench.sh).
        port = 18491
        url = f"http://127.0.0.1:{port}"
        llama = subprocess.Popen([args.llama_server, "-m", args.model, "-t", "2", "-tb", "2", "-nr", "-fa", "off",
                                  "-np", str(n), "-c", str(n * 272), "--host", "127.0.0.1", "--port", str(port),
                                  "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_up(url, "/health")
            toks = call(url, "/tokenize", {"content": TEXT})["tokens"]
            prompt = lambda i: toks[(i * 131) % (len(toks) - 128):][:128]

            def llama_one(i):
                r = call(url, "/completion", {"prompt": prompt(i), "n_predict": new, "ignore_eos": True,
                                              "cache_prompt": False, "temperature": 0.0})
                return r["tokens_predicted"]

            burst(2, llama_one)
            results["llama-server, base"] = burst(n, llama_one)
        finally:
            llama.terminate()
            llama.wait()

        port = 18492
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([args.lorahost, "serve", "--port", str(port), "--max-running", str(n),
                                   "--adapters-dir", os.path.join(work, "store")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_up(url, "/v1/models")
            base = call(url, "/v1/models")["data"][0]["id"]
            for k in range(32):
                write_adapter(os.path.join(work, f"a{k}"), k)
                upload(url, f"a{k}", os.path.join(work, f"a{k}"))

            def ours(model_of):
                def one(i):
                    r = call(url, "/v1/completions", {"model": model_of(i), "prompt": prompt(i), "max_tokens": new,
                                                      "temperature": 0, "ignore_eos": True})
                    return r["usage"]["completion_tokens"]
                return one

            burst(2, ours(lambda i: f"a{i % 32}"))
            results["lorahost, base"] = burst(n, ours(lambda i: base))
            results["lorahost, 32 adapters"] = burst(n, ours(lambda i: f"a{i % 32}"))
        finally:
            server.terminate()
            server.wait()
    ref = results["llama-server, base"]
    print(f"{n} concurrent requests, 128-token prompts, {new} new tokens each, 2 threads")
    print("| server, adapters | generated tok/s | / llama-server base |")
    print("|---|---:|---:|")
    for name, (wall, generated) in results.items():
        print(f"| {name} | {generated / wall:.0f} | {(generated / wall) / (ref[1] / ref[0]):.2f}x |")


if __name__ == "__main__":
    main()
