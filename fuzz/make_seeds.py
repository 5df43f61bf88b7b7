"""Writes the generated seed corpora, so each fuzzer starts from inputs that are accepted and
mutates every part of them:

- `gguf_model`: two tiny Llama GGUF files (one layer, hidden 32, a 40-token BPE vocabulary with
  merges and a chat template), one with f32 weights and an untied LM head, one with Q8_0 / Q4_1
  projections and a tied head;
- `multipart_upload`: an adapter upload built from the `peft_adapter` seeds, and a training-file
  upload.

    pip install gguf==0.17.1 && python3 fuzz/make_seeds.py
"""

from pathlib import Path

import gguf
import numpy as np

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 32, 64, 4, 2, 40
HEAD_DIM = HIDDEN // HEADS
SEEDS = Path(__file__).parent / "seeds"
OUT = SEEDS / "gguf_model"


def write(name: str, quantized: bool) -> None:
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(OUT / name), "llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_block_count(1)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    tokens = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 2)] + ["<|im_start|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (VOCAB - 2) + [3, 3])
    w.add_token_merges(["a a", "b b"])
    w.add_bos_token_id(VOCAB - 2)
    w.add_eos_token_id(VOCAB - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    def tensor(tname: str, shape: tuple, quant: "gguf.GGMLQuantizationType | None" = None) -> None:
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quant is None:
            w.add_tensor(tname, data)
        else:
            w.add_tensor(tname, gguf.quants.quantize(data, quant), raw_dtype=quant)

    q8 = gguf.GGMLQuantizationType.Q8_0 if quantized else None
    q4 = gguf.GGMLQuantizationType.Q4_1 if quantized else None
    tensor("token_embd.weight", (VOCAB, HIDDEN), q8)
    tensor("blk.0.attn_norm.weight", (HIDDEN,))
    tensor("blk.0.ffn_norm.weight", (HIDDEN,))
    tensor("blk.0.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), q4)
    tensor("blk.0.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), q4)
    tensor("blk.0.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), q8)
    tensor("blk.0.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), q4)
    tensor("blk.0.ffn_gate.weight", (FFN, HIDDEN), q4)
    tensor("blk.0.ffn_up.weight", (FFN, HIDDEN), q4)
    tensor("blk.0.ffn_down.weight", (HIDDEN, FFN), q8)
    tensor("output_norm.weight", (HIDDEN,))
    if not quantized:
        tensor("output.weight", (VOCAB, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def multipart(route: int, boundary: bytes, parts: list) -> bytes:
    """The target's input: route byte, boundary length and boundary, then the body."""
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + data + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return bytes([route, len(boundary)]) + boundary + body


def multipart_seeds() -> None:
    out = SEEDS / "multipart_upload"
    out.mkdir(parents=True, exist_ok=True)
    # peft_adapter seeds are two bytes of config length, the config, then the weights.
    adapter = (SEEDS / "peft_adapter" / "q_proj_r2").read_bytes()
    split = 2 + int.from_bytes(adapter[:2], "little")
    config, weights = adapter[2:split], adapter[split:]
    (out / "adapter").write_bytes(
        multipart(0, b"lorahostBoundary7", [
            ("adapter_config.json", "adapter_config.json", config),
            ("adapter_model.safetensors", "adapter_model.safetensors", weights),
        ])
    )
    line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    (out / "training_file").write_bytes(
        multipart(1, b"----formdata-x", [("purpose", None, b"fine-tune"), ("file", "train.jsonl", line * 2)])
    )


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    write("llama_f32", quantized=False)
    write("llama_quantized", quantized=True)
    multipart_seeds()
