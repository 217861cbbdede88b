"""Masked loss end to end: mask files -> cached at latent resolution -> batch -> loss, on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from job.cache import format as fmt
from job.train import run_train
from job.train.session import build_session
from job.train.step import compute_loss
from pipeline_helpers import cache, loss_with_changed_prediction, pipeline_spec, write_clips


@pytest.fixture
def masked_job(tmp_path, tiny_model):
    """Two clips; clip 0 has a black/white PNG mask (left half), clip 1 an RGBA cut-out (left half opaque)."""
    write_clips(tmp_path / "ws" / "clips")
    masks = tmp_path / "ws" / "clips" / "masks"
    masks.mkdir()
    half = np.zeros((64, 64), dtype=np.uint8)
    half[:, :32] = 255
    Image.fromarray(half).save(masks / "clip_000.png")
    rgba = np.full((64, 64, 4), 255, dtype=np.uint8)  # white everywhere: only the alpha says where
    rgba[:, 32:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(masks / "clip_001.png")
    spec, ws = pipeline_spec(tmp_path / "ws", tiny_model, dataset={"masks_dir": "masks"}, train={"masked_loss": True})
    result = cache(spec, ws)
    assert result.latents.failed == 0 and result.latents.cached == 2
    return spec, ws


def test_masks_are_cached_at_latent_resolution_from_luminance_or_alpha(masked_job):
    spec, ws = masked_job
    folder = ws.latent_cache_dir(spec.data.datasets[0])
    samples = [fmt.read_sample(folder, key) for key in fmt.read_manifest(folder)]
    assert len(samples) == 2
    for sample in samples:
        assert tuple(sample.mask.shape) == (1, *sample.latents.shape[1:]) == (1, 2, 8, 8)
        assert torch.all(sample.mask[..., :4] == 1) and torch.all(sample.mask[..., 4:] == 0)


def _loss_with_perturbed_prediction(s, batch, where: torch.Tensor | None) -> float:
    """compute_loss with the transformer's prediction changed where `where` is 1 (same noise and sigmas)."""
    return loss_with_changed_prediction(s, batch, None if where is None else lambda pred: pred + 5.0 * where.to(pred.dtype))


def test_the_loss_ignores_everything_outside_the_cached_mask(masked_job):
    spec, ws = masked_job
    s = build_session(spec, ws)
    batch = next(iter(s.loader))
    mask = batch["mask"]
    assert mask is not None and tuple(mask.shape) == (1, 1, 2, 8, 8)
    base = _loss_with_perturbed_prediction(s, batch, None)
    outside = _loss_with_perturbed_prediction(s, batch, (1 - mask).expand_as(batch["latents"]))
    inside = _loss_with_perturbed_prediction(s, batch, mask.expand_as(batch["latents"]))
    assert outside == pytest.approx(base, rel=1e-6, abs=1e-7)
    assert inside > base + 1.0

    # the gradient reaching the prediction is zero outside the mask and not inside
    grads = []
    real = s.transformer

    def keep_grad(*args, **kwargs):
        pred = real(*args, **kwargs)[0]
        pred.register_hook(grads.append)
        return (pred,)

    s.transformer = keep_grad
    compute_loss(s, batch).backward()
    s.transformer = real
    grad = grads[0]
    assert torch.all(grad[..., 4:] == 0) and grad[..., :4].abs().sum() > 0


def test_masked_training_runs_from_the_cache(masked_job):
    spec, ws = masked_job
    result = run_train(spec, ws)
    assert result.status == "completed" and result.step == 2


def test_spec_rules_for_masked_loss(tmp_path, tiny_model):
    from job.errors import SpecError
    from pipeline_helpers import loaded

    with pytest.raises(SpecError) as err:  # masked loss without any masks
        loaded(tmp_path, tiny_model, train={"masked_loss": True})
    assert [p.path for p in err.value.problems] == ["train.masked_loss"]
    unused = loaded(tmp_path, tiny_model, dataset={"masks_dir": "masks"})  # masks without masked loss
    assert "train.masked_loss" in {w.path for w in unused.warnings}
    used = loaded(tmp_path, tiny_model, dataset={"masks_dir": "masks"}, train={"masked_loss": True})
    assert "train.masked_loss" not in {w.path for w in used.warnings}
