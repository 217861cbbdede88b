"""LoRA adapters through peft, saved the way `SanaVideoPipeline.load_lora_weights` loads them.

Same recipe as diffusers' training examples (train_dreambooth_lora_sana.py): `LoraConfig` ->
`transformer.add_adapter`, `get_peft_model_state_dict` -> `SanaVideoPipeline.save_lora_weights`
with the adapter config as metadata (so alpha != rank survives the round trip).
"""

from __future__ import annotations

from pathlib import Path

import torch

from job.errors import InputError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(transformer, lora_spec) -> None:
    from peft import LoraConfig

    config = LoraConfig(
        r=lora_spec.rank,
        lora_alpha=lora_spec.alpha if lora_spec.alpha is not None else lora_spec.rank,
        lora_dropout=lora_spec.dropout,
        init_lora_weights="gaussian",
        target_modules=list(lora_spec.target_modules),
    )
    transformer.requires_grad_(False)
    transformer.add_adapter(config)
    # trainable adapter weights in float32 (the diffusers examples' cast_training_params)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def lora_metadata(transformer) -> dict:
    config = transformer.peft_config["default"]
    return config.to_dict()


def save_lora(folder: Path, transformer, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `<folder>/pytorch_lora_weights.safetensors` loadable by `SanaVideoPipeline.load_lora_weights(folder)`."""
    from diffusers import SanaVideoPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    SanaVideoPipeline.save_lora_weights(
        save_directory=str(folder),
        transformer_lora_layers=state_dict if state_dict is not None else lora_state_dict(transformer),
        transformer_lora_adapter_metadata=lora_metadata(transformer),
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return folder / LORA_WEIGHT_NAME


def load_lora_into(transformer, folder: Path) -> None:
    """Load adapter weights saved by `save_lora` into a transformer that already has the adapter (resume)."""
    from diffusers import SanaVideoPipeline
    from peft.utils import set_peft_model_state_dict

    state = SanaVideoPipeline.lora_state_dict(str(folder), weight_name=LORA_WEIGHT_NAME)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    fix = ("resume with the model.lora settings the checkpoint was written with, or start a new run in another "
           "workspace (or move the checkpoints folder away)")
    try:
        result = set_peft_model_state_dict(transformer, state)
    except RuntimeError as exc:  # a tensor of another shape: the rank changed
        raise InputError(f"LoRA checkpoint {folder} does not fit this spec's adapter (model.lora.rank changed?): "
                         f"{str(exc).splitlines()[-1].strip()[:300]}", fix) from None
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k]  # the base weights are not in it
    if unexpected or missing:
        what = (f"adapters this spec does not add, e.g. {unexpected[0]}" if unexpected
                else f"no weights for adapters this spec adds, e.g. {missing[0]}")
        raise InputError(f"LoRA checkpoint {folder} has {what} (model.lora.target_modules changed since it was written)", fix)
