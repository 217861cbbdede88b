"""Validation rendering from cached embeddings, sharing the loaded modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from job.models.sanavideo.loading import SanaVideoComponents
from job.models.sanavideo.prompts import encode_negative_prompts, encode_prompts
from job.models.sanavideo.validation import build_pipeline, render


@pytest.fixture(scope="module")
def embeds(tiny_components):
    c = tiny_components
    pos = encode_prompts(c.text_encoder, c.tokenizer, ["A cat sleeping on a warm windowsill."])
    neg = encode_negative_prompts(c.text_encoder, c.tokenizer, [""])
    return pos, neg


def _render(pipe, embeds, **overrides):
    (pe, pm), (ne, nm) = embeds
    args = dict(width=64, height=32, num_frames=9, guidance=6.0, steps=2, seed=42)
    args.update(overrides)
    return render(pipe, pe, pm, ne, nm, **args)


def test_shares_modules(tiny_components):
    pipe = build_pipeline(tiny_components, tiny_components.scheduler)
    assert pipe.transformer is tiny_components.transformer
    assert pipe.vae is tiny_components.vae
    assert pipe.scheduler is not tiny_components.scheduler  # own copy: rendering never mutates the caller's
    assert pipe.scheduler.config == tiny_components.scheduler.config


def test_shape_and_determinism(tiny_components, embeds):
    pipe = build_pipeline(tiny_components)
    a = _render(pipe, embeds)
    assert a.shape == (1, 9, 32, 64, 3) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    b = _render(pipe, embeds)
    c = _render(pipe, embeds, seed=43)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    d = _render(pipe, embeds, num_frames=5, width=32, height=64)
    assert d.shape == (1, 5, 64, 32, 3)


def test_equals_stock_pipeline_with_prompts(tiny_components, tiny_pipeline, embeds):
    """Cached embeddings + render == the stock pipeline given the prompt strings."""
    ours = _render(build_pipeline(tiny_components), embeds)
    ref = tiny_pipeline(
        prompt="A cat sleeping on a warm windowsill.",
        negative_prompt="",
        num_inference_steps=2,
        guidance_scale=6.0,
        height=32,
        width=64,
        frames=9,
        generator=torch.Generator().manual_seed(42),
        output_type="np",
        use_resolution_binning=False,
    ).frames
    np.testing.assert_array_equal(ours, ref)


def test_caller_state_untouched(tiny_components, embeds):
    c = tiny_components
    pipe = build_pipeline(c)
    c.transformer.train()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    try:
        _render(pipe, embeds)
        assert c.transformer.training  # training mode restored
        assert not c.vae.training
        assert torch.equal(rng, torch.get_rng_state())  # global RNG not advanced
    finally:
        c.transformer.eval()


def test_without_text_encoder(tiny_components, embeds):
    c = tiny_components
    slim = SanaVideoComponents(model_path=c.model_path, transformer=c.transformer, vae=c.vae, scheduler=c.scheduler)
    pipe = build_pipeline(slim)
    assert pipe.text_encoder is None
    full = _render(build_pipeline(c), embeds)
    np.testing.assert_array_equal(_render(pipe, embeds), full)


def test_callback_and_no_cfg(tiny_components, embeds):
    pipe = build_pipeline(tiny_components)
    steps = []

    def callback(_pipe, i, t, kwargs):
        steps.append((i, tuple(kwargs["latents"].shape)))
        return {}

    (pe, pm), _ = embeds
    out = render(pipe, pe, pm, None, None, 64, 32, 9, 1.0, 3, 0, callback_on_step_end=callback)
    assert out.shape == (1, 9, 32, 64, 3)
    assert [i for i, _ in steps] == [0, 1, 2] and steps[0][1] == (1, 4, 3, 4, 8)


def test_batch_with_one_negative(tiny_components, embeds):
    (pe, pm), (ne, nm) = embeds
    pipe = build_pipeline(tiny_components)
    out = render(pipe, pe.repeat(2, 1, 1), pm.repeat(2, 1), ne, nm, 32, 32, 5, 6.0, 1, 0)
    assert out.shape == (2, 5, 32, 32, 3)


def test_refusals(tiny_components, embeds):
    pipe = build_pipeline(tiny_components)
    (pe, pm), _ = embeds
    with pytest.raises(ValueError, match="negative"):
        render(pipe, pe, pm, None, None, 32, 32, 5, 6.0, 1, 0)
    with pytest.raises(ValueError, match="multiples of 32"):
        _render(pipe, embeds, width=48)
    with pytest.raises(ValueError, match="4k\\+1"):
        _render(pipe, embeds, num_frames=8)
