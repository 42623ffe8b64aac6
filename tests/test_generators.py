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
