"""ModelBatches' bookkeeping of the batches it handed to the pool, with a stand-in pool."""

from time import monotonic
from types import SimpleNamespace

from workers.consumer import ModelBatches


class FakeResult:
    _n = 0

    def __init__(self, cache):
        FakeResult._n += 1
        self._job, self._ready, self._accepted = FakeResult._n, False, False
        cache[self._job] = self

    def ready(self):
        return self._ready


class FakePool:
    num_processes = 1

    def __init__(self):
        self._pool = SimpleNamespace(_cache={})
        self.calls, self.batches = [], []

    def apply_async(self, fn, args, callback, error_callback):
        self.calls.append((callback, error_callback))
        self.batches.append([r.id for r in args[1][0]])
        return FakeResult(self._pool._cache)


class FakeRequest:
    def __init__(self, rid):
        self.id, self.rejected, self.acked = rid, False, False
        self.delivery_info = {}  # (as a Celery request has)

    def reject(self, requeue):
        self.rejected = requeue

    def acknowledge(self):
        self.acked = True


def _task(monkeypatch):
    monkeypatch.setattr("workers.consumer.SimpleRequest.from_request", staticmethod(lambda r: r))
    task = ModelBatches.__new__(ModelBatches)
    ModelBatches.__init__(task)
    task._pool = FakePool()
    return task


def test_a_batch_the_pool_dropped_without_a_callback_frees_the_worker_and_is_requeued(monkeypatch):
    task = _task(monkeypatch)
    requests = [FakeRequest("a"), FakeRequest("b")]
    result = task.flush(requests)
    assert task._busy()
    task._pool._pool._cache.pop(result._job)  # what AsynPool.flush() does on connection loss
    assert not task._busy()
    assert all(r.rejected for r in requests)


def test_a_finished_batch_frees_the_worker_and_acks_what_it_finished(monkeypatch):
    task = _task(monkeypatch)
    requests = [FakeRequest("a"), FakeRequest("b")]
    result = task.flush(requests)
    callback, _ = task._pool.calls[-1]
    result._ready = True
    task._pool._pool._cache.pop(result._job)
    callback(["a"])
    assert not task._busy()
    assert requests[0].acked and requests[1].rejected  # not finished: back on the queue
    assert not task._running


def test_a_batch_no_pool_process_accepts_is_taken_back_and_requeued(monkeypatch):
    from time import monotonic

    task = _task(monkeypatch)
    requests = [FakeRequest("a"), FakeRequest("b")]
    result = task.flush(requests)
    later = monotonic() + ModelBatches.NOT_ACCEPTED_AFTER_S + 1
    task._forget_dropped(now=monotonic() + 1)
    assert task._running and not any(r.rejected for r in requests)  # still in time
    task._forget_dropped(now=later)
    assert not task._running and all(r.rejected for r in requests)
    assert result._job not in task._pool._pool._cache  # its callbacks can no longer fire
    other = task.flush([FakeRequest("c")])
    other._accepted = True  # a process took it: a long batch is never taken back
    task._forget_dropped(now=monotonic() + 10 * ModelBatches.NOT_ACCEPTED_AFTER_S)
    assert task._busy()


class FakeTimer:
    def __init__(self):
        self.entries = []
        self.after = []

    def call_after(self, secs, fn, args=()):
        self.after.append((secs, fn))

    def call_repeatedly(self, interval, fn, args=()):
        entry = SimpleNamespace(fn=fn, interval=interval, cancelled=False)
        entry.cancel = lambda: setattr(entry, "cancelled", True)
        self.entries.append(entry)
        return entry


def test_a_consumer_restart_restarts_the_flush_timer(monkeypatch):
    """Celery clears the event loop's timers when the broker connection is lost, then calls
    Strategy again: the buffered requests must still be flushed on time."""
    from workers.app import app

    task = _task(monkeypatch)
    consumer = SimpleNamespace(pool=task._pool, hostname="w@h", connection_errors=(), event_dispatcher=None,
                               timer=FakeTimer())
    task.Strategy(task, app, consumer)
    task._tref = consumer.timer.call_repeatedly(task.flush_interval, task._do_flush)  # running, with work buffered
    task._buffer.put(FakeRequest("waiting"))
    consumer.timer = FakeTimer()  # the old loop's timers are gone
    task.Strategy(task, app, consumer)
    assert len(consumer.timer.entries) == 1 and task._tref is consumer.timer.entries[0]


