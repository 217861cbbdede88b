"""LoRA with float8 products (`train.mixed_precision: fp8`): the frozen base weights are cast to float8 once
(`job.train.quantize.FrozenFloat8Weights`) instead of in every forward and backward pass. The cached copies are
what torchao's dynamic cast makes of the same weights, so loss and adapter gradients are bit-identical to the
uncached path, eagerly and traced by dynamo/AOT autograd (where the fused feed-forward's products use them);
a weight written in place or moved gets a fresh copy; full fine-tunes (weights that train) cache nothing."""

from __future__ import annotations

import pytest
import torch

from job.models.sanavideo import speed
from job.train import quantize
from job.train.model import prepare_transformer
from train_helpers import make_spec, spec_dict

pytest.importorskip("torchao")

LORA16 = {"type": "lora", "prompt": {"max_sequence_length": 8},
          "lora": {"rank": 16, "target_modules": ["to_q", "to_k", "to_v"]}}


def _model():
    from diffusers import SanaVideoTransformer3DModel

    from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)  # sizes divisible by 16, as float8 products need
    config = {**TINY_TRANSFORMER_CONFIG, "attention_head_dim": 16, "cross_attention_head_dim": 16, "cross_attention_dim": 32}
    return SanaVideoTransformer3DModel(**config).to(torch.bfloat16)


def _spec(model_path, **model):
    return make_spec(spec_dict(model_path.parent / "unused", model_path,
                               model={"pretrained_model_name_or_path": str(model_path), "base_model_precision": "bf16", **model},
                               train={"mixed_precision": "fp8", "max_train_steps": 2}))


def _prepared(tiny_model, monkeypatch, cache: bool, **model):
    with monkeypatch.context() as m:
        if not cache:
            m.setattr(quantize.FrozenFloat8Weights, "supported", staticmethod(lambda config: False))
        transformer = _model()
        prepare_transformer(transformer, _spec(tiny_model, **model))
    return transformer


def _loss_and_grads(model):
    g = torch.Generator().manual_seed(0)
    model.zero_grad(set_to_none=True)
    out = model(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g, dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g, dtype=torch.bfloat16),
                encoder_attention_mask=torch.ones(1, 8, dtype=torch.int64), timestep=torch.tensor([500.0]),
                return_dict=False)[0]
    loss = out.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compile_blocks_aot_eager(model):
    """What compile_blocks does on CUDA, with the aot_eager backend (the fused feed-forward runs only under compile)."""
    torch._dynamo.reset()
    for block in model.transformer_blocks:
        block.compile(backend="aot_eager")


@pytest.mark.parametrize("traced", [False, True])
def test_cached_float8_weights_give_bit_identical_lora_training(tiny_model, monkeypatch, traced):
    cached = _prepared(tiny_model, monkeypatch, cache=True, **LORA16)
    dynamic = _prepared(tiny_model, monkeypatch, cache=False, **LORA16)
    cache = getattr(cached, quantize.FROZEN_FLOAT8_CACHE_ATTR)
    blocks = len(cached.transformer_blocks)
    assert len(cache) == blocks * (8 + 3)  # 8 frozen base linears and 3 feed-forward GEMMs per block
    assert not hasattr(dynamic, quantize.FROZEN_FLOAT8_CACHE_ATTR)
    calls = []
    real = quantize.cached_float8
    monkeypatch.setattr(quantize, "cached_float8", lambda *a: calls.append(a[1]) or real(*a))
    if traced:
        _compile_blocks_aot_eager(cached)
        for block in dynamic.transformer_blocks:
            block.compile(backend="aot_eager")
    loss_c, grads_c = _loss_and_grads(cached)
    loss_d, grads_d = _loss_and_grads(dynamic)
    assert "weight" in calls and (("conv_inverted" in calls) == traced)  # the fused feed-forward runs only when traced
    assert torch.equal(loss_c, loss_d)
    assert grads_c.keys() == grads_d.keys() and any(".lora_B." in n for n in grads_c)
    for name in grads_c:
        assert torch.equal(grads_c[name], grads_d[name]), name
    if traced:
        torch._dynamo.reset()


def test_a_weight_written_in_place_gets_a_fresh_float8_copy(tiny_model, monkeypatch):
    cached = _prepared(tiny_model, monkeypatch, cache=True, **LORA16)
    dynamic = _prepared(tiny_model, monkeypatch, cache=False, **LORA16)
    _loss_and_grads(cached)  # builds the copies
    base = cached.transformer_blocks[0].attn1.to_q.base_layer
    scale_before = float(getattr(base, quantize.FROZEN_FLOAT8_ATTR)["weight"][1])
    with torch.no_grad():
        for model in (cached, dynamic):
            model.transformer_blocks[0].attn1.to_q.base_layer.weight.mul_(4.0)  # exact in bf16: amax x 4
    loss_c, _ = _loss_and_grads(cached)
    loss_d, _ = _loss_and_grads(dynamic)
    assert torch.equal(loss_c, loss_d)
    scale_after = float(getattr(base, quantize.FROZEN_FLOAT8_ATTR)["weight"][1])
    assert scale_after == pytest.approx(scale_before / 4, rel=1e-6)  # rebuilt from the new weights


def test_full_fine_tune_caches_nothing(tiny_model, monkeypatch):
    model = _prepared(tiny_model, monkeypatch, cache=True)
    assert not hasattr(model, quantize.FROZEN_FLOAT8_CACHE_ATTR)
    assert all(not hasattr(m, quantize.FROZEN_FLOAT8_ATTR) for m in model.modules())
    assert all(not hasattr(ff, quantize.FROZEN_FLOAT8_ATTR) for ff in speed._feedforwards(model))
