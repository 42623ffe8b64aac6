"""A per-class VAE written plainly (nn.Sequential, torch.optim.Adam, the torch scheduler),
fitted one class at a time: the reference the batched bank is checked and timed against."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.method.generators import _epoch_batches, class_generator, vae_loss


class ReferenceVae(nn.Module):
    """One class's VAE written plainly, as design section B describes it."""

    def __init__(self, d, h, k):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(d, h), nn.BatchNorm1d(h), nn.LeakyReLU(0.2),
            nn.Linear(h, h), nn.BatchNorm1d(h), nn.LeakyReLU(0.2), nn.Linear(h, 2 * k),
        )
        self.decoder = nn.Sequential(nn.Linear(k, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, d))


def fit_reference_vae(x, class_id, settings, seed):
    """Independent per-class fit with torch.optim.Adam and CosineAnnealingWarmRestarts."""
    d = x.shape[1]
    vae = ReferenceVae(d, settings.hidden, settings.latent)
    init = class_generator(seed, class_id, 0)
    linears = [m for m in list(vae.encoder) + list(vae.decoder) if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer in linears:
            bound = 1.0 / layer.in_features**0.5
            w = torch.empty(layer.in_features, layer.out_features).uniform_(-bound, bound, generator=init)
            layer.weight.copy_(w.T)
            layer.bias.uniform_(-bound, bound, generator=init)
    mean, std = x.mean(0), x.std(0)
    xs = (x - mean) / std
    opt = torch.optim.Adam(vae.parameters(), lr=settings.lr, foreach=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=max(1, settings.epochs // 10), T_mult=2)
    shuffle, noise = class_generator(seed, class_id, 1), class_generator(seed, class_id, 2)
    last_loss = 0.0
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for rows in _epoch_batches(len(xs), settings.batch_size, shuffle):
            batch = xs[rows]
            mu, logvar = vae.encoder(batch).chunk(2, dim=-1)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(len(rows), settings.latent, generator=noise)
            loss = vae_loss(batch, vae.decoder(z), mu, logvar).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            count += 1
        last_loss = total / count
        sched.step()
    return vae, mean, std, last_loss