def _ticking(task):
    """The flush timer as celery-batches starts it on an arrival: every ``flush_interval``."""
    task._tref = task._timer.call_repeatedly(task.flush_interval, task._do_flush)
    return task._tref


def test_while_no_batch_can_start_the_flush_timer_ticks_slowly_and_a_returning_batch_restores_it(monkeypatch):
    """Each tick wakes the main process on the model's core, ahead of the batch: while the pool is
    full they can start nothing, so they come every BUSY_TICK_S (still looking for dropped batches)."""
    task = _task(monkeypatch)
    task._timer = FakeTimer()
    task.configure(max_batch_size=1, max_wait_ms=10)  # one job per batch: the others stay buffered
    _arrive(task, "a", 9)
    assert task._pool.batches == [["a"]]
    fast = _ticking(task)
    _arrive(task, "b", 9)
    _arrive(task, "c", 9)
    fast.fn()  # a tick while "a" runs
    assert fast.cancelled and task._tref.interval == ModelBatches.BUSY_TICK_S and not task._tref.cancelled
    slow = task._tref
    slow.fn()
    assert task._tref is slow and len(task._timer.entries) == 2  # no new timer per tick
    _finish(task, 0, ["a"], 1)
    assert task._pool.batches[1] == ["b"]  # the return flushes at once ...
    assert slow.cancelled and task._tref.interval == task.flush_interval  # ... and ticks fast again ("c" waits)
    _finish(task, 1, ["b"], 1)
    _finish(task, 2, ["c"], 1)
    assert task._pool.batches[2] == ["c"] and task._tref is None and task._buffer.empty()
    # a batch the pool drops is still noticed by a slow tick
    d = _arrive(task, "d", 9)
    _arrive(task, "e", 9)
    _ticking(task).fn()
    assert task._tref.interval == ModelBatches.BUSY_TICK_S
    dropped = next(r for r in task._running)
    task._pool._pool._cache.pop(dropped._job)  # the pool dropped "d" (broker connection lost)
    task._tref.fn()
    assert d.rejected and task._pool.batches[-1] == ["e"]  # requeued, and the process free for "e"


def test_with_a_lane_the_flush_timer_ticks_slowly_while_only_the_lane_is_free(monkeypatch):
    task = _task(monkeypatch)
    task._pool.num_processes, task.lane = 2, True
    task._timer = FakeTimer()
    _arrive(task, "low1", 9)
    fast = _ticking(task)
    _arrive(task, "low2", 9)
    fast.fn()
    assert task._tref.interval == ModelBatches.BUSY_TICK_S and len(task._pool.batches) == 1
    _arrive(task, "high1", 0)
    assert task._pool.batches[1] == ["high1"]  # an arrival does not wait for a tick
    _finish(task, 0, ["low1"], 1)
    assert task._pool.batches[2] == ["low2"]


def test_adaptive_batching_runs_an_arrival_at_once_when_the_pool_is_free_and_fixed_batching_waits(monkeypatch):
    task = _task(monkeypatch)
    monkeypatch.setattr(task, "_ready", lambda r: True, raising=False)
    task._tref = None
    first = FakeRequest("first")
    first.eta, first.acknowledged, first.kwargs, first.delivery_info = None, False, {}, {"priority": 5}
    task._buffer.put(first)
    task._on_arrival()
    assert len(task._pool.calls) == 1 and task._buffer.empty()  # idle: no wait
    second = FakeRequest("second")
    second.eta, second.acknowledged, second.kwargs, second.delivery_info = None, False, {}, {"priority": 5}
    task._buffer.put(second)
    task._on_arrival()
    assert len(task._pool.calls) == 1 and not task._buffer.empty()  # busy: the returning batch flushes it
    task._pool.calls[0][0]({"ids": ["first"], "jobs": 1, "inputs": 1, "run_ms": 9.0, "pool_ms": 10.0})
    assert first.acked and len(task._pool.calls) == 2 and task._buffer.empty()
    assert task.policy.samples[1] == 1 and abs(task.policy.cost[1] - (0.010 + task.policy.GAP_S)) < 1e-9

    fixed = _task(monkeypatch)
    fixed.configure(8, 10, adaptive=False)
    fixed._buffer.put(FakeRequest("waits"))
    fixed._on_arrival()
    assert fixed._pool.calls == [] and not fixed._buffer.empty()  # left to the max-wait timer


