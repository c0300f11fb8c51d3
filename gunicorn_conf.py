"""gunicorn hooks for the API (``gunicorn --config gunicorn_conf.py ... wsgi:app``).

Prometheus multiprocess mode: before any worker process starts, the master picks an empty directory
(``METRICS_DIR/api-<bind>``) that every worker process writes its samples to, and ``GET /metrics``
in any of them adds them all up. The command line keeps every other setting, so it reads the same
in ``make up`` and docker-compose.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import metrics  # noqa: E402
import settings  # noqa: E402


def on_starting(server):
    bind = re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(server.cfg.bind)).strip("-")
    metrics.use_directory(os.path.join(settings.METRICS_DIR, f"api-{bind}"))


def child_exit(server, worker):
    metrics.process_dead(worker.pid)
