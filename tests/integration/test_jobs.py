"""The HTTP contract end to end: API under gunicorn, Redis, real workers, real models."""

import base64
import io
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

from PIL import Image


def photo_b64(name: str, fmt: str = "JPEG") -> str:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_submit_then_poll_an_embedding(client):
    response = client.post("/jobs", json={"model": "minilm", "input": "hello world"})
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["status"] == "queued" and accepted["model"] == "minilm" and accepted["priority"] == "normal"
    assert response.headers["Location"] == accepted["url"] == f"/jobs/{accepted['id']}"
    job = client.wait(accepted["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["dim"] == 384 and len(job["result"]["embedding"]) == 384
    assert job["error"] is None and job["attempts"] == 1
    assert job["worker"].startswith("worker-minilm") and job["batch_size"] >= 1
    assert job["queue_ms"] >= 0 and job["run_ms"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", job["finished_at"])


def test_sentiment_says_positive_and_negative(client):
    assert client.run("sentiment", "I love this, it works great")["result"]["label"] == "POSITIVE"
    assert client.run("sentiment", "terrible, I want a refund")["result"]["label"] == "NEGATIVE"


def test_a_cat_photo_comes_back_a_cat_json_and_multipart(client):
    job = client.run("efficientnet-lite0", {"image_b64": photo_b64("chelsea")})
    assert job["result"]["top_k"][0]["label"] in {"Egyptian cat", "tabby", "tiger cat"}
    raw = base64.b64decode(photo_b64("coffee", "PNG"))
    response = client.post("/jobs", data={"model": "efficientnet-lite0", "priority": "high"},
                           files={"image": ("coffee.png", raw, "image/png")})
    assert response.status_code == 202, response.text
    assert response.json()["priority"] == "high"
    job = client.wait(response.json()["id"])
    assert job["status"] == "succeeded" and job["result"]["top_k"][0]["label"] == "espresso"


def test_inputs_list_gives_one_job_with_a_list_result(client):
    job = client.run("sentiment", inputs=["I love this, it works great", "terrible, I want a refund", "great!"])
    assert [r["label"] for r in job["result"]] == ["POSITIVE", "NEGATIVE", "POSITIVE"]
    job = client.run("minilm", inputs=["a", "b"])
    assert len(job["result"]) == 2 and all(r["dim"] == 384 for r in job["result"])


def test_unknown_ids_are_404_never_queued(client):
    for path in (f"/jobs/{uuid.uuid4()}", "/jobs/123", f"/jobs/{uuid.uuid4()}?wait=1"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
    assert client.delete(f"/jobs/{uuid.uuid4()}").status_code == 404


def test_cancel_a_queued_job_and_409_for_terminal(client):
    job_id = client.submit("idle", "nobody serves this model")["id"]  # no worker: stays queued
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    again = client.delete(f"/jobs/{job_id}")
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict"
    done = client.run("minilm", "finished already")
    assert client.delete(f"/jobs/{done['id']}").status_code == 409


def test_idempotency_key_gives_one_job_even_concurrently(client):
    key = f"order-{uuid.uuid4()}"
    first = client.submit("minilm", "same request", headers={"Idempotency-Key": key})
    second = client.submit("minilm", "same request", headers={"Idempotency-Key": key})
    assert first["id"] == second["id"]
    key2 = f"order-{uuid.uuid4()}"
    with ThreadPoolExecutor(12) as pool:
        ids = set(pool.map(lambda _: client.submit("minilm", "twin", headers={"Idempotency-Key": key2})["id"],
                           range(12)))
    assert len(ids) == 1
    assert client.wait(ids.pop())["status"] == "succeeded"
    other = client.submit("minilm", "same request", headers={"Idempotency-Key": f"other-{uuid.uuid4()}"})
    assert other["id"] != first["id"]


def test_bad_inputs_over_http(client):
    def err(response, status):
        assert response.status_code == status, response.text
        return response.json()["error"]

    assert "not valid JSON" in err(client.post("/jobs", data=b"{oops", headers={"Content-Type": "application/json"}), 400)["message"]
    assert err(client.post("/jobs", json={"model": "minilm", "input": ["not", "a", "string"]}), 400)
    assert err(client.post("/jobs", json={"model": "minilm", "input": ""}), 400)["message"].endswith("text is empty")
    assert err(client.post("/jobs", json={"model": "minilm", "inputs": []}), 400)
    assert err(client.post("/jobs", json={"model": "no-such-model", "input": "x"}), 404)["type"] == "unknown_model"
    not_image = base64.b64encode(b"GIF89a but not really an image").decode()
    assert "image" in err(client.post("/jobs", json={"model": "efficientnet-lite0", "input": {"image_b64": not_image}}), 400)["message"]
    huge = "x" * (3 * 1024 * 1024)
    assert err(client.post("/jobs", json={"model": "minilm", "input": huge}), 413)["type"] == "too_large"
    assert err(client.get(f"/jobs/{uuid.uuid4()}", params={"wait": "31"}), 404)  # unknown id first
    job_id = client.submit("minilm", "x")["id"]
    assert "between 0 and 30" in err(client.get(f"/jobs/{job_id}", params={"wait": "31"}), 400)["message"]
    assert err(client.get(f"/jobs/{job_id}", params={"wait": "soon"}), 400)


def test_models_health_metrics(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert {"minilm", "sentiment", "efficientnet-lite0"} <= set(models)
    minilm = models["minilm"]
    assert minilm["task"] == "embedding" and minilm["queue"] == "jobs.minilm"
    assert minilm["batch"] == {"max_batch_size": 64, "max_wait_ms": 10.0, "batching": "adaptive"}
    assert set(minilm["queue_depth"]) == {"high", "normal", "low"}
    assert any(w.startswith("worker-minilm") for w in minilm["workers"])
    assert models["idle"]["workers"] == []
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    client.run("sentiment", "fine", priority="low")
    text = client.get("/metrics").text
    assert re.search(r'jobs_submitted_total\{model="sentiment",priority="low"\} [1-9]', text)
    assert re.search(r'jobs_finished_total\{model="sentiment",priority="low",status="succeeded"\} [1-9]', text)
    assert 'queue_depth{model="minilm",priority="high"}' in text
    assert re.search(r'workers_live\{model="minilm"\} 1', text)


def test_wait_returns_as_soon_as_the_job_finishes(client):
    import time

    job_id = client.submit("minilm", "long poll")["id"]
    start = time.monotonic()
    job = client.get(f"/jobs/{job_id}", params={"wait": 20}).json()
    assert job["status"] == "succeeded"
    assert time.monotonic() - start < 10


def test_an_idempotency_key_whose_request_died_is_taken_over(client, redis_client):
    """A key reserved by a request that died before creating its job does not block repeats."""
    key = f"orphan-{uuid.uuid4()}"
    redis_client.set(f"idem::{key}", str(uuid.uuid4()), ex=60)  # no API keys: owner ""
    job = client.submit("minilm", "after the crash", headers={"Idempotency-Key": key})
    assert client.wait(job["id"])["status"] == "succeeded"
    assert client.submit("minilm", "after the crash", headers={"Idempotency-Key": key})["id"] == job["id"]
