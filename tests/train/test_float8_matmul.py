"""`job/train/float8_matmul.py`: the float8 products of trained weights with a float8 weight gradient
(`speed.fp8_weight_gradient`). Its casts must be exactly torchao's tensorwise recipe with a float8 weight
gradient (`quantize.FP8_WEIGHT_GRADIENT`): the same float8 operands and scales, so the same products, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from job.models.sanavideo import speed
from job.train import float8_matmul, quantize
from job.train.float8_matmul import Float8TrainedLinear, float8_linear
from job.train.model import prepare_transformer

pytest.importorskip("torchao")

from test_quantize import LORA16, _block_inputs, _fp8_model, _fp8_spec  # noqa: E402


def _check_cublas_layouts(monkeypatch):
    """`torch._scaled_mm` with the operand layouts cuBLAS's float8 products require on a GPU (the CPU kernel
    takes any): the left operand row-major, the right one column-major, the inner size divisible by 16."""
    real = torch._scaled_mm
    shapes = []

    def checked(a, b, *args, **kwargs):
        assert a.stride(1) == 1 and b.stride(0) == 1, (a.stride(), b.stride())
        assert a.shape[1] % 16 == 0
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    return shapes


def _torchao_float8_weight_gradient(monkeypatch):
    monkeypatch.setattr(quantize, "FP8_WEIGHT_GRADIENT", True)
    return quantize.Float8Product(quantize._fp8_training_config())


def _inputs(tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, 32, generator=g, dtype=torch.bfloat16)
    x[0, 3, 5] = 40.0  # one outlier: the tensorwise scale follows it
    w = (torch.randn(48, 32, generator=g) * 0.1).bfloat16()
    grad_out = torch.randn(2, tokens, 48, generator=g, dtype=torch.bfloat16)
    return x, w, grad_out


def _run(fn, x, w, grad_out):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(x, w)
    out.backward(grad_out)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("tokens", [64, 70])  # 2 x 70 = 140 tokens: the weight gradient's inner size is padded to 144
@pytest.mark.parametrize("transposed", [False, True])  # the input and the gradient as transposed views
def test_products_equal_torchaos_float8_weight_gradient_recipe(monkeypatch, tokens, transposed):
    x, w, grad_out = _inputs(tokens)
    torchao = _run(_torchao_float8_weight_gradient(monkeypatch), x, w, grad_out)
    if transposed:  # column-major (tokens, channels) matrices, as a transposed producer's output is
        x, grad_out = (t.reshape(2 * tokens, -1).t().contiguous().t() for t in (x, grad_out))
        torchao = tuple(t.reshape(2 * tokens, -1) if t.shape[0] == 2 else t for t in torchao)
    shapes = _check_cublas_layouts(monkeypatch)
    ours = _run(float8_linear, x, w, grad_out)
    monkeypatch.undo()
    padded = tokens * 2 + (-tokens * 2) % 16
    assert shapes == [((2 * tokens, 32), (32, 48)), ((2 * tokens, 48), (48, 32)), ((48, padded), (padded, 32))]
    for name, a, b in zip(("output", "input gradient", "weight gradient"), ours, torchao):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # and they are float8 products, not bf16 ones
    reference = _run(torch.nn.functional.linear, x.contiguous(), w, grad_out.contiguous())
    for a, b in zip(ours, reference):
        assert 0.005 < ((a.float() - b.float()).norm() / b.float().norm()).item() < 0.15


def test_compiled_products_equal_eager():
    x, w, grad_out = _inputs(70, seed=1)

    def fn(x, w):  # a producer before the product, as in a block: inductor may fuse the casts into it
        return float8_linear(torch.nn.functional.silu(x), w)

    eager = _run(fn, x, w, grad_out)
    torch._dynamo.reset()
    compiled = _run(torch.compile(fn, fullgraph=True), x, w, grad_out)
    for a, b in zip(compiled, eager):
        assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6)


def test_an_all_zero_input_gives_zero_products_not_nan():
    x, w, grad_out = _inputs(64)
    out, grad_x, grad_w = _run(float8_linear, torch.zeros_like(x), w, grad_out)
    assert not out.any() and not grad_w.any() and torch.isfinite(grad_x).all() and grad_x.any()


def test_frozen_weight_has_no_weight_gradient_product(monkeypatch):
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x, w, grad_out = _inputs(64)
    x = x.requires_grad_()
    float8_linear(x, w).backward(grad_out)  # w does not require a gradient
    assert len(calls) == 2 and x.grad is not None  # forward and input gradient only


def test_switch_routes_a_full_fine_tune_through_it_with_torchaos_results(tiny_model, monkeypatch):
    """With `speed.fp8_weight_gradient` (the default), every block linear and feed-forward product of a full fine-tune runs through
    `float8_linear`, and the model's output and gradients are those of torchao's float8-weight-gradient recipe."""
    reference = _fp8_model()
    results = []
    for own in (False, True):
        spec = _fp8_spec(tiny_model)
        spec.speed.fp8_weight_gradient = own
        monkeypatch.setattr(quantize, "FP8_WEIGHT_GRADIENT", not own)  # torchao's float8 weight gradient
        model = copy.deepcopy(reference)
        prepare_transformer(model, spec)
        if own:
            trained = [n for n, m in model.named_modules() if type(m) is Float8TrainedLinear]
            assert trained and all(n.startswith("transformer_blocks.") for n in trained)
            assert not [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
            assert set(model.state_dict()) == set(reference.state_dict())
            assert all(getattr(b.ff, speed.FF_MATMUL_ATTR).own_weight_gradient for b in model.transformer_blocks)
        calls = []
        if own:  # count the products through float8_matmul: every block linear (eager: diffusers' feed-forward)
            real_apply = float8_matmul.Float8Matmul.apply
            monkeypatch.setattr(float8_matmul.Float8Matmul, "apply", lambda *a: calls.append(1) or real_apply(*a))
        out = model(**_block_inputs(), return_dict=False)[0]
        out.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if own:
            assert len(calls) == len(trained)
            # the fused feed-forward (what compiled blocks run): its 3 products too
            ff = model.transformer_blocks[0].ff
            x = torch.randn(1, 2, 4, 4, 32, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
            speed.glumb_forward_channels_last(ff, x).float().square().mean().backward()
            assert len(calls) == len(trained) + 3
        results.append((out.detach(), grads))
    (out_torchao, grads_torchao), (out_own, grads_own) = results
    assert torch.equal(out_own, out_torchao)
    assert grads_own.keys() == grads_torchao.keys()
    for name in grads_own:
        assert torch.equal(grads_own[name], grads_torchao[name]), name


def test_switch_leaves_lora_on_torchao(tiny_model):
    from torchao.float8.float8_linear import Float8Linear

    spec = _fp8_spec(tiny_model, **LORA16)
    assert spec.speed.fp8_weight_gradient  # the default: LoRA trains no weight it could apply to
    model = _fp8_model()
    prepare_transformer(model, spec)
    bases = [m for n, m in model.named_modules() if n.endswith(".base_layer")]
    assert bases and all(isinstance(m, Float8Linear) for m in bases)
    assert not any(type(m) is Float8TrainedLinear for m in model.modules())
    assert not any(getattr(b.ff, speed.FF_MATMUL_ATTR).own_weight_gradient for b in model.transformer_blocks)


@pytest.mark.parametrize("tokens,channels", [(300, 200), (256, 128), (5, 16)])
def test_tokens_last_kernel_equals_the_reference(triton_interpreter, monkeypatch, tokens, channels):
    """The Triton copy (float8 bytes, transposed, tokens padded with zeros to a multiple of 16), with small
    blocks so that several programs and partial tiles in both directions are covered."""
    from job.train import float8_matmul

    monkeypatch.setattr(float8_matmul, "TRANSPOSE_BLOCK", (64, 32))
    g = torch.Generator().manual_seed(0)
    t8 = (torch.randn(tokens, channels, generator=g) * 100).to(torch.float8_e4m3fn)
    kernel = float8_matmul._tokens_last_kernel(t8)
    reference = float8_matmul.tokens_last_reference(t8)
    assert kernel.shape == (channels, tokens + (-tokens % 16)) and kernel.is_contiguous()
    assert torch.equal(kernel.view(torch.uint8), reference.view(torch.uint8))
    assert torch.equal(float8_matmul._tokens_last(t8).view(torch.uint8), reference.view(torch.uint8))  # the op


@pytest.mark.parametrize("fast", [True, False])
def test_fast_accumulation_setting_reaches_the_input_gradient_product_only(tiny_model, monkeypatch, fast):
    """`speed.fp8_fast_accumulation` sets the input-gradient product's accumulation, on the converted linears and
    the feed-forward's products; the forward product accumulates fast and the weight gradient exactly, always."""
    spec = _fp8_spec(tiny_model)
    spec.speed.fp8_fast_accumulation = fast
    model = _fp8_model()
    prepare_transformer(model, spec)
    linears = [m for m in model.modules() if type(m) is Float8TrainedLinear]
    assert linears and all(m.fast_input_gradient is fast for m in linears)
    assert all(getattr(b.ff, speed.FF_MATMUL_ATTR).mm_config.grad_input.use_fast_accum is fast
               for b in model.transformer_blocks)
    real = torch._scaled_mm
    seen = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: seen.append(k["use_fast_accum"]) or real(*a, **k))
    x, w, grad_out = _inputs(64)
    _run(lambda x, w: float8_linear(x, w, None, fast), x, w, grad_out)
    assert seen == [True, fast, False]  # forward, input gradient, weight gradient
