"""The stable evaluation loss: fixed noise and sigmas, deterministic, leaves training state alone."""

from __future__ import annotations

import pytest
import torch

from job.spec.validation import EvalLossSpec
from job.validate.eval_loss import EvalLoss


@pytest.fixture
def holdout(tiny_components, embeddings_for):
    g = torch.Generator().manual_seed(3)
    captions = ["A cat sleeping on a warm sunny windowsill.", "A red car drives along a winding mountain road.",
                "The camera slowly pans across a calm blue lake."]
    items = []
    for caption in captions:
        embeds, mask = embeddings_for(caption)
        items.append((torch.randn(4, 2, 4, 6, generator=g), embeds[0], mask[0]))  # cached shapes: unbatched
    return items


def test_deterministic_per_sigma_and_clean(fresh_components, holdout):
    transformer = fresh_components().transformer
    transformer.train()
    spec = EvalLossSpec(enabled=True, timesteps=[0.1, 0.5, 0.9], max_samples=2, step_interval=10)
    evaluator = EvalLoss(spec, holdout)
    assert len(evaluator) == 2
    weights = [p.detach().clone() for p in transformer.parameters()]
    torch.manual_seed(99)
    rng = torch.get_rng_state()

    first = evaluator(transformer)
    second = evaluator(transformer)
    assert first.overall == second.overall and first.per_sigma == second.per_sigma
    assert list(first.per_sigma) == [0.1, 0.5, 0.9] and first.samples == 2
    values = list(first.per_sigma.values())
    assert len(set(values)) == 3 and all(v > 0 for v in values)
    assert first.overall == pytest.approx(sum(values) / 3)
    assert first.metrics()["eval_loss/sigma_0.50"] == first.per_sigma[0.5]

    assert transformer.training  # mode restored
    assert torch.equal(rng, torch.get_rng_state())  # global RNG untouched
    assert all(torch.equal(p, w) for p, w in zip(transformer.parameters(), weights))
    assert all(p.grad is None for p in transformer.parameters())  # no_grad

    # another EvalLoss over the same items sees the same noise; changing the weights changes the loss
    assert EvalLoss(spec, holdout)(transformer).overall == first.overall
    with torch.no_grad():
        next(transformer.parameters()).add_(0.1)
    assert evaluator(transformer).overall != first.overall


def test_accepts_job_spec_dict_items_and_due(spec_factory, tiny_components, holdout):
    spec, _ = spec_factory(validation={"eval_loss": {"enabled": True, "step_interval": 5, "timesteps": [0.3]}})
    items = [{"latents": x[None], "prompt_embeds": e[None], "prompt_attention_mask": m[None]} for x, e, m in holdout]
    evaluator = EvalLoss(spec, items)
    assert len(evaluator) == 3 and evaluator.due(10) and not evaluator.due(7) and not evaluator.due(0)
    result = evaluator(tiny_components.transformer)
    assert set(result.per_sigma) == {0.3} and len(result.per_item) == 3
    assert not EvalLoss(spec, []).due(5)
    with pytest.raises(ValueError, match="holdout"):
        EvalLoss(spec, [])(tiny_components.transformer)
