"""Prometheus metrics: the ones the API and the workers export, and how they are served.

Multiprocess-safe. gunicorn's worker processes and a Celery worker's prefork pool processes each write
their samples to files in one directory per server (prometheus_client's multiprocess mode). Whoever
answers a scrape adds them up: the API's ``GET /metrics`` and each worker's own endpoint
(``WORKER_METRICS_PORT``). prometheus_client picks the mode when it is first imported, so this module
imports it only inside functions. The directory is chosen first by ``gunicorn_conf.py`` (the API) and
``workers.app.ModelBinding`` (a worker's main process, before its pool starts).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from types import SimpleNamespace

DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds: from a few milliseconds (a warm small model) to the longest deadline worth charting.
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MODEL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def use_directory(path: str) -> str:
    """Multiprocess mode for this process and the ones it forks, with samples under ``path``.

    The directory is emptied: a restarted server must not add its predecessor's samples to its own.
    Call it before any of our metrics records a sample.

    prometheus_client chooses the mode once, when ``prometheus_client.values`` is imported. In a
    ``celery`` process that has already happened: the CLI loads every ``celery.commands`` entry point,
    Flower's among them, and Flower imports prometheus_client. So the choice is made again here:
    ``values.ValueClass`` (read each time a labelled metric creates a child, prometheus-client
    0.26.0) becomes the multiprocess class. Metrics that already hold values (Flower's, unused in a
    worker) keep theirs; ours create every value after this, through ``.labels()``."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ[DIR_ENV] = path
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    return path


@functools.cache
def worker() -> SimpleNamespace:
    """What a worker's pool processes record."""
    from prometheus_client import Counter, Gauge, Histogram

    return SimpleNamespace(
        jobs=Counter("worker_jobs", "Job outcomes this worker stored (retrying: will run again)",
                     ["model", "priority", "status"]),
        e2e=Histogram("job_e2e_seconds", "Submission to stored result, for jobs this worker ran",
                      ["model", "priority", "status"], buckets=TIME_BUCKETS),
        queue_wait=Histogram("job_queue_wait_seconds", "Submission to start of a run on this worker",
                             ["model", "priority"], buckets=TIME_BUCKETS),
        batch_size=Histogram("batch_size", "Jobs per batch run", ["model"], buckets=BATCH_BUCKETS),
        batch_inputs=Histogram("batch_inputs", "Inputs per batch run (a job may carry several)", ["model"],
                               buckets=BATCH_BUCKETS),
        inference=Histogram("inference_seconds", "Time running a batch through the runner (decode, forward, "
                            "postprocess), not loading it", ["model"], buckets=MODEL_BUCKETS),
        model_load=Gauge("model_load_seconds", "How long the latest model load took in a pool process",
                         ["model", "device"], multiprocess_mode="mostrecent"),
        model_loads=Counter("model_loads", "Model loads (one per pool process that ran a job)", ["model"]),
    )


@functools.cache
def api() -> SimpleNamespace:
    """What the API's processes record."""
    from prometheus_client import Counter, Histogram

    return SimpleNamespace(
        requests=Histogram("api_request_seconds", "API requests by route and status",
                           ["method", "route", "status"], buckets=TIME_BUCKETS),
        rejected=Counter("api_jobs_rejected", "POST /jobs refused, by model and error type",
                         ["model", "reason"]),
    )


class _Default:
    """The process's default registry, as one collector (single-process mode)."""

    def collect(self):
        from prometheus_client import REGISTRY

        return REGISTRY.collect()


def registry(*collectors):
    """A registry with this server's samples (every process's, in multiprocess mode) and ``collectors``."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    if os.environ.get(DIR_ENV):
        MultiProcessCollector(reg)
    else:
        reg.register(_Default())
    for collector in collectors:
        reg.register(collector)
    return reg


def exposition(*collectors) -> tuple[bytes, str]:
    """(body, content type) of a scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry(*collectors)), CONTENT_TYPE_LATEST


def serve(port: int, host: str):
    """A worker's /metrics: an HTTP server thread in its main process. Returns the server."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry())
    return server


def process_dead(pid: int) -> None:
    """A server's child exited: drop its live-gauge samples (counters and histograms stay)."""
    if os.environ.get(DIR_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
