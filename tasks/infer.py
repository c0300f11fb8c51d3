"""``tasks.infer``: one batch of jobs for the model this worker serves.

Runs in a pool process. Per batch: claim every job atomically (skipping
cancelled, expired, already-finished and over-delivered ones), run the rest
through ``workers.batching.execute``, retry transient failures with backoff
and jitter, store every result in one Redis round trip, send per-job events,
and return the ids that may be acked. A job is never acked before its
result is stored.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from typing import Any

import orjson
from celery.utils.saferepr import saferepr

import metrics
import settings
from celeryconfig import PRIORITIES
from models.exceptions import ConfigError
from tasks.store import EXPIRED
from workers import lane, state
from workers.app import app
from workers.batching import Job, Outcome, error_dict, execute
from workers.consumer import ModelBatches, is_urgent

PRIORITY_NAMES = {value: name for name, value in PRIORITIES.items()}

log = logging.getLogger(__name__)
TASK_NAME = "tasks.infer"


def backoff_s(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2 ** max(0, attempt - 1)))


_dispatcher = None


def _events(hostname: str):
    """This process's event dispatcher (Flower reads per-job events from it). Task events are
    buffered and sent as one ``task.multi`` message per flush: two publishes a batch, not two a job."""
    global _dispatcher
    if _dispatcher is None:
        _dispatcher = app.events.Dispatcher(app.connection_for_write(), hostname=hostname,
                                            enabled=app.conf.worker_send_task_events,
                                            buffer_group=["task"], buffer_limit=100_000)
    return _dispatcher


def _send(hostname: str, kind: str, **fields: Any) -> None:
    try:
        _events(hostname).send(kind, **fields)
    except Exception as exc:  # events are best effort; results are not
        log.debug("event %s not buffered: %s", kind, exc)


def _send_received(hostname: str, request) -> None:
    """``task-received``, sent with the batch's ``task-started`` events (one message) rather than by
    the main process as it fetches: per job there, it cost a publish on the model's core."""
    _send(hostname, "task-received", uuid=request.id, name=request.name, args="()",
          kwargs=_kwargs_text(request.kwargs or {}), retries=0, eta=None, expires=None)


def _kwargs_text(kwargs: dict[str, Any], limit: int = 1024) -> str:
    """A job's kwargs as Celery's events show them (a repr, cut at ``limit``). Our messages carry a
    few short fields (the inputs are in the job's record), for which the built-in ``repr`` takes
    0.45 µs against 13 for Celery's ``saferepr``, per job, on the model's core. (An older message
    carried the inputs too: their repr is cut like a long result's.)

    >>> _kwargs_text({"model": "minilm", "n_inputs": 1, "single": True})
    "{'model': 'minilm', 'n_inputs': 1, 'single': True}"
    >>> len(_kwargs_text({"inputs": ["x" * 5000]}))
    1027
    """
    text = repr(kwargs)
    return text if len(text) <= limit else text[:limit] + "..."


def _flush_events(hostname: str) -> None:
    try:
        _events(hostname).flush(errors=False, groups=True)
    except Exception as exc:
        log.debug("events not sent: %s", exc)


@app.task(base=ModelBatches, name=TASK_NAME, bind=True)
def infer(self, requests) -> dict[str, Any]:
    """Run a batch (see :func:`run_batch`). With an urgent lane, a batch with no ``high`` job runs
    in this process's low-priority thread (``workers.lane``), so a ``high`` batch in another
    process takes the cores first."""
    if self.lane and not any(map(is_urgent, requests)):  # (lane: set before the pool forked)
        return lane.in_background(run_batch, self, requests)
    return run_batch(self, requests)


