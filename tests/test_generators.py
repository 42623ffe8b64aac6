from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.reference_vae import fit_reference_vae
from pipeline.config import GaussGenerator, MogGenerator, VaeGenerator
from pipeline.method.generators import GeneratorError, fit_bank, fit_vae_bank, load_bank, save_bank

SETTINGS = VaeGenerator(name="vae", hidden=16, latent=4, epochs=6, batch_size=8, lr=2e-3)


def test_vae_bank_equals_independent_per_class_vaes():
    torch.manual_seed(0)
    # Unequal class sizes: the bank must handle classes that run out of batches early.
    data = [torch.randn(n, 12) * (c + 1) + c for c, n in enumerate((20, 13, 9))]
    ids = [4, 9, 2]
    bank, _ = fit_vae_bank(data, ids, SETTINGS, seed=7)
    for c, (x, cid) in enumerate(zip(data, ids)):
        ref, mean, std, _ = fit_reference_vae(x, cid, SETTINGS, seed=7)
        assert torch.allclose(bank.mean[c], mean) and torch.allclose(bank.std[c], std)
        ref_linears = [m for m in list(ref.encoder) + list(ref.decoder) if isinstance(m, nn.Linear)]
        for i, (ours, theirs) in enumerate(zip(bank.linears(), ref_linears)):
            assert torch.allclose(ours.weight[c], theirs.weight.T, atol=5e-5), (cid, i)
            # A bias right before BatchNorm gets a zero gradient up to rounding, which
            # Adam amplifies: it has no effect on the outputs, so only the others compare.
            if i not in (0, 1):
                assert torch.allclose(ours.bias[c], theirs.bias, atol=5e-5), (cid, i)
        # Same encoder outputs in training mode (batch statistics), same decoder outputs.
        xs = ((x - mean) / std)[None]
        bank.train()
        ref.train()
        ours_mu, ours_logvar = bank.encode(torch.cat([xs] * 1).expand(3, -1, -1).contiguous())
        theirs_mu, theirs_logvar = ref.encoder(xs[0]).chunk(2, dim=-1)
        assert torch.allclose(ours_mu[c], theirs_mu, atol=1e-4)
        assert torch.allclose(ours_logvar[c], theirs_logvar, atol=1e-4)
        z = torch.randn(1, 5, SETTINGS.latent).expand(3, -1, -1).contiguous()
        assert torch.allclose(bank.decode(z)[c], ref.decoder(z[0]), atol=1e-4)
        bank.eval()


def test_a_class_fits_the_same_alone_or_in_a_bank():
    torch.manual_seed(1)
    data = {3: torch.randn(10, 6), 8: torch.randn(12, 6) + 2}
    together = fit_bank(data, SETTINGS, seed=0)
    alone = fit_bank({8: data[8]}, SETTINGS, seed=0)
    for key, value in alone.tensors.items():
        assert torch.allclose(together.tensors[key][1], value[0], atol=1e-5), key


def test_chunked_fit_matches_one_bank():
    torch.manual_seed(2)
    data = {c: torch.randn(10, 6) + c for c in range(5)}
    whole = fit_bank(data, SETTINGS, seed=0)
    chunked = fit_bank(data, SETTINGS, seed=0, chunk_classes=2)
    for key in whole.tensors:
        assert torch.allclose(whole.tensors[key], chunked.tensors[key], atol=1e-5), key


@pytest.mark.parametrize(
    "settings",
    [SETTINGS, GaussGenerator(name="gauss"), MogGenerator(name="mog", components=2)],
    ids=["vae", "gauss", "mog"],
)
def test_sampling_is_reproducible_and_survives_save_and_load(settings, tmp_path):
    torch.manual_seed(3)
    data = {0: torch.randn(30, 5) + 5, 1: torch.randn(30, 5) - 5}
    bank = fit_bank(data, settings, seed=0)
    x1, y1 = bank.sample(50, seed=11)
    x2, _ = bank.sample(50, seed=11)
    x3, _ = bank.sample(50, seed=12)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert y1.tolist() == [0] * 50 + [1] * 50
    save_bank(tmp_path / "bank.safetensors", bank)
    loaded = load_bank(tmp_path / "bank.safetensors")
    assert loaded.kind == bank.kind and loaded.class_ids == [0, 1]
    assert torch.equal(loaded.sample(50, seed=11)[0], x1)
    # Samples land near their class, in raw (unstandardised) units.
    assert x1[:50].mean() > 2 and x1[50:].mean() < -2


def test_a_class_with_one_embedding_is_named():
    with pytest.raises(GeneratorError, match=r"class 7 has 1 training embedding"):
        fit_bank({3: torch.randn(5, 4), 7: torch.randn(1, 4)}, SETTINGS, seed=0)


def test_non_finite_embeddings_are_named():
    bad = torch.randn(5, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(GeneratorError, match=r"class 2: embeddings contain NaN"):
        fit_bank({2: bad}, SETTINGS, seed=0)


def _overlapping_classes(n_classes: int = 6, per_class: int = 120, dim: int = 32, seed: int = 0) -> dict[int, torch.Tensor]:
    """Classes whose spread lies mostly along two directions they all share, as real CLIP
    embeddings' does (digit images: the top direction alone holds 61% of a class's variance)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.linalg.qr(torch.randn(dim, 2, generator=g)).Q
    means = torch.randn(n_classes, 2, generator=g) @ shared.T + 0.15 * torch.randn(n_classes, dim, generator=g)
    return {
        c: means[c] + 2.0 * torch.randn(per_class, 2, generator=g) @ shared.T + 0.1 * torch.randn(per_class, dim, generator=g)
        for c in range(n_classes)
    }


def _nearest_mean_accuracy(x: torch.Tensor, y: torch.Tensor, means: torch.Tensor) -> float:
    return (torch.cdist(x, means).argmin(1) == y).float().mean().item()


def test_matched_covariance_samples_overlap_as_the_real_classes_do(tmp_path):
    data = _overlapping_classes()
    means = torch.stack([data[c].mean(0) for c in sorted(data)])
    real_x = torch.cat([data[c] for c in sorted(data)])
    real_y = torch.arange(len(data)).repeat_interleave(len(data[0]))
    real = _nearest_mean_accuracy(real_x, real_y, means)
    settings = VaeGenerator(name="vae", hidden=64, latent=16, epochs=60, batch_size=32, lr=2e-3)
    separability = {}
    for noise in ("none", "matched_variance", "matched_covariance"):
        bank = fit_bank(data, settings.model_copy(update={"observation_noise": noise}), seed=0)
        save_bank(tmp_path / f"{noise}.safetensors", bank)
        x, y = load_bank(tmp_path / f"{noise}.safetensors").sample(200, seed=1)
        separability[noise] = _nearest_mean_accuracy(x, y, means)
    # The decoder's prior samples, and per-dimension noise, leave the classes far more
    # separable than they are: a classifier trained on them learns margins real test
    # embeddings do not have (README, "Calibration on real images").
    assert separability["none"] > real + 0.08 and separability["matched_variance"] > real + 0.05, (real, separability)
    assert abs(separability["matched_covariance"] - real) < 0.04, (real, separability)
