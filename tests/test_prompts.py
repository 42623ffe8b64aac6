"""The class-specific prompt learner's context generator (design, section D)."""

from __future__ import annotations

import torch

from pipeline.prompts import ContextGenerator


def test_context_generator_gives_the_same_tokens_in_training_and_at_inference():
    torch.manual_seed(0)
    generator = ContextGenerator(8, 6)
    classes = torch.randn(5, 8)
    generator.train()
    trained = generator(classes)
    # A few training passes: running statistics, if any were kept, would now differ.
    for _ in range(3):
        generator(torch.randn(7, 8))
    generator.eval()
    assert torch.allclose(generator(classes), trained, atol=1e-6)
    # It normalises over the classes it is given: another set changes a class's token.
    assert not torch.allclose(generator(classes[:3]), trained[:3], atol=1e-3)
    assert not any("running" in name for name in generator.state_dict())
