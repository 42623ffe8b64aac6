"""Class-specific prompts with a shared context generator (design, section D).

For class ``c`` the frozen text encoder reads ``[SOS] p_c g(w_c) <name>. [EOS]``: ``p_c``
are ``n_ctx`` learned token vectors, ``g`` an MLP shared by all classes fed the zero-shot
feature ``w_c``. CLIP's text transformer is causal and pools at the end-of-text token, so
the sequence is cut right after the longest prompt's end-of-text token: same features,
a fraction of the cost of the padded context.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import PromptConfig
from pipeline.errors import UserError
from pipeline.io import read_tensor_metadata, read_tensors, write_tensors

log = logging.getLogger(__name__)

PLACEHOLDER = "X"


class PromptError(UserError):
    pass


def encode_token_embeddings(
    model: nn.Module, embeddings: torch.Tensor, eot: torch.Tensor, cut: bool = True
) -> torch.Tensor:
    """CLIP's ``encode_text`` from token vectors instead of token ids (not normalised)."""
    length = int(eot.max()) + 1 if cut else embeddings.shape[1]
    x = embeddings[:, :length] + model.positional_embedding[:length].to(embeddings.dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    projection = model.text_projection
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class FixedAffineNorm(nn.Module):
    """A BatchNorm layer as the reference's context generator runs it: statistics frozen at
    mean 0 and variance 1, so it is a learned per-dimension scale and shift,
    ``x / sqrt(1 + eps) * weight + bias``.

    The reference keeps the prompter in eval mode for good (mammoth e75a491,
    ``models/cgil_utils/cgil_utils.py:54-58``: ``Model.train`` calls ``super().train(False)``)
    and switches ``track_running_stats`` off only after the buffers exist
    (``models/cgil.py:53-56``), so ``nn.BatchNorm1d`` reads its initial running statistics
    (0 and 1) and never updates them. Hence ``g(w_c)`` depends on ``w_c`` alone: a class's
    features do not depend on which other classes are seen, and one class is enough.
    Parameter names match ``nn.BatchNorm1d``'s (``weight``, ``bias``)."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.weight / math.sqrt(1.0 + self.eps)) + self.bias


class ContextGenerator(nn.Module):
    """``g``: ``d -> d -> d -> d_tok -> d_tok`` with (fixed-statistics) BatchNorm and SELU."""

    def __init__(self, dim: int, token_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), FixedAffineNorm(dim), nn.SELU(),
            nn.Linear(dim, dim), FixedAffineNorm(dim), nn.SELU(),
            nn.Linear(dim, token_dim), FixedAffineNorm(token_dim), nn.SELU(),
            nn.Linear(token_dim, token_dim),
        )

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.net(w)


class PromptLearner(nn.Module):
    """Learned context of the classes seen so far, keyed by global class id.

    The class universe grows task by task (``add_classes``): a class's tokens, zero-shot
    feature and context vectors are added when it arrives, and its context is drawn from a
    generator seeded by (seed, class id), so it starts the same whatever came before it."""

    def __init__(
        self,
        text_model: nn.Module,
        tokenizer,
        class_names: list[str] = (),
        class_features: torch.Tensor | None = None,
        n_ctx: int = 1,
        class_ids: list[int] | None = None,
        feature_dim: int | None = None,
    ):
        super().__init__()
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        token_dim = text_model.token_embedding.weight.shape[1]
        dim = feature_dim if feature_dim is not None else class_features.shape[1]
        self.class_ids: list[int] = []
        self.class_names: list[str] = []
        self._row: dict[int, int] = {}
        self.register_buffer("tokens", torch.zeros(0, text_model.positional_embedding.shape[0], dtype=torch.long))
        self.register_buffer("eot", torch.zeros(0, dtype=torch.long))
        self.register_buffer("class_features", torch.zeros(0, dim))
        self.ctx = nn.Parameter(torch.zeros(0, n_ctx, token_dim))
        self.generator = ContextGenerator(dim, token_dim)
        if len(class_names):
            ids = list(range(len(class_names))) if class_ids is None else list(class_ids)
            self.add_classes(ids, list(class_names), class_features)

    def add_classes(self, class_ids: list[int], names: list[str], features: torch.Tensor, seed: int | None = None) -> None:
        """Grow by new classes (their context drawn from ``seed``; zeros without one)."""
        taken = [c for c in class_ids if c in self._row]
        if taken:
            raise PromptError(f"class id(s) {taken} already have prompts")
        prefix = " ".join([PLACEHOLDER] * (self.n_ctx + 1))
        tokens = self.tokenizer([f"{prefix} {name}." for name in names]).to(self.tokens.device)
        eot = tokens.argmax(dim=-1)
        if (eot >= tokens.shape[1] - 1).any():
            longest = names[int(eot.argmax())]
            raise PromptError(f"class name {longest!r} does not fit the text encoder's context with {self.n_ctx} context tokens")
        ctx = torch.zeros(len(class_ids), *self.ctx.shape[1:])
        if seed is not None:
            for i, c in enumerate(class_ids):
                ctx[i].normal_(0.0, 0.02, generator=torch.Generator().manual_seed(_class_seed(seed, c)))
        self.tokens = torch.cat([self.tokens, tokens]) if len(self.tokens) else tokens
        self.eot = torch.cat([self.eot, eot])
        self.class_features = torch.cat([self.class_features, features.float().to(self.class_features.device)])
        self.ctx = nn.Parameter(torch.cat([self.ctx.detach(), ctx.to(self.ctx.device)]))
        for c, name in zip(class_ids, names):
            self._row[int(c)] = len(self.class_ids)
            self.class_ids.append(int(c))
            self.class_names.append(name)

    def reset(self, seed: int) -> None:
        """Draw the context generator's weights and every class's context from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.generator.modules():
                if isinstance(module, nn.Linear):
                    bound = 1.0 / math.sqrt(module.in_features)
                    module.weight.uniform_(-bound, bound, generator=g)
                    module.bias.uniform_(-bound, bound, generator=g)
            for i, c in enumerate(self.class_ids):
                self.ctx[i].normal_(0.0, 0.02, generator=torch.Generator().manual_seed(_class_seed(seed, c)))

    def rows(self, class_ids: torch.Tensor | list[int]) -> torch.Tensor:
        ids = class_ids.tolist() if isinstance(class_ids, torch.Tensor) else list(class_ids)
        missing = [c for c in ids if c not in self._row]
        if missing:
            raise PromptError(f"no prompts for class id(s) {missing} (known: {self.class_ids})")
        return torch.tensor([self._row[c] for c in ids], dtype=torch.long, device=self.ctx.device)

    def features(self, class_ids: torch.Tensor, cut: bool = True) -> torch.Tensor:
        """Normalised text features ``f_c`` of the given classes."""
        rows = self.rows(class_ids)
        model = self.text_model
        embeddings = model.token_embedding(self.tokens[rows]).detach()
        generated = self.generator(self.class_features[rows])
        embeddings = torch.cat(
            [embeddings[:, :1], self.ctx[rows], generated[:, None, :], embeddings[:, 2 + self.n_ctx :]], dim=1
        )
        return F.normalize(encode_token_embeddings(model, embeddings, self.eot[rows], cut=cut), dim=-1)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {"ctx": self.ctx.detach()}
        state.update({f"generator.{k}": v.detach() for k, v in self.generator.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if state["ctx"].shape != self.ctx.shape:
            raise PromptError(f"saved context has shape {tuple(state['ctx'].shape)}, the learner {tuple(self.ctx.shape)}")
        with torch.no_grad():
            self.ctx.copy_(state["ctx"])
        self.generator.load_state_dict({k.removeprefix("generator."): v for k, v in state.items() if k.startswith("generator.")})


def _class_seed(seed: int, class_id: int) -> int:
    return seed * 1_000_003 + int(class_id) + 1


def balanced_epoch(labels: torch.Tensor, class_ids: list[int], per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices of a class-balanced subset: ``per_class`` rows of every class, shuffled
    (drawn with replacement only when a class has fewer rows)."""
    chosen = []
    for cid in class_ids:
        rows = torch.nonzero(labels == cid).flatten()
        if len(rows) >= per_class:
            pick = rows[torch.randperm(len(rows), generator=generator)[:per_class]]
        else:
            pick = rows[torch.randint(len(rows), (per_class,), generator=generator)]
        chosen.append(pick)
    rows = torch.cat(chosen)
    return rows[torch.randperm(len(rows), generator=generator)]


def class_positions(seen: list[int]) -> torch.Tensor:
    """``position[class_id]``: the class's column among the seen classes (-1 if unseen)."""
    position = torch.full((int(max(seen)) + 1,), -1, dtype=torch.long)
    position[torch.tensor(seen)] = torch.arange(len(seen))
    return position


@dataclass
class TrainingSet:
    """What a task trains on, one fresh class-balanced epoch at a time: ``draw(epoch)`` gives
    that epoch's embeddings and labels, shuffled, reproducible from the epoch alone."""

    classes: list[int]
    draw: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    # What the draws are determined by, given the seed (a registry input digest).
    digest: str


def real_training_set(embeddings: torch.Tensor, labels: torch.Tensor, classes: list[int], per_class: int, seed: int,
                      digest: str) -> TrainingSet:
    """Class-balanced epochs of real embeddings: ``per_class`` rows of every class each epoch."""
    from pipeline.method.replay import epoch_seed

    def draw(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = balanced_epoch(labels, classes, per_class, torch.Generator().manual_seed(epoch_seed(seed, 0, epoch)))
        return embeddings[rows], labels[rows]

    return TrainingSet(classes, draw, digest)


def make_optimizer(
    params: list[torch.Tensor], kind: str, lr: float, total_steps: int, warmup: bool = True
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """``adamw``: AdamW at a constant ``lr``, no weight decay (design D, as in CGIL).
    ``sgd``: the CLAP reference's plain SGD at ``lr`` (its ``lr * batch / 20``: 1.6e-3 for its
    lr 1e-3 and batch 32), cosine decay to 0 after a linear warm-up over the first 30% of the
    steps in a task's training and none in balanced finetuning (clap4clip 7ff95c2,
    ``classifier/continual_clip_variational.py:495, 650, 771-794``)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), None
    if kind != "sgd":
        raise PromptError(f"unknown optimizer {kind!r} (adamw or sgd)")
    optimizer = torch.optim.SGD(params, lr=lr)
    warmup_steps = round(0.3 * total_steps) if warmup else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class ParamGroup:
    """Parameters trained together with one optimizer of ``make_optimizer``."""

    params: list[torch.Tensor]
    kind: str
    lr: float
    warmup: bool = True


def steps_per_epoch(n_classes: int, settings: PromptConfig) -> int:
    return math.ceil(n_classes * settings.per_class_per_epoch / settings.batch_size)


def train_epochs(
    groups: list[ParamGroup],
    epochs: int,
    training: TrainingSet,
    settings: PromptConfig,
    batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    log_metric: Callable[[str, float, int], None] | None = None,
    first_epoch: int = 0,
) -> list[float]:
    """``epochs`` epochs of ``training``'s draws (epochs ``first_epoch`` on), each parameter
    group stepped by its own optimizer; ``batch_loss(embeddings, labels)`` gives a batch's
    loss. Returns per-epoch losses."""
    total = epochs * steps_per_epoch(len(training.classes), settings)
    optimizers = [make_optimizer(g.params, g.kind, g.lr, total, g.warmup) for g in groups if g.params]
    losses = []
    for epoch in range(first_epoch, first_epoch + epochs):
        x, y = training.draw(epoch)
        running, count = 0.0, 0
        for start in range(0, len(y), settings.batch_size):
            xb, yb = x[start : start + settings.batch_size], y[start : start + settings.batch_size]
            loss = batch_loss(xb, yb)
            for optimizer, _ in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer, scheduler in optimizers:
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            running += loss.item() * len(yb)
            count += len(yb)
        losses.append(running / count)
        if log_metric:
            log_metric("prompt_loss", losses[-1], epoch)
    return losses


def prompt_parameters(learner: PromptLearner) -> list[torch.Tensor]:
    return [learner.ctx, *learner.generator.parameters()]


def train_prompts(
    learner: PromptLearner,
    training: TrainingSet,
    seen: list[int],
    settings: PromptConfig,
    logit_scale: float,
    log_metric: Callable[[str, float, int], None] | None = None,
) -> list[float]:
    """Cross-entropy over all seen classes on ``training``'s draws; returns the per-epoch loss."""
    if not training.classes:
        raise PromptError("no training embeddings for any seen class")
    seen_t = torch.tensor(seen)
    position = class_positions(seen)

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logit_scale * F.normalize(x.float(), dim=-1) @ learner.features(seen_t).T
        return F.cross_entropy(logits, position[y])

    learner.train()
    losses = train_epochs([ParamGroup(prompt_parameters(learner), "adamw", settings.lr)], settings.epochs, training,
                          settings, batch_loss, log_metric)
    learner.eval()
    return losses


def save_prompt_state(
    path: str | Path,
    learner: PromptLearner,
    seen: list[int],
    trained: bool,
    extra: dict[str, str] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """The learner's trainable tensors and the classes it knows (ids, names, zero-shot
    features: the state is all a later task needs of earlier ones), plus e.g. a head's
    tensors under their own prefix."""
    if list(seen) != learner.class_ids:
        raise PromptError(f"{path}: the learner knows classes {learner.class_ids}, not the seen classes {list(seen)}")
    metadata = {
        "seen": json.dumps(list(seen)), "class_names": json.dumps(learner.class_names), "n_ctx": str(learner.n_ctx),
        "trained": json.dumps(trained), **(extra or {}),
    }
    tensors = {**learner.trainable_state(), "class_features": learner.class_features.detach(), **(extra_tensors or {})}
    write_tensors(path, tensors, metadata=metadata)


def load_prompt_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise PromptError(f"{path}: no prompt state (run the finetune step of that task)")
    meta = read_tensor_metadata(path)
    info = {"seen": json.loads(meta["seen"]), "n_ctx": int(meta["n_ctx"]), "trained": json.loads(meta["trained"])}
    info["class_names"] = json.loads(meta.get("class_names", "[]"))
    info.update({k: v for k, v in meta.items() if k not in ("seen", "n_ctx", "trained", "class_names")})
    return read_tensors(path), info


def learner_from_state(text_model: nn.Module, tokenizer, state: dict[str, torch.Tensor], info: dict) -> PromptLearner:
    """The learner a prompt state describes: its classes and trained context."""
    learner = PromptLearner(
        text_model, tokenizer, info["class_names"], state["class_features"], info["n_ctx"],
        class_ids=info["seen"], feature_dim=state["class_features"].shape[1],
    )
    learner.load_trainable_state(state)
    return learner
