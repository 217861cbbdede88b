"""The trained transformer: loading, precision, LoRA, gradient checkpointing, weights on disk."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from job.errors import InputError

from . import lora as lora_mod
from . import quantize as quantize_mod
from . import recompute_cost as recompute_cost_mod

log = logging.getLogger("trainer.train")

# int8 / fp8 (LoRA only): loaded in bf16, then the frozen base is quantised
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.bfloat16, "fp8": torch.bfloat16}


def weight_dtype(spec) -> torch.dtype:
    precision = spec.model.base_model_precision
    if precision in quantize_mod.QUANTISED:
        quantize_mod.check_available(precision)
    return WEIGHT_DTYPES[precision]


def load_transformer(spec, ws):
    """The base transformer from the pulled model folder, in the spec's weight dtype, on the CPU."""
    from job.models.sanavideo.loading import load_components

    model_dir = ws.model_dir(spec.model.pretrained_model_name_or_path)
    parts = load_components(model_dir, dtype=weight_dtype(spec), parts={"transformer"})
    return parts.transformer


def prepare_transformer(transformer, spec):
    """Apply LoRA / trainability and memory savers; returns the list of trained parameters."""
    if spec.model.type == "lora":
        lora_mod.add_lora(transformer, spec.model.lora)
    else:
        transformer.requires_grad_(True)
    quantize_mod.quantize_base(transformer, spec)
    quantize_mod.enable_fp8_matmuls(transformer, spec)  # train.mixed_precision: fp8 (before compile)
    if spec.memory.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    from job.models.sanavideo.speed import apply_training_speedups, blocks_compiled

    apply_training_speedups(transformer, spec)  # spec.speed: fused attention, selective checkpointing, compile
    if spec.speed.activation_memory_budget < 1 and blocks_compiled(transformer):
        # read at each block's first compile (the first step): what the memory budget recomputes
        used = recompute_cost_mod.use_for_compiles(spec.speed.recompute_cost)
        log.info("speed.recompute_cost: the compiler picks what to recompute by %s estimates", used)
    transformer.train()
    return [p for p in transformer.parameters() if p.requires_grad]


def save_weights(folder: Path, transformer, spec) -> None:
    """Full: `<folder>/transformer/` (diffusers layout). LoRA: `<folder>/pytorch_lora_weights.safetensors`."""
    if spec.model.type == "lora":
        lora_mod.save_lora(folder, transformer)
    else:
        transformer.save_pretrained(Path(folder) / "transformer", safe_serialization=True)


def load_weights(folder: Path, transformer, spec) -> None:
    """Load what `save_weights` wrote into an already prepared transformer (resume)."""
    folder = Path(folder)
    if spec.model.type == "lora":
        if not (folder / lora_mod.LORA_WEIGHT_NAME).is_file():
            raise InputError(f"checkpoint {folder} has no {lora_mod.LORA_WEIGHT_NAME}; it was not written by a LoRA run",
                             "resume from a LoRA checkpoint, or set checkpoints.resume_from_checkpoint: none")
        lora_mod.load_lora_into(transformer, folder)
        return
    sub = folder / "transformer"
    files = sorted(sub.glob("*.safetensors"))
    if not files:
        raise InputError(f"checkpoint {folder} has no transformer/*.safetensors; it was not written by a full fine-tune",
                         "resume from a full fine-tune checkpoint, or set checkpoints.resume_from_checkpoint: none")
    index = sub / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted({sub / name for name in json.loads(index.read_text())["weight_map"].values()})
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"checkpoint {folder} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})",
                         "resume with the same base model, or set checkpoints.resume_from_checkpoint: none")
