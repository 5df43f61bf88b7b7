"""End-to-end check of a running `lorahost serve` with the official `openai` client and `requests`.

Run by server/tests/serve_e2e.rs against the default model in --dtype f32, started with
--api-keys (tenants alice and bob, an admin), --max-running 1, --max-waiting 2 and a small
--max-adapter-bytes. Phases:
  first          uploads, golden texts, tenants, bad uploads, overload and disconnects
  after-restart  the same server directory after a restart: every accepted adapter is back

Usage: openai_e2e.py PHASE BASE_URL FIXTURES_DIR ALICE_KEY BOB_KEY ADMIN_KEY
"""

import json
import os
import struct
import sys
import time

import openai
import requests

PHASE, URL, FIXTURES, ALICE, BOB, ADMIN = sys.argv[1:7]
ADAPTER_A = os.path.join(FIXTURES, "adapters", "a_r8_qv")
ADAPTER_B = os.path.join(FIXTURES, "adapters", "b_r16_all7")
NAME = "golden-a"


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def client(key):
    return openai.OpenAI(base_url=URL + "/v1", api_key=key, max_retries=0, timeout=300)


def auth(key):
    return {"Authorization": "Bearer " + key}


def read(path):
    with open(path, "rb") as f:
        return f.read()


def upload(key, name, config, weights):
    files = {"adapter_config.json": config, "adapter_model.safetensors": weights}
    return requests.put(f"{URL}/v1/adapters/{name}", headers=auth(key), files=files, timeout=120)


def golden(variant, prompt_id):
    prompts = json.load(open(os.path.join(FIXTURES, "prompts.json")))["prompts"]
    results = json.load(open(os.path.join(FIXTURES, "generations.json")))["results"][variant]
    for p, r in zip(prompts, results):
        if p["id"] == prompt_id:
            return p, r
    raise KeyError(prompt_id)


def chat_golden(key, model, variant):
    """Greedy chat on the golden chat prompt: exactly the reference text."""
    prompt, result = golden(variant, "p4_chat_short")
    reply = client(key).chat.completions.create(
        model=model, messages=prompt["messages"], temperature=0, max_tokens=32
    )
    text = reply.choices[0].message.content
    check(text == result["text_until_eos"], f"{variant}: got {text!r}, want {result['text_until_eos']!r}")
    check(reply.choices[0].finish_reason == ("stop" if result["eos_index"] is not None else "length"),
          f"{variant}: finish_reason {reply.choices[0].finish_reason}")
    check(reply.usage.prompt_tokens == prompt["num_prompt_tokens"], f"usage {reply.usage}")
    return text


def metrics():
    r = requests.get(URL + "/metrics", headers=auth(ADMIN), timeout=30)
    check(r.status_code == 200, f"/metrics: {r.status_code}")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def safetensors_bytes(tensors):
    """A safetensors file of zero-filled f32 tensors: {key: shape}."""
    header, offset = {}, 0
    for key, shape in tensors.items():
        size = 4
        for d in shape:
            size *= d
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def open_stream(key, model, max_tokens):
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    r = requests.post(URL + "/v1/chat/completions", headers=auth(key), json=body, stream=True, timeout=300)
    check(r.status_code == 200, f"stream: {r.status_code} {r.text if r.status_code != 200 else ''}")
    return r, r.iter_lines()


def next_chunk(lines):
    for line in lines:
        if line.startswith(b"data: "):
            return json.loads(line[6:])
    raise AssertionError("stream ended")


