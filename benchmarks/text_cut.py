"""Prompt features with the sequence cut after the longest end-of-text token, against the
padded 77-token context, on a ViT-B-16-sized text tower (random weights: the cut's
exactness does not depend on them) for 100 classes. Prints the max abs difference and the
speed-up of forward + backward, measured in one run.

    python benchmarks/text_cut.py [--arch ViT-B-16] [--classes 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.clip.backbone import create_untrained, open_clip
from pipeline.method.prompts import PromptLearner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_untrained(args.arch).eval().requires_grad_(False)
    tokenizer = open_clip().get_tokenizer(args.arch)
    # Class names of varied length, like a real benchmark's.
    words = ["red", "golden", "retriever", "sports", "car", "maple", "tree", "aquarium", "fish", "lawn", "mower"]
    names = [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 4)) for i in range(args.classes)]
    dim = model.text_projection.shape[1]
    learner = PromptLearner(model, tokenizer, names, torch.nn.functional.normalize(torch.randn(args.classes, dim), dim=-1), n_ctx=1)
    learner.reset(0)
    learner.eval()
    ids = torch.arange(args.classes)
    print(f"{args.arch} text tower, {args.classes} classes, context {learner.tokens.shape[1]}, "
          f"longest prompt {int(learner.eot.max()) + 1} tokens, {torch.get_num_threads()} threads")
    with torch.no_grad():
        cut, full = learner.features(ids, cut=True), learner.features(ids, cut=False)
    print(f"max abs difference of the features: {(cut - full).abs().max().item():.2e}")

    def timed(flag: bool) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            learner.features(ids, cut=flag).sum().backward()
            best = min(best, time.perf_counter() - start)
        return best

    t_cut, t_full = timed(True), timed(False)
    print(f"forward+backward, cut   : {1000 * t_cut:8.1f} ms (best of {args.repeats})")
    print(f"forward+backward, padded: {1000 * t_full:8.1f} ms")
    print(f"speed-up: {t_full / t_cut:.1f}x")


if __name__ == "__main__":
    main()
