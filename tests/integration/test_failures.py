"""A poison job fails alone, transient errors retry, the broker down is a quick 503,
API keys separate owners, and a worker for an unknown model refuses to start."""

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.integration.conftest import Client
from tests.procs import free_port, start_api, start_worker, wait_until, worker_ready


def test_a_poison_job_fails_alone_and_is_not_redelivered(client):
    texts = [f"fine {i}" for i in range(7)] + ["boom"]
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda t: client.submit("flaky", t)["id"], texts))
    jobs = [client.wait(i) for i in ids]
    poison, rest = jobs[-1], jobs[:-1]
    assert poison["status"] == "failed", poison
    assert poison["error"]["type"] == "ValueError" and "boom" in poison["error"]["message"]
    assert poison["result"] is None
    assert all(j["status"] == "succeeded" for j in rest), rest
    assert [j["result"]["echo"] for j in rest] == texts[:-1]
    assert {j["result"]["torch_threads"] for j in rest} == {1}  # TORCH_THREADS, set per worker process
    # it shared a claimed batch with others, and they survived it
    shared = [j for j in rest if j["started_at"] == poison["started_at"]]
    assert shared and poison["batch_size"] > 1
    time.sleep(2)
    again = client.get(f"/jobs/{poison['id']}").json()
    assert again["status"] == "failed" and again["attempts"] == 1


def test_a_transient_error_is_retried_with_backoff(client):
    job = client.wait(client.submit("flaky", f"transient:{uuid.uuid4().hex}")["id"])
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    depth = {m["name"]: m for m in client.get("/models").json()["models"]}["flaky"]["queue_depth"]
    assert depth == {"high": 0, "normal": 0, "low": 0}  # waiting counts balance across the retry


