"""Wan-VAE latents in the normalisation `SanaVideoPipeline` uses.

The pipeline's decode path (diffusers 0.42) is, with `z` the denoised latents:

    z = z.to(vae.dtype)
    mean = tensor(vae.config.latents_mean).view(1, C, 1, 1, 1)
    inv_std = 1.0 / tensor(vae.config.latents_std).view(1, C, 1, 1, 1)   # "latents_std" holds 1/std
    video = vae.decode(z / inv_std + mean)

so the transformer works on `(raw - mean) * inv_std` (what `SanaImageToVideoPipeline` does to
encode its conditioning image). `encode_videos` produces exactly that, `decode_latents` undoes it
with the pipeline's own operations (same ops, same dtype, so the result is bit-identical to the
pipeline's decode input), and `normalize_latents` / `denormalize_latents` do the arithmetic alone
(for latents already on disk).
"""

from __future__ import annotations

from typing import Any

import torch


def _vae_config(vae_or_config: Any):
    return getattr(vae_or_config, "config", vae_or_config)


def _stats(config, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, inv_std) shaped [1, C, 1, 1, 1] on ref's device and dtype, as the pipeline builds them."""
    z_dim = config["z_dim"] if isinstance(config, dict) else config.z_dim
    mean_values = config["latents_mean"] if isinstance(config, dict) else config.latents_mean
    std_values = config["latents_std"] if isinstance(config, dict) else config.latents_std
    mean = torch.tensor(mean_values).view(1, z_dim, 1, 1, 1).to(ref.device, ref.dtype)
    inv_std = 1.0 / torch.tensor(std_values).view(1, z_dim, 1, 1, 1).to(ref.device, ref.dtype)
    return mean, inv_std


def normalize_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """Raw VAE latents [B, C, F, H, W] -> the transformer's space: (raw - mean) * (1 / std)."""
    mean, inv_std = _stats(_vae_config(vae_config), latents)
    return (latents - mean) * inv_std


def denormalize_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """The transformer's space -> raw VAE latents, exactly as the pipeline does before decoding.

    Computes in `latents`' dtype; cast to the VAE's dtype first to match the pipeline bit for bit
    (`decode_latents` does).
    """
    mean, inv_std = _stats(_vae_config(vae_config), latents)
    return latents / inv_std + mean


def _check_video(videos: torch.Tensor, temporal: int) -> None:
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected videos shaped [B, 3, F, H, W], got {tuple(videos.shape)}")
    frames = videos.shape[2]
    if (frames - 1) % temporal:
        raise ValueError(f"{frames} frames is not of the form {temporal}k+1 (the Wan VAE compresses time by {temporal})")


@torch.no_grad()
def encode_videos(
    vae, videos: torch.Tensor, sample: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Encode pixel videos [B, 3, F, H, W] in [-1, 1] into normalised latents [B, C, F', H', W'].

    `sample=True` draws from the VAE's posterior (with `generator`), `sample=False` takes its
    mode (mean). F' = (F - 1) / 4 + 1, H' = H / 8, W' = W / 8. Returned in the VAE's dtype, on
    its device.
    """
    config = vae.config
    _check_video(videos, int(getattr(config, "scale_factor_temporal", None) or 4))
    param = next(vae.parameters())
    videos = videos.to(device=param.device, dtype=param.dtype)
    dist = vae.encode(videos).latent_dist
    raw = dist.sample(generator) if sample else dist.mode()
    return normalize_latents(raw, config)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, C, F', H', W'] -> pixel videos [B, 3, F, H, W], roughly in [-1, 1].

    The same operations as `SanaVideoPipeline.__call__` after denoising (without its
    postprocessing to PIL/np: use `VideoProcessor.postprocess_video` for that).
    """
    param = next(vae.parameters())
    latents = latents.to(device=param.device, dtype=vae.dtype)
    return vae.decode(denormalize_latents(latents, vae.config), return_dict=False)[0]
