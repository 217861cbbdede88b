"""Live previews: a cheap picture of the latents while a validation video is denoising.

The reference recipe decodes previews with a tiny autoencoder (TAEHV-style). None is
available offline, so we use the classic "latent to RGB" approximation instead:

    rgb(f, y, x) ~= W @ z(:, f, y, x) + b           W: [3, C], b: [3]

one colour per latent pixel (so a preview is 8x smaller than the video and shows one frame per
4 video frames). W and b are fitted ONCE PER RUN by least squares against the real VAE:
`fit_latent_rgb` decodes a few random, spatially smooth latents (in the transformer's
normalised space) with the loaded VAE, averages the decoded pixels over each latent cell
(8x8 pixels, and the 4 frames a latent frame stands for; latent frame 0 is video frame 0),
and solves for the affine map. It captures the colour layout (what is where, roughly which
hue), not detail, and is only as good as a linear map of a non-linear decoder can be: fine for
watching a render take shape, useless for judging quality (the final videos do that). The
matrix is cached in memory and in `validation/.preview_projection.json` (keyed by the VAE's
config and a weight fingerprint), so a restarted run does not fit again. The same fit works
for the tiny test model (4 latent channels) and the real one (16).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from job.workspace import atomic_write_text

from .sheet import frame_strip_png

log = logging.getLogger("trainer.validate")

PROJECTION_FILE = ".preview_projection.json"


@dataclass
class LatentRGB:
    """An affine latent -> RGB map: rgb in [0, 1] = clamp(weight @ z + bias)."""

    weight: torch.Tensor  # [3, C] float32
    bias: torch.Tensor  # [3] float32
    key: str = ""

    @torch.no_grad()
    def project(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, F, H, W] (or [C, F, H, W]) -> RGB [B, F, H, W, 3] in [0, 1] on the CPU."""
        if latents.ndim == 4:
            latents = latents[None]
        z = latents.detach().to("cpu", torch.float32)
        rgb = torch.einsum("bcfhw,kc->bfhwk", z, self.weight) + self.bias
        return rgb.clamp(0.0, 1.0)

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "weight": self.weight.tolist(), "bias": self.bias.tolist()})

    @classmethod
    def from_json(cls, text: str) -> "LatentRGB":
        data = json.loads(text)
        return cls(torch.tensor(data["weight"], dtype=torch.float32), torch.tensor(data["bias"], dtype=torch.float32),
                   data.get("key", ""))


def vae_key(vae) -> str:
    """Identity of a VAE: its config plus a cheap fingerprint of a few weights."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    params = list(vae.parameters())
    with torch.no_grad():
        for p in (params[0], params[len(params) // 2], params[-1]) if params else ():
            h.update(f"{float(p.detach().float().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def _cell_average(video: torch.Tensor, temporal: int, spatial: int, latent_frames: int) -> torch.Tensor:
    """Decoded video [B, 3, F, H, W] -> [B, 3, T, H/s, W/s]: each latent cell's mean colour."""
    pooled = F.avg_pool3d(video, kernel_size=(1, spatial, spatial))
    frames = [pooled[:, :, :1]]
    for t in range(1, latent_frames):
        frames.append(pooled[:, :, 1 + (t - 1) * temporal: 1 + t * temporal].mean(dim=2, keepdim=True))
    return torch.cat(frames, dim=2)


