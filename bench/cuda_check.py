"""Each model on CUDA against the same runner on the CPU: do the outputs match?

    .venv/bin/python bench/cuda_check.py [--models minilm,sentiment,efficientnet-lite0] [--out FILE]

Where torch sees a GPU: each model's results for a few texts, or scikit-image's cat and coffee
photos, from its runner on the CPU, on CUDA in float32, and on CUDA with ``half = true`` (float16),
each loaded through the registry as a worker loads it. Per model and variant it gives the largest
difference over every number in the results, whether every label agrees (and so every order), and
for embeddings the lowest cosine similarity to the CPU's. Exits 2 where torch sees no GPU.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

TEXTS = ["a dog runs in the park", "the invoice is overdue by thirty days",
         "review number 7: the product arrived quickly and works as described, mostly",
         "I am unhappy with it, poor quality"]


def compare(a: Any, b: Any) -> tuple[float, bool]:
    """(largest |a - b| over the numbers in two results, whether everything else is equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return math.inf, False
        parts = [compare(a[k], b[k]) for k in a]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf, False
        parts = [compare(x, y) for x, y in zip(a, b)]
    elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
        return abs(a - b), True
    else:
        return 0.0, a == b
    return max((p[0] for p in parts), default=0.0), all(p[1] for p in parts)


def cosine(u: list[float], v: list[float]) -> float:
    return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))


def inputs(input_kind: str) -> list:
    if input_kind == "text":
        return TEXTS
    from PIL import Image
    from skimage import data

    out = []
    for name in ("chelsea", "coffee"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buf, "PNG")
        out.append({"image_b64": base64.b64encode(buf.getvalue()).decode()})
    return out


def check(spec, threads: int) -> dict:
    import torch

    from models import build_runner, runner_class
    from models.base import set_threads

    runner_class(spec).preload()
    set_threads(threads)
    items = inputs(spec.input_kind)

    def run(device: str, half: bool):
        runner = build_runner(dataclasses.replace(spec, half=half), device=device)
        runner.timed_load()
        out = runner(items)
        del runner
        torch.cuda.empty_cache()
        return out

    cpu = run("cpu", False)
    report = {}
    for name, half in (("cuda_fp32", False), ("cuda_fp16", True)):
        out = run("cuda", half)
        diff, agree = compare(cpu, out)
        report[name] = {"max_abs_diff": diff, "labels_agree": agree}
        if spec.task == "embedding":
            report[name]["min_cosine"] = min(cosine(x["embedding"], y["embedding"]) for x, y in zip(cpu, out))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,sentiment,efficientnet-lite0")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the CPU runs")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/cuda_check.py: torch sees no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        sys.exit(2)
    from models.registry import Registry

    registry = Registry.from_file(str(ROOT / "models.toml"))
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
              "models": {}}
    for name in args.models.split(","):
        report["models"][name] = check(registry.get(name), args.threads)
        print(name, json.dumps(report["models"][name]), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
