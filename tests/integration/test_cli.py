"""The real `celery` CLI against a real worker: Celery's own inspect commands and ours."""

from __future__ import annotations

import json
import subprocess

from tests.procs import ROOT, VENV_BIN, start_ready_worker, start_worker, worker_ready


def celery(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "celery"), "-A", "workers", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**env, "PYTHONPATH": str(ROOT), "PATH": str(VENV_BIN)})


def inspect_json(env: dict, node: str, command: str) -> dict:
    out = celery(env, "inspect", command, "--json", "-t", "5", "-d", node)
    assert out.returncode == 0, out.stderr + out.stdout
    return json.loads(out.stdout.strip().splitlines()[-1])[node]


def test_celery_inspect_and_our_batching_commands(client, stack_env, stack_dir, redis_url):
    import os

    env = {**os.environ, **stack_env}
    worker, node = start_ready_worker("prio", stack_env, stack_dir, redis_url)
    try:
        for i in range(6):
            client.run("prio", f"warm {i}")

        assert inspect_json(env, node, "ping") == {"ok": "pong"}
        queues = inspect_json(env, node, "active_queues")
        assert [q["name"] for q in queues] == ["jobs.prio"]
        stats = inspect_json(env, node, "stats")
        # WORKER_CONCURRENCY=1, and one process more for high-priority jobs (URGENT_LANE)
        assert stats["pool"]["max-concurrency"] == 2 and stats["prefetch_count"] >= 16

        figures = inspect_json(env, node, "batching")
        assert figures["model"] == "prio" and figures["max_batch_size"] == 4 and figures["max_wait_ms"] == 5
        assert figures["urgent_lane"] is True
        assert figures["batches"] >= 1 and figures["jobs"] >= 6 and figures["inference_ms_p50"] >= 20
        assert figures["items_per_s"] > 0

        out = celery(env, "control", "set_batching", "prio", "2", "50", "-d", node, "-t", "5")
        assert out.returncode == 0 and "max_batch_size=2 max_wait_ms=50" in out.stdout, out.stderr + out.stdout
        figures = inspect_json(env, node, "batching")
        assert figures["max_batch_size"] == 2 and figures["max_wait_ms"] == 50
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: client.submit("prio", f"after {i}")["id"], range(8)))
        jobs = [client.wait(i) for i in ids]
        assert all(j["status"] == "succeeded" for j in jobs)
        assert max(j["batch_size"] for j in jobs) == 2  # the new limit, live

        wrong = celery(env, "control", "set_batching", "minilm", "8", "-d", node, "-t", "5")
        assert "skipped" in wrong.stdout, wrong.stdout
        bad = celery(env, "control", "set_batching", "prio", "0", "-d", node, "-t", "5")
        assert "max_batch_size must be >= 1" in bad.stdout, bad.stdout
        text = celery(env, "control", "set_batching", "prio", "abc", "-d", node, "-t", "5")
        assert text.returncode == 0 and "max_batch_size must be an integer" in text.stdout, text.stdout + text.stderr
        assert inspect_json(env, node, "batching")["max_batch_size"] == 2  # unchanged
    finally:
        worker.stop()


def test_celery_control_revoke_cancels_a_job_that_has_not_started(client, stack_env, stack_dir, redis_url):
    import os

    from tests.procs import wait_until

    env = {**os.environ, **stack_env}
    worker = start_worker("slow", stack_env, stack_dir)  # 3 s a batch of up to 4
    try:
        worker_ready(redis_url, "slow", worker)
        ids = [client.submit("slow", f"revoke {i}")["id"] for i in range(6)]
        wait_until(lambda: client.get(f"/jobs/{ids[0]}").json()["status"] == "running", 30, "first batch")
        out = celery(env, "control", "revoke", ids[-1])
        assert out.returncode == 0, out.stderr + out.stdout
        jobs = [client.wait(i, timeout=30) for i in ids]
    finally:
        worker.stop()
    assert all(j["status"] == "succeeded" for j in jobs[:-1]), jobs
    revoked = jobs[-1]
    assert revoked["status"] == "cancelled" and revoked["error"]["type"] == "Revoked", revoked
    assert revoked["attempts"] == 0 and revoked["started_at"] is None


def test_celery_control_cancel_and_add_consumer_pool_restart_and_shutdown(client, stack_env, stack_dir, redis_url):
    import os

    env = {**os.environ, **stack_env}
    worker, node = start_ready_worker("prio", stack_env, stack_dir, redis_url)
    try:
        first = client.run("prio", "before")["result"]["pid"]

        out = celery(env, "control", "cancel_consumer", "jobs.prio", "-d", node, "-t", "5")
        assert out.returncode == 0 and "no longer consuming from" in out.stdout, out.stdout + out.stderr
        held = client.submit("prio", "while drained")["id"]
        import time

        time.sleep(2)
        assert client.get(f"/jobs/{held}").json()["status"] == "queued"  # nobody takes it
        out = celery(env, "control", "add_consumer", "jobs.prio", "-d", node, "-t", "5")
        assert out.returncode == 0 and "add consumer" in out.stdout, out.stdout + out.stderr
        assert client.wait(held)["status"] == "succeeded"

        out = celery(env, "control", "pool_restart", "-d", node, "-t", "10")
        assert out.returncode == 0 and "reload started" in out.stdout, out.stdout + out.stderr
        from tests.procs import wait_until

        after = wait_until(lambda: (j := client.run("prio", "after restart"))["result"]["pid"] != first and j,
                           60, "a job on a new pool process")
        assert after["status"] == "succeeded"

        celery(env, "control", "shutdown", "-d", node, "-t", "2")  # (a worker shutting down does not reply)
        wait_until(lambda: not worker.alive(), 60, "warm shutdown")
        assert worker.popen.returncode == 0
    finally:
        worker.stop()
