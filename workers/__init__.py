"""The Celery app (``celery -A workers ...``) and the worker bootstrap."""

from workers.app import app, make_celery

__all__ = ["app", "make_celery"]
