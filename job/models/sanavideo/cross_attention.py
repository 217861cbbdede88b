"""Cross-attention (video tokens -> prompt tokens) whose backward pass runs as dense matrix products.

SANA-Video's cross-attention has ~32,000 queries (81x832x480) and at most 300 keys (the prompt). The fused
attention kernels (cuDNN, flash) compute the backward pass by splitting the work over blocks of *keys*: with
2-5 key blocks per head, 20 heads and batch 1 only 40-100 thread blocks run on an H100's 132 SMs, each
walking all 32,000 queries, so the backward took ~2.4 ms per block where its data moves in ~0.3 ms
(bench/RESULTS.md, "Cross-attention backward"). The forward kernels split over queries and are fast.

`dense_backward_attention` keeps the fused forward (`F.scaled_dot_product_attention`) and writes the backward
as the textbook formulas over the full (queries x keys) score matrix, which is small here (32,760 x 128 per
head: 17 MB in float32). The scores are recomputed from q and k, nothing extra is saved:

    S = q k^T / sqrt(d) + bias        P = softmax(S)           (float32)
    dP = dO v^T                        dS = P * (dP - rowsum(P * dP))
    dq = dS k / sqrt(d)                dk = dS^T q / sqrt(d)   dv = P^T dO

The products take bf16 inputs with float32 accumulation, and P and dS are rounded to the inputs' dtype
before their products, the same precision as the flash backward. Under `torch.compile` the softmax and the
dS line fuse into one pass over the score matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: above this many keys the fused kernels' key-parallel backward has enough blocks to fill the GPU and the fused
#: backward runs instead. Measured on an H100 (`bench/cross_attention.py`, fwd + bwd of one block, compiled dense
#: vs cuDNN): 64 keys 1.82 vs 2.92 ms, 128: 2.12 vs 2.94, 192: 2.66 vs 2.82, 256: 3.01 vs 2.77, 320: 3.60 vs 2.88.
MAX_DENSE_KEYS = 192


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for (..., n, k) x (..., k, m) with at least float32 accumulation and result. On CUDA, bf16/fp16
    inputs stay in their dtype (tensor cores, `bmm`'s out_dtype); elsewhere they are widened first (exact)."""
    lead = a.shape[:-2]
    a3, b3 = a.flatten(0, -3), b.flatten(0, -3)
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        out = torch.bmm(a3, b3, out_dtype=torch.float32)
    else:
        wide = torch.promote_types(a.dtype, torch.float32)
        out = torch.bmm(a3.to(wide), b3.to(wide))
    return out.unflatten(0, lead)


class _DenseBackwardAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + bias) v with the backward above; q (B, H, N, D), k and v (B, H, M, D), bias
    broadcastable to (B, H, N, M) and without gradient (a mask)."""

    @staticmethod
    def forward(ctx, query, key, value, bias):
        ctx.save_for_backward(query, key, value, bias)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, bias = ctx.saved_tensors
        scale = query.shape[-1] ** -0.5
        scores = _matmul_fp32(query, key.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1)
        grad_probs = _matmul_fp32(grad_out, value.transpose(-1, -2))
        grad_scores = probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True))
        grad_scores = (grad_scores * scale).to(query.dtype)
        probs = probs.to(value.dtype)
        grad_query = grad_scores @ key
        grad_key = grad_scores.transpose(-1, -2) @ query
        grad_value = probs.transpose(-1, -2) @ grad_out
        return grad_query, grad_key, grad_value, None


def dense_backward_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `dense_backward_attention` is used: a gradient is needed, the keys are few, the mask (if any)
    is an additive float bias without gradient. Otherwise plain SDPA runs (same forward)."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        return False
    if key.shape[-2] > MAX_DENSE_KEYS:
        return False
    return bias is None or (bias.is_floating_point() and not bias.requires_grad)


def dense_backward_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention(query, key, value, attn_mask=bias)` (default scale, no dropout, not
    causal), with the dense backward where `dense_backward_applies`."""
    if dense_backward_applies(query, key, value, bias):
        return _DenseBackwardAttention.apply(query, key, value, bias)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)


def qkv_projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v of a diffusers `Attention` as its processors make them: the projections, then the q/k norms
    (keys and values from `encoder_hidden_states`, or from `hidden_states` for self-attention)."""
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    query = attn.to_q(hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


class DenseBackwardCrossAttnProcessor:
    """Drop-in for diffusers' `SanaAttnProcessor2_0` on the blocks' cross-attention (`attn2`): the same
    projections, q/k norms, mask handling and output projection, with `dense_backward_attention` in place of
    the attention call (diffusers' native backend is `F.scaled_dot_product_attention`, same forward)."""

    dense_backward = True  # marks the processor for `use_dense_backward_cross_attention` (idempotent) and tests

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, key_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = qkv_projections(attn, hidden_states, context)
        # (B, N, H, D) viewed as (B, H, N, D): no copies
        query, key, value = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))
        out = dense_backward_attention(query, key, value, attention_mask)
        out = out.transpose(1, 2).flatten(2).type_as(query)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out / attn.rescale_output_factor


def use_dense_backward_cross_attention(transformer) -> int:
    """Swap every block's cross-attention processor; returns how many were swapped."""
    swapped = 0
    for block in transformer.transformer_blocks:
        attn = getattr(block, "attn2", None)
        if attn is None or getattr(attn.processor, "dense_backward", False):
            continue
        attn.set_processor(DenseBackwardCrossAttnProcessor())
        swapped += 1
    return swapped
