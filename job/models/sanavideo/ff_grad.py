"""The fused feed-forward's SiLU + depthwise 3x3 + gate with its elementwise backward as two Triton kernels.

In `glumb_forward_channels_last` the forward is v = conv_inverted(h) + bias (2C = 11,200 channels per token),
u = silu(v), d = depthwise3x3(u) + bias, (a, g) = d.chunk(2, -1), x = a * silu(g). Its backward has two
elementwise passes over 11,200-channel tensors that also sum over all 32,760 tokens for the two biases:

    gd = (gx * silu(g), gx * a * silu'(g))   and its sum over tokens (conv_depth.bias)      `gate_backward`
    gv = gu * silu'(v)                       and its sum over tokens (conv_inverted.bias)   `silu_backward`

Compiled by inductor, each became a reduction kernel with one program per XBLOCK channels walking all 32,760
tokens (few programs for 132 SMs) that read its inputs twice (sum, then gradient), and the float8 product's
amax and cast of gv read both inputs again (H100, one block: 1.42 + 1.58 + 0.59 + 0.65 ms). These kernels
read each input once, write the gradient once, and sum from registers: each program owns BLOCK_C channels
and a contiguous run of rows, and writes its float32 column sums as one row of a partial-sum matrix that is
summed afterwards in a fixed order (deterministic). Float32 arithmetic, one rounding to the output dtype.

`SiluDepthwiseGate` is the autograd function the fused feed-forward calls in training
(`speed.feedforward_backward`, where a feed-forward bias is trained; by default only with float8 products, where
it measured faster): its forward is the same PyTorch ops as before (inductor fuses them), its backward the two kernels around
cuDNN's depthwise convolutions (`depthwise3x3_backward`, shared with `speed.DepthwiseConv3x3`). The kernels are `torch.library` custom ops, so compiled blocks call them
without a graph break. Triton is imported when a kernel is first launched (`speed._grad_kernels_apply` asks
`triton_support` where it can run); `gate_backward_reference` / `silu_backward_reference` are the same in PyTorch ops.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


#: (BLOCK_M, BLOCK_C, num_warps, row programs per column block). H100, one block (32,760 x 11,200, bf16,
#: bench/ff_grad.py, two runs): gate 0.86-0.93 ms / silu 0.95-0.97 ms at (32, 64, 4, 64), the best or within 5 %
#: of it in both runs; the 8 other configurations up to 2x slower (a copy of v takes 0.50 ms).
DEFAULT_CONFIG = (32, 64, 4, 64)


def _kernels():
    from . import _ff_grad_triton  # imports triton: only where a kernel runs

    return _ff_grad_triton


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """(..., C) as a (rows, C) matrix with a contiguous channel axis (a view where the layout allows)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _launch(kernel, args: tuple, rows: int, channels: int, sum_width: int, device, with_sum: bool, config,
            **constexprs) -> torch.Tensor:
    import triton

    block_m, block_c, num_warps, row_programs = config or DEFAULT_CONFIG
    rows_per_program = triton.cdiv(triton.cdiv(rows, row_programs), block_m) * block_m
    row_programs = triton.cdiv(rows, rows_per_program)
    partial = torch.empty((row_programs if with_sum else 0, sum_width), dtype=torch.float32, device=device)
    first, second, *rest = args
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(triton.cdiv(channels, block_c), row_programs)](
            *args, partial, rows, channels, rows_per_program, first.stride(0), second.stride(0), rest[-1].stride(0),
            WITH_SUM=with_sum, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps, **constexprs)
    return partial.sum(0) if with_sum else partial.new_empty(0)


