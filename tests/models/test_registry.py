import pytest

from models.exceptions import ConfigError, UnknownModel
from models.registry import Registry
from tests.procs import ROOT


def write(tmp_path, text):
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_shipped_models_file_has_the_three_defaults():
    registry = Registry.from_file(ROOT / "models.toml")
    assert registry.names() == ["minilm", "sentiment", "efficientnet-lite0"]
    minilm = registry.get("minilm")
    assert (minilm.task, minilm.queue, minilm.input_kind) == ("embedding", "jobs.minilm", "text")
    assert registry.get("efficientnet-lite0").input_kind == "image"
    assert set(registry.get("sentiment").labels) == {"POSITIVE", "NEGATIVE"}


def test_models_selection_picks_a_subset_in_order():
    registry = Registry.from_file(ROOT / "models.toml", ["sentiment", "minilm"])
    assert registry.names() == ["sentiment", "minilm"]
    with pytest.raises(UnknownModel, match="efficientnet-lite0"):
        registry.get("efficientnet-lite0")


def test_unknown_name_in_models_selection_fails_at_start():
    with pytest.raises(ConfigError, match=r"MODELS names \['nope'\]"):
        Registry.from_file(ROOT / "models.toml", ["minilm", "nope"])


@pytest.mark.parametrize("entry, message", [
    ('task = "embedding"', "'source' is required"),
    ('source = "hf:x"', "'task' is required"),
    ('task = "translation"\nsource = "hf:x"', "task 'translation' is not one of"),
    ('task = "embedding"\nsource = "s3:bucket"', "must look like KIND:LOCATION"),
    ('task = "embedding"\nsource = "hf:x"\nmax_batch_size = 0', "max_batch_size must be an integer"),
    ('task = "embedding"\nsource = "hf:x"\nmax_batch_size = "8"', "max_batch_size must be an integer"),
    ('task = "embedding"\nsource = "hf:x"\nmax_wait_ms = -1', "max_wait_ms must be a number"),
    ('task = "embedding"\nsource = "hf:x"\ndevice = "tpu"', "device must be"),
    ('task = "embedding"\nsource = "hf:x"\nbatching = "dynamic"', 'batching must be "adaptive" or "fixed"'),
    ('task = "embedding"\nsource = "hf:x"\nbatch = 3', "unknown keys \\['batch'\\]"),
    ('task = "text-classification"\nsource = "sentence-transformers:x"', "needs labels"),
    ('task = "image-classification"\nsource = "torchvision:resnet18"\n[models.bad.options]\ncategorie = ["a"]',
     "unknown options \\['categorie'\\]"),
    ('task = "image-classification"\nsource = "torchvision:resnet18"\n[models.bad.options]\ncategories = "ok"',
     "must be a list of class names"),
    ('task = "image-classification"\nsource = "torchvision:resnet18"\n[models.bad.options]\n'
     'categories = ["a", "b"]\nnum_classes = 5', "num_classes = 5 but 2 categories"),
    ('task = "text-classification"\nsource = "hf:x"\nweights = "/nope.pth"', "weights apply to torchvision"),
    ('task = "image-classification"\nsource = "torchvision:resnet18"\nlabels = ["x", "y"]',
     "labels apply to zero-shot models only"),
    ('task = "image-classification"\nsource = "efficientnet-lite:efficientnet-lite0"', "needs weights"),
    ('task = "embedding"\nsource = "hf:x"\noptions = 3', "options must be a table"),
])
def test_bad_entries_fail_with_a_clear_message(tmp_path, entry, message):
    path = write(tmp_path, f"[models.bad]\n{entry}\n")
    with pytest.raises(ConfigError, match=message) as info:
        Registry.from_file(path)
    assert "'bad'" in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Registry.from_file(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Registry.from_file(write(tmp_path, "[models.x\n"))
    with pytest.raises(ConfigError, match="no \\[models"):
        Registry.from_file(write(tmp_path, "title = 'x'\n"))


def test_registry_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, api, models, workers, tasks.store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_batching_is_adaptive_unless_the_entry_says_fixed(tmp_path):
    path = write(tmp_path, '[models.a]\ntask = "embedding"\nsource = "hf:x"\n'
                           '[models.f]\ntask = "embedding"\nsource = "hf:x"\nbatching = "fixed"\n')
    registry = Registry.from_file(path)
    assert registry.get("a").batching == "adaptive" and registry.get("f").batching == "fixed"
    assert registry.get("f").public()["batch"] == {"max_batch_size": 32, "max_wait_ms": 10.0, "batching": "fixed"}
