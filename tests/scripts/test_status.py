"""make status (scripts/status.py) against a real redis-server, seeded through JobStore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import redis

from tasks.store import JobStore
from tests.procs import ROOT, free_port

MODELS_TOML = """
[models.st-alpha]
task = "text-classification"
source = "python:tests.fixtures.runners:EchoRunner"

[models.st-beta]
task = "text-classification"
source = "python:tests.fixtures.runners:EchoRunner"
"""


@pytest.fixture
def env(redis_url, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + "/5"  # a database of its own, flushed
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    models = tmp_path / "models.toml"
    models.write_text(MODELS_TOML)
    (tmp_path / "var" / "log").mkdir(parents=True)
    yield {"REDIS_URL": url, "MODELS_FILE": str(models), "MODELS": "", "VAR_DIR": str(tmp_path / "var"),
           "BROKER_URL": "", "RESULT_BACKEND": ""}
    client.flushdb()
    client.close()


def run_status(env, *args, timeout=30):
    full = {**os.environ, **env}
    for name in ("BROKER_URL", "RESULT_BACKEND"):
        if not full.get(name):
            full.pop(name, None)
    return subprocess.run([sys.executable, "scripts/status.py", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


def seed(store: JobStore) -> None:
    """st-alpha: 6 submitted (2 high, 3 normal, 1 low): 2 succeeded, 1 failed, 1 cancelled, 2 still
    waiting (normal, low). st-beta: 1 expired job and one that is running. Two live workers on
    st-alpha (one with a speed), a dead one, one on st-beta."""
    now = time.time()
    jobs = [("a1", "high"), ("a2", "high"), ("a3", "normal"), ("a4", "normal"), ("a5", "normal"), ("a6", "low")]
    for job_id, priority in jobs:
        store.create(job_id, model="st-alpha", priority=priority, owner="", n_inputs=1, single=True, deadline=None)
    store.claim(["a1", "a2", "a3"], "worker-st-alpha@h1", 3, 5)
    store.finish([{"id": "a1", "status": "succeeded", "result": "x", "model": "st-alpha", "priority": "high"},
                  {"id": "a2", "status": "succeeded", "result": "y", "model": "st-alpha", "priority": "high"},
                  {"id": "a3", "status": "failed", "model": "st-alpha", "priority": "normal",
                   "error": {"type": "ValueError", "message": "boom: this input breaks the model"}}])
    assert store.cancel("a4")[0]
    store.create("b1", model="st-beta", priority="normal", owner="", n_inputs=1, single=True, deadline=now - 1)
    store.get("b1")  # past its deadline: a read expires it
    store.create("b2", model="st-beta", priority="low", owner="", n_inputs=1, single=True, deadline=None)
    store.claim(["b2"], "worker-st-beta@h1", 1, 5)

    store.heartbeat("st-alpha", "worker-st-alpha@h1", 30)
    store.heartbeat("st-alpha", "worker-st-alpha@h2", 30)
    store.r.hset("workers:st-alpha", "worker-st-alpha@dead", repr(now - 100))
    store.heartbeat("st-beta", "worker-st-beta@h1", 30)
    store.record_speed("st-alpha", "worker-st-alpha@h1", 0.025, 1, 60)
    store.record_speed("st-alpha", "worker-st-alpha@dead", 0.5, 1, 60)


def test_json_shows_the_seeded_numbers(env):
    store = JobStore.from_url(env["REDIS_URL"], 3600)
    seed(store)
    out = run_status(env, "--json", "--interval", "0.2")
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    alpha, beta = view["models"]["st-alpha"], view["models"]["st-beta"]
    assert [w["name"] for w in alpha["workers"]] == ["worker-st-alpha@h1", "worker-st-alpha@h2"]
    assert alpha["workers"][0]["job_s"] == 0.025 and alpha["workers"][1]["job_s"] is None
    assert alpha["queued"] == {"high": 0, "normal": 1, "low": 1} and alpha["queued_total"] == 2
    assert (alpha["submitted"], alpha["succeeded"], alpha["failed"], alpha["expired"], alpha["cancelled"]) \
        == (6, 2, 1, 0, 1)
    assert alpha["jobs_per_s"] == 0
    assert [w["name"] for w in beta["workers"]] == ["worker-st-beta@h1"]
    assert beta["queued"] == {"high": 0, "normal": 0, "low": 0}
    assert (beta["submitted"], beta["expired"], beta["unfinished"]) == (2, 1, 1)
    assert view["totals"]["submitted"] == 8 and view["totals"]["workers"] == 3
    # the store keeps the last failures: a3's, from finish()
    [failure] = view["recent_failures"]
    assert failure["id"] == "a3" and failure["model"] == "st-alpha" and failure["type"] == "ValueError"
    assert failure["message"] == "boom: this input breaks the model"


def test_jobs_per_second_counts_what_finishes_between_the_samples(env):
    store = JobStore.from_url(env["REDIS_URL"], 3600)
    ids = [f"r{i}" for i in range(10)]
    for job_id in ids:
        store.create(job_id, model="st-beta", priority="normal", owner="", n_inputs=1, single=True, deadline=None)
    proc = subprocess.Popen([sys.executable, "scripts/status.py", "--json", "--interval", "2"], cwd=ROOT,
                            env={**os.environ, **{k: v for k, v in env.items() if v}}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # between its two samples
    store.claim(ids, "worker-st-beta@h1", 10, 5)
    store.finish([{"id": i, "status": "succeeded", "result": 1, "model": "st-beta", "priority": "normal"}
                  for i in ids])
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    view = json.loads(stdout)
    beta = view["models"]["st-beta"]
    assert beta["succeeded"] == 10
    assert 4.0 <= beta["jobs_per_s"] <= 5.5, beta  # 10 jobs over ~2 s
    assert view["totals"]["jobs_per_s"] == beta["jobs_per_s"]


def test_text_view(env):
    store = JobStore.from_url(env["REDIS_URL"], 3600)
    seed(store)
    out = run_status(env, "--interval", "0.1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    alpha = next(line for line in lines if line.startswith("st-alpha "))
    #                 workers high normal low submitted succeeded failed expired cancelled jobs/s
    assert alpha.split()[1:] == ["2", "0", "1", "1", "6", "2", "1", "0", "1", "0.0"]
    beta = next(line for line in lines if line.startswith("st-beta "))
    assert beta.split()[1:] == ["1", "0", "0", "0", "2", "0", "0", "1", "0", "0.0"]
    assert "  worker-st-alpha@h1  25.0 ms/job" in lines
    assert "  worker-st-alpha@h2  no batch yet" in lines
    assert not any("@dead" in line for line in lines)
    total = next(line for line in lines if line.startswith("total "))
    assert total.split()[1:4] == ["3", "8", "2"] and total.endswith("queued 2")


def test_recent_failures_newest_first_as_many_as_asked(env):
    store = JobStore.from_url(env["REDIS_URL"], 3600)
    seed(store)
    at = 1_790_000_000.0  # 2026-09-21 ...
    entries = [{"id": f"f{i}", "model": "st-alpha", "priority": "normal", "type": "ValueError",
                "message": f"boom number {i}", "at": at + i} for i in range(8)]
    for entry in entries:  # newest first, as LPUSH leaves them
        store.r.lpush("failures:recent", json.dumps(entry))
    view = json.loads(run_status(env, "--json", "--interval", "0.1", "--failures", "3").stdout)
    assert [f["id"] for f in view["recent_failures"]] == ["f7", "f6", "f5"]
    text = run_status(env, "--interval", "0.1", "--failures", "2").stdout
    assert "Recent failures:" in text
    assert "st-alpha           f7  ValueError: boom number 7" in text
    assert "f5" not in text


def test_unreachable_redis_exits_nonzero_fast(env):
    dead = {**env, "REDIS_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0"}
    start = time.monotonic()
    out = run_status(dead, "--interval", "0.1")
    assert time.monotonic() - start < 10
    assert out.returncode == 2
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in out.stderr
    assert "s3cret" not in out.stderr and out.stdout == ""
