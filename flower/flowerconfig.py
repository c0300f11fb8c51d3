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
