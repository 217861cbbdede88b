"""Triton kernels of the fused feed-forward's elementwise backward (training). Imported only where a
kernel runs (it imports triton); `ff_grad.py` holds the launchers and the custom ops.

Both kernels walk a (rows x channels) matrix with a contiguous channel axis: each program owns BLOCK_C
channels and a contiguous range of rows, which it walks BLOCK_M rows at a time (loads coalesced along
the channels), and writes its float32 column sums of the gradient it produced as one row of a
(programs-along-rows, channels) partial-sum matrix (summed afterwards in a fixed order: deterministic).
"""

import triton
import triton.language as tl


@triton.jit
def _silu_grad_factor(x):
    """d silu(x) / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x))), float32."""
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def _program_tile(rows, channels, rows_per_program, BLOCK_C: tl.constexpr):
    """This program's channels (and their mask) and its run of rows [first, last)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    first = tl.program_id(1) * rows_per_program
    return cols, cols < channels, first, tl.minimum(first + rows_per_program, rows)


@triton.jit
def gate_backward_kernel(d_ptr, gx_ptr, gd_ptr, psum_ptr, rows, channels, rows_per_program,
                         stride_d, stride_gx, stride_gd,
                         WITH_SUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """x = a * silu(g) with (a, g) the two halves of d's channels -> gd = (gx * silu(g), gx * a * silu'(g)),
    and gd's column sums (of the float32 values, before gd is rounded to its dtype)."""
    cols, col_mask, first, last = _program_tile(rows, channels, rows_per_program, BLOCK_C)
    sum_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(first, last, BLOCK_M):
        r = start + tl.arange(0, BLOCK_M)
        mask = (r < last)[:, None] & col_mask[None, :]
        r64 = r.to(tl.int64)[:, None]
        d_row = d_ptr + r64 * stride_d + cols[None, :]
        a = tl.load(d_row, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(d_row + channels, mask=mask, other=0.0).to(tl.float32)
        gx = tl.load(gx_ptr + r64 * stride_gx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        ga = gx * (g * s)
        gg = gx * a * (s * (1.0 + g * (1.0 - s)))
        gd_row = gd_ptr + r64 * stride_gd + cols[None, :]
        tl.store(gd_row, ga.to(gd_ptr.dtype.element_ty), mask=mask)
        tl.store(gd_row + channels, gg.to(gd_ptr.dtype.element_ty), mask=mask)
        if WITH_SUM:
            sum_a += tl.sum(ga, axis=0)
            sum_g += tl.sum(gg, axis=0)
    if WITH_SUM:
        out = psum_ptr + tl.program_id(1) * (2 * channels) + cols
        tl.store(out, sum_a, mask=col_mask)
        tl.store(out + channels, sum_g, mask=col_mask)


@triton.jit
def silu_backward_kernel(gu_ptr, v_ptr, bias_ptr, gv_ptr, psum_ptr, rows, channels, rows_per_program,
                         stride_gu, stride_v, stride_gv,
                         HAS_BIAS: tl.constexpr, WITH_SUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """u = silu(v + bias) -> gv = gu * silu'(v + bias), and gv's column sums (of the float32 values)."""
    cols, col_mask, first, last = _program_tile(rows, channels, rows_per_program, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    for start in range(first, last, BLOCK_M):
        r = start + tl.arange(0, BLOCK_M)
        mask = (r < last)[:, None] & col_mask[None, :]
        r64 = r.to(tl.int64)[:, None]
        v = tl.load(v_ptr + r64 * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:  # in float32, unrounded, as the compiled forward's fused bias + SiLU computes it
            v = v + b[None, :]
        gu = tl.load(gu_ptr + r64 * stride_gu + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gv = gu * _silu_grad_factor(v)
        tl.store(gv_ptr + r64 * stride_gv + cols[None, :], gv.to(gv_ptr.dtype.element_ty), mask=mask)
        if WITH_SUM:
            acc += tl.sum(gv, axis=0)
    if WITH_SUM:
        tl.store(psum_ptr + tl.program_id(1) * channels + cols, acc, mask=col_mask)
