"""API errors: one base class, one JSON shape, one handler for everything.

    APIError (status 500)
    ├── BadRequest (400)          invalid_request
    ├── Unauthorized (401)        unauthorized
    ├── NotFound (404)            not_found / unknown_model
    ├── Conflict (409)            conflict
    ├── TooLarge (413)            too_large
    ├── UnsupportedMedia (415)    unsupported_media_type
    ├── TooManyRequests (429)     queue_full / deadline_unmeetable (with Retry-After)
    └── Unavailable (503)         broker_unavailable
"""

from __future__ import annotations

import logging

import redis
from flask import Flask, g, has_request_context, jsonify, request
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

from models.exceptions import UnknownModel

log = logging.getLogger(__name__)


class APIError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        if type:
            self.type = type
        self.headers = headers or {}

    def to_dict(self) -> dict:
        return {"error": {"type": self.type, "message": self.message}}


class BadRequest(APIError):
    status, type = 400, "invalid_request"


class Unauthorized(APIError):
    status, type = 401, "unauthorized"


class NotFound(APIError):
    status, type = 404, "not_found"


class Conflict(APIError):
    status, type = 409, "conflict"


class TooLarge(APIError):
    status, type = 413, "too_large"


class UnsupportedMedia(APIError):
    status, type = 415, "unsupported_media_type"


class TooManyRequests(APIError):
    status, type = 429, "queue_full"


class Unavailable(APIError):
    status, type = 503, "broker_unavailable"


def _respond(error: APIError):
    if has_request_context():
        g.error_type = error.type  # for the API's metrics (api_jobs_rejected_total)
    response = jsonify(error.to_dict())
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


#: Oversized bodies up to this size are read and thrown away so the client, still
#: sending, gets a clean 413 instead of a reset connection; larger ones are cut off.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024


def _drain_body() -> None:
    length = request.content_length or 0
    stream = request.environ.get("wsgi.input")
    if not stream or not 0 < length <= DRAIN_LIMIT_BYTES:
        return
    try:
        while length > 0:
            chunk = stream.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)
    except OSError:
        pass


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(error: APIError):
        return _respond(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        kind = (error.name or "error").lower().replace(" ", "_")
        if error.code == 413:
            kind = "too_large"
            _drain_body()
        # Keep the exception's own headers (a 405's Allow, say), all but its HTML Content-Type.
        headers = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
        wrapped = APIError(error.description or error.name, type=kind, headers=headers)
        wrapped.status = error.code or 500
        return _respond(wrapped)

    @app.errorhandler(UnknownModel)
    def _unknown_model(error: UnknownModel):
        return _respond(NotFound(str(error), type="unknown_model"))

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    @app.errorhandler(OperationalError)
    def _broker_down(error: Exception):
        log.warning("broker unreachable: %s", error)
        return _respond(Unavailable("the job broker (Redis) is unreachable; try again shortly",
                                    headers={"Retry-After": "5"}))

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log.exception("unhandled error")
        return _respond(APIError("internal error; the server log has the details"))
