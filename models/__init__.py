"""Model registry and runners. Importing this package never imports torch."""

from __future__ import annotations

import importlib

from models.exceptions import ConfigError, InferenceError, InvalidInput, TransientError, UnknownModel
from models.registry import ModelSpec, Registry, load_registry

__all__ = [
    "ConfigError", "InferenceError", "InvalidInput", "ModelSpec", "Registry", "TransientError",
    "UnknownModel", "build_runner", "load_registry", "runner_class",
]


def _runner_class(spec: ModelSpec):
    kind, task = spec.source_kind, spec.task
    if kind == "python":
        module_name, _, class_name = spec.source_location.partition(":")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"model {spec.name!r}: cannot import runner {spec.source_location!r}: {exc}")
    from models import clip, text, vision

    table = {
        ("sentence-transformers", "embedding"): text.SentenceEmbeddingRunner,
        ("sentence-transformers", "text-classification"): text.ZeroShotTextRunner,
        ("hf", "text-classification"): text.HFTextClassifierRunner,
        ("hf", "zero-shot-image"): clip.ClipRunner,
        ("torchvision", "image-classification"): vision.TorchvisionClassifierRunner,
        ("efficientnet-lite", "image-classification"): vision.EfficientNetLiteRunner,
    }
    try:
        return table[kind, task]
    except KeyError:
        raise ConfigError(f"model {spec.name!r}: no runner for source {kind!r} with task {task!r}") from None


def runner_class(spec: ModelSpec):
    """The Runner subclass that serves ``spec`` (imports its module, not torch)."""
    return _runner_class(spec)


def build_runner(spec: ModelSpec, device: str | None = None):
    """A runner for ``spec``, not yet loaded (call ``timed_load``). The device is the
    argument, else the entry's ``device``, else the DEVICE setting (auto: CUDA if present)."""
    import settings
    from models.base import pick_device

    wanted = device or (spec.device if spec.device != "auto" else settings.DEVICE)
    return _runner_class(spec)(spec, device=pick_device(wanted))
