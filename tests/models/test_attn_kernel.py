"""`job.models.sanavideo.attn_kernel`: the linear attention's two token reductions as Triton kernels, run in
Triton's CPU interpreter against the float32 einsums they replace and a float64 reference, and where the fused
attention processor uses them (inference only, switchable). The switch reaching the processors:
tests/train/test_attn_kernel_switch.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from job.models.sanavideo import attn_kernel
from job.models.sanavideo import speed as speed_mod


def _inputs(b, n, h, c, seed=0):
    """q, k, v, q_rot, k_rot in (B, N, H, C) bf16; q and k after ReLU as in the model, the rotary versions
    rotated by the model's own rotary function."""
    g = torch.Generator().manual_seed(seed)
    q = torch.relu(torch.randn(b, n, h, c, generator=g)).to(torch.bfloat16)
    k = torch.relu(torch.randn(b, n, h, c, generator=g)).to(torch.bfloat16)
    v = torch.randn(b, n, h, c, generator=g).to(torch.bfloat16)
    angle = torch.rand(1, n, 1, c, generator=g) * 6.3
    cos, sin = angle.cos(), angle.sin()
    return q, k, v, speed_mod._rotate(q, cos, sin), speed_mod._rotate(k, cos, sin)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape,scores_config,apply_config", [
    ((2, 150, 2, 112), (64, 32, 4), (32, 4)),  # the model's head dim (padded to 128), N no multiple of a tile
    ((2, 37, 2, 24), (16, 16, 1), (16, 1)),  # a smaller head dim, more splits than one tile each
])
def test_kernels_match_the_float32_einsums(triton_interpreter, shape, scores_config, apply_config):
    q, k, v, q_rot, k_rot = _inputs(*shape)
    c = shape[-1]
    scores, key_sum = attn_kernel.scores_and_key_sum(v, k_rot, k, scores_config)
    assert scores.shape == (2, 2, attn_kernel._padded(c), attn_kernel._padded(c))
    assert scores[..., c:, :].abs().max() == 0 and scores[..., :, c:].abs().max() == 0 and key_sum[..., c:].abs().max() == 0
    # bf16 products are exact in float32: only the summation order differs from the float32 einsums
    exact_scores = torch.einsum("bnhc,bnhd->bhcd", v.double(), k_rot.double())  # B, H, C, C
    assert _rel(scores[..., :c, :c], exact_scores) < 1e-6
    assert _rel(key_sum[..., :c], k.double().sum(1)) < 1e-6

    out = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    attn_kernel.apply_scores(q, q_rot, scores, key_sum, out, apply_config)
    assert torch.isfinite(out).all()  # every element written
    current = attn_kernel.reference(q, k, v, q_rot, k_rot)  # the processor's float32 einsums, rounded to bf16
    differ = out != current
    assert differ.float().mean() < 0.05  # rounding ties of the last bit only
    # at most one bf16 step of the result, plus float32 summation-order noise where the sum cancels to near zero
    # (measured: under 1e-6 of the sum of |terms|)
    ulp = current.double().abs() * 2.0 ** -7
    terms = torch.einsum("bhcd,bnhd->bnhc", exact_scores.abs(), q_rot.double().abs()) / \
        (torch.einsum("bnhc,bhc->bnh", q.double(), k.double().sum(1)) + 1e-15).unsqueeze(-1)
    assert ((out.double() - current.double()).abs() <= ulp + 2.0 ** -16 * terms)[differ].all()
    exact = attn_kernel.reference(*(t.double() for t in (q, k, v, q_rot, k_rot)))
    assert _rel(out, exact) < 4e-3 and _rel(out, exact) <= 1.05 * _rel(current, exact)


def test_op_is_deterministic_and_returns_token_major_bf16(triton_interpreter):
    q, k, v, q_rot, k_rot = _inputs(1, 70, 2, 24, seed=3)
    first = torch.ops.trainer.linear_attention(q, k, v, q_rot, k_rot)
    assert first.shape == q.shape and first.dtype == torch.bfloat16 and first.is_contiguous()
    assert torch.equal(first, torch.ops.trainer.linear_attention(q, k, v, q_rot, k_rot))
    assert _rel(first, attn_kernel.reference(q, k, v, q_rot, k_rot)) < 1e-2


def test_unsupported_inputs_are_named():
    q, k, v, q_rot, k_rot = _inputs(1, 5, 2, 8)
    assert attn_kernel.unsupported(q, k, v, q_rot, k_rot) is None
    assert "dims" in attn_kernel.unsupported(q[0], k, v, q_rot, k_rot)
    assert "float32" in attn_kernel.unsupported(q, k, v.float(), q_rot, k_rot)
    assert "shapes differ" in attn_kernel.unsupported(q, k[:, :3], v, q_rot, k_rot)
    assert "head dim" in attn_kernel.unsupported(*_inputs(1, 2, 1, 136))
    heads_last = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert "contiguous" in attn_kernel.unsupported(heads_last, k, v, q_rot, k_rot)
    with pytest.raises(ValueError, match="float32"):
        attn_kernel.launch(q.float(), k, v, q_rot, k_rot)


