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


def load_in_background() -> threading.Thread | None:
    """Start loading the bound model in a thread of this process (none bound: nothing). A load
    that fails is logged; the first batch tries again, or fails with the configuration error."""
    if spec is None:
        return None

    def load() -> None:
        try:
            runner()
        except Exception as exc:
            log.warning("model %s did not load at start: %s", spec.name, exc)

    thread = threading.Thread(target=load, name="model-load", daemon=True)
    thread.start()
    return thread
