"""Peak VRAM of a training job, as small pure functions with a named breakdown.

Everything is bytes. The model: a training step goes through three phases, and the peak is the
largest of them (plus the validation renders, which happen with the training state resident):

- forward: resident state (weights, optimizer states, EMA, VAE, CREPA encoder) + the
  activations saved for backward + one block's working set (+ with fp32 master weights under
  bf16 autocast: the autocast cache, a bf16 copy of every weight the forward used);
- backward: going from the last block to the first, block k's backward holds the saved
  activations of blocks 0..k, the gradients of blocks k+1..L-1 (and of the output layers),
  and block k's working set (with gradient checkpointing: its recomputed activations too). The
  maximum over k is at one end of the sweep, so `max(...)` of the two ends is exact;
- optimizer step: resident state + all gradients + the optimizer's temporaries;
- validation: resident state (no gradients) + one CFG batch-2 denoising forward, then the
  Wan VAE decode of the video.

Activation sizes are linear in tokens x inner dim x batch (the self-attention is linear
attention, the cross-attention sees 300 caption tokens): the per-block coefficients below, in
bytes per token per channel, were measured on an H100 (bench/vram_estimate.py; the table is in
bench/RESULTS.md) for each compute mode. The estimate is what `torch.cuda.max_memory_allocated`
would report; `overhead` (CUDA context, allocator slack) is added when comparing with free VRAM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from job.models.sanavideo.geometry import Geometry

from .params import ParamCounts, TransformerDims, lora_param_count, lora_token_width, param_counts

GIB = 1024 ** 3
MIB = 1024 ** 2

#: Bytes per parameter of the stored (base) weights.
WEIGHT_BYTES = {"bf16": 2, "fp32": 4, "int8": 1, "fp8": 1}

#: Caption tokens (SanaVideoPipeline's max_sequence_length) and their width (Gemma2 2B).
CAPTION_TOKENS = 300

# ------------------------------------------------------------------------ calibration
# Per-block activation coefficients in bytes per (token x inner_dim x sample), measured on an
# H100 with bench/vram_estimate.py (bench/RESULTS.md). Compute modes: "bf16" = bf16 weights, no
# autocast; "autocast" = bf16 autocast over bf16 weights; "autocast_fp32" = bf16 autocast over
# fp32 master weights (the hidden states between blocks are fp32 there: the fp32
# scale_shift_table promotes them); "fp32" = fp32 without autocast (not measured: twice "bf16").
#
# SAVED: what one block keeps for backward without checkpointing (~55 bf16 token x channel
#   tensors: q/k/v and their normed, relu'd, rotated and fp32 copies for the linear attention,
#   the 2.5x-wide GLUMBConv intermediates, ...).
# STORED_CKPT: what a checkpointed block keeps: its input hidden states.
# FWD_WORK: transient of one block's forward on top of what is kept (with checkpointing the
#   block's intermediates are transient; without it they are kept, so little is left over).
# BWD_WORK: transient of one block's backward (gradients of its intermediate tensors).
SAVED_PER_TOKEN_CHANNEL = {"bf16": 111.0, "autocast": 112.0, "autocast_fp32": 129.0, "fp32": 222.0}
STORED_CKPT_PER_TOKEN_CHANNEL = {"bf16": 2.0, "autocast": 2.25, "autocast_fp32": 4.0, "fp32": 4.0}
FWD_WORK_CKPT_PER_TOKEN_CHANNEL = {"bf16": 20.0, "autocast": 18.0, "autocast_fp32": 19.0, "fp32": 40.0}
FWD_WORK_NOCKPT_PER_TOKEN_CHANNEL = 2.0
BWD_WORK_PER_TOKEN_CHANNEL = {"bf16": 1.5, "autocast": 6.0, "autocast_fp32": 6.0, "fp32": 3.0}
#: LoRA (peft, fp32 adapters over a frozen base): a frozen base saves less (a linear layer whose
#: weight needs no gradient does not keep its input); each adapted layer fed by the video tokens
#: keeps a bf16 copy of its input for lora_A and has fp32 casts of it in flight (peft casts the
#: input to the adapter dtype): per unit of in_features / inner_dim (`lora_token_width`).
#: A compiled block that keeps its activations (`speed.keep_activations_blocks` with `compile_blocks`):
#: fitted on H100 runs of the job's own step (bench/train_step.py, bench/RESULTS.md): LoRA r64 keep 8
#: 46.5 GiB, full bf16 keep 8 54.2 GiB -> ~60 per (token x channel x sample) at budget 1. With
#: `speed.activation_memory_budget` below 1 the compiler saves a fraction of that, measured for LoRA
#: with all 20 blocks kept (budget 0.15 / 0.3 / 0.5: 22.5 / 34.0 / 42.9 GiB); linear in between.
KEPT_COMPILED_PER_TOKEN_CHANNEL = 60.0
#: A full fine-tune with float8 weight gradients (`speed.fp8_weight_gradient`) keeps 1-byte copies of its products'
#: inputs instead of bf16 ones: H100, keep 20 at budget 0.15, 29.7 GiB against 34.1 GiB with bf16 weight gradients
#: (3.2 per token x channel per block); 39.6 GiB at budget 0.2. 2.5 leaves the estimate 13 % over at 0.15 and 6 %
#: under at 0.2, where the compiler saves more than the budget table's interpolation says.
FLOAT8_WEIGHT_GRADIENT_KEPT_SAVING = 2.5
KEPT_BUDGET_FRACTION = ((0.0, 0.0), (0.15, 0.129), (0.3, 0.270), (0.5, 0.378), (1.0, 1.0))
FROZEN_SAVED_FRACTION = 0.776
LORA_SAVED_PER_WIDTH = 2.0
LORA_FWD_WORK_PER_WIDTH = 2.0
LORA_BWD_WORK_PER_WIDTH = 1.8
#: One CFG batch-2 inference forward (bf16, no grad): transient per (token x channel x sample).
INFERENCE_PER_TOKEN_CHANNEL = 29.0
#: Wan VAE (fp32) decode / encode transients: per pixel (one causal chunk through the widest
#: stage) and per pixel-frame (the fp32 video).
VAE_DECODE_PER_PIXEL = 22_600.0
VAE_DECODE_PER_PIXEL_FRAME = 12.5
VAE_ENCODE_PER_PIXEL = 16_400.0
VAE_ENCODE_PER_PIXEL_FRAME = 12.5
#: Wan 2.1 VAE parameters (AutoencoderKLWan defaults): resident for validation decodes.
VAE_PARAMS = 126_892_531
VAE_BYTES_PER_PARAM = 4  # the loader keeps the VAE in fp32 (the model card asks for it)
#: Gemma2 2B text encoder (bf16), resident only in the cache phase.
TEXT_ENCODER_PARAMS = 2_614_341_888
#: CUDA context + allocator slack (fragmentation of PyTorch's caching allocator; it returns
#: cached blocks and retries before an out-of-memory, so only part of `reserved` is needed).
CUDA_CONTEXT_BYTES = 512 * MIB
ALLOCATOR_SLACK_FRACTION = 0.025

#: DINOv2 encoders used by CREPA (parameters, width). Training needs only the width (the
#: projector's output); the parameters count for the cache phase, where the encoder runs.
CREPA_ENCODERS = {"dinov2_vitg14": (1_136_480_768, 1536), "dinov2_vits14": (22_056_576, 384)}

#: Optimizer state bytes per trainable parameter, given the trainable dtype's bytes.
def optimizer_state_bytes(optimizer: str, param_bytes: int) -> float:
    """AdamW (torch): two moments in the parameter dtype (8 B/param for fp32, 4 for bf16).
    adamw_bf16: float32 moments (8; `job.train.optimizers.AdamWBF16` keeps them in float32 so that
    only the weight is rounded, stochastically). optimi-adamw: moments in the parameter dtype, plus a
    Kahan-summation buffer for bf16 parameters (bf16: 6). adamw_8bit: two 8-bit moments (2)."""
    if optimizer == "adamw":
        return 2 * param_bytes
    if optimizer == "adamw_bf16":
        return 8
    if optimizer == "optimi-adamw":
        return 2 * param_bytes + (2 if param_bytes == 2 else 0)
    if optimizer == "adamw_8bit":
        return 2
    raise ValueError(f"unknown optimizer {optimizer!r}")


def optimizer_step_temp_bytes(optimizer: str, trainable: int, param_bytes: int) -> float:
    """Temporaries of one optimizer step. torch's fused AdamW works in place; the others go
    tensor by tensor (the largest tensor's worth, bounded here by 1/50 of the trainable)."""
    if optimizer == "adamw":
        return 0.0
    return trainable * param_bytes / 50


# ------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class EstimateInputs:
    """Everything the estimate depends on (derived from a spec by `inputs_from_spec`)."""

    params: ParamCounts
    inner_dim: int
    tokens: int                      # transformer tokens of one training sample
    latent_numel: int                # latent values of one training sample
    batch: int = 1
    model_type: str = "full"         # full | lora
    base_precision: str = "bf16"     # bf16 | fp32 | int8 | fp8
    mixed_precision: str = "bf16"    # bf16 (autocast) | fp8 (bf16 autocast + float8 products) | no
    optimizer: str = "adamw_bf16"
    lora_rank: int = 64
    lora_params: int = 0
    lora_token_width: float = 0.0    # sum of in_features / inner_dim of the LoRA layers fed by video tokens, per block
    gradient_checkpointing: bool = True
    kept_blocks: int = 0             # speed.keep_activations_blocks (with checkpointing)
    activation_budget: float = 1.0   # speed.activation_memory_budget
    compiled: bool = True            # speed.compile_blocks (and not group offload)
    float8_weight_gradient: bool = False  # a full fine-tune's float8 products with float8 weight gradients
    group_offload: bool = False
    group_offload_type: str = "block_level"
    blocks_per_group: int = 1
    group_offload_stream: bool = True
    model_cpu_offload: bool = False
    use_ema: bool = False
    ema_on_accelerator: bool = False
    crepa_encoder: str | None = None
    crepa_frames: int = 0
    crepa_image_size: int = 518
    validation: bool = True
    validation_tokens: int = 0       # one sample at the validation size (largest resolution)
    validation_pixels: int = 0       # height x width of the largest validation resolution
    validation_frames: int = 0
    processes: int = 1
    frames: int = 81                 # training frames (for suggestions)
    height: int = 480
    width: int = 832
    config: Mapping[str, Any] | None = None  # the transformer config (None: the 2B model)

    # ---- derived
    @property
    def trainable(self) -> int:
        return self.params.total if self.model_type == "full" else self.lora_params

    @property
    def trainable_bytes(self) -> int:
        """Dtype of the trained parameters: the weights themselves for a full fine-tune (an
        float8 matrix products keep bf16 weights); fp32 LoRA parameters."""
        if self.model_type == "lora":
            return 4
        return 4 if self.base_precision == "fp32" else 2

    @property
    def autocast(self) -> bool:
        return self.mixed_precision in ("bf16", "fp8")  # fp8: bf16 autocast, the products' float8 copies are transient

    @property
    def mode(self) -> str:
        fp32_weights = self.model_type == "full" and self.base_precision == "fp32"
        if self.autocast:
            return "autocast_fp32" if fp32_weights else "autocast"
        return "fp32" if fp32_weights else "bf16"

    @property
    def hidden_bytes(self) -> int:
        """Bytes per element of the hidden states between blocks (what checkpointing stores)."""
        return 4 if self.mode in ("autocast_fp32", "fp32") else 2


def _tokens_channels(inp: EstimateInputs, tokens: int | None = None, batch: int | None = None) -> float:
    return (tokens if tokens is not None else inp.tokens) * inp.inner_dim * (batch if batch is not None else inp.batch)


def weights_bytes(inp: EstimateInputs) -> dict[str, float]:
    """Transformer weights resident on the GPU (group offload: only the groups in flight)."""
    p = inp.params
    base = WEIGHT_BYTES[inp.base_precision]  # int8 / fp8: a LoRA base (the spec rules refuse them for a full fine-tune)
    if inp.group_offload:
        if inp.group_offload_type == "leaf_level":
            resident_blocks = 0.25 if inp.group_offload_stream else 0.15
        else:
            resident_blocks = inp.blocks_per_group * (2 if inp.group_offload_stream else 1)
        resident_blocks = min(resident_blocks, p.num_layers)
        blocks = resident_blocks * p.per_block * base
    else:
        blocks = p.num_layers * p.per_block * base
    out = {"weights": p.top * base + blocks}
    if inp.model_type == "lora":
        out["lora_weights"] = inp.lora_params * inp.trainable_bytes
        if inp.mixed_precision == "fp8" and not inp.group_offload:
            # the frozen block weights' float8 copies, cast once (`job.train.quantize.FrozenFloat8Weights`): 1 byte each
            out["float8_weight_cache"] = p.num_layers * p.per_block * 1
    return out


def _trainable_on_gpu(inp: EstimateInputs) -> float:
    """Trained parameters whose gradients and optimizer states live on the GPU. A full fine-tune with
    group offload (`job.train.offload`) keeps the blocks' gradients and optimizer states in CPU RAM:
    only the layers outside the blocks (embeddings, output head) stay on the GPU."""
    if inp.group_offload and inp.model_type == "full":
        return inp.params.top
    return inp.trainable


def gradients_bytes(inp: EstimateInputs) -> float:
    if inp.group_offload and inp.model_type == "full":
        # plus one block's gradients on their way to the CPU
        return (inp.params.top + inp.params.per_block) * inp.trainable_bytes
    return inp.trainable * inp.trainable_bytes


def optimizer_bytes(inp: EstimateInputs) -> float:
    return _trainable_on_gpu(inp) * optimizer_state_bytes(inp.optimizer, inp.trainable_bytes)


def ema_bytes(inp: EstimateInputs) -> float:
    """EMA shadow copy of the trained parameters (diffusers' EMAModel: the parameters' dtype)."""
    return inp.trainable * inp.trainable_bytes if inp.use_ema and inp.ema_on_accelerator else 0.0


def aux_bytes(inp: EstimateInputs) -> dict[str, float]:
    """Other models resident during training: the VAE (for validation decodes; not with model
    CPU offload) and CREPA's projector. CREPA's DINOv2 encoder runs only in the cache phase
    (`job.train.crepa`: its features are cached), so training holds the projector MLP with its
    gradients and AdamW moments in fp32 (16 B/param; 11.9M params for the 2B model and vitg14).
    The fp32 copy of the captured block states is pooled and freed before backward, the peak:
    measured on an H100, CREPA raised a step's peak by 0.05 GiB, the projector's gradients."""
    out: dict[str, float] = {}
    if inp.validation and not inp.model_cpu_offload:
        out["vae_weights"] = VAE_PARAMS * VAE_BYTES_PER_PARAM
    if inp.crepa_encoder:
        from job.train.crepa import PROJECTOR_HIDDEN

        _, width = CREPA_ENCODERS[inp.crepa_encoder]
        hidden = min(PROJECTOR_HIDDEN, 4 * inp.inner_dim)
        projector = inp.inner_dim * hidden + hidden * hidden + hidden * width + 2 * hidden + width
        out["crepa_projector"] = projector * 16
    return out


def saved_per_block(inp: EstimateInputs) -> float:
    """Activations one block keeps for backward (no checkpointing)."""
    coeff = SAVED_PER_TOKEN_CHANNEL[inp.mode]
    if inp.model_type == "lora":
        coeff = coeff * FROZEN_SAVED_FRACTION + LORA_SAVED_PER_WIDTH * inp.lora_token_width
    return coeff * _tokens_channels(inp)


def _budget_fraction(budget: float) -> float:
    points = KEPT_BUDGET_FRACTION
    for (b0, f0), (b1, f1) in zip(points, points[1:]):
        if budget <= b1:
            return f0 + (f1 - f0) * (max(budget, b0) - b0) / (b1 - b0)
    return 1.0


def kept_per_block(inp: EstimateInputs) -> float:
    """Activations a block keeps when it is not checkpointed (`speed.keep_activations_blocks`)."""
    if not inp.compiled:
        return saved_per_block(inp)
    coeff = KEPT_COMPILED_PER_TOKEN_CHANNEL * _budget_fraction(inp.activation_budget)
    if inp.float8_weight_gradient:
        coeff = max(0.0, coeff - FLOAT8_WEIGHT_GRADIENT_KEPT_SAVING)
    return coeff * _tokens_channels(inp)


def recompute_per_block(inp: EstimateInputs) -> float:
    """What the block being recomputed for the backward pass holds: eager, what it would save
    (`saved_per_block`). Compiled with every block checkpointed (the job's default), what a compiled block
    saves at budget 1: its fused elementwise work keeps fewer intermediates (H100, the job's own step:
    LoRA r64 12.26 GiB, full 27.12 GiB; the eager figure over-estimated them by 23 % and 10 %). The
    configurations with kept blocks were fitted with the eager figure here (KEPT_BUDGET_FRACTION absorbs it)."""
    if inp.compiled and inp.kept_blocks == 0:
        return KEPT_COMPILED_PER_TOKEN_CHANNEL * _tokens_channels(inp)
    return saved_per_block(inp)


def checkpoint_input_per_block(inp: EstimateInputs) -> float:
    """With gradient checkpointing a block keeps only its input hidden states."""
    return STORED_CKPT_PER_TOKEN_CHANNEL[inp.mode] * _tokens_channels(inp)


def forward_work(inp: EstimateInputs) -> float:
    lora = LORA_FWD_WORK_PER_WIDTH * inp.lora_token_width if inp.model_type == "lora" else 0.0
    if inp.gradient_checkpointing:
        return (FWD_WORK_CKPT_PER_TOKEN_CHANNEL[inp.mode] + lora) * _tokens_channels(inp)
    return (FWD_WORK_NOCKPT_PER_TOKEN_CHANNEL + lora) * _tokens_channels(inp)


def backward_work(inp: EstimateInputs) -> float:
    if inp.model_type == "lora":
        coeff = LORA_BWD_WORK_PER_WIDTH * max(1.0, inp.lora_token_width)
    else:
        coeff = BWD_WORK_PER_TOKEN_CHANNEL[inp.mode]
    return coeff * _tokens_channels(inp)


def io_bytes(inp: EstimateInputs) -> float:
    """Latents, noise, target, prediction and loss (fp32), the patch-embedded input and the
    output projection (three token x channel tensors), caption embeddings."""
    latent = inp.batch * inp.latent_numel * 4 * 6
    edges = _tokens_channels(inp) * inp.hidden_bytes * 3
    captions = inp.batch * CAPTION_TOKENS * (inp.inner_dim + 2304) * 4
    return latent + edges + captions


def autocast_cache_bytes(inp: EstimateInputs) -> float:
    """bf16 autocast keeps a bf16 copy of each fp32 weight it casts until the forward ends."""
    if inp.mode != "autocast_fp32":
        return 0.0
    return inp.params.total * 2


def _resident(inp: EstimateInputs) -> dict[str, float]:
    parts = dict(weights_bytes(inp))
    parts["optimizer_states"] = optimizer_bytes(inp)
    if inp.use_ema and inp.ema_on_accelerator:
        parts["ema"] = ema_bytes(inp)
    parts.update(aux_bytes(inp))
    return parts


def training_phases(inp: EstimateInputs) -> dict[str, dict[str, float]]:
    """The named parts of each phase's peak (bytes)."""
    L = inp.params.num_layers
    resident = _resident(inp)
    grads_total = gradients_bytes(inp)
    if inp.model_type == "full":
        # group offload sends each block's gradients to CPU RAM as they are made: none pile up
        grad_block = 0.0 if inp.group_offload else inp.params.per_block * inp.trainable_bytes
    else:
        grad_block = grads_total / max(1, L)
    stored = checkpoint_input_per_block(inp) if inp.gradient_checkpointing else saved_per_block(inp)
    kept = min(inp.kept_blocks, L) if inp.gradient_checkpointing else 0
    all_stored = (L - kept) * stored + kept * (kept_per_block(inp) if kept else 0.0)  # the kept are the last blocks
    io = io_bytes(inp)
    ddp = grads_total if inp.processes > 1 else 0.0

    forward = dict(resident)
    forward.update(activations_saved=all_stored, block_working_set=forward_work(inp), inputs_and_loss=io,
                   autocast_weight_cache=autocast_cache_bytes(inp))
    # Backward: block k holds the saved activations of blocks 0..k and the gradients of blocks
    # k+1..L-1; the total is (about) linear in k, so the peak is at k = L-1 or k = 0.
    first = stored if kept < L else kept_per_block(inp)
    if all_stored >= first + (L - 1) * grad_block:
        act, grads = all_stored, 0.0
    else:
        act, grads = first, (L - 1) * grad_block
    backward = dict(resident)
    backward.update(activations_saved=act, gradients=grads, inputs_and_loss=io, ddp_gradient_buckets=ddp,
                    block_recompute=recompute_per_block(inp) if inp.gradient_checkpointing else 0.0,
                    block_working_set=backward_work(inp))
    if inp.mode == "autocast_fp32":
        # bf16 casts of the weights: saved for backward without checkpointing; with it, only the
        # recomputed block's casts are alive
        backward["autocast_weight_cache"] = inp.params.per_block * 2 if inp.gradient_checkpointing else autocast_cache_bytes(inp)
    step = dict(resident)
    step.update(gradients=grads_total, ddp_gradient_buckets=ddp,
                optimizer_step_temporaries=optimizer_step_temp_bytes(inp.optimizer, _trainable_on_gpu(inp), inp.trainable_bytes))
    phases = {"forward": forward, "backward": backward, "optimizer_step": step}
    if inp.validation and inp.validation_tokens:
        v = dict(resident)
        transformer = INFERENCE_PER_TOKEN_CHANNEL * _tokens_channels(inp, inp.validation_tokens, 2)
        vae = vae_decode_bytes(inp.validation_frames, inp.validation_pixels)
        if inp.model_cpu_offload:
            v["vae_weights"] = VAE_PARAMS * VAE_BYTES_PER_PARAM if vae >= transformer else 0.0
        v["validation_forward" if transformer >= vae else "validation_vae_decode"] = max(transformer, vae)
        phases["validation"] = v
    return {name: {k: float(b) for k, b in parts.items() if b} for name, parts in phases.items()}


def vae_decode_bytes(frames: int, pixels: int) -> float:
    return VAE_DECODE_PER_PIXEL_FRAME * frames * pixels + VAE_DECODE_PER_PIXEL * pixels


def cache_phase_bytes(frames: int, pixels: int, model_cpu_offload: bool = False, crepa_encoder: str | None = None,
                      crepa_image_size: int = 518, batch_size: int = 1, concurrent_batches: int = 1) -> dict[str, float]:
    """Peak of the cache phase: the Wan VAE (fp32) encoding `batch_size` clips on each of its
    `concurrent_batches` lanes (a VAE copy each, `data.vae_concurrent_batches`), with the Gemma2 text
    encoder (bf16) resident unless model CPU offload moves it out while the VAE runs, and with
    CREPA, its DINOv2 encoder (bf16) and one chunk of `job.train.crepa.ENCODER_CHUNK` frames
    through it: per frame, the float32 frame and its resize (2 x pixels x 3 x 4 B) and about 14
    bf16 activations of tokens x width. Measured on an H100 (bench/crepa_rollout.py): 1.07 GiB for
    vitg14 at 518 px (this gives 1.02), 0.16 GiB for vits14 at 224 (0.18)."""
    parts = {"vae_weights": float(VAE_PARAMS * VAE_BYTES_PER_PARAM) * concurrent_batches,
             "vae_encode": (VAE_ENCODE_PER_PIXEL_FRAME * frames * pixels + VAE_ENCODE_PER_PIXEL * pixels)
             * batch_size * concurrent_batches}
    if not model_cpu_offload:
        parts["text_encoder_weights"] = float(TEXT_ENCODER_PARAMS * 2)
    if crepa_encoder:
        from job.train.crepa import ENCODER_CHUNK

        params, width = CREPA_ENCODERS[crepa_encoder]
        tokens = (crepa_image_size // 14) ** 2 + 1
        parts["crepa_encoder_weights"] = float(params * 2)
        parts["crepa_encoder_forward"] = float(ENCODER_CHUNK * (pixels * 3 * 4 * 2 + tokens * width * 2 * 14))
    return parts


@dataclass
class VramEstimate:
    """The estimate: the peak phase's parts, each phase's total, and the overhead."""

    parts: dict[str, float]        # named parts of the peak phase, bytes
    phases: dict[str, float]       # phase -> allocated bytes at its peak
    peak_phase: str
    allocated: float               # comparable with torch.cuda.max_memory_allocated
    overhead: float                # CUDA context + allocator slack
    inputs: EstimateInputs | None = field(default=None, repr=False)

    @property
    def total(self) -> float:
        return self.allocated + self.overhead

    def describe(self, top: int = 5) -> str:
        """'23.4 GiB (weights 3.5, optimizer_states 7.1, ...; peak in backward)'."""
        ordered = sorted(self.parts.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for k, v in ordered[:top])
        return f"{self.total / GIB:.1f} GiB ({shown}; overhead {self.overhead / GIB:.1f}; peak in {self.peak_phase.replace('_', ' ')})"

    def to_dict(self) -> dict[str, Any]:
        return {"total_gib": round(self.total / GIB, 3), "allocated_gib": round(self.allocated / GIB, 3),
                "overhead_gib": round(self.overhead / GIB, 3), "peak_phase": self.peak_phase,
                "parts_gib": {k: round(v / GIB, 3) for k, v in self.parts.items()},
                "phases_gib": {k: round(v / GIB, 3) for k, v in self.phases.items()}}


def estimate_training_vram(inp: EstimateInputs) -> VramEstimate:
    phases = training_phases(inp)
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak = max(totals, key=totals.get)
    allocated = totals[peak]
    overhead = CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK_FRACTION * allocated
    return VramEstimate(parts=phases[peak], phases=totals, peak_phase=peak, allocated=allocated, overhead=overhead, inputs=inp)


# ------------------------------------------------------------------------ from a spec

def pixel_area_size(resolution: int) -> tuple[int, int]:
    """(width, height) of the landscape bucket at `resolution` with `pixel_area` (480 -> 832x480);
    other aspect ratios have about the same pixel count, so the same token count."""
    height = _round16(resolution)
    width = _round16(resolution * 26 / 15)
    return width, height


def pixel_size(resolution: int) -> tuple[int, int]:
    """`resolution_type: pixel`: the shorter side is `resolution`; assume a 16:9 clip (the long
    side is unknown before discovery, and wide clips are the common worst case)."""
    return _round16(resolution * 16 / 9), _round16(resolution)


def _round16(x: float) -> int:
    return max(16, int(math.ceil(x / 16 - 1e-9)) * 16)


def training_shape(spec) -> tuple[int, int, int]:
    """(frames, height, width) of the largest training sample over the active datasets."""
    best = (0, 0, 0, 0)
    for ds in spec.data.active():
        if ds.resolution_type == "pixel_area":
            w, h = pixel_area_size(ds.resolution)
        else:
            w, h = pixel_size(ds.resolution)
        if ds.target_downsample_size and ds.maximum_image_size and ds.resolution_type == "pixel":
            pass  # downsampling happens before bucketing; the bucket is still `resolution`
        frames = ds.video.num_frames
        tokens = ((frames - 1) // 4 + 1) * (h // 16) * (w // 16)
        if tokens > best[0]:
            best = (tokens, frames, h, w)
    if not best[0]:
        return 81, 480, 832
    return best[1], best[2], best[3]


def inputs_from_spec(spec, transformer_config: Mapping[str, Any] | None = None, *, frames: int | None = None,
                     height: int | None = None, width: int | None = None) -> EstimateInputs:
    """The estimate's inputs for a JobSpec (`transformer_config`: the model's config.json, None
    for the released 2B model). frames/height/width override the datasets' largest sample."""
    dims = TransformerDims.from_config(transformer_config)
    geo = Geometry(latent_channels=dims.in_channels, patch_size=dims.patch)
    f, h, w = training_shape(spec)
    f, h, w = frames or f, height or h, width or w
    model, train, mem, val = spec.model, spec.train, spec.memory, spec.validation
    lora = model.type == "lora"
    vw, vh = max(val.sizes(), key=lambda s: s[0] * s[1]) if val.sizes() else (832, 480)
    crepa = train.crepa.encoder if train.crepa.enabled else None
    return EstimateInputs(
        params=param_counts(transformer_config),
        inner_dim=dims.inner_dim,
        tokens=geo.tokens_per_sample(f, h, w),
        latent_numel=geo.latent_numel(f, h, w),
        batch=train.train_batch_size,
        model_type=model.type,
        base_precision=model.base_model_precision,
        mixed_precision=train.mixed_precision,
        optimizer=train.optimizer,
        lora_rank=model.lora.rank,
        lora_params=lora_param_count(transformer_config, model.lora.rank, model.lora.target_modules) if lora else 0,
        lora_token_width=lora_token_width(transformer_config, model.lora.target_modules) if lora else 0.0,
        gradient_checkpointing=mem.gradient_checkpointing,
        kept_blocks=spec.speed.keep_activations_blocks,
        activation_budget=spec.speed.activation_memory_budget,
        compiled=spec.speed.compile_blocks and not mem.group_offload.enabled,
        float8_weight_gradient=train.mixed_precision == "fp8" and not lora and spec.speed.fp8_weight_gradient,
        group_offload=mem.group_offload.enabled,
        group_offload_type=mem.group_offload.type,
        blocks_per_group=mem.group_offload.blocks_per_group,
        group_offload_stream=mem.group_offload.use_stream,
        model_cpu_offload=mem.enable_model_cpu_offload,
        use_ema=train.use_ema,
        ema_on_accelerator=train.use_ema and train.ema.device == "accelerator",
        crepa_encoder=crepa,
        crepa_frames=f if crepa else 0,
        crepa_image_size=train.crepa.encoder_image_size,
        validation=val.enabled,
        validation_tokens=geo.tokens_per_sample(val.num_video_frames, vh, vw) if val.enabled and geo.is_valid_frames(val.num_video_frames) and vh % 16 == 0 and vw % 16 == 0 else 0,
        validation_pixels=vh * vw,
        validation_frames=val.num_video_frames,
        processes=train.num_processes,
        frames=f,
        height=h,
        width=w,
        config=transformer_config,
    )


# ------------------------------------------------------------------------ advice


@dataclass
class Suggestion:
    change: str            # what to change, in spec terms
    estimate: VramEstimate
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        return {"change": self.change, "estimate_gib": round(self.estimate.total / GIB, 2), "fits": self.fits}


def _with_shape(inp: EstimateInputs, frames: int, height: int, width: int) -> EstimateInputs:
    dims = TransformerDims.from_config(inp.config)
    geo = Geometry(latent_channels=dims.in_channels, patch_size=dims.patch)
    crepa_frames = frames if inp.crepa_encoder else 0
    return replace(inp, frames=frames, height=height, width=width, tokens=geo.tokens_per_sample(frames, height, width),
                   latent_numel=geo.latent_numel(frames, height, width), crepa_frames=crepa_frames)


def candidate_changes(inp: EstimateInputs, budget: float) -> list[tuple[str, EstimateInputs]]:
    """Single changes, cheapest first (least effect on speed / quality). Frame and resolution
    changes search for the largest value that fits `budget`."""
    out: list[tuple[str, EstimateInputs]] = []
    if not inp.gradient_checkpointing:
        out.append(("memory.gradient_checkpointing: true", replace(inp, gradient_checkpointing=True)))
    if inp.use_ema and inp.ema_on_accelerator:
        out.append(("train.ema.device: cpu", replace(inp, ema_on_accelerator=False)))
    if inp.model_type == "full" and inp.optimizer == "adamw" and inp.base_precision == "fp32":
        out.append(("model.base_model_precision: bf16 with train.optimizer: adamw_bf16",
                    replace(inp, base_precision="bf16", optimizer="adamw_bf16")))
    elif inp.model_type == "full" and inp.optimizer in ("adamw", "optimi-adamw"):
        out.append(("train.optimizer: adamw_bf16", replace(inp, optimizer="adamw_bf16")))
    if inp.batch > 1:
        out.append(("train.train_batch_size: 1 (raise gradient_accumulation_steps to keep the effective batch)", replace(inp, batch=1)))
    if not inp.group_offload and not inp.model_cpu_offload and inp.processes == 1:
        note = "" if inp.model_type == "lora" else "; weights, gradients and optimizer states in CPU RAM, about 1.5x the step time"
        out.append((f"memory.group_offload.enabled: true (block_level, 1 block per group{note})",
                    replace(inp, group_offload=True, group_offload_type="block_level", blocks_per_group=1)))
    if inp.model_type == "full":
        lora_params = lora_param_count(inp.config, 64, ["to_q", "to_k", "to_v", "to_out.0"])
        out.append(("model.type: lora (rank 64 on the attention projections)",
                    replace(inp, model_type="lora", lora_rank=64, lora_params=lora_params,
                            lora_token_width=lora_token_width(inp.config, ["to_q", "to_k", "to_v", "to_out.0"]),
                            optimizer="adamw")))
    # fewer frames: the largest 4k+1 count below the current that fits
    for frames in range(inp.frames - 4, 0, -4):
        trial = _with_shape(inp, frames, inp.height, inp.width)
        if estimate_training_vram(trial).total <= budget or frames <= 5:
            out.append((f"data.datasets[*].video.num_frames: {frames}", trial))
            break
    # lower resolution (pixel area), keeping the aspect ratio
    for res in range(inp.height - 32, 127, -32):
        scale = res / inp.height
        trial = _with_shape(inp, inp.frames, _round16(res), _round16(inp.width * scale))
        if estimate_training_vram(trial).total <= budget or res <= 160:
            out.append((f"data.datasets[*].resolution: {res} (about {_round16(inp.width * scale)}x{_round16(res)})", trial))
            break
    if inp.validation and inp.validation_frames > 17:
        dims = TransformerDims.from_config(inp.config)
        geo = Geometry(latent_channels=dims.in_channels, patch_size=dims.patch)
        frames = 33
        w = inp.validation_pixels  # keep the size, fewer frames
        tokens = inp.validation_tokens * geo.latent_frames(frames) // max(1, geo.latent_frames(inp.validation_frames))
        out.append((f"validation.num_video_frames: {frames}", replace(inp, validation_frames=frames, validation_tokens=tokens, validation_pixels=w)))
    return out


def suggest(inp: EstimateInputs, budget: float, limit: int = 6) -> list[Suggestion]:
    """Changes that bring the estimate under `budget` (bytes): each single change with its new
    estimate (those that fit first, in order of cheapness), then, if no single change fits,
    the cheapest cumulative combination that does."""
    base = estimate_training_vram(inp).total
    singles = []
    for change, trial in candidate_changes(inp, budget):
        est = estimate_training_vram(trial)
        if est.total < base - 1:
            singles.append(Suggestion(change, est, est.total <= budget))
    fitting = [s for s in singles if s.fits]
    if fitting:
        return (fitting + [s for s in singles if not s.fits])[:limit]
    # combine the structural changes cumulatively, in order, until it fits
    combined, names = inp, []
    for change, _ in candidate_changes(inp, budget):
        if change.startswith(("data.", "validation.")):
            continue
        trial = next((t for c, t in candidate_changes(combined, budget) if c == change), None)
        if trial is None:
            continue
        combined, names = trial, names + [change]
        est = estimate_training_vram(combined)
        if est.total <= budget:
            return [Suggestion(" + ".join(names), est, True)] + singles[: limit - 1]
    for change, trial in candidate_changes(combined, budget):
        if change.startswith("data."):
            est = estimate_training_vram(trial)
            if est.total <= budget:
                return [Suggestion(" + ".join(names + [change]), est, True)] + singles[: limit - 1]
    return singles[:limit]
