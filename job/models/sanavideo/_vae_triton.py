"""Triton kernels of `vae_kernels` (imported only where Triton is; Triton resolves a kernel's helpers
as module globals, so they live here rather than inside a function)."""

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(y, ROUND: tl.constexpr):
    """y rounded to bfloat16 (to nearest, ties to even) and kept in float32; ROUND 0: unchanged (float32
    activations), 1: the hardware conversion, 2: the same on the integer bits (Triton's CPU interpreter,
    used by the tests, truncates in `.to(tl.bfloat16)`)."""
    if ROUND == 1:
        y = y.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    return y


@triton.jit
def row_block(rows, channels, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's block of positions (rows) x all channels of a channels-innermost tensor: the block's start
    (int64, in elements), the offsets within it (int32), the channel indices and masks."""
    first = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    local = tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_C)
    cmask = col < channels
    mask = (first + local < rows)[:, None] & cmask[None, :]
    return first * channels, local[:, None] * channels + col[None, :], col, cmask, mask


@triton.jit
def rms_norm_silu(x_ptr, pre_bias_ptr, gamma_ptr, bias_ptr, out_ptr, rows, channels, scale, eps, ROUND: tl.constexpr,
                  PRE_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    # one program: BLOCK_ROWS positions x all their channels (contiguous), read once, written once.
    # Memory-bound only if the per-element work stays small: one multiply by the row's reciprocal norm
    # (not a division per element), hardware roundings, the fast exp.
    start, offsets, col, cmask, mask = row_block(rows, channels, BLOCK_ROWS, BLOCK_C)
    x_ptr += start
    out_ptr += start
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if PRE_BIAS:  # the producing convolution's bias, added (and rounded) as its own `add_` would
        x = round_to_bf16(x + tl.load(pre_bias_ptr + col, mask=cmask, other=0.0).to(tl.float32)[None, :], ROUND)
    # F.normalize: x / max(||x||_2, eps), in float32, then rounded to the activation dtype
    inv = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(x * x, axis=1)), eps)
    y = round_to_bf16(x * inv[:, None], ROUND)
    y = round_to_bf16(y * scale, ROUND)
    gamma = tl.load(gamma_ptr + col, mask=cmask, other=0.0).to(tl.float32)
    y = round_to_bf16(y * gamma[None, :], ROUND)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col, mask=cmask, other=0.0).to(tl.float32)
        y = round_to_bf16(y + bias[None, :], ROUND)
    if SILU:
        y = round_to_bf16(y / (1.0 + tl.exp(-y)), ROUND)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_residual_add(y_ptr, bias_ptr, h_ptr, out_ptr, rows, channels, ROUND: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    # (y + bias) + h with the roundings of a convolution's bias `add_` followed by the residual add
    start, offsets, col, cmask, mask = row_block(rows, channels, BLOCK_ROWS, BLOCK_C)
    y = tl.load(y_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + start + offsets, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + col, mask=cmask, other=0.0).to(tl.float32)
    y = round_to_bf16(y + bias[None, :], ROUND)
    tl.store(out_ptr + start + offsets, (y + h).to(out_ptr.dtype.element_ty), mask=mask)
