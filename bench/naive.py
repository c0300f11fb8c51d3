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
    if model not in _runners:
        from models import build_runner, runner_class
        from models.base import set_threads
        from models.registry import Registry

        spec = Registry.from_file(os.environ.get("MODELS_FILE", str(ROOT / "models.toml"))).get(model)
        runner_class(spec).preload()
        set_threads(int(os.environ.get("TORCH_THREADS", "1")))
        runner = build_runner(spec, device="cpu")
        runner.timed_load()
        _runners[model] = runner
    return _runners[model]


@app.task(name="naive.infer")
def infer(model: str, item):
    return _runner(model)([item])[0]
