"""POST /jobs, GET /jobs/<id>, DELETE /jobs/<id>."""

from __future__ import annotations

import logging
import math
import time
import uuid

from flask import Blueprint, current_app, g, jsonify, request

from api.errors import BadRequest, Conflict, NotFound, TooManyRequests, Unavailable
from api.validation import check_items, parse_submission
from celeryconfig import PRIORITIES
from tasks.messages import task_message

bp = Blueprint("jobs", __name__)
log = logging.getLogger(__name__)
TASK_NAME = "tasks.infer"


def _store():
    return current_app.extensions["jobstore"]


def _job_or_404(job_id: str) -> str:
    """The canonical id of a job this caller may see, else 404."""
    try:
        canonical = str(uuid.UUID(job_id))
    except ValueError:
        raise NotFound(f"no job {job_id[:100]!r}") from None
    owner = _store().owner(canonical)
    if owner is None or owner != g.owner:
        raise NotFound(f"no job {canonical!r}")
    return canonical


def _accepted(job: dict, status_code: int = 202):
    body = {"id": job["id"], "status": job["status"], "model": job["model"],
            "priority": job["priority"], "url": f"/jobs/{job['id']}"}
    response = jsonify(body)
    response.status_code = status_code
    response.headers["Location"] = body["url"]
    return response


@bp.post("/jobs")
def submit():
    """Validate, record, publish; 202 only once the broker holds the message."""
    cfg = current_app.config
    sub = parse_submission(request)
    spec = current_app.extensions["registry"].get(sub.model)  # UnknownModel -> 404
    check_items(spec, sub.items, max_inputs=cfg["MAX_INPUTS"], max_text_chars=cfg["MAX_TEXT_CHARS"],
                max_pixels=cfg["MAX_IMAGE_PIXELS"])
    store = _store()
    job_id = str(uuid.uuid4())
    idem_key = request.headers.get("Idempotency-Key")
    if idem_key is not None:
        if not 1 <= len(idem_key) <= 200:
            raise BadRequest("Idempotency-Key must be 1 to 200 characters")
        existing = store.reserve_idempotency_key(g.owner, idem_key, job_id)
        if existing:  # a replay: the job it made, whatever the queue looks like now
            job = _wait_for_record(existing)
            if job is not None:
                return _accepted(job)
            # The request holding the key never created its job (its process died): take the key over.
            if not store.take_over_idempotency_key(g.owner, idem_key, existing, job_id):
                raise Conflict("another request with this Idempotency-Key is being handled; retry it",
                               headers={"Retry-After": "1"})
    created = False
    try:
        if sub.timeout_s:
            _refuse_if_too_late(store, spec.name, sub.priority, sub.timeout_s)
        now = time.time()
        celery = current_app.extensions["celery"]
        # The message only points at the job: its inputs are in the record.
        kwargs = {"model": spec.name, "n_inputs": len(sub.items), "single": sub.single}
        message = None
        if current_app.extensions["direct_publish"]:  # pushed with the record, in one transaction
            message = task_message(celery, TASK_NAME, job_id, spec.queue, PRIORITIES[sub.priority], kwargs)
        depth = store.create(job_id, model=spec.name, priority=sub.priority, owner=g.owner, n_inputs=len(sub.items),
                             single=sub.single, deadline=now + sub.timeout_s if sub.timeout_s else None, now=now,
                             inputs=sub.items, message=message, max_queued=cfg["MAX_QUEUED"])
        if depth is not None:  # nothing was written
            raise TooManyRequests(f"model {spec.name!r} has {depth} jobs queued (limit {cfg['MAX_QUEUED']})",
                                  headers={"Retry-After": "5"})
        created = True
        if message is None:
            try:
                celery.send_task(
                    TASK_NAME, task_id=job_id, queue=spec.queue, priority=PRIORITIES[sub.priority], kwargs=kwargs,
                    # The worker stores results itself; without this, Celery's Redis backend subscribes
                    # this process to the job's result channel on every send (a round trip, and ~0.2 ms).
                    ignore_result=True)
            except Exception as exc:  # whatever kombu raises while the broker reconnects: not published
                raise Unavailable("the broker did not take the job; retry (with the same Idempotency-Key)",
                                  headers={"Retry-After": "1"}) from exc
    except Exception:
        _undo(store, job_id, spec.name, sub.priority, idem_key, created)
        raise
    log.info("job %s submitted", job_id, extra={
        "event": "job.submitted", "job_id": job_id, "model": spec.name, "priority": sub.priority,
        "n_inputs": len(sub.items), "timeout_s": sub.timeout_s, "owner": g.owner or None})
    return _accepted({"id": job_id, "status": "queued", "model": spec.name, "priority": sub.priority})


def _refuse_if_too_late(store, model: str, priority: str, timeout_s: float) -> None:
    """429 now rather than a job queued only to expire: the jobs that start before this one
    (same or higher priority), at the live workers' recent speed, take longer than its deadline."""
    rank = PRIORITIES[priority]
    estimate = store.start_estimate(model, [name for name, value in PRIORITIES.items() if value <= rank])
    if estimate is None:
        return  # no live worker has a recent speed: no basis to refuse
    wait_s, ahead = estimate
    if wait_s > timeout_s:
        raise TooManyRequests(
            f"model {model!r} cannot start this job within timeout_s={timeout_s:g}: {ahead} jobs are ahead "
            f"of it, about {wait_s:.1f}s of work for the live workers", type="deadline_unmeetable",
            headers={"Retry-After": str(max(1, math.ceil(wait_s - timeout_s)))})


def _undo(store, job_id: str, model: str, priority: str, idem_key: str | None, created: bool) -> None:
    """Nothing was issued: drop the record (if written) and free the idempotency key."""
    try:
        if created:
            store.forget(job_id, model, priority)
        if idem_key is not None:
            store.release_idempotency_key(g.owner, idem_key)
    except Exception:  # Redis itself is down: nothing was issued either way
        pass


def _wait_for_record(job_id: str, timeout_s: float = 2.0) -> dict | None:
    """A concurrent twin holds the key; its record appears once it has published."""
    end = time.monotonic() + timeout_s
    while True:
        job = _store().get(job_id)
        if job is not None or time.monotonic() > end:
            return job
        time.sleep(0.02)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    job_id = _job_or_404(job_id)
    raw_wait = request.args.get("wait")
    wait = 0.0
    if raw_wait is not None:
        try:
            wait = float(raw_wait)
        except ValueError:
            raise BadRequest("wait must be a number of seconds") from None
        if not 0 <= wait <= current_app.config["MAX_WAIT_S"]:
            raise BadRequest(f"wait must be between 0 and {current_app.config['MAX_WAIT_S']} seconds")
    job = _store().wait(job_id, wait)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return jsonify(job)


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str):
    job_id = _job_or_404(job_id)
    cancelled, status = _store().cancel(job_id)
    if status is None:
        raise NotFound(f"no job {job_id!r}")
    if not cancelled:
        raise Conflict(f"job {job_id} is {status}; only queued jobs can be cancelled")
    return jsonify(_store().get(job_id))

