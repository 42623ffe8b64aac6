"""Embedding throughput: end to end (read, decode, preprocess, encode) against
``encode_image`` alone on tensors already in memory, measured in the same run.

The ratio shows what data loading costs. Runs on the prepared dataset and backbone of the
current params (the demo by default): run `dvc repro` first.

    python benchmarks/embed_throughput.py [--split test] [--batch-size 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipeline import config
from pipeline.clip.backbone import load_backbone
from pipeline.clip.embedding import ImageDataset, autocast_for, collate_images, embed_split, resolve_device
from pipeline.data import load_prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = config.load(args.params)
    device = resolve_device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = load_backbone(cfg.paths.backbone, device=device)
    prepared = load_prepared(cfg.paths.prepared)
    samples = prepared.samples(args.split)
    print(f"device {device}, backbone {backbone.info['arch']}, {len(samples)} {args.split} images, "
          f"batch {args.batch_size}, {args.workers} loader workers, {torch.get_num_threads()} threads")

    # End to end: the embed step itself, into a throw-away folder.
    end_to_end = []
    for _ in range(args.repeats):
        out = Path(tempfile.mkdtemp()) / "emb"
        start = time.perf_counter()
        embed_split(prepared, args.split, backbone, out, batch_size=args.batch_size,
                    num_workers=args.workers, chunk_size=8192, progress=False)
        end_to_end.append(len(samples) / (time.perf_counter() - start))
        shutil.rmtree(out.parent)

    # Model only: the same images, decoded and preprocessed beforehand.
    dataset = ImageDataset(prepared, samples, backbone.preprocess)
    images, _, _ = collate_images([dataset[i] for i in range(len(dataset))])
    batches = [images[i : i + args.batch_size].to(device) for i in range(0, len(images), args.batch_size)]
    model_only = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            for batch in batches:
                with autocast_for(device, "auto"):
                    backbone.model.encode_image(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            model_only.append(len(samples) / (time.perf_counter() - start))

    best_e2e, best_model = max(end_to_end), max(model_only)
    print(f"end to end        : {best_e2e:10.1f} images/s (best of {args.repeats})")
    print(f"encode_image only : {best_model:10.1f} images/s (best of {args.repeats})")
    print(f"ratio model-only / end-to-end: {best_model / best_e2e:.2f}x "
          f"(loading takes {100 * (1 - best_e2e / best_model):.0f}% of the end-to-end time)")


if __name__ == "__main__":
    main()
