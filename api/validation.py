"""Request validation for POST /jobs: JSON (pydantic) or multipart, then per-model checks."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from flask import Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from api.errors import BadRequest, TooLarge, UnsupportedMedia
from models.exceptions import InvalidInput
from models.images import b64_to_bytes, check_image
from models.text import check_text
from models.registry import ModelSpec

#: Most candidate labels per image, and longest label, for zero-shot-image models.
MAX_LABELS = 100
MAX_LABEL_CHARS = 300


class ImageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_b64: StrictStr = Field(min_length=1, description="base64 JPEG/PNG/WebP/GIF bytes")
    labels: list[StrictStr] | None = Field(
        default=None, min_length=1, max_length=MAX_LABELS,
        description="zero-shot-image models only: the candidate labels")


InputItem = Union[StrictStr, ImageInput]


#: "exactly one of input or inputs" (parse_submission's check), in the JSON schema too: one present
#: and not null (a null one counts as absent).
_EXACTLY_ONE_INPUT = {"oneOf": [
    {"required": ["input"], "properties": {"input": {"type": ["string", "object"]}}},
    {"required": ["inputs"], "properties": {"inputs": {"type": "array"}}},
]}


class SubmitBody(BaseModel):
    """The JSON body of POST /jobs: exactly one of ``input`` or ``inputs``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), json_schema_extra=_EXACTLY_ONE_INPUT)
    model: StrictStr = Field(min_length=1, max_length=200)
    input: InputItem | None = None
    inputs: list[InputItem] | None = Field(default=None, min_length=1)
    priority: Literal["high", "normal", "low"] = "normal"
    timeout_s: Annotated[float, Field(gt=0, le=86400, strict=True)] | None = Field(
        default=None, description="deadline in seconds: a job not started by then ends expired")


@dataclass
class Submission:
    model: str
    items: list[Any]
    single: bool
    priority: str
    timeout_s: float | None


_BRANCHES = ("str", "ImageInput")


def _at(data: Any, path: list) -> Any:
    for step in path:
        try:
            data = data[step]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _describe(exc: ValidationError, data: Any) -> str:
    """pydantic's errors, with union noise removed: for an input that is an object only the
    image branch's complaints are shown, for a string only the text branch's."""
    parts: list[str] = []
    for err in exc.errors():
        loc = list(err["loc"])
        message = err["msg"]
        branch = next((i for i, step in enumerate(loc) if step in _BRANCHES), None)
        if branch is not None:
            prefix, value = loc[:branch], _at(data, loc[:branch])
            if isinstance(value, dict) and loc[branch] != "ImageInput" or isinstance(value, str) and loc[branch] != "str":
                continue
            if not isinstance(value, (dict, str)):
                loc, message = prefix, 'must be a text string or an object {"image_b64": "...", "labels"?: [...]}'
            else:
                loc = prefix + loc[branch + 1:]
        line = f"{'.'.join(str(p) for p in loc) or 'body'}: {message}"
        if line not in parts:
            parts.append(line)
    return "; ".join(parts[:5])


def parse_submission(request: Request) -> Submission:
    """Read a submission from JSON or multipart; raises 400/415 on shape errors."""
    if request.mimetype == "application/json":
        data = _json_body(request)
    elif request.mimetype == "multipart/form-data":
        data = _from_multipart(request)
    else:
        raise UnsupportedMedia("send application/json, or multipart/form-data for image uploads")
    try:
        body = SubmitBody.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_describe(exc, data)) from None
    if (body.input is None) == (body.inputs is None):
        raise BadRequest("give exactly one of 'input' or 'inputs'")
    raw = [body.input] if body.inputs is None else body.inputs
    items = [item.model_dump(exclude_none=True) if isinstance(item, ImageInput) else item for item in raw]
    return Submission(body.model, items, body.inputs is None, body.priority, body.timeout_s)


def _json_body(request: Request) -> dict[str, Any]:
    raw = request.get_data(cache=True)  # 413 here when a Content-Length is over the limit
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        raise TooLarge(f"the body is over {limit} bytes")  # a chunked body, cut at the limit
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


_FORM_FIELDS = {"model", "priority", "timeout_s", "labels"}
_FILE_FIELDS = {"image", "images"}


def _from_multipart(request: Request) -> dict[str, Any]:
    form = request.form
    not_files = set(form) & _FILE_FIELDS
    if not_files:
        raise BadRequest(f"multipart fields {sorted(not_files)} must be files (a part with a filename)")
    unknown = (set(form) - _FORM_FIELDS) | (set(request.files) - _FILE_FIELDS)
    if unknown:
        raise BadRequest(f"unknown multipart fields {sorted(unknown)}; allowed: {sorted(_FORM_FIELDS | _FILE_FIELDS)}")
    files = request.files.getlist("image") + request.files.getlist("images")
    if not files:
        raise BadRequest("multipart submissions need an 'image' file field")
    data: dict[str, Any] = {"model": form.get("model", "")}
    if "priority" in form:
        data["priority"] = form["priority"]
    if "timeout_s" in form:
        try:
            data["timeout_s"] = float(form["timeout_s"])
        except ValueError:
            raise BadRequest("timeout_s must be a number") from None
    labels = form.getlist("labels")
    encoded = [{"image_b64": base64.b64encode(f.read()).decode(), **({"labels": labels} if labels else {})}
               for f in files]
    if len(encoded) == 1:
        data["input"] = encoded[0]
    else:
        data["inputs"] = encoded
    return data


def check_items(spec: ModelSpec, items: list[Any], *, max_inputs: int, max_text_chars: int,
                max_pixels: int) -> None:
    """Check inputs against the model's input kind and the size limits."""
    if len(items) > max_inputs:
        raise TooLarge(f"{len(items)} inputs in one job; the limit is {max_inputs}")
    for i, item in enumerate(items):
        where = "input" if len(items) == 1 else f"inputs[{i}]"
        if spec.input_kind == "text":
            if not isinstance(item, str):
                raise BadRequest(f"{where}: model {spec.name!r} takes text, got an object")
            try:
                check_text(item)  # the same check the worker's runner makes
            except InvalidInput as exc:
                raise BadRequest(f"{where}: {exc}") from None
            if len(item) > max_text_chars:
                raise TooLarge(f"{where}: text is {len(item)} characters; the limit is {max_text_chars}")
        else:
            if not isinstance(item, dict):
                raise BadRequest(f'{where}: model {spec.name!r} takes images: {{"image_b64": "..."}}')
            _check_labels(spec, item, where)
            try:
                check_image(b64_to_bytes(item["image_b64"]), max_pixels)
            except InvalidInput as exc:
                if "pixels" in str(exc):
                    raise TooLarge(f"{where}: {exc}") from None
                raise BadRequest(f"{where}: {exc}") from None


def _check_labels(spec: ModelSpec, item: dict, where: str) -> None:
    labels = item.get("labels")
    if spec.task != "zero-shot-image":
        if labels is not None:
            raise BadRequest(f"{where}: labels are only for zero-shot-image models; {spec.name!r} is {spec.task}")
        return
    if labels is None and not spec.labels:
        raise BadRequest(f'{where}: model {spec.name!r} needs labels: {{"image_b64": "...", "labels": ["a cat", "a dog"]}}')
    if labels is not None and len(set(labels)) != len(labels):
        raise BadRequest(f"{where}: labels must be distinct")
    for label in labels or []:
        if not label.strip():
            raise BadRequest(f"{where}: labels must be non-empty strings")
        if len(label) > MAX_LABEL_CHARS:
            raise TooLarge(f"{where}: a label is {len(label)} characters; the limit is {MAX_LABEL_CHARS}")
