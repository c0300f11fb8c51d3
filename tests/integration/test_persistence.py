"""Redis restarted or killed with jobs queued and running; a worker's main process killed.

Each test runs its own redis-server (AOF, as `make up` configures it) on its own port, its own API
and worker, so the session stack is never disturbed. Every job answered 202 must still finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import requests

from tests.integration.conftest import Client
from tests.procs import start_api, start_redis, start_worker, wait_until, worker_ready

VISIBILITY_TIMEOUT_S = 8


@pytest.fixture
def own_stack(tmp_path, stack_env):
    """(redis proc holder, env, api Client, redis data dir); everything stopped at the end."""
    data = tmp_path / "redis"
    data.mkdir()
    procs = {}
    procs["redis"], url = start_redis(data, aof=True)
    env = {**stack_env, "REDIS_URL": url, "VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S)}
    try:
        procs["api"], base = start_api(env, tmp_path)
        yield procs, env, Client(base), data
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


def _stop_redis(procs, sig) -> int:
    """Stop Redis with ``sig``; its port, to start it again on the same port and data."""
    port = int(procs["redis"].name.split("-")[1])
    os.kill(procs["redis"].pid, sig)
    procs["redis"].popen.wait(timeout=20)
    return port


def _statuses(client, ids):
    return {i: client.get(f"/jobs/{i}").json()["status"] for i in ids}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["restart", "kill-9"])
def test_redis_restarted_or_killed_with_jobs_queued_and_running(own_stack, stack_dir, sig):
    procs, env, client, data = own_stack
    procs["worker"] = start_worker("slow", env, stack_dir)  # 3 s a batch of up to 4
    worker_ready(env["REDIS_URL"], "slow", procs["worker"])
    ids = [client.submit("slow", f"persist {i}")["id"] for i in range(10)]
    wait_until(lambda: "running" in _statuses(client, ids).values(), 30, "a batch running")

    port = _stop_redis(procs, sig)
    # down: the API says so at once, and takes nothing
    start = time.monotonic()
    response = client.post("/jobs", json={"model": "slow", "input": "while down"})
    assert response.status_code == 503, response.text
    assert client.get("/readyz").status_code == 503
    assert client.get(f"/jobs/{ids[0]}").status_code == 503
    metrics = client.get("/metrics")  # the API's own figures still answer; the cluster's say they are missing
    assert metrics.status_code == 200 and "cluster_up 0.0" in metrics.text
    assert 'api_request_seconds_count{method="POST",route="/jobs",status="503"}' in metrics.text
    assert time.monotonic() - start < 20
    time.sleep(3)  # the running batch ends while Redis is away: its results cannot be stored

    procs["redis"], _ = start_redis(data, port=port, aof=True)
    wait_until(lambda: client.get("/readyz").status_code == 200, 30, "API ready again")
    late = client.submit("slow", "after the restart")["id"]
    end = time.monotonic() + VISIBILITY_TIMEOUT_S + 60
    jobs = {}
    while time.monotonic() < end:
        jobs = {i: client.get(f"/jobs/{i}").json() for i in ids + [late]}
        if all(j["status"] == "succeeded" for j in jobs.values()):
            break
        time.sleep(1)
    assert procs["worker"].alive()
    assert all(j["status"] == "succeeded" for j in jobs.values()), \
        {i: (j["status"], j["attempts"]) for i, j in jobs.items()}


def test_a_worker_main_process_killed_mid_batch_loses_nothing(own_stack, stack_dir):
    """SIGKILL the worker itself (not its pool process), as the OOM killer or a host crash would: its
    unacked jobs come back after the visibility timeout and a new worker (supervisord's restart, here
    a fresh one) runs them."""
    procs, env, client, data = own_stack
    procs["worker"] = start_worker("slow", env, stack_dir)
    worker_ready(env["REDIS_URL"], "slow", procs["worker"])
    ids = [client.submit("slow", f"orphan {i}")["id"] for i in range(8)]
    wait_until(lambda: "running" in _statuses(client, ids).values(), 30, "a batch running")
    children = subprocess.run(["pgrep", "-P", str(procs["worker"].pid)], capture_output=True,
                              text=True).stdout.split()
    os.kill(procs["worker"].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    procs["worker"].popen.wait(timeout=10)
    # the pool process, orphaned, does not run on: it exits with its parent
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children), 30, "pool exit")

    procs["replacement"] = start_worker("slow", env, stack_dir)
    worker_ready(env["REDIS_URL"], "slow", procs["replacement"])
    jobs = {}
    while time.monotonic() < killed_at + VISIBILITY_TIMEOUT_S + 60:
        jobs = {i: client.get(f"/jobs/{i}").json() for i in ids}
        if all(j["status"] == "succeeded" for j in jobs.values()):
            break
        time.sleep(1)
    assert all(j["status"] == "succeeded" for j in jobs.values()), \
        {i: (j["status"], j["attempts"]) for i, j in jobs.items()}
    assert any(j["attempts"] == 2 for j in jobs.values())  # the batch that was running ran again
    # back within the visibility timeout plus the 5 s restore sweep, a start, and a 3 s batch or two
    assert time.monotonic() - killed_at < VISIBILITY_TIMEOUT_S + 25, time.monotonic() - killed_at


def test_a_job_whose_message_was_lost_in_transit_is_sent_again(own_stack, stack_dir):
    """kombu pops a message, then records it as unacked: a worker or Redis killed in between loses the
    message (the chaos run caught this). The job record keeps the inputs; a worker finds the job live,
    old, and nowhere in the broker, and sends it again."""
    import redis as redis_lib

    procs, env, client, data = own_stack
    ids = [client.submit("prio", f"lost {i}", priority=p)["id"] for i, p in enumerate(["high", "normal", "low"])]
    kept = client.submit("prio", "kept")["id"]
    broker = redis_lib.Redis.from_url(env["REDIS_URL"])
    lists = [k for k in broker.keys("jobs.prio*")]
    messages = {k: broker.lrange(k, 0, -1) for k in lists}
    broker.delete(*lists)  # as if popped by a worker that died before recording them
    for key, items in messages.items():
        for item in items:
            if kept.encode() in item:
                broker.rpush(key, item)
    env = {**env, "LOST_MESSAGE_AFTER_S": "2", "LOST_SWEEP_EVERY_S": "1"}
    time.sleep(2)
    procs["worker"] = start_worker("prio", env, stack_dir)
    worker_ready(env["REDIS_URL"], "prio", procs["worker"])
    jobs = {i: client.wait(i, timeout=30) for i in ids + [kept]}
    assert all(j["status"] == "succeeded" for j in jobs.values()), jobs
    assert [jobs[i]["result"]["echo"] for i in ids] == ["lost 0", "lost 1", "lost 2"]
    assert all(j["attempts"] == 1 for j in jobs.values())  # the kept one was not sent twice
    log = procs["worker"].log(100_000)
    assert "sent again 3 job(s)" in log, log[-3000:]
    assert kept not in log.split("sent again")[1].splitlines()[0]
