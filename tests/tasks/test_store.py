"""The job store's atomic transitions, against a real redis-server."""

import json
import time
import uuid

import pytest

from celeryconfig import PRIORITIES
from tasks.store import JobStore, iso, result_key


@pytest.fixture
def store(redis_client):
    redis_client.flushdb()
    return JobStore(redis_client, ttl_s=60)


def new_job(store, deadline=None):
    job_id = str(uuid.uuid4())
    store.create(job_id, model="m", priority="high", owner="o", n_inputs=1, single=True, deadline=deadline)
    return job_id


def test_create_and_view(store):
    job_id = new_job(store)
    job = store.get(job_id)
    assert job["status"] == "queued" and job["model"] == "m" and job["priority"] == "high"
    assert job["attempts"] == 0 and job["created_at"].endswith("Z")
    assert store.get(str(uuid.uuid4())) is None
    assert 0 < store.r.ttl(store.key(job_id)) <= 60


def test_create_refuses_past_max_queued_and_writes_nothing(store):
    """The limit is checked in the step that writes: a job over it leaves no record, count or message."""
    first, second, third = (str(uuid.uuid4()) for _ in range(3))
    kw = dict(model="m", priority="low", owner="o", n_inputs=1, single=True, deadline=None, max_queued=2)
    assert store.create(first, **kw, message=("q", "m1")) is None
    assert store.create(second, **kw, message=("q", "m2")) is None
    assert store.create(third, **kw, message=("q", "m3")) == 2
    assert store.get(third) is None and store.r.lrange("q", 0, -1) == ["m2", "m1"]
    assert store.queue_depths("m", PRIORITIES)["low"] == 2 and store.unfinished("m") == 2
    assert store.counters()[0] == {"m|low": "2"}
    store.claim([first], "w", 1, 5)  # one starts: a place is free again
    assert store.create(third, **kw) is None and store.get(third)["status"] == "queued"


def test_a_job_never_published_is_withdrawn_and_the_submitted_counter_never_drops(store):
    job_id = new_job(store)
    store.forget(job_id, "m", "high")  # the broker did not take its message
    submitted, finished = store.counters()
    assert submitted == {"m|high": "1"} and finished == {"m|high|withdrawn": "1"}
    assert store.get(job_id) is None and store.unfinished("m") == 0
    assert store.queue_depths("m", PRIORITIES)["high"] == 0


def test_claim_runs_once_then_skips_finished_duplicates(store):
    job_id = new_job(store)
    assert store.claim([job_id], "w1", 1, max_deliveries=3) == [("run", 1)]
    store.finish([{"id": job_id, "status": "succeeded", "result": {"x": 1}, "model": "m", "priority": "high"}])
    job = store.get(job_id)
    assert job["status"] == "succeeded" and job["result"] == {"x": 1} and job["worker"] == "w1"
    assert job["queue_ms"] is not None and job["run_ms"] is not None
    # a redelivered copy of a finished job is skipped, not run again
    assert store.claim([job_id], "w2", 1, max_deliveries=3) == [("skip", "succeeded")]
    # Celery's own result format, so AsyncResult reads it
    meta = json.loads(store.r.get(result_key(job_id)))
    assert meta["status"] == "SUCCESS" and meta["result"] == {"x": 1}
    assert store.counters()[1] == {"m|high|succeeded": "1"}


def test_cancel_only_queued_jobs(store):
    job_id = new_job(store)
    assert store.cancel(job_id) == (True, "cancelled")
    assert store.get(job_id)["error"] == {"type": "Cancelled", "message": "cancelled by the client"}
    assert store.cancel(job_id) == (False, "cancelled")
    assert store.claim([job_id], "w", 1, 3) == [("skip", "cancelled")]
    running = new_job(store)
    store.claim([running], "w", 1, 3)
    assert store.cancel(running) == (False, "running")
    assert store.cancel(str(uuid.uuid4())) == (False, None)


def test_deadline_passed_means_expired_never_run(store):
    deadline = time.time() - 1
    job_id = new_job(store, deadline=deadline)
    assert store.claim([job_id], "w", 1, 3) == [("expired", None)]
    job = store.get(job_id)
    assert job["status"] == "expired" and job["error"]["type"] == "Expired"
    assert job["finished_at"] == iso(deadline) and job["started_at"] is None


