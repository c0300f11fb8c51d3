"""The shipped models, loaded through the registry as a worker loads them."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from models import build_runner
from models.exceptions import InvalidInput
from models.registry import Registry
from tests.fixtures.compare import close
from tests.procs import ROOT

REGISTRY = Registry.from_file(ROOT / "models.toml")


@pytest.fixture(scope="module")
def runners():
    import torch

    torch.set_num_threads(1)
    out = {}
    for name in REGISTRY.names():
        runner = build_runner(REGISTRY.get(name), device="cpu")
        runner.timed_load()
        out[name] = runner
    return out


def photo(name: str, fmt: str = "JPEG", size=None) -> dict:
    from skimage import data

    img = Image.fromarray(getattr(data, name)())
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return {"image_b64": base64.b64encode(buf.getvalue()).decode()}


def test_embeddings_are_384_d_and_normalised(runners):
    out = runners["minilm"](["hello world", "a cat sat on the mat"])
    assert [o["dim"] for o in out] == [384, 384]
    for o in out:
        assert abs(np.linalg.norm(o["embedding"]) - 1) < 1e-4
    # similar sentences are closer than unrelated ones
    a, b, c = (np.array(o["embedding"]) for o in runners["minilm"](
        ["The cat sleeps on the sofa", "A kitten naps on the couch", "Quarterly tax filing deadline"]))
    assert a @ b > a @ c + 0.3


def test_sentiment_gets_clear_cases_right(runners):
    pos, neg = runners["sentiment"](["I love this, it works great", "terrible, I want a refund"])
    assert pos["label"] == "POSITIVE" and pos["score"] > 0.8
    assert neg["label"] == "NEGATIVE" and neg["score"] > 0.8
    assert set(pos["scores"]) == {"POSITIVE", "NEGATIVE"}
    assert abs(sum(pos["scores"].values()) - 1) < 1e-5


def test_efficientnet_sees_a_cat_and_an_espresso(runners):
    cat, coffee = runners["efficientnet-lite0"]([photo("chelsea"), photo("coffee", "PNG")])
    assert cat["top_k"][0]["label"] in {"Egyptian cat", "tabby", "tiger cat"}
    assert cat["top_k"][0]["index"] in {281, 282, 285}
    assert coffee["top_k"][0]["label"] == "espresso"
    assert len(cat["top_k"]) == 5
    scores = [t["score"] for t in cat["top_k"]]
    assert scores == sorted(scores, reverse=True)


def test_image_runner_refuses_non_images(runners):
    with pytest.raises(InvalidInput):
        runners["efficientnet-lite0"].preprocess({"image_b64": base64.b64encode(b"text").decode()})
    with pytest.raises(InvalidInput):
        runners["efficientnet-lite0"].preprocess("a string")
    with pytest.raises(InvalidInput):
        runners["minilm"].preprocess({"image_b64": "x"})


TEXTS = ["hi", "I love this, it works great", "terrible, I want a refund",
         "a much longer text that goes on and on about many things " * 8, "ok"]


@pytest.mark.parametrize("name", ["minilm", "sentiment", "efficientnet-lite0"])
def test_batching_does_not_change_answers(runners, name):
    runner = runners[name]
    if runner.spec.input_kind == "text":
        items = TEXTS
    else:
        items = [photo("chelsea"), photo("coffee", "PNG", (300, 200)), photo("astronaut", "JPEG", (120, 160))]
    one_by_one = [runner([item])[0] for item in items]
    batched = runner(items)
    assert close(batched, one_by_one), name
