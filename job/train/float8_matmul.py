"""`x @ weight.T` with all three products of a trained weight in float8, the weight gradient included.

torchao's tensorwise recipe can run the weight-gradient product in float8 too (`bench/RESULTS.md`: its products
are ~1.8x faster than bf16 on an H100), but in a compiled training step it lost ~35 ms: it pads the token
dimension (the product's inner size, which float8 kernels need divisible by 16) and makes transposed float8
copies of both operands, each a separate pass over an activation-sized tensor. This function computes the same
tensorwise casts (one scale per tensor: e4m3 for the input and the weight, e5m2 for the output gradient, the
scale from the tensor's absolute maximum, saturated; bit for bit torchao's) with plain torch operations that
inductor fuses into their producers, makes the tokens-last operands of the weight-gradient product with one
tiled copy of the float8 bytes (`_tokens_last`), and keeps for the backward only the float8 copy of the input
(1 byte per value) rather than the bf16 input.

Used for trained weights (`speed.fp8_weight_gradient`, a full fine-tune); the frozen weights of LoRA keep
torchao's recipe with the cast-once cache.
"""

from __future__ import annotations

import contextlib

import torch

from job.models.sanavideo.triton_support import kernels_usable

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
#: smallest absolute maximum a scale is computed from (torchao's EPS): an all-zero tensor gets a finite scale
_AMAX_FLOOR = 1e-12
#: float8 products need their inner size divisible by this (cuBLAS)
_INNER_MULTIPLE = 16


def _scale(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tensorwise scale that maps `t`'s absolute maximum onto `dtype`'s largest value (float32 scalar;
    computed in float64 as torchao does, so that eager and compiled runs agree). The maximum is taken along
    the rows first: a whole-tensor reduction lets inductor pick the loop order, and where the compiled backward
    recomputed one (from the feed-forward's 11,200-channel activation) it walked the tokens in the inner loop,
    11,200 values apart (2.9 ms instead of 0.5 ms per block on an H100, bench/NOTES.md)."""
    amax = t.abs().amax(dim=-1).max().to(torch.float64)
    return (torch.finfo(dtype).max / torch.clamp(amax, min=_AMAX_FLOOR)).to(torch.float32)


def _to_float8(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row-major whatever `t`'s layout (a transposed producer's output, say): cuBLAS's float8 products take
    the left operand row-major only; in a compiled graph the cast writes that layout directly."""
    largest = torch.finfo(dtype).max
    return (t.to(torch.float32) * scale).clamp(-largest, largest).to(dtype).contiguous()


#: (tokens, channels) per program of the tokens-last copy: 128-byte loads and stores
TRANSPOSE_BLOCK = (128, 128)


def _padded_tokens(tokens: int) -> int:
    return tokens + (-tokens % _INNER_MULTIPLE)


def tokens_last_reference(t8: torch.Tensor) -> torch.Tensor:
    out = t8.new_zeros((t8.shape[1], _padded_tokens(t8.shape[0])))
    out[:, :t8.shape[0]] = t8.t()
    return out


def _tokens_last_kernel(t8: torch.Tensor) -> torch.Tensor:
    import triton

    from job.train import _transpose_triton

    rows, cols = t8.shape
    padded = _padded_tokens(rows)
    out = torch.empty((cols, padded), dtype=t8.dtype, device=t8.device)
    block_r, block_c = TRANSPOSE_BLOCK
    src = t8.view(torch.uint8)
    with torch.cuda.device(t8.device) if t8.is_cuda else contextlib.nullcontext():
        _transpose_triton.tokens_last_kernel[(triton.cdiv(padded, block_r), triton.cdiv(cols, block_c))](
            src, out.view(torch.uint8), rows, cols, padded, src.stride(0), BLOCK_R=block_r, BLOCK_C=block_c)
    return out


@torch.library.custom_op("trainer::float8_tokens_last", mutates_args=())
def _tokens_last(t8: torch.Tensor) -> torch.Tensor:
    """(tokens, channels) float8 with a contiguous channel axis -> (channels, tokens padded to a multiple of 16),
    contiguous: the row-major operand layout the weight-gradient product needs (the padding is zeros, which add
    nothing to the sum). A custom op, i.e. one tiled pass over the float8 bytes that inductor cannot fuse: left
    to inductor (`F.pad(t8.t(), ...)`), the transposed copies became extra cast passes over the bf16 producers,
    and the float8 cast kernels took 41 ms more per step on an H100; as this op, 50 ms less (bench/NOTES.md
    item 35)."""
    return _tokens_last_kernel(t8) if kernels_usable(t8) else tokens_last_reference(t8)


@_tokens_last.register_fake
def _(t8):
    return t8.new_empty((t8.shape[1], _padded_tokens(t8.shape[0])))


def _product(a8, b8_column_major, a_scale, b_scale, out_dtype, fast: bool) -> torch.Tensor:
    # _scaled_mm multiplies by the inverse scales (it dequantises)
    return torch._scaled_mm(a8, b8_column_major, scale_a=a_scale.reciprocal(), scale_b=b_scale.reciprocal(),
                            out_dtype=out_dtype, use_fast_accum=fast)


class Float8Matmul(torch.autograd.Function):
    """y = x @ weight.T; forward and input-gradient products with cuBLAS's fast accumulation (the latter only
    with `fast_input_gradient`), the weight-gradient product (inner size = tokens) with exact accumulation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, fast_input_gradient: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        x_scale, w_scale = _scale(x2, E4M3), _scale(weight, E4M3)
        x8, w8 = _to_float8(x2, x_scale, E4M3), _to_float8(weight, w_scale, E4M3)
        y = _product(x8, w8.t(), x_scale, w_scale, x.dtype, True)
        ctx.fast_input_gradient = fast_input_gradient
        ctx.shapes = (x.shape, x.dtype, weight.dtype)
        # the weight gradient needs the input as (channels, tokens): keep only that float8 copy
        x8_t = _tokens_last(x8) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(x8_t, x_scale, w8, w_scale)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8_t, x_scale, w8, w_scale = ctx.saved_tensors
        x_shape, x_dtype, w_dtype = ctx.shapes
        g2 = grad.reshape(-1, grad.shape[-1])
        g_scale = _scale(g2, E5M2)
        g8 = _to_float8(g2, g_scale, E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # (tokens, out) @ (out, in): the weight as the column-major right operand
            grad_x = _product(g8, w8.t().contiguous().t(), g_scale, w_scale, x_dtype,
                              ctx.fast_input_gradient).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            # (out, tokens) @ (tokens, in), both operands tokens-last
            grad_w = _product(_tokens_last(g8), x8_t.t(), g_scale, x_scale, w_dtype, False)
        return grad_x, grad_w, None


def float8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  fast_input_gradient: bool = True) -> torch.Tensor:
    """`F.linear` through `Float8Matmul` (the product in the input's dtype: under autocast, the autocast dtype)."""
    if torch.is_autocast_enabled():
        x = x.to(torch.get_autocast_gpu_dtype())
    out = Float8Matmul.apply(x, weight.to(x.dtype), fast_input_gradient)
    return out if bias is None else out + bias.to(out.dtype)


class Float8TrainedLinear(torch.nn.Linear):
    """An `nn.Linear` (same parameters and state dict) whose products run through `float8_linear`; set on a
    module with `module.__class__ = Float8TrainedLinear` and `module.fast_input_gradient = ...`."""

    fast_input_gradient: bool = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return float8_linear(input, self.weight, self.bias, self.fast_input_gradient)
