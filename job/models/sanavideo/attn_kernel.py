"""The linear attention's two reductions over tokens as Triton kernels (inference only).

`FusedLinearAttnProcessor` computes, per batch b and head h, with q, k after ReLU and q_rot, k_rot their
rotary versions, all (B, N, H, C) bf16:

    key_sum = sum_n k[n]                               (fp32, C)
    scores  = sum_n v[n]^T k_rot[n]                    (fp32, C x C)
    out[n]  = (scores q_rot[n]) / (q[n] . key_sum + 1e-15)   -> bf16

In PyTorch these are float32 einsums over float32 copies of the bf16 inputs: cuBLAS runs them on fp32 SIMT
kernels (no tensor cores), plus the copies and a gemv for the normaliser (~75 ms of a 533 ms validation
forward on an H100, issue #12). Here, two kernels read the bf16 tensors in place (strides; C padded to a
power of two with masks):

1. `scores_partial_kernel`: one program per (b, h, split of the tokens) sums v^T k_rot on the tensor cores
   (bf16 tiles, float32 accumulation) and k (float32); the per-split partials are then summed in a fixed
   order (`torch.sum` over the split axis, no atomics: the result is the same on every call).
2. `apply_scores_kernel`: one program per (b, h, tile of tokens): the normaliser from q and key_sum in float32,
   then `q_rot @ scores^T` as two tensor-core products, q_rot @ hi^T + q_rot @ lo^T, where hi = bf16(scores)
   and lo = bf16(scores - hi), accumulated in float32; multiplied by the normaliser, rounded once to bf16.

    out = linear_attention(q, k, v, q_rot, k_rot)   # torch.ops.trainer.linear_attention, (B, N, H, C)

Numerics: q, k, v, q_rot, k_rot are bf16, so their float32 copies are exact and a bf16 x bf16 product is
exact in float32: `scores` and `key_sum` are the float32 einsums' sums up to summation order. `hi + lo`
holds `scores` to ~2^-17 relative (16 significant bits), far under the final bf16 rounding of `out` (2^-9).
Measured against the float32 path and a float64 reference: tests/models/test_attn_kernel.py (CPU, Triton's
interpreter) and bench/attn_kernel.py (H100, the model's shapes).

Speed (H100, bench/attn_kernel.py, B=2, N=32,760, H=20, C=112; two runs): the op 1.008 / 1.046 ms vs 5.06 ms
for the compiled float32 einsums (4.8-5.0x); 1.75 TB/s on the fewest bytes (five inputs read once, the output
written once; a copy runs at 2.83 TB/s). Output vs a float64 reference: relative error 1.66e-3, the same as the
einsums' (bf16 rounding of the output); vs the einsums 1.3e-4 (0.3 % of the elements differ, by one bf16 step).
In the validation forward (bench/train_step.py, 20 blocks, CFG batch 2): 0.469-0.483 s vs 0.548 s before (the
producers of q, k, v now also write bf16 instead of float32 copies); profile: 21.9 ms of 465 ms for the op.

Forward only (no autograd formula): `FusedLinearAttnProcessor` calls it only when no gradient is needed
(validation renders); training keeps the einsums. A `torch.library.custom_op` with a fake implementation, so
compiled transformer blocks call it without a graph break. Triton is imported when a kernel is first
launched (`triton_support.kernels_usable` says where it can run).
"""

from __future__ import annotations

import contextlib

import torch

from .triton_support import interpreting, kernels_usable

OP_NAME = "trainer::linear_attention"

#: The kernels take bf16 only: the exactness argument above (bf16 products exact in float32, the bf16 hi/lo
#: split of the scores) is made for it; other dtypes take the einsums.
SUPPORTED_DTYPE = torch.bfloat16

#: Largest head dim: a (C x C) float32 accumulator of 128 x 128 already takes 64 registers per thread at 8 warps.
MAX_HEAD_DIM = 128

#: Tokens each program of the first kernel sums (the split is fixed by N alone, so the fixed-order sum of the
#: partials gives the same result on every call): (TOKENS_PER_SPLIT, BLOCK_N, num_warps). Chosen on an H100 by
#: bench/attn_kernel.py at B=2, N=32,760, H=20, C=112: (2048, 64, 4) 0.478 ms (1,840 GB/s on the fewest bytes;
#: a copy runs at 2,830); (1024, 32, 4) 0.497; (2048, 32, 4) 0.548; 8 warps 0.56-0.74 ms.
DEFAULT_SCORES_CONFIG = (2048, 64, 4)
#: Tokens per program of the second kernel: (BLOCK_N, num_warps). Same bench: (128, 4) 0.598 ms; (64, 4) 0.658;
#: 8 warps or 32 tokens 0.88-0.95 ms.
DEFAULT_APPLY_CONFIG = (128, 4)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor) -> str | None:
    """Why the kernels cannot compute this call (None: they can). Callers take the einsums then."""
    tensors = {"q": q, "k": k, "v": v, "q_rot": q_rot, "k_rot": k_rot}
    for name, t in tensors.items():
        if t.dim() != 4:
            return f"{name} has {t.dim()} dims, the kernels take (B, N, H, C)"
        if t.dtype != SUPPORTED_DTYPE:
            return f"{name} is {t.dtype}, the kernels take {SUPPORTED_DTYPE}"
        if t.device != q.device:
            return "q, k, v, q_rot and k_rot are on different devices"
    if q.shape != q_rot.shape or k.shape != k_rot.shape or k.shape != v.shape:
        return f"shapes differ: q {tuple(q.shape)}, q_rot {tuple(q_rot.shape)}, k {tuple(k.shape)}, " \
               f"k_rot {tuple(k_rot.shape)}, v {tuple(v.shape)}"
    b, _, h, c = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, h, c):
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head dim"
    if c > MAX_HEAD_DIM:
        return f"head dim {c} is over the kernels' {MAX_HEAD_DIM}"
    for name, t in tensors.items():
        # heads and channels of a token contiguous (a (B, N, H * C) projection output, unflattened)
        if t.stride(3) != 1 or t.stride(2) != c:
            return f"{name}'s heads and channels are not contiguous within a token (strides {t.stride()})"
    if q.numel() == 0 or k.numel() == 0:
        return "empty input"
    return None


