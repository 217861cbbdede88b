"""`speed:` how fast the transformer runs. Each speed-up is on by default where it is safe, with an off switch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class SpeedSpec(Section):
    """Speed-ups of the transformer for training and validation; none changes what the model learns (bench/RESULTS.md)."""

    compile_blocks: bool = Field(
        True,
        description="`torch.compile` each transformer block (regional compile: one compiled block reused by all). "
        "CUDA only: skipped on CPU; with memory.group_offload (block_level) the blocks' own forwards are compiled inside the "
        "offload wrapper. Inductor's mix-order reduction is turned off for it (it miscompiled the modulation gradients on "
        "torch 2.11, pytorch#193061; +0.5-1 % step time). The first step (and the first validation render) "
        "pays a one-time compile of about a minute; its kernels are cached in `<workspace>/cache/compile` (or TORCHINDUCTOR_CACHE_DIR when set), so later runs on the same volume compile faster.",
    )
    tune_reductions: bool = Field(
        True,
        description="With compile_blocks: inductor compiles each reduction (the norms' row statistics, the float8 "
        "casts' maxima, the sums over tokens) twice, as a persistent kernel (a row held in registers, read once) and "
        "looped, and keeps the faster at its first call (inductor's `triton.multi_kernel`; without it rows longer than "
        "1,024 values, such as the 2,240 channels of a token, are always looped). The choice is stored with the "
        "compile cache, so a rerun or resume on the same workspace picks the same kernels. Same arithmetic; a sum may "
        "differ in its last bits with the order. Measured on an H100 (full fine-tune, fp8, budget 0.15, 81x832x480, batch 1, "
        "bench/RESULTS.md): 0.796 -> 0.785 s per step, same peak memory; the first compile takes about 20 s longer.",
    )
    linear_attention: Literal["fused", "diffusers"] = Field(
        "fused",
        description="Self-attention implementation. `fused`: the same linear attention written without diffusers' "
        "strided rotary writes and layout copies (token-major layout throughout, the key sum in fp32; under bf16 autocast "
        "its products run in bf16, as diffusers' do; fuses well under compile). "
        "`diffusers`: the stock `SanaLinearAttnProcessor3_0`.",
    )
    feedforward: Literal["fused", "diffusers"] = Field(
        "fused",
        description="Feed-forward (GLUMBTempConv) implementation. `fused`: the same function with the module's own "
        "weights, kept in token-major (B, F, H, W, C) layout: 1x1 convs as GEMMs, the temporal conv as matmuls over channels "
        "(no NCHW permutes), the depthwise 3x3's input gradient as a forward convolution with the rotated kernel (cuDNN's "
        "faster kernel, the same sums). Runs inside compiled blocks (speed.compile_blocks); eagerly diffusers' forward runs (it was "
        "faster there). Modules it cannot reproduce "
        "exactly (LoRA- or quantisation-wrapped convs, hooks; memory.group_offload type leaf_level) keep diffusers' forward. "
        "`diffusers`: the stock forward (cuDNN convolutions).",
    )
    feedforward_backward: Literal["auto", "triton", "compiled"] = Field(
        "auto",
        description="Training with `feedforward: fused`: how the feed-forward's SiLU, depthwise 3x3 and gate are "
        "differentiated. `triton`: where the feed-forward's biases are trained (full fine-tune), its two elementwise "
        "backward passes over the 11,200-channel activations run as Triton kernels that read each input once and sum "
        "the biases' gradients in the same pass (the depthwise convolutions stay cuDNN's); the same function in float32 "
        "arithmetic, deterministic. `compiled`: autograd through the PyTorch ops, compiled with the block. `auto`: "
        "`triton` when the feed-forward's products are float8 (`train.mixed_precision: fp8`), else `compiled`. "
        "Measured on an H100 (full fine-tune, bench/RESULTS.md): with float8 products the kernels took the step from "
        "0.885 to 0.851 s (inductor's version read its inputs up to four times, the float8 cast included); with bf16 "
        "products they were slower (1.107 vs 1.090 s), as with a frozen feed-forward (LoRA: 0.606 vs 0.596 s), where "
        "the compiled backward always runs. CUDA only.",
    )
    cross_attention: Literal["dense_backward", "diffusers"] = Field(
        "dense_backward",
        description="Cross-attention (video tokens to the prompt's at most 300 tokens) in training. `dense_backward`: the "
        "same fused forward (`scaled_dot_product_attention`), and a backward pass written as matrix products over the "
        "small queries x keys score matrix (bf16 inputs, float32 accumulation and softmax, like the flash backward). The "
        "fused kernels' backward splits its work over blocks of keys, of which a prompt has only a few, and left most of "
        "an H100 idle (bench/RESULTS.md). Used when a gradient is needed and the (trimmed) prompt has at most 192 tokens; "
        "longer prompts keep the fused backward, which is faster there. "
        "`diffusers`: the stock processor (fused backward).",
    )
    fused_kernels: bool = Field(
        True,
        description="Hand-written Triton kernels where they exist: with `feedforward: fused`, the feed-forward's SiLU, "
        "depthwise 3x3 and gate as one kernel (one read of the 11,200-channel activations instead of three passes); with "
        "`linear_attention: fused`, the self-attention's two sums over tokens (v^T k and its product with q, bf16 inputs) "
        "on the tensor cores with float32 accumulation instead of float32 matrix products on float32 copies. "
        "Used only where no gradient is needed (validation renders, also during training); the training step's own "
        "kernels are `feedforward_backward`'s. CUDA only (elsewhere the PyTorch ops run). "
        "Off: PyTorch/cuDNN ops everywhere.",
    )
    fp8_fast_accumulation: bool = Field(
        True,
        description="With `train.mixed_precision: fp8`: the float8 input-gradient products (the backward pass's "
        "gradient x weight) use cuBLAS's fast accumulation, as torchao's recipe already does for the forward products. "
        "On an H100 (bench/RESULTS.md) it took the input gradient of the feed-forward's 5600-channel product from 1.00 "
        "to 0.71 ms, the full fine-tune step from 0.861 to 0.852 s and the LoRA step from 0.601 to 0.594 s; the "
        "products' error against float64 did not change (it is the float8 rounding of their inputs, ~6 %). Off: torchao's default for the backward products (partial sums promoted "
        "to float32 more often).",
    )
    fp8_weight_gradient: bool = Field(
        True,
        description="With `train.mixed_precision: fp8` in a full fine-tune: the weight-gradient products (gradient x "
        "input, summed over the tokens) run in float8 too, through the job's own float8 matmul "
        "(job/train/float8_matmul.py: torchao's tensorwise casts, bit for bit, with the transposed operands written by "
        "one tiled copy and the absolute maxima taken row by row, which kept the compiled step from making slow "
        "passes). On an H100 (bench/RESULTS.md) the full step went from 0.844 to 0.818 s and its peak from 34.1 to "
        "29.8 GiB (the backward keeps the float8 copy of each input, not the bf16 one); the gradient norm's error "
        "against the plain bf16 path went from 2.6e-3 to 4.3e-3 (issue #12 allows 2e-2). Off: the weight gradients "
        "in bf16 from the bf16 inputs (torchao's float8 product for the rest). LoRA's frozen weights have no weight "
        "gradient, so LoRA is unaffected.",
    )
    trim_text_padding: bool = Field(
        True,
        description="Training: cut each batch's prompt embeddings after the last real token of its longest prompt "
        "(rounded up to a multiple of 64), so the cross-attention and its key/value projections skip the padding of the "
        "300-token prompts. Exact up to summation order: the transformer gives padded keys a -10000 bias, which the "
        "softmax turns into zero weights. Under compile_blocks the blocks compile once more for the second prompt length "
        "(then for any length). Off: every step attends over all 300 positions.",
    )
    guard_on_device: bool = Field(
        True,
        description="Training: the NaN/inf guard (a step whose loss or gradient norm is not finite is skipped) "
        "decides on the device, so gradient clipping and the optimizer update are queued right behind the backward "
        "pass without waiting for the host to read the loss; the host reads loss and norm once, while the update runs. "
        "Same result bit for bit. For `adamw` (fused) and `adamw_bf16`; other optimizers and group offload always let "
        "the host decide first. Off: the host decides first.",
    )
    keep_activations_blocks: int = Field(
        0,
        ge=0,
        description="With memory.gradient_checkpointing on: this many transformer blocks (the last ones) keep their "
        "activations instead of recomputing them in the backward pass. Faster, but each kept block costs GPU memory "
        "that grows with frames x pixels (about 4.4 GiB per block at 81x832x480, batch 1, compiled, for about 13 ms "
        "less per step on an H100; see bench/RESULTS.md). 0 = recompute every block (the safe default).",
    )
    activation_memory_budget: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="With compile_blocks, for the blocks that keep their activations (keep_activations_blocks): the "
        "fraction of a compiled block's activations its backward pass may keep (torch.compile's "
        "`activation_memory_budget`). Below 1 the compiler recomputes operations in the backward pass instead of saving "
        "their outputs, cheapest first: mostly elementwise work, at low budgets some matrix products too (at 0.15 in "
        "the full fine-tune, 5 of the 6 attention projections over the video tokens and the feed-forward's first product of each block), so more "
        "blocks can keep their activations in the same memory. Measured on an H100 (LoRA r64, 81x832x480, batch 1, bench/RESULTS.md): every "
        "block recomputed 0.97 s/step at 12 GiB; all 20 blocks kept with budget 0.15 / 0.3 / 0.5: 0.84 s at 23 GiB, "
        "0.78 s at 34 GiB, 0.73 s at 43 GiB. 1.0 = torch's default (about 4.3 GiB per kept block at that size).",
    )
    recompute_cost: Literal["roofline", "flops"] = Field(
        "roofline",
        description="With activation_memory_budget below 1: how the compiler estimates what recomputing an operation "
        "in the backward pass costs when it picks what to save. `roofline`: the slower of its arithmetic at the GPU's "
        "peak and its memory traffic at the GPU's bandwidth, so the norms' statistics and the float8 casts' absolute "
        "maxima (small to save, a full read of an activation to recompute) are saved. `flops`: torch's default, the "
        "operation's FLOP count, which rates those as free and recomputes them. The same computation either way (a "
        "recomputed reduction may differ in its last bits); measured on an H100 (81x832x480, batch 1, bench/RESULTS.md): "
        "full fine-tune, fp8, budget 0.15: 0.819 -> 0.792 s per step at the same peak memory; LoRA, fp8, budget 0.5: "
        "0.575 -> 0.570 s. Needs torch's pluggable runtime estimators (torch 2.11 has "
        "them); without them `flops` is used and the log says so.",
    )
