"""Our remote-control commands, beside Celery's own (``celery -A workers inspect|control ...``).

* ``celery -A workers inspect batching``: each worker's model and batching figures (batches run,
  mean batch size, items/s over the last minute, model time per batch p50/p95) and its limits;
* ``celery -A workers control set_batching MODEL MAX_BATCH_SIZE [MAX_WAIT_MS [adaptive|fixed]]``:
  change a model's batch limits (and batching mode) on its live workers (workers serving another
  model answer that they skipped it).
  The change lasts until the worker restarts; the models file stays the source of truth.
"""

from __future__ import annotations

import math
from time import monotonic

from celery.worker.control import control_command, inspect_command

TASK_NAME = "tasks.infer"


def _task(state):
    return state.consumer.app.tasks[TASK_NAME]


@inspect_command()
def batching(state):
    """This worker's model, batch limits and batching figures."""
    from workers import state as worker_state

    task = _task(state)
    spec = worker_state.spec
    return {"model": spec.name if spec else None, "batching": "adaptive" if task.adaptive else "fixed",
            "max_batch_size": task.flush_every, "max_wait_ms": round(task.flush_interval * 1000, 3),
            "prefetch": state.consumer.qos.value if state.consumer.qos else None, "urgent_lane": task.lane,
            **task.stats.summary(monotonic()), **task.policy.summary()}


@control_command(
    # Numbers arrive as text and are checked here: typed args would make the CLI itself crash with a
    # traceback on "abc"; this way the worker answers with a clear error.
    args=[("model", str), ("max_batch_size", str), ("max_wait_ms", str), ("mode", str)],
    signature="<model> <max_batch_size> [max_wait_ms [adaptive|fixed]]",
)
def set_batching(state, model, max_batch_size, max_wait_ms=None, mode=None):
    """Change the batch limits of ``model`` on this worker, if it serves that model."""
    from workers import state as worker_state

    spec = worker_state.spec
    if spec is None or spec.name != model:
        return {"ok": f"skipped: this worker serves {spec.name if spec else None!r}"}
    task = _task(state)
    try:
        size = int(max_batch_size)
        wait_ms = task.flush_interval * 1000 if max_wait_ms is None else float(max_wait_ms)
    except (TypeError, ValueError):
        return {"error": f"max_batch_size must be an integer and max_wait_ms a number of milliseconds, "
                         f"got {max_batch_size!r} and {max_wait_ms!r}"}
    if mode not in (None, "adaptive", "fixed"):
        return {"error": f"mode must be adaptive or fixed, got {mode!r}"}
    try:
        task.configure(size, wait_ms, adaptive=None if mode is None else mode == "adaptive")
    except ValueError as exc:
        return {"error": str(exc)}
    # As the worker sizes it at start (workers.app.ModelBinding): room to buffer two batches per
    # process for batches, and with a lane one process's share more, kept for high-priority jobs.
    processes = task._processes()
    per_process = math.ceil(2 * task.flush_every / max(1, processes - (1 if task.lane else 0)))
    if task.lane:
        from workers import transport

        transport.reserve(per_process)
    qos = state.consumer.qos
    if qos is not None and qos.value < per_process * processes:
        qos.set(per_process * processes)
    return {"ok": f"{model}: max_batch_size={task.flush_every} max_wait_ms={round(task.flush_interval * 1000, 3)} "
                  f"batching={'adaptive' if task.adaptive else 'fixed'}"}
