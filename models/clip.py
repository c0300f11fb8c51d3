"""CLIP: zero-shot image classification over labels given in the job, and text-image similarity.

Input ``{"image_b64": "...", "labels": ["a cat", "a dog"]}`` (labels default to
the entry's ``labels``). Result ``{"labels": [...], "scores": [...],
"similarities": [...]}``, most likely label first: ``scores`` are the softmax
over the labels (CLIP's logit scale), ``similarities`` the raw cosine
similarities of the image to each label's text. A batch runs the image encoder
once over all images and the text encoder once over the distinct labels.
"""

from __future__ import annotations

from typing import Any

from models.base import Runner
from models.exceptions import InvalidInput
from pathlib import Path

from models.exceptions import ConfigError
from models.text import _offline_if_local, check_location, hf_config, max_text_length, resolve_location
from models.vision import image_from


def _features(output):
    """transformers 4 returns a tensor, 5 an output object with the projection in pooler_output."""
    return output if hasattr(output, "norm") else output.pooler_output


class ClipRunner(Runner):
    preload_modules = ("torch", "transformers")

    @classmethod
    def check_spec(cls, spec) -> None:
        check_location(spec, spec.source_location)
        config = hf_config(spec, spec.source_location)
        if getattr(config, "model_type", "") != "clip":
            raise ConfigError(f"model {spec.name!r}: {spec.source_location!r} is a {config.model_type!r} model, "
                              f"not CLIP; zero-shot-image needs a CLIP model")
        path = Path(resolve_location(spec.source_location)).expanduser()
        if path.is_dir() and not (path / "preprocessor_config.json").exists():
            raise ConfigError(f"model {spec.name!r}: {str(path)!r} has no preprocessor_config.json "
                              f"(save the CLIPProcessor with the model)")

    def load(self) -> None:
        path = resolve_location(self.spec.source_location)
        _offline_if_local(path)
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = self.place(CLIPModel.from_pretrained(path))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        self.default_labels = list(self.spec.labels or [])
        self.max_length = max_text_length(self.tokenizer, self.model.config.text_config)

    def preprocess(self, item: Any):
        image = image_from(item)
        labels = item.get("labels") or self.default_labels
        if not labels:
            raise InvalidInput(f"model {self.spec.name!r} needs labels: "
                               '{"image_b64": "...", "labels": ["a cat", "a dog"]}')
        if not all(isinstance(label, str) and label.strip() for label in labels):
            raise InvalidInput("labels must be non-empty strings")
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels, list(labels)

    def forward(self, batch: list[Any]):
        import torch
        import torch.nn.functional as F

        pixels = torch.stack([p for p, _ in batch]).to(self.device, self.dtype)
        images = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        distinct = list(dict.fromkeys(label for _, labels in batch for label in labels))
        tokens = self.tokenizer(distinct, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        texts = F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)
        row_of = {label: i for i, label in enumerate(distinct)}
        scale = self.model.logit_scale.exp().float()
        out = []
        for i, (_, labels) in enumerate(batch):
            sims = texts[[row_of[label] for label in labels]] @ images[i]
            out.append((labels, sims.cpu(), (sims * scale).softmax(-1).cpu()))
        return out

    def postprocess(self, outputs, n: int) -> list[dict]:
        results = []
        for labels, sims, probs in outputs:
            order = probs.argsort(descending=True).tolist()
            results.append({"labels": [labels[i] for i in order], "scores": [float(probs[i]) for i in order],
                            "similarities": [float(sims[i]) for i in order]})
        return results
