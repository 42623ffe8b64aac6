"""Calibration when class clusters overlap, as real CLIP embeddings' do (issue: `clap`'s ECE
far above `cgil`'s on real photos, while the separable demo world shows no difference).

Embeddings: for each class, ``norm(w_c + sigma * noise)`` around its zero-shot text feature
``w_c`` (the demo backbone's), with ``sigma`` set so that a nearest-text classifier is right
about half the time. One task of all classes; each method trains at the same budget on what
it trains on (cgil, clap: fresh draws from per-class VAEs fitted on the train embeddings;
joint: the real train embeddings) and is scored on held-out embeddings.

    python -m benchmarks.calibration_overlap [--classes 12] [--sigma 0.5] [--epochs 10]
        [--variant name=override ...]

Run `dvc repro embed-text@all` first (it needs the demo backbone and its text features).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipeline import config
from pipeline.clip import backbone as backbone_lib
from pipeline.clip import embedding as embed_lib
from pipeline.method.classifier import Classifier
from pipeline.method.generators import fit_bank
from pipeline.method.head import ProbabilisticHead, inference_noise, predictive_summary, text_statistics, train_with_head
from pipeline.method.metrics import calibration
from pipeline.method.prompts import PromptLearner, TrainingSet, real_training_set, train_prompts
from pipeline.method.replay import epoch_seed


def overlapping_embeddings(w: torch.Tensor, per_class: int, sigma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = w.repeat_interleave(per_class, dim=0) + sigma * torch.randn(len(w) * per_class, w.shape[1], generator=g)
    return F.normalize(x, dim=-1), torch.arange(len(w)).repeat_interleave(per_class)


def score(classifier: Classifier, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    probs = predictive_summary(classifier.sample_logits(x))["probs"]
    return {"accuracy": (probs.argmax(1) == y).float().mean().item(), "ece": calibration(probs, y)["ece"],
            "confidence": probs.max(1).values.mean().item()}


def run(cfg, backbone, text, x_train, y_train, x_test, y_test, method: str, seed: int) -> dict[str, float]:
    classes = list(range(len(text["class_features"])))
    names = [f"class {c}" for c in classes]
    learner = PromptLearner(backbone.model, backbone.tokenizer, n_ctx=1, feature_dim=text["class_features"].shape[1])
    learner.reset(seed)
    learner.add_classes(classes, names, text["class_features"], seed=seed)
    logit_scale = backbone.model.logit_scale.exp().item()
    settings = cfg.method.prompt
    if method == "joint":
        training = real_training_set(x_train, y_train, classes, settings.per_class_per_epoch, seed, "real")
    else:
        bank = fit_bank({c: x_train[y_train == c] for c in classes}, cfg.generator, seed=seed)
        training = TrainingSet(classes, lambda e: _shuffled(bank.sample(settings.per_class_per_epoch, epoch_seed(seed, 1, e)), e), "vae")
    if method == "clap":
        h = cfg.method.head
        head = ProbabilisticHead(learner.class_features.shape[1], std_floor=h.std_floor, ff_width=h.attention_ff_width,
                                 dropout=h.attention_dropout, zero_init_attention=h.zero_init_attention, encoder_bias=h.encoder_bias)
        templates = text["template_features"].float()
        mean, variance = text_statistics(templates)
        head.add_task(mean, variance, seed=seed)
        class_task = torch.ones(len(classes), dtype=torch.long)
        train_with_head(learner, head, training, classes, class_task, 1, templates, settings, h, logit_scale, seed)
    else:
        train_prompts(learner, training, classes, settings, logit_scale)
    with torch.no_grad():
        features = learner.features(torch.tensor(classes))
    classifier = Classifier(classes, features, logit_scale)
    if method == "clap":
        classifier.head, classifier.class_task = head, class_task
        classifier.noise = inference_noise(seed, classes, cfg.method.head.mc_test, features.shape[1])
    return score(classifier, x_test, y_test)


def _shuffled(sample: tuple[torch.Tensor, torch.Tensor], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = sample
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
    return x[order], y[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=["cgil", "clap", "joint"])
    parser.add_argument("--variant", action="append", default=[], help="label=override[,override]: clap with these overrides")
    args = parser.parse_args()
    base = [f"schedule.epochs={args.epochs}", f"seed={args.seed}"]
    cfg = config.load(None, base)
    backbone = backbone_lib.load_backbone(cfg.paths.backbone)
    text = embed_lib.load_text_features(f"{cfg.paths.embeddings}/text.safetensors", backbone.sha256)
    text = {k: v[: args.classes] for k, v in text.items() if k in ("class_features", "template_features")}
    w = text["class_features"].float()
    x_train, y_train = overlapping_embeddings(w, args.per_class, args.sigma, args.seed)
    x_test, y_test = overlapping_embeddings(w, args.per_class // 2, args.sigma, args.seed + 1)
    zero = ((x_test @ w.T).argmax(1) == y_test).float().mean().item()
    print(f"{args.classes} classes, sigma {args.sigma}: zero-shot accuracy {100 * zero:.1f}%")
    runs = [(m, cfg) for m in args.methods]
    runs += [(f"clap {label}", config.load(None, base + overrides.split(","))) for label, overrides in
             (v.split("=", 1) for v in args.variant)]
    print("| method | accuracy | ECE | mean confidence | seconds |\n|---|---|---|---|---|")
    for label, run_cfg in runs:
        start = time.perf_counter()
        figures = run(run_cfg, backbone, text, x_train, y_train, x_test, y_test, label.split()[0], args.seed)
        print(f"| {label} | {100 * figures['accuracy']:.1f} | {100 * figures['ece']:.1f} | "
              f"{100 * figures['confidence']:.1f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
