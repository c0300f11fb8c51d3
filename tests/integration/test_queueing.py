"""Batching under a burst, priorities under a backlog, deadlines and cancellation."""

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.procs import start_worker, worker_ready


def test_a_burst_of_64_is_served_in_batches(client):
    texts = [f"burst sentence number {i}" for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda t: client.submit("minilm", t)["id"], texts))
    jobs = [client.wait(i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    sizes = Counter((j["worker"], j["started_at"], j["batch_size"]) for j in jobs)
    batch_sizes = sorted(size for (_, _, size) in sizes)
    assert max(batch_sizes) > 1, batch_sizes
    assert len(sizes) < 64
    # each job got its own result: same text, same embedding as a lone job
    alone = client.run("minilm", texts[5])["result"]["embedding"]
    assert max(abs(a - b) for a, b in zip(alone, jobs[5]["result"]["embedding"])) < 1e-4


def test_high_overtakes_normal_and_low_under_a_backlog(client, stack_env, stack_dir, redis_url):
    low = [client.submit("prio", f"low {i}", priority="low")["id"] for i in range(12)]
    normal = [client.submit("prio", f"normal {i}")["id"] for i in range(12)]
    high = [client.submit("prio", f"high {i}", priority="high")["id"] for i in range(6)]
    expiring = client.submit("prio", "too late", priority="high", timeout_s=0.3)["id"]
    cancelled = client.submit("prio", "never mind", priority="high")["id"]
    assert client.delete(f"/jobs/{cancelled}").status_code == 200
    depth = {m["name"]: m for m in client.get("/models").json()["models"]}["prio"]["queue_depth"]
    assert depth == {"high": 7, "normal": 12, "low": 12}  # the cancelled job no longer waits
    time.sleep(0.5)  # the deadline passes while nothing serves the queue
    worker = start_worker("prio", stack_env, stack_dir)
    try:
        worker_ready(redis_url, "prio", worker)
        jobs = {i: client.wait(i) for i in low + normal + high + [expiring, cancelled]}
    finally:
        worker.stop()
    started = {i: jobs[i]["started_at"] for i in low + normal + high}
    assert all(jobs[i]["status"] == "succeeded" for i in started)
    assert max(started[i] for i in high) <= min(started[i] for i in normal)
    assert max(started[i] for i in normal) <= min(started[i] for i in low)
    assert jobs[expiring]["status"] == "expired" and jobs[expiring]["started_at"] is None
    assert jobs[expiring]["result"] is None and jobs[expiring]["error"]["type"] == "Expired"
    assert jobs[cancelled]["status"] == "cancelled" and jobs[cancelled]["attempts"] == 0
    # batches respect the model's max_batch_size
    assert max(j["batch_size"] for j in jobs.values() if j["batch_size"]) <= 4


def test_every_job_sends_its_own_task_events(client, redis_url):
    """celery-batches sends none per request; ours send received/started/succeeded per job (Flower reads these)."""
    import threading

    from celery import Celery

    events, ready, stop = [], threading.Event(), threading.Event()
    app = Celery(broker=redis_url)

    def capture():
        with app.connection() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": events.append})
            ready.set()
            while not stop.is_set():
                try:
                    for _ in receiver.itercapture(limit=None, timeout=1.0, wakeup=True):
                        if stop.is_set():
                            break
                except TimeoutError:  # a quiet second: listen again until told to stop
                    continue

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    ready.wait(10)
    time.sleep(1.0)  # let the subscription settle before publishing
    ids = [client.submit("minilm", f"event {i}")["id"] for i in range(3)] + [client.submit("flaky", "boom")["id"]]
    for job_id in ids:
        client.wait(job_id)

    def seen(job_id, kind):
        return any(e.get("uuid") == job_id and e.get("type") == kind for e in list(events))

    try:
        from tests.procs import wait_until

        wait_until(lambda: all(seen(i, "task-succeeded") for i in ids[:3]) and seen(ids[3], "task-failed"),
                   15, "task events")
    finally:
        stop.set()
        thread.join(timeout=5)
    for job_id in ids:
        assert seen(job_id, "task-received") and seen(job_id, "task-started"), job_id


def test_batches_are_capped_by_inputs_not_jobs(client):
    """flaky's max_batch_size is 16 inputs: jobs of 10 inputs each never share a batch."""
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda i: client.submit("flaky", inputs=[f"job {i} item {k}" for k in range(10)])["id"],
                            range(4)))
    jobs = [client.wait(i) for i in ids]
    assert all(j["status"] == "succeeded" and len(j["result"]) == 10 for j in jobs), jobs
    assert [j["batch_size"] for j in jobs] == [1, 1, 1, 1]
    assert all(item["batch"] <= 16 for j in jobs for item in j["result"])


def test_a_deadline_the_queue_already_rules_out_is_refused_at_once(client, stack_env, stack_dir, redis_url):
    """timeout_s shorter than the work queued ahead (at the live workers' recent speed) is a 429,
    not a job that waits only to expire; a job that jumps the queue by priority still gets in."""
    worker = start_worker("slow", stack_env, stack_dir)  # 3 s a batch of up to 4
    try:
        worker_ready(redis_url, "slow", worker)
        client.run("slow", "learn the speed")
        backlog = [client.submit("slow", f"backlog {i}")["id"] for i in range(12)]
        response = client.post("/jobs", json={"model": "slow", "input": "now please", "timeout_s": 2})
        assert response.status_code == 429, response.text
        assert response.json()["error"]["type"] == "deadline_unmeetable"
        assert int(response.headers["Retry-After"]) >= 1
        urgent = client.submit("slow", "urgent", priority="high", timeout_s=8)["id"]  # nothing high ahead
        patient = client.submit("slow", "patient", timeout_s=600)["id"]
        for job_id in backlog:
            client.delete(f"/jobs/{job_id}")  # the rest need not run
        assert client.wait(urgent)["status"] == "succeeded"
        assert client.wait(patient)["status"] == "succeeded"
    finally:
        worker.stop()


@pytest.mark.parametrize("lane", ["1", "0"])
def test_a_high_job_does_not_wait_for_a_running_batch_of_others_with_the_urgent_lane(
        client, stack_env, stack_dir, redis_url, lane):
    """URGENT_LANE=1 (the default): a high job starts in the spare process while a 3 s batch of low
    jobs runs; with 0 it waits for that batch to finish."""
    from tests.procs import wait_until

    worker = start_worker("slow", {**stack_env, "URGENT_LANE": lane}, stack_dir)  # 3 s a batch of up to 4
    try:
        worker_ready(redis_url, "slow", worker)
        low = [client.submit("slow", f"low {i}", priority="low")["id"] for i in range(4)]
        wait_until(lambda: client.get(f"/jobs/{low[0]}").json()["status"] == "running", 30, "the low batch")
        high = client.submit("slow", "high", priority="high")["id"]
        jobs = {i: client.wait(i, timeout=30) for i in low + [high]}
    finally:
        worker.stop()
    assert all(j["status"] == "succeeded" for j in jobs.values()), jobs
    low_done = min(jobs[i]["finished_at"] for i in low)
    if lane == "1":
        assert jobs[high]["started_at"] < low_done
        assert jobs[high]["result"]["pid"] != jobs[low[0]]["result"]["pid"]  # the lane's process
    else:
        assert jobs[high]["started_at"] >= low_done