def test_a_batch_handed_over_as_another_returns_is_costed_by_its_whole_cycle(monkeypatch):
    """The cycle of a backlog batch runs from the return before it to its own (what the pool's
    time misses: acks, hand-off, the result's way back); a batch started on an idle pool has none."""
    clock = [100.0]
    monkeypatch.setattr("workers.consumer.monotonic", lambda: clock[0])
    task = _task(monkeypatch)
    recorded = []
    monkeypatch.setattr(task.policy, "record", lambda inputs, pool_s, cycle=None: recorded.append(
        (inputs, pool_s, cycle)))
    first = _arrive(task, "first", 5)  # the pool is free: it runs at once, no cycle to time
    second = _arrive(task, "second", 5)  # the pool is busy: buffered
    assert task._pool.batches == [["first"]]
    clock[0] = 100.050
    _finish(task, 0, ["first"], 1, pool_ms=40.0)  # ... and second is handed over as it returns
    assert task._pool.batches == [["first"], ["second"]] and first.acked
    assert recorded == [(1, 0.040, None)] and task._freed_at is None
    clock[0] = 100.120
    _finish(task, 1, ["second"], 1, pool_ms=40.0)
    assert second.acked and recorded[1][:2] == (1, 0.040) and abs(recorded[1][2] - 0.070) < 1e-9
    clock[0] = 101.0
    _arrive(task, "third", 5)  # the pool was idle: no cycle
    _finish(task, 2, ["third"], 1, pool_ms=40.0)
    assert recorded[2] == (1, 0.040, None)


def test_while_high_priority_jobs_are_about_a_returning_batch_waits_for_the_next_fetch(monkeypatch):
    task = _task(monkeypatch)
    task._timer = FakeTimer()
    first, second = FakeRequest("a"), FakeRequest("b")
    for r in (first, second):
        r.eta, r.acknowledged, r.kwargs, r.delivery_info = None, False, {}, {"priority": 9}
    task.flush([first])
    task._buffer.put(second)
    task.policy.arrived(monotonic(), priority=0)  # a high job came in
    task._pool.calls[0][0]({"ids": ["a"], "jobs": 1, "inputs": 1, "run_ms": 9.0, "pool_ms": 10.0})
    assert len(task._pool.calls) == 1 and not task._buffer.empty()  # not at once...
    assert any(e[0] == task.URGENT_FETCH_S for e in task._timer.after)  # ... but URGENT_FETCH_S later


def test_the_messages_of_one_bulk_fetch_are_planned_as_one_batch(monkeypatch):
    """workers.transport delivers a bulk fetch one message after the other: with the pool free, the
    first arrival must not run alone while the rest of the fetch is still being delivered."""
    from workers import transport

    task = _task(monkeypatch)
    for size in task.policy.sizes:  # learnt: bigger batches are cheaper per input
        for _ in range(task.policy.MIN_SAMPLES):
            task.policy.record(size, 0.010)
    requests = [FakeRequest(f"r{i}") for i in range(5)]
    for r in requests:
        r.eta, r.acknowledged, r.kwargs, r.delivery_info = None, False, {}, {"priority": 5}
    monkeypatch.setattr(transport, "_bursting", True)
    for r in requests:
        task._buffer.put(r)
        task._on_arrival()
    assert task._pool.calls == [] and task._buffer.qsize() == 5  # nothing planned mid-fetch
    monkeypatch.setattr(transport, "_bursting", False)
    task._after_burst()  # what the transport calls after the fetch's last message
    assert len(task._pool.calls) == 1 and task._buffer.empty()  # one batch of all five
    assert task.policy.arrival_rate(monotonic()) == 0.0  # one arrival of five, not five 0-gaps