@torch.no_grad()
def fit_latent_rgb(vae, samples: int = 2, latent_frames: int = 3, size: int = 16, seed: int = 0) -> LatentRGB:
    """Least-squares fit of the affine latent -> RGB map against `vae` (see the module docstring).

    Decodes `samples` random latents of `latent_frames` x `size` x `size` on the VAE's device;
    leaves the global RNG and the VAE's mode untouched.
    """
    from job.models.sanavideo.latents import decode_latents

    config = vae.config
    channels = int(config.z_dim)
    temporal = int(getattr(config, "scale_factor_temporal", None) or 4)
    spatial = int(getattr(config, "scale_factor_spatial", None) or 8)
    generator = torch.Generator("cpu").manual_seed(seed)
    # spatially smooth noise (real latents are smoother than white noise): half-size, upsampled
    coarse = torch.randn(samples, channels, latent_frames, max(1, size // 2), max(1, size // 2), generator=generator)
    z = F.interpolate(coarse, size=(latent_frames, size, size), mode="trilinear", align_corners=False)
    z = z / z.flatten(2).std(dim=2).clamp_min(1e-6)[:, :, None, None, None]
    was_training = vae.training
    vae.eval()
    try:
        video = decode_latents(vae, z).float().cpu()  # [B, 3, F, H, W], about [-1, 1]
    finally:
        vae.train(was_training)
    target = ((_cell_average(video, temporal, spatial, latent_frames) + 1.0) / 2.0).clamp(0.0, 1.0)
    x = z.permute(0, 2, 3, 4, 1).reshape(-1, channels)
    y = target.permute(0, 2, 3, 4, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution.float()  # [C + 1, 3]
    return LatentRGB(weight=solution[:channels].T.contiguous(), bias=solution[channels].contiguous())


_MEMORY: dict[str, LatentRGB] = {}


def latent_rgb_for(vae, cache_dir: Path | None = None) -> LatentRGB:
    """The projection for `vae`: from memory, from `cache_dir/.preview_projection.json`, or fitted."""
    key = vae_key(vae)
    path = cache_dir / PROJECTION_FILE if cache_dir is not None else None
    if key in _MEMORY:
        if path is not None and not path.is_file():
            _save(path, _MEMORY[key])
        return _MEMORY[key]
    if path is not None and path.is_file():
        try:
            cached = LatentRGB.from_json(path.read_text())
            if cached.key == key and cached.weight.shape == (3, int(vae.config.z_dim)):
                _MEMORY[key] = cached
                return cached
        except (OSError, ValueError, KeyError) as exc:
            log.debug("ignoring the cached preview projection %s: %s", path, exc)
    projection = fit_latent_rgb(vae)
    projection.key = key
    _MEMORY[key] = projection
    if path is not None:
        _save(path, projection)
    return projection


def _save(path: Path, projection: LatentRGB) -> None:
    try:
        atomic_write_text(path, projection.to_json())
    except OSError as exc:
        log.debug("could not cache the preview projection: %s", exc)


class PreviewSender:
    """A `callback_on_step_end` piece: every `every` denoising steps, a frame strip to the webhooks.

    Never raises (a failing preview must not fail the validation) and never changes the latents.
    """

    def __init__(self, projection: LatentRGB, webhooks, every: int, total_steps: int, payload: dict,
                 frames: int = 4, min_height: int = 120, max_scale: int = 8):
        self.projection = projection
        self.webhooks = webhooks
        self.every = max(1, int(every))
        self.total_steps = int(total_steps)
        self.payload = dict(payload)
        self.frames = frames
        self.min_height = min_height
        self.max_scale = max_scale
        self.sent = 0

    def due(self, index: int) -> bool:
        done = index + 1
        return done % self.every == 0 and done < self.total_steps  # the final video shows the last step

    def __call__(self, index: int, latents: torch.Tensor) -> None:
        if not self.due(index):
            return
        try:
            rgb = self.projection.project(latents[:1])[0].numpy()  # [F', H', W', 3]
            # nearest-neighbour upscale to be visible, never past the video's own size (8x)
            scale = min(max(1, -(-self.min_height // rgb.shape[1])), self.max_scale)
            png = frame_strip_png(rgb, count=self.frames, height=rgb.shape[1] * scale)
            self.webhooks.send("preview", {**self.payload, "denoising_step": index + 1, "of": self.total_steps}, png)
            self.sent += 1
        except Exception as exc:  # noqa: BLE001
            log.warning("validation preview failed (the render goes on): %s", exc)
