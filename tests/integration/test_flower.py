"""Real Flower against the session stack: basic auth always on, every worker and every job seen
(per-job events from batching workers), queue lengths per model and priority in the broker view."""

from __future__ import annotations

import time

import requests

from tests.procs import VENV_BIN, Proc, ROOT, free_port, wait_until

CREDENTIAL = ("ops", "s3cret-flower")


def start_flower(env: dict, log_dir, var_dir) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(f"flower-{port}", [str(VENV_BIN / "celery"), "-A", "workers", "flower",
                                   f"--conf={ROOT / 'flower' / 'flowerconfig.py'}"],
                {**env, "FLOWER_BASIC_AUTH": ":".join(CREDENTIAL), "FLOWER_PORT": str(port),
                 "FLOWER_HOST": "127.0.0.1", "VAR_DIR": str(var_dir)}, log_dir)
    base = f"http://127.0.0.1:{port}"

    def up():
        if not proc.alive():
            raise RuntimeError(f"flower exited:\n{proc.log()}")
        try:
            return requests.get(f"{base}/healthcheck", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(up, 60, "flower")
    return proc, base


def test_flower_needs_its_credential_and_shows_workers_jobs_and_queues(client, stack_env, stack_dir, tmp_path):
    flower, base = start_flower(stack_env, stack_dir, tmp_path)
    try:
        assert requests.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert requests.get(f"{base}/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401
        assert requests.get(f"{base}/", timeout=10).status_code == 401  # the UI too
        auth = CREDENTIAL
        time.sleep(2)  # let Flower subscribe to events before the jobs run
        ok = [client.run("minilm", f"flower {i}")["id"] for i in range(3)]
        bad = client.wait(client.submit("flaky", "boom")["id"])
        assert bad["status"] == "failed"

        def seen():
            tasks = requests.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
            return tasks if all(i in tasks for i in ok + [bad["id"]]) and \
                all(tasks[i]["state"] == "SUCCESS" for i in ok) and tasks[bad["id"]]["state"] == "FAILURE" else None

        tasks = wait_until(seen, 30, "jobs in flower", interval=0.5)
        job = tasks[ok[0]]
        assert job["name"] == "tasks.infer" and job["runtime"] is not None and job["runtime"] > 0
        assert job["worker"].startswith("worker-minilm")
        assert job["result"].startswith('{"embedding":[') and len(job["result"]) <= 1024 + 3  # JSON, cut at 1024 as Celery cuts its repr
        assert "ValueError" in tasks[bad["id"]]["exception"]

        workers = wait_until(lambda: requests.get(f"{base}/api/workers", params={"refresh": 1}, auth=auth,
                                                  timeout=30).json() or None, 30, "workers in flower")
        names = set(workers)
        for model in ("minilm", "sentiment", "efficientnet-lite0", "flaky"):
            assert any(n.startswith(f"worker-{model}") for n in names), names
        # The Broker view (and its API): every model's queue, a worker or not, per priority after the total.
        waiting = [client.submit("idle", f"flower {p}", priority=p)["id"] for p in ("high", "high", "low")]
        try:
            queues = requests.get(f"{base}/api/queues/length", auth=auth, timeout=30).json()["active_queues"]
            depth = {q["name"]: q["messages"] for q in queues}
            assert {"jobs.minilm", "jobs.sentiment", "jobs.efficientnet-lite0"} <= set(depth)
            assert all(isinstance(n, int) for n in depth.values())
            assert "celery" not in depth  # Celery's default queue: nothing here uses it
            for queue in ("jobs.minilm", "jobs.idle"):
                assert depth[queue] == sum(depth[f"{queue} ({p})"] for p in ("high", "normal", "low"))
            assert depth["jobs.idle (high)"] >= 2 and depth["jobs.idle (low)"] >= 1  # no worker serves idle
            page = requests.get(f"{base}/broker", auth=auth, timeout=30)
            assert page.status_code == 200 and "jobs.idle (high)" in page.text
        finally:
            for job_id in waiting:
                client.delete(f"/jobs/{job_id}")
    finally:
        flower.stop()


def test_flower_never_runs_open(stack_env, stack_dir, tmp_path):
    proc = Proc(f"flower-open-{free_port()}", [str(VENV_BIN / "celery"), "-A", "workers", "flower",
                                               f"--conf={ROOT / 'flower' / 'flowerconfig.py'}"],
                {**stack_env, "FLOWER_BASIC_AUTH": "", "FLOWER_PORT": str(free_port()),
                 "VAR_DIR": str(tmp_path)}, stack_dir)
    try:
        wait_until(lambda: not proc.alive(), 60, "flower refusing to start")
        assert proc.popen.returncode != 0
        assert "FLOWER_BASIC_AUTH must be set" in proc.log()
    finally:
        proc.stop()
