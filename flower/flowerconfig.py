"""Flower's configuration, read with ``celery -A workers flower --conf=flower/flowerconfig.py``.

Never an open Flower: basic auth is always on (make up passes the credential
in FLOWER_BASIC_AUTH), and it listens on loopback unless FLOWER_HOST says otherwise.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import settings  # noqa: E402

address = settings.FLOWER_HOST
port = settings.FLOWER_PORT
if not settings.FLOWER_BASIC_AUTH or ":" not in settings.FLOWER_BASIC_AUTH:
    raise SystemExit("FLOWER_BASIC_AUTH must be set to user:password; Flower never runs open")
basic_auth = [settings.FLOWER_BASIC_AUTH]
persistent = True
db = os.path.join(settings.VAR_DIR, "flower.db")
state_save_interval = 60_000
max_tasks = 100_000
purge_offline_workers = 3600


# -- the Broker view (and /api/queues/length): queue depth per model *and priority* ---------------
# On Redis a priority queue is one list per priority step; Flower 2.2 adds them up into one row per
# queue, and lists only the queues some online worker consumes. Here every configured model's queue
# is listed (a model with no worker is exactly when its backlog matters) and each gets a row per
# priority after its total, e.g. "jobs.minilm", "jobs.minilm (high)", "jobs.minilm (normal)", ...
from celeryconfig import PRIORITIES  # noqa: E402
from flower.utils import broker as _broker  # noqa: E402
from flower.views import BaseHandler as _BaseHandler  # noqa: E402

_STEP_NAMES = {step: name for name, step in PRIORITIES.items()}


def _model_queues() -> set[str]:
    from models.registry import Registry

    try:
        return {spec.queue for spec in Registry.from_file(settings.MODELS_FILE, settings.MODELS or None)}
    except Exception:  # a broken models file must not take the Broker view down
        return set()


def get_active_queue_names(self):
    """The queues online workers consume, and every configured model's (Flower's own version falls
    back to Celery's unused default queue when it knows no worker yet)."""
    consumed = {queue["name"] for info in self.application.workers.values()
                for queue in info.get("active_queues", [])}
    return sorted(consumed | _model_queues())


async def queues_by_priority(self, names):
    names = list(names)
    try:
        async with self.redis.pipeline() as pipeline:
            for name in names:
                for step in self.priority_steps:
                    pipeline.llen(self.broker_prefix + self._q_for_pri(name, step))
            lengths = iter(await pipeline.execute())
        rows = []
        for name in names:
            per_step = [(step, next(lengths)) for step in self.priority_steps]
            rows.append({"name": name, "messages": sum(n for _, n in per_step)})
            rows += [{"name": f"{name} ({_STEP_NAMES.get(step, step)})", "messages": n} for step, n in per_step]
        return rows
    finally:
        await self.redis.aclose()


_BaseHandler.get_active_queue_names = get_active_queue_names
_broker.RedisBase.queues = queues_by_priority