def first_phase():
    check(requests.get(URL + "/health", timeout=10).status_code == 200, "/health")
    check(requests.get(URL + "/ready", timeout=10).status_code == 200, "/ready")
    check(requests.get(URL + "/v1/models", timeout=10).status_code == 401, "no key: 401")
    base = client(ALICE).models.list().data[0].id

    # Upload adapter a as alice: 201, servable at once, exactly the golden text.
    config_a, weights_a = read(os.path.join(ADAPTER_A, "adapter_config.json")), read(os.path.join(ADAPTER_A, "adapter_model.safetensors"))
    r = upload(ALICE, NAME, config_a, weights_a)
    check(r.status_code == 201, f"upload: {r.status_code} {r.text}")
    check(r.json()["rank"] == 8 and r.json()["generation"] == 1, r.text)
    models = {m.id: m for m in client(ALICE).models.list().data}
    check(NAME in models, f"models: {list(models)}")
    text = chat_golden(ALICE, NAME, "a_r8_qv")
    chat_golden(ALICE, base, "base")

    # Raw completions, with and without the adapter.
    for model, variant in [(NAME, "a_r8_qv"), (base, "base")]:
        prompt, result = golden(variant, "p0_raw_short")
        reply = client(ALICE).completions.create(model=model, prompt=prompt["rendered_text"], temperature=0, max_tokens=32)
        check(reply.choices[0].text == result["text_until_eos"], f"{variant} raw: {reply.choices[0].text!r}")

    # Streaming text equals the non-streaming text.
    prompt, _ = golden("a_r8_qv", "p4_chat_short")
    stream = client(ALICE).chat.completions.create(
        model=NAME, messages=prompt["messages"], temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    check("".join(pieces) == text, f"stream: {''.join(pieces)!r} != {text!r}")
    check(finish == "stop" and usage is not None and usage.completion_tokens > 0, f"{finish} {usage}")

    # Bob cannot see alice's adapter, and has his own under the same name.
    try:
        client(BOB).chat.completions.create(model=NAME, messages=prompt["messages"], max_tokens=4)
        raise AssertionError("bob used alice's adapter")
    except openai.NotFoundError:
        pass
    check(requests.get(f"{URL}/v1/adapters/{NAME}", headers=auth(BOB), timeout=10).status_code == 404, "bob GET")
    r = upload(BOB, NAME, read(os.path.join(ADAPTER_B, "adapter_config.json")), read(os.path.join(ADAPTER_B, "adapter_model.safetensors")))
    check(r.status_code == 201, f"bob upload: {r.status_code} {r.text}")
    chat_golden(BOB, NAME, "b_r16_all7")
    chat_golden(ALICE, NAME, "a_r8_qv")
    admin_ids = sorted(m.id for m in client(ADMIN).models.list().data)
    check(admin_ids == sorted([base, f"alice/{NAME}", f"bob/{NAME}"]), f"admin sees {admin_ids}")

    # Bad uploads: 4xx, nothing stored, the server keeps serving.
    config = json.loads(config_a)
    rank16 = json.dumps(dict(config, r=16)).encode()
    unknown_target = json.dumps(dict(config, target_modules=["foo_proj"])).encode()
    unknown_key = safetensors_bytes({"base_model.model.model.layers.0.self_attn.foo_proj.lora_A.weight": [8, 576]})
    bad = [
        ("corrupt", config_a, b"\x00\x01 not safetensors", 422),
        ("rank-mismatch", rank16, weights_a, 422),
        ("unknown-target", unknown_target, weights_a, 422),
        ("unknown-module-key", config_a, unknown_key, 422),
        ("..%2Fescape", config_a, weights_a, 400),
        ("a%2Fb", config_a, weights_a, 400),
        ("x" * 200, config_a, weights_a, 400),
        ("oversize", config_a, weights_a + bytes(24 << 20), 413),
    ]
    for name, cfg, weights, status in bad:
        r = upload(ALICE, name, cfg, weights)
        check(r.status_code == status, f"{name[:20]}: {r.status_code} {r.text[:300]}")
        check("error" in r.json() and r.json()["error"]["message"], f"{name[:20]}: error body {r.text[:300]}")
    listed = requests.get(URL + "/v1/adapters", headers=auth(ALICE), timeout=10).json()["data"]
    check([a["id"] for a in listed] == [NAME] and listed[0]["generation"] == 1, f"alice's store: {listed}")
    chat_golden(ALICE, NAME, "a_r8_qv")

    # Overload: one running (max-running 1), two queued (max-waiting 2): the next one is 429.
    running, running_lines = open_stream(ALICE, NAME, 400)
    while not next_chunk(running_lines)["choices"][0]["delta"].get("content"):
        pass
    queued = [open_stream(ALICE, NAME, 400) for _ in range(2)]
    for _, lines in queued:
        check(next_chunk(lines)["choices"][0]["delta"].get("role") == "assistant", "role chunk")
    try:
        client(ALICE).chat.completions.create(model=NAME, messages=prompt["messages"], max_tokens=4)
        raise AssertionError("a request beyond --max-waiting was accepted")
    except openai.RateLimitError as e:
        check(e.response.headers.get("retry-after") is not None, "Retry-After")

    # Disconnects: the clients go away; their sequences are cancelled and their blocks freed.
    before = metrics().get('lorahost_requests_total{tenant="alice",model="golden-a",outcome="cancelled"}', 0)
    for r, _ in [(running, None)] + queued:
        r.close()
    deadline = time.time() + 120
    while True:
        m = metrics()
        idle = (m["lorahost_running_sequences"], m["lorahost_queue_depth"], m["lorahost_kv_blocks_in_use"]) == (0, 0, 0)
        cancelled = m.get('lorahost_requests_total{tenant="alice",model="golden-a",outcome="cancelled"}', 0) - before
        if idle and cancelled == 3:
            break
        check(time.time() < deadline, f"sequences not freed: running {m['lorahost_running_sequences']}, "
              f"queued {m['lorahost_queue_depth']}, blocks {m['lorahost_kv_blocks_in_use']}, cancelled {cancelled}")
        time.sleep(0.2)
    # ... and the server recovers.
    chat_golden(ALICE, NAME, "a_r8_qv")
    m = metrics()
    check(m['lorahost_adapter_cache_loads_total{tier="host"}'] >= 2, "cache loads counted")
    check(m['lorahost_adapter_cache_hits_total{tier="host"}'] >= 1, "cache hits counted")
    check(m['lorahost_http_responses_total{route="/v1/chat/completions",status="429"}'] == 1, "429 counted")


def after_restart():
    listed = requests.get(f"{URL}/v1/adapters/{NAME}", headers=auth(ALICE), timeout=10)
    check(listed.status_code == 200 and listed.json()["generation"] == 1, f"alice's adapter after restart: {listed.text}")
    chat_golden(ALICE, NAME, "a_r8_qv")
    chat_golden(BOB, NAME, "b_r16_all7")
    ids = sorted(m.id for m in client(ADMIN).models.list().data if "/" in m.id)
    check(ids == [f"alice/{NAME}", f"bob/{NAME}"], f"after restart: {ids}")


if __name__ == "__main__":
    {"first": first_phase, "after-restart": after_restart}[PHASE]()
    print(f"e2e {PHASE}: ok")
