"""Scheduled sampling (rollout): the plan, the rollout itself with stand-in models, and training with it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from job.models.sanavideo.objective import FlowMatchingObjective
from job.spec.train import ScheduledSamplingSpec, TimestepSpec
from job.train import run_train
from job.train.rollout import rollout_inputs, rollout_plan
from job.train.session import build_session
from job.train.step import compute_loss
from train_helpers import make_job


def fake_session(model, probability=1.0, max_steps=3, seed=0):
    spec = SimpleNamespace(train=SimpleNamespace(scheduled_sampling=ScheduledSamplingSpec(probability=probability,
                                                                                          max_rollout_steps=max_steps)))
    return SimpleNamespace(spec=spec, model=model, generator=torch.Generator().manual_seed(seed), world=1, rank=0,
                           weight_dtype=torch.float32)


def test_the_plan_follows_the_probability_and_splits_like_one_process():
    sig = torch.full((8,), 0.5)
    assert not rollout_plan(0.0, 3, sig, torch.Generator().manual_seed(0)).any()
    steps = rollout_plan(1.0, 3, sig, torch.Generator().manual_seed(0))
    assert bool(((steps >= 1) & (steps <= 3)).all()) and len(set(steps.tolist())) > 1
    whole = rollout_plan(0.5, 4, sig, torch.Generator().manual_seed(1))
    parts = [rollout_plan(0.5, 4, sig[:4], torch.Generator().manual_seed(1), world_size=2, rank=r) for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)
    assert not rollout_plan(1.0, 3, torch.full((4,), 0.01), torch.Generator()).any()  # too little noise: no rollout


def _inputs(seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, 2, 8, 8, generator=g)
    objective = FlowMatchingObjective(TimestepSpec(weighting_scheme="uniform", flow_shift=1.0))
    return x0, objective.training_inputs(x0, g)


def test_an_exact_model_rolls_out_onto_the_plain_inputs():
    x0, inputs = _inputs()

    def exact(x, timestep, **_):  # the true velocity of the straight path: noise - x0
        return (inputs.noise - x0,)

    out = rollout_inputs(fake_session(exact), x0, inputs, None, None)
    torch.testing.assert_close(out.noisy, inputs.noisy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.target, inputs.target, atol=1e-4, rtol=1e-4)


def test_a_lazy_model_leaves_x_where_the_rollout_started_and_the_target_points_at_x0():
    x0, inputs = _inputs(seed=1)
    calls = []

    def frozen(x, timestep, **_):  # predicts no motion: x stays at the starting point
        calls.append(timestep.clone())
        return (torch.zeros_like(x),)

    s = fake_session(frozen, max_steps=2)
    state = s.generator.get_state()
    out = rollout_inputs(s, x0, inputs, None, None)
    steps = rollout_plan(1.0, 2, inputs.sigmas, torch.Generator().manual_seed(0).set_state(state))
    sigma_t = inputs.sigmas.view(-1, 1, 1, 1, 1)
    start = sigma_t + steps.view(-1, 1, 1, 1, 1) * (1 - sigma_t) / 2
    expected = (1 - start) * x0 + start * inputs.noise
    torch.testing.assert_close(out.noisy, expected)
    torch.testing.assert_close(out.target, (expected - x0) / sigma_t)
    assert len(calls) == int(steps.max())
    assert torch.equal(out.sigmas, inputs.sigmas) and torch.equal(out.timesteps, inputs.timesteps)


def test_probability_zero_changes_nothing():
    x0, inputs = _inputs()
    s = fake_session(lambda *a, **k: pytest.fail("the model must not run"), probability=0.0)
    out = rollout_inputs(s, x0, inputs, None, None)
    assert out.noisy is inputs.noisy and out.target is inputs.target


def test_rollout_loss_is_different_and_only_the_final_forward_has_gradients(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path, tiny_model, train={"scheduled_sampling": {"probability": 1.0, "max_rollout_steps": 2},
                                                    "timesteps": {"weighting_scheme": "uniform", "flow_shift": 1.0}})
    s = build_session(spec, ws)
    batch = next(iter(s.loader))
    state = s.generator.get_state()
    forwards = []
    hook = s.model.register_forward_hook(lambda m, a, kw_out, *rest: forwards.append(torch.is_grad_enabled()))
    loss = compute_loss(s, batch)
    hook.remove()
    assert forwards[-1] is True and forwards[:-1] and not any(forwards[:-1])  # rollouts ran without autograd
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.params)
    s.generator.set_state(state)
    spec.train.scheduled_sampling.probability = 0.0
    with torch.no_grad():
        plain = compute_loss(s, batch)
    assert loss.item() > 0 and abs(loss.item() - plain.item()) > 1e-6


def test_training_with_scheduled_sampling_completes(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 3,
                                                    "scheduled_sampling": {"probability": 0.5, "max_rollout_steps": 3}})
    result = run_train(spec, ws)
    assert result.status == "completed" and result.step == 3


def test_spec_rules_for_scheduled_sampling(tmp_path, tiny_model):
    from job.errors import SpecError
    from pipeline_helpers import loaded

    def warned(**ss):
        return {w.path for w in loaded(tmp_path, tiny_model, train={"scheduled_sampling": ss}).warnings}

    assert "train.scheduled_sampling.max_rollout_steps" in warned(max_rollout_steps=4)
    assert "train.scheduled_sampling.max_rollout_steps" not in warned(probability=0.2, max_rollout_steps=4)
    for bad in ({"probability": 1.5}, {"max_rollout_steps": 0}, {"max_rollout_steps": 9}):
        with pytest.raises(SpecError):
            loaded(tmp_path, tiny_model, train={"scheduled_sampling": bad})
