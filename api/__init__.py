"""The Flask app factory: ``create_app(test_config=None)``."""

from __future__ import annotations

import logging

from flask import Flask

import settings


def create_app(test_config: dict | None = None) -> Flask:
    """Defaults from ``settings`` -> ``FLASK_*`` env vars -> ``test_config``."""
    app = Flask(__name__)
    app.config.from_mapping(
        MODELS_FILE=settings.MODELS_FILE, MODELS=settings.MODELS, API_KEYS=settings.API_KEYS,
        MAX_CONTENT_LENGTH=settings.MAX_BODY_BYTES, MAX_TEXT_CHARS=settings.MAX_TEXT_CHARS,
        MAX_INPUTS=settings.MAX_INPUTS, MAX_IMAGE_PIXELS=settings.MAX_IMAGE_PIXELS,
        MAX_QUEUED=settings.MAX_QUEUED, MAX_WAIT_S=settings.MAX_WAIT_S, JOB_TTL_S=settings.JOB_TTL_S,
        JSON_SORT_KEYS=False,
    )
    app.config.from_prefixed_env()
    if test_config:
        app.config.update(test_config)
    app.json.sort_keys = False

    from models.registry import Registry

    app.extensions["registry"] = Registry.from_file(app.config["MODELS_FILE"], app.config["MODELS"] or None)
    celery_init_app(app)

    from api import auth, errors, health, jobs, metrics, models, openapi

    errors.register_error_handlers(app)
    metrics.init_request_metrics(app)  # first, so that refused keys are timed and counted too
    auth.init_auth(app)
    for module in (jobs, models, health, metrics, openapi):
        app.register_blueprint(module.bp)
    import logs

    logs.configure_api()
    logging.getLogger(__name__).info("API serving models %s", app.extensions["registry"].names(),
                                     extra={"event": "api.start", "models": app.extensions["registry"].names()})
    return app


def celery_init_app(app: Flask):
    """Attach the Celery app (to publish) and a job store (to read and write job records)."""
    from tasks.messages import direct_publish_possible
    from tasks.store import JobStore
    from workers import app as celery

    app.extensions["celery"] = celery
    app.extensions["jobstore"] = JobStore.from_url(celery.conf.result_backend, app.config["JOB_TTL_S"])
    # POST /jobs pushes a job's message with its record, in one transaction (else: send_task)
    app.extensions["direct_publish"] = direct_publish_possible(celery)
    return celery
