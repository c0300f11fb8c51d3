"""GET /openapi.json (the v1 contract as OpenAPI 3.1) and GET /docs (Swagger UI, served locally)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from api.validation import MAX_LABELS, SubmitBody

bp = Blueprint("openapi", __name__)

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_STATUSES = ["queued", "running", "retrying", "succeeded", "failed", "cancelled", "expired"]
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}


def _errors(*codes: int) -> dict:
    return {str(code): _ERROR for code in codes}


def build_spec(auth_required: bool = False) -> dict:
    """The spec. ``auth_required`` (API_KEYS is set): every route but the health checks needs a key."""
    submit = SubmitBody.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = submit.pop("$defs", {})
    props = submit["properties"]
    job = {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "model": {"type": "string"}, "priority": {"type": "string"},
            "status": {"type": "string", "enum": _STATUSES},
            "result": {"description": "per task: embedding / label+scores / top_k; a list for 'inputs'"},
            "error": {"anyOf": [{"type": "null"}, {"type": "object"}]},
            "attempts": {"type": "integer"}, "worker": {"type": ["string", "null"]},
            "batch_size": {"type": ["integer", "null"]},
            "created_at": {"type": "string"}, "started_at": {"type": ["string", "null"]},
            "finished_at": {"type": ["string", "null"]},
            "queue_ms": {"type": ["number", "null"]}, "run_ms": {"type": ["number", "null"]},
        },
        "required": ["id", "status"],
    }
    accepted = {"type": "object", "required": ["id", "status", "url"], "properties": {
        "id": {"type": "string"}, "status": {"type": "string"}, "model": {"type": "string"},
        "priority": {"type": "string"}, "url": {"type": "string"}}}
    # What api.validation._from_multipart reads: these fields only, and at least one image file.
    multipart = {
        "type": "object", "additionalProperties": False, "required": ["model"],
        "anyOf": [{"required": ["image"]}, {"required": ["images"]}],
        "properties": {
            "model": {"type": "string", "minLength": 1, "maxLength": 200},
            "priority": props["priority"],
            "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
            "labels": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_LABELS,
                       "description": "zero-shot-image models only: the candidate labels"},
            "image": {"type": "string", "format": "binary"},
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
        },
    }
    models = {"type": "object", "required": ["models"], "properties": {"models": {"type": "array", "items": {
        "type": "object", "required": ["name", "task", "queue", "batch", "queue_depth", "workers"],
        "properties": {
            "name": {"type": "string"}, "task": {"type": "string"}, "input": {"type": "string"},
            "source": {"type": "string"}, "queue": {"type": "string"}, "description": {"type": "string"},
            "batch": {"type": "object", "properties": {"max_batch_size": {"type": "integer"},
                                                       "max_wait_ms": {"type": "number"},
                                                       "batching": {"enum": ["adaptive", "fixed"]}}},
            "queue_depth": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
            "workers": {"type": "array", "items": {"type": "string"}},
            "labels": {"type": "array", "items": {"type": "string"}}}}}}}
    status = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
    json_of = lambda ref: {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}  # noqa: E731
    job_links = {"getJob": {"operationId": "getJob", "parameters": {"job_id": "$response.body#/id"}},
                 "cancelJob": {"operationId": "cancelJob", "parameters": {"job_id": "$response.body#/id"}}}
    keyed = [{"bearer": []}, {"apiKey": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "Inference job queue", "version": "1",
                 "description": "Submit inference jobs, poll their results. Errors are "
                                "{\"error\": {\"type\", \"message\"}}."},
        "components": {
            "schemas": {"SubmitBody": submit, "Job": job, "Accepted": accepted, **defs,
                        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                            "type": "object", "required": ["type", "message"],
                            "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        # Keys are needed only when the server has API_KEYS set; otherwise any or none is fine.
        "security": keyed if auth_required else [{}, *keyed],
        "paths": {
            "/jobs": {"post": {
                "operationId": "submitJob", "summary": "Submit a job",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "minLength": 1, "maxLength": 200}}],
                "requestBody": {"required": True, "content": {
                    **json_of("SubmitBody"), "multipart/form-data": {"schema": multipart}}},
                "responses": {"202": {"description": "queued", "content": json_of("Accepted"), "links": job_links,
                                      "headers": {"Location": {"schema": {"type": "string"}}}},
                              **_errors(400, 401, 404, 409, 413, 415, 429, 503)}}},
            "/jobs/{job_id}": {
                "get": {"operationId": "getJob",
                        "summary": "Poll a job (optionally long-poll with ?wait=N, N <= 30)",
                        "parameters": [_JOB_ID, {"name": "wait", "in": "query", "required": False,
                                                 "schema": {"type": "number", "minimum": 0, "maximum": 30}}],
                        "responses": {"200": {"description": "the job", "content": json_of("Job")},
                                      **_errors(400, 401, 404, 503)}},
                "delete": {"operationId": "cancelJob", "summary": "Cancel a queued job", "parameters": [_JOB_ID],
                           "responses": {"200": {"description": "cancelled", "content": json_of("Job")},
                                         **_errors(401, 404, 409, 503)}}},
            "/models": {"get": {"operationId": "listModels",
                                "summary": "Served models, batch settings, queue depths, live workers",
                                "responses": {"200": {"description": "models",
                                                      "content": {"application/json": {"schema": models}}},
                                              **_errors(401, 503)}}},
            "/healthz": {"get": {"operationId": "healthz", "summary": "Process is up", "security": [{}],
                                 "responses": {"200": {"description": "up",
                                                       "content": {"application/json": {"schema": status}}}}}},
            "/readyz": {"get": {"operationId": "readyz", "summary": "Broker reachable", "security": [{}],
                                "responses": {"200": {"description": "ready",
                                                      "content": {"application/json": {"schema": status}}},
                                              "503": {"description": "not ready",
                                                      "content": {"application/json": {"schema": status}}}}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               **_errors(401, 503)}}},
        },
    }


_DOCS_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Inference job queue API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head><body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script></body></html>"""


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(build_spec(auth_required=bool(current_app.config["API_KEYS"])))


@bp.get("/docs")
def docs():
    return _DOCS_PAGE, 200, {"Content-Type": "text/html; charset=utf-8"}


@bp.get("/docs/static/<path:name>")
def docs_static(name: str):
    return send_from_directory(swagger_ui_path, name)
