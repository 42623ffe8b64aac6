"""The probabilistic head (design, section E) on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.method.classifier import Classifier, head_state, load_head
from pipeline.method.head import (
    HeadOutput,
    ProbabilisticHead,
    inference_noise,
    kl_to_prior,
    language_regulariser,
    predictive_summary,
    text_statistics,
)

DIM = 8


def _trained_like_head(n_tasks: int = 2, seed: int = 0) -> ProbabilisticHead:
    """A head with every weight random, as after training."""
    torch.manual_seed(seed)
    head = ProbabilisticHead(DIM)
    for _ in range(n_tasks):
        head.add_task(torch.randn(3, DIM), torch.rand(3, DIM) * 0.1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    head.eval()
    return head


def _classes(n: int = 5):
    features = F.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(1)), dim=-1)
    class_task = torch.tensor([1, 1, 1, 2, 2])[:n]
    return list(range(10, 10 + n)), features, class_task


def test_attention_is_one_decoder_layer_over_the_image_alone():
    head = _trained_like_head()
    _, features, class_task = _classes()
    images = torch.randn(4, DIM)
    ours = head.attention(features, images, class_task)
    layer = head.attention.layer
    mask = class_task[:, None] != class_task[None, :]
    reference = torch.stack([
        layer(features[None], image[None, None], tgt_mask=mask)[0] for image in images
    ])
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_attention_rewrite_is_the_plain_layer_forward_and_backward(training):
    """The per-class + per-image linear1 (inference; training with dropout 0) against the
    plain decoder layer run on each image alone: outputs and the gradients of every parameter, the class
    features and the images. 60 images of 5 classes span several chunks, the last partial."""
    torch.manual_seed(0)
    head = ProbabilisticHead(DIM, dropout=0.0 if training else 0.1)
    with torch.no_grad():
        for p in head.attention.parameters():
            p.add_(0.3 * torch.randn_like(p))  # norm2's weight and bias away from 1 and 0 too
    attention = head.attention.train(training)
    layer = attention.layer
    assert attention.state_dict().keys() == {f"layer.{k}" for k in torch.nn.TransformerDecoderLayer(DIM, 1).state_dict()}
    _, features, class_task = _classes()
    features = (features + 0.5).requires_grad_(True)  # means away from 0: the centring matters
    images = (torch.randn(60, DIM) - 0.3).requires_grad_(True)
    weights = torch.randn(60, 5, DIM)
    mask = class_task[:, None] != class_task[None, :]

    def outputs_and_grads(run):
        for t in [features, images, *attention.parameters()]:
            t.grad = None
        out = run()
        (weights * out).sum().backward()
        return [out.detach()] + [t.grad.clone() for t in [features, images, *attention.parameters()]]

    ours = outputs_and_grads(lambda: attention(features, images, class_task))
    # Each image its own sequence of the batch, with one key: the plain layer per image.
    plain = outputs_and_grads(lambda: layer(features.expand(len(images), -1, -1), images[:, None], tgt_mask=mask))
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_prediction_does_not_depend_on_the_rest_of_its_batch():
    head = _trained_like_head()
    ids, features, class_task = _classes()
    classifier = Classifier(ids, features, 20.0, head, class_task, inference_noise(7, ids, 6, DIM))
    images = torch.randn(12, DIM)
    together = classifier.predict(images)["probs"]
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    shuffled = torch.cat([classifier.predict(images[chunk])["probs"] for chunk in order.split(5)])
    alone = torch.cat([classifier.predict(images[i : i + 1])["probs"] for i in range(12)])
    assert torch.allclose(shuffled, together[order], atol=1e-6)
    assert torch.allclose(alone, together, atol=1e-6)
    # The Monte-Carlo samples do move the prediction: they are part of what is checked.
    deterministic = Classifier(ids, features, 20.0, head, class_task, torch.zeros(1, 5, DIM)).predict(images)["probs"]
    assert not torch.allclose(deterministic, together, atol=1e-3)


def test_monte_carlo_estimates_are_reproducible_from_the_seed():
    ids = [3, 8, 11]
    assert torch.equal(inference_noise(5, ids, 4, DIM), inference_noise(5, ids, 4, DIM))
    assert not torch.equal(inference_noise(5, ids, 4, DIM), inference_noise(6, ids, 4, DIM))
    # A class's noise depends on the class, not on which other classes are seen.
    assert torch.equal(inference_noise(5, [8, 42], 4, DIM)[:, 0], inference_noise(5, ids, 4, DIM)[:, 1])


def test_logits_are_those_of_the_normalised_sampled_features():
    head = _trained_like_head()
    ids, features, class_task = _classes()
    images = torch.randn(6, DIM)
    noise = torch.randn(3, len(ids), DIM)
    out = head(images, features, class_task, 12.0, noise)
    e = F.normalize(images, dim=-1)
    base = features[None] + head.attention(features, e, class_task)
    mu, sigma = head.distribution(base, class_task)
    sampled = F.normalize(base[None] + mu[None] + sigma[None] * noise[:, None], dim=-1)  # [M, B, C, d]
    assert torch.allclose(out.logits, 12.0 * torch.einsum("bd,mbcd->mbc", e, sampled), atol=1e-5)
    assert torch.allclose(out.z_mean, (mu[None] + sigma[None] * noise[:, None]).mean(dim=(0, 1)), atol=1e-6)


def test_encoders_start_from_the_template_mean_and_variance():
    # Two classes, two templates, d = 2: per-dimension template variance by hand, unbiased
    # as the reference's Tensor.var(1): ((1-2)^2 + (3-2)^2) / (2 - 1) = 2.
    templates = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [0.0, 4.0]]])
    mean, variance = text_statistics(templates)
    assert torch.equal(mean, torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    assert torch.equal(variance, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    # One template has no spread (not NaN).
    assert torch.equal(text_statistics(templates[:, :1])[1], torch.zeros(2, 2))
    head = ProbabilisticHead(2, std_floor=0.001)
    head.add_task(mean, variance)
    encoder = head.encoders[0]
    # A = T^T T / d, B = V^T V / d with V the variance (not the standard deviation).
    assert torch.allclose(encoder.mean.weight, torch.tensor([[2.0, 0.0], [0.0, 4.5]]))
    assert torch.allclose(encoder.std.weight, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(encoder.mean.bias, torch.zeros(2))
    # template_std: sigma at zero input is the mean template standard deviation over the
    # classes, (sqrt(2) + 0) / 2 per dimension here.
    _, sigma = encoder(torch.zeros(1, 2), head.std_floor)
    assert torch.allclose(sigma, torch.full((1, 2), 2.0**0.5 / 2), atol=1e-5)
    # pytorch_default: nn.Linear's uniform bias, drawn from the given seed.
    defaults = [ProbabilisticHead(2, encoder_bias="pytorch_default") for _ in range(2)]
    for head, seed in zip(defaults, (3, 3)):
        head.add_task(mean, variance, seed=seed)
    bias = defaults[0].encoders[0].std.bias
    assert torch.equal(bias, defaults[1].encoders[0].std.bias)
    assert bias.abs().max() <= 1 / math.sqrt(2) and not torch.equal(bias, torch.zeros(2))


def test_attention_is_the_reference_layer_and_drops_out_only_in_training():
    head = ProbabilisticHead(DIM)
    layer = head.attention.layer
    assert layer.linear1.out_features == 2048 and layer.dropout.p == 0.1
    assert torch.equal(layer.norm3.weight, torch.ones(DIM))  # no zero-initialised output
    _, features, class_task = _classes()
    images = torch.randn(4, DIM)
    head.eval()
    assert torch.equal(head.attention(features, images, class_task), head.attention(features, images, class_task))
    head.train()
    torch.manual_seed(0)
    first = head.attention(features, images, class_task)
    assert not torch.allclose(first, head.attention(features, images, class_task))


def test_one_sample_without_spread_reduces_to_the_deterministic_learner():
    ids, features, class_task = _classes()
    torch.manual_seed(0)
    # The attention's zero-initialised output scale makes v_c = 0 (the ablation's start).
    head = ProbabilisticHead(DIM, std_floor=0.0, zero_init_attention=True)
    for _ in range(2):
        head.add_task(torch.zeros(3, DIM), torch.zeros(3, DIM))
        with torch.no_grad():
            # mean adapter at zero, std adapter at softplus(-1e4) = 0: sigma is exactly 0.
            head.encoders[-1].std.bias.fill_(-1e4)
    head.eval()
    images = torch.randn(6, DIM)
    noise = torch.randn(1, len(ids), DIM)
    probabilistic = Classifier(ids, features, 30.0, head, class_task, noise).sample_logits(images)
    deterministic = Classifier(ids, features, 30.0).sample_logits(images)
    assert probabilistic.shape == deterministic.shape == (1, 6, 5)
    assert torch.allclose(probabilistic, deterministic, atol=1e-5)


def test_kl_to_the_standard_normal_prior_by_hand():
    head = ProbabilisticHead(2)
    mu = torch.tensor([[[0.5, -1.0]]])
    sigma = torch.tensor([[[1.0, 0.5]]])
    out = HeadOutput(logits=torch.zeros(1, 1, 1), mu=mu, sigma=sigma, z_mean=torch.zeros(1, 2))
    # Per dimension: -log s + (s^2 + m^2) / 2 - 1/2.
    expected = (0 + (1 + 0.25) / 2 - 0.5) + (-math.log(0.5) + (0.25 + 1) / 2 - 0.5)
    value = kl_to_prior(head, out, torch.zeros(1, 2), torch.tensor([1]), "standard")
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_kl_to_the_clip_informed_prior_is_zero_at_initialisation():
    head = ProbabilisticHead(DIM)
    text_mean, text_std = torch.randn(3, DIM), torch.rand(3, DIM) * 0.1
    head.add_task(text_mean, text_std)
    mu, sigma = head.distribution(text_mean, torch.tensor([1, 1, 1]))
    out = HeadOutput(logits=torch.zeros(1, 1, 3), mu=mu[None], sigma=sigma[None], z_mean=torch.zeros(3, DIM))
    assert kl_to_prior(head, out, text_mean, torch.tensor([1, 1, 1]), "clip").item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        head.encoders[0].mean.bias.add_(0.5)
    mu, sigma = head.distribution(text_mean, torch.tensor([1, 1, 1]))
    out = HeadOutput(logits=torch.zeros(1, 1, 3), mu=mu[None], sigma=sigma[None], z_mean=torch.zeros(3, DIM))
    # Shifting every mean by 0.5: sum over dimensions of 0.5^2 / (2 sigma_p^2).
    expected = (0.25 / (2 * sigma**2)).sum(dim=-1).mean().item()
    assert kl_to_prior(head, out, text_mean, torch.tensor([1, 1, 1]), "clip").item() == pytest.approx(expected, rel=1e-5)


def test_language_regulariser_by_hand():
    # Template means w_0 = (1, 0), w_1 = (0, 1); mean residuals z_0 = (2, 0), z_1 = (0, 1).
    templates = torch.tensor([[[1.0, 0.5], [1.0, -0.5]], [[0.5, 1.0], [-0.5, 1.0]]])
    z = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]], [[[3.0, 0.0], [0.0, 0.0]]]])  # [M=2, B=1, C=2, d=2]
    # S = [[2, 0], [0, 1]]: CE = mean(log(1 + e^-2), log(1 + e^-1)).
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert language_regulariser(z.mean(dim=(0, 1)), templates).item() == pytest.approx(expected, rel=1e-6)


def test_uncertainty_outputs():
    sample_logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])  # two samples that disagree
    summary = predictive_summary(sample_logits)
    assert torch.allclose(summary["probs"], torch.tensor([[0.5, 0.5]]))
    assert summary["entropy"].item() == pytest.approx(math.log(2))
    assert summary["energy"].item() == pytest.approx(math.log(2 * math.e))
    p = 1 / (1 + math.exp(-2))
    # Each class's probability is p in one sample and 1 - p in the other.
    assert summary["variance"].item() == pytest.approx(2 * (p - 0.5) ** 2, rel=1e-5)
    assert predictive_summary(sample_logits[:1])["variance"] is None


def test_head_state_round_trips():
    head = _trained_like_head(n_tasks=3)
    ids, features, _ = _classes()
    class_task = torch.tensor([1, 2, 2, 3, 3])
    loaded = load_head(head_state(head), DIM, 3, head.std_floor)
    noise = inference_noise(0, ids, 3, DIM)
    images = torch.randn(4, DIM)
    a = Classifier(ids, features, 10.0, head, class_task, noise).sample_logits(images)
    b = Classifier(ids, features, 10.0, loaded, class_task, noise).sample_logits(images)
    assert torch.equal(a, b)


@pytest.mark.parametrize("encoder_bias", ["template_std", "pytorch_default"])
def test_a_saved_head_gets_back_the_priors_it_trained_against(encoder_bias):
    """The state stores no prior (half of what each task added); the one rebuilt from the
    text statistics is the one finetuning measured its KL against, bit for bit."""
    from pipeline.method.head import task_seed

    text_mean, text_variance = torch.randn(5, DIM), torch.rand(5, DIM) * 0.1
    class_task = torch.tensor([1, 1, 2, 2, 2])
    head = ProbabilisticHead(DIM, encoder_bias=encoder_bias)
    for task, rows in ((1, 2), (2, 5)):  # as finetuning adds them: the classes seen so far
        head.add_task(text_mean[:rows], text_variance[:rows], seed=task_seed(7, task))
    with torch.no_grad():  # training moves the encoders, never the priors
        for p in head.encoders.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = {**head_state(head), "text_mean": text_mean, "text_variance": text_variance, "class_task": class_task}
    assert not [k for k in state if "prior" in k]
    loaded = load_head(state, DIM, 2, head.std_floor, encoder_bias=encoder_bias, seed_of_task=lambda t: task_seed(7, t))
    for rebuilt, original in zip(loaded.state_dict().items(), head.state_dict().items(), strict=True):
        assert rebuilt[0] == original[0] and torch.equal(rebuilt[1], original[1]), rebuilt[0]
    served = load_head(state, DIM, 2, head.std_floor)  # inference needs no prior
    assert len(served.prior_encoders) == 0
    # A state written when priors were stored still loads (its copies are rebuilt over).
    older = {**state, **{f"head.{k}": v for k, v in head.state_dict().items() if k.startswith("prior_encoders.")}}
    again = load_head(older, DIM, 2, head.std_floor, encoder_bias=encoder_bias, seed_of_task=lambda t: task_seed(7, t))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), head.state_dict().values(), strict=True))


class _TinyLearner(torch.nn.Module):
    """What train_with_head needs of a prompt learner: context vectors, a generator, and
    class features from them."""

    def __init__(self, n_classes: int, dim: int):
        super().__init__()
        self.ctx = torch.nn.Parameter(torch.randn(n_classes, dim))
        self.generator = torch.nn.Linear(dim, dim)

    def features(self, class_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.generator(self.ctx[class_ids]), dim=-1)


def _train_two_tasks(head_lr: float, monkeypatch=None):
    from pipeline.config import HeadConfig, PromptConfig
    from pipeline.method.head import train_with_head
    from pipeline.method.prompts import TrainingSet

    torch.manual_seed(0)
    dim, seen = 8, [0, 1, 2, 3]
    learner = _TinyLearner(4, dim)
    head = ProbabilisticHead(dim, ff_width=16, dropout=0.5)
    templates = torch.randn(4, 3, dim)
    mean, variance = text_statistics(templates)
    head.add_task(mean[:2], variance[:2])
    head.add_task(mean, variance)
    centres = torch.randn(4, dim)

    def draw(epoch: int):
        g = torch.Generator().manual_seed(epoch)
        y = torch.arange(4).repeat(4)
        return centres[y] + 0.1 * torch.randn(len(y), dim, generator=g), y

    prompt = PromptConfig(n_ctx=1, lr=0.05, epochs=2, batch_size=8, per_class_per_epoch=4)
    settings = HeadConfig(mc_train=2, mc_test=2, kl_weight=1e-3, lang_weight=1.0, prior="standard",
                          balanced_finetune_epochs=1, balanced_finetune_lr_scale=0.1, optimizer="adamw", lr=head_lr)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    ctx_before = learner.ctx.detach().clone()
    train_with_head(learner, head, TrainingSet(seen, draw, "d"), seen, torch.tensor([1, 1, 2, 2]), 2, templates,
                    prompt, settings, logit_scale=10.0, seed=0)
    return head, before, learner, ctx_before


def test_the_head_trains_at_its_own_learning_rate():
    head, before, learner, ctx_before = _train_two_tasks(head_lr=1e-12)
    # The prompts moved at the prompt lr; the head (its own group) did not, at lr 1e-12.
    assert not torch.allclose(learner.ctx, ctx_before)
    assert all(torch.allclose(head.state_dict()[k], v, atol=1e-8) for k, v in before.items())
    head, before, _, _ = _train_two_tasks(head_lr=1e-2)
    assert not torch.allclose(head.state_dict()["encoders.1.mean.weight"], before["encoders.1.mean.weight"])


def test_balanced_finetuning_runs_the_attention_frozen_in_eval_mode_and_unfreezes_every_encoder(monkeypatch):
    from pipeline.method.head import VisualGuidedAttention

    modes = []
    forward = VisualGuidedAttention.forward

    def recording(self, *args, **kwargs):
        modes.append(self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VisualGuidedAttention, "forward", recording)
    head, before, _, _ = _train_two_tasks(head_lr=1e-2)
    # 2 epochs of the task's own training (2 batches each) with dropout, then 1 epoch of
    # balanced finetuning (2 batches) in eval mode.
    assert modes == [True] * 4 + [False] * 2
    # Task 1's encoder is trained only in balanced finetuning (it is frozen in task 2's own).
    assert not torch.allclose(head.state_dict()["encoders.0.mean.weight"], before["encoders.0.mean.weight"])


def test_kl_over_a_task_s_columns_is_that_of_those_columns_alone():
    head = _trained_like_head()
    torch.manual_seed(2)
    images, features = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    class_task = torch.tensor([1, 1, 2, 2])
    out = head(images, features, class_task, 10.0, torch.randn(2, 4, 8))
    columns = torch.tensor([2, 3])
    by_hand = 0.5 * (out.sigma[:, columns] ** 2 + out.mu[:, columns] ** 2 - 1) - out.sigma[:, columns].log()
    assert kl_to_prior(head, out, features, class_task, "standard", columns).item() == pytest.approx(by_hand.sum(-1).mean().item(), rel=1e-5)
