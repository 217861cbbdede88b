"""Frame / resolution / token arithmetic for SANA-Video. Pure Python: no torch, no diffusers.

Used by the spec validation and the preflight VRAM estimator, so it must stay import-light.

The numbers of the released 2B 480p checkpoint (Wan 2.1 VAE + SanaVideoTransformer3DModel):

- the VAE compresses time by 4 (causally: the first frame alone, then groups of 4), so frame
  counts are 4k+1 and F frames give (F - 1) / 4 + 1 latent frames;
- the VAE compresses space by 8 and the transformer patches (1, 2, 2), so training pixel sides
  are multiples of 16;
- `SanaVideoPipeline.check_inputs` additionally refuses any height/width that is not a multiple
  of 32, so *rendered* (validation) sizes must be multiples of 32 (832x480 is);
- 81 frames at 832x480 -> 16 x 21 x 60 x 104 latents -> 21 x 30 x 52 = 32,760 tokens.

Configs may be passed as a mapping (a parsed config.json, a diffusers FrozenDict), as a model
(anything with `.config`) or as an object with attributes; missing keys fall back to the 2B
values below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The released checkpoint (and the class defaults of AutoencoderKLWan /
# SanaVideoTransformer3DModel in diffusers 0.42; a test keeps these in sync).
VAE_TEMPORAL_COMPRESSION = 4
VAE_SPATIAL_COMPRESSION = 8
LATENT_CHANNELS = 16
PATCH_SIZE = (1, 2, 2)
#: Pixel sides the transformer can train on: VAE 8x times patch 2.
SPATIAL_MULTIPLE = VAE_SPATIAL_COMPRESSION * PATCH_SIZE[1]
#: Pixel sides `SanaVideoPipeline` accepts (its check_inputs wants height % 32 == width % 32 == 0).
PIPELINE_SPATIAL_MULTIPLE = 32

DEFAULT_FRAMES = 81
DEFAULT_WIDTH = 832
DEFAULT_HEIGHT = 480


def _get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if not isinstance(config, Mapping) and hasattr(config, "config"):  # a model
        config = config.config
    if isinstance(config, Mapping):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


@dataclass(frozen=True)
class Geometry:
    """How pixels map to latents and tokens for one VAE + transformer pair."""

    temporal_compression: int = VAE_TEMPORAL_COMPRESSION
    spatial_compression: int = VAE_SPATIAL_COMPRESSION
    latent_channels: int = LATENT_CHANNELS
    patch_size: tuple[int, int, int] = PATCH_SIZE

    @classmethod
    def from_configs(cls, vae_config: Any = None, transformer_config: Any = None) -> "Geometry":
        """Read the VAE's compression and channels and the transformer's patch size.

        For the Wan VAE the compression is `scale_factor_temporal` / `scale_factor_spatial`
        (what the pipeline uses); if those keys are absent it is derived from
        `temperal_downsample` / `dim_mult` the way the VAE is built.
        """
        temporal = _get(vae_config, "scale_factor_temporal")
        if temporal is None:
            down = _get(vae_config, "temperal_downsample")
            temporal = 2 ** sum(bool(d) for d in down) if down is not None else VAE_TEMPORAL_COMPRESSION
        spatial = _get(vae_config, "scale_factor_spatial")
        if spatial is None:
            mult = _get(vae_config, "dim_mult")
            spatial = 2 ** (len(mult) - 1) if mult is not None else VAE_SPATIAL_COMPRESSION
        channels = _get(vae_config, "z_dim", _get(transformer_config, "in_channels", LATENT_CHANNELS))
        patch = _get(transformer_config, "patch_size", PATCH_SIZE)
        if isinstance(patch, int):
            patch = (1, patch, patch)
        return cls(int(temporal), int(spatial), int(channels), tuple(int(p) for p in patch))

    # -- frames -----------------------------------------------------------------------------
    def is_valid_frames(self, frames: int) -> bool:
        """True for frame counts the causal VAE encodes without leftovers: k*temporal + 1."""
        return frames >= 1 and (frames - 1) % self.temporal_compression == 0

    def round_frames_down(self, frames: int) -> int:
        """The largest valid frame count <= `frames` (at least 1)."""
        return max(1, ((frames - 1) // self.temporal_compression) * self.temporal_compression + 1)

    def latent_frames(self, frames: int) -> int:
        """81 -> 21. Raises ValueError for counts that are not k*temporal + 1."""
        if not self.is_valid_frames(frames):
            raise ValueError(
                f"{frames} frames is not of the form {self.temporal_compression}k+1; "
                f"use {self.round_frames_down(frames)} or {self.round_frames_down(frames) + self.temporal_compression}"
            )
        return (frames - 1) // self.temporal_compression + 1

    def pixel_frames(self, latent_frames: int) -> int:
        """21 -> 81 (the inverse of `latent_frames`)."""
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        return (latent_frames - 1) * self.temporal_compression + 1

    # -- space ------------------------------------------------------------------------------
    @property
    def spatial_multiple(self) -> int:
        """Pixel sides must be multiples of this to train: VAE compression x patch (8 x 2 = 16)."""
        return self.spatial_compression * math.lcm(self.patch_size[1], self.patch_size[2])

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, latent_frames, latent_height, latent_width): 81, 480, 832 -> (16, 21, 60, 104)."""
        for name, side in (("height", height), ("width", width)):
            if side < 1 or side % self.spatial_multiple:
                raise ValueError(
                    f"{name} {side} is not a positive multiple of {self.spatial_multiple} "
                    f"(VAE {self.spatial_compression}x x patch {self.patch_size[1]})"
                )
        return (
            self.latent_channels,
            self.latent_frames(frames),
            height // self.spatial_compression,
            width // self.spatial_compression,
        )

    def tokens_per_sample(self, frames: int, height: int, width: int) -> int:
        """Transformer sequence length of one sample: 81 x 480 x 832 -> 21 x 30 x 52 = 32,760."""
        _, f, h, w = self.latent_shape(frames, height, width)
        pt, ph, pw = self.patch_size
        return (f // pt) * (h // ph) * (w // pw)

    def latent_numel(self, frames: int, height: int, width: int) -> int:
        """Number of latent values of one sample (for cache size / VRAM estimates)."""
        return math.prod(self.latent_shape(frames, height, width))

    def problems(self, frames: int, height: int, width: int, *, for_pipeline: bool = False) -> list[str]:
        """Human-readable problems with a (frames, height, width) request; [] when fine.

        `for_pipeline=True` also applies `SanaVideoPipeline`'s multiple-of-32 rule (for
        validation renders).
        """
        out = []
        if not self.is_valid_frames(frames):
            n = self.round_frames_down(frames)
            out.append(
                f"{frames} frames is not of the form {self.temporal_compression}k+1 "
                f"(use {n} or {n + self.temporal_compression})"
            )
        multiple = self.spatial_multiple
        if for_pipeline:
            multiple = math.lcm(multiple, PIPELINE_SPATIAL_MULTIPLE)
        for name, side in (("width", width), ("height", height)):
            if side < 1 or side % multiple:
                lo = max(multiple, side // multiple * multiple)
                out.append(f"{name} {side} is not a multiple of {multiple} (use {lo} or {lo + multiple})")
        return out


#: The released 2B 480p geometry.
SANA_VIDEO_2B = Geometry()


def latent_shape(
    frames: int, height: int, width: int, vae_config: Any = None, transformer_config: Any = None
) -> tuple[int, int, int, int]:
    """(C, F', H', W') of the latents of a `frames` x `height` x `width` video.

    Configs default to the released 2B 480p model. 81, 480, 832 -> (16, 21, 60, 104).
    """
    return Geometry.from_configs(vae_config, transformer_config).latent_shape(frames, height, width)


def tokens_per_sample(
    frames: int, height: int, width: int, vae_config: Any = None, transformer_config: Any = None
) -> int:
    """Transformer tokens of one sample. 81, 480, 832 -> 32,760 with patch (1, 2, 2)."""
    return Geometry.from_configs(vae_config, transformer_config).tokens_per_sample(frames, height, width)


def latent_frames(frames: int, vae_config: Any = None) -> int:
    """(frames - 1) / 4 + 1; raises ValueError unless frames is 4k+1."""
    return Geometry.from_configs(vae_config).latent_frames(frames)


def is_valid_frame_count(frames: int, vae_config: Any = None) -> bool:
    """True for 4k+1 (1, 5, 9, ..., 81)."""
    return Geometry.from_configs(vae_config).is_valid_frames(frames)


def spatial_multiple(vae_config: Any = None, transformer_config: Any = None) -> int:
    """What training pixel sides must be multiples of: 16 for the 2B model."""
    return Geometry.from_configs(vae_config, transformer_config).spatial_multiple
