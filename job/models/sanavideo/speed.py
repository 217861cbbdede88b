"""Speed-ups of the SANA-Video transformer (the `speed:` spec section).

`apply_training_speedups(transformer, spec)` (called by `prepare_transformer`) and
`apply_inference_speedups(transformer, speed)` (called by the validation pipeline builder) change
how the diffusers `SanaVideoTransformer3DModel` runs, never what it computes:

- `linear_attention: fused` swaps the self-attention processor for `FusedLinearAttnProcessor`:
  the same ReLU linear attention with rotary embedding, but kept in token-major (B, N, H, C) layout
  (diffusers permutes q/k/v to (B, H, C, N), writes the rotary halves through strided slices and
  copies each to fp32 separately), with the normaliser computed in fp32 (diffusers: bf16). Under
  `torch.compile` the ReLU, rotary and fp32 casts fuse into the producers of the two small
  fp32 matrix products.
- `compile_blocks` compiles each transformer block (regional compile: all blocks share one
  compiled graph; only CUDA, where inductor's kernels pay off).
- `keep_activations_blocks` checkpoints all but the last N blocks (selective checkpointing),
  through diffusers' `enable_gradient_checkpointing(gradient_checkpointing_func=...)`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

log = logging.getLogger("trainer.speed")

BLOCK_CLASS = "SanaVideoTransformerBlock"


# --------------------------------------------------------------------------- fused linear attention

def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' interleaved rotary (pairs (x[2i], x[2i+1])), written as one stack instead of two
    strided writes into an empty tensor. Same arithmetic, same dtype rules."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class FusedLinearAttnProcessor:
    """Drop-in for diffusers' `SanaLinearAttnProcessor3_0` (SANA-Video self-attention).

    out[n] = (sum_m v[m] k_rot[m]^T) q_rot[n] / (q[n] . sum_m k[m]), per head, with q, k after ReLU.
    The two reductions over tokens run in fp32 like diffusers'; the normaliser too (diffusers
    rounds it to bf16, so this path is slightly more exact, never less)."""

    fused = True  # marks the processor for `apply_*` (idempotent) and tests

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        original_dtype = hidden_states.dtype
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # B, N, H, C throughout: no permuted copies
        query = F.relu(query.unflatten(2, (attn.heads, -1)))
        key = F.relu(key.unflatten(2, (attn.heads, -1)))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query_rotate, key_rotate = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        else:
            query_rotate, key_rotate = query, key

        key_sum = key.float().sum(dim=1)  # B, H, C
        z = 1.0 / (torch.einsum("bnhc,bhc->bnh", query.float(), key_sum) + 1e-15)
        scores = torch.einsum("bnhc,bnhd->bhcd", value.float(), key_rotate.float())  # B, H, C, C
        out = torch.einsum("bhcd,bnhd->bnhc", scores, query_rotate.float()) * z.unsqueeze(-1)
        out = out.flatten(2).to(original_dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _self_attentions(transformer):
    return [block.attn1 for block in transformer.transformer_blocks]


def use_fused_linear_attention(transformer) -> int:
    """Swap every block's self-attention processor; returns how many were swapped."""
    swapped = 0
    for attn in _self_attentions(transformer):
        if not getattr(attn.processor, "fused", False):
            attn.set_processor(FusedLinearAttnProcessor())
            swapped += 1
    return swapped


# --------------------------------------------------------------------------- compile

def compile_available(transformer) -> tuple[bool, str]:
    """Whether regional compile makes sense here, and if not, why (for the log)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (inductor's CPU kernels would cost more compile time than they save)"
    if any(getattr(m, "_diffusers_hook", None) is not None for m in transformer.modules()):
        return False, "the transformer has diffusers hooks (group offload moves weights inside the blocks)"
    return True, ""


#: Measured on torch 2.11 / H100 (bench/NOTES.md): compiled blocks computing in plain bf16 (no autocast)
#: gave NaN gradients for the modulation tables (`scale_shift_table`, the time embedding) while the loss
#: and every other gradient matched eager. Under bf16 autocast (the default) they match eager.
BF16_NO_AUTOCAST = ("train.mixed_precision 'no' over bf16 weights: compiled blocks gave NaN gradients for the "
                    "modulation tables in this mode (bench/NOTES.md); set train.mixed_precision: bf16 (the default) "
                    "to train with the compiled blocks")


def bf16_without_autocast(spec) -> bool:
    return spec.train.mixed_precision == "no" and spec.model.base_model_precision != "fp32"


def compile_blocks(transformer) -> int:
    """`torch.compile` each transformer block in place (`nn.Module.compile`); returns how many.

    Shapes are static per bucket; a second bucket recompiles once with dynamic shapes."""
    compiled = 0
    for block in transformer.transformer_blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile()
            compiled += 1
    return compiled


def _blocks_compiled(transformer) -> bool:
    return all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer.transformer_blocks)


# --------------------------------------------------------------------------- selective checkpointing

def selective_checkpointing(transformer, keep_last: int) -> int:
    """Checkpoint every block but the last `keep_last` (those keep their activations: no recompute).

    Returns how many blocks are still recomputed."""
    blocks = list(transformer.transformer_blocks)
    keep_last = min(keep_last, len(blocks))
    kept = frozenset(id(b) for b in blocks[len(blocks) - keep_last:])

    def checkpoint_unless_kept(block, *args):
        if id(block) in kept:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_unless_kept)
    return len(blocks) - keep_last


# --------------------------------------------------------------------------- entry points

def apply_training_speedups(transformer, spec) -> list[str]:
    """Apply `spec.speed` to a transformer prepared for training (after LoRA / quantisation /
    checkpointing are set up). Returns what was applied, for the log."""
    speed, applied = spec.speed, []
    if speed.linear_attention == "fused" and use_fused_linear_attention(transformer):
        applied.append("fused linear attention")
    if spec.memory.gradient_checkpointing and speed.keep_activations_blocks > 0:
        recomputed = selective_checkpointing(transformer, speed.keep_activations_blocks)
        applied.append(f"selective checkpointing ({recomputed} of {len(transformer.transformer_blocks)} blocks recomputed)")
    if speed.compile_blocks:
        ok, why = compile_available(transformer)
        if ok and spec.memory.group_offload.enabled:  # the hooks are added after this call
            ok, why = False, "memory.group_offload moves weights inside the blocks"
        if ok and bf16_without_autocast(spec):
            ok, why = False, BF16_NO_AUTOCAST
        if ok:
            compile_blocks(transformer)
            applied.append("regional torch.compile")
        else:
            (log.warning if why == BF16_NO_AUTOCAST else log.info)("speed.compile_blocks: not compiling: %s", why)
    if applied:
        log.info("transformer speed-ups: %s", ", ".join(applied))
    return applied


def apply_inference_speedups(transformer, speed) -> list[str]:
    """Apply `speed` (a `SpeedSpec`) to a transformer used for validation renders. Idempotent: the
    training transformer (in train mode) is left as it is: `apply_training_speedups` already set it up
    from the same spec, and validation must never change how training computes."""
    if transformer.training:
        return []
    applied = []
    if speed.linear_attention == "fused" and use_fused_linear_attention(transformer):
        applied.append("fused linear attention")
    if speed.compile_blocks and not _blocks_compiled(transformer):
        ok, why = compile_available(transformer)
        if ok:
            compile_blocks(transformer)
            applied.append("regional torch.compile")
        else:
            log.debug("speed.compile_blocks: not compiling for validation: %s", why)
    if applied:
        log.info("validation transformer speed-ups: %s", ", ".join(applied))
    return applied
