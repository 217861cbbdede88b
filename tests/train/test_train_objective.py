"""The flow-matching objective: formulas, the pipeline's timestep convention, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from job.models.sanavideo.objective import FlowMatchingObjective, shift_sigmas, sigmas_to_timesteps
from job.spec.train import TimestepSpec


def test_inputs_and_target_follow_rectified_flow():
    obj = FlowMatchingObjective(TimestepSpec())
    x0 = torch.randn(3, 4, 2, 4, 4)
    noise = torch.randn_like(x0)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    inputs = obj.make_inputs(x0, sigmas, noise)
    torch.testing.assert_close(inputs.noisy[0], x0[0])
    torch.testing.assert_close(inputs.noisy[2], noise[2])
    torch.testing.assert_close(inputs.noisy[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(inputs.target, noise - x0)
    torch.testing.assert_close(inputs.timesteps, torch.tensor([0.0, 250.0, 1000.0]))
    assert inputs.noisy.dtype == torch.float32


def test_shift_formula():
    s = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    shifted = shift_sigmas(s, 3.0)
    torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))
    assert shifted[2].item() == pytest.approx(0.75)
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)


def test_timesteps_match_the_pipeline_scheduler_convention():
    """SanaVideoPipeline passes `scheduler.timesteps` straight to the transformer; with flow sigmas
    those are sigma * num_train_timesteps (1000), truncated to int64. Training uses the same mapping."""
    from diffusers import DPMSolverMultistepScheduler

    from job.models.sanavideo.tiny import SCHEDULER_CONFIG

    sched = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    sched.set_timesteps(10)
    sigmas = torch.as_tensor(sched.sigmas[:-1], dtype=torch.float64)
    # the scheduler stores them as int64 (truncated); training keeps the fraction
    assert torch.equal(sigmas_to_timesteps(sigmas).floor().long(), sched.timesteps)


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_sigmas_are_seeded_and_in_range(scheme):
    obj = FlowMatchingObjective(TimestepSpec(weighting_scheme=scheme, flow_shift=3.0))
    a = obj.sample_sigmas(512, torch.Generator().manual_seed(1))
    b = obj.sample_sigmas(512, torch.Generator().manual_seed(1))
    c = obj.sample_sigmas(512, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and a.dtype == torch.float32
    # the shift moves mass toward high noise: the median of the shifted logit-normal is 0.75
    if scheme == "logit_normal":
        assert a.median().item() == pytest.approx(0.75, abs=0.06)


def test_training_inputs_reproducible_and_sliced_per_process():
    obj = FlowMatchingObjective(TimestepSpec())
    x0 = torch.randn(4, 4, 2, 4, 4)
    full = obj.training_inputs(x0, torch.Generator().manual_seed(3))
    again = obj.training_inputs(x0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(full.noisy, again.noisy, rtol=0, atol=0)
    # two processes with 2 samples each see exactly the global batch's noise and sigmas
    parts = [obj.training_inputs(x0[r * 2:(r + 1) * 2], torch.Generator().manual_seed(3), world_size=2, rank=r) for r in range(2)]
    torch.testing.assert_close(torch.cat([p.noise for p in parts]), full.noise, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p.sigmas for p in parts]), full.sigmas, rtol=0, atol=0)


def test_loss_weighting_and_mask():
    target = torch.zeros(2, 4, 2, 4, 4)
    pred = torch.ones(2, 4, 2, 4, 4)
    pred[1] *= 2
    sigmas = torch.tensor([0.5, 0.5])
    plain = FlowMatchingObjective(TimestepSpec())
    torch.testing.assert_close(plain.loss_per_sample(pred, target, sigmas), torch.tensor([1.0, 4.0]))
    assert plain.loss(pred, target, sigmas).item() == pytest.approx(2.5)
    cosmap = FlowMatchingObjective(TimestepSpec(loss_weighting="cosmap"))
    w = 2 / (math.pi * (1 - 2 * 0.5 + 2 * 0.25))
    torch.testing.assert_close(cosmap.loss_per_sample(pred, target, sigmas), torch.tensor([w, 4 * w]))
    # the mask restricts the loss to its region
    pred_m = torch.zeros(1, 4, 2, 4, 4)
    pred_m[..., :2] = 3.0
    mask = torch.zeros(1, 1, 2, 4, 4)
    mask[..., :2] = 1.0
    assert plain.loss(pred_m, torch.zeros_like(pred_m), sigmas[:1], mask).item() == pytest.approx(9.0)
    assert plain.loss(pred_m, torch.zeros_like(pred_m), sigmas[:1], 1 - mask).item() == pytest.approx(0.0)
    # bf16 predictions still give an fp32 loss
    assert plain.loss(pred.bfloat16(), target, sigmas).dtype == torch.float32
