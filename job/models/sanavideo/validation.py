"""Validation videos: a `SanaVideoPipeline` around the parts already in memory.

`build_pipeline` wraps the loaded (possibly training) transformer, VAE and, if loaded, the text
encoder and tokenizer: nothing is copied, so there is never a second transformer in memory.
`render` runs it from pre-computed prompt embeddings (the text encoder can be freed after the
cache phase) and leaves the caller's state as it found it: the transformer/VAE train/eval modes,
the global torch / CUDA RNG states and the caller's scheduler.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import numpy as np
import torch

from .geometry import PIPELINE_SPATIAL_MULTIPLE

log = logging.getLogger("trainer.validate")


def build_pipeline(components: Any, scheduler: Any = None, speed: Any = None, image_to_video: bool = False):
    """A `SanaVideoPipeline` (or, with `image_to_video`, diffusers' `SanaImageToVideoPipeline`, whose
    first latent frame is a condition image) sharing `components`' modules (a `SanaVideoComponents`
    or any object with transformer / vae / text_encoder / tokenizer / scheduler attributes).

    `scheduler` defaults to `components.scheduler`; the pipeline gets its own instance built from
    that config, so rendering never changes the state of a scheduler the caller holds.
    `speed` (the spec's `SpeedSpec`) applies its speed-ups to the transformer (see `speed.py`).
    """
    from diffusers import SanaImageToVideoPipeline, SanaVideoPipeline

    scheduler = scheduler if scheduler is not None else getattr(components, "scheduler", None)
    if scheduler is None:
        raise ValueError("build_pipeline needs a scheduler (load it with the transformer, or pass one)")
    if components.transformer is None or components.vae is None:
        raise ValueError("build_pipeline needs the transformer and the VAE")
    pipeline_class = SanaImageToVideoPipeline if image_to_video else SanaVideoPipeline
    pipe = pipeline_class(
        tokenizer=getattr(components, "tokenizer", None),
        text_encoder=getattr(components, "text_encoder", None),
        vae=_unwrap(components.vae),
        transformer=_unwrap(components.transformer),
        scheduler=type(scheduler).from_config(scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    if speed is not None:
        from .speed import apply_inference_speedups

        apply_inference_speedups(pipe.transformer, speed)
        _speed_up_vae(pipe, speed)
    return pipe


def _speed_up_vae(pipe, speed) -> None:
    """`speed.fused_kernels` for the VAE: channels-last + the fused norm kernels (`vae_kernels`), where the
    renders run on CUDA (on H100: 81x832x480 float32 decode 3.24 -> 2.65 s, bench/RESULTS.md)."""
    from .triton_support import interpreting, triton_importable

    on_cuda = pipe._execution_device.type == "cuda"
    if not getattr(speed, "fused_kernels", False) or not triton_importable() or not (on_cuda or interpreting()):
        return
    from .vae_kernels import speed_up_for_inference

    log.info("validation VAE speed-ups: %s", ", ".join(speed_up_for_inference(pipe.vae)))


def _unwrap(module):
    # accelerate / DDP / torch.compile wrappers keep the real module in one of these
    for attr in ("module", "_orig_mod"):
        while hasattr(module, attr) and isinstance(getattr(module, attr), torch.nn.Module):
            module = getattr(module, attr)
    return module


@contextlib.contextmanager
def _eval_mode(*modules):
    modes = [(m, m.training) for m in modules if isinstance(m, torch.nn.Module)]
    try:
        for m, _ in modes:
            m.eval()
        yield
    finally:
        for m, was_training in modes:
            m.train(was_training)


def _fork_rng(device: torch.device):
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _match_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"negative embeddings have batch {t.shape[0]}, prompts have {batch}")


def render(
    pipeline,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    negative_attention_mask: torch.Tensor | None,
    width: int,
    height: int,
    num_frames: int,
    guidance: float,
    steps: int,
    seed: int,
    callback_on_step_end: Callable | None = None,
    *,
    callback_on_step_end_tensor_inputs: list[str] | None = None,
    use_resolution_binning: bool = False,
    image: Any = None,
) -> np.ndarray:
    """Render videos from pre-computed embeddings; returns float32 frames [B, F, H, W, 3] in [0, 1].

    Embeddings are what `prompts.encode_prompts` (positive) / `encode_negative_prompts`
    (negative) return; a negative of batch 1 is used for every prompt. Negatives are required
    when `guidance > 1` (classifier-free guidance). The initial noise comes from a CPU
    `torch.Generator` seeded with `seed`, so the same seed gives the same video on any device,
    and the caller's RNG streams are not advanced. `use_resolution_binning=False` renders at
    exactly width x height (the pipeline's default, True, snaps to its 480p aspect-ratio bins
    and resizes back). Width and height must be multiples of 32 (the pipeline's rule).
    `image` (a PIL image; image-to-video pipelines only) is the condition of the first frame.
    """
    if width % PIPELINE_SPATIAL_MULTIPLE or height % PIPELINE_SPATIAL_MULTIPLE:
        raise ValueError(
            f"SanaVideoPipeline renders only sizes whose sides are multiples of {PIPELINE_SPATIAL_MULTIPLE}; "
            f"got {width}x{height}"
        )
    if num_frames < 1 or (num_frames - 1) % pipeline.vae_scale_factor_temporal:
        raise ValueError(f"{num_frames} frames is not of the form {pipeline.vae_scale_factor_temporal}k+1")
    # The pipeline moves negative embeddings to its device but not the positive ones or the
    # masks (cached tensors usually live on the CPU): move everything here.
    device = pipeline._execution_device
    batch = prompt_embeds.shape[0]
    kwargs: dict[str, Any] = {
        "prompt_embeds": prompt_embeds.to(device),
        "prompt_attention_mask": prompt_attention_mask.to(device),
    }
    if guidance > 1.0:  # classifier-free guidance
        if negative_prompt_embeds is None or negative_attention_mask is None:
            raise ValueError("guidance > 1 needs negative prompt embeddings and their attention mask")
        kwargs["negative_prompt_embeds"] = _match_batch(negative_prompt_embeds, batch).to(device)
        kwargs["negative_prompt_attention_mask"] = _match_batch(negative_attention_mask, batch).to(device)
    if image is not None:
        kwargs["image"] = image
    if callback_on_step_end is not None:
        kwargs["callback_on_step_end"] = callback_on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = callback_on_step_end_tensor_inputs or ["latents"]

    transformer = _unwrap(pipeline.transformer)
    with _eval_mode(pipeline.transformer, transformer, pipeline.vae, pipeline.text_encoder), _fork_rng(device):
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        out = pipeline(
            prompt=None,
            negative_prompt=None,
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            height=int(height),
            width=int(width),
            frames=int(num_frames),
            generator=generator,
            output_type="np",
            use_resolution_binning=use_resolution_binning,
            **kwargs,
        )
    return np.asarray(out.frames)
