"""One Triton kernel for the feed-forward's SiLU + depthwise 3x3 + gate (inference only).

In `glumb_forward_channels_last` the output `v` of `conv_inverted` (N, H, W, 2C), channels-last,
goes through three memory-bound passes over 2C = 11,200 channels per token: `s = silu(v)`,
`d = depthwise3x3(s) + bias` (cuDNN NHWC), `a, g = d.chunk(2, -1)`, `a * silu(g)`. This kernel does
all three in one pass: it reads `v` once from device memory (the 3x3 neighbours come from L1/L2)
and writes only the (N, H, W, C) result.

    out = ff_dwconv_silu_gate(v, weight, bias)   # torch.ops.trainer.ff_dwconv_silu_gate

Numerics: float32 arithmetic, and the reference path's roundings emulated where they are cheap so
that the result matches it within bf16 rounding: `s` is rounded to v's dtype (the reference stores
`u = silu(v)` in bf16), the depthwise sum is rounded to v's dtype before the bias is added (cuDNN
writes the conv in bf16; inductor adds the bias in the fused gate kernel, in float32), and the gate
product is rounded once at the end. For float32 inputs nothing is rounded.

Forward only (no autograd formula): `glumb_forward_channels_last` calls it only when no gradient is
needed (validation renders). Wrapped as a `torch.library.custom_op` with a fake implementation, so
the compiled transformer blocks call it without a graph break. Triton is imported when the kernel
is first launched: this module imports on machines without it (`triton_support.kernels_usable`
says where it can run).

How it works: one program per (image n, tile of columns, BLOCK_C channels of each half) walks down
the H rows. Input row r contributes to output rows r+1, r and r-1 (vertical taps 0, 1, 2), so two
running float32 accumulators per half (rows r-1 and r) suffice, and row r-1 is finished and written
after row r is read; zero padding is the masked loads' zero (silu(0) = 0). Each row is
loaded at the three horizontal offsets (-1, 0, +1 column; the neighbours mostly hit L1) and SiLU runs
on each load.

Speed (H100, bench/ff_kernel.py, one block's v of 42 x 30 x 52 x 11,200 bf16 at batch 2): 2.73-2.80 ms
vs 3.24-3.37 ms for the compiled PyTorch/cuDNN ops (about 800 GB/s on the fewest bytes, a copy of v
runs at 2,900 GB/s). A variant that ran SiLU once per value and took the left/right neighbours through
0/1 shift matrices on the tensor cores (tl.dot) was slower (2.98-3.69 ms), and rounding with one
`cvt` instead of integer ops changed nothing: the kernel is bound by neither SiLU nor ALU work but,
most likely, by latency: ptxas (Triton 3.9, offline, sm_90a) gives (4, 128, 4) 167 registers per
thread (72 of them the 18 tap vectors, 4 channels each), so 3 programs (12 warps) fit on an SM, and
each row step has only ~6 KB of loads in flight per SM, issued after the previous row's math (Triton
does not pipeline this loop). Next, not measured: each thread owning several columns of the same
channels (taps amortised), loading row r + 1 before computing row r, then ncu.
"""

from __future__ import annotations

import contextlib

import torch

from .triton_support import interpreting, kernels_usable

OP_NAME = "trainer::ff_dwconv_silu_gate"

#: dtypes the kernel takes for `v` (the weight and bias may be any float dtype: they are read in float32).
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

#: (BLOCK_W, BLOCK_C, num_warps): BLOCK_W columns x BLOCK_C channels of each half per program. Chosen on an
#: H100 by bench/ff_kernel.py at the 81x832x480 latent grid (W = 52 columns, C = 5600 channels per half):
#: (4, 128, 4) 2.73 / 2.80 ms in two runs; (2, 256, 4), (4, 64, 4), (1, 256, 4), (8, 64, 4) within 4 %;
#: 8 warps 3.6-3.9 ms.
DEFAULT_CONFIG = (4, 128, 4)


