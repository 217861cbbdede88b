"""`speed.cross_attention: dense_backward`: the cross-attention's backward pass as dense matrix products computes
the gradients of `F.scaled_dot_product_attention` (CPU, float64 to 1e-10; bf16 within bf16 error), in the tiny
transformer eagerly and traced by dynamo/AOT autograd (how the compiled blocks run it on the GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import SanaVideoTransformer3DModel
from diffusers.models.transformers.transformer_sana_video import SanaAttnProcessor2_0

from job.models.sanavideo import cross_attention as xattn
from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG
from job.train.model import prepare_transformer
from train_helpers import make_spec, spec_dict


def _qkv_bias(dtype, batch=2, heads=3, queries=37, keys=9, dim=16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
               for n in (queries, keys, keys))
    bias = torch.zeros(batch, 1, 1, keys, dtype=dtype)
    bias[1, ..., 5:] = -10000.0  # diffusers' padding bias
    return q, k, v, bias


def _grads(fn, q, k, v, bias, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, bias)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in (q, k, v)]


def _sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_dense_backward_gives_the_gradients_of_sdpa_in_float64():
    q, k, v, bias = _qkv_bias(torch.float64)
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out_ref, grads_ref = _grads(_sdpa, q, k, v, bias, grad_out)
    out, grads = _grads(xattn.dense_backward_attention, q, k, v, bias, grad_out)
    assert torch.equal(out, out_ref)  # the same forward
    for got, want in zip(grads, grads_ref):
        assert _rel(got, want) < 1e-10
    assert float(grads[1][1, :, 5:].abs().max()) < 1e-3 * float(grads[1].abs().max())  # masked keys get ~no gradient


def test_dense_backward_in_bf16_is_as_close_to_float64_as_sdpa_in_bf16():
    q64, k64, v64, bias64 = _qkv_bias(torch.float64, queries=301, dim=32)
    grad64 = torch.randn(q64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, exact = _grads(_sdpa, q64, k64, v64, bias64, grad64)
    bf = [t.detach().to(torch.bfloat16) for t in (q64, k64, v64, bias64, grad64)]
    _, sdpa_bf16 = _grads(_sdpa, *bf)
    _, dense_bf16 = _grads(xattn.dense_backward_attention, *bf)
    for dense, sdpa, want in zip(dense_bf16, sdpa_bf16, exact):
        assert _rel(dense, want) <= max(2 * _rel(sdpa, want), 1e-2)


def test_without_gradient_or_with_many_keys_the_fused_kernel_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(xattn._DenseBackwardAttention, "apply", lambda *a: calls.append(1) or _sdpa(*a))
    q, k, v, bias = _qkv_bias(torch.float32)
    with torch.no_grad():
        xattn.dense_backward_attention(q, k, v, bias)
    assert calls == []
    monkeypatch.setattr(xattn, "MAX_DENSE_KEYS", 8)
    xattn.dense_backward_attention(q, k, v, bias)  # 9 keys
    assert calls == []
    monkeypatch.setattr(xattn, "MAX_DENSE_KEYS", 9)
    xattn.dense_backward_attention(q, k, v, bias)
    assert calls == [1]


def _model(layers=2):
    torch.manual_seed(0)
    return SanaVideoTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": layers}).double()


def _loss_and_grads(model):
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    model.zero_grad(set_to_none=True)
    out = model(hidden_states=torch.randn(2, 4, 3, 8, 12, generator=g, dtype=torch.float64),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g, dtype=torch.float64),
                timestep=torch.tensor([100.0, 900.0]), encoder_attention_mask=mask, return_dict=False)[0]
    loss = (out ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("traced", [False, True])
def test_the_transformer_learns_the_same_with_the_dense_backward(monkeypatch, traced):
    plain = _model()
    fast = copy.deepcopy(plain)
    assert xattn.use_dense_backward_cross_attention(fast) == 2
    assert xattn.use_dense_backward_cross_attention(fast) == 0  # idempotent
    calls = []
    real = xattn._DenseBackwardAttention.backward
    monkeypatch.setattr(xattn._DenseBackwardAttention, "backward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    if traced:  # what compile_blocks does on CUDA, without inductor's code generation
        torch._dynamo.reset()
        for block in fast.transformer_blocks:
            block.compile(backend="aot_eager")
    loss_p, grads_p = _loss_and_grads(plain)
    loss_f, grads_f = _loss_and_grads(fast)
    assert calls  # the dense backward ran (traced into the backward graph when compiled)
    assert abs(float(loss_f - loss_p)) <= 1e-12 * float(loss_p)
    assert grads_p.keys() == grads_f.keys()
    attn2 = [n for n in grads_p if ".attn2." in n]
    assert attn2
    for name in grads_p:
        assert _rel(grads_f[name], grads_p[name]) < 1e-10, name
    if traced:
        torch._dynamo.reset()


def test_prepare_transformer_swaps_it_by_default_and_the_switch_keeps_diffusers(tmp_path, tiny_model):
    model = _model()
    prepare_transformer(model, make_spec(spec_dict(tmp_path, tiny_model)))
    assert all(isinstance(b.attn2.processor, xattn.DenseBackwardCrossAttnProcessor) for b in model.transformer_blocks)
    model = _model()
    prepare_transformer(model, make_spec(spec_dict(tmp_path, tiny_model, speed={"cross_attention": "diffusers"})))
    assert all(type(b.attn2.processor) is SanaAttnProcessor2_0 for b in model.transformer_blocks)
