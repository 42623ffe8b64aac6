"""Probabilistic head over the learned class features ("CLAP" on replay, design section E).

For an image embedding ``e`` and the seen classes' prompt features ``f_c``:

- visual-guided attention ``v_c(e)``: one transformer-decoder layer whose queries are the
  ``f_c`` (self-attention only among classes of the same task) and whose single key/value
  is ``e`` itself, so no prediction depends on the other images of its batch;
- per task ``t`` a distribution encoder ``mu = A_t(f_c + v_c)``,
  ``sigma = softplus(B_t(f_c + v_c)) * (1 - floor) + floor``;
- ``M`` samples ``z ~ N(mu, sigma)``, ``h_c = norm(f_c + v_c + z)``, logits ``s <norm(e), h_c>``.

In training, one standard-normal draw ``[M, C, d]`` is shared by the images of a batch and
drawn afresh for every batch (common random numbers: each image's estimate stays unbiased and
the closed-form logits below need no per-image noise). At inference the noise of class ``c``
is drawn from ``(seed, c)`` alone, so a prediction is a deterministic function of the image
and the seed, whatever else shares its batch.

One module, over 400 lines: the head's layers, its losses and its training loop share
private shapes (per-task encoders, sample axes) that splitting would expose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

from pipeline.config import HeadConfig, PromptConfig
from pipeline.errors import UserError


class HeadError(UserError):
    pass


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class VisualGuidedAttention(nn.Module):
    """One transformer-decoder layer (width ``d``, 1 head, GELU) evaluated per image, as in
    the reference: feed-forward width 2048 and dropout 0.1 in training by default.

    Its cost is the feed-forward block on every (image, class) pair, ``[B, C, ff_width]``.
    Without per-pair dropout (inference, or training with dropout 0) linear1 is formed
    exactly from a per-class and a per-image product (``_separable_tail``); with it (the
    finetuning's dropout 0.1) linear1's input differs per pair and runs as in the plain layer."""

    def __init__(self, dim: int, ff_width: int = 2048, dropout: float = 0.1, zero_init_output: bool = False):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(
            dim, nhead=1, dim_feedforward=ff_width, dropout=dropout, activation="gelu", batch_first=True
        )
        if zero_init_output:
            # The head then starts as the deterministic learner (v_c = 0); an ablation only.
            nn.init.zeros_(self.layer.norm3.weight)
        # True: the plain layer's operations, linear1 per pair (the reference of the tests
        # and of benchmarks/head_attention.py). An attribute, not part of the state.
        self.plain = False

    def forward(self, class_features: torch.Tensor, images: torch.Tensor, class_task: torch.Tensor) -> torch.Tensor:
        """``v`` of shape ``[B, C, d]`` for ``class_features [C, d]`` and ``images [B, d]``."""
        layer = self.layer
        other_task = class_task[:, None] != class_task[None, :]
        q = class_features[None]
        # The self-attention block sees only the class features: the same for every image.
        x = layer.norm1(q + layer._sa_block(q, other_task, None))
        # One key per image: its softmax weight is exactly 1, so each class query's
        # cross-attention output is the image's projected value, scaled by that query's
        # dropout of the weight in training. Computed as such, without the [B, C, 1] softmax.
        attn = layer.multihead_attn
        d = images.shape[-1]
        value = F.linear(images, attn.in_proj_weight[2 * d :], attn.in_proj_bias[2 * d :])
        projected = F.linear(value, attn.out_proj.weight)[:, None, :]
        if self.training and attn.dropout > 0:
            keep = F.dropout(projected.new_ones(images.shape[0], x.shape[1], 1), attn.dropout, training=True)
            projected = keep * projected
        cross = layer.dropout2(projected + attn.out_proj.bias)
        if cross.shape[1] == 1 and not self.plain and layer.activation is F.gelu:
            return self._separable_tail(x[0], cross[:, 0])
        # Dropout in training (the weight's dropout a factor per pair, dropout2 a mask per
        # pair and dimension) gives every (image, class) pair its own cross term, so linear1's
        # input has no per-class + per-image split: the plain layer, linear1 per pair.
        x = layer.norm2(x + cross)
        return layer.norm3(x + layer._ff_block(x))

    def _separable_tail(self, query: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """``norm3(x + ff(x))`` for ``x = norm2(query_c + cross_i)``, ``query [C, d]`` and
        ``cross [B, d]``, with linear1 never applied per pair. Centred and scaled by norm2's
        weight ``g``, ``linear1(x) = rstd (W1 (g * q'_c) + W1 (g * a'_i)) + W1 beta + b1``,
        where ``q'``, ``a'`` are the two terms less their own means (the pair's mean is their
        sum) and ``rstd`` the pair's norm2 scale, read from the [B, C, d] sum the residual
        needs anyway: per pair and hidden unit an add and a multiply instead of ``d``
        multiply-adds, forward and backward. linear2 has no such split (gelu sits between),
        nor has norm3 (its input holds linear2's output)."""
        layer = self.layer
        norm2, linear1 = layer.norm2, layer.linear1
        summed = cross[:, None, :] + query[None]
        variance, _ = torch.var_mean(summed, dim=-1, unbiased=False)
        scaled = linear1.weight * norm2.weight
        hidden = _PairGelu.apply(
            F.linear(query - query.mean(dim=-1, keepdim=True), scaled),
            F.linear(cross - cross.mean(dim=-1, keepdim=True), scaled),
            torch.rsqrt(variance + norm2.eps),
            F.linear(norm2.bias, linear1.weight, linear1.bias),
        )
        ff = layer.dropout3(layer.linear2(layer.dropout(hidden)))
        return layer.norm3(layer.norm2(summed) + ff)


# Elements of one chunk of [B, C, F] pairs: a chunk's temporaries stay in a core's cache, so
# a fused pass reads and writes main memory once, without a [B, C, F] tensor per operation.
_PAIR_CHUNK = 1 << 18


def _pair_chunks(pairs: torch.Tensor) -> list[slice]:
    """Slices of whole images (the first dimension) of about ``_PAIR_CHUNK`` elements; one
    slice off the CPU, where a kernel launch per chunk would cost more than it saves."""
    if pairs.device.type != "cpu":
        return [slice(0, len(pairs))]
    step = max(1, _PAIR_CHUNK // max(1, pairs.shape[1:].numel()))
    return [slice(start, start + step) for start in range(0, len(pairs), step)]


class _PairGelu(torch.autograd.Function):
    """``gelu(rstd[b, c] * (per_class[c] + per_image[b]) + offset)``, ``[B, C, F]``, a chunk
    of images at a time: the pre-activation exists per chunk only (rebuilt in backward), and
    backward reduces each chunk's gradient to the four small inputs' at once."""

    @staticmethod
    def forward(ctx, per_class, per_image, rstd, offset):
        ctx.save_for_backward(per_class, per_image, rstd, offset)
        out = per_class.new_empty(len(per_image), *per_class.shape)
        for rows in _pair_chunks(out):
            pre = torch.add(per_image[rows, None, :], per_class[None], out=out[rows])
            torch.ops.aten.gelu_(pre.mul_(rstd[rows, :, None]).add_(offset))
        return out

    @staticmethod
    def backward(ctx, grad):
        per_class, per_image, rstd, offset = ctx.saved_tensors
        want_class, want_image, want_rstd, want_offset = ctx.needs_input_grad
        d_class = torch.zeros_like(per_class) if want_class else None
        d_image = torch.empty_like(per_image) if want_image else None
        d_rstd = torch.empty_like(rstd) if want_rstd else None
        d_offset = torch.zeros_like(offset) if want_offset else None
        for rows in _pair_chunks(grad):
            r = rstd[rows, :, None]
            summed = per_image[rows, None, :] + per_class[None]
            # The forward's operations in its order, so the pre-activation is the same bits.
            g = torch.ops.aten.gelu_backward(grad[rows], (summed * r).add_(offset))
            if want_offset:
                d_offset += g.sum(dim=(0, 1))
            if want_rstd:
                d_rstd[rows] = torch.linalg.vecdot(g, summed)
            if want_class or want_image:
                g = g.mul_(r)
                if want_class:
                    d_class += g.sum(dim=0)
                if want_image:
                    d_image[rows] = g.sum(dim=1)
        return d_class, d_image, d_rstd, d_offset


class DistributionEncoder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mean = nn.Linear(dim, dim)
        self.std = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(x), F.softplus(self.std(x)) * (1.0 - floor) + floor


@dataclass
class HeadOutput:
    logits: torch.Tensor  # [M, B, C]
    mu: torch.Tensor  # [B, C, d]
    sigma: torch.Tensor  # [B, C, d]
    z_mean: torch.Tensor  # [C, d], the samples z averaged over samples and images


class ProbabilisticHead(nn.Module):
    def __init__(
        self,
        dim: int,
        std_floor: float = 1e-3,
        ff_width: int = 2048,
        dropout: float = 0.1,
        zero_init_attention: bool = False,
        encoder_bias: str = "template_std",
    ):
        super().__init__()
        self.dim = dim
        self.std_floor = std_floor
        self.encoder_bias = encoder_bias
        self.attention = VisualGuidedAttention(dim, ff_width, dropout, zero_init_attention)
        self.encoders = nn.ModuleList()
        # The CLIP-informed prior: each task's encoder as it was initialised, frozen.
        self.prior_encoders = nn.ModuleList()

    @property
    def n_tasks(self) -> int:
        return len(self.encoders)

    def add_task(self, text_mean: torch.Tensor, text_variance: torch.Tensor, seed: int = 0) -> None:
        """A new task's encoder, initialised from the seen classes' text statistics (see
        ``initial_encoder``), and its frozen copy, the task's CLIP-informed prior."""
        encoder = self.initial_encoder(text_mean, text_variance, seed)
        prior = DistributionEncoder(self.dim)
        prior.load_state_dict(encoder.state_dict())
        prior.requires_grad_(False)
        self.encoders.append(encoder)
        self.prior_encoders.append(prior)

    def initial_encoder(self, text_mean: torch.Tensor, text_variance: torch.Tensor, seed: int) -> DistributionEncoder:
        """``A.weight = T^T T / d`` with ``T`` the seen classes' template-averaged features and
        ``B.weight = V^T V / d`` with ``V`` their per-dimension template variance.

        Biases: ``A``'s start at 0, so ``mu`` starts as the text projection. ``B``'s follow
        ``encoder_bias``: ``template_std`` sets them so ``sigma`` starts at the mean template
        standard deviation (the spread the text itself shows, about 0.01 per dimension for
        the demo); ``pytorch_default`` keeps ``nn.Linear``'s uniform init, as the reference
        does, so ``sigma`` starts near ``softplus(0) = 0.69``, far wider than the features.
        A function of its arguments alone: the priors are rebuilt from it, never stored."""
        d = self.dim
        generator = torch.Generator().manual_seed(seed)
        encoder = DistributionEncoder(d)
        with torch.no_grad():
            encoder.mean.weight.copy_(text_mean.T @ text_mean / d)
            encoder.mean.bias.zero_()
            encoder.std.weight.copy_(text_variance.T @ text_variance / d)
            if self.encoder_bias == "template_std":
                std = text_variance.clamp_min(0).sqrt().mean(dim=0)
                start = ((std - self.std_floor) / (1.0 - self.std_floor)).clamp_min(1e-4)
                encoder.std.bias.copy_(inverse_softplus(start))
            elif self.encoder_bias == "pytorch_default":
                bound = 1.0 / d**0.5
                encoder.std.bias.uniform_(-bound, bound, generator=generator)
            else:
                raise HeadError(f"unknown encoder_bias {self.encoder_bias!r} (template_std or pytorch_default)")
        return encoder

    def rebuild_priors(self, text_mean: torch.Tensor, text_variance: torch.Tensor, class_task: torch.Tensor,
                       seed_of_task: Callable[[int], int]) -> None:
        """Task ``t``'s prior as ``add_task`` made it: from the statistics of the classes seen
        by task ``t`` (the first rows: classes are added task by task) and that task's seed.
        A saved head holds no priors (frozen, each as large as a trained encoder: storing them
        doubled what every task adds to the state); this puts them back, bit for bit on the
        machine that trained them."""
        if len(class_task) and (class_task.diff() < 0).any():
            raise HeadError("class_task must list the classes task by task to rebuild the priors")
        self.prior_encoders = nn.ModuleList()
        for t in range(1, self.n_tasks + 1):
            rows = int((class_task <= t).sum())
            prior = self.initial_encoder(text_mean[:rows], text_variance[:rows], seed_of_task(t))
            self.prior_encoders.append(prior.requires_grad_(False))

    def distribution(self, x: torch.Tensor, class_task: torch.Tensor, prior: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu, sigma`` of every class column of ``x [..., C, d]`` from its own task's encoder."""
        encoders = self.prior_encoders if prior else self.encoders
        mu = torch.empty_like(x)
        sigma = torch.empty_like(x)
        for t in class_task.unique().tolist():
            if not 1 <= t <= len(encoders):
                raise HeadError(f"no distribution encoder for task {t} (the head has {len(encoders)})")
            cols = torch.nonzero(class_task == t).flatten()
            m, s = encoders[t - 1](x[..., cols, :], self.std_floor)
            mu[..., cols, :] = m
            sigma[..., cols, :] = s
        return mu, sigma

    def forward(
        self,
        images: torch.Tensor,
        class_features: torch.Tensor,
        class_task: torch.Tensor,
        logit_scale: float,
        noise: torch.Tensor,
    ) -> HeadOutput:
        """Logits ``s <norm(e), norm(f + v + mu + sigma * eps_m)>`` for standard-normal
        ``noise`` ``eps`` of shape ``[M, C, d]``, shared by the images (common random numbers:
        each image's estimate is unbiased, and none depends on its batch).

        The ``[M, B, C, d]`` sampled features are never built: with ``a = f + v + mu``,
        ``<e, a + sigma eps> = <e, a> + <e sigma, eps>`` and
        ``|a + sigma eps|^2 = |a|^2 + 2 <a sigma, eps> + <sigma^2, eps^2>``, each a batched
        matrix product over ``d``."""
        e = F.normalize(images.float(), dim=-1)
        v = self.attention(class_features, e, class_task)
        base = class_features[None] + v
        mu, sigma = self.distribution(base, class_task)
        mean = base + mu
        along = (e[:, None, :] * mean).sum(dim=-1)
        squared = (mean * mean).sum(dim=-1)
        along_noise = torch.einsum("bcd,mcd->mbc", e[:, None, :] * sigma, noise)
        mixed = torch.einsum("bcd,mcd->mbc", mean * sigma, noise)
        spread = torch.einsum("bcd,mcd->mbc", sigma * sigma, noise * noise)
        norm = (squared[None] + 2 * mixed + spread).clamp_min(0).sqrt().clamp_min(1e-12)
        logits = logit_scale * (along[None] + along_noise) / norm
        z_mean = mu.mean(dim=0) + sigma.mean(dim=0) * noise.mean(dim=0)
        return HeadOutput(logits=logits, mu=mu, sigma=sigma, z_mean=z_mean)


def task_seed(seed: int, task: int) -> int:
    """Task ``task``'s seed for its encoder's initialisation and its training draws."""
    return seed * 1000 + task


def inference_noise(seed: int, class_ids: list[int], samples: int, dim: int) -> torch.Tensor:
    """``[M, C, d]`` standard-normal noise; class ``c``'s part depends on ``(seed, c)`` only."""
    parts = [
        torch.randn(samples, dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + c)) for c in class_ids
    ]
    return torch.stack(parts, dim=1)


def kl_to_prior(head: ProbabilisticHead, out: HeadOutput, class_features: torch.Tensor, class_task: torch.Tensor, prior: str,
                columns: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(q || p)`` summed over dimensions, averaged over images and the given class
    ``columns`` (all by default)."""
    mu, sigma = out.mu, out.sigma
    if columns is not None:
        mu, sigma = mu[:, columns], sigma[:, columns]
        class_features, class_task = class_features[columns], class_task[columns]
    if prior == "standard":
        # Closed form against N(0, I): fewer passes over [B, C, d] than the general one.
        per_dim = 0.5 * (sigma.square() + mu.square() - 1.0) - sigma.log()
        return per_dim.sum(dim=-1).mean()
    p_mu, p_sigma = head.distribution(class_features, class_task, prior=True)
    p = Normal(p_mu.expand_as(mu), p_sigma.expand_as(sigma))
    return kl_divergence(Normal(mu, sigma), p).sum(dim=-1).mean()


def language_regulariser(z_mean: torch.Tensor, template_features: torch.Tensor) -> torch.Tensor:
    """``CE(S, c)`` with ``S[c, c'] = mean_{j,m} <w_c^j, z_{c'}^m>`` over the given classes
    (``z`` also averaged over the batch's images).

    ``z_mean``: ``[C, d]``, those classes' samples averaged; ``template_features``: ``[C, J, d]``."""
    similarity = template_features.mean(dim=1) @ z_mean.T
    return F.cross_entropy(similarity, torch.arange(len(similarity), device=similarity.device))


def predictive_summary(sample_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: probabilities of the sample-averaged logits, predictive entropy, energy
    ``logsumexp`` of those logits, and the variance over samples (summed over classes) of the
    class probabilities (``None`` for a single sample: nothing varies)."""
    logits = sample_logits.mean(dim=0)
    probs = logits.softmax(dim=-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    variance = sample_logits.softmax(dim=-1).var(dim=0, unbiased=False).sum(dim=-1) if len(sample_logits) > 1 else None
    return {"logits": logits, "probs": probs, "entropy": entropy, "energy": torch.logsumexp(logits, dim=-1), "variance": variance}


def text_statistics(template_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Template-averaged features and per-dimension template variance of ``[C, J, d]``; the
    variance unbiased, as the reference's ``Tensor.var(1)`` (clap4clip 7ff95c2,
    ``classifier/continual_clip_variational.py:105``). One template has no spread: 0."""
    if template_features.shape[1] < 2:
        return template_features.mean(dim=1), torch.zeros_like(template_features[:, 0])
    return template_features.mean(dim=1), template_features.var(dim=1, unbiased=True)


def train_with_head(
    learner,
    head: ProbabilisticHead,
    training,
    seen: list[int],
    class_task: torch.Tensor,
    task: int,
    template_features: torch.Tensor,
    prompt_cfg: PromptConfig,
    head_cfg: HeadConfig,
    logit_scale: float,
    seed: int,
    log_metric: Callable[[str, float, int], None] | None = None,
) -> list[float]:
    """Train prompts, context generator, attention and task ``task``'s encoder (earlier
    encoders frozen) on ``training`` (a ``prompts.TrainingSet``), then, from task 2 on, the
    balanced finetuning phase. Returns the per-epoch loss of both phases.

    As the reference (clap4clip 7ff95c2, ``classifier/continual_clip_variational.py``): in
    a task's own training the KL term and the language regulariser cover that task's
    classes (lines 396, 402); in balanced finetuning every encoder is unfrozen, the
    attention frozen and in eval mode (no dropout, line 652), the learning rates divided by
    10 without warm-up (line 650), and KL and language regulariser cover every seen task.
    The prompts train with AdamW at the prompt lr, the head with its own optimizer and lr.
    ``template_features [C_seen, J, d]``: the seen classes' per-template text features."""
    from pipeline.method.prompts import ParamGroup, class_positions, prompt_parameters, train_epochs

    missing = [c for c in seen if c not in set(training.classes)]
    if missing:
        raise HeadError(f"task {task}: no training embeddings for seen class(es) {missing}")
    if len(template_features) != len(seen):
        raise HeadError(f"task {task}: {len(seen)} seen classes but text features of {len(template_features)}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the attention's dropout draws from the global generator
    seen_t = torch.tensor(seen)
    position = class_positions(seen)
    class_means = template_features.float().mean(dim=1)
    task_columns = {t: torch.nonzero(class_task == t).flatten() for t in class_task.unique().tolist()}

    def loss_over(tasks: list[int]):
        columns = torch.cat([task_columns[t] for t in tasks])

        def batch_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            features = learner.features(seen_t)
            noise = torch.randn(head_cfg.mc_train, len(seen), head.dim, generator=generator)
            out = head(F.normalize(x.float(), dim=-1), features, class_task, logit_scale, noise)
            ce = F.cross_entropy(out.logits.flatten(0, 1), position[y].repeat(head_cfg.mc_train))
            kl = kl_to_prior(head, out, class_means, class_task, head_cfg.prior, columns)
            lang = sum(language_regulariser(out.z_mean[task_columns[t]], template_features[task_columns[t]]) for t in tasks)
            return ce + head_cfg.kl_weight * kl + head_cfg.lang_weight * lang

        return batch_loss

    prompts = prompt_parameters(learner)
    losses: list[float] = []
    learner.train()
    head.train()
    head.requires_grad_(False)
    own = [*head.attention.parameters(), *head.encoders[task - 1].parameters()]
    for p in [*prompts, *own]:
        p.requires_grad_(True)
    losses += train_epochs(
        [ParamGroup(prompts, "adamw", prompt_cfg.lr), ParamGroup(own, head_cfg.optimizer, head_cfg.lr)],
        prompt_cfg.epochs, training, prompt_cfg, loss_over([task]), log_metric,
    )
    if task > 1 and head_cfg.balanced_finetune_epochs > 0:
        head.requires_grad_(False)
        head.attention.eval()
        encoders = list(head.encoders.parameters())
        for p in encoders:
            p.requires_grad_(True)
        scale = head_cfg.balanced_finetune_lr_scale
        losses += train_epochs(
            [ParamGroup(prompts, "adamw", prompt_cfg.lr * scale),
             ParamGroup(encoders, head_cfg.optimizer, head_cfg.lr * scale, warmup=False)],
            head_cfg.balanced_finetune_epochs, training, prompt_cfg, loss_over(sorted(task_columns)), log_metric,
            first_epoch=prompt_cfg.epochs,
        )
    head.requires_grad_(True)
    head.prior_encoders.requires_grad_(False)
    learner.eval()
    head.eval()
    return losses
