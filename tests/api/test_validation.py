"""POST /jobs validation and the error shape, through the Flask test client. These all
fail before the broker is touched, so no Redis is needed."""

import base64
import io

import pytest
from PIL import Image

from api import create_app


@pytest.fixture
def client():
    app = create_app({"TESTING": True, "MAX_CONTENT_LENGTH": 4096, "MAX_TEXT_CHARS": 50,
                      "MAX_INPUTS": 3, "MAX_IMAGE_PIXELS": 100 * 100})
    return app.test_client()


def png(size=(10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def error_of(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    return body["error"]


@pytest.mark.parametrize("body, message", [
    ({"input": "x"}, "model: Field required"),
    ({"model": "minilm"}, "exactly one of 'input' or 'inputs'"),
    ({"model": "minilm", "input": "x", "inputs": ["y"]}, "exactly one of"),
    ({"model": "minilm", "input": 5}, 'input: must be a text string or an object {"image_b64"'),
    ({"model": "efficientnet-lite0", "input": {"image_b64": "x", "labels": "a cat"}},
     "input.labels: Input should be a valid list"),
    ({"model": "efficientnet-lite0", "inputs": [{"image_b64": "x", "labels": []}]},
     "inputs.0.labels: List should have at least 1 item"),
    ({"model": "minilm", "input": None}, "exactly one of"),
    ({"model": 7, "input": "x"}, "model: Input should be a valid string"),
    ({"model": "minilm", "inputs": []}, "inputs: List should have at least 1 item"),
    ({"model": "minilm", "inputs": "abc"}, "inputs"),
    ({"model": "minilm", "input": "x", "priority": "urgent"}, "priority"),
    ({"model": "minilm", "input": "x", "timeout_s": -1}, "timeout_s"),
    ({"model": "minilm", "input": "x", "timeout_s": "soon"}, "timeout_s"),
    ({"model": "minilm", "input": "x", "timeout_s": True}, "timeout_s"),
    ({"model": "minilm", "input": "x", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"model": "minilm", "input": "   "}, "text is empty"),
    ({"model": "minilm", "input": {"image_b64": png()}}, "takes text"),
    ({"model": "efficientnet-lite0", "input": "a cat"}, "takes images"),
    ({"model": "efficientnet-lite0", "input": {"image_b64": "bm90IGFuIGltYWdl"}}, "not an image"),
    ({"model": "efficientnet-lite0", "input": {"image_b64": "%%%"}}, "not valid base64"),
    ({"model": "efficientnet-lite0", "input": {"url": "http://x"}}, "input"),
])
def test_invalid_bodies_are_400_with_a_clear_message(client, body, message):
    err = error_of(client.post("/jobs", json=body), 400)
    assert err["type"] == "invalid_request"
    assert message in err["message"]


def test_malformed_json_and_non_object(client):
    assert "not valid JSON" in error_of(
        client.post("/jobs", data="{nope", content_type="application/json"), 400)["message"]
    assert "JSON object" in error_of(client.post("/jobs", json=["a"]), 400)["message"]
    assert "JSON object" in error_of(client.post("/jobs", data="null", content_type="application/json"), 400)["message"]
    deep = '{"model": "minilm", "input": ' + "[" * 100_000 + "]" * 100_000 + "}"
    app = create_app({"TESTING": True})
    assert "not valid JSON" in error_of(
        app.test_client().post("/jobs", data=deep, content_type="application/json"), 400)["message"]


def test_chunked_body_over_the_limit_is_413(client):
    """A chunked body has no Content-Length: it is cut at the limit, and that is a 413, not a 400."""
    body = b'{"model": "minilm", "input": "' + b"x" * 10_000 + b'"}'
    response = client.post("/jobs", input_stream=io.BytesIO(body), content_type="application/json",
                           headers={"Transfer-Encoding": "chunked"},
                           environ_overrides={"wsgi.input_terminated": True})
    assert error_of(response, 413)["type"] == "too_large"


def test_text_that_is_not_unicode_is_400(client):
    err = error_of(client.post("/jobs", data='{"model": "minilm", "input": "\\ud800"}',
                               content_type="application/json"), 400)
    assert "not valid Unicode" in err["message"]


def test_extreme_aspect_ratio_is_400(client):
    err = error_of(client.post("/jobs", json={"model": "efficientnet-lite0", "input": {"image_b64": png((5000, 1))}}), 400)
    assert "5000x1" in err["message"]


def test_wrong_content_type_is_415(client):
    err = error_of(client.post("/jobs", data="model=minilm", content_type="text/plain"), 415)
    assert err["type"] == "unsupported_media_type"


def test_unknown_model_is_404(client):
    err = error_of(client.post("/jobs", json={"model": "gpt-9", "input": "x"}), 404)
    assert err["type"] == "unknown_model" and "gpt-9" in err["message"]


def test_limits_are_413(client):
    assert error_of(client.post("/jobs", json={"model": "minilm", "input": "x" * 51}), 413)["type"] == "too_large"
    err = error_of(client.post("/jobs", json={"model": "minilm", "inputs": ["a", "b", "c", "d"]}), 413)
    assert "4 inputs" in err["message"]
    big = png((101, 100))
    err = error_of(client.post("/jobs", json={"model": "efficientnet-lite0", "input": {"image_b64": big}}), 413)
    assert "pixels" in err["message"]
    err = error_of(client.post("/jobs", json={"model": "minilm", "input": "x" * 5000}), 413)
    assert err["type"] == "too_large"


def test_multipart_fields_are_checked(client):
    raw = base64.b64decode(png())
    data = {"model": "efficientnet-lite0", "foo": "bar", "image": (io.BytesIO(raw), "x.png")}
    err = error_of(client.post("/jobs", data=data, content_type="multipart/form-data"), 400)
    assert "unknown multipart fields ['foo']" in err["message"]


def test_multipart_needs_an_image(client):
    err = error_of(client.post("/jobs", data={"model": "efficientnet-lite0"}, content_type="multipart/form-data"), 400)
    assert "'image' file field" in err["message"]
    data = {"model": "efficientnet-lite0", "image": (io.BytesIO(b"plain text"), "x.jpg")}
    assert "not an image" in error_of(client.post("/jobs", data=data, content_type="multipart/form-data"), 400)["message"]


def test_bad_job_ids_and_wait_values(client):
    assert error_of(client.get("/jobs/not-a-uuid"), 404)["type"] == "not_found"
    assert error_of(client.delete("/jobs/not-a-uuid"), 404)["type"] == "not_found"


def test_unknown_routes_and_methods_use_the_error_shape(client):
    assert error_of(client.get("/nope"), 404)["type"] == "not_found"
    assert error_of(client.put("/jobs"), 405)["type"] == "method_not_allowed"


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    for path in ("/jobs", "/jobs/{job_id}", "/models", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"]
    assert set(spec["paths"]["/jobs/{job_id}"]) == {"get", "delete"}
    assert "SubmitBody" in spec["components"]["schemas"]
    page = client.get("/docs")
    assert page.status_code == 200 and b"swagger-ui-bundle.js" in page.data
    assert client.get("/docs/static/swagger-ui-bundle.js").status_code == 200


def test_api_keys_guard_everything_but_health():
    app = create_app({"TESTING": True, "API_KEYS": ["k1"]})
    c = app.test_client()
    assert c.get("/healthz").status_code == 200
    err = error_of(c.post("/jobs", json={"model": "minilm", "input": "x"}), 401)
    assert err["type"] == "unauthorized"
    assert error_of(c.get("/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert c.get("/openapi.json").status_code == 200  # the docs are open, the API is not
    assert c.get("/docs").status_code == 200
    assert error_of(c.get("/models", headers={"X-API-Key": "ключ"}), 401)  # non-ASCII key: 401, not 500


# Found by fuzzing (tests/integration/test_fuzz.py and a mutation fuzz of check_image): regressions.

@pytest.mark.parametrize("raw", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x03IHDR\x00\x00\x00\x10\x00\x00\x00\x0c",  # Pillow: ValueError, truncated IHDR
    b"P6\n1x 1\n255\n",  # PPM header: ValueError from int()
    b"P5\n1",  # PPM header cut short: ValueError
])
def test_a_corrupt_image_header_is_400_not_500(client, raw):
    """Pillow's format plugins raise ValueError/NotImplementedError for some corrupt headers, not only
    the OSError models.images expects; the API used to answer those with a 500."""
    body = {"model": "efficientnet-lite0", "input": {"image_b64": base64.b64encode(raw).decode()}}
    assert "the image cannot be read" in error_of(client.post("/jobs", json=body), 400)["message"]
    data = {"model": "efficientnet-lite0", "image": (io.BytesIO(raw), "x.png")}
    assert error_of(client.post("/jobs", data=data, content_type="multipart/form-data"), 400)["type"] == "invalid_request"


def test_a_file_field_sent_as_text_is_named_as_such(client):
    data = {"model": "efficientnet-lite0", "image": (io.BytesIO(base64.b64decode(png())), "x.png"), "images": "AAA"}
    err = error_of(client.post("/jobs", data=data, content_type="multipart/form-data"), 400)
    assert "['images'] must be files" in err["message"]


def test_405_says_which_methods_are_allowed(client):
    response = client.put("/jobs")
    assert error_of(response, 405)["type"] == "method_not_allowed"
    assert {m.strip() for m in response.headers["Allow"].split(",")} >= {"POST", "OPTIONS"}
    assert response.mimetype == "application/json"


def test_the_spec_says_what_the_api_does(client):
    spec = client.get("/openapi.json").get_json()
    submit = spec["components"]["schemas"]["SubmitBody"]
    assert [branch["required"] for branch in submit["oneOf"]] == [["input"], ["inputs"]]  # exactly one
    post = spec["paths"]["/jobs"]["post"]
    multipart = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(multipart["properties"]) == {"model", "priority", "timeout_s", "labels", "image", "images"}
    assert multipart["additionalProperties"] is False and multipart["properties"]["model"]["minLength"] == 1
    assert {"202", "409", "413", "415", "429"} <= set(post["responses"])
    assert post["responses"]["202"]["links"]["getJob"]["operationId"] == "getJob"
    assert {} in spec["security"]  # no API_KEYS: a key is optional
    keyed = create_app({"TESTING": True, "API_KEYS": ["k1"]}).test_client().get("/openapi.json").get_json()
    assert {} not in keyed["security"] and keyed["paths"]["/healthz"]["get"]["security"] == [{}]