def test_worker_side_decode_failure_fails_that_job(client):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((300, 300), 60).convert("RGB").save(buf, "JPEG")
    raw = buf.getvalue()
    # a header cut short is refused by the API (400) ...
    header_cut = base64.b64encode(raw[:300]).decode()
    assert client.post("/jobs", json={"model": "efficientnet-lite0", "input": {"image_b64": header_cut}}).status_code == 400
    # ... data cut short passes the cheap header check and fails in the worker, alone
    truncated = base64.b64encode(raw[: len(raw) * 2 // 3]).decode()
    job = client.wait(client.submit("efficientnet-lite0", {"image_b64": truncated})["id"])
    assert job["status"] == "failed" and job["error"]["type"] == "InvalidInput"
    assert "truncated" in job["error"]["message"]
    assert client.run("efficientnet-lite0", {"image_b64": base64.b64encode(raw).decode()})


def test_broker_down_is_a_quick_503(stack_env, stack_dir):
    env = {**stack_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc, base = start_api(env, stack_dir)
    try:
        start = time.monotonic()
        response = requests.post(f"{base}/jobs", json={"model": "minilm", "input": "x"}, timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["type"] == "broker_unavailable"
        assert time.monotonic() - start < 10
        assert requests.get(f"{base}/readyz", timeout=10).status_code == 503
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
    finally:
        proc.stop()


def test_api_keys_separate_owners(stack_env, stack_dir, workers):
    proc, base = start_api({**stack_env, "API_KEYS": "key-one,key-two"}, stack_dir)
    try:
        one = Client(base, {"Authorization": "Bearer key-one"})
        two = Client(base, {"X-API-Key": "key-two"})
        job_id = one.submit("minilm", "mine")["id"]
        assert one.wait(job_id)["status"] == "succeeded"
        assert two.get(f"/jobs/{job_id}").status_code == 404
        assert two.delete(f"/jobs/{job_id}").status_code == 404
        assert requests.get(f"{base}/jobs/{job_id}", timeout=10).status_code == 401
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
    finally:
        proc.stop()


def test_a_worker_for_an_unknown_model_refuses_to_start(stack_env, stack_dir):
    proc = start_worker("no-such-model", stack_env, stack_dir)
    try:
        wait_until(lambda: not proc.alive(), 60, "worker exit")
        assert proc.popen.returncode != 0
        assert "unknown model 'no-such-model'" in proc.log()
    finally:
        proc.stop()


def test_a_pool_process_killed_mid_batch_loses_nothing(client, stack_env, stack_dir, redis_url):
    """SIGKILL the process running a batch: the batch is requeued and run again (at least once)."""
    import subprocess

    worker = start_worker("slow", stack_env, stack_dir)
    try:
        worker_ready(redis_url, "slow", worker)
        ids = [client.submit("slow", f"survive {i}")["id"] for i in range(3)]
        running = wait_until(lambda: [i for i in ids if client.get(f"/jobs/{i}").json()["status"] == "running"],
                             30, "a batch running")
        children = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
        assert children, "no pool process found"
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        jobs = [client.wait(i, timeout=30) for i in ids]
        assert worker.alive()
    finally:
        worker.stop()
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    attempts = {j["id"]: j["attempts"] for j in jobs}
    assert all(attempts[i] == 2 for i in running), attempts  # ran again after the kill
    assert all(str(j["result"]["pid"]) not in children for j in jobs)  # results come from the new process


def test_a_full_queue_is_429_with_retry_after(client, stack_env, stack_dir):
    depth = sum({m["name"]: m for m in client.get("/models").json()["models"]}["idle"]["queue_depth"].values())
    proc, base = start_api({**stack_env, "MAX_QUEUED": str(depth + 2)}, stack_dir)
    try:
        full = Client(base)
        key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
        first = full.submit("idle", "one", headers=key)
        full.submit("idle", "two")
        response = full.post("/jobs", json={"model": "idle", "input": "three"})
        assert response.status_code == 429, response.text
        assert response.json()["error"]["type"] == "queue_full"
        assert int(response.headers["Retry-After"]) > 0
        # a replay is not new work: it gets its job back even with the queue full
        assert full.submit("idle", "one", headers=key)["id"] == first["id"]
        assert full.submit("minilm", "other models are not affected")["status"] == "queued"
    finally:
        proc.stop()


def test_a_job_that_always_crashes_its_process_fails_after_max_deliveries(client, stack_env, stack_dir, redis_url):
    """FAULT_CRASH_PROBABILITY=1: every delivery kills the pool process mid-batch. The job is
    redelivered, then fails with TooManyDeliveries: it never stays running or queued forever."""
    env = {**stack_env, "FAULT_CRASH_PROBABILITY": "1", "MAX_DELIVERIES": "3", "FAULT_DELAY_MS": "5-20"}
    worker = start_worker("prio", env, stack_dir)
    try:
        worker_ready(redis_url, "prio", worker)
        job = client.wait(client.submit("prio", "doomed")["id"], timeout=30)
        if job["status"] not in ("failed",):
            job = client.wait(job["id"], timeout=30)
        assert worker.alive()  # the pool process died, not the worker
    finally:
        worker.stop()
    assert job["status"] == "failed", job
    assert job["error"]["type"] == "TooManyDeliveries" and job["attempts"] == 4
    assert "exits now, mid-batch" in worker.log(20000)


def test_sigterm_finishes_the_running_batch_and_returns_the_rest(client, stack_env, stack_dir, redis_url):
    """Warm shutdown: the batch in the pool completes and is stored; prefetched jobs go back to the
    queue; a new worker serves them. Nothing is lost and nothing runs twice."""
    worker = start_worker("slow", stack_env, stack_dir)
    try:
        worker_ready(redis_url, "slow", worker)
        ids = [client.submit("slow", f"term {i}")["id"] for i in range(8)]
        running = wait_until(lambda: [i for i in ids if client.get(f"/jobs/{i}").json()["status"] == "running"],
                             30, "a batch running")
        os.kill(worker.pid, signal.SIGTERM)
        wait_until(lambda: not worker.alive(), 60, "warm shutdown")
    finally:
        worker.stop()
    after_stop = {i: client.get(f"/jobs/{i}").json() for i in ids}
    assert all(after_stop[i]["status"] == "succeeded" for i in running), after_stop
    assert all(j["status"] in ("succeeded", "queued") for j in after_stop.values()), after_stop
    replacement = start_worker("slow", stack_env, stack_dir)
    try:
        worker_ready(redis_url, "slow", replacement)
        jobs = [client.wait(i, timeout=30) for i in ids]
        jobs = [j if j["status"] == "succeeded" else client.wait(j["id"], timeout=30) for j in jobs]
    finally:
        replacement.stop()
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    assert all(j["attempts"] == 1 for j in jobs), [j["attempts"] for j in jobs]


def test_a_job_that_crashes_its_process_fails_alone_and_its_batch_mates_succeed(client, stack_env, stack_dir,
                                                                                redis_url):
    """Input ``crash`` kills the pool process (os._exit) in the forward pass, taking its batch down.
    Redelivered, the batch's jobs are suspects and run one at a time, stored one by one; the crasher,
    once caught alone, goes last. It fails with TooManyDeliveries; every batch-mate succeeds."""
    worker = start_worker("fragile", {**stack_env, "MAX_DELIVERIES": "4"}, stack_dir)
    try:
        worker_ready(redis_url, "fragile", worker)
        texts = [f"innocent {i}" for i in range(5)] + ["crash"]
        with ThreadPoolExecutor(6) as pool:
            ids = list(pool.map(lambda t: client.submit("fragile", t)["id"], texts))
        jobs = [client.wait(i, timeout=30) for i in ids]
        jobs = [j if j["status"] not in ("queued", "running") else client.wait(j["id"], timeout=30) for j in jobs]
        assert worker.alive()
        log = worker.log(200_000)
    finally:
        worker.stop()
    crasher, innocents = jobs[-1], jobs[:-1]
    assert crasher["status"] == "failed" and crasher["error"]["type"] == "TooManyDeliveries", crasher
    assert crasher["attempts"] == 5
    assert all(j["status"] == "succeeded" for j in innocents), innocents
    assert [j["result"]["echo"] for j in innocents] == texts[:-1]
    assert max(j["attempts"] for j in innocents) in (2, 3), [j["attempts"] for j in innocents]
    assert all(j["batch_size"] == 1 for j in innocents)  # they finished running alone
    assert "running it alone" in log