def test_a_read_expires_a_late_job_even_with_no_worker(store):
    job_id = new_job(store, deadline=time.time() + 0.2)
    assert store.get(job_id)["status"] == "queued"
    time.sleep(0.3)
    job = store.get(job_id)
    assert job["status"] == "expired" and job["error"]["type"] == "Expired"
    assert store.queue_depths("m", PRIORITIES)["high"] == 0
    assert store.claim([job_id], "w", 1, 3) == [("skip", "expired")]  # a worker never runs it
    meta = json.loads(store.r.get(result_key(job_id)))
    assert meta["status"] == "REVOKED"
    assert store.wait(new_job(store, deadline=time.time() + 0.3), 5)["status"] == "expired"


def test_waiting_counts_follow_every_transition(store):
    def waiting():
        return store.queue_depths("m", PRIORITIES)["high"]

    a, b, c = new_job(store), new_job(store), new_job(store)
    assert waiting() == 3
    store.claim([a], "w", 1, 3)                       # queued -> running
    store.cancel(b)                                    # queued -> cancelled
    assert waiting() == 1
    store.finish([{"id": a, "status": "retrying", "model": "m", "priority": "high"}])
    assert waiting() == 2                              # back to waiting for its retry
    store.claim([a, c], "w", 2, 3)
    assert waiting() == 0
    store.claim([a], "w", 1, 3)                        # a redelivery of a running job: no change
    assert waiting() == 0


def test_deliveries_are_capped(store):
    job_id = new_job(store)
    verdicts = [store.claim([job_id], "w", 1, max_deliveries=2)[0] for _ in range(3)]
    assert verdicts == [("run", 1), ("suspect", 2), ("exhausted", 3)]
    job = store.get(job_id)
    assert job["status"] == "failed" and job["error"]["type"] == "TooManyDeliveries"


def test_idempotency_key_reservation(store):
    assert store.reserve_idempotency_key("o", "k", "job-1") is None
    assert store.reserve_idempotency_key("o", "k", "job-2") == "job-1"
    assert store.reserve_idempotency_key("other-owner", "k", "job-3") is None
    # a holder that never created its job can be replaced, once, atomically
    assert store.take_over_idempotency_key("o", "k", "job-1", "job-4") is True
    assert store.take_over_idempotency_key("o", "k", "job-1", "job-5") is False
    assert store.reserve_idempotency_key("o", "k", "job-6") == "job-4"


def test_wait_returns_when_the_job_finishes(store):
    import threading

    job_id = new_job(store)
    store.claim([job_id], "w", 1, 3)
    timer = threading.Timer(0.3, lambda: store.finish([{"id": job_id, "status": "succeeded", "result": 1}]))
    timer.start()
    start = time.monotonic()
    job = store.wait(job_id, 10)
    assert job["status"] == "succeeded" and time.monotonic() - start < 3
    assert store.wait(new_job(store), 0.3)["status"] == "queued"


def test_live_workers_come_from_heartbeats_that_have_not_run_out(store):
    store.heartbeat("m", "w1", ttl_s=15, now=1000.0)
    store.heartbeat("m", "w2", ttl_s=15, now=1010.0)
    assert store.live_workers("m", now=1012.0) == ["w1", "w2"]
    assert store.live_workers("m", now=1020.0) == ["w2"]         # w1 ran out at 1015
    store.heartbeat("m", "w2", ttl_s=15, now=1020.0)              # and is pruned by the next beat
    assert store.r.hkeys("workers:m") == ["w2"]
    store.leave("m", "w2")
    assert store.live_workers("m", now=1020.0) == []


