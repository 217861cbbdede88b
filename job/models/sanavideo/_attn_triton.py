"""Triton source of `attn_kernel` (imported only when a kernel is launched, where Triton is). The head dim C is a
compile-time constant (one model, one C), so the channel masks are known to the compiler; BLOCK_C is C padded
to a power of two."""

import triton
import triton.language as tl

from ._ff_triton import round_to  # float32 -> bf16 rounding that is also right in the CPU interpreter


@triton.jit
def dot_operand(x, INTERPRETED: tl.constexpr):
    """x as a tl.dot operand. Triton's CPU interpreter (the tests; 3.9) multiplies bf16 tiles wrongly (about
    1e9 relative error, as if on their bits), so there they go in as float32 (exact: bf16 -> float32 loses
    nothing); on a GPU they stay bf16 for the tensor cores."""
    if INTERPRETED:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def scores_partial_kernel(v_ptr, kr_ptr, k_ptr, s_ptr, ks_ptr, N, H, TOKENS_PER_SPLIT,
                          sv_b, sv_n, skr_b, skr_n, sk_b, sk_n,
                          C: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (batch b, head h, split s) per program: the partial sums over the split's tokens of
    v[n]^T k_rot[n] (BLOCK_C x BLOCK_C, float32, on the tensor cores: bf16 products are exact in float32)
    and of k[n] (float32), written to s_ptr (B, H, SPLITS, BLOCK_C, BLOCK_C) and ks_ptr (B, H, SPLITS, BLOCK_C).
    Channels past C are masked to zero, so the padded rows / columns of the partials are zero."""
    pid_bh = tl.program_id(0)  # heads vary fastest: programs that run together share the tokens' cache lines
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    chans = tl.arange(0, BLOCK_C)
    chan_ok = chans < C
    rows = tl.arange(0, BLOCK_N)
    v_base = v_ptr + b * sv_b + h * C + chans[None, :]
    kr_base = kr_ptr + b * skr_b + h * C + chans[None, :]
    k_base = k_ptr + b * sk_b + h * C + chans[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = pid_s * TOKENS_PER_SPLIT
    stop = tl.minimum(start + TOKENS_PER_SPLIT, N)
    for n0 in range(start, stop, BLOCK_N):
        tokens = n0 + rows
        ok = (tokens < stop)[:, None] & chan_ok[None, :]
        t64 = tokens.to(tl.int64)[:, None]
        v = tl.load(v_base + t64 * sv_n, mask=ok, other=0.0)
        kr = tl.load(kr_base + t64 * skr_n, mask=ok, other=0.0)
        k = tl.load(k_base + t64 * sk_n, mask=ok, other=0.0)
        # (C, n) @ (n, C): scores[c, d] += sum_n v[n, c] k_rot[n, d]
        acc = tl.dot(tl.trans(dot_operand(v, INTERPRETED)), dot_operand(kr, INTERPRETED), acc)
        ksum += tl.sum(k.to(tl.float32), axis=0)
    out = (pid_bh * splits + pid_s).to(tl.int64)
    tl.store(s_ptr + out * BLOCK_C * BLOCK_C + chans[:, None] * BLOCK_C + chans[None, :], acc)
    tl.store(ks_ptr + out * BLOCK_C + chans, ksum)


@triton.jit
def apply_scores_kernel(q_ptr, qr_ptr, hi_ptr, lo_ptr, ks_ptr, o_ptr, N, H,
                        sq_b, sq_n, sqr_b, sqr_n, so_b, so_n,
                        C: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (batch b, head h, tile of BLOCK_N tokens) per program:
    out[n, c] = (sum_d q_rot[n, d] scores[c, d]) / (q[n] . key_sum + 1e-15), with scores = hi + lo (two bf16
    matrices whose sum is the float32 scores within ~2^-16 relative), as two tensor-core products with float32
    accumulation; hi_ptr / lo_ptr hold scores transposed, (B, H, BLOCK_C [d], BLOCK_C [c]); ks_ptr (B, H, BLOCK_C).
    The result is rounded once to the output's dtype and written in (B, N, H, C) layout."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    chans = tl.arange(0, BLOCK_C)
    chan_ok = chans < C
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (tokens < N)[:, None] & chan_ok[None, :]
    t64 = tokens.to(tl.int64)[:, None]
    q = tl.load(q_ptr + b * sq_b + t64 * sq_n + h * C + chans[None, :], mask=ok, other=0.0)
    qr = tl.load(qr_ptr + b * sqr_b + t64 * sqr_n + h * C + chans[None, :], mask=ok, other=0.0)
    bh = pid_bh.to(tl.int64)
    mat = bh * BLOCK_C * BLOCK_C + chans[:, None] * BLOCK_C + chans[None, :]
    hi = tl.load(hi_ptr + mat)
    lo = tl.load(lo_ptr + mat)
    key_sum = tl.load(ks_ptr + bh * BLOCK_C + chans)
    z = 1.0 / (tl.sum(q.to(tl.float32) * key_sum[None, :], axis=1) + 1e-15)
    qr = dot_operand(qr, INTERPRETED)
    acc = tl.dot(qr, dot_operand(hi, INTERPRETED))
    acc = tl.dot(qr, dot_operand(lo, INTERPRETED), acc)
    out = round_to(acc * z[:, None], o_ptr.dtype.element_ty, INTERPRETED)  # exact in the cast below
    tl.store(o_ptr + b * so_b + t64 * so_n + h * C + chans[None, :], out.to(o_ptr.dtype.element_ty), mask=ok)
