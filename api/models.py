"""GET /models: each served model, its batch settings, queue depth and live workers."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from celeryconfig import PRIORITIES

bp = Blueprint("models", __name__)


@bp.get("/models")
def list_models():
    store = current_app.extensions["jobstore"]
    out = []
    for spec in current_app.extensions["registry"]:
        entry = spec.public()
        entry["queue_depth"] = store.queue_depths(spec.name, PRIORITIES)
        entry["workers"] = store.live_workers(spec.name)
        out.append(entry)
    return jsonify({"models": out})