def test_start_estimate_from_jobs_ahead_and_live_workers_speed(store):
    now = time.time()
    assert store.start_estimate("m", ["high"], now=now) is None  # no worker: no basis to refuse
    for _ in range(6):
        new_job(store)  # six high jobs waiting
    store.heartbeat("m", "w1", 15, now=now)
    assert store.start_estimate("m", ["high"], now=now) is None  # live, but has not run a batch yet
    store.record_speed("m", "w1", job_s=0.5, procs=1, ttl_s=60, now=now)
    assert store.start_estimate("m", ["high"], now=now) == (3.0, 6)
    store.heartbeat("m", "w2", 15, now=now)
    store.record_speed("m", "w2", job_s=0.25, procs=2, ttl_s=60, now=now)  # 8 jobs/s
    wait_s, ahead = store.start_estimate("m", ["high"], now=now)
    assert ahead == 6 and wait_s == pytest.approx(6 / (2 + 8))
    assert store.start_estimate("m", ["normal"], now=now)[1] == 0  # other priorities are not ahead
    # a worker whose heartbeat ran out no longer counts, whatever speed it reported
    assert store.start_estimate("m", ["high"], now=now + 20) is None


def test_a_job_whose_delivery_died_comes_back_as_a_suspect_then_as_the_culprit(store):
    a, b = new_job(store), new_job(store)
    assert store.claim([a, b], "w", 2, 5) == [("run", 1), ("run", 1)]
    # the process died mid-batch: both come back, neither known guilty
    assert store.claim([a, b], "w", 2, 5) == [("suspect", 2), ("suspect", 2)]
    store.mark_alone(a)
    store.mark_alone(b)
    store.finish([{"id": b, "status": "succeeded", "result": 1, "model": "m", "priority": "high"}])
    # a's process died while a ran alone: it was a
    assert store.claim([a], "w", 1, 5) == [("culprit", 3)]
    assert store.r.hget(store.key(a), "alone") is None  # cleared until it runs alone again
    store.finish([{"id": a, "status": "retrying", "model": "m", "priority": "high"}])
    assert store.claim([a], "w", 1, 5) == [("run", 4)]  # a retry after an error is no suspect


def _message(job_id: str) -> str:
    """A broker message as kombu's Redis transport stores it (the fields that matter here)."""
    return json.dumps({"body": "e30=", "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": {"lang": "py", "task": "tasks.infer", "id": job_id, "root_id": "r"},
                       "properties": {"correlation_id": job_id, "delivery_tag": str(uuid.uuid4())}})


def test_find_lost_reports_live_jobs_whose_message_is_nowhere(store):
    queued, held, lost, running_lost, done = (new_job(store) for _ in range(5))
    store.r.lpush("q", _message(queued))
    store.r.hset("unacked", "tag", json.dumps([json.loads(_message(held)), "", "q"]))
    store.claim([running_lost], "w", 1, 5)
    store.claim([done], "w", 1, 5)
    store.finish([{"id": done, "status": "succeeded", "result": 1, "model": "m", "priority": "high"}])
    later = time.time() + 60
    assert store.find_lost("m", ["q", "q\x06\x165"], grace_s=30) == []  # all too young to judge
    found = store.find_lost("m", ["q", "q\x06\x165"], grace_s=30, now=later)
    assert {job["id"] for job in found} == {lost, running_lost}
    assert all(job["priority"] == "high" and job["n_inputs"] == 1 and job["single"] for job in found)
    assert store.r.zscore("live:m", done) is None  # finished jobs leave the index


def test_find_lost_reads_a_long_queue_a_slice_at_a_time_and_misses_nothing_pushed_meanwhile(store):
    """A backlog is read a few items per script call (Redis serves others in between); messages
    pushed at the head between calls shift the rest, which are still all seen."""
    queued = [new_job(store) for _ in range(23)]
    lost = new_job(store)
    for job_id in queued:
        store.r.lpush("q", _message(job_id))
    ranges = []
    read = store._queued_ids

    def reading(keys, args):
        ranges.append((args[0], args[1]))
        if len(ranges) == 2:  # between two slices, the API pushes more jobs at the head
            for _ in range(7):
                store.r.lpush("q", _message(str(uuid.uuid4())))
        return read(keys=keys, args=args)

    store._queued_ids = reading
    found = store.find_lost("m", ["q"], grace_s=30, now=time.time() + 60, chunk=5)
    assert [job["id"] for job in found] == [lost]
    assert all(last - first + 1 == 5 for first, last in ranges) and len(ranges) == 7  # 30 items, 5 a call