def _model(layers: int = 2):
    from diffusers import SanaVideoTransformer3DModel

    from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return SanaVideoTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": layers}).to(torch.bfloat16).eval()


def _model_inputs():
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return dict(hidden_states=torch.randn(2, 4, 3, 8, 12, generator=g).to(torch.bfloat16),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g).to(torch.bfloat16),
                timestep=torch.tensor([100.0, 900.0]), encoder_attention_mask=mask, return_dict=False)


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    real = attn_kernel.linear_attention
    monkeypatch.setattr(attn_kernel, "linear_attention", lambda *a: calls.append(1) or real(*a))
    return calls


def _attention_and_inputs():
    """One block's self-attention of the tiny model with its own inputs: hidden states and the rotary tables."""
    model = _model(layers=1)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 3, 8, 12, generator=g).to(torch.bfloat16)
    rotary = model.rope(latents)
    hidden = torch.randn(2, 3 * 4 * 6, model.config.num_attention_heads * model.config.attention_head_dim,
                         generator=g).to(torch.bfloat16)
    return model.transformer_blocks[0].attn1, hidden, rotary


def test_attention_with_the_kernels_matches_without(triton_interpreter, op_calls):
    attn, hidden, rotary = _attention_and_inputs()
    speed_mod.use_fused_linear_attention(SimpleNamespace(transformer_blocks=[SimpleNamespace(attn1=attn)]))
    exact_attn = copy.deepcopy(attn).double()
    with torch.no_grad():
        plain = attn(hidden, rotary_emb=rotary)
        assert op_calls == []
        attn.processor.kernels = True
        fused = attn(hidden, rotary_emb=rotary)
        exact = exact_attn(hidden.double(), rotary_emb=rotary)  # float64: the einsums (no kernel for float64)
    assert op_calls == [1]
    assert fused.shape == plain.shape and fused.dtype == plain.dtype
    assert _rel(fused, plain) < 1e-3  # measured 1.8e-4: last-bit differences of the bf16 attention output
    assert _rel(fused, exact) <= 1.05 * _rel(plain, exact)  # both ~2e-3: bf16 projections


def test_kernels_only_without_gradients_and_where_they_can_run(triton_interpreter, op_calls, monkeypatch):
    attn, hidden, rotary = _attention_and_inputs()
    attn.set_processor(speed_mod.FusedLinearAttnProcessor(kernels=True))
    out = attn(hidden, rotary_emb=rotary)  # training: the projections' weights require grad
    assert op_calls == [] and out.requires_grad
    frozen = copy.deepcopy(attn).requires_grad_(False)
    frozen(hidden, rotary_emb=rotary)  # grad mode on, nothing needs one
    assert op_calls == [1]
    with torch.no_grad():
        attn.processor.kernels = False  # the switch off
        attn(hidden, rotary_emb=rotary)
        attn.processor.kernels = True
        copy.deepcopy(attn).float()(hidden.float(), rotary_emb=rotary)  # a dtype the kernels do not take
        assert op_calls == [1]
        monkeypatch.delenv("TRAINER_TRITON_ON_CPU")  # a CPU tensor outside the interpreter
        attn(hidden, rotary_emb=rotary)
    assert op_calls == [1]


def test_whole_model_forward_with_the_kernels_matches_without(triton_interpreter, op_calls):
    model = _model()
    speed_mod.use_fused_linear_attention(model)
    with torch.no_grad():
        plain = model(**_model_inputs())[0]
        speed_mod.use_fused_linear_attention(model, kernels=True)  # processors swapped before: updated
        fused = model(**_model_inputs())[0]
    assert op_calls == [1, 1]
    assert _rel(fused, plain) < 1e-2


def test_compiled_attention_calls_the_op_without_graph_breaks(triton_interpreter, op_calls):
    """Inside torch.compile (as in the compiled transformer blocks) the custom op is one graph node."""
    attn, hidden, rotary = _attention_and_inputs()
    attn.set_processor(speed_mod.FusedLinearAttnProcessor(kernels=True))
    attn.requires_grad_(False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: attn(h, rotary_emb=rotary), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(hidden)
        attn.processor.kernels = False
        ref = attn(hidden, rotary_emb=rotary)
    assert op_calls == [1]
    assert _rel(out, ref) < 1e-2
    torch._dynamo.reset()

