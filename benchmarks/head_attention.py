"""The head's visual-guided attention with linear1 per (image, class) pair (the plain layer,
``plain = True``) and split into per-class and per-image products (``VisualGuidedAttention``'s
separable tail), at B images and C = 6 .. 30 classes, feed-forward width 2048.

Modes: ``infer`` (eval forward under no_grad: the evaluate stage), ``eval`` (forward +
backward), ``train0`` (training with dropout 0: split) and ``train`` (training with dropout
0.1, the finetuning's: dropout2's elementwise mask makes every pair's linear1 input its own,
so both columns run the plain layer and their ratio is the noise floor). Gradients flow to
every attention parameter and to the class features, as in a task's first training phase.
Prints ms per call (best of ``--repeats``, the two paths alternating) and the max abs
difference of their outputs (same seed, so same dropout masks).

``--finetune``: instead, the demo's task 5 on synthetic tensors of its shapes (an untrained
recall-tiny text tower, 30 classes in 5 tasks, a replay pool of 1024 embeddings per class):
seconds of ``train_with_head`` (``--epochs`` prompt epochs + 1 balanced epoch, the demo runs
20 + 2) and of the classifier's predictions on 1200 test embeddings (the evaluate stage's
work; 20 Monte-Carlo samples), plain and split.

    python benchmarks/head_attention.py [--dims 128 512] [--batch 128] [--threads 1]
    python benchmarks/head_attention.py --finetune [--epochs 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipeline.method.head import VisualGuidedAttention


def timed(attention: VisualGuidedAttention, features: torch.Tensor, images: torch.Tensor, class_task: torch.Tensor,
          repeats: int, backward: bool) -> list[float]:
    """Best seconds of the plain and the split path, alternating so that other jobs' load on
    a shared machine falls on both alike. With one thread: CPU seconds (``process_time``),
    which a loaded machine inflates far less than wall seconds."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for index, plain in enumerate((True, False)):
            attention.plain = plain
            start = clock()
            with torch.set_grad_enabled(backward):
                out = attention(features, images, class_task)
                if backward:
                    out.square().sum().backward()
            best[index] = min(best[index], clock() - start)
    return best


def finetune(epochs: int) -> None:
    from pipeline.clip.backbone import create_untrained, open_clip
    from pipeline.config import HeadConfig, PromptConfig
    from pipeline.method.classifier import Classifier
    from pipeline.method.head import ProbabilisticHead, inference_noise, text_statistics, train_with_head
    from pipeline.method.prompts import PromptLearner

    torch.manual_seed(0)
    model = create_untrained("recall-tiny").eval().requires_grad_(False)
    dim, classes, per_task, templates = model.text_projection.shape[1], 30, 6, 5
    ids = list(range(classes))
    centres = F.normalize(torch.randn(classes, dim), dim=-1)
    template_features = F.normalize(centres[:, None] + 0.05 * torch.randn(classes, templates, dim), dim=-1)
    replay = F.normalize(centres.repeat_interleave(1024, 0) + 0.2 * torch.randn(classes * 1024, dim), dim=-1)
    labels = torch.arange(classes).repeat_interleave(1024)
    test = F.normalize(centres.repeat_interleave(40, 0) + 0.2 * torch.randn(classes * 40, dim), dim=-1)
    class_task = torch.arange(classes) // per_task + 1
    mean, variance = text_statistics(template_features)
    prompt = PromptConfig(n_ctx=1, lr=0.05, epochs=epochs, batch_size=128, per_class_per_epoch=128)
    head_cfg = HeadConfig(mc_train=20, mc_test=20, kl_weight=0.001, lang_weight=15.0, prior="standard",
                          balanced_finetune_epochs=1, balanced_finetune_lr_scale=0.1)
    print(f"task 5 of the demo's shapes: d={dim}, {classes} classes, {len(replay)} replay embeddings, "
          f"{epochs} + 1 epochs, {torch.get_num_threads()} threads; {'CPU' if torch.get_num_threads() == 1 else 'wall'} seconds")
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    for plain in (True, False):
        torch.manual_seed(0)  # the head's initial weights
        learner = PromptLearner(model, open_clip().get_tokenizer("recall-tiny"), [f"class {i}" for i in ids], centres, class_ids=ids)
        learner.reset(0)
        head = ProbabilisticHead(dim)
        for task in range(1, 6):
            head.add_task(mean[: task * per_task], variance[: task * per_task], seed=task)
        head.attention.plain = plain
        start = clock()
        losses = train_with_head(learner, head, replay, labels, ids, class_task, 5, mean, template_features[-per_task:],
                                 prompt, head_cfg, 100.0, seed=5)
        trained = clock() - start
        with torch.no_grad():
            classifier = Classifier(ids, learner.features(torch.tensor(ids)), 100.0, head, class_task, inference_noise(0, ids, 20, dim))
        start = clock()
        probs = classifier.predict(test)["probs"]
        predicted = clock() - start
        print(f"{'plain' if plain else 'split'}: train_with_head {trained:6.1f} s, predict {predicted:5.2f} s, "
              f"final loss {losses[-1]:.6f}, mean max prob {probs.max(dim=-1).values.mean():.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512], help="128: the demo's width; 512: CLIP ViT-B's")
    parser.add_argument("--classes", type=int, nargs="+", default=[6, 12, 18, 24, 30])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ff-width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="1: CPU seconds instead of wall seconds")
    parser.add_argument("--modes", nargs="+", default=["infer", "eval", "train0", "train"], choices=["infer", "eval", "train0", "train"])
    parser.add_argument("--finetune", action="store_true", help="time task 5 of the demo's shapes instead")
    parser.add_argument("--epochs", type=int, default=2, help="with --finetune: prompt epochs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.finetune:
        return finetune(args.epochs)
    names = {"infer": "eval, forward only", "eval": "eval", "train0": "train, dropout 0", "train": "train, dropout 0.1"}
    clock = "CPU" if torch.get_num_threads() == 1 else "wall"
    print(f"B={args.batch}, ff {args.ff_width}, {torch.get_num_threads()} threads; {clock} ms per forward+backward (forward only: infer), best of {args.repeats}")
    print(f"{'mode':>19} {'d':>4} {'C':>3} {'plain':>9} {'split':>9} {'speed-up':>8} {'max |diff|':>10}")
    for dim in args.dims:
        for mode in args.modes:
            torch.manual_seed(0)
            attention = VisualGuidedAttention(dim, args.ff_width, dropout=0.0 if mode == "train0" else 0.1)
            attention.train(mode.startswith("train"))
            for classes in args.classes:
                features = F.normalize(torch.randn(classes, dim), dim=-1).requires_grad_(True)
                images = F.normalize(torch.randn(args.batch, dim), dim=-1)
                class_task = torch.arange(classes) // 6 + 1
                outputs = []
                for plain in (True, False):
                    attention.plain = plain
                    torch.manual_seed(1)
                    with torch.no_grad():
                        outputs.append(attention(features, images, class_task))
                times = timed(attention, features, images, class_task, args.repeats, mode != "infer")
                diff = (outputs[0] - outputs[1]).abs().max().item()
                print(f"{names[mode]:>19} {dim:4d} {classes:3d} {1000 * times[0]:9.1f} {1000 * times[1]:9.1f} "
                      f"{times[0] / times[1]:7.2f}x {diff:10.1e}")


if __name__ == "__main__":
    main()
