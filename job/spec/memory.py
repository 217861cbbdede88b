"""`memory:` how the job fits the model into VRAM."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class GroupOffloadSpec(Section):
    """Grouped offloading of transformer weights to CPU RAM (or disk) between uses."""

    enabled: bool = Field(False, description="Keep transformer blocks in CPU RAM and move each group to the GPU only while it runs. "
                          "In training their gradients and optimizer states stay in CPU RAM too and the optimizer steps on the CPU, "
                          "in the background while the next forward pass runs (2B full fine-tune at 81x832x480 on an H100, compiled "
                          "blocks: 9 GiB instead of 20, 1.18x the step time). Use it with gradient_checkpointing.")
    type: Literal["block_level", "leaf_level"] = Field("block_level", description="`block_level` moves groups of transformer blocks; `leaf_level` moves single layers (less VRAM, slower).")
    blocks_per_group: int = Field(1, ge=1, description="Transformer blocks moved together (block_level only). More = faster, more VRAM.")
    use_stream: bool = Field(True, description="Overlap transfers with compute on a CUDA stream. Ignored (with a debug message) where CUDA is not available.")
    to_disk_path: str | None = Field(None, description="Spill offloaded weights to this folder instead of RAM when system RAM is short. Slower, but keeps the run alive. Its free space is checked by preflight; the files are unnamed once mapped, so their space comes back when the job ends, however it ends.")


class MemorySpec(Section):
    """Memory savers. All of these trade speed for memory."""

    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass instead of storing them. Needed for 81-frame 480p full fine-tunes on 80 GB GPUs.")
    group_offload: GroupOffloadSpec = Field(default_factory=GroupOffloadSpec, description="Grouped offloading of the transformer.")
    enable_model_cpu_offload: bool = Field(False, description="Keep the frozen parts (text encoder, VAE) in CPU RAM and move each to the GPU only when used. Cannot be combined with group offload.")
    drop_vae_encoder: bool = Field(False, description="Free the VAE encoder once the VAE is loaded for validation renders (training reads cached latents; validation only decodes), saving its weights' memory. Kept when a dataset trains image-to-video: that validation encodes its condition image.")
