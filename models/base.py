"""The runner contract: load / preprocess / forward / postprocess.

Only ``forward`` touches the device, under ``torch.inference_mode``; the rest
is plain Python. ``run`` checks that one result comes back per input.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from models.registry import ModelSpec

log = logging.getLogger(__name__)


def pick_device(wanted: str) -> str:
    """``auto`` is CUDA when torch sees a GPU, else CPU."""
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {wanted!r} asked for but torch sees no CUDA device")
    return wanted


def set_threads(threads: int) -> int:
    """Pin this process's torch intra-op threads so workers do not oversubscribe cores."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable once, before any parallel work
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return threads


#: glibc's ``mallopt`` parameters (malloc.h) and what :func:`keep_freed_memory` sets them to.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -3, -4, -8
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
_TRIM_THRESHOLD = 2 ** 31 - 1
_TOP_PAD = 64 * 1024 * 1024  # a thread's arena grows in heaps of 64 MiB; with less, an empty one is unmapped
_MMAP_MAX = 0  # no block is mapped by itself (above the threshold too), where the heap can hold it
_ARENA_MAX = 1  # threads made after the call share the main arena, whose heap has no 64 MiB limit


def keep_freed_memory() -> bool:
    """Keep memory torch frees for its next batch instead of handing it back to the system.

    glibc returns large freed blocks (and the top of the heap past a threshold it moves as it
    goes) to the kernel, and a batch's tensors then fault every page in again: about 12,000 page
    faults per MiniLM batch of 64 on the benchmark's machine, a tenth of the pool's time in the
    kernel. A thread (the urgent lane's batch thread) allocates from an arena of its own in heaps
    of 64 MiB, and an emptied heap is unmapped unless the top pad covers a whole one:
    efficientnet-lite0's batches of 4 faulted about 30,000 pages each there and ran 26.2 images/s
    against 36.2 in the main thread. With blocks up to 32 MiB kept on the heap, the heap never
    trimmed and a top pad of 64 MiB: no faults in either, and the model ran 6 to 18% more texts a
    second (MiniLM), and as fast in the thread as in the main thread (efficientnet-lite0, 39.4
    against 38.2 images/s).

    Blocks above 32 MiB (glibc's largest threshold) were still mapped afresh each time:
    efficientnet-lite0's batches of 8 faulted 13,700 to 27,000 pages each, of 16 up to 70,000 in
    the main thread and 114,000 in a thread (28.9 images/s there). So no block is mapped by itself,
    and threads started after this call share the main arena, which grows without a per-heap
    limit (a thread's own heap cannot hold a block above 64 MiB, and glibc maps those whatever the
    limit): batches of 8 and 16 then faulted almost nothing, in a thread too (43.4 and 39.2
    images/s). Call it before the process starts its threads, and before it forks: a thread's own
    arena outlives a fork, and the child's threads allocate from it whatever the limit.

    The process keeps its peak memory (which it reaches again on every full batch anyway). Returns
    False where there is no glibc (musl, macOS): nothing changes there.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD),
        (_M_MMAP_MAX, _MMAP_MAX), (_M_ARENA_MAX, _ARENA_MAX)))


def check_state_dict(spec: ModelSpec, path: str, build) -> None:
    """Read a state-dict file and compare it, key by key and shape by shape, with the
    architecture ``build()`` makes on torch's meta device (no memory, no compute)."""
    import torch

    from models.exceptions import ConfigError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model {spec.name!r}: cannot read state dict {path}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"model {spec.name!r}: {path} holds a {type(state).__name__}, not a state dict")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} != {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or extra or wrong:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
            f"shape {wrong[:2]}" if wrong else ""]))
        raise ConfigError(f"model {spec.name!r}: {path} does not fit {spec.source} ({detail}); for another "
                          f"class count set options.num_classes or options.categories")


class Runner:
    """Base class: subclasses implement the four steps."""

    def __init__(self, spec: ModelSpec, device: str = "cpu"):
        self.spec = spec
        self.device = device
        #: half precision only where it pays: on a GPU, when the entry asks for it
        self.half = bool(spec.half) and device.startswith("cuda")
        self.load_seconds: float | None = None

    @property
    def dtype(self):
        import torch

        return torch.float16 if self.half else torch.float32

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        """Cheap checks at worker start (files exist, names are known); raise ConfigError."""

    #: modules worth importing in the worker's main process before the pool forks
    preload_modules: tuple[str, ...] = ("torch",)

    @classmethod
    def preload(cls) -> None:
        """Import (never load) heavy libraries so forked pool processes start warm."""
        import importlib

        for name in cls.preload_modules:
            importlib.import_module(name)

    def load(self) -> None:
        raise NotImplementedError("must load the model onto self.device")

    def place(self, model):
        """Move a model to this runner's device (and dtype) once, in eval mode."""
        model = model.to(self.device)
        if self.half:
            model = model.half()
        return model.eval()

    def preprocess(self, item: Any) -> Any:
        """One input as sent by the client -> what forward takes; raises InvalidInput."""
        raise NotImplementedError("must implement preprocess(item)")

    def forward(self, batch: list[Any]) -> Any:
        raise NotImplementedError("must implement forward(batch)")

    def postprocess(self, outputs: Any, n: int) -> list[Any]:
        """Model outputs for n items -> n plain JSON-able results."""
        raise NotImplementedError("must implement postprocess(outputs, n)")

    def timed_load(self) -> float:
        start = time.perf_counter()
        self.load()
        self.load_seconds = time.perf_counter() - start
        log.info("loaded model %s on %s in %.2fs", self.spec.name, self.device, self.load_seconds)
        return self.load_seconds

    def run(self, prepared: list[Any]) -> list[Any]:
        """Forward and postprocess already-preprocessed items as one batch."""
        import torch

        with torch.inference_mode():
            outputs = self.forward(prepared)
        results = self.postprocess(outputs, len(prepared))
        if len(results) != len(prepared):
            raise RuntimeError(
                f"runner {type(self).__name__} returned {len(results)} results for {len(prepared)} inputs")
        return results

    def __call__(self, items: list[Any]) -> list[Any]:
        """Convenience: preprocess, forward and postprocess a list of raw inputs."""
        return self.run([self.preprocess(item) for item in items])
