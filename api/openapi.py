"""GET /openapi.json (the v1 contract as OpenAPI 3.1) and GET /docs (Swagger UI, served locally)."""

from __future__ import annotations

from flask import Blueprint, jsonify, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from api.validation import SubmitBody

bp = Blueprint("openapi", __name__)

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_STATUSES = ["queued", "running", "retrying", "succeeded", "failed", "cancelled", "expired"]
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}


def _errors(*codes: int) -> dict:
    return {str(code): _ERROR for code in codes}


def build_spec() -> dict:
    submit = SubmitBody.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = submit.pop("$defs", {})
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
    json_of = lambda ref: {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}  # noqa: E731
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
        "security": [{}, {"bearer": []}, {"apiKey": []}],
        "paths": {
            "/jobs": {"post": {
                "summary": "Submit a job",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "minLength": 1, "maxLength": 200}}],
                "requestBody": {"required": True, "content": {
                    **json_of("SubmitBody"),
                    "multipart/form-data": {"schema": {"type": "object", "required": ["model", "image"],
                        "properties": {"model": {"type": "string"}, "priority": {"type": "string"},
                                       "timeout_s": {"type": "number"},
                                       "image": {"type": "string", "format": "binary"}}}}}},
                "responses": {"202": {"description": "queued", "content": json_of("Accepted")},
                              **_errors(400, 401, 404, 413, 415, 429, 503)}}},
            "/jobs/{job_id}": {
                "get": {"summary": "Poll a job (optionally long-poll with ?wait=N, N <= 30)",
                        "parameters": [_JOB_ID, {"name": "wait", "in": "query", "required": False,
                                                 "schema": {"type": "number", "minimum": 0, "maximum": 30}}],
                        "responses": {"200": {"description": "the job", "content": json_of("Job")},
                                      **_errors(400, 401, 404, 503)}},
                "delete": {"summary": "Cancel a queued job", "parameters": [_JOB_ID],
                           "responses": {"200": {"description": "cancelled", "content": json_of("Job")},
                                         **_errors(401, 404, 409, 503)}}},
            "/models": {"get": {"summary": "Served models, batch settings, queue depths, live workers",
                                "responses": {"200": {"description": "models"}, **_errors(401, 503)}}},
            "/healthz": {"get": {"summary": "Process is up", "security": [{}],
                                 "responses": {"200": {"description": "up"}}}},
            "/readyz": {"get": {"summary": "Broker reachable", "security": [{}],
                                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition"}, **_errors(401)}}},
        },
    }


_DOCS_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Inference job queue API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head><body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script></body></html>"""


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(build_spec())


@bp.get("/docs")
def docs():
    return _DOCS_PAGE, 200, {"Content-Type": "text/html; charset=utf-8"}


@bp.get("/docs/static/<path:name>")
def docs_static(name: str):
    return send_from_directory(swagger_ui_path, name)
