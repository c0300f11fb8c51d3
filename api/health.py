"""GET /healthz (the process is up) and GET /readyz (the broker answers)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    try:
        current_app.extensions["jobstore"].r.ping()
    except Exception as exc:
        response = jsonify({"status": "unavailable", "error": {
            "type": "broker_unavailable", "message": f"Redis is unreachable ({type(exc).__name__})"}})
        response.status_code = 503
        return response
    return jsonify({"status": "ready", "broker": "ok"})
