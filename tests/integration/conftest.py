"""The integration stack: real Redis, the API under gunicorn, real Celery workers.

One stack per session (as Celery's own integration tests share a session
worker); tests that need a worker of their own start and stop it themselves.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.procs import ROOT, start_api, start_worker, worker_ready

SESSION_MODELS = ("minilm", "sentiment", "efficientnet-lite0", "flaky")

TEST_MODELS = """
# Test-only entries, appended to the shipped models.toml.
[models.flaky]
task = "text-classification"
source = "python:tests.fixtures.runners:EchoRunner"
max_batch_size = 16
max_wait_ms = 400
batching = "fixed"  # these tests need jobs to share a batch: wait for them
[models.flaky.options]
marker_dir = "{marker_dir}"

[models.prio]
task = "text-classification"
source = "python:tests.fixtures.runners:EchoRunner"
max_batch_size = 4
max_wait_ms = 5
[models.prio.options]
sleep_ms = 20

[models.slow]
task = "text-classification"
source = "python:tests.fixtures.runners:EchoRunner"
max_batch_size = 4
max_wait_ms = 5
[models.slow.options]
sleep_ms = 3000

[models.fragile]
task = "text-classification"
source = "python:tests.fixtures.runners:EchoRunner"
max_batch_size = 8
max_wait_ms = 300
batching = "fixed"  # these tests need jobs to share a batch: wait for them

[models.metered]
task = "text-classification"
source = "python:tests.fixtures.runners:EchoRunner"
max_batch_size = 8
max_wait_ms = 200
batching = "fixed"  # these tests need jobs to share a batch: wait for them

[models.idle]
task = "embedding"
source = "python:tests.fixtures.runners:EchoRunner"
"""


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def models_file(stack_dir) -> Path:
    markers = stack_dir / "markers"
    markers.mkdir()
    from tests.fixtures.zoo import zoo_toml

    path = stack_dir / "models.toml"
    path.write_text((ROOT / "models.toml").read_text() + TEST_MODELS.format(marker_dir=markers)
                    + zoo_toml(stack_dir / "zoo"))
    return path


@pytest.fixture(scope="session")
def stack_env(redis_url, models_file, stack_dir) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "MODELS_FILE": str(models_file), "MODELS": "",
            "TORCH_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MAX_BODY_BYTES": str(2 * 1024 * 1024),
            "MAX_RETRIES": "3", "METRICS_DIR": str(stack_dir / "metrics")}


@pytest.fixture(scope="session")
def api(stack_env, stack_dir):
    proc, base = start_api(stack_env, stack_dir)
    try:
        yield base
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def workers(stack_env, stack_dir, redis_url):
    procs = {model: start_worker(model, stack_env, stack_dir) for model in SESSION_MODELS}
    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(lambda m: worker_ready(redis_url, m, procs[m], timeout_s=180), procs))
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="session")
def client(api, workers):
    """An HTTP client for the full stack: API plus one worker per session model."""
    return Client(api)


class Client:
    def __init__(self, base: str, headers: dict | None = None):
        self.base = base
        self.session = requests.Session()
        self.session.headers.update(headers or {})
        # gunicorn closes a keep-alive connection idle for 2 s; a GET sent on it as it closes is reset
        # unanswered (seen once in CI after a 2 s sleep). GETs are safe to send again, once.
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        retry = Retry(total=1, connect=1, read=1, status=0, allowed_methods=frozenset({"GET"}),
                      raise_on_status=False)
        self.session.mount("http://", HTTPAdapter(max_retries=retry))

    def post(self, path: str, **kw):
        return self.session.post(self.base + path, timeout=30, **kw)

    def get(self, path: str, **kw):
        return self.session.get(self.base + path, timeout=45, **kw)

    def delete(self, path: str, **kw):
        return self.session.delete(self.base + path, timeout=30, **kw)

    def submit(self, model: str, input=None, *, inputs=None, expect: int = 202, headers=None, **extra):
        body = {"model": model, **extra}
        if inputs is not None:
            body["inputs"] = inputs
        else:
            body["input"] = input
        response = self.post("/jobs", json=body, headers=headers or {})
        assert response.status_code == expect, response.text
        return response.json()

    def wait(self, job_id: str, timeout: float = 30) -> dict:
        response = self.get(f"/jobs/{job_id}", params={"wait": min(timeout, 30)})
        assert response.status_code == 200, response.text
        return response.json()

    def run(self, model: str, input=None, **kw) -> dict:
        job = self.wait(self.submit(model, input, **kw)["id"])
        assert job["status"] == "succeeded", job
        return job
