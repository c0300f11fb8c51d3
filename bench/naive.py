"""The competitor: what most teams write first. One Celery task per job, Celery's defaults, the
model loaded once per worker process, the result in the Redis backend.

    celery -A bench.naive worker -Q naive -c 1     (bench/bench.py starts it, pinned like ours)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("naive", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                task_default_queue="naive", worker_hijack_root_logger=False)
_runners: dict = {}


def _runner(model: str):
    if model not in _runners:  # once per worker process, as a naive task would cache it
        from bench.models import load_runner

        _spec, _runners[model], _load_s = load_runner(os.environ.get("MODELS_FILE", str(ROOT / "models.toml")),
                                                      model, int(os.environ.get("TORCH_THREADS", "1")))
    return _runners[model]


@app.task(name="naive.infer")
def infer(model: str, item):
    return _runner(model)([item])[0]
