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
- `feedforward: fused` binds a channels-last forward to each block's `GLUMBTempConv` (same
  parameters, same function): its 1x1 convs become plain GEMMs on the (..., C) tokens, the depthwise
  3x3 cuDNN's NHWC kernel on a channels-last view, and the temporal (3, 1)
  conv matmuls over channels, with none of diffusers' NCHW / (B, C, F, HW) permutes. It runs inside
  compiled blocks only (eagerly diffusers' forward was faster). Modules it does not reproduce
  exactly (adapters or quantised convs, hooks, `norm_type`) keep diffusers' forward.
- `fused_kernels`: where no gradient is needed (validation renders), the fused feed-forward's SiLU,
  depthwise 3x3 and gate run as one Triton kernel (`ff_kernel.py`), and the fused linear attention's two
  token reductions as two Triton kernels on the tensor cores (`attn_kernel.py`); training keeps the ops above.
- `compile_blocks` compiles each transformer block (regional compile: all blocks share one
  compiled graph; only CUDA, where inductor's kernels pay off).
- `keep_activations_blocks` checkpoints all but the last N blocks (selective checkpointing),
  through diffusers' `enable_gradient_checkpointing(gradient_checkpointing_func=...)`.
- `cross_attention: dense_backward` swaps the cross-attention processor for one whose backward pass is
  dense matrix products over the small queries x prompt-keys score matrix (`cross_attention.py`).
- `trim_text_padding` (`trim_text_padding` below, applied by the training step to each batch)
  cuts the prompt padding after the batch's longest prompt before the transformer sees it.
- The float8 products of `train.mixed_precision: fp8` are set up by `job.train.quantize`; the fused
  feed-forward takes its GEMM from there (`set_feedforward_matmul`).
"""

from __future__ import annotations

import functools
import logging
import types

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import attn_kernel, ff_grad, ff_kernel
from .cross_attention import qkv_projections, use_dense_backward_cross_attention

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
    The products take float32 operands as diffusers' do: without autocast they run in float32; under bf16
    autocast (`train.mixed_precision` bf16 or fp8) autocast runs them, here as in diffusers', as bf16 products
    with bf16 results (the compiled training graph's `bmm`s are bf16). The key sum is taken in float32
    (diffusers sums in bf16), so this path is slightly more exact, never less."""

    fused = True  # marks the processor for `apply_*` (idempotent) and tests

    def __init__(self, kernels: bool = False):
        #: `speed.fused_kernels`: the two token reductions may run as Triton kernels when no gradient is needed
        #: (`attn_kernel`, `_attn_kernels_apply`); set by `use_fused_linear_attention`
        self.kernels = kernels

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        original_dtype = hidden_states.dtype
        query, key, value = qkv_projections(attn, hidden_states, encoder_hidden_states)
        # B, N, H, C throughout: no permuted copies
        query = F.relu(query.unflatten(2, (attn.heads, -1)))
        key = F.relu(key.unflatten(2, (attn.heads, -1)))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query_rotate, key_rotate = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        else:
            query_rotate, key_rotate = query, key

        if self.kernels and _attn_kernels_apply(query, key, value, query_rotate, key_rotate):
            out = attn_kernel.linear_attention(query, key, value, query_rotate, key_rotate)  # bf16, B, N, H, C
            out = out.flatten(2).to(original_dtype)
        else:
            key_sum = key.float().sum(dim=1)  # B, H, C
            z = 1.0 / (torch.einsum("bnhc,bhc->bnh", query.float(), key_sum) + 1e-15)
            scores = torch.einsum("bnhc,bnhd->bhcd", value.float(), key_rotate.float())  # B, H, C, C
            out = torch.einsum("bhcd,bnhd->bnhc", scores, query_rotate.float()) * z.unsqueeze(-1)
            out = out.flatten(2).to(original_dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _attn_kernels_apply(query, key, value, query_rotate, key_rotate) -> bool:
    """Whether `attn_kernel.linear_attention` may replace the float32 einsums. Only when no gradient is needed
    (the kernels have no backward, and training keeps the einsums, so training numerics never change; q, k and
    v carry every parameter's requires_grad, the rotary tables have none); only where Triton runs (CUDA); and
    not for inputs the kernels do not take (`attn_kernel.unsupported`: a dtype other than bf16, a head dim
    over 128, heads/channels not contiguous within a token, empty tensors)."""
    grad_needed = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if grad_needed:
        return False
    return attn_kernel.usable_on(query.device.type) and \
        attn_kernel.unsupported(query, key, value, query_rotate, key_rotate) is None


def _self_attentions(transformer):
    return [block.attn1 for block in transformer.transformer_blocks]


def use_fused_linear_attention(transformer, kernels: bool = False) -> int:
    """Swap every block's self-attention processor; returns how many were swapped. `kernels`
    (`speed.fused_kernels`): the processors may run the token reductions as Triton kernels when no gradient
    is needed (also updated on processors swapped before)."""
    swapped = 0
    for attn in _self_attentions(transformer):
        if getattr(attn.processor, "fused", False):
            attn.processor.kernels = kernels
        else:
            attn.set_processor(FusedLinearAttnProcessor(kernels=kernels))
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


def avoid_inductor_miscompiles() -> list[str]:
    """Inductor settings the compiled blocks need to compute the right gradients; returns what changed.

    Mix-order reduction (`torch._inductor.config.triton.mix_order_reduction`, on by default since
    torch 2.10) miscompiles the backward of the blocks' modulation: measured on torch 2.11 / H100
    (bench/NOTES.md item 8) the `scale_shift_table` / timestep gradients were NaN or wrong (0.85
    relative error at 32,760 tokens, different between identical calls) without autocast, and were
    right with it off, for +0.5-1 % step time. Upstream: pytorch/pytorch#193061 (fixed after 2.11).
    Turned off for every compile of the process: a silently wrong gradient costs more than 1 %."""
    import torch._inductor.config as inductor_config

    triton = getattr(inductor_config, "triton", None)
    if triton is not None and getattr(triton, "mix_order_reduction", False):
        triton.mix_order_reduction = False
        return ["inductor mix-order reduction off (pytorch#193061)"]
    return []


def tune_reductions(on: bool) -> bool:
    """Inductor's multi-kernel reductions (`torch._inductor.config.triton.multi_kernel`, `speed.tune_reductions`)
    for every later compile of the process: each reduction compiled persistent and looped, the faster kept at its
    first call. Set either way (the spec decides, not an earlier job of the process); returns False where this
    torch has no such option."""
    import torch._inductor.config as inductor_config

    triton = getattr(inductor_config, "triton", None)
    if triton is None or not hasattr(triton, "multi_kernel"):
        return False
    triton.multi_kernel = 1 if on else 0
    return True


def compile_blocks(transformer, activation_memory_budget: float | None = None, reductions_tuned: bool = True) -> int:
    """`torch.compile` each transformer block in place (`nn.Module.compile`); returns how many.

    Shapes are static per bucket; a second bucket recompiles once with dynamic shapes.
    `activation_memory_budget` (`speed.activation_memory_budget`) is set in torch's functorch config,
    which the compiler reads when it partitions a block's graph for the backward pass (first call);
    `reductions_tuned` (`speed.tune_reductions`) likewise sets inductor's multi-kernel reductions."""
    avoid_inductor_miscompiles()
    tune_reductions(reductions_tuned)
    if activation_memory_budget is not None:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "activation_memory_budget"):
            functorch_config.activation_memory_budget = float(activation_memory_budget)
    compiled = 0
    for block in transformer.transformer_blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile()
            compiled += 1
    return compiled


def blocks_compiled(transformer) -> bool:
    """Whether every transformer block was compiled in place (`compile_blocks`)."""
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


# --------------------------------------------------------------------------- channels-last feed-forward

#: How the fused feed-forward computes its depthwise 3x3 and its temporal (3, 1) conv; every variant computes
#: the same function. Chosen by the H100 microbenchmark (bench/ff_microbench.py, bench/NOTES.md; one block's
#: FF fwd+bwd at 32,760 tokens, compiled): "conv" (cuDNN on the NHWC view) 21.0 ms vs "shifted" (9 shifted
#: slices, which inductor fuses with SiLU and the gate, but its weight-gradient reduction is slow) 26.4 ms;
#: temporal "one" (one matmul to 3C channels + a shifted sum over frames) 21.0 ms vs "three" (three shifted
#: matmuls) 21.3 ms; diffusers' forward compiled 21.6 ms.
FF_DEPTHWISE = "conv"
FF_TEMPORAL = "one"


def _depthwise3x3_shifted(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise 3x3 cross-correlation, zero padding 1, on (N, H, W, C): the sum of nine shifted slices
    times per-channel weights. Accumulated in at least float32 (cuDNN accumulates in float32 too); one
    rounding to `u`'s dtype at the end."""
    n, h, w, c = u.shape
    acc_dtype = torch.promote_types(u.dtype, torch.float32)
    taps = weight.reshape(c, 9).t().to(acc_dtype)  # (9, C): tap (i, j) is row 3 * i + j
    padded = F.pad(u, (0, 0, 1, 1, 1, 1))
    out = bias.to(acc_dtype) if bias is not None else None
    for i in range(3):
        for j in range(3):
            term = padded[:, i:i + h, j:j + w, :] * taps[3 * i + j]
            out = term if out is None else out + term
    return out.to(u.dtype)


class DepthwiseConv3x3(torch.autograd.Function):
    """Depthwise 3x3 convolution (stride 1, zero padding 1) whose input gradient runs as a *forward* depthwise
    convolution of the output gradient with the kernel rotated by 180 degrees (`ff_grad.depthwise3x3_backward`:
    the same sums, cuDNN's faster kernel). Inputs: NCHW views of channels-last tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight_grad = weight.requires_grad  # a frozen weight (LoRA): the input need not be kept
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return F.conv2d(x, weight, bias, padding=1, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = ff_grad.depthwise3x3_backward(grad, x, weight, ctx.weight_grad)
        grad_b = grad.sum((0, 2, 3)) if ctx.bias_grad else None
        return grad_x, grad_w, grad_b


#: how the fused feed-forward's depthwise 3x3 gets its input gradient: "rotated" (`DepthwiseConv3x3`) or
#: "cudnn" (autograd's convolution backward); bench/depthwise_backward.py and bench/train_step.py measure both
DEPTHWISE_INPUT_GRAD = "rotated"


def _depthwise3x3_conv(u: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The same through `F.conv2d` on the channels-last NCHW view of (N, H, W, C) (no copy): cuDNN's
    NHWC depthwise kernels; back to (N, H, W, C) as a view (the output is channels-last too). With a
    gradient, `DepthwiseConv3x3` (its input gradient as a forward convolution) unless DEPTHWISE_INPUT_GRAD says
    "cudnn"."""
    x = u.permute(0, 3, 1, 2)
    grad = torch.is_grad_enabled() and (u.requires_grad or conv.weight.requires_grad)
    if grad and DEPTHWISE_INPUT_GRAD == "rotated" and conv.groups == x.shape[1] and conv.kernel_size == (3, 3):
        out = DepthwiseConv3x3.apply(x, conv.weight, conv.bias)
    else:
        out = F.conv2d(x, conv.weight, conv.bias, padding=1, groups=conv.groups)
    return out.permute(0, 2, 3, 1)


def _temporal_taps_matrix(weight: torch.Tensor) -> torch.Tensor:
    """conv_temp's (C_out, C_in, 3, 1) weight as one (3 C_out, C_in) matrix: the three taps stacked."""
    return weight[..., 0].permute(2, 0, 1).reshape(3 * weight.shape[0], -1)


#: the fused feed-forward's GEMMs: conv name -> its weight as the (out, in) matrix the GEMM multiplies by
FF_MATRICES = {"conv_inverted": lambda w: w.flatten(1), "conv_point": lambda w: w.flatten(1),
               "conv_temp": _temporal_taps_matrix}


def feedforward_matrices(transformer):
    """(feed-forward, conv name, conv weight, weight -> matrix) for every GEMM of every block's fused feed-forward
    (the float8 frozen-weight cache, `job.train.quantize`, keys its copies by these names)."""
    return [(ff, name, getattr(ff, name).weight, as_matrix)
            for ff in _feedforwards(transformer) for name, as_matrix in FF_MATRICES.items()]


def _temporal_conv_plus_identity(p: torch.Tensor, weight: torch.Tensor, how: str, linear=F.linear) -> torch.Tensor:
    """p + conv_temp(p) over frames, on (B, F, HW, C): out[f] = p[f] + W0 p[f-1] + W1 p[f] + W2 p[f+1]
    (zero outside the clip), with W_k = weight[:, :, k, 0] (C_out, C_in). `linear` computes the product
    of the "one" variant (`F.linear`, or the float8 product of `FF_MATMUL_ATTR`)."""
    taps = weight[..., 0].permute(2, 0, 1)  # (3, C_out, C_in)
    if how == "one":
        c = taps.shape[1]
        q = linear(p, _temporal_taps_matrix(weight)).unflatten(-1, (3, c))  # (B, F, HW, 3, C)
        prev = F.pad(q[:, :-1, :, 0], (0, 0, 0, 0, 1, 0))  # W0 p[f-1]; zero at f = 0
        nxt = F.pad(q[:, 1:, :, 2], (0, 0, 0, 0, 0, 1))  # W2 p[f+1]; zero at f = F-1
        return p + (q[:, :, :, 1] + prev + nxt)
    if how == "three":
        centre = F.linear(p, taps[1])
        prev = F.pad(F.linear(p[:, :-1], taps[0]), (0, 0, 0, 0, 1, 0))
        nxt = F.pad(F.linear(p[:, 1:], taps[2]), (0, 0, 0, 0, 0, 1))
        return p + (centre + prev + nxt)
    raise ValueError(f"unknown temporal variant {how!r}")


def _dwconv_kernel_applies(ff, v: torch.Tensor) -> bool:
    """Whether `ff_kernel.ff_dwconv_silu_gate` may replace SiLU + depthwise 3x3 + gate for `v` (the
    (N, H, W, 2C) output of conv_inverted). Only when no gradient is needed (the kernel has no backward,
    and training keeps the exact cuDNN path, so training numerics never change); only with diffusers'
    SiLU; only where Triton runs (CUDA); and not for inputs the kernel does not take (`unsupported`:
    a dtype other than bf16/fp16/fp32, an odd channel count, a non-contiguous channel axis, an empty tensor)."""
    conv = ff.conv_depth
    grad_needed = torch.is_grad_enabled() and (
        v.requires_grad or conv.weight.requires_grad or (conv.bias is not None and conv.bias.requires_grad))
    if grad_needed or type(ff.nonlinearity) is not torch.nn.SiLU:
        return False
    return ff_kernel.usable_on(v.device.type) and ff_kernel.unsupported(v, conv.weight, conv.bias) is None


def _grad_kernels_apply(ff, hidden_states: torch.Tensor, backward: str) -> bool:
    """Whether the fused feed-forward differentiates SiLU + depthwise + gate through `ff_grad.SiluDepthwiseGate`
    (`speed.feedforward_backward`): "triton", or "auto" with the feed-forward's products in float8
    (`train.mixed_precision: fp8`, `FF_MATMUL_ATTR` set); a bias of conv_inverted or conv_depth is trained;
    diffusers' SiLU, a depthwise 3x3, and Triton runs on the device. H100 full fine-tune steps (bench/RESULTS.md):
    float8 products 0.885 -> 0.851 s; bf16 products 1.090 -> 1.107 s (slower, hence "auto"); LoRA (frozen
    feed-forward) 0.596 -> 0.606 s (slower: the kernels' gain is the sums over tokens and the float8 cast's extra
    reads, which a frozen feed-forward does not have)."""
    if backward == "compiled" or not torch.is_grad_enabled():
        return False
    if backward == "auto" and getattr(ff, FF_MATMUL_ATTR, None) is None:
        return False
    if not any(conv.bias is not None and conv.bias.requires_grad for conv in (ff.conv_inverted, ff.conv_depth)):
        return False
    conv = ff.conv_depth
    if type(ff.nonlinearity) is not torch.nn.SiLU or conv.kernel_size != (3, 3) or conv.groups != conv.in_channels:
        return False
    return ff_kernel.usable_on(hidden_states.device.type)


def glumb_forward_channels_last(ff, hidden_states: torch.Tensor, depthwise: str | None = None,
                                temporal: str | None = None, kernels: bool = False,
                                backward: str = "compiled") -> torch.Tensor:
    """What diffusers' `GLUMBTempConv.forward` computes, on (B, F, H, W, C) tokens without leaving
    that layout, with `ff`'s own parameters: the 1x1 convs as `F.linear` (plain GEMMs on the (..., C)
    tensor instead of cuDNN implicit GEMMs and their NCHW views), the depthwise 3x3 on NHWC, and the
    temporal conv as matmuls over the channel axis (no (B, C, F, HW) permutes). With `kernels`, SiLU +
    depthwise + gate run as one Triton kernel where `_dwconv_kernel_applies` (inference); `backward`
    (`speed.feedforward_backward`): they are differentiated by `ff_grad.SiluDepthwiseGate` where `_grad_kernels_apply`. The three
    GEMMs go through `ff`'s `FF_MATMUL_ATTR` callable when one is set (`train.mixed_precision: fp8`)."""
    depthwise, temporal = depthwise or FF_DEPTHWISE, temporal or FF_TEMPORAL
    product = getattr(ff, FF_MATMUL_ATTR, None)

    def gemm(name: str):  # the product for one conv's weight; the float8 product finds its cached copy by name
        return F.linear if product is None else functools.partial(product, owner=ff, key=name)

    b, f, h, w, c = hidden_states.shape
    residual = hidden_states
    conv_in, conv_depth, conv_point = ff.conv_inverted, ff.conv_depth, ff.conv_point
    grad_kernels = depthwise == "conv" and _grad_kernels_apply(ff, hidden_states, backward)
    # with the Triton backward, conv_inverted's bias is added inside SiluDepthwiseGate (its gradient's sum is
    # taken in the kernel's pass)
    v = gemm("conv_inverted")(hidden_states, FF_MATRICES["conv_inverted"](conv_in.weight),
                              None if grad_kernels else conv_in.bias)
    v = v.view(b * f, h, w, -1)  # 2 * hidden
    if grad_kernels:
        x = ff_grad.SiluDepthwiseGate.apply(v, conv_in.bias, conv_depth.weight, conv_depth.bias)
    elif kernels and _dwconv_kernel_applies(ff, v):
        x = ff_kernel.ff_dwconv_silu_gate(v, conv_depth.weight, conv_depth.bias)
    else:
        u = ff.nonlinearity(v)
        if depthwise == "shifted":
            d = _depthwise3x3_shifted(u, conv_depth.weight, conv_depth.bias)
        elif depthwise == "conv":
            d = _depthwise3x3_conv(u, conv_depth)
        else:
            raise ValueError(f"unknown depthwise variant {depthwise!r}")
        x, gate = d.chunk(2, dim=-1)
        x = x * ff.nonlinearity(gate)
    p = gemm("conv_point")(x, FF_MATRICES["conv_point"](conv_point.weight), conv_point.bias).reshape(b, f, h * w, c)
    out = _temporal_conv_plus_identity(p, ff.conv_temp.weight, temporal, gemm("conv_temp")).view(b, f, h, w, c)
    if ff.residual_connection:
        out = out + residual
    return out


_FF_CONVS = ("conv_inverted", "conv_depth", "conv_point", "conv_temp")


def _wrapped(module: torch.nn.Module) -> bool:
    """A forward replaced on the instance (diffusers hooks, the trainer's leaf-level offload wrapper)."""
    return "forward" in module.__dict__ or getattr(module, "_diffusers_hook", None) is not None


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Bound as the `forward` of a `GLUMBTempConv` instance by `use_fused_feedforward`.

    Only under torch.compile: eagerly its unfused elementwise passes made it slower than diffusers'
    forward (H100 fwd+bwd 26.1 vs 25.0 ms per block), so eager runs (CPU, compile off or skipped)
    keep diffusers' forward. Also diffusers' forward when a conv was wrapped after patching (hooks or
    offload wrappers swap or move its weights inside its own forward, which must run); under compile
    that is decided when the block is traced (compile is not combined with such wrappers, see
    `compile_available` and `apply_training_speedups`)."""
    if not torch.compiler.is_compiling() or any(_wrapped(getattr(self, name)) for name in _FF_CONVS):
        return type(self).forward(self, hidden_states)
    return glumb_forward_channels_last(self, hidden_states, kernels=getattr(self, FUSED_KERNELS_ATTR, False),
                                       backward=getattr(self, FF_BACKWARD_ATTR, "compiled"))


def _plain_conv(conv, kernel: tuple[int, int], padding: tuple[int, int], groups: int | None = None) -> str | None:
    if type(conv) is not torch.nn.Conv2d:
        return f"{type(conv).__name__} (an adapter or quantised layer, not a plain nn.Conv2d)"
    if _wrapped(conv):
        return "its forward is wrapped (hooks / offload)"
    for t in (conv.weight, conv.bias):
        if t is not None and type(t.detach()) is not torch.Tensor:
            return f"its parameters are {type(t.detach()).__name__} (a tensor subclass)"
    if (tuple(conv.kernel_size), tuple(conv.padding), tuple(conv.stride), tuple(conv.dilation), conv.padding_mode) != \
            (kernel, padding, (1, 1), (1, 1), "zeros"):
        return f"kernel {conv.kernel_size} padding {conv.padding} stride {conv.stride} is not diffusers' layout"
    if conv.groups != (groups or 1):
        return f"groups {conv.groups}"
    return None


def feedforward_unfusable(ff) -> str | None:
    """Why the fused forward would not compute what this feed-forward module computes (None: it would)."""
    if type(ff).__name__ != "GLUMBTempConv":
        return f"{type(ff).__name__} is not diffusers' GLUMBTempConv"
    if ff.norm_type is not None:  # diffusers' rms_norm branch normalises over the frame axis: not reproduced
        return f"norm_type {ff.norm_type!r}"
    if _wrapped(ff):
        return "its forward is already replaced (hooks or another patch)"
    for name in _FF_CONVS:
        if type(getattr(ff, name)) is not torch.nn.Conv2d:
            return f"{name}: {type(getattr(ff, name)).__name__} (an adapter or quantised layer, not a plain nn.Conv2d)"
    hidden2 = ff.conv_inverted.out_channels
    checks = {"conv_inverted": ((1, 1), (0, 0), 1), "conv_depth": ((3, 3), (1, 1), hidden2),
              "conv_point": ((1, 1), (0, 0), 1), "conv_temp": ((3, 1), (1, 0), 1)}
    for name, (kernel, padding, groups) in checks.items():
        why = _plain_conv(getattr(ff, name), kernel, padding, groups)
        if why is not None:
            return f"{name}: {why}"
    if ff.conv_temp.bias is not None:
        return "conv_temp has a bias"
    if ff.conv_depth.out_channels != hidden2 or ff.conv_point.in_channels * 2 != hidden2 or \
            ff.conv_temp.in_channels != ff.conv_point.out_channels or ff.conv_temp.out_channels != ff.conv_point.out_channels:
        return "channel counts differ from diffusers' layout"
    if ff.residual_connection and ff.conv_inverted.in_channels != ff.conv_point.out_channels:
        return "residual connection with different in/out channels"
    return None


def _feedforwards(transformer):
    return [block.ff for block in transformer.transformer_blocks]


def feedforward_fused(ff) -> bool:
    return getattr(ff.__dict__.get("forward"), "__func__", None) is _fused_forward


#: Instance attribute of a patched `GLUMBTempConv`: whether its fused forward may use the Triton kernel
#: (`speed.fused_kernels`), set when the forward is bound.
FUSED_KERNELS_ATTR = "_trainer_fused_kernels"
#: Instance attribute of a `GLUMBTempConv`: a callable with `F.linear`'s signature that computes the fused
#: forward's three GEMMs (set by `set_feedforward_matmul`; absent: `F.linear`).
FF_MATMUL_ATTR = "_trainer_ff_matmul"
#: Instance attribute of a patched `GLUMBTempConv`: `speed.feedforward_backward` ("auto", "triton" or "compiled").
FF_BACKWARD_ATTR = "_trainer_ff_backward"


def set_feedforward_matmul(transformer, matmul) -> int:
    """Have every block's fused feed-forward compute its GEMMs (conv_inverted and conv_point as 1x1
    products, the temporal taps as one product) with `matmul(x, weight, bias=None, owner=ff, key=conv name)`
    instead of `F.linear` (owner and key name the weight, see `feedforward_matrices`); for `train.mixed_precision: fp8` (`job.train.quantize`), which cannot swap these convs
    for `nn.Linear` modules because the checkpoint keeps them as convs. Only the fused forward reads it,
    i.e. inside compiled blocks (`feedforward: fused`); diffusers' conv forward is unchanged. Returns
    how many modules were set."""
    ffs = _feedforwards(transformer)
    for ff in ffs:
        setattr(ff, FF_MATMUL_ATTR, matmul)
    return len(ffs)


def use_fused_feedforward(transformer, kernels: bool = False, backward: str = "compiled") -> tuple[int, list[str]]:
    """Bind the channels-last forward to every block's `GLUMBTempConv` it reproduces exactly.

    Per instance: the module, its parameters and its state dict stay diffusers' own (checkpoints,
    LoRA saving and export are unchanged); `del block.ff.forward` undoes it. `kernels`: the fused
    forward may run SiLU + depthwise + gate as one Triton kernel when no gradient is needed; `backward`
    (`speed.feedforward_backward`, see `_grad_kernels_apply`): how they are differentiated (both also updated on
    modules patched before). Returns how many were patched and, for the others, why not."""
    patched, skipped = 0, []
    for i, ff in enumerate(_feedforwards(transformer)):
        if feedforward_fused(ff):
            setattr(ff, FUSED_KERNELS_ATTR, kernels)
            setattr(ff, FF_BACKWARD_ATTR, backward)
            continue
        why = feedforward_unfusable(ff)
        if why is not None:
            skipped.append(f"transformer_blocks.{i}.ff: {why}")
            continue
        ff.forward = types.MethodType(_fused_forward, ff)
        setattr(ff, FUSED_KERNELS_ATTR, kernels)
        setattr(ff, FF_BACKWARD_ATTR, backward)
        patched += 1
    return patched, skipped


def _apply_fused_feedforward(transformer, applied: list[str], kernels: bool, backward: str = "compiled") -> None:
    patched, skipped = use_fused_feedforward(transformer, kernels, backward)
    if patched:
        notes = ([", with the Triton SiLU/depthwise/gate kernel where no gradient is needed (CUDA)"] if kernels else []) + \
            ([f", its SiLU/depthwise/gate backward as Triton kernels where its biases train"
              f"{' and its products are float8' if backward == 'auto' else ''} (CUDA)"] if backward != "compiled" else [])
        applied.append(f"channels-last feed-forward ({patched} blocks, runs inside compiled blocks{''.join(notes)})")
    if skipped:
        log.info("speed.feedforward: diffusers' forward kept for %d module(s): %s%s", len(skipped), "; ".join(skipped[:3]),
                 " ..." if len(skipped) > 3 else "")


# --------------------------------------------------------------------------- prompt padding

#: `trim_text_padding` rounds the kept prompt length up to this, so a run sees a few lengths, not every one
TEXT_LENGTH_MULTIPLE = 64


def trim_text_padding(embeds: torch.Tensor, mask: torch.Tensor | None,
                      multiple: int = TEXT_LENGTH_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`speed.trim_text_padding`: prompt embeddings (B, T, C) and mask (B, T) cut after the batch's last valid
    token, rounded up to `multiple` (at most T). The transformer turns the mask into a -10000 bias on the
    padded keys, which softmax makes exact zeros, so the cross-attention's output only changes by summation
    order. Nothing is cut when a prompt has no valid token at all (it then attends to every key equally).
    Call on the CPU batch (reading the mask on a GPU would wait for it)."""
    if mask is None or mask.ndim != 2 or mask.shape[1] == 0:
        return embeds, mask
    valid = mask.bool()
    if not bool(valid.any(dim=1).all()):
        return embeds, mask
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = int((valid * positions).max())
    keep = min(mask.shape[1], -(-last // multiple) * multiple)
    if keep == mask.shape[1]:
        return embeds, mask
    return embeds[:, :keep], mask[:, :keep]


# --------------------------------------------------------------------------- entry points

def _attn_kernels_note(kernels: bool) -> str:
    return " (its token reductions as Triton kernels where no gradient is needed (CUDA))" if kernels else ""


def apply_training_speedups(transformer, spec) -> list[str]:
    """Apply `spec.speed` to a transformer prepared for training (after LoRA / quantisation /
    checkpointing are set up). Returns what was applied, for the log."""
    speed, applied = spec.speed, []
    if speed.linear_attention == "fused" and use_fused_linear_attention(transformer, speed.fused_kernels):
        applied.append("fused linear attention" + _attn_kernels_note(speed.fused_kernels))
    if speed.feedforward == "fused":
        offload = spec.memory.group_offload
        if offload.enabled and offload.type == "leaf_level":
            # the leaf wrappers (added after this call) swap each conv's weights in inside the conv's own
            # forward, which the fused feed-forward does not call
            log.info("speed.feedforward: diffusers' feed-forward kept: memory.group_offload.type leaf_level "
                     "moves each conv's weights inside that conv's forward")
        else:
            _apply_fused_feedforward(transformer, applied, speed.fused_kernels, speed.feedforward_backward)
    if speed.cross_attention == "dense_backward" and use_dense_backward_cross_attention(transformer):
        applied.append("cross-attention with a dense backward")
    if spec.memory.gradient_checkpointing and speed.keep_activations_blocks > 0:
        recomputed = selective_checkpointing(transformer, speed.keep_activations_blocks)
        applied.append(f"selective checkpointing ({recomputed} of {len(transformer.transformer_blocks)} blocks recomputed)")
    if speed.compile_blocks:
        ok, why = compile_available(transformer)
        if ok and spec.memory.group_offload.enabled:  # the hooks are added after this call
            ok, why = False, "memory.group_offload moves weights inside the blocks"
        if ok:
            compile_blocks(transformer, speed.activation_memory_budget, speed.tune_reductions)
            applied.append("regional torch.compile" + (f" (activation memory budget {speed.activation_memory_budget:g})"
                                                        if speed.activation_memory_budget < 1 else ""))
        else:
            log.info("speed.compile_blocks: not compiling: %s", why)
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
    kernels = getattr(speed, "fused_kernels", False)
    if speed.linear_attention == "fused" and use_fused_linear_attention(transformer, kernels):
        applied.append("fused linear attention" + _attn_kernels_note(kernels))
    if getattr(speed, "feedforward", "diffusers") == "fused":
        _apply_fused_feedforward(transformer, applied, getattr(speed, "fused_kernels", False))
    if speed.compile_blocks and not blocks_compiled(transformer):
        ok, why = compile_available(transformer)
        if ok:
            compile_blocks(transformer, reductions_tuned=getattr(speed, "tune_reductions", True))
            applied.append("regional torch.compile")
        else:
            log.debug("speed.compile_blocks: not compiling for validation: %s", why)
    if applied:
        log.info("validation transformer speed-ups: %s", ", ".join(applied))
    return applied
