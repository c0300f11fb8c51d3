"""Every model family serves jobs through the API and a real worker: torchvision (state-dict file),
transformers (save_pretrained dir), CLIP (zero-shot with labels from the job). sentence-transformers
and EfficientNet-Lite are the defaults, served in test_jobs.py."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.procs import start_worker, worker_ready

ZOO = ("tv-squeezenet", "tiny-bert", "tiny-clip")


@pytest.fixture(scope="module")
def zoo(client, stack_env, stack_dir, redis_url):
    procs = {model: start_worker(model, stack_env, stack_dir) for model in ZOO}
    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(lambda m: worker_ready(redis_url, m, procs[m]), procs))
        yield client
    finally:
        for proc in procs.values():
            proc.stop()


def png(size, seed) -> str:
    buf = io.BytesIO()
    Image.merge("RGB", [Image.effect_noise(size, 20 + seed + 10 * i) for i in range(3)]).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_torchvision_classifier(zoo):
    from torchvision.models import SqueezeNet1_1_Weights

    categories = SqueezeNet1_1_Weights.DEFAULT.meta["categories"]
    job = zoo.run("tv-squeezenet", {"image_b64": png((320, 240), 1)})
    top = job["result"]["top_k"]
    assert len(top) == 5 and all(t["label"] == categories[t["index"]] for t in top)
    raw = base64.b64decode(png((100, 100), 2))
    response = zoo.post("/jobs", data={"model": "tv-squeezenet"}, files={"image": ("x.png", raw, "image/png")})
    assert response.status_code == 202
    assert zoo.wait(response.json()["id"])["status"] == "succeeded"


def test_transformers_classifier_same_answer_alone_or_batched(zoo):
    texts = ["short", "a considerably longer sentence with many more tokens in it " * 6, "mid length text"]
    batched = zoo.run("tiny-bert", inputs=texts)["result"]
    alone = [zoo.run("tiny-bert", t)["result"] for t in texts]
    for a, b in zip(alone, batched):
        assert a["label"] == b["label"] and set(a["scores"]) == {"NEGATIVE", "POSITIVE"}
        assert abs(a["score"] - b["score"]) < 1e-4


def test_clip_zero_shot_labels_from_the_job_or_the_entry(zoo):
    labels = ["a cat", "a dog", "a bowl of soup"]
    job = zoo.run("tiny-clip", {"image_b64": png((64, 48), 3), "labels": labels})
    assert sorted(job["result"]["labels"]) == sorted(labels) and len(job["result"]["scores"]) == 3
    default = zoo.run("tiny-clip", {"image_b64": png((64, 48), 3)})
    assert sorted(default["result"]["labels"]) == ["a photo of a cat", "a photo of a dog"]
    raw = base64.b64decode(png((50, 50), 4))
    response = zoo.post("/jobs", data={"model": "tiny-clip", "labels": ["red", "blue"]},
                        files={"image": ("x.png", raw, "image/png")})
    assert response.status_code == 202, response.text
    assert sorted(zoo.wait(response.json()["id"])["result"]["labels"]) == ["blue", "red"]


def test_labels_are_checked_at_the_door(zoo):
    image = png((20, 20), 5)
    wrong = zoo.post("/jobs", json={"model": "tv-squeezenet", "input": {"image_b64": image, "labels": ["x"]}})
    assert wrong.status_code == 400 and "only for zero-shot-image" in wrong.json()["error"]["message"]
    empty = zoo.post("/jobs", json={"model": "tiny-clip", "input": {"image_b64": image, "labels": []}})
    assert empty.status_code == 400
    blank = zoo.post("/jobs", json={"model": "tiny-clip", "input": {"image_b64": image, "labels": [" "]}})
    assert blank.status_code == 400
    twice = zoo.post("/jobs", json={"model": "tiny-clip", "input": {"image_b64": image, "labels": ["a", "a"]}})
    assert twice.status_code == 400 and "distinct" in twice.json()["error"]["message"]
    models = {m["name"]: m for m in zoo.get("/models").json()["models"]}
    assert models["tiny-clip"]["task"] == "zero-shot-image" and models["tiny-clip"]["labels"]