def _arrive(task, rid, priority):
    request = FakeRequest(rid)
    request.eta, request.acknowledged, request.kwargs, request.delivery_info = None, False, {}, {"priority": priority}
    task._buffer.put(request)
    task._on_arrival()
    return request


def _finish(task, call, ids, inputs, pool_ms=10.0):
    task._pool.calls[call][0]({"ids": ids, "jobs": len(ids), "inputs": inputs, "run_ms": pool_ms, "pool_ms": pool_ms})


def test_with_a_lane_high_jobs_go_alone_to_the_spare_process_while_a_batch_of_others_runs(monkeypatch):
    task = _task(monkeypatch)
    task._pool.num_processes, task.lane = 2, True
    task._timer = FakeTimer()
    for size in task.policy.sizes:  # learnt: bigger batches are cheaper per input
        for _ in range(task.policy.MIN_SAMPLES):
            task.policy.record(size, 0.010)
    _arrive(task, "low1", 9)
    assert task._pool.batches == [["low1"]]  # idle: at once
    _arrive(task, "low2", 9)
    _arrive(task, "low3", 9)
    assert len(task._pool.batches) == 1  # the other process is kept for high jobs
    _arrive(task, "high1", 0)
    assert task._pool.batches[1] == ["high1"]  # at once, beside the running batch, without the low ones
    _arrive(task, "high2", 0)
    assert len(task._pool.batches) == 2  # both processes busy
    learnt = task.policy.samples[1]
    _finish(task, 1, ["high1"], 1)
    assert task._pool.batches[2] == ["high2"]  # the lane's next: the high one, low ones still wait
    assert task.policy.samples[1] == learnt + 1
    _finish(task, 0, ["low1"], 1, pool_ms=40.0)
    assert task._pool.batches[3] == ["low2", "low3"]
    # the batch high1 ran beside was slowed by it: not learnt as the cost of its size
    assert task.policy.samples[1] == learnt + 1 and task.policy.cost[1] < 0.010 + task.policy.GAP_S + 0.001


def test_with_a_lane_one_high_batch_runs_at_a_time_and_those_that_wait_go_together(monkeypatch):
    task = _task(monkeypatch)
    task._pool.num_processes, task.lane = 2, True
    task._timer = FakeTimer()
    for size in task.policy.sizes:
        for _ in range(task.policy.MIN_SAMPLES):
            task.policy.record(size, 0.010)
    _arrive(task, "low1", 9)
    _arrive(task, "high1", 0)
    assert task._pool.batches == [["low1"], ["high1"]]
    _finish(task, 0, ["low1"], 1)  # a process is free, but high1 still runs in the other
    _arrive(task, "high2", 0)
    _arrive(task, "high3", 0)
    # not beside high1 (both at normal CPU priority, each would take twice as long)
    assert len(task._pool.batches) == 2
    _arrive(task, "low2", 9)
    assert len(task._pool.batches) == 2  # nor does a low job start before the high ones waiting
    _finish(task, 1, ["high1"], 1)
    # the high jobs that waited, as one batch; then the others, at the lowest CPU priority
    assert task._pool.batches[2:] == [["high2", "high3"], ["low2"]]


def test_without_a_lane_a_high_job_waits_for_the_running_batch(monkeypatch):
    task = _task(monkeypatch)
    task._pool.num_processes = 2
    task._timer = FakeTimer()
    for rid in ("low1", "low2"):
        _arrive(task, rid, 9)
    _arrive(task, "high1", 0)
    assert task._pool.batches == [["low1"], ["low2"]]  # two processes, two batches of others
    assert not task._buffer.empty()
