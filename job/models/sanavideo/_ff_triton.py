"""Triton source of `ff_kernel` (imported only when a kernel is launched, where Triton is; Triton
resolves a kernel's helpers as module globals, so they live here rather than inside a function)."""

import triton
import triton.language as tl


@triton.jit
def round_to(x, out_dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x (float32) rounded to out_dtype, to nearest even, and back to float32."""
    if INTERPRETED and out_dtype == tl.bfloat16:
        # on the bits in Triton's CPU interpreter (the tests): it truncates float32 -> bfloat16 casts (a GPU
        # rounds to nearest, in one instruction)
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(out_dtype).to(tl.float32)


@triton.jit
def silu_rounded(x, ROUND: tl.constexpr, out_dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    s = x / (1.0 + tl.exp(-x))
    if ROUND:
        s = round_to(s, out_dtype, INTERPRETED)
    return s


@triton.jit
def load_taps(w_ptr, chans, chan_ok):
    """The 9 taps of channels `chans` of a (2C, 1, 3, 3) weight, float32, each (1, BLOCK_C)."""
    p = w_ptr + chans * 9
    t0 = tl.load(p + 0, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    t1 = tl.load(p + 1, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    t2 = tl.load(p + 2, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    t3 = tl.load(p + 3, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    t4 = tl.load(p + 4, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    t5 = tl.load(p + 5, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    t6 = tl.load(p + 6, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    t7 = tl.load(p + 7, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    t8 = tl.load(p + 8, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    return t0, t1, t2, t3, t4, t5, t6, t7, t8


@triton.jit
def dwconv_silu_gate_kernel(v_ptr, w_ptr, b_ptr, out_ptr, H, W, C,
                            sv_n, sv_h, sv_w, so_n, so_h, so_w,
                            HAS_BIAS: tl.constexpr, ROUND: tl.constexpr, INTERPRETED: tl.constexpr,
                            BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_w = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chans < C
    # taps of the value half (channels c) and the gate half (channels C + c)
    a00, a01, a02, a10, a11, a12, a20, a21, a22 = load_taps(w_ptr, chans, chan_ok)
    g00, g01, g02, g10, g11, g12, g20, g21, g22 = load_taps(w_ptr, chans + C, chan_ok)
    if HAS_BIAS:
        bias_a = tl.load(b_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
        bias_g = tl.load(b_ptr + chans + C, mask=chan_ok, other=0.0).to(tl.float32)[None, :]

    # the three horizontal offsets of this tile's columns, and where they fall outside the image
    c_left, c_mid, c_right = cols - 1, cols, cols + 1
    ok_left = ((c_left >= 0) & (c_left < W))[:, None] & chan_ok[None, :]
    ok_mid = (c_mid < W)[:, None] & chan_ok[None, :]
    ok_right = (c_right < W)[:, None] & chan_ok[None, :]
    base = v_ptr + n * sv_n + chans[None, :]
    p_left = base + c_left[:, None] * sv_w
    p_mid = base + c_mid[:, None] * sv_w
    p_right = base + c_right[:, None] * sv_w
    out_base = out_ptr + n * so_n + c_mid[:, None] * so_w + chans[None, :]

    acc_a_prev = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # output row r - 1
    acc_g_prev = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc_a_cur = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # output row r
    acc_g_cur = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for r in range(0, H + 1):  # input row r; r == H is the bottom padding row: it finishes row H - 1
        r_tile = tl.full((BLOCK_W, 1), r, tl.int32)  # a tensor, so masks combine the same way compiled and interpreted
        in_row = r_tile < H
        row = r * sv_h
        sl = silu_rounded(tl.load(p_left + row, mask=ok_left & in_row, other=0.0).to(tl.float32), ROUND, dtype, INTERPRETED)
        sm = silu_rounded(tl.load(p_mid + row, mask=ok_mid & in_row, other=0.0).to(tl.float32), ROUND, dtype, INTERPRETED)
        sr = silu_rounded(tl.load(p_right + row, mask=ok_right & in_row, other=0.0).to(tl.float32), ROUND, dtype, INTERPRETED)
        tl_ = silu_rounded(tl.load(p_left + row + C, mask=ok_left & in_row, other=0.0).to(tl.float32), ROUND, dtype, INTERPRETED)
        tm = silu_rounded(tl.load(p_mid + row + C, mask=ok_mid & in_row, other=0.0).to(tl.float32), ROUND, dtype, INTERPRETED)
        tr = silu_rounded(tl.load(p_right + row + C, mask=ok_right & in_row, other=0.0).to(tl.float32), ROUND, dtype, INTERPRETED)
        # output row r - 1 is complete with its bottom taps (vertical tap 2)
        done_a = acc_a_prev + sl * a20 + sm * a21 + sr * a22
        done_g = acc_g_prev + tl_ * g20 + tm * g21 + tr * g22
        if ROUND:  # the reference's depthwise output is stored in v's dtype before the bias is added
            done_a = round_to(done_a, dtype, INTERPRETED)
            done_g = round_to(done_g, dtype, INTERPRETED)
        if HAS_BIAS:
            done_a += bias_a
            done_g += bias_g
        gated = done_a * (done_g / (1.0 + tl.exp(-done_g)))
        if ROUND:
            gated = round_to(gated, dtype, INTERPRETED)  # exact in the cast below
        tl.store(out_base + (r - 1) * so_h, gated.to(dtype), mask=ok_mid & (r_tile >= 1))
        acc_a_prev = acc_a_cur + sl * a10 + sm * a11 + sr * a12
        acc_g_prev = acc_g_cur + tl_ * g10 + tm * g11 + tr * g12
        acc_a_cur = sl * a00 + sm * a01 + sr * a02
        acc_g_cur = tl_ * g00 + tm * g01 + tr * g02
