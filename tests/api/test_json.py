"""Responses are written by orjson and read as the json module's would be."""

import datetime
import json
import math

from flask import jsonify

from api import create_app


def test_responses_carry_the_same_json_values_as_flasks_own_writer():
    app = create_app()
    value = {"embedding": [0.1, -2.5e-07, 1e22, 3], "label": "café ✓", "when": datetime.datetime(2026, 11, 23, 5, 0),
             "nested": {"1": [True, None]}}
    with app.test_request_context():
        response = jsonify(value)
        plain = json.loads(app.json.dumps(value))  # Flask's json-module writer, for comparison
    assert response.mimetype == "application/json" and response.data.endswith(b"\n")
    assert json.loads(response.data) == plain
    assert json.loads(response.data)["when"] == "Mon, 23 Nov 2026 05:00:00 GMT"  # an HTTP date, as Flask writes it
    assert "café ✓".encode() in response.data  # UTF-8, not \\u escapes
    with app.test_request_context():
        assert json.loads(jsonify({"x": math.nan}).data) == {"x": None}  # valid JSON, where json writes NaN


def test_debug_mode_still_indents():
    app = create_app()
    app.debug = True
    with app.test_request_context():
        assert b'\n  "a": 1' in jsonify({"a": 1}).data
