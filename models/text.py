"""Text runners: sentence-transformers embeddings, zero-shot over them, transformers classifiers."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from models.base import Runner
from models.exceptions import ConfigError, InvalidInput


def resolve_location(location: str) -> str:
    """``pkg:module`` -> the directory that package ships (``module.get_model_path()``);
    a directory or a hub id is returned as it is."""
    if location.startswith("pkg:"):
        module_name = location[4:]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"package {module_name!r} is not installed: {exc}") from None
        if not hasattr(module, "get_model_path"):
            raise ConfigError(f"package {module_name!r} has no get_model_path()")
        return str(module.get_model_path())
    return location


def check_location(spec, location: str) -> None:
    """A location that is clearly a path (absolute, ./ or ~) must exist; hub ids are not checked."""
    if location.startswith("pkg:"):
        resolve_location(location)
    elif location.startswith(("/", "./", "../", "~")) and not Path(location).expanduser().exists():
        raise ConfigError(f"model {spec.name!r}: {location!r} does not exist")


def hf_config(spec, location: str):
    """The model's transformers config, read at worker start (a local file, or the hub's copy)."""
    path = resolve_location(location)
    _offline_if_local(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ConfigError(
            f"model {spec.name!r}: cannot read the model config at {location!r}: {str(exc).splitlines()[0][:200]}. "
            f"A hub id needs a network or a pre-fetched cache (make prefetch); a directory needs config.json") from None


def _offline_if_local(path: str) -> None:
    # A local directory needs no hub; saying so up front avoids network time-outs.
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def check_text(item: Any) -> str:
    if not isinstance(item, str):
        raise InvalidInput(f"text input must be a string, got {type(item).__name__}")
    if not item.strip():
        raise InvalidInput("text is empty")
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("text is not valid Unicode (a lone surrogate?)") from None
    return item


class SentenceEmbeddingRunner(Runner):
    """Embeddings from any sentence-transformers model id or directory, L2-normalised."""

    preload_modules = ("torch", "sentence_transformers")

    @classmethod
    def check_spec(cls, spec) -> None:
        check_location(spec, spec.source_location)
        path = Path(resolve_location(spec.source_location)).expanduser()
        if path.is_dir() and not ((path / "modules.json").exists() or (path / "config.json").exists()):
            raise ConfigError(f"model {spec.name!r}: {str(path)!r} is not a sentence-transformers or "
                              f"transformers model directory (no modules.json or config.json)")

    def load(self) -> None:
        path = resolve_location(self.spec.source_location)
        _offline_if_local(path)
        from sentence_transformers import SentenceTransformer

        self.model = self.place(SentenceTransformer(path, device=self.device))

    def preprocess(self, item: Any) -> str:
        return check_text(item)

    def embed(self, texts: list[str]):
        return self.model.encode(
            texts, batch_size=max(1, len(texts)), normalize_embeddings=True,
            convert_to_tensor=True, show_progress_bar=False)

    def forward(self, batch: list[str]):
        return self.embed(batch)

    def postprocess(self, outputs, n: int) -> list[dict]:
        rows = outputs.float().cpu().tolist()
        return [{"embedding": row, "dim": len(row)} for row in rows]


class ZeroShotTextRunner(SentenceEmbeddingRunner):
    """Text classification without a trained head: cosine similarity of the text's
    embedding to each label's (mean of its descriptions), softmax with a temperature."""

    def load(self) -> None:
        import torch

        super().load()
        self.labels = list(self.spec.labels)
        self.scale = float(self.spec.options.get("scale", 20.0))
        with torch.inference_mode():
            rows = [self.embed(descs).mean(0) for descs in self.spec.labels.values()]
            self.label_matrix = torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def forward(self, batch: list[str]):
        return (self.embed(batch) @ self.label_matrix.T * self.scale).softmax(-1)

    def postprocess(self, outputs, n: int) -> list[dict]:
        return [_label_scores(self.labels, row) for row in outputs.float().cpu().tolist()]


def max_text_length(tokenizer, config) -> int:
    """Truncate to what both the tokenizer and the model's position embeddings allow."""
    limit = getattr(tokenizer, "model_max_length", 512) or 512
    positions = getattr(config, "max_position_embeddings", None) or limit
    return int(min(limit, positions, 4096))


def _label_scores(labels: list[str], probs: list[float]) -> dict:
    best = max(range(len(labels)), key=probs.__getitem__)
    return {"label": labels[best], "score": probs[best], "scores": dict(zip(labels, probs))}


class HFTextClassifierRunner(Runner):
    """Any AutoModelForSequenceClassification, from a hub id or a save_pretrained directory."""

    preload_modules = ("torch", "transformers")

    @classmethod
    def check_spec(cls, spec) -> None:
        check_location(spec, spec.source_location)
        config = hf_config(spec, spec.source_location)
        architectures = getattr(config, "architectures", None) or []
        if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ConfigError(
                f"model {spec.name!r}: {spec.source_location!r} is a {', '.join(architectures)}, not a sequence "
                f"classifier; for embeddings use task = \"embedding\" with a sentence-transformers source")

    def load(self) -> None:
        path = resolve_location(self.spec.source_location)
        _offline_if_local(path)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = self.place(AutoModelForSequenceClassification.from_pretrained(path))
        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.max_length = max_text_length(self.tokenizer, config)

    def preprocess(self, item: Any) -> str:
        return check_text(item)

    def forward(self, batch: list[str]):
        encoded = self.tokenizer(batch, padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
        return self.model(**encoded).logits.float().softmax(-1)

    def postprocess(self, outputs, n: int) -> list[dict]:
        return [_label_scores(self.labels, row) for row in outputs.cpu().tolist()]
