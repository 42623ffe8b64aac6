"""How far each generator's samples spread and overlap, against the real embeddings: the
cosine to the class's mean and the accuracy of a nearest-class-mean rule, on the current
params' train embeddings (run `dvc repro embed@train embed@test` first). Replay that is far
easier to separate than the real test images makes `clap` over-confident (docs/benchmarks.md,
"Calibration on real images").

    python -m benchmarks.generator_spread [--per-class 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipeline import config
from pipeline.clip import backbone as backbone_lib
from pipeline.clip.embedding import load_embeddings
from pipeline.config import GaussGenerator
from pipeline.method.generators import fit_bank


def spread(x: torch.Tensor, y: torch.Tensor, means: torch.Tensor) -> tuple[float, float]:
    """Mean cosine to the own class's mean direction, and nearest-mean accuracy."""
    x = F.normalize(x.float(), dim=-1)
    return (x * means[y]).sum(-1).mean().item(), ((x @ means.T).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = config.load(None, [])
    sha = backbone_lib.load_backbone(cfg.paths.backbone).sha256
    train = load_embeddings(f"{cfg.paths.embeddings}/train", sha)
    test = load_embeddings(f"{cfg.paths.embeddings}/test", sha)
    classes = sorted(set(train["labels"].tolist()))
    index = {c: i for i, c in enumerate(classes)}
    data = {c: train["embeddings"][train["labels"] == c].float() for c in classes}
    means = F.normalize(torch.stack([F.normalize(data[c], dim=-1).mean(0) for c in classes]), dim=-1)

    def relabel(labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor([index[int(c)] for c in labels])

    rows = [("real train embeddings", *spread(train["embeddings"], relabel(train["labels"]), means), None),
            ("real test embeddings", *spread(test["embeddings"], relabel(test["labels"]), means), None)]
    generators = [(f"{cfg.generator.name}, observation_noise={noise}", cfg.generator.model_copy(update={"observation_noise": noise}))
                  for noise in ("none", "matched_variance", "matched_covariance")] if cfg.generator.name == "vae" else []
    generators.append(("diagonal Gaussian", GaussGenerator(name="gauss")))
    for label, settings in generators:
        start = time.perf_counter()
        bank = fit_bank(data, settings, seed=args.seed)
        seconds = time.perf_counter() - start
        x, y = bank.sample(args.per_class, seed=args.seed + 1)
        rows.append((label, *spread(x, relabel(y), means), seconds))
    print(f"{len(classes)} classes, {args.per_class} samples per class and generator\n")
    print("| samples | cosine to own class mean | nearest-class-mean accuracy | fit seconds |\n| --- | --- | --- | --- |")
    for label, cosine, accuracy, seconds in rows:
        print(f"| {label} | {cosine:.4f} | {100 * accuracy:.1f}% | {'' if seconds is None else f'{seconds:.1f}'} |")


if __name__ == "__main__":
    main()