def test_inputs_live_in_the_record_until_the_job_ends(store):
    job_id = str(uuid.uuid4())
    store.create(job_id, model="m", priority="normal", owner="o", n_inputs=2, single=False, deadline=None,
                 inputs=["a", {"image_b64": "xyz"}])
    got = {}
    assert store.claim([job_id], "w", 1, 5, inputs=got) == [("run", 1)]
    assert got == {job_id: ["a", {"image_b64": "xyz"}]}
    store.finish([{"id": job_id, "status": "succeeded", "result": [1, 2], "model": "m", "priority": "normal"}])
    assert store.r.hget(store.key(job_id), "inputs") is None


def test_the_last_failures_are_kept_for_make_status(store):
    job_id = new_job(store)
    store.claim([job_id], "w", 1, 5)
    store.finish([{"id": job_id, "status": "failed", "model": "m", "priority": "high",
                   "error": {"type": "ValueError", "message": "boom"}}])
    latest = json.loads(store.r.lindex("failures:recent", 0))
    assert latest["id"] == job_id and latest["type"] == "ValueError" and latest["model"] == "m"


def test_one_finish_stores_a_mixed_batch_whole(store):
    """Every effect of storing a batch, for each kind of outcome, from the one script call."""
    ok, bad, again = (new_job(store) for _ in range(3))
    late = new_job(store, deadline=time.time() - 1)
    assert [v for v, _ in store.claim([ok, bad, again, late], "w", 4, 5)] == ["run", "run", "run", "expired"]
    for j in (ok, again):
        store.r.hset(store.key(j), "inputs", '["text"]')
    pubsub = store.r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(*(f"jobs:done:{j}" for j in (ok, bad, again, late)))
    store.finish([
        {"id": ok, "status": "succeeded", "result": {"embedding": [0.5, -1.25], "dim": 2}, "model": "m",
         "priority": "high"},
        {"id": bad, "status": "failed", "error": {"type": "InvalidInput", "message": "no inputs"}, "model": "m",
         "priority": "high"},
        {"id": again, "status": "retrying", "error": {"type": "Busy", "message": "later"}, "model": "m",
         "priority": "high"},
        {"id": late, "status": "expired", "error": {"type": "Expired", "message": "too late"}, "model": "m",
         "priority": "high", "recorded": True},
    ], now=1000.0)
    r = store.r
    job = {j: r.hgetall(store.key(j)) for j in (ok, bad, again, late)}
    assert job[ok]["status"] == "succeeded" and job[ok]["finished_at"] == "1000.0" and "inputs" not in job[ok]
    assert json.loads(job[bad]["error"]) == {"type": "InvalidInput", "message": "no inputs"}
    assert job[again]["status"] == "retrying" and "finished_at" not in job[again] and "inputs" in job[again]
    assert job[late]["status"] == "expired" and float(job[late]["finished_at"]) < time.time()  # the claim's
    meta = json.loads(r.get(result_key(ok)))
    assert meta == {"status": "SUCCESS", "task_id": ok, "traceback": None, "children": [],
                    "date_done": iso(1000.0), "result": {"embedding": [0.5, -1.25], "dim": 2}}
    assert json.loads(r.get(result_key(bad)))["result"] == {
        "exc_type": "InvalidInput", "exc_message": ["no inputs"], "exc_module": "builtins"}
    assert json.loads(r.get(result_key(late)))["status"] == "REVOKED" and r.get(result_key(again)) is None
    assert 0 < r.ttl(result_key(ok)) <= 60 and 0 < r.ttl(store.key(ok)) <= 60 and 0 < r.ttl(store.key(again)) <= 60
    assert r.zrange("live:m", 0, -1) == [again]
    assert r.hgetall("stats:finished") == {"m|high|succeeded": "1", "m|high|failed": "1", "m|high|expired": "1"}
    assert r.hget("waiting:m", "high") == "1"  # the retrying job waits again
    assert json.loads(r.lindex("failures:recent", 0))["id"] == bad and r.llen("failures:recent") == 1
    heard, deadline = {}, time.monotonic() + 2
    while len(heard) < 3 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message:
            heard[message["channel"].rsplit(":", 1)[1]] = message["data"]
    pubsub.close()
    assert heard == {ok: "succeeded", bad: "failed", late: "expired"}
    store.finish([])  # nothing to store: no call
