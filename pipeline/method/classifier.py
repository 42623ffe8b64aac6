"""A task's classifier over the classes seen so far, whatever the method.

Zero-shot methods use ``w_c``, prompt methods their learned ``f_c``, ``clap`` the
probabilistic head on top of ``f_c``. All give per image the class probabilities,
predictive entropy, energy and (with Monte-Carlo samples) the variance over samples.
Images are scored one by one: no output depends on the other images of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from pipeline.method.head import DistributionEncoder, ProbabilisticHead, predictive_summary


@dataclass
class Classifier:
    class_ids: list[int]
    class_features: torch.Tensor  # [C, d], normalised
    logit_scale: float
    head: ProbabilisticHead | None = None
    class_task: torch.Tensor | None = None  # [C], task of each class (1-based)
    noise: torch.Tensor | None = None  # [M, C, d]

    @property
    def mc_samples(self) -> int:
        return 1 if self.noise is None else int(self.noise.shape[0])

    @torch.no_grad()
    def sample_logits(self, embeddings: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """``[M, N, C]`` logits over the seen classes."""
        e = F.normalize(embeddings.float(), dim=-1)
        if self.head is None:
            return (self.logit_scale * e @ self.class_features.T)[None]
        parts = [
            self.head(chunk, self.class_features, self.class_task, self.logit_scale, self.noise).logits
            for chunk in e.split(batch_size)
        ]
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def predict(self, embeddings: torch.Tensor) -> dict[str, Any]:
        summary = predictive_summary(self.sample_logits(embeddings))
        ids = torch.tensor(self.class_ids)
        return {"label": ids[summary["probs"].argmax(dim=-1)], **summary}

    @torch.no_grad()
    def all_class_logits(
        self, embeddings: torch.Tensor, zero_shot_features: torch.Tensor, sample_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[N, n_classes]``: this classifier's (sample-averaged) logits for seen classes,
        zero-shot logits ``s <e, w_c>`` for the others. ``sample_logits``: this classifier's
        own output for ``embeddings``, when the caller already has it."""
        e = F.normalize(embeddings.float(), dim=-1)
        logits = self.logit_scale * e @ zero_shot_features.float().T
        if sample_logits is None:
            sample_logits = self.sample_logits(embeddings)
        logits[:, self.class_ids] = sample_logits.mean(dim=0)
        return logits


def head_state(head: ProbabilisticHead) -> dict[str, torch.Tensor]:
    """The head's tensors under ``head.``, without the frozen priors (``load_head`` rebuilds
    them from the text statistics)."""
    return {f"head.{k}": v.detach() for k, v in head.state_dict().items() if not k.startswith("prior_encoders.")}


def load_head(
    state: dict[str, torch.Tensor], dim: int, n_tasks: int, std_floor: float, dropout: float = 0.0,
    encoder_bias: str = "template_std", seed_of_task: Callable[[int], int] | None = None,
) -> ProbabilisticHead:
    """The head saved in ``state`` (its attention's width read from the tensors), in eval
    mode; ``dropout`` and ``encoder_bias`` matter only if it is trained further. With
    ``seed_of_task``, the priors are rebuilt from the state's ``text_mean``, ``text_variance``
    and ``class_task`` (training needs them); without, the head has none (inference does not
    use them). Priors a state from before that change still holds are ignored."""
    ff_width = state["head.attention.layer.linear1.weight"].shape[0]
    head = ProbabilisticHead(dim, std_floor=std_floor, ff_width=ff_width, dropout=dropout, encoder_bias=encoder_bias)
    for _ in range(n_tasks):
        head.encoders.append(DistributionEncoder(dim))
    head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()
                          if k.startswith("head.") and not k.startswith("head.prior_encoders.")})
    if seed_of_task is not None:
        head.rebuild_priors(state["text_mean"].float(), state["text_variance"].float(), state["class_task"], seed_of_task)
    head.eval()
    return head


def train_probe(
    vectors: torch.Tensor,
    training,
    seen: list[int],
    settings,
    logit_scale: float,
    log_metric=None,
) -> tuple[torch.Tensor, list[float]]:
    """The ``probe`` method: one free vector per seen class (starting from ``vectors``, the
    zero-shot features for new classes), a cosine classifier ``s <norm(e), norm(v_c)>``
    trained with cross-entropy on ``training``'s draws at the prompts' budget. The ceiling
    of any one-vector-per-class classifier on these embeddings. Returns the vectors and the
    per-epoch losses."""
    from pipeline.method.prompts import ParamGroup, class_positions, train_epochs

    weights = torch.nn.Parameter(vectors.float().clone())
    position = class_positions(seen)

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logit_scale * F.normalize(x.float(), dim=-1) @ F.normalize(weights, dim=-1).T
        return F.cross_entropy(logits, position[y])

    losses = train_epochs([ParamGroup([weights], "adamw", settings.lr)], settings.epochs, training, settings, batch_loss, log_metric)
    return weights.detach(), losses
