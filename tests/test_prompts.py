"""The class-specific prompt learner's context generator (design, section D)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.method.prompts import ContextGenerator


def test_context_generator_is_a_per_class_map_as_the_reference_runs_it():
    torch.manual_seed(0)
    generator = ContextGenerator(8, 6)
    classes = torch.randn(5, 8)
    generator.train()
    trained = generator(classes)
    for _ in range(3):
        generator(torch.randn(7, 8))
    generator.eval()
    assert torch.allclose(generator(classes), trained, atol=1e-6)
    # A class's token depends on that class alone: a subset, a single class, or other
    # company give the same rows (the seen set grows task by task).
    assert torch.allclose(generator(classes[:3]), trained[:3], atol=1e-6)
    assert torch.allclose(generator(classes[4:5]), trained[4:5], atol=1e-6)
    assert torch.allclose(generator(torch.cat([torch.randn(9, 8), classes[1:2]]))[-1], trained[1], atol=1e-6)
    assert not any("running" in name for name in generator.state_dict())


def test_context_generator_equals_reference_batchnorm_frozen_at_its_initial_statistics():
    """The reference (mammoth models/cgil.py:53-56) turns track_running_stats off after the
    BatchNorm buffers exist and keeps the module in eval mode: BatchNorm1d then applies its
    initial statistics (0, 1). Same weights, same outputs."""
    torch.manual_seed(1)
    ours = ContextGenerator(8, 6)
    reference = nn.Sequential(
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.SELU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.SELU(),
        nn.Linear(8, 6), nn.BatchNorm1d(6), nn.SELU(), nn.Linear(6, 6),
    )
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.track_running_stats = False
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    reference.eval()
    missing, unexpected = ours.net.load_state_dict(reference.state_dict(), strict=False)
    assert not missing and all("running" in k or "num_batches" in k for k in unexpected)
    x = torch.randn(4, 8)
    assert torch.allclose(ours(x), reference(x), atol=1e-6)