def run_batch(self, requests) -> dict[str, Any]:
    """Run a batch; return the ids of the requests that are finished (to be acked), with the
    batch's figures: jobs and inputs run, and the time spent in the model.

    Jobs whose earlier delivery died with its process (``suspect``/``culprit`` from the claim)
    run after the rest, one at a time, each stored before the next starts: a job that crashes
    its process takes no batch-mate down with it again, and the known culprits go last.
    """
    spec = state.spec
    store = state.store()
    hostname = requests[0].hostname if requests else "worker"
    started = time.time()
    batch_id = uuid.uuid4().hex[:12]  # ties a batch's log lines together
    stored_inputs: dict[str, list] = {}
    load_s = 0.0  # spent loading the model (a first batch): not a cost of the batch's size
    created: dict[str, float] = {}
    verdicts = store.claim([r.id for r in requests], hostname, len(requests), settings.MAX_DELIVERIES,
                           now=started, inputs=stored_inputs, created=created)
    fresh, suspects, culprits, attempts, settled, acked = [], [], [], {}, [], []
    revoked_events = False
    for request, (verdict, detail) in zip(requests, verdicts):
        kwargs = request.kwargs or {}
        if verdict == "skip":
            acked.append(request.id)  # already cancelled/expired/finished: drop the duplicate
            if detail in ("cancelled", "expired"):  # Flower knows it from the API's record: show how it ended
                _send_received(hostname, request)
                _send(hostname, "task-revoked", uuid=request.id, terminated=False, signum=None,
                      expired=detail == "expired")
                revoked_events = True
        elif verdict == "missing":  # its record outlived JOB_TTL_S: nobody can read a result any more
            log.warning("job %s has no record (older than JOB_TTL_S?); dropping its message", request.id)
            acked.append(request.id)
        elif verdict == "expired":  # the claim already moved the record
            settled.append({"id": request.id, "status": "expired", "error": EXPIRED, "recorded": True})
        elif verdict == "exhausted":
            settled.append({"id": request.id, "status": "failed", "recorded": True, "error": {
                "type": "TooManyDeliveries", "message": f"delivered {detail} times without finishing"}})
        elif spec is None or kwargs.get("model") != spec.name:
            settled.append({"id": request.id, "status": "failed", "error": {
                "type": "WrongModel",
                "message": f"job for {kwargs.get('model')!r} reached a worker serving "
                           f"{spec.name if spec else None!r}"}})
        else:
            attempts[request.id] = int(detail or 1)
            items = stored_inputs.get(request.id, kwargs.get("inputs"))  # (older messages carried them)
            job = Job(request.id, list(items or []), bool(kwargs.get("single", True)))
            {"suspect": suspects, "culprit": culprits}.get(verdict, fresh).append(job)
            _send_received(hostname, request)
            _send(hostname, "task-started", uuid=request.id)
            if request.id in created:
                _metric(lambda: metrics.worker().queue_wait.labels(spec.name, _priority(request)).observe(
                    max(0.0, started - created[request.id])))

    n_run = len(fresh) + len(suspects) + len(culprits)
    if n_run or revoked_events:
        _flush_events(hostname)  # task-started (and -revoked) for the whole batch, in one message
    _inject_faults(n_run)
    by_id = {r.id: r for r in requests}
    done = list(acked)
    run_s = 0.0
    groups = [fresh] + [[job] for job in suspects + culprits]
    for i, group in enumerate(groups):
        if i and group:
            log.warning("job %s was in a batch whose process died; running it alone (delivery %d)",
                        group[0].id, attempts[group[0].id])
            store.mark_alone(group[0].id)
        group_started = time.time()
        outcomes, model_s, loaded_s = _run(group)
        run_s += model_s
        load_s += loaded_s
        items = settled + _items(outcomes, attempts)
        settled = []
        done += _settle(self, store, hostname, items, by_id, attempts, time.time() - group_started, batch_id,
                        created)
    if n_run:
        _record_speed(store, spec.name, hostname, (time.time() - started) / n_run)
    log.info("batch of %d (%d run, %d alone) in %.1f ms", len(requests), n_run,
             len(suspects) + len(culprits), (time.time() - started) * 1000, extra={
                 "event": "batch.done", "batch_id": batch_id, "model": spec.name if spec else None,
                 "worker": hostname, "jobs": len(requests), "run": n_run, "alone": len(suspects) + len(culprits),
                 "model_ms": round(run_s * 1000, 2), "total_ms": round((time.time() - started) * 1000, 2)})
    # What the worker's main process acks, and its batching figures (celery inspect batching).
    return {"ids": done, "jobs": n_run, "inputs": sum(len(job.items) for group in groups for job in group),
            "run_ms": round(run_s * 1000, 3), "pool_ms": round((time.time() - started - load_s) * 1000, 3)}


def _items(outcomes: list[Outcome], attempts: dict[str, int]) -> list[dict[str, Any]]:
    items = []
    for outcome in outcomes:
        item = {"id": outcome.job_id, "status": outcome.status, "result": outcome.result, "error": outcome.error}
        if outcome.status == "retry":
            item["status"] = "retrying" if attempts[outcome.job_id] <= settings.MAX_RETRIES else "failed"
        items.append(item)
    return items


def _settle(task, store, hostname: str, items: list[dict[str, Any]], by_id, attempts, runtime: float,
            batch_id: str = "", created: dict[str, float] | None = None) -> list[str]:
    """Store what happened to ``items`` (one round trip, two with retries), send their events;
    returns their ids (safe to ack now). Raises if Redis is gone: then nothing is acked."""
    if not items:
        return []
    for item in items:
        request = by_id[item["id"]]
        item["model"] = (request.kwargs or {}).get("model")
        item["priority"] = _priority(request)
    retries = [item for item in items if item["status"] == "retrying"]
    final = [item for item in items if item["status"] != "retrying"]
    if retries:
        # Recorded before the new message exists, so no other worker can start it first.
        store.finish(retries)
        for item in retries:
            _republish(task, by_id[item["id"]], attempts[item["id"]])
    if final:
        store.finish(final)
    _metric(lambda: _count(items, created or {}))
    for item in items:
        err = item.get("error") or {}
        log.info("job %s %s", item["id"], item["status"], extra={
            "event": "job.finished" if item["status"] != "retrying" else "job.retrying",
            "job_id": item["id"], "model": item.get("model"), "priority": item.get("priority"),
            "worker": hostname, "batch_id": batch_id, "status": item["status"], "attempt": attempts.get(item["id"]),
            "error_type": err.get("type"), "run_ms": round(runtime * 1000, 2)})
        if item["status"] == "succeeded":
            # As Celery's own events do, the result cut at the task's resultrepr_maxsize (1024); as JSON,
            # which orjson writes ~15x faster than saferepr writes a repr.
            _send(hostname, "task-succeeded", uuid=item["id"], runtime=runtime,
                  result=_result_text(item.get("result"), task.resultrepr_maxsize))
        elif item["status"] in ("failed", "expired"):
            err = item.get("error") or {}
            _send(hostname, "task-failed", uuid=item["id"], exception=f"{err.get('type')}: {err.get('message')}",
                  traceback="")
        elif item["status"] == "retrying":
            _send(hostname, "task-retried", uuid=item["id"], exception=str(item.get("error")), traceback="")
    _flush_events(hostname)
    return [item["id"] for item in items]


