"""Training throughput and peak memory: `lorahost train` against transformers + peft on CPU
torch, same data, rank, targets, batch size, sequence length, steps and threads, in one script.

Usage (CPU torch, transformers, peft, gguf from PyPI; the lorahost binary built with
`cargo build --release -p lorahost`):
    python bench/train_vs_peft.py [--data FILE.jsonl] [--steps 10] [--batch-size 4] [--rank 16]
        [--threads 2] [--lorahost target/release/lorahost] [--model MODEL.gguf]

Tokens/s counts every token run through the model (sequence lengths, no padding) over the
training loop only (model loading excluded) on both sides. Peak memory is each process's peak
resident set (lorahost's `training_log.json`; `ru_maxrss` of a fresh Python process for peft).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "server", "tests", "fixtures", "train", "facts", "train.jsonl")


def default_model():
    cache = os.environ.get("LORAHOST_CACHE", os.path.expanduser("~/.cache/lorahost"))
    return os.path.join(cache, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def run_lorahost(args, out):
    cmd = [args.lorahost, "train", "--model", args.model, "--data", args.data, "--out", out,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--rank", str(args.rank),
           "--alpha", str(2 * args.rank), "--targets", "all-linear", "--max-seq-len", str(args.max_seq_len),
           "--lr", "1e-3", "--threads", str(args.threads)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.load(open(os.path.join(out, "training_log.json")))["report"]
    return report["processed_tokens"] / report["seconds"], report["peak_rss_bytes"], report["losses"]


PEFT_CHILD = r"""
import json, random, resource, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
d, f = a["model_dir"], a["model_file"]
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=a["rank"], lora_alpha=2 * a["rank"], target_modules="all-linear",
                                          lora_dropout=0.0, task_type="CAUSAL_LM"))
seqs = []
for line in open(a["data"]):
    if line.strip():
        ids = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True)["input_ids"]
        seqs.append(list(ids)[: a["max_seq_len"]])
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
rng = random.Random(0)
order, tokens, losses = [], 0, []
model.train()
start = time.time()
for step in range(a["steps"]):
    batch = []
    for _ in range(a["batch_size"]):
        if not order:
            order = list(range(len(seqs)))
            rng.shuffle(order)
        batch.append(seqs[order.pop()])
    length = max(len(s) for s in batch)
    ids = torch.tensor([s + [0] * (length - len(s)) for s in batch])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in batch])
    labels = torch.tensor([s + [-100] * (length - len(s)) for s in batch])
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    tokens += sum(len(s) for s in batch)
    losses.append(loss.item())
seconds = time.time() - start
print(json.dumps({"tps": tokens / seconds, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "losses": losses}))
"""


def run_peft(args):
    child = {"threads": args.threads, "model_dir": os.path.dirname(args.model),
             "model_file": os.path.basename(args.model), "rank": args.rank, "data": args.data,
             "max_seq_len": args.max_seq_len, "steps": args.steps, "batch_size": args.batch_size}
    out = subprocess.run([sys.executable, "-c", PEFT_CHILD, json.dumps(child)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"the peft run failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["tps"], r["rss"], r["losses"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lorahost", default=os.path.join(HERE, "..", "target", "release", "lorahost"))
    p.add_argument("--model", default=default_model())
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each; medians reported")
    args = p.parse_args()
    ours, theirs = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            ours.append(run_lorahost(args, os.path.join(tmp, "adapter")))
        theirs.append(run_peft(args))
    median = lambda xs: sorted(xs)[len(xs) // 2]
    print(f"{args.steps} steps, batch {args.batch_size}, rank {args.rank}, all-linear, {args.threads} threads, "
          f"data {os.path.basename(args.data)}, {args.rounds} alternating rounds (median [min-max])")
    print("| | tokens/s | peak RSS | first / last loss |")
    print("|---|---:|---:|---|")
    for name, runs in [("lorahost train", ours), ("transformers + peft", theirs)]:
        tps = [r[0] for r in runs]
        rss, losses = runs[0][1], runs[0][2]
        print(f"| {name} | {median(tps):.0f} [{min(tps):.0f}-{max(tps):.0f}] | {rss / 2**20:.0f} MiB | "
              f"{losses[0]:.3f} / {losses[-1]:.3f} |")
    ratios = [a[0] / b[0] for a, b in zip(ours, theirs)]
    print(f"| ratio (ours / peft) | {median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] | "
          f"{ours[0][1] / theirs[0][1]:.2f}x | |")


if __name__ == "__main__":
    main()
