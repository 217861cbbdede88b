"""Host RAM and disk the job will need, as small pure functions with a breakdown (bytes)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .estimate import (GIB, TEXT_ENCODER_PARAMS, VAE_BYTES_PER_PARAM, VAE_PARAMS, WEIGHT_BYTES, EstimateInputs,
                       optimizer_state_bytes)

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".gif"}
CACHE_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
#: Gemma2 2B hidden size: width of a cached prompt embedding.
CAPTION_WIDTH = 2304
#: Python, torch, CUDA libraries, data loading: what the process holds before any model
#: (a CPU smoke job with a tiny model holds much less).
PROCESS_BASE_RAM = 4 * GIB
PROCESS_BASE_RAM_SMALL = 1 * GIB
#: Size of the released diffusers repo when it cannot be listed: transformer and Gemma2 in
#: bf16, the VAE in fp32.
def default_model_download(transformer_params: int) -> int:
    return int(transformer_params * 2 + TEXT_ENCODER_PARAMS * 2 + VAE_PARAMS * VAE_BYTES_PER_PARAM)


@dataclass
class Need:
    """What one resource needs, by part (bytes), and where (the folder whose volume is checked)."""

    where: Path
    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for k, v in sorted(self.parts.items(), key=lambda kv: -kv[1]) if v)
        return f"{self.total / GIB:.1f} GiB" + (f" ({shown})" if shown else "")


def count_clips(folder: Path, limit: int = 200_000) -> int | None:
    """Video files under a local dataset folder (None if it does not exist)."""
    if not folder.is_dir():
        return None
    n = 0
    for _root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        n += sum(1 for f in files if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS)
        if n >= limit:
            break
    return n


def latent_cache_bytes(clips: int, latent_numel: int, cache_dtype: str) -> float:
    return clips * latent_numel * CACHE_DTYPE_BYTES[cache_dtype]


def text_cache_bytes(prompts: int, cache_dtype: str, tokens: int = 300) -> float:
    """Prompt embeddings (tokens x 2304) and their attention masks."""
    return prompts * tokens * (CAPTION_WIDTH * CACHE_DTYPE_BYTES[cache_dtype] + 8)


def checkpoint_bytes(inp: EstimateInputs) -> float:
    """One training checkpoint: trained weights, optimizer states, EMA (where used)."""
    trained = inp.trainable * inp.trainable_bytes
    states = inp.trainable * optimizer_state_bytes(inp.optimizer, inp.trainable_bytes)
    ema = trained if inp.use_ema else 0.0
    return trained + states + ema


def checkpoints_kept(total_limit: int | None, max_train_steps: int | None, step_interval: int) -> int:
    """Checkpoints on disk at once: the limit, plus the one being written before the oldest
    goes. Without a limit: every checkpoint of the run (steps / interval)."""
    if total_limit is not None:
        return total_limit + 1
    if max_train_steps:
        return max(1, max_train_steps // step_interval) + 1
    return 10


def host_ram_need(inp: EstimateInputs, to_disk: bool, small_model: bool = False) -> dict[str, float]:
    """Host RAM at the peak: the process, the largest model being loaded (the transformer, or
    Gemma2 in the cache phase; a tiny smoke model: just the transformer), group-offloaded
    weights (unless spilled to disk), an EMA kept on the CPU, model CPU offload's parked parts."""
    transformer = inp.params.total * (inp.trainable_bytes if inp.model_type == "full" else WEIGHT_BYTES["bf16"])
    loading = transformer if small_model else max(transformer, TEXT_ENCODER_PARAMS * 2)
    parts: dict[str, float] = {"process": PROCESS_BASE_RAM_SMALL if small_model else PROCESS_BASE_RAM,
                               "model_loading": float(loading)}
    if inp.group_offload and not to_disk:
        base = WEIGHT_BYTES[inp.base_precision] if inp.model_type == "lora" else inp.trainable_bytes
        parts["group_offload_weights"] = inp.params.total * base
    if inp.group_offload:
        # job.train.offload: the offloaded trained parameters' gradients and optimizer states live in
        # host RAM (also with to_disk_path, which holds only the weights)
        from .estimate import optimizer_state_bytes

        parts["group_offload_gradients"] = inp.trainable * inp.trainable_bytes
        parts["group_offload_optimizer_states"] = inp.trainable * optimizer_state_bytes(inp.optimizer, inp.trainable_bytes)
    if inp.use_ema and not inp.ema_on_accelerator:
        parts["ema_on_cpu"] = inp.trainable * inp.trainable_bytes
    if inp.model_cpu_offload:
        parts["offloaded_vae"] = VAE_PARAMS * VAE_BYTES_PER_PARAM
    return parts
