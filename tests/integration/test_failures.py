"""A poison job fails alone, transient errors retry, the broker down is a quick 503,
API keys separate owners, and a worker for an unknown model refuses to start."""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.integration.conftest import Client
from tests.procs import free_port, start_api, start_worker, wait_until


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
