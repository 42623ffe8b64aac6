"""Per-class generators of CLIP image embeddings (design, section B).

``VaeBank`` holds the VAEs of many classes as one model: every weight has a leading class
dimension and every layer is a batched matmul, so fitting all classes of a task costs one
training loop, while the maths stays that of independent per-class VAEs (per-class
BatchNorm statistics, per-class losses, per-class Adam state and step counts, per-class
shuffling and noise streams). ``GaussBank`` and ``MogBank`` are the ablations. All three
share one interface: ``fit_bank`` / ``sample`` / ``save_bank`` / ``load_bank``.

One module, over 400 lines: the three generator kinds share one batched-bank interface,
its file format and its fitting loop; each kind is a few dozen lines of it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import GaussGenerator, MogGenerator, VaeGenerator
from pipeline.errors import UserError
from pipeline.io import read_tensor_metadata, read_tensors, write_tensors

log = logging.getLogger(__name__)

GeneratorSettings = Union[VaeGenerator, GaussGenerator, MogGenerator]


class GeneratorError(UserError):
    pass


def class_generator(seed: int, class_id: int, stream: int) -> torch.Generator:
    """Each class has its own random streams, so a class's fit does not depend on which
    other classes share its bank (stream 0: init, 1: shuffling, 2: noise, 3: sampling,
    4: the prior draws that measure a fitted VAE's spread)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + class_id) * 8 + stream) % (2**63))


# --------------------------------------------------------------------------- batched layers


class BatchedLinear(nn.Module):
    """``C`` independent ``nn.Linear(n_in, n_out)``: weight ``[C, n_in, n_out]``."""

    def __init__(self, n_classes: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_classes, n_out))

    def reset(self, index: int, generator: torch.Generator) -> None:
        # nn.Linear's default initialisation: U(-1/sqrt(n_in), 1/sqrt(n_in)).
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        with torch.no_grad():
            self.weight[index].uniform_(-bound, bound, generator=generator)
            self.bias[index].uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [C, B, n_in]
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class BatchedBatchNorm(nn.Module):
    """``C`` independent ``nn.BatchNorm1d``; in training, statistics over each class's
    real rows only (``mask``), as if each class had its own batch."""

    def __init__(self, n_classes: int, width: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(n_classes, width))
        self.bias = nn.Parameter(torch.zeros(n_classes, width))
        self.register_buffer("running_mean", torch.zeros(n_classes, width))
        self.register_buffer("running_var", torch.ones(n_classes, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            m = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None else mask.to(x.dtype)
            n = m.sum(1).clamp_min(1.0)[:, None, None]
            m = m.unsqueeze(-1)
            mean = (x * m).sum(1, keepdim=True) / n
            var = ((x - mean) ** 2 * m).sum(1, keepdim=True) / n
            with torch.no_grad():
                active = (n > 1).squeeze(-1)
                unbiased = var.squeeze(1) * (n / (n - 1).clamp_min(1.0)).squeeze(-1)
                new_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean.squeeze(1)
                new_var = (1 - self.momentum) * self.running_var + self.momentum * unbiased
                self.running_mean.copy_(torch.where(active, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(active, new_var, self.running_var))
        else:
            mean, var = self.running_mean.unsqueeze(1), self.running_var.unsqueeze(1)
        out = (x - mean) / torch.sqrt(var + self.eps) * self.weight.unsqueeze(1) + self.bias.unsqueeze(1)
        if mask is not None:
            # Padding rows would otherwise be normalised by their class's statistics into
            # huge values whose inf/NaN reach the real rows' gradients through 0 * inf.
            out = out * mask.unsqueeze(-1).to(out.dtype)
        return out


class VaeBank(nn.Module):
    """Encoder ``Linear BN LeakyReLU Linear BN LeakyReLU Linear(h, 2k)``, decoder
    ``Linear LeakyReLU Linear LeakyReLU Linear(h, d)``, per class, on standardised inputs."""

    def __init__(self, n_classes: int, dim: int, hidden: int, latent: int, observation_noise: str = "none"):
        super().__init__()
        self.dim, self.hidden, self.latent = dim, hidden, latent
        self.observation_noise = observation_noise
        self.enc1, self.bn1 = BatchedLinear(n_classes, dim, hidden), BatchedBatchNorm(n_classes, hidden)
        self.enc2, self.bn2 = BatchedLinear(n_classes, hidden, hidden), BatchedBatchNorm(n_classes, hidden)
        self.enc3 = BatchedLinear(n_classes, hidden, 2 * latent)
        self.dec1 = BatchedLinear(n_classes, latent, hidden)
        self.dec2 = BatchedLinear(n_classes, hidden, hidden)
        self.dec3 = BatchedLinear(n_classes, hidden, dim)
        self.register_buffer("mean", torch.zeros(n_classes, dim))
        self.register_buffer("std", torch.ones(n_classes, dim))
        # What the decoder's prior samples lack of the class's spread (standardised space):
        # per dimension, or as a covariance factor (d x d per class, stored only if used).
        if observation_noise == "matched_variance":
            self.register_buffer("noise_std", torch.zeros(n_classes, dim))
        elif observation_noise == "matched_covariance":
            self.register_buffer("noise_factor", torch.zeros(n_classes, dim, dim))

    def observe(self, decoded: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Decoder outputs ``[C, n, d]`` plus this bank's observation noise."""
        if self.observation_noise == "none":
            return decoded
        eps = torch.randn(decoded.shape, generator=generator)
        if self.observation_noise == "matched_variance":
            return decoded + eps * self.noise_std[:, None, :]
        return decoded + eps @ self.noise_factor.transpose(1, 2)

    @property
    def n_classes(self) -> int:
        return self.mean.shape[0]

    def linears(self) -> list[BatchedLinear]:
        return [self.enc1, self.enc2, self.enc3, self.dec1, self.dec2, self.dec3]

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.leaky_relu(self.bn1(self.enc1(x), mask), 0.2)
        h = F.leaky_relu(self.bn2(self.enc2(h), mask), 0.2)
        mu, logvar = self.enc3(h).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.dec1(z), 0.2)
        h = F.leaky_relu(self.dec2(h), 0.2)
        return self.dec3(h)


def vae_loss(x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per sample: ``0.5 ||x - x_hat||^2 + KL(N(mu, sigma^2) || N(0, I))``."""
    recon = 0.5 * (x - x_hat).pow(2).sum(-1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
    return recon + kl


def warm_restart_lr(base: float, epoch: int, t0: int, t_mult: int = 2) -> float:
    """``CosineAnnealingWarmRestarts(T_0=t0, T_mult=t_mult)`` after ``epoch`` steps."""
    if epoch < t0:
        t_cur, t_i = epoch, t0
    else:
        n = int(math.log(epoch / t0 * (t_mult - 1) + 1, t_mult))
        t_cur = epoch - t0 * (t_mult**n - 1) / (t_mult - 1)
        t_i = t0 * t_mult**n
    return base * (1 + math.cos(math.pi * t_cur / t_i)) / 2


class MaskedAdam:
    """Adam over parameters with a leading class dimension; a step updates only the
    classes that had a batch, with per-class step counts (torch.optim.Adam's maths)."""

    def __init__(self, params: list[nn.Parameter], n_classes: int, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.betas, self.eps = betas, eps
        self.steps = torch.zeros(n_classes)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, active: torch.Tensor, lr: float) -> None:
        beta1, beta2 = self.betas
        self.steps += active.float()
        all_active = bool(active.all())
        steps = self.steps.clamp_min(1.0)
        bias2_sqrt = (1 - beta2**steps).sqrt()
        # Inactive classes move by zero; in-place updates keep this memory-bound loop to a
        # few passes over the (large) stacked parameters.
        step_size = torch.where(active, lr / (1 - beta1**steps), torch.zeros_like(steps))
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.ndim - 1)
            g = p.grad
            if all_active:
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            else:
                act = active.to(g.dtype).view(shape)
                m.mul_(torch.where(active, beta1, 1.0).view(shape)).add_(g * act, alpha=1 - beta1)
                v.mul_(torch.where(active, beta2, 1.0).view(shape)).addcmul_(g * act, g, value=1 - beta2)
            denom = v.sqrt().div_(bias2_sqrt.view(shape)).add_(self.eps)
            p.addcdiv_(m * step_size.view(shape), denom, value=-1.0)


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled batches; a last batch of one sample is dropped, since
    BatchNorm cannot normalise a single sample."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def fit_vae_bank(
    data: list[torch.Tensor], class_ids: list[int], settings: VaeGenerator, seed: int
) -> tuple[VaeBank, list[float]]:
    """Fit one VAE per class at once; return the bank and each class's final-epoch loss."""
    n_classes, dim = len(data), data[0].shape[1]
    bank = VaeBank(n_classes, dim, settings.hidden, settings.latent, settings.observation_noise)
    for c, cid in enumerate(class_ids):
        init = class_generator(seed, cid, 0)
        for layer in bank.linears():
            layer.reset(c, init)
    standardised = []
    with torch.no_grad():
        for c, x in enumerate(data):
            bank.mean[c] = x.mean(0)
            bank.std[c] = x.std(0).clamp_min(1e-6)
            standardised.append((x - bank.mean[c]) / bank.std[c])
    shuffles = [class_generator(seed, cid, 1) for cid in class_ids]
    noises = [class_generator(seed, cid, 2) for cid in class_ids]
    optimizer = MaskedAdam(list(bank.parameters()), n_classes)
    t0 = max(1, settings.epochs // 10)
    batch_size = settings.batch_size
    last_losses = [0.0] * n_classes
    bank.train()
    for epoch in range(settings.epochs):
        lr = warm_restart_lr(settings.lr, epoch, t0)
        schedules = [_epoch_batches(len(x), batch_size, g) for x, g in zip(standardised, shuffles)]
        n_steps = max(len(s) for s in schedules)
        epoch_loss = torch.zeros(n_classes)
        epoch_count = torch.zeros(n_classes)
        for step in range(n_steps):
            x = torch.zeros(n_classes, batch_size, dim)
            eps = torch.zeros(n_classes, batch_size, settings.latent)
            mask = torch.zeros(n_classes, batch_size)
            for c, schedule in enumerate(schedules):
                if step < len(schedule):
                    rows = schedule[step]
                    x[c, : len(rows)] = standardised[c][rows]
                    mask[c, : len(rows)] = 1
                    eps[c, : len(rows)] = torch.randn(len(rows), settings.latent, generator=noises[c])
            active = mask.sum(1) > 0
            mu, logvar = bank.encode(x, mask)
            z = mu + torch.exp(0.5 * logvar) * eps
            per_sample = vae_loss(x, bank.decode(z), mu, logvar) * mask
            per_class = per_sample.sum(1) / mask.sum(1).clamp_min(1)
            bank.zero_grad(set_to_none=True)
            per_class.sum().backward()
            optimizer.step(active, lr)
            epoch_loss += per_class.detach() * active
            epoch_count += active.float()
        last_losses = (epoch_loss / epoch_count.clamp_min(1)).tolist()
    bank.eval()
    if settings.observation_noise != "none":
        _match_spread(bank, standardised, class_ids, seed)
    return bank, last_losses


# Prior draws per class that measure how far a fitted VAE's samples spread.
SPREAD_DRAWS = 2048


@torch.no_grad()
def _match_spread(bank: VaeBank, standardised: list[torch.Tensor], class_ids: list[int], seed: int) -> None:
    """Set the observation noise so that decoder output plus noise has the class's own
    variance in every standardised dimension (1), or its whole covariance. The decoder's
    prior samples carry a fraction of it (about 0.2 on real digit images), and real
    within-class spread lies along a few directions that classes share: per-dimension noise
    restores the amount, only the covariance restores the overlap."""
    z = torch.stack([torch.randn(SPREAD_DRAWS, bank.latent, generator=class_generator(seed, cid, 4)) for cid in class_ids])
    decoded = bank.decode(z)
    if bank.observation_noise == "matched_variance":
        bank.noise_std.copy_((1.0 - decoded.var(dim=1)).clamp_min(0).sqrt())
        return
    for c, x in enumerate(standardised):
        missing = torch.cov(x.double().T) - torch.cov(decoded[c].double().T)
        values, vectors = torch.linalg.eigh(missing)
        bank.noise_factor[c] = (vectors * values.clamp_min(0).sqrt()).float()


# --------------------------------------------------------------------------- banks


@dataclass
class Bank:
    """The generators of some classes (one task's, or a chunk of it)."""

    kind: str
    class_ids: list[int]
    dim: int
    tensors: dict[str, torch.Tensor]
    settings: dict[str, Any]
    fit_loss: list[float]

    def sample(self, n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_per_class`` synthetic embeddings per class, reproducible from ``seed``."""
        out, labels = [], []
        if self.kind == "vae":
            with torch.no_grad():
                for c, cid in enumerate(self.class_ids):
                    g = class_generator(seed, cid, 3)
                    vae = _single_class_vae(self.tensors, self.settings, c)
                    z = torch.randn(1, n_per_class, vae.latent, generator=g)
                    x = vae.observe(vae.decode(z), g)[0]
                    out.append(x * vae.std[0] + vae.mean[0])
                    labels.append(torch.full((n_per_class,), cid, dtype=torch.long))
        elif self.kind == "gauss":
            for c, cid in enumerate(self.class_ids):
                g = class_generator(seed, cid, 3)
                noise = torch.randn(n_per_class, self.dim, generator=g)
                out.append(self.tensors["mean"][c] + noise * self.tensors["std"][c])
                labels.append(torch.full((n_per_class,), cid, dtype=torch.long))
        elif self.kind == "mog":
            for c, cid in enumerate(self.class_ids):
                g = class_generator(seed, cid, 3)
                weights = self.tensors["weights"][c]
                comp = torch.multinomial(weights, n_per_class, replacement=True, generator=g)
                noise = torch.randn(n_per_class, self.dim, generator=g)
                out.append(self.tensors["means"][c][comp] + noise * self.tensors["stds"][c][comp])
                labels.append(torch.full((n_per_class,), cid, dtype=torch.long))
        else:  # pragma: no cover
            raise GeneratorError(f"unknown generator kind {self.kind!r}")
        return torch.cat(out), torch.cat(labels)


def _single_class_vae(tensors: dict[str, torch.Tensor], settings: dict[str, Any], c: int) -> VaeBank:
    """Class ``c``'s VAE alone, straight from the saved tensors (one class at a time
    bounds the memory of sampling)."""
    # Banks fitted before observation noise existed have no such setting: they sample as before.
    vae = VaeBank(1, tensors["mean"].shape[1], settings["hidden"], settings["latent"], settings.get("observation_noise", "none"))
    vae.load_state_dict({k: v[c : c + 1] for k, v in tensors.items()})
    return vae.eval()


# Parameters of the classes fitted together, on CPU. Adam touches every parameter four times
# a step; when a chunk's parameters and optimizer state stay in cache, the batched bank runs
# at ~2x a one-VAE-at-a-time loop, while all 100 classes of a large task at once (2.3 GB of
# state) stream from memory and run slower than the loop (benchmarks/vae_bank.py).
CPU_CHUNK_PARAMETER_BYTES = 32 * 2**20


def cache_sized_chunk(settings: VaeGenerator, dim: int) -> int:
    """How many classes of this VAE size keep their parameters within the CPU budget."""
    h, k = settings.hidden, settings.latent
    per_class = (dim * h + h * h + h * 2 * k) + (k * h + h * h + h * dim) + 4 * h + 2 * k + dim
    return max(1, CPU_CHUNK_PARAMETER_BYTES // (4 * per_class))


def vae_chunks(class_ids: list[int], settings: VaeGenerator, dim: int, chunk_classes: int | None = None) -> list[list[int]]:
    """The groups of classes fitted together as one batched bank. Seeds are per class, but
    a bank's floats may still depend on its group (batched kernels, Adam's all-active
    path), so these boundaries are the unit of work in one process and on a cluster alike."""
    chunk = chunk_classes or settings.chunk_classes or cache_sized_chunk(settings, dim)
    return [class_ids[start : start + chunk] for start in range(0, len(class_ids), chunk)]


def fit_vae_chunk(
    data: list[torch.Tensor], class_ids: list[int], *, settings: VaeGenerator, seed: int
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One chunk of classes: the fitted bank's tensors and its classes' final losses."""
    bank, losses = fit_vae_bank([x.float() for x in data], class_ids, settings, seed)
    return {k: v.detach().clone() for k, v in bank.state_dict().items()}, losses


def fit_mog_class(x: torch.Tensor, class_id: int, *, settings: MogGenerator, seed: int):
    """One class's diagonal mixture, padded to ``settings.components``: (means, stds,
    weights, loss)."""
    from sklearn.mixture import GaussianMixture

    x = x.double().numpy()
    k = min(settings.components, len(x))
    gmm = GaussianMixture(k, covariance_type="diag", random_state=(seed * 1_000_003 + class_id) % (2**31), reg_covar=1e-5)
    gmm.fit(x)
    pad = settings.components - k
    means = F.pad(torch.from_numpy(gmm.means_).float(), (0, 0, 0, pad))
    stds = F.pad(torch.from_numpy(gmm.covariances_).float().sqrt(), (0, 0, 0, pad), value=1.0)
    weights = F.pad(torch.from_numpy(gmm.weights_).float(), (0, pad))
    return means, stds, weights, float(-gmm.score(x))


def fit_bank(
    data: dict[int, torch.Tensor],
    settings: GeneratorSettings,
    seed: int,
    chunk_classes: int | None = None,
    client=None,
) -> Bank:
    """Fit the generators of the classes in ``data`` (class id -> embeddings [n, d]).

    With a dask ``client`` (``pipeline.scaleout``), the VAE chunks (``vae_chunks``) and
    the mixtures' classes are fitted on the cluster's workers, by the same functions and
    along the same boundaries as in one process, and merged here into one bank: the same
    tensors either way."""
    from pipeline.scaleout import run_shards

    class_ids = sorted(data)
    if not class_ids:
        raise GeneratorError("no classes to fit")
    for cid in class_ids:
        x = data[cid]
        if x.ndim != 2 or len(x) < 2:
            raise GeneratorError(f"class {cid} has {len(x)} training embedding(s); at least 2 are needed to fit a generator")
        if not torch.isfinite(x).all():
            raise GeneratorError(f"class {cid}: embeddings contain NaN or inf")
    dim = data[class_ids[0]].shape[1]
    settings_dict = settings.model_dump(mode="json")
    if isinstance(settings, VaeGenerator):
        shards = [([data[c] for c in ids], ids) for ids in vae_chunks(class_ids, settings, dim, chunk_classes)]
        states, losses = [], []
        for state, loss in run_shards(client, fit_vae_chunk, shards, settings=settings, seed=seed):
            states.append(state)
            losses.extend(loss)
        tensors = {k: torch.cat([s[k] for s in states]) for k in states[0]}
        return Bank("vae", class_ids, dim, tensors, settings_dict, losses)
    if isinstance(settings, GaussGenerator):
        means = torch.stack([data[c].float().mean(0) for c in class_ids])
        stds = torch.stack([data[c].float().std(0).clamp_min(1e-6) for c in class_ids])
        return Bank("gauss", class_ids, dim, {"mean": means, "std": stds}, settings_dict, [0.0] * len(class_ids))
    if isinstance(settings, MogGenerator):
        fitted = list(run_shards(client, fit_mog_class, [(data[c], c) for c in class_ids], settings=settings, seed=seed))
        tensors = {name: torch.stack([f[i] for f in fitted]) for i, name in enumerate(("means", "stds", "weights"))}
        return Bank("mog", class_ids, dim, tensors, settings_dict, [f[3] for f in fitted])
    raise GeneratorError(f"unknown generator settings {settings!r}")  # pragma: no cover


def save_bank(path: str | Path, bank: Bank, extra_metadata: dict[str, str] | None = None) -> None:
    metadata = {
        "kind": bank.kind,
        "class_ids": json.dumps(bank.class_ids),
        "dim": str(bank.dim),
        "settings": json.dumps(bank.settings),
        "fit_loss": json.dumps(bank.fit_loss),
        **(extra_metadata or {}),
    }
    write_tensors(path, bank.tensors, metadata=metadata)


def load_bank(path: str | Path) -> Bank:
    path = Path(path)
    if not path.exists():
        raise GeneratorError(f"{path}: no generator bank (run the generators step for that task)")
    meta = read_tensor_metadata(path)
    return Bank(
        kind=meta["kind"],
        class_ids=json.loads(meta["class_ids"]),
        dim=int(meta["dim"]),
        tensors=read_tensors(path),
        settings=json.loads(meta["settings"]),
        fit_loss=json.loads(meta["fit_loss"]),
    )
