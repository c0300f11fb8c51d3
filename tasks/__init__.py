"""Celery task definitions: thin, they deserialize, call ``models``, store per-job results."""
