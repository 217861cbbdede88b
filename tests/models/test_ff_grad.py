"""`job.models.sanavideo.ff_grad`: the feed-forward's SiLU/depthwise/gate backward as Triton kernels, run in Triton's
CPU interpreter against float64 references and autograd, and where the fused feed-forward uses them
(`speed.feedforward_backward`: training with trained feed-forward biases only)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from job.models.sanavideo import ff_grad
from job.models.sanavideo import speed as speed_mod
from job.models.sanavideo.tiny import build_tiny_feedforward

SMALL = (8, 16, 2, 3)  # BLOCK_M, BLOCK_C, warps, row programs: several blocks both ways at test sizes


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("config", [SMALL, None])
@pytest.mark.parametrize("with_sum", [True, False])
@pytest.mark.parametrize("rows,channels", [(37, 20), (5, 3), (130, 48)])
def test_gate_backward_matches_float64(triton_interpreter, rows, channels, with_sum, config):
    d, gx = _randn(rows, 2 * channels, seed=1, scale=2), _randn(rows, channels, seed=2)
    gd, sums = ff_grad.gate_backward(d, gx, with_sum, config)
    ref, ref_sums = ff_grad.gate_backward_reference(d.double(), gx.double(), True)
    assert gd.shape == d.shape and gd.dtype == torch.float32 and gd.is_contiguous()
    assert _rel(gd, ref) < 1e-6
    if with_sum:
        assert sums.shape == (2 * channels,) and sums.dtype == torch.float32 and _rel(sums, ref_sums) < 1e-6
    else:
        assert sums.numel() == 0


@pytest.mark.parametrize("config", [SMALL, None])
@pytest.mark.parametrize("with_sum", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows,channels", [(37, 40), (3, 6)])
def test_silu_backward_matches_float64(triton_interpreter, rows, channels, bias, with_sum, config):
    gu, v = _randn(rows, channels, seed=3), _randn(rows, channels, seed=4, scale=3)
    b = _randn(channels, seed=5) if bias else None
    gv, sums = ff_grad.silu_backward(gu, v, b, with_sum, config)
    ref, ref_sums = ff_grad.silu_backward_reference(gu.double(), v.double(), None if b is None else b.double(), True)
    assert gv.shape == v.shape and gv.dtype == torch.float32 and _rel(gv, ref) < 1e-6
    assert (_rel(sums, ref_sums) < 1e-6) if with_sum else sums.numel() == 0


def test_bf16_outputs_are_one_rounding_of_the_float32_result_and_sums_are_deterministic(triton_interpreter):
    """(N, H, W, C) inputs as the feed-forward has them; the bias sums of the unrounded float32 values (closer to
    float64 than summing the rounded gradient would be), the same bits on every call."""
    d = _randn(3, 4, 5, 2 * 24, dtype=torch.bfloat16, seed=6, scale=2)
    gx = _randn(3, 4, 5, 24, dtype=torch.bfloat16, seed=7)
    gd, sums = ff_grad.gate_backward(d, gx, True, SMALL)
    exact, exact_sums = ff_grad.gate_backward_reference(d.double(), gx.double(), True)
    assert gd.dtype == torch.bfloat16 and gd.shape == d.shape
    # within one bf16 step (8 significant bits) of the exact value: one rounding of the float32 result (Triton's
    # interpreter may truncate where the GPU rounds to nearest)
    assert ((gd.double() - exact).abs() <= exact.abs() * 2.0 ** -7 * 1.01 + 1e-30).all()
    assert _rel(sums, exact_sums) < 1e-6
    again, sums_again = ff_grad.gate_backward(d, gx, True, SMALL)
    assert torch.equal(gd, again) and torch.equal(sums, sums_again)

    v, gu = _randn(60, 32, dtype=torch.bfloat16, seed=8, scale=3), _randn(60, 32, dtype=torch.bfloat16, seed=9)
    b = _randn(32, dtype=torch.bfloat16, seed=10)
    gv, sums = ff_grad.silu_backward(gu, v, b, True, SMALL)
    exact, exact_sums = ff_grad.silu_backward_reference(gu.double(), v.double(), b.double(), True)
    assert ((gv.double() - exact).abs() <= exact.abs() * 2.0 ** -7 * 1.01 + 1e-30).all()
    assert _rel(sums, exact_sums) < 1e-6


def _plain_silu_depthwise_gate(v, in_bias, weight, bias):
    u = F.silu(v if in_bias is None else v + in_bias)
    d = F.conv2d(u.permute(0, 3, 1, 2), weight, bias, padding=1, groups=v.shape[-1]).permute(0, 2, 3, 1)
    a, g = d.chunk(2, dim=-1)
    return a * F.silu(g)


@pytest.mark.parametrize("in_bias,trained_weight", [(True, True), (False, True), (True, False)])
def test_silu_depthwise_gate_matches_autograd(triton_interpreter, in_bias, trained_weight):
    n, h, w, c2 = 2, 5, 7, 2 * 12
    v = _randn(n, h, w, c2, seed=11, scale=2).requires_grad_(True)
    b_in = _randn(c2, seed=12).requires_grad_(True) if in_bias else None
    weight = _randn(c2, 1, 3, 3, seed=13, scale=0.4).requires_grad_(trained_weight)
    bias = _randn(c2, seed=14).requires_grad_(True)
    grad_out = _randn(n, h, w, c2 // 2, seed=15)
    inputs = [t for t in (v, b_in, weight, bias) if t is not None and t.requires_grad]

    out = ff_grad.SiluDepthwiseGate.apply(v, b_in, weight, bias)
    grads = torch.autograd.grad(out, inputs, grad_out)
    as64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (v, b_in, weight, bias)]
    ref = _plain_silu_depthwise_gate(*as64)
    ref_grads = torch.autograd.grad(ref, [t for t in as64 if t is not None and t.requires_grad], grad_out.double())
    assert out.shape == (n, h, w, c2 // 2) and _rel(out, ref) < 1e-6
    assert len(grads) == len(ref_grads) == 3 + in_bias - (not trained_weight)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32 and _rel(got, want) < 1e-5


def test_silu_depthwise_gate_under_autocast_with_float32_parameters(triton_interpreter):
    """fp32 master weights under bf16 autocast: v in bf16, the biases and the depthwise weight in float32. The
    backward runs its convolutions in d's dtype (as autocast ran the forward's) and returns each gradient in its
    input's dtype, within bf16 tolerance of autograd through the same ops."""
    n, h, w, c2 = 2, 5, 7, 2 * 12
    v = _randn(n, h, w, c2, dtype=torch.bfloat16, seed=18, scale=2).requires_grad_(True)
    params = [_randn(c2, seed=19).requires_grad_(True), _randn(c2, 1, 3, 3, seed=20, scale=0.4).requires_grad_(True),
              _randn(c2, seed=21).requires_grad_(True)]
    grad_out = _randn(n, h, w, c2 // 2, dtype=torch.bfloat16, seed=22)
    results = []
    for forward in (ff_grad.SiluDepthwiseGate.apply, _plain_silu_depthwise_gate):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(v, *params)
        results.append((out, torch.autograd.grad(out, [v, *params], grad_out)))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype == torch.bfloat16 and _rel(out, ref) < 1e-2
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 2e-2


def _ff_grads(forward, ff, x, grad_out):
    x = x.clone().requires_grad_(True)
    ff.zero_grad(set_to_none=True)
    forward(x).backward(grad_out)
    return [x.grad] + [p.grad for p in ff.parameters() if p.requires_grad]


def _count_calls(monkeypatch):
    """Calls of the gate kernel's launcher: one per backward pass through `SiluDepthwiseGate` (eager or compiled)."""
    calls = []
    real = ff_grad.gate_backward
    monkeypatch.setattr(ff_grad, "gate_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_fused_feedforward_takes_the_triton_backward_where_its_biases_train(triton_interpreter, monkeypatch):
    """triton: wherever a feed-forward bias trains; auto: only with the products in float8; compiled: never."""
    ff = build_tiny_feedforward(residual=True, dtype=torch.float32)
    x, grad_out = _randn(2, 3, 3, 5, 12, seed=16), _randn(2, 3, 3, 5, 12, seed=17)
    ff64 = copy.deepcopy(ff).double()
    want = _ff_grads(ff64, ff64, x.double(), grad_out.double())  # diffusers' forward, float64
    calls = _count_calls(monkeypatch)
    got = _ff_grads(lambda t: speed_mod.glumb_forward_channels_last(ff, t, backward="triton"), ff, x, grad_out)
    assert len(calls) == 1 and len(got) == len(want) == 7
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5
    compiled = _ff_grads(torch.compile(lambda t: speed_mod.glumb_forward_channels_last(ff, t, backward="triton"),
                                       backend="aot_eager", fullgraph=True), ff, x, grad_out)  # custom ops: no graph break
    assert len(calls) == 2 and all(_rel(g, w) < 1e-5 for g, w in zip(compiled, want))

    calls.clear()
    _ff_grads(lambda t: speed_mod.glumb_forward_channels_last(ff, t, backward="compiled"), ff, x, grad_out)
    _ff_grads(lambda t: speed_mod.glumb_forward_channels_last(ff, t, backward="auto"), ff, x, grad_out)  # bf16 products
    assert calls == []
    # auto with the products in float8 (`set_feedforward_matmul`; F.linear stands in for the float8 product here)
    monkeypatch.setattr(ff, speed_mod.FF_MATMUL_ATTR, lambda x, w, bias=None, owner=None, key=None: F.linear(x, w, bias),
                        raising=False)
    got = _ff_grads(lambda t: speed_mod.glumb_forward_channels_last(ff, t, backward="auto"), ff, x, grad_out)
    assert len(calls) == 1 and all(_rel(g, w) < 1e-5 for g, w in zip(got, want))
    calls.clear()
    ff.requires_grad_(False)  # a frozen feed-forward (LoRA): the compiled backward was faster there
    _ff_grads(lambda t: speed_mod.glumb_forward_channels_last(ff, t, backward="triton"), ff, x, grad_out)
    assert calls == []
    ff.requires_grad_(True)
    with torch.no_grad():
        assert speed_mod._grad_kernels_apply(ff, x, "triton") is False


def test_without_triton_the_fused_feedforward_keeps_the_compiled_backward(monkeypatch):
    monkeypatch.delenv("TRAINER_TRITON_ON_CPU", raising=False)  # CPU tensors outside the interpreter fixture
    ff = build_tiny_feedforward(residual=True, dtype=torch.float32)
    calls = _count_calls(monkeypatch)
    x = _randn(1, 2, 3, 4, 12)
    _ff_grads(lambda t: speed_mod.glumb_forward_channels_last(ff, t, backward="triton"), ff, x, torch.ones_like(x))
    assert calls == [] and speed_mod._grad_kernels_apply(ff, x, "triton") is False
