"""CREPA: cross-frame representation alignment, a temporal regulariser for video diffusion training.

The math (CREPA, "Cross-frame Representation Alignment for Fine-tuning Video Diffusion Models",
Hwang et al. 2025, Eq. 6; the video extension of REPA, Yu et al. 2024, "Representation Alignment
for Generation", arXiv:2410.06940):

    h_f      hidden states of transformer block `block_index` for latent frame f (noisy input x_t)
    z_f      = MLP_phi(h_f), a small trainable projector to the encoder's width (not exported)
    y_k      frozen DINOv2 patch features of the clean pixel frame under latent frame k
    sim(f,k) = mean over grid cells c of cos(z_f[c], y_k[c])
    w(f,k)   = exp(-|f - k| / temporal_decay)  for |f - k| <= adjacent_distance (w(f,f) = 1)
    L_crepa  = 1 - mean_f [ sum_k w(f,k) sim(f,k) / sum_k w(f,k) ]
    L        = L_flow + weight * L_crepa

So each frame's hidden states are pulled towards the features of its own frame and, with a
weight decaying with distance, of its neighbours. Differences to the paper, and why: the weights
are normalised per frame (the loss scale does not change with `adjacent_distance`), and `1 - sim`
instead of `-sim` (the same gradients, a loss that is >= 0 and reads like a distance).

Both sides are compared on a coarse grid (`feature_grid`: the latent grid shrunk to at most
`GRID_LONG_SIDE` cells on its long side). The DINOv2 patch grid and the transformer token grid
differ (37x37 at 518 px vs 30x52 for 832x480), so both are average-pooled to the same cells; a
coarse grid keeps the spatial layout REPA-style alignment relies on while keeping the cached
features small: 21 latent frames x 5x8 cells x 1536 (vitg14) in bf16 is 2.6 MB per 81-frame 480p
clip, about 60% of its latents. The hidden states are pooled before the projector (the target is
pooled the same way, and the projector then runs on 40 cells per frame instead of 1560 tokens).

The features are computed once, in the cache phase, from the same decoded frames the VAE encodes
(`encode_frames`), and stored in each latent file (`format.CREPA_FEATURES`); the encoder's
identity and image size are part of the latent cache key. Training never loads DINOv2.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from job.errors import InputError

log = logging.getLogger("trainer.train")

#: The Hub copies (transformers format) of the encoders the spec names.
ENCODER_REPOS = {"dinov2_vitg14": "facebook/dinov2-giant", "dinov2_vits14": "facebook/dinov2-small"}
#: Files of an encoder folder the pull phase downloads (transformers' save_pretrained layout).
ENCODER_FILES = ["*.json", "*.safetensors"]
#: Long side of the grid features are compared on (see the module doc for the choice).
GRID_LONG_SIDE = 8
#: Frames per encoder forward in the cache phase (bounds its activation memory).
ENCODER_CHUNK = 16
#: Hidden width of the projector MLP (REPA's choice), smaller for tiny models.
PROJECTOR_HIDDEN = 2048
PROJECTOR_FILE = "crepa_projector.pt"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# the encoder (cache phase)


def encoder_location(crepa_spec) -> str:
    """`train.crepa.encoder_path`, or the Hub copy of the named encoder."""
    return crepa_spec.encoder_path or ENCODER_REPOS[crepa_spec.encoder]


def encoder_folder(spec, ws) -> Path:
    return ws.model_dir(encoder_location(spec.train.crepa))


def encoder_identity(spec, ws) -> str:
    """What decides the cached features: encoder name, image size, grid, and the folder's config and
    weight files (names and sizes; no weight is read). Part of the latent cache key."""
    crepa = spec.train.crepa
    folder = encoder_folder(spec, ws)
    h = hashlib.sha256()
    if folder.is_dir():
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            if path.suffix == ".json":
                h.update(f"{path.name}\0".encode() + path.read_bytes() + b"\0")
            elif path.suffix in (".safetensors", ".bin"):
                h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    else:
        h.update(str(folder.absolute()).encode())
    return f"{crepa.encoder}@{crepa.encoder_image_size}/g{GRID_LONG_SIDE}/{h.hexdigest()[:16]}"


def check_encoder_folder(folder: Path, fix: str | None = None) -> None:
    """InputError unless `folder` holds a model saved with transformers' save_pretrained: config.json and a
    weight file (the loader's check, and the pull phase's for a local encoder_path)."""
    if not folder.is_dir():
        raise InputError(f"the CREPA encoder folder {folder} does not exist", fix)
    if not (folder / "config.json").is_file():
        raise InputError(f"the CREPA encoder folder {folder} has no config.json", fix)
    from job.models.sanavideo.loading import has_weights

    if not has_weights(folder):
        raise InputError(f"the CREPA encoder folder {folder} has no weight file (*.safetensors)", fix)


def load_encoder(spec, ws, device: torch.device, dtype: torch.dtype):
    """The frozen DINOv2 encoder (transformers `Dinov2Model`) from its pulled or local folder."""
    from transformers import Dinov2Model

    folder = encoder_folder(spec, ws)
    fix = ("run `trainer pull SPEC` (it downloads " + encoder_location(spec.train.crepa) + "), or set "
           "train.crepa.encoder_path to a folder saved with transformers' save_pretrained")
    check_encoder_folder(folder, fix)
    try:
        encoder = Dinov2Model.from_pretrained(str(folder), torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise InputError(f"the CREPA encoder in {folder} cannot be loaded as a DINOv2 model ({exc})", fix) from exc
    return encoder.to(device).eval().requires_grad_(False)


def feature_grid(latent_height: int, latent_width: int) -> tuple[int, int]:
    """Cells (rows, cols) the features are stored on: the latent grid, its long side at most GRID_LONG_SIDE."""
    scale = min(1.0, GRID_LONG_SIDE / max(latent_height, latent_width))
    return max(1, round(latent_height * scale)), max(1, round(latent_width * scale))


def latent_frame_indices(num_frames: int, temporal: int) -> list[int]:
    """The pixel frame that stands for each latent frame: frame 0 for the first, then the middle of
    each group of `temporal` frames the VAE folds into one latent frame."""
    latent_frames = (num_frames - 1) // temporal + 1
    return [0] + [1 + (k - 1) * temporal + temporal // 2 for k in range(1, latent_frames)]


@torch.no_grad()
def encode_frames(encoder, frames: torch.Tensor, image_size: int, temporal: int, grid: tuple[int, int]) -> torch.Tensor:
    """uint8 frames [B, F, H, W, 3] -> features [B, F', rows, cols, D] (float32), F' latent frames.

    Each chosen frame is resized (square, as REPA does: the cells keep their relative positions),
    normalised with ImageNet statistics, encoded; its patch tokens (the last (size/patch)^2 tokens
    of the final layer-normed hidden states) are average-pooled to `grid`.
    """
    b, f = frames.shape[:2]
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    picked = frames[:, latent_frame_indices(f, temporal)]
    lf = picked.shape[1]
    flat = picked.flatten(0, 1)  # [B*F', H, W, 3]
    patch = int(encoder.config.patch_size)
    side = image_size // patch
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for start in range(0, flat.shape[0], ENCODER_CHUNK):
        x = flat[start:start + ENCODER_CHUNK].to(device).permute(0, 3, 1, 2).float().div_(255.0)
        x = F.interpolate(x, size=(side * patch, side * patch), mode="bicubic", align_corners=False, antialias=True)
        x = ((x.clamp_(0.0, 1.0) - mean) / std).to(dtype)
        tokens = encoder(pixel_values=x).last_hidden_state[:, -side * side:]  # patch tokens, CLS/registers dropped
        cells = tokens.float().transpose(1, 2).reshape(x.shape[0], -1, side, side)
        out.append(F.adaptive_avg_pool2d(cells, grid).permute(0, 2, 3, 1))
    feats = torch.cat(out)
    return feats.reshape(b, lf, *feats.shape[1:])


# ----------------------------------------------------------------------------------------------
# the regulariser (train phase)


def neighbour_weights(frames: int, distance: int, decay: float, device=None) -> torch.Tensor:
    """w(f, k) [F, F], each row summing to 1 (see the module doc). decay 0 keeps only the frame itself."""
    idx = torch.arange(frames, device=device, dtype=torch.float32)
    gap = (idx[:, None] - idx[None, :]).abs()
    w = torch.exp(-gap / decay) if decay > 0 else (gap == 0).float()
    w = w * (gap <= distance)
    return w / w.sum(dim=1, keepdim=True)


def alignment_loss(projected: torch.Tensor, features: torch.Tensor, distance: int, decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_crepa, mean own-frame similarity) for projected hidden states and features, both [B, F, rows, cols, D]."""
    z = F.normalize(projected.float().flatten(2, 3), dim=-1)  # [B, F, cells, D]
    y = F.normalize(features.float().flatten(2, 3), dim=-1)
    sim = torch.einsum("bfcd,bkcd->bfk", z, y) / z.shape[2]  # mean cosine over cells, frame f vs frame k
    w = neighbour_weights(sim.shape[1], distance, decay, sim.device)
    loss = 1.0 - (sim * w).sum(-1).mean()
    return loss, sim.diagonal(dim1=1, dim2=2).mean().detach()


class Projector(torch.nn.Sequential):
    """The trainable MLP from the transformer's width to the encoder's (REPA: 3 layers, SiLU)."""

    def __init__(self, width: int, feature_width: int, hidden: int | None = None):
        hidden = hidden or min(PROJECTOR_HIDDEN, 4 * width)
        super().__init__(torch.nn.Linear(width, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                         torch.nn.SiLU(), torch.nn.Linear(hidden, feature_width))


class CrepaRegularizer:
    """Captures block `block_index`'s output with a forward hook while armed, and turns it into
    the weighted CREPA loss against a batch's cached features.

        with crepa.capture():
            pred = transformer(...)
        loss = flow_loss + crepa.loss(batch["crepa_features"], latents.shape)
    """

    def __init__(self, crepa_spec, model: torch.nn.Module, feature_width: int, device: torch.device):
        self.spec = crepa_spec
        blocks = model.transformer_blocks
        if crepa_spec.block_index >= len(blocks):
            raise InputError(f"train.crepa.block_index is {crepa_spec.block_index}, but the transformer has {len(blocks)} blocks "
                             f"(0..{len(blocks) - 1})", f"use a block index below {len(blocks)} (SimpleTuner's default for SANA-Video is 10)")
        self.patch_size = tuple(model.config.patch_size)
        width = int(model.config.num_attention_heads * model.config.attention_head_dim)
        self.projector = Projector(width, feature_width).to(device)
        self.forward_projector = self.projector  # replaced by the accelerate-prepared module
        self._armed = False
        self._hidden: torch.Tensor | None = None
        # the last loss() call's values, detached, on the device: the step reads them once, after queuing the update
        self.last_loss: torch.Tensor | None = None
        self.last_similarity: torch.Tensor | None = None
        blocks[crepa_spec.block_index].register_forward_hook(self._keep)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.projector.parameters())

    def _keep(self, module, args, output) -> None:
        if self._armed:  # not during gradient-checkpointing recomputation, rollouts or validation
            self._hidden = output[0] if isinstance(output, tuple) else output

    @contextlib.contextmanager
    def capture(self):
        self._armed, self._hidden = True, None
        try:
            yield
        finally:
            self._armed = False

    def loss(self, features: torch.Tensor | None, latent_shape: torch.Size) -> torch.Tensor:
        """`weight` x L_crepa for the hidden states captured by the last `capture()`."""
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError("CREPA: no hidden states were captured (call the transformer inside capture())")
        if features is None:
            raise InputError("the batch has no cached CREPA features", "run the cache phase again with train.crepa.enabled: true")
        _, _, f, h, w = latent_shape
        pt, ph, pw = self.patch_size
        b, _, width = hidden.shape
        tokens = hidden.float().reshape(b, f // pt, h // ph, w // pw, width).permute(0, 4, 1, 2, 3)
        features = features.to(hidden.device, torch.float32)
        frames, rows, cols = features.shape[1], min(features.shape[2], h // ph), min(features.shape[3], w // pw)
        if (rows, cols) != tuple(features.shape[2:4]):  # fewer tokens than cached cells: pool the features too
            features = F.adaptive_avg_pool2d(features.flatten(0, 1).permute(0, 3, 1, 2), (rows, cols))
            features = features.permute(0, 2, 3, 1).reshape(b, frames, rows, cols, -1)
        pooled = F.adaptive_avg_pool3d(tokens, (frames, rows, cols)).permute(0, 2, 3, 4, 1)  # [B, F', rows, cols, width]
        projected = self.forward_projector(pooled)
        loss, similarity = alignment_loss(projected, features, self.spec.adjacent_distance, self.spec.temporal_decay)
        self.last_loss, self.last_similarity = loss.detach(), similarity  # no host read here: backward is not queued yet
        return self.spec.weight * loss

    # --- checkpoints: the projector is training state, not part of the exported model ---------
    def save(self, folder: Path) -> None:
        from .checkpoints import save_pt

        save_pt(self.projector.state_dict(), folder / PROJECTOR_FILE)

    def restore(self, folder: Path) -> None:
        from .checkpoints import load_pt

        path = folder / PROJECTOR_FILE
        if not path.is_file():
            raise InputError(f"checkpoint {folder} has no CREPA projector ({PROJECTOR_FILE}): it was trained without CREPA",
                             "resume with train.crepa.enabled: false, or start a fresh run (checkpoints.resume_from_checkpoint: none "
                             "and move the old checkpoints away)")
        self.projector.load_state_dict(load_pt(path))


def check_resume_without_crepa(folder: Path) -> None:
    """A checkpoint with a projector has its parameters in the optimizer state: refuse clearly."""
    if (folder / PROJECTOR_FILE).is_file():
        raise InputError(f"checkpoint {folder} was trained with CREPA (it holds {PROJECTOR_FILE}), this spec turns it off",
                         "set train.crepa.enabled: true to resume it, or start a fresh run")


def build_crepa(spec, model: torch.nn.Module, dataset, device: torch.device) -> CrepaRegularizer | None:
    """The regulariser when `train.crepa.enabled`, sized from the cached features of the first sample."""
    crepa = spec.train.crepa
    if not crepa.enabled:
        return None
    fix = "run the cache phase again (`trainer cache SPEC`): with train.crepa.enabled it stores the DINOv2 features"
    first = dataset.entries[0]
    from job.cache import format as fmt

    sample = fmt.read_sample(first.cache_dir, first.sample_key)
    if sample.crepa_features is None:
        raise InputError(f"the latent cache of {first.dataset_id} has no CREPA features ({first.sample_key})", fix)
    stored = (sample.extra or {}).get("crepa", "")
    if not stored.startswith(f"{crepa.encoder}@{crepa.encoder_image_size}/"):
        raise InputError(f"the cached CREPA features of {first.dataset_id} come from {stored or 'another encoder'}, the spec asks for "
                         f"{crepa.encoder} at {crepa.encoder_image_size} px", fix)
    if not math.isfinite(crepa.temporal_decay):
        raise InputError("train.crepa.temporal_decay must be finite", "use a value such as 1.0")
    return CrepaRegularizer(crepa, model, int(sample.crepa_features.shape[-1]), device)
