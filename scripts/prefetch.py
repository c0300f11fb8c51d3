"""make prefetch: download every configured model's weights into the local caches.

Run it where a network (a model hub, download.pytorch.org) is reachable, with the same
TORCH_HOME / HF_HOME the servers will use, then copy those folders to an offline
server (or run it in the image build). Loads each model once through the same code a
worker uses, so what it fetched is exactly what a worker will need. Exit 1 if any
model could not be loaded.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import settings  # noqa: E402
from models import build_runner, runner_class  # noqa: E402
from models.registry import Registry  # noqa: E402


def main() -> int:
    import torch

    registry = Registry.from_file(settings.MODELS_FILE, settings.MODELS or None)
    failed = []
    for spec in registry:
        start = time.perf_counter()
        try:
            runner_class(spec).check_spec(spec)
            build_runner(spec, device="cpu").load()
        except Exception as exc:
            failed.append(spec.name)
            print(f"FAIL  {spec.name:<22} {type(exc).__name__}: {exc}", flush=True)
        else:
            print(f"ok    {spec.name:<22} {spec.source}  ({time.perf_counter() - start:.1f}s)", flush=True)
    from huggingface_hub import constants

    print(f"\ntorch cache: {torch.hub.get_dir()}\nHugging Face cache: {constants.HF_HUB_CACHE}")
    local = [f"{spec.name}: {path}" for spec in registry
             for path in (spec.weights, spec.source_location) if path and path.startswith(("/", "./", "~"))]
    if local:
        print("local files (not in the caches; copy them to the same paths):\n  " + "\n  ".join(local))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