def gate_backward(d: torch.Tensor, gx: torch.Tensor, with_sum: bool, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """d (..., 2C), gx (..., C) -> (gd (..., 2C) in d's dtype, contiguous; gd summed over all but the last axis
    in float32, or an empty tensor without `with_sum`)."""
    d2, gx2 = _matrix(d), _matrix(gx)
    gd = torch.empty_like(d2, memory_format=torch.contiguous_format)
    sums = _launch(_kernels().gate_backward_kernel, (d2, gx2, gd), d2.shape[0], gx2.shape[1], d2.shape[1], d.device,
                   with_sum, config)
    return gd.view(d.shape), sums


def silu_backward(gu: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, with_sum: bool,
                  config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """gu, v (..., K), bias (K,) or None -> (gv = gu * silu'(v + bias) in v's dtype, contiguous; gv summed over all
    but the last axis in float32, or an empty tensor without `with_sum`)."""
    gu2, v2 = _matrix(gu), _matrix(v)
    gv = torch.empty_like(v2, memory_format=torch.contiguous_format)
    sums = _launch(_kernels().silu_backward_kernel, (gu2, v2, v2 if bias is None else bias.contiguous(), gv),
                   v2.shape[0], v2.shape[1], v2.shape[1], v.device, with_sum, config, HAS_BIAS=bias is not None)
    return gv.view(v.shape), sums


@torch.library.custom_op("trainer::ff_gate_backward", mutates_args=())
def _gate_backward_op(d: torch.Tensor, gx: torch.Tensor, with_sum: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return gate_backward(d, gx, with_sum)


@_gate_backward_op.register_fake
def _(d, gx, with_sum):
    return d.new_empty(d.shape), d.new_empty((d.shape[-1] if with_sum else 0,), dtype=torch.float32)


@torch.library.custom_op("trainer::ff_silu_backward", mutates_args=())
def _silu_backward_op(gu: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                      with_sum: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return silu_backward(gu, v, bias, with_sum)


@_silu_backward_op.register_fake
def _(gu, v, bias, with_sum):
    return v.new_empty(v.shape), v.new_empty((v.shape[-1] if with_sum else 0,), dtype=torch.float32)


def _depthwise(x_nhwc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise 3x3 (zero padding 1) on (N, H, W, C) through cuDNN's NHWC kernels (NCHW view, no copy)."""
    out = F.conv2d(x_nhwc.permute(0, 3, 1, 2), weight, bias, padding=1, groups=x_nhwc.shape[-1])
    return out.permute(0, 2, 3, 1)


def depthwise3x3_backward(grad: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor,
                          need_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Input and weight gradients of a depthwise 3x3 convolution (stride 1, zero padding 1) from its output's
    gradient; grad and x are NCHW views (x only needed for the weight gradient). The input gradient runs as a
    *forward* depthwise convolution with the kernel rotated by 180 degrees (a correlation's transpose is the
    correlation with the flipped kernel; cuDNN's NHWC forward kernel ran at ~2 TB/s on an H100 where its
    data-gradient kernel ran at ~1.2 TB/s, bench/depthwise_backward.py); the weight gradient is cuDNN's own.
    Both convolutions run in grad's dtype, as the forward did (under bf16 autocast float32 weights are cast);
    the weight gradient comes back in the weight's dtype."""
    channels = grad.shape[1]
    weight_g = weight.to(grad.dtype)
    grad_x = F.conv2d(grad, weight_g.flip(2, 3), None, padding=1, groups=channels)
    grad_weight = None
    if need_weight:
        grad_weight = torch.ops.aten.convolution_backward(
            grad, x.to(grad.dtype), weight_g, None, (1, 1), (1, 1), (1, 1), False, (0, 0), channels,
            (False, True, False))[1].to(weight.dtype)
    return grad_x, grad_weight


class SiluDepthwiseGate(torch.autograd.Function):
    """x = a * silu(g), (a, g) = (depthwise3x3(silu(v + in_bias), weight) + bias).chunk(2, -1), on (N, H, W, 2C)
    with a contiguous channel axis; gradients for v, in_bias, weight and bias. v is conv_inverted's product
    without its bias (in_bias), so that its gradient's sum is taken in the same pass."""

    @staticmethod
    def forward(ctx, v, in_bias, weight, bias):
        u = F.silu(v if in_bias is None else v + in_bias)
        d = _depthwise(u, weight, bias)
        a, g = d.chunk(2, dim=-1)
        ctx.save_for_backward(v, in_bias, weight, d)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return a * F.silu(g)

    @staticmethod
    def backward(ctx, gx):
        v, in_bias, weight, d = ctx.saved_tensors
        _, need_in_bias, need_weight, need_bias = ctx.needs_input_grad[:4]
        gd, bias_sum = _gate_backward_op(d, gx, need_bias)
        u = F.silu(v if in_bias is None else v + in_bias).permute(0, 3, 1, 2) if need_weight else None
        gu, grad_weight = depthwise3x3_backward(gd.permute(0, 3, 1, 2), u, weight, need_weight)
        gu = gu.permute(0, 2, 3, 1)
        gv, in_bias_sum = _silu_backward_op(gu, v, in_bias, need_in_bias)
        return (gv, in_bias_sum.to(in_bias.dtype) if need_in_bias else None, grad_weight,
                bias_sum.to(ctx.bias_dtype) if need_bias else None)


def gate_backward_reference(d: torch.Tensor, gx: torch.Tensor, with_sum: bool):
    a, g = d.float().chunk(2, dim=-1)
    gxf = gx.float()
    s = torch.sigmoid(g)
    gd = torch.cat([gxf * g * s, gxf * a * s * (1 + g * (1 - s))], dim=-1)
    return gd.to(d.dtype), (gd.reshape(-1, gd.shape[-1]).sum(0) if with_sum else None)


def silu_backward_reference(gu: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, with_sum: bool):
    vf = v.float() if bias is None else v.float() + bias.float()
    gv = torch.ops.aten.silu_backward(gu.float(), vf)
    return gv.to(v.dtype), (gv.reshape(-1, gv.shape[-1]).sum(0) if with_sum else None)

