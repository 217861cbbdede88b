"""Fewer memory passes in the Wan VAE (`AutoencoderKLWan`): the cache phase's encoder, validation's decoder.

    patched = use_fused_vae_ops(vae.encoder)   # or vae.decoder; returns how many modules were patched

Why: on an H100 about half of a bf16 81x832x480 encode is not convolution but elementwise passes
(bench/RESULTS.md, "Latent caching throughput"). Each `WanRMS_norm` is eight of them (a float32 copy,
the norm, the division, the cast back, `* scale`, `* gamma`, `+ bias` even when the bias is the float
0.0) and the SiLU after it one more, each reading and writing the whole activation: about 40 bytes
per element where one fused pass needs 4. And every `WanCausalConv3d` copies its whole input once
more through `F.pad` to add the height/width zeros that cuDNN can add itself.

What changes, per module instance (parameters, state dict and the model's function are untouched):

- every `WanRMS_norm` followed by a SiLU (the residual blocks' `norm1`/`norm2`, the encoder's and
  decoder's `norm_out`) runs norm and SiLU as one Triton kernel, and its block's `nonlinearity`
  becomes an identity; the attention block's norm runs the same kernel without SiLU. The kernel
  repeats the module's roundings (normalise in float32, round; `* scale`, round; `* gamma`, round;
  `+ bias`, round; SiLU in float32, round). It multiplies by the reciprocal norm and uses the fast
  exp (a division per element made it compute-bound), so a value can land one bf16 step from
  diffusers' where the float32 result sits on a rounding boundary.
- every `WanCausalConv3d` concatenates its cached frames (or zero frames) in time only and passes the
  height/width padding to the convolution: the same zeros, one copy fewer.

Only where the kernel can run (CUDA with Triton, see `triton_support`) on activations whose channels
are innermost (channels-last: `data.vae_channels_last`), and not while `torch.compile` traces (the
compiled encoder fuses these passes itself); anywhere else each module computes exactly what
diffusers' does, through diffusers' own forward.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import types

import torch
import torch.nn.functional as F
from torch import nn

from job.models.sanavideo.triton_support import kernels_usable

log = logging.getLogger("trainer.vae")

# module classes whose forward this file knows (diffusers' autoencoder_kl_wan); anything else is left alone
_NORM = "WanRMS_norm"
_CONV = "WanCausalConv3d"
# owners whose forward runs `self.norm*(x)` then `self.nonlinearity(x)` and uses `nonlinearity` nowhere else
_NORM_THEN_SILU = {"WanResidualBlock": ("norm1", "norm2"), "WanEncoder3d": ("norm_out",), "WanDecoder3d": ("norm_out",)}
_NORM_ALONE = {"WanAttentionBlock": ("norm",)}
_DTYPES = (torch.bfloat16, torch.float32)
_CACHE_T = 2  # frames a causal conv keeps from the previous chunk (diffusers' CACHE_T)  # float16 would need its own rounding step


# --------------------------------------------------------------------------- the kernel

@functools.cache
def _kernel():
    """The Triton module, imported on first use (only where a kernel can run)."""
    import triton

    from job.models.sanavideo import _vae_triton

    return triton, _vae_triton


def _channels_innermost(x: torch.Tensor) -> bool:
    """x is [B, C, ...] with the channels of each position contiguous (channels-last), and dense."""
    return x.dim() >= 3 and x.movedim(1, -1).is_contiguous()


def fused_rms_norm_usable(x: torch.Tensor, gamma: torch.Tensor, bias) -> bool:
    if not kernels_usable(x) or torch.compiler.is_compiling() or torch.is_grad_enabled() and x.requires_grad:
        return False
    if x.dtype not in _DTYPES or gamma.dtype != x.dtype or gamma.device != x.device or x.numel() == 0:
        return False
    if isinstance(bias, torch.Tensor) and (bias.dtype != x.dtype or bias.device != x.device):
        return False
    if not isinstance(bias, torch.Tensor) and bias != 0.0:
        return False
    return _channels_innermost(x) and gamma.numel() == x.shape[1] and x.shape[1] <= 4096


def _round_mode(x: torch.Tensor) -> int:
    """The kernel's ROUND: 0 none (float32), 1 hardware bf16 conversion, 2 the same on integer bits (the
    CPU interpreter, whose conversion truncates)."""
    if x.dtype == torch.float32:
        return 0
    return 2 if x.device.type == "cpu" else 1


def _launch(kernel, x: torch.Tensor, *args, **meta) -> None:
    """Run `kernel` over x's positions (rows) x channels, a block of rows per program."""
    triton, _ = _kernel()
    channels = x.shape[1]
    rows = x.numel() // channels
    block_c = triton.next_power_of_2(channels)
    block_rows = max(1, min(64, 8192 // block_c))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # launch on x's GPU
        kernel[(triton.cdiv(rows, block_rows),)](*args, rows, channels, *meta.pop("scalars", ()), ROUND=_round_mode(x),
                                                 BLOCK_ROWS=block_rows, BLOCK_C=block_c,
                                                 num_warps=4 if block_c <= 256 else 8, **meta)


def fused_rms_norm(x: torch.Tensor, gamma: torch.Tensor, bias, scale: float, eps: float = 1e-12,
                   silu: bool = False, pre_bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`WanRMS_norm` over dim 1 (then SiLU if asked) of a channels-innermost tensor, in one pass; with
    `pre_bias`, of `x + pre_bias` (a convolution's bias, added here instead of in its own pass).

    Caller checks `fused_rms_norm_usable` first. The output has x's shape, dtype and strides; `out`, if
    given, is written instead (x's shape and dtype, channels innermost, one dense block)."""
    _, kernels = _kernel()
    if out is None:
        out = torch.empty_like(x)  # preserve_format: channels-last in, channels-last out
    elif out.shape != x.shape or out.dtype != x.dtype or not _channels_innermost(out):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is not a dense channels-last tensor like x")
    has_bias = isinstance(bias, torch.Tensor)
    _launch(kernels.rms_norm_silu, x, x, pre_bias if pre_bias is not None else gamma, gamma.reshape(-1),
            bias.reshape(-1) if has_bias else gamma, out, scalars=(float(scale), float(eps)),
            PRE_BIAS=pre_bias is not None, HAS_BIAS=has_bias, SILU=silu)
    return out


def fused_bias_residual(y: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(y + bias) + h in one pass: a convolution's bias and the residual add after it."""
    _, kernels = _kernel()
    out = torch.empty_like(y)
    _launch(kernels.bias_residual_add, y, y, bias, h, out)
    return out


# --------------------------------------------------------------------------- module patches

def to_channels_last(module: nn.Module) -> nn.Module:
    """Every Conv3d weight to `channels_last_3d` and every Conv2d weight to `channels_last`, in place.

    (`module.to(memory_format=torch.channels_last_3d)` would fail on the encoder's 2D convolutions:
    that format exists only for 5-D tensors.)
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module



def warm_up_in_background(module: nn.Module) -> threading.Thread | None:
    """Compile the kernel for every fused norm of `module` on a thread, while the caller does other work
    (the cache phase starts its decode workers); `join()` it before the first encode. Triton compiles
    each variant (channel count, SiLU, bias) on first use, about 0.5-1 s each on a cold cache; inputs
    of 16 positions hit the same specialisation as real ones (counts divisible by 16)."""
    variants = set()
    for m in module.modules():
        if "forward" in vars(m) and getattr(m, "_fused_silu", None) is not None and m.gamma.is_cuda:
            variants.add((m.gamma.numel(), m._fused_silu, isinstance(m.bias, torch.Tensor), m.gamma.dtype,
                          m.gamma.device))
    if not variants:
        return None

    def compile_all():
        try:
            for channels, silu, bias, dtype, device in sorted(variants, key=str):
                x = torch.zeros(1, channels, 1, 4, 4, dtype=dtype, device=device,
                                memory_format=torch.channels_last_3d)
                gamma = torch.ones(channels, dtype=dtype, device=device)
                fused_rms_norm(x, gamma, torch.zeros_like(gamma) if bias else 0.0, 1.0, silu=silu)
            torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - the first real call compiles (and reports) instead
            log.debug("fused Wan VAE ops: warm-up failed (%s)", exc)

    thread = threading.Thread(target=compile_all, name="vae-kernel-warm-up", daemon=True)
    thread.start()
    return thread


def speed_up_for_inference(vae: nn.Module) -> list[str]:
    """Validation's VAE (decode, and the image-to-video condition encode): channels-last weights (the
    activations follow them through cuDNN) and the fused ops above. Returns what was applied."""
    to_channels_last(vae)
    applied = ["channels-last layout"]
    if use_fused_vae_ops(vae):
        applied.append("fused RMS norm + SiLU kernels")
    return applied


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Bound to a `WanRMS_norm` instance: the kernel where it can run, else diffusers' forward (plus the
    SiLU its owner no longer applies, when `_fused_silu`)."""
    silu = self._fused_silu
    if self.channel_first and fused_rms_norm_usable(x, self.gamma, self.bias):
        return fused_rms_norm(x, self.gamma, self.bias, self.scale, silu=silu)
    y = type(self).forward(self, x)
    return F.silu(y) if silu else y


def _causal_conv_forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """Bound to a `WanCausalConv3d` instance: what diffusers' forward computes, with the height/width
    zeros added by the convolution instead of an `F.pad` copy of the input."""
    if torch.compiler.is_compiling() or not kernels_usable(x):
        return type(self).forward(self, x, cache_x)
    return _causal_conv(self, x, cache_x, self.bias)


def _causal_conv(conv, x: torch.Tensor, cache_x: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    pad_t = conv._padding[4]
    if cache_x is not None and pad_t > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        pad_t -= cache_x.shape[2]
    if pad_t > 0:
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
    return _spatially_padded_conv(conv, x, bias)


def _spatially_padded_conv(conv, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The causal conv on input that already has its frames in front: height/width zeros added by cuDNN."""
    pad_w, _, pad_h, _, _, _ = conv._padding
    weight = conv.weight
    if x.shape[1] < MIN_CONV_CHANNELS and _channels_innermost(x) and conv.groups == 1:
        x, weight = _zero_channels(x, MIN_CONV_CHANNELS), _zero_channels(weight, MIN_CONV_CHANNELS)
    return F.conv3d(x, weight, bias, conv.stride, (0, pad_h, pad_w), conv.dilation, conv.groups)


def _conv_without_bias(conv, x: torch.Tensor, feat_cache, feat_idx) -> torch.Tensor:
    """A residual block's causal conv with diffusers' frame-cache bookkeeping (`WanResidualBlock.forward`),
    its bias left for the next fused kernel to add."""
    if feat_cache is None:
        return _causal_conv(conv, x, None, None)
    old = feat_cache[feat_idx[0]]
    _update_frame_cache(x, feat_cache, feat_idx)
    return _causal_conv(conv, x, old, None)


def _update_frame_cache(x: torch.Tensor, feat_cache, feat_idx) -> None:
    """diffusers' bookkeeping after a cached causal conv: keep x's last frames (with the previous chunk's last
    frame when x has only one) for the next chunk, and move to the next conv's slot."""
    idx = feat_idx[0]
    cache_x = x[:, :, -_CACHE_T:].clone()
    if cache_x.shape[2] < 2 and feat_cache[idx] is not None:
        cache_x = torch.cat([feat_cache[idx][:, :, -1].unsqueeze(2).to(cache_x.device), cache_x], dim=2)
    feat_cache[idx] = cache_x
    feat_idx[0] += 1


def _norm_silu_conv(norm, conv, x: torch.Tensor, feat_cache, feat_idx, pre_bias: torch.Tensor | None = None):
    """norm + SiLU of x (the kernel) and the causal conv after it without its bias. The kernel writes into the
    conv's time-padded input (the cached or zero frames already in front), so the concatenation that copies
    the whole activation for every conv becomes a copy of the (at most 2) cached frames. One clip at a time
    (with several, the frames after the front ones are not one dense block: norm, then `_conv_without_bias`)."""
    pad_t = conv._padding[4]
    old = feat_cache[feat_idx[0]] if feat_cache is not None else None
    front = pad_t - (old.shape[2] if old is not None else 0)  # zero frames in front of the cached ones
    if x.shape[0] != 1 or front < 0 or (old is not None and pad_t == 0):
        y = fused_rms_norm(x, norm.gamma, norm.bias, norm.scale, silu=True, pre_bias=pre_bias)
        return _conv_without_bias(conv, y, feat_cache, feat_idx)
    b, c, t, h, w = x.shape
    padded = torch.empty((b, c, pad_t + t, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    padded[:, :, :front].zero_()
    if old is not None:
        padded[:, :, front:pad_t].copy_(old)
    y = fused_rms_norm(x, norm.gamma, norm.bias, norm.scale, silu=True, pre_bias=pre_bias, out=padded[:, :, pad_t:])
    if feat_cache is not None:
        _update_frame_cache(y, feat_cache, feat_idx)
    return _spatially_padded_conv(conv, padded, None)


def _channel_view(bias: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return bias.view(1, -1, *([1] * (like.dim() - 2)))


def _resblock_fast(block, x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or not fused_rms_norm_usable(x, block.norm1.gamma, block.norm1.bias):
        return False
    if block.training and block.dropout.p > 0:
        return False
    return all(type(c).__name__ == _CONV and isinstance(c.bias, torch.Tensor) and c.bias.dtype == x.dtype
               for c in (block.conv1, block.conv2))


def _resblock_forward(self, x: torch.Tensor, feat_cache=None, feat_idx=[0]) -> torch.Tensor:  # noqa: B006 - diffusers' signature
    """Bound to a `WanResidualBlock` instance: diffusers' forward (shortcut; norm1, SiLU, conv1; norm2,
    SiLU, dropout, conv2; + shortcut) with each conv's bias added inside the next fused kernel (norm2's,
    then the residual add's) instead of a pass of its own, and each norm writing straight into its conv's
    time-padded input (`_norm_silu_conv`)."""
    if not _resblock_fast(self, x):
        return type(self).forward(self, x, feat_cache, feat_idx)
    h = self.conv_shortcut(x)
    y = _norm_silu_conv(self.norm1, self.conv1, x, feat_cache, feat_idx)
    if fused_rms_norm_usable(y, self.norm2.gamma, self.norm2.bias):  # (dropout: the identity here, see _resblock_fast)
        y = _norm_silu_conv(self.norm2, self.conv2, y, feat_cache, feat_idx, pre_bias=self.conv1.bias)
    else:
        y = F.silu(type(self.norm2).forward(self.norm2, y + _channel_view(self.conv1.bias, y)))
        y = _conv_without_bias(self.conv2, self.dropout(y), feat_cache, feat_idx)
    if y.shape == h.shape and y.stride() == h.stride() and _channels_innermost(y) and kernels_usable(y):
        return fused_bias_residual(y, self.conv2.bias, h)
    return (y + _channel_view(self.conv2.bias, y)) + h


#: The encoder's first conv reads 3 (RGB) channels: channels-last cuDNN has no tensor-core kernel for
#: that and fell back to a generic one (H100: 1.9 ms per chunk, 41 ms per 81x832x480 clip, for 0.3 % of
#: the encoder's FLOPs). Zero channels up to 8 (x and weight) give the same sums on tensor cores.
MIN_CONV_CHANNELS = 8


def _zero_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """t [N, C, ...] with zero channels appended up to `channels`, in t's memory layout."""
    padded = t.new_zeros((t.shape[0], channels, *t.shape[2:]))
    padded = padded.contiguous(memory_format=torch.channels_last_3d) if t.dim() == 5 and _channels_innermost(t) \
        else padded
    padded[:, : t.shape[1]] = t
    return padded


def _patched(module: nn.Module) -> bool:
    return "forward" in module.__dict__


def _norm_patchable(norm) -> bool:
    return type(norm).__name__ == _NORM and not _patched(norm) and getattr(norm, "channel_first", False)


def use_fused_vae_ops(module: nn.Module) -> int:
    """Patch a Wan VAE (or its `encoder` / `decoder`) in place; idempotent. Returns how many norms and
    convolutions now take the fused path where it can run."""
    patched = 0
    for owner in module.modules():
        kind = type(owner).__name__
        if kind == _CONV and not _patched(owner) and len(owner._padding) == 6:
            owner.forward = types.MethodType(_causal_conv_forward, owner)
            patched += 1
            continue
        silu_norms = _NORM_THEN_SILU.get(kind, ())
        plain_norms = _NORM_ALONE.get(kind, ())
        if silu_norms and not (isinstance(getattr(owner, "nonlinearity", None), nn.SiLU)
                               and all(_norm_patchable(getattr(owner, n, None)) for n in silu_norms)):
            silu_norms = ()  # an activation other than SiLU, or already patched: leave this owner alone
        for name in silu_norms + plain_norms:
            norm = getattr(owner, name, None)
            if not _norm_patchable(norm):
                continue
            norm._fused_silu = name in silu_norms
            norm.forward = types.MethodType(_norm_forward, norm)
            patched += 1
        if silu_norms:
            owner.nonlinearity = nn.Identity()  # the SiLU now runs inside the norms above
            if kind == "WanResidualBlock" and not _patched(owner):
                owner.forward = types.MethodType(_resblock_forward, owner)
                patched += 1
    if patched:
        log.debug("fused Wan VAE ops: %d modules patched", patched)
    return patched