def _result_text(result: Any, limit: int) -> str:
    try:
        text = orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return saferepr(result, limit)
    return text[:limit].decode("utf-8", errors="ignore") + ("..." if len(text) > limit else "")


_job_s: float | None = None  # this process's smoothed seconds per job
SPEED_TTL_S = 3600


def _record_speed(store, model: str, hostname: str, job_s: float) -> None:
    """Publish this worker's recent seconds per job (an exponential moving average over batches):
    the API refuses a job whose deadline the queue ahead of it already rules out."""
    global _job_s
    _job_s = job_s if _job_s is None else 0.7 * _job_s + 0.3 * job_s
    try:
        store.record_speed(model, hostname, _job_s, app.conf.worker_concurrency or 1, SPEED_TTL_S)
    except Exception as exc:  # an estimate, not a result: never fails the batch
        log.debug("speed not recorded: %s", exc)


def _inject_faults(n_jobs: int) -> None:
    """FAULT_DELAY_MS and FAULT_CRASH_PROBABILITY: after the claim, before any result is stored."""
    if not n_jobs:
        return
    low, high = settings.FAULT_DELAY_MS
    if high > 0:
        time.sleep(random.uniform(low, high) / 1000)
    if settings.FAULT_CRASH_PROBABILITY and random.random() < settings.FAULT_CRASH_PROBABILITY:
        log.warning("FAULT_CRASH_PROBABILITY: this pool process exits now, mid-batch of %d", n_jobs)
        os._exit(70)


def _run(jobs: list[Job]) -> tuple[list[Outcome], float, float]:
    """The jobs' outcomes, the seconds spent in the model, and those spent loading it."""
    if not jobs:
        return [], 0.0, 0.0
    loading = time.perf_counter()
    try:
        runner = state.runner()
    except ConfigError as exc:  # the entry is wrong: every job fails now, with the entry's name
        log.error("model cannot be loaded: %s", exc)
        return [Outcome(job.id, "failed", error=error_dict(exc)) for job in jobs], 0.0, 0.0
    except Exception as exc:  # may pass (a hub that is down): retry with backoff, then fail
        log.exception("model failed to load")
        error = {"type": type(exc).__name__, "message": f"model {state.spec.name!r} failed to load: {exc}"}
        return [Outcome(job.id, "retry", error=error) for job in jobs], 0.0, 0.0
    started = time.perf_counter()
    outcomes = execute(runner, jobs, state.spec.max_batch_size)
    model_s = time.perf_counter() - started
    _metric(lambda: _observe_batch(jobs, model_s))
    return outcomes, model_s, started - loading


def _priority(request) -> str:
    return PRIORITY_NAMES.get((request.delivery_info or {}).get("priority"), "normal")


def _metric(record) -> None:
    """Record a Prometheus sample; a metric never fails a batch."""
    try:
        record()
    except Exception as exc:
        log.debug("metric not recorded: %s", exc)


def _observe_batch(jobs: list[Job], model_s: float) -> None:
    m, name = metrics.worker(), state.spec.name
    m.batch_size.labels(name).observe(len(jobs))
    m.batch_inputs.labels(name).observe(sum(len(job.items) for job in jobs))
    m.inference.labels(name).observe(model_s)


def _count(items: list[dict[str, Any]], created: dict[str, float]) -> None:
    """Each stored outcome by model, priority and status; end-to-end time for the jobs that ran."""
    m, now = metrics.worker(), time.time()
    for item in items:
        labels = (item.get("model") or "?", item.get("priority") or "normal", item["status"])
        m.jobs.labels(*labels).inc()
        if item["status"] != "retrying" and item["id"] in created:
            m.e2e.labels(*labels).observe(max(0.0, now - created[item["id"]]))


def _republish(task, request, attempt: int) -> None:
    """A new message for the same job id, after a backoff; the old one is acked once this returns."""
    priority = (request.delivery_info or {}).get("priority")
    task.app.send_task(TASK_NAME, kwargs=request.kwargs, task_id=request.id,
                       queue=state.spec.queue, countdown=backoff_s(attempt),
                       priority=PRIORITIES["normal"] if priority is None else priority,
                       ignore_result=True)  # results are stored by the batch, not by Celery
