"""`model:` which model to fine-tune, how (full or LoRA), and at which precision."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Section

DEFAULT_BASE_MODEL = "hf://Efficient-Large-Model/SANA-Video_2B_480p_diffusers"


class LoraSpec(Section):
    """LoRA adapter settings (used when `model.type` is `lora`)."""

    rank: int = Field(64, ge=1, le=1024, description="LoRA rank r (size of the low-rank update).")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; the update is scaled by alpha/rank. Default: equal to rank (scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="Module names (suffixes) of the transformer that get adapters. The default covers the attention projections, "
        "the set `SanaVideoPipeline.load_lora_weights` is known to load.",
    )


class PromptSpec(Section):
    """How captions become text embeddings; part of the text-embedding cache key."""

    max_sequence_length: int = Field(300, ge=8, le=1024, description="Tokens kept per prompt (SanaVideoPipeline default: 300).")
    complex_human_instruction: list[str] | None = Field(
        None,
        description="Instruction lines prepended to every caption before Gemma2 encodes it. Unset: the pipeline's own "
        "video-worded instruction (what inference uses). Set to [] to disable. Because Gemma is causal, this changes every "
        "kept token: train with what you will infer with.",
    )


class ModelSpec(Section):
    """The model to fine-tune."""

    family: Literal["sanavideo"] = Field("sanavideo", description="Model family. Only `sanavideo` (SANA-Video) is supported.")
    type: Literal["full", "lora"] = Field("full", description="`full` trains every transformer weight; `lora` trains a LoRA adapter (peft).")
    pretrained_model_name_or_path: str = Field(
        DEFAULT_BASE_MODEL,
        description="Base model in diffusers layout: a local folder, `hf://owner/repo[@revision]` (a bare `owner/repo` means the Hub), "
        "or `s3://bucket/prefix`.",
    )
    pretrained_vae_model_name_or_path: str | None = Field(
        None,
        description="Where the Wan VAE comes from. Unset: the base model's own `vae/`. It must be the VAE the base model was trained "
        "with (same latent channels and normalisation), or training and inference disagree.",
    )
    base_model_precision: Literal["bf16", "fp32", "int8", "fp8"] = Field(
        "bf16",
        description="Storage precision of the transformer weights. `bf16`: bf16 weights (use a bf16-safe optimizer). `fp32`: fp32 "
        "master weights (with `mixed_precision: bf16` for bf16 autocast). `int8`: frozen base quantised to int8 (LoRA only). "
        "`fp8`: frozen base stored in float8 (LoRA only, sm89+ GPU); it saves memory, not time. For float8 matrix products "
        "(faster, full or LoRA) use `train.mixed_precision: fp8`.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings, used when `type: lora`.")
    prompt: PromptSpec = Field(default_factory=PromptSpec, description="Prompt encoding settings.")
    flow_schedule_shift: float | None = Field(
        None, description="Accepted for SimpleTuner compatibility and IGNORED for sanavideo: the checkpoint's canonical flow schedule is used (a warning says so)."
    )
    flow_schedule_auto_shift: bool | None = Field(
        None, description="Accepted for SimpleTuner compatibility and IGNORED for sanavideo (a warning says so)."
    )

    @field_validator("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path")
    @classmethod
    def _non_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value
