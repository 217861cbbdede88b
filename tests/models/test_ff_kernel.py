"""`job.models.sanavideo.ff_kernel`: the feed-forward's SiLU + depthwise 3x3 + gate as one Triton kernel, run in
Triton's CPU interpreter against the PyTorch ops it replaces, and where the fused feed-forward uses it (inference
only, switchable)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from job.models.sanavideo import ff_kernel
from job.models.sanavideo import speed as speed_mod


def _inputs(n, h, w, c, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(n, h, w, 2 * c, generator=g) * 2).to(dtype)
    weight = (torch.randn(2 * c, 1, 3, 3, generator=g) * 0.4).to(dtype)
    b = torch.randn(2 * c, generator=g).to(dtype) if bias else None
    return v, weight, b


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _emulated(v, weight, bias):
    """The compiled reference path's roundings, written out: SiLU stored in v's dtype, the depthwise conv's
    output stored in v's dtype, the bias and the gate in float32, one rounding at the end."""
    s = F.silu(v.float()).to(v.dtype).float()
    d = F.conv2d(s.permute(0, 3, 1, 2), weight.float(), None, padding=1, groups=v.shape[-1]).permute(0, 2, 3, 1)
    d = d.to(v.dtype).float() + (bias.float() if bias is not None else 0)
    a, g = d.chunk(2, dim=-1)
    return (a * F.silu(g)).to(v.dtype)


@pytest.mark.parametrize("shape,bias", [((4, 5, 7, 37), True), ((1, 1, 1, 3), True), ((3, 6, 2, 20), False)])
def test_kernel_matches_the_reference_in_float32(triton_interpreter, shape, bias):
    v, weight, b = _inputs(*shape, torch.float32, bias=bias)
    out = torch.ops.trainer.ff_dwconv_silu_gate(v, weight, b)
    expected = ff_kernel.reference(v.double(), weight.double(), b.double() if bias else None)
    assert out.shape == (*shape[:3], shape[3]) and out.dtype == torch.float32 and out.is_contiguous()
    assert _rel(out, expected) < 1e-6


@pytest.mark.parametrize("config,width", [((4, 16, 1), 7), ((8, 32, 2), 11)])
def test_kernel_in_bf16_repeats_the_reference_roundings(triton_interpreter, config, width):
    """Several frames, odd H and W, C not a multiple of the channel block, more than one column tile (the last
    partial): every output written (poisoned with NaN first), equal to the reference's bf16 roundings up to the
    float32 order of the 9-tap sum, and as close to a float64 reference as the current bf16 path."""
    v, weight, b = _inputs(3, 5, width, 37, torch.bfloat16, seed=3)
    out = torch.full((3, 5, width, 37), float("nan"), dtype=torch.bfloat16)
    ff_kernel.launch(v, weight, b, out, config=config)
    assert torch.isfinite(out).all()
    emulated = _emulated(v, weight, b)
    differ = out != emulated
    assert differ.float().mean() < 0.01
    ulp = emulated.float().abs().clamp_min(1e-30) * 2.0 ** -7  # one bf16 step (8 significant bits)
    assert ((out.float() - emulated.float()).abs() <= ulp)[differ].all()
    exact = ff_kernel.reference(v.double(), weight.double(), b.double())
    current = ff_kernel.reference(v, weight, b)  # the PyTorch ops in bf16
    assert _rel(out, exact) < 1e-2
    assert _rel(out, exact) <= 1.5 * _rel(current, exact)


def test_unsupported_inputs_are_named():
    v, weight, b = _inputs(1, 2, 3, 4, torch.bfloat16)
    assert ff_kernel.unsupported(v, weight, b) is None
    assert "dims" in ff_kernel.unsupported(v[0], weight, b)
    assert "float64" in ff_kernel.unsupported(v.double(), weight, b)
    assert "channels-last" in ff_kernel.unsupported(v.transpose(-1, -2).contiguous().transpose(-1, -2), weight, b)
    assert "value and gate" in ff_kernel.unsupported(v[..., :7], weight[:7], b[:7])
    assert "depthwise 3x3" in ff_kernel.unsupported(v, weight[:, :, :1], b)
    assert "bias" in ff_kernel.unsupported(v, weight, b[:4])
    with pytest.raises(ValueError, match="channels-last"):
        ff_kernel.launch(v.transpose(-1, -2).contiguous().transpose(-1, -2), weight, b, torch.empty(1, 2, 3, 4))


def _glumb(dtype=torch.bfloat16, channels: int = 12):
    from diffusers.models.transformers.transformer_sana_video import GLUMBTempConv

    torch.manual_seed(1)
    ff = GLUMBTempConv(channels, channels, 2.5, norm_type=None, residual_connection=False)
    with torch.no_grad():
        for p in ff.parameters():
            p.normal_(0, 0.3)
    return ff.to(dtype)


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    real = ff_kernel.ff_dwconv_silu_gate
    monkeypatch.setattr(ff_kernel, "ff_dwconv_silu_gate", lambda *a: calls.append(1) or real(*a))
    return calls


def test_feedforward_with_the_kernel_matches_without(triton_interpreter, op_calls):
    ff = _glumb()
    x = torch.randn(2, 3, 5, 7, 12, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        exact = _glumb(torch.float64)(x.double())
        plain = speed_mod.glumb_forward_channels_last(ff, x)
        assert op_calls == []
        fused = speed_mod.glumb_forward_channels_last(ff, x, kernels=True)
    assert op_calls == [1]
    assert fused.shape == plain.shape
    assert _rel(fused, plain) < 1e-2 and _rel(fused, exact) <= 1.5 * _rel(plain, exact)


def test_kernel_only_without_gradients_and_where_it_can_run(triton_interpreter, op_calls, monkeypatch):
    ff = _glumb()
    x = torch.randn(1, 2, 3, 4, 12, dtype=torch.bfloat16)
    out = speed_mod.glumb_forward_channels_last(ff, x, kernels=True)  # training: parameters require grad
    assert op_calls == [] and out.requires_grad
    out = speed_mod.glumb_forward_channels_last(ff, x.requires_grad_(True), kernels=True)
    assert op_calls == [] and out.requires_grad
    frozen = copy.deepcopy(ff).requires_grad_(False)
    speed_mod.glumb_forward_channels_last(frozen, x.detach(), kernels=True)  # grad mode on, nothing needs one
    assert op_calls == [1]
    with torch.no_grad():
        speed_mod.glumb_forward_channels_last(ff, x, kernels=False)  # the switch off
        speed_mod.glumb_forward_channels_last(copy.deepcopy(ff).double(), x.double(), kernels=True)  # a dtype it does not take
        assert op_calls == [1]
        monkeypatch.delenv("TRAINER_TRITON_ON_CPU")  # a CPU tensor outside the interpreter
        speed_mod.glumb_forward_channels_last(ff, x, kernels=True)
    assert op_calls == [1]


def test_compiled_block_calls_the_op_without_graph_breaks(triton_interpreter, op_calls):
    """Inside torch.compile (as in the compiled transformer blocks) the custom op is one graph node."""
    ff = _glumb()
    x = torch.randn(1, 2, 3, 5, 12, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: speed_mod.glumb_forward_channels_last(ff, t, kernels=True), fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad():
        out = compiled(x)
        ref = speed_mod.glumb_forward_channels_last(ff, x)
    assert op_calls == [1]
    assert _rel(out, ref) < 1e-2
    torch._dynamo.reset()
