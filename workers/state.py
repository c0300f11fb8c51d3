"""Per-process worker state: the model this worker serves, loaded once per pool process.

``bind`` runs in the worker's main process at start (before the pool forks);
``runner`` loads the model on first use in each pool process, never at import
and never in ``worker_process_init`` itself (Celery kills those handlers after
4 s): that handler starts ``load_in_background``, and a batch arriving during
the load waits for it.
"""

from __future__ import annotations

import logging
import os
import threading

import settings
from models.registry import ModelSpec

log = logging.getLogger(__name__)

spec: ModelSpec | None = None
_runner = None
_load_error: Exception | None = None
_store = None
_lock = threading.Lock()


def bind(model_spec: ModelSpec) -> None:
    global spec
    spec = model_spec


def threads_for(model_spec: ModelSpec, models_served: int) -> int:
    """Torch threads for one worker process: the model's own setting, else
    TORCH_THREADS, else this host's cores shared among the models served."""
    if model_spec.threads:
        return model_spec.threads
    if settings.TORCH_THREADS:
        return settings.TORCH_THREADS
    return max(1, (os.cpu_count() or 1) // max(1, models_served))


def store():
    """This process's JobStore (one Redis connection pool per process)."""
    global _store
    if _store is None or _store_pid != os.getpid():
        _make_store()
    return _store


_store_pid = None


def _make_store():
    global _store, _store_pid
    import celeryconfig
    from tasks.store import JobStore

    _store = JobStore.from_url(celeryconfig.result_backend, settings.JOB_TTL_S)
    _store_pid = os.getpid()


def runner():
    """The loaded runner for the bound model, loaded once per process."""
    global _runner, _load_error
    if _load_error is not None:
        raise _load_error  # a configuration error does not heal by reloading
    if _runner is None:
        with _lock:
            if _runner is None:
                if spec is None:
                    raise RuntimeError("this worker serves no model: start it with --model NAME")
                from models import build_runner
                from models.base import set_threads

                from models import load_registry

                served = len(load_registry().names())
                threads = set_threads(threads_for(spec, served))
                keep_freed_memory()  # (pools without worker_process_init: else done already)
                from models.exceptions import ConfigError

                candidate = build_runner(spec)
                try:
                    seconds = candidate.timed_load()
                except ConfigError as exc:
                    _load_error = exc
                    raise
                log.info("model %s ready: %.2fs load, %d torch threads, device %s",
                         spec.name, seconds, threads, candidate.device)
                try:
                    import metrics

                    m = metrics.worker()
                    m.model_load.labels(spec.name, str(candidate.device)).set(seconds)
                    m.model_loads.labels(spec.name).inc()
                except Exception as exc:  # a metric never stops a model from serving
                    log.debug("model load metric not recorded: %s", exc)
                _runner = candidate
    return _runner


def keep_freed_memory() -> None:
    """``models.base.keep_freed_memory`` where ``KEEP_FREED_MEMORY`` is on. Called in the worker's main
    process before it starts its threads, and again in each pool process as it starts (for pools
    whose parent did not). A thread that allocated in the main process before the call has a malloc
    arena of its own, a fork keeps it, and the pool process's threads then allocate from it instead
    of the main arena: efficientnet-lite0's batches of 16 then faulted about 7,000 pages a job in the
    urgent lane's batch thread, in two worker starts of three, and ran 22.7 to 23.6 images/s against
    about 37 with the call in the main process as well (README, what changed after X)."""
    if settings.KEEP_FREED_MEMORY:
        from models.base import keep_freed_memory as keep

        keep()


def load_in_background() -> threading.Thread | None:
    """Start loading the bound model in a thread of this process (none bound: nothing). A load
    that fails is logged; the first batch tries again, or fails with the configuration error."""
    if spec is None:
        return None
    keep_freed_memory()  # before this process's first thread (see models.base.keep_freed_memory)

    def load() -> None:
        try:
            runner()
        except Exception as exc:
            log.warning("model %s did not load at start: %s", spec.name, exc)

    thread = threading.Thread(target=load, name="model-load", daemon=True)
    thread.start()
    return thread
