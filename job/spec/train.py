"""`train:` the optimisation: objective, optimizer, schedule, EMA and regularisers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section


class TimestepSpec(Section):
    """How training timesteps (sigmas) are drawn. diffusers' `compute_density_for_timestep_sampling`."""

    weighting_scheme: Literal["logit_normal", "uniform", "mode"] = Field("logit_normal", description="Density of training sigmas.")
    logit_mean: float = Field(0.0, description="Mean of the logit-normal density.")
    logit_std: float = Field(1.0, gt=0, description="Standard deviation of the logit-normal density.")
    mode_scale: float = Field(1.29, description="Scale of the `mode` density.")
    flow_shift: float = Field(3.0, gt=0, description="Shift applied to sampled sigmas: the canonical value for SANA-Video 480p training (official config: 3.0).")
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field("none", description="Per-sample loss weights by sigma (diffusers' `compute_loss_weighting_for_sd3`). `none` is the SANA-Video recipe.")


class EmaSpec(Section):
    """Exponential moving average of the trained weights."""

    decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per update.")
    update_interval: int = Field(1, ge=1, description="Update the EMA every N optimizer steps (quickstart: `ema_update_interval`).")
    device: Literal["cpu", "accelerator"] = Field("cpu", description="Where the EMA copy lives: `cpu` saves VRAM (a transfer per update), `accelerator` is faster.")
    validation: Literal["none", "ema_only", "comparison"] = Field("none", description="Validate with the training weights (`none`), the EMA weights (`ema_only`), or both side by side (`comparison`).")


class CrepaSpec(Section):
    """CREPA: align a transformer block's hidden states with DINOv2 features of neighbouring frames (temporal consistency)."""

    enabled: bool = Field(False, description="Turn the CREPA regulariser on (against flicker and drifting subjects). The cache phase stores the encoder's features with the latents; training does not load the encoder.")
    block_index: int = Field(10, ge=0, description="Transformer block whose hidden states are aligned.")
    weight: float = Field(0.5, ge=0.0, description="Weight of the CREPA loss added to the flow-matching loss.")
    adjacent_distance: int = Field(1, ge=0, description="Neighbouring frames (each side) included in the alignment target.")
    temporal_decay: float = Field(1.0, ge=0.0, description="Weight decay per frame of distance for neighbours.")
    encoder: Literal["dinov2_vitg14", "dinov2_vits14"] = Field("dinov2_vitg14", description="Frozen DINOv2 image encoder.")
    encoder_image_size: Literal[518, 224] = Field(518, description="Input size of the encoder: 518 for vitg14, 224 for the small vits14.")
    encoder_path: str | None = Field(None, description="Where the DINOv2 weights come from: a local folder saved with transformers' `save_pretrained`, hf:// or s3://. Unset: the Hub copy (`facebook/dinov2-giant` / `facebook/dinov2-small`), fetched by the pull phase; torch hub downloads are not used.")


class ScheduledSamplingSpec(Section):
    """Scheduled sampling (rollout): sometimes build x_t from the model's own earlier prediction."""

    probability: float = Field(0.0, ge=0.0, le=1.0, description="Chance per sample of a rollout (0 = off).")
    max_rollout_steps: int = Field(1, ge=1, le=8, description="Most denoising steps rolled out (no gradient) before the trained step.")


class TrainSpec(Section):
    """Optimisation settings."""

    mixed_precision: Literal["bf16", "fp8", "no"] = Field(
        "bf16",
        description="`bf16`: bf16 autocast for the forward pass. `fp8`: the same, and the transformer blocks' matrix products "
        "(linear layers and the feed-forward's 1x1/temporal convolutions) in float8 with dynamic scaling (torchao float8 "
        "training; the weights stay as `model.base_model_precision` says; LoRA: the frozen base only). Needs an sm89+ GPU "
        "(L4, L40S, RTX 40xx, H100) and `speed.compile_blocks` to be faster. `no`: compute in the weights' dtype.")
    optimizer: Literal["adamw", "adamw_bf16", "optimi-adamw", "adamw_8bit"] = Field(
        "adamw_bf16",
        description="`adamw`: torch fused AdamW. `adamw_bf16`: AdamW for bf16 weights with stochastic rounding (no fp32 copy). "
        "`optimi-adamw`: torch-optimi AdamW (Kahan summation for bf16 weights). `adamw_8bit`: 8-bit states (bitsandbytes).",
    )
    learning_rate: float = Field(5e-5, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear", "polynomial"] = Field("cosine", description="Learning-rate schedule after warmup.")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping threshold; 0 turns clipping off.")
    grad_clip_method: Literal["norm", "value"] = Field("norm", description="Clip the global gradient `norm`, or each gradient `value` to [-max_grad_norm, max_grad_norm].")
    train_batch_size: int = Field(1, ge=1, description="Clips per GPU per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_train_steps: int | None = Field(None, ge=1, description="Optimizer steps to train. Either this or `num_train_epochs`.")
    num_train_epochs: int | None = Field(None, ge=1, description="Epochs to train when `max_train_steps` is unset.")
    ignore_final_epochs: bool = Field(False, description="Train until `max_train_steps` even when `num_train_epochs` would end the run first (the epoch count is ignored).")
    seed: int = Field(42, ge=0, description="Seed for everything random in training (noise, timesteps, dropout, data order).")
    caption_dropout_probability: float = Field(0.1, ge=0.0, le=1.0, description="Chance a sample trains on the empty prompt (keeps classifier-free guidance working).")
    max_bad_steps: int = Field(10, ge=1, description="Steps with NaN/inf loss are skipped; after this many in a row the job stops with a clear message.")
    max_train_hours: float | None = Field(None, gt=0, description="Wall-clock budget: save, upload and exit cleanly after this many hours.")
    num_processes: int = Field(1, ge=1, description="Processes (GPUs) on this host. 1 = single GPU.")
    use_ema: bool = Field(False, description="Keep an EMA of the trained weights (smoother results).")
    ema: EmaSpec = Field(default_factory=EmaSpec, description="EMA settings; only with `use_ema: true`.")
    timesteps: TimestepSpec = Field(default_factory=TimestepSpec, description="Timestep sampling for the flow-matching objective.")
    crepa: CrepaSpec = Field(default_factory=CrepaSpec, description="CREPA temporal regulariser.")
    masked_loss: bool = Field(False, description="Restrict the loss to each clip's mask (datasets need `masks_dir`).")
    scheduled_sampling: ScheduledSamplingSpec = Field(default_factory=ScheduledSamplingSpec, description="Scheduled sampling (rollout).")

    @model_validator(mode="after")
    def _derived_defaults(self) -> "TrainSpec":
        # The small encoder's native size is 224; follow it unless the user chose a size.
        if self.crepa.encoder == "dinov2_vits14" and self.crepa.encoder_image_size == 518 and "encoder_image_size" not in self.crepa.model_fields_set:
            self.crepa.encoder_image_size = 224
        return self
