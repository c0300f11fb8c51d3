"""API keys: when API_KEYS is set, every route but the health checks needs one.

A key is sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
Jobs are owned by a digest of the key that made them, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask, current_app, g, request

from api.errors import Unauthorized

#: Routes that need no key: health checks, and the API's own description.
OPEN_PATHS = ("/healthz", "/readyz", "/openapi.json", "/docs")


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-API-Key")


def init_auth(app: Flask) -> None:
    @app.before_request
    def _check_key():
        keys = current_app.config["API_KEYS"]
        g.owner = ""
        if not keys or request.path in OPEN_PATHS or request.path.startswith("/docs/"):
            return None
        presented = _presented_key()
        if not presented or not any(hmac.compare_digest(presented.encode("utf-8", "surrogateescape"),
                                                        k.encode("utf-8")) for k in keys):
            raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)",
                               headers={"WWW-Authenticate": "Bearer"})
        g.owner = owner_of(presented)
        return None