@torch.compiler.assume_constant_result
def usable_on(device_type: str) -> bool:
    """`kernels_usable` for a device type, evaluated once when a compiled graph is traced."""
    return kernels_usable(torch.empty(0, device=device_type))


def _triton():
    from . import _attn_triton  # imports triton: only where a kernel runs

    return _attn_triton


def _padded(c: int) -> int:
    return max(16, 1 << (c - 1).bit_length())  # tl.dot needs dims of at least 16


def scores_and_key_sum(v: torch.Tensor, k_rot: torch.Tensor, k: torch.Tensor,
                       config: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, H, CP, CP), key_sum (B, H, CP)), float32, CP = C padded (zero beyond C); scores[c, d] =
    sum_n v[n, c] k_rot[n, d]. `config` = (TOKENS_PER_SPLIT, BLOCK_N, num_warps), default
    `DEFAULT_SCORES_CONFIG` (read at call time: bench/attn_kernel.py sets it)."""
    mod = _triton()
    b, n, h, c = k.shape
    cp = _padded(c)
    per_split, block_n, num_warps = config or DEFAULT_SCORES_CONFIG
    per_split = max(block_n, per_split // block_n * block_n)
    splits = -(-n // per_split)
    partial = torch.empty((b, h, splits, cp, cp), dtype=torch.float32, device=k.device)
    partial_ks = torch.empty((b, h, splits, cp), dtype=torch.float32, device=k.device)
    with torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext():
        mod.scores_partial_kernel[(b * h, splits)](
            v, k_rot, k, partial, partial_ks, n, h, per_split,
            v.stride(0), v.stride(1), k_rot.stride(0), k_rot.stride(1), k.stride(0), k.stride(1),
            C=c, INTERPRETED=interpreting(), BLOCK_N=block_n, BLOCK_C=cp, num_warps=num_warps)
    return partial.sum(2), partial_ks.sum(2)  # fixed order, no atomics: deterministic


def apply_scores(q: torch.Tensor, q_rot: torch.Tensor, scores: torch.Tensor, key_sum: torch.Tensor,
                 out: torch.Tensor, config: tuple[int, int] | None = None) -> torch.Tensor:
    """out (B, N, H, C) = (scores q_rot[n]) / (q[n] . key_sum + 1e-15), from `scores_and_key_sum`'s padded
    float32 results; `config` = (BLOCK_N, num_warps), default `DEFAULT_APPLY_CONFIG`."""
    mod = _triton()
    b, n, h, c = q.shape
    cp = scores.shape[-1]
    block_n, num_warps = config or DEFAULT_APPLY_CONFIG
    scores_t = scores.transpose(-1, -2).contiguous()  # the kernel multiplies q_rot (n, d) by scores^T (d, c)
    hi = scores_t.to(torch.bfloat16)
    lo = (scores_t - hi.float()).to(torch.bfloat16)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        mod.apply_scores_kernel[(b * h, -(-n // block_n))](
            q, q_rot, hi, lo, key_sum.contiguous(), out, n, h,
            q.stride(0), q.stride(1), q_rot.stride(0), q_rot.stride(1), out.stride(0), out.stride(1),
            C=c, INTERPRETED=interpreting(), BLOCK_N=block_n, BLOCK_C=cp, num_warps=num_warps)
    return out


def launch(q, k, v, q_rot, k_rot, out: torch.Tensor | None = None, scores_config=None, apply_config=None) -> torch.Tensor:
    """Both kernels; `out` (B, N, H, C) in q's dtype, allocated when None."""
    why = unsupported(q, k, v, q_rot, k_rot)
    if why is not None:
        raise ValueError(f"linear_attention: {why}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    scores, key_sum = scores_and_key_sum(v, k_rot, k, scores_config)
    return apply_scores(q, q_rot, scores, key_sum, out, apply_config)


@torch.library.custom_op(OP_NAME, mutates_args=())
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rot: torch.Tensor,
                     k_rot: torch.Tensor) -> torch.Tensor:
    """ReLU linear attention per head: out[n] = (sum_m v[m] k_rot[m]^T) q_rot[n] / (q[n] . sum_m k[m] + 1e-15);
    all (B, N, H, C) bf16 -> (B, N, H, C) bf16, contiguous. Forward only."""
    return launch(q, k, v, q_rot, k_rot)


@linear_attention.register_fake
def _(q, k, v, q_rot, k_rot):
    return q.new_empty(q.shape)


def reference(q, k, v, q_rot, k_rot) -> torch.Tensor:
    """What the kernels replace: `FusedLinearAttnProcessor`'s float32 einsums (in float64 for float64 inputs),
    rounded to q's dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)
    key_sum = k.to(acc).sum(dim=1)
    z = 1.0 / (torch.einsum("bnhc,bhc->bnh", q.to(acc), key_sum) + 1e-15)
    scores = torch.einsum("bnhc,bnhd->bhcd", v.to(acc), k_rot.to(acc))
    out = torch.einsum("bhcd,bnhd->bnhc", scores, q_rot.to(acc)) * z.unsqueeze(-1)
    return out.to(q.dtype)
