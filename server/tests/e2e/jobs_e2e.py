"""End-to-end check of fine-tuning jobs on a running `lorahost serve` with the official `openai` client.

Run by server/tests/jobs_e2e.rs against a tiny random model in --dtype f32, started with --api-keys
(tenants alice and bob, an admin) and --train-threads 1. Phases:
  first          upload (a bad file is refused naming its line), a job to `succeeded`, chat with
                 its model, events, tenant isolation, a cancelled job, and a long job left running
                 (the test then kills the server with SIGKILL)
  after-restart  the succeeded job and its model are back, the cancelled job is still cancelled,
                 the killed job is `failed` (interrupted) and published nothing

Usage: jobs_e2e.py PHASE BASE_URL TRAIN_FILE STATE_FILE ALICE_KEY BOB_KEY ADMIN_KEY
"""

import json
import sys
import time

import openai

PHASE, URL, TRAIN_FILE, STATE_FILE, ALICE, BOB, ADMIN = sys.argv[1:8]
TERMINAL = ("succeeded", "failed", "cancelled")


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def client(key):
    return openai.OpenAI(base_url=URL + "/v1", api_key=key, max_retries=0, timeout=300)


def base_id(c):
    return next(m.id for m in c.models.list() if getattr(m, "parent", None) is None)


def wait(c, job_id, until):
    deadline = time.time() + 300
    while True:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        check(time.time() < deadline, f"job {job_id} stuck in {job.status}")
        time.sleep(0.05)


def not_found(call, what):
    try:
        call()
    except openai.NotFoundError:
        return
    raise AssertionError(f"{what}: visible to another tenant")


def chat(c, model):
    reply = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of Zorbia?"}],
        temperature=0, max_tokens=4,
    )
    check(reply.usage.completion_tokens >= 1, f"usage {reply.usage}")
    return reply.choices[0].message.content


def first():
    alice, bob = client(ALICE), client(BOB)
    base = base_id(alice)

    # A bad file is refused with its line number, and nothing is stored.
    bad = b'{"text": "fine"}\n{"messages": [{"role": "user", "content": "no answer"}]}\n'
    try:
        alice.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
        raise AssertionError("a bad training file was accepted")
    except openai.UnprocessableEntityError as e:
        check("bad.jsonl line 2" in str(e), f"error does not name the line: {e}")
    check(len(alice.files.list().data) == 0, "a refused file was stored")

    with open(TRAIN_FILE, "rb") as f:
        file = alice.files.create(file=("facts.jsonl", f), purpose="fine-tune")
    check(file.id.startswith("file-") and file.purpose == "fine-tune" and file.bytes > 0, f"{file}")
    check(alice.files.retrieve(file.id).filename == "facts.jsonl", "file name")

    # A job to success; its model answers the owner's next request.
    job = alice.fine_tuning.jobs.create(
        model=base, training_file=file.id, suffix="facts", seed=3,
        hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 10},
        extra_body={"lorahost": {"rank": 4, "steps": 3, "max_seq_len": 64}},
    )
    check(job.id.startswith("ftjob-") and job.status in ("validating_files", "queued", "running"), f"{job}")
    done = wait(alice, job.id, lambda j: j.status in TERMINAL)
    check(done.status == "succeeded", f"job ended {done.status}: {done.error}")
    model = done.fine_tuned_model
    check(model and model.startswith("ft-facts-"), f"fine_tuned_model {model!r}")
    check(done.trained_tokens and done.trained_tokens > 0, f"trained_tokens {done.trained_tokens}")
    check(model in [m.id for m in alice.models.list()], "the model is not listed")
    chat(alice, model)
    events = list(alice.fine_tuning.jobs.list_events(job.id, limit=2))
    messages = [e.message for e in events]
    check(any("Step 3/3" in m for m in messages), f"events {messages}")
    check(messages[0] == "The job has successfully completed", f"newest event {messages[0]}")
    check([j.id for j in alice.fine_tuning.jobs.list()] == [job.id], "job list")

    # Another tenant sees none of it.
    not_found(lambda: bob.fine_tuning.jobs.retrieve(job.id), "job")
    not_found(lambda: bob.fine_tuning.jobs.list_events(job.id), "events")
    not_found(lambda: bob.fine_tuning.jobs.cancel(job.id), "cancel")
    not_found(lambda: bob.files.retrieve(file.id), "file")
    not_found(lambda: chat(bob, model), "model")
    not_found(lambda: bob.fine_tuning.jobs.create(model=base, training_file=file.id), "training file")
    check(bob.fine_tuning.jobs.list().data == [], "bob lists alice's jobs")
    check(bob.files.list().data == [], "bob lists alice's files")
    check(model not in [m.id for m in bob.models.list()], "bob lists alice's model")
    admin = client(ADMIN)
    check(admin.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == "alice/" + model, "admin view")

    # Cancel a running job: cancelled, nothing published.
    long = dict(model=base, training_file=file.id, extra_body={"lorahost": {"rank": 4, "steps": 1000000}})
    cancelled = alice.fine_tuning.jobs.create(suffix="cancelled", **long)
    wait(alice, cancelled.id, lambda j: j.status == "running")
    reply = alice.fine_tuning.jobs.cancel(cancelled.id)
    check(reply.status == "cancelled", f"cancel answered {reply.status}")
    try:
        alice.fine_tuning.jobs.cancel(cancelled.id)
        raise AssertionError("a cancelled job was cancelled again")
    except openai.ConflictError:
        pass

    # The next job starts once the cancelled one stopped; the server is killed while it trains.
    killed = alice.fine_tuning.jobs.create(suffix="killed", **long)
    wait(alice, killed.id, lambda j: j.status == "running")
    check(alice.fine_tuning.jobs.retrieve(cancelled.id).status == "cancelled", "cancelled job changed")
    ft_models = [m.id for m in alice.models.list() if m.id.startswith("ft-")]
    check(ft_models == [model], f"models {ft_models}")
    with open(STATE_FILE, "w") as f:
        json.dump({"file": file.id, "job": job.id, "model": model, "cancelled": cancelled.id,
                   "killed": killed.id}, f)


def after_restart():
    with open(STATE_FILE) as f:
        state = json.load(f)
    alice, bob = client(ALICE), client(BOB)
    job = alice.fine_tuning.jobs.retrieve(state["job"])
    check(job.status == "succeeded" and job.fine_tuned_model == state["model"], f"{job}")
    chat(alice, state["model"])
    check(alice.fine_tuning.jobs.retrieve(state["cancelled"]).status == "cancelled", "cancelled job")
    killed = alice.fine_tuning.jobs.retrieve(state["killed"])
    check(killed.status == "failed", f"killed job is {killed.status}")
    check(killed.error.code == "interrupted", f"killed job error {killed.error}")
    check(killed.fine_tuned_model is None, "killed job published")
    ft_models = [m.id for m in alice.models.list() if m.id.startswith("ft-")]
    check(ft_models == [state["model"]], f"models {ft_models}")
    check(alice.files.retrieve(state["file"]).id == state["file"], "file lost")
    not_found(lambda: bob.fine_tuning.jobs.retrieve(state["job"]), "job after restart")
    not_found(lambda: chat(bob, state["model"]), "model after restart")


{"first": first, "after-restart": after_restart}[PHASE]()
print(f"jobs e2e {PHASE}: ok")