def unsupported(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why the kernel cannot compute this call (None: it can). Callers take the PyTorch path then."""
    if v.dim() != 4:
        return f"v has {v.dim()} dims, the kernel takes (N, H, W, 2C)"
    if v.dtype not in SUPPORTED_DTYPES:
        return f"v is {v.dtype}, the kernel takes {', '.join(str(d) for d in SUPPORTED_DTYPES)}"
    channels2 = v.shape[-1]
    if channels2 % 2:
        return f"{channels2} channels cannot be split into value and gate halves"
    if v.stride(-1) != 1:
        return "v is not channels-last (its channel stride is not 1)"
    if tuple(weight.shape) != (channels2, 1, 3, 3) or not weight.dtype.is_floating_point:
        return f"weight {tuple(weight.shape)} is not a depthwise 3x3 over {channels2} channels"
    if bias is not None and (tuple(bias.shape) != (channels2,) or not bias.dtype.is_floating_point):
        return f"bias {tuple(bias.shape)} does not match {channels2} channels"
    if any(t.device != v.device for t in (weight, bias) if t is not None):
        return "v, weight and bias are on different devices"
    if v.numel() == 0:
        return "empty input"
    return None


@torch.compiler.assume_constant_result
def usable_on(device_type: str) -> bool:
    """`kernels_usable` for a device type, evaluated once when a compiled graph is traced (a constant
    there, instead of tracing importlib and the environment)."""
    return kernels_usable(torch.empty(0, device=device_type))


def _kernel():
    from . import _ff_triton  # imports triton: only where a kernel runs

    return _ff_triton.triton, _ff_triton.dwconv_silu_gate_kernel


def launch(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Run the kernel into `out` (N, H, W, C); `config` = (BLOCK_W, BLOCK_C, num_warps), default
    `DEFAULT_CONFIG` (read at call time: bench/ff_kernel.py sets it)."""
    why = unsupported(v, weight, bias)
    if why is not None:
        raise ValueError(f"ff_dwconv_silu_gate: {why}")
    triton, kernel = _kernel()
    n, h, w, channels2 = v.shape
    c = channels2 // 2
    block_w, block_c, num_warps = config or DEFAULT_CONFIG
    block_w = min(block_w, triton.next_power_of_2(w))
    block_c = min(block_c, max(16, triton.next_power_of_2(c)))
    weight = weight.contiguous()
    with torch.cuda.device(v.device) if v.is_cuda else contextlib.nullcontext():
        kernel[(triton.cdiv(w, block_w), triton.cdiv(c, block_c), n)](
            v, weight, bias if bias is not None else weight, out, h, w, c,
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            HAS_BIAS=bias is not None, ROUND=v.dtype != torch.float32, INTERPRETED=interpreting(),
            BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps)
    return out


@torch.library.custom_op(OP_NAME, mutates_args=())
def ff_dwconv_silu_gate(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a * silu(g) for (a, g) = (depthwise3x3(silu(v), weight, zero padding 1) + bias).chunk(2, -1);
    v (N, H, W, 2C) with a contiguous channel axis -> (N, H, W, C). Forward only."""
    n, h, w, channels2 = v.shape
    out = torch.empty((n, h, w, channels2 // 2), dtype=v.dtype, device=v.device)
    return launch(v, weight, bias, out)


@ff_dwconv_silu_gate.register_fake
def _(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, h, w, channels2 = v.shape
    return v.new_empty((n, h, w, channels2 // 2))


def reference(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel replaces, in PyTorch ops (the fused feed-forward's own path): SiLU, cuDNN's
    depthwise conv on the NHWC view, the gate."""
    s = torch.nn.functional.silu(v)
    d = torch.nn.functional.conv2d(s.permute(0, 3, 1, 2), weight, bias, padding=1, groups=v.shape[-1]).permute(0, 2, 3, 1)
    a, g = d.chunk(2, dim=-1)
    return a * torch.nn.functional.silu(g)
