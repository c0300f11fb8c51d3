"""Logging for the API and the workers: one JSON line per event (``LOG_FORMAT=json``, the default)
or plain text (``LOG_FORMAT=text``).

Events carry their fields as ``extra=``: ``event`` (``job.submitted``, ``job.finished``,
``batch.done``, ...), ``job_id``, ``model``, ``worker``, ``batch_id`` and timings, so one job id
can be followed from the API's line to the worker's and to its result.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

import settings

TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


def formatter() -> logging.Formatter:
    if settings.LOG_FORMAT == "json":
        return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(processName)s %(message)s",
                             rename_fields={"asctime": "time", "levelname": "level", "name": "logger",
                                            "processName": "process"})
    return logging.Formatter(TEXT_FORMAT)


def use_formatter(logger: logging.Logger) -> None:
    """Give every handler of ``logger`` our formatter (Celery's after_setup_logger signal)."""
    for handler in logger.handlers:
        handler.setFormatter(formatter())


def configure_api() -> None:
    """Under gunicorn the root logger has no handler: add one on stderr, at INFO."""
    root = logging.getLogger()
    if not any(getattr(h, "_ours", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._ours = True
        root.addHandler(handler)
    use_formatter(root)
    root.setLevel(logging.INFO)
