"""Validation videos during training: `run_validation(spec, ws, components, step, embeddings_for, ema)`.

Called on the main process by the train loop's `on_step_end` hook (see `validation_due`). It

1. builds a `SanaVideoPipeline` around the modules already in memory (`build_pipeline`: no
   second transformer) and renders `validation.prompt` (nickname `validation`) and every
   prompt-library entry at every `validation.resolutions` size, with the spec's frames,
   guidance, steps and seed (the same noise every time, so steps are comparable);
2. with `train.ema.validation`: `none` renders the training weights, `ema_only` the EMA
   weights (swapped in with diffusers `EMAModel.store` / `copy_to` / `restore`), and
   `comparison` both, side by side in one video (training left, EMA right);
3. writes `validation/step_NNNNNN/<nickname>[_WxH].mp4` (H.264, yuv420p, atomic), a contact
   sheet `contact_sheet.png`, `manifest.json`, and rebuilds `validation/index.html`;
4. sends live previews while denoising (`validation.preview`) and `validation_ready` to the
   webhooks, and a `validation_ready` event to the JSON log.

It returns to training cleanly: modules in the train/eval mode they were in, the global torch
(and CUDA) RNG not advanced (`render` forks it; nothing else here draws from it), EMA swaps
undone, the VAE/text encoder back where they were, optimizer state never touched. With
`memory.enable_model_cpu_offload` the VAE stays in CPU RAM while the transformer denoises and
is moved to the accelerator only for the final decode (from the last step's callback), and the
text encoder (not needed: prompts come pre-embedded) is parked in CPU RAM meanwhile.

Prompt embeddings come from `embeddings_for(text)` (positive prompts, with the complex human
instruction) and `embeddings_for(text, negative=True)` (the negative prompt, without it): the
train phase passes a reader of the text cache; `embeddings_from_text_encoder` makes one from a
loaded text encoder (tests, smoke job). A `Mapping` also works: `m[text]` and
`m[("negative", text)]`. Embeddings may be [L, D] / [L] (as cached) or batched [1, L, D] / [1, L].
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from job.errors import InputError
from job.report import event
from job.workspace import atomic_write_bytes

from .index import step_dir_name, write_index, write_manifest
from .prompts import validation_prompts
from .sheet import contact_sheet_png, pick_frames
from .video import to_uint8, write_mp4

log = logging.getLogger("trainer.validate")

CONTACT_SHEET = "contact_sheet.png"
DEFAULT_FPS = 16
SHEET_FRAMES = 4

EmbeddingsFor = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ValidationVideo:
    nickname: str
    prompt: str
    path: Path
    width: int  # of the file (twice the render width for `comparison`)
    height: int
    frames: int
    fps: int
    layout: str  # "single" | "comparison"


@dataclass
class ValidationResult:
    step: int
    folder: Path  # validation/step_NNNNNN
    weights: str  # "training" | "ema" | "comparison"
    videos: list[ValidationVideo] = field(default_factory=list)
    contact_sheet: Path | None = None
    manifest: Path | None = None
    index: Path | None = None
    seconds: float = 0.0
    previews_sent: int = 0

    def files(self) -> list[Path]:
        """Every file this validation wrote (videos, contact sheet, manifest, index)."""
        out = [v.path for v in self.videos]
        out += [p for p in (self.contact_sheet, self.manifest, self.index) if p is not None]
        return out


# --- when ------------------------------------------------------------------------------------
def validation_due(spec, step: int, total_steps: int | None = None) -> bool:
    """Whether to render at optimizer step `step`: every `validation.step_interval` steps and at the end."""
    v = spec.validation
    if not v.enabled or step <= 0:
        return False
    return step % v.step_interval == 0 or (total_steps is not None and step == total_steps)


# --- embeddings --------------------------------------------------------------------------------
def embeddings_from_text_encoder(text_encoder, tokenizer, complex_human_instruction: Sequence[str] | None = None,
                                 max_sequence_length: int | None = None) -> EmbeddingsFor:
    """An `embeddings_for(text, negative=False)` that encodes with a loaded Gemma2 (memoised).

    `complex_human_instruction=None` means the pipeline's default instruction.
    """
    from job.models.sanavideo.prompts import (
        COMPLEX_HUMAN_INSTRUCTION,
        DEFAULT_MAX_SEQUENCE_LENGTH,
        encode_negative_prompts,
        encode_prompts,
    )

    chi = COMPLEX_HUMAN_INSTRUCTION if complex_human_instruction is None else complex_human_instruction
    length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
    memo: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def embeddings_for(text: str, negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        key = (text, bool(negative))
        if key not in memo:
            if negative:
                memo[key] = encode_negative_prompts(text_encoder, tokenizer, [text], max_sequence_length=length)
            else:
                memo[key] = encode_prompts(text_encoder, tokenizer, [text], max_sequence_length=length,
                                           complex_human_instruction=chi)
        return memo[key]

    return embeddings_for


def _embeddings_source(source: EmbeddingsFor | Mapping) -> EmbeddingsFor:
    if isinstance(source, Mapping):
        def from_mapping(text: str, negative: bool = False):
            return source[("negative", text)] if negative else source[text]
        return from_mapping
    return source


def _batched(pair: tuple[torch.Tensor, torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, mask = pair
    if embeds.ndim == 2:
        embeds = embeds[None]
    if mask.ndim == 1:
        mask = mask[None]
    if embeds.ndim != 3 or mask.ndim != 2 or embeds.shape[0] != 1 or mask.shape[:2] != embeds.shape[:2]:
        raise ValueError(f"embeddings for {what} have shapes {tuple(embeds.shape)} / {tuple(mask.shape)}; "
                         "expected [L, D] and [L] (or [1, L, D] and [1, L])")
    return embeds, mask


# --- EMA ---------------------------------------------------------------------------------------
def _unwrap(module):
    from job.models.sanavideo.validation import _unwrap as unwrap

    return unwrap(module)


def _ema_parameters(ema_model, transformer) -> list[torch.nn.Parameter]:
    params = list(_unwrap(transformer).parameters())
    count = len(ema_model.shadow_params)
    if len(params) == count:
        return params
    trainable = [p for p in params if p.requires_grad]
    if len(trainable) == count:
        return trainable
    raise ValueError(f"the EMA holds {count} tensors but the transformer has {len(params)} parameters "
                     f"({len(trainable)} trainable): pass the EMA of this transformer")


@contextlib.contextmanager
def ema_weights(ema, transformer) -> Iterator[None]:
    """Swap EMA weights into the transformer for the block, then put the training weights back.

    `ema` is a diffusers `EMAModel` (tracking all, or all trainable, parameters of the
    transformer), or the train phase's `job.train.ema.Ema` (its `EMAModel` and parameter list).
    Uses `EMAModel.store` / `copy_to` / `restore`, so the training weights come back bit for bit.
    """
    from diffusers.training_utils import EMAModel

    if isinstance(ema, EMAModel):
        model, params = ema, _ema_parameters(ema, transformer)
    elif isinstance(getattr(ema, "model", None), EMAModel):
        model = ema.model
        params = list(ema.params) if getattr(ema, "params", None) is not None else _ema_parameters(model, transformer)
    elif hasattr(ema, "applied"):
        with ema.applied():
            yield
        return
    else:
        raise TypeError(f"not an EMA object: {type(ema).__name__}")
    with torch.no_grad():
        model.store(params)
        model.copy_to(params)
    try:
        yield
    finally:
        with torch.no_grad():
            model.restore(params)


# --- memory placement ----------------------------------------------------------------------------
def _module_device(module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    return None


class _Placement:
    """Where the VAE and the text encoder live during a validation, and putting them back."""

    def __init__(self, pipe, offload: bool):
        self.pipe = pipe
        self.offload = offload
        self.device = pipe._execution_device
        self.moves: list[tuple[torch.nn.Module, torch.device]] = []

    def _move(self, module, device: torch.device) -> None:
        current = _module_device(module)
        if current is None or current == device:
            return
        if not any(m is module for m, _ in self.moves):
            self.moves.append((module, current))
        module.to(device)

    def vae_on_accelerator(self) -> None:
        self._move(self.pipe.vae, self.device)

    def for_denoising(self) -> None:
        if self.offload and self.device.type != "cpu":
            self._move(self.pipe.vae, torch.device("cpu"))
            if isinstance(self.pipe.text_encoder, torch.nn.Module):
                self._move(self.pipe.text_encoder, torch.device("cpu"))
        else:
            self.vae_on_accelerator()

    def restore(self) -> None:
        for module, device in reversed(self.moves):
            module.to(device)
        self.moves.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --- the validation --------------------------------------------------------------------------------
def _file_name(nickname: str, width: int, height: int, several_sizes: bool) -> str:
    return f"{nickname}_{width}x{height}.mp4" if several_sizes else f"{nickname}.mp4"


def run_validation(
    spec,
    ws,
    components,
    step: int,
    embeddings_for: EmbeddingsFor | Mapping,
    ema=None,
    *,
    webhooks=None,
    pipeline=None,
) -> ValidationResult:
    """Render the validation videos for optimizer step `step` (see the module docstring).

    `components` has `transformer`, `vae`, `scheduler` (a `SanaVideoComponents` or the train
    session's equivalent); `ema` is needed for `train.ema.validation: ema_only | comparison`
    (without one those render the training weights, with a warning). `webhooks` is a
    `job.report.webhooks.Webhooks` (previews and `validation_ready`), or None.
    `pipeline` reuses an already built pipeline. Raises `InputError` for a bad prompt library.
    """
    from job.models.sanavideo.validation import build_pipeline, render

    started = time.monotonic()
    v = spec.validation
    prompts = validation_prompts(v, ws)
    sizes = v.sizes()
    fps = int(spec.data.framerate or DEFAULT_FPS)
    mode = spec.train.ema.validation
    if mode != "none" and ema is None:
        log.warning("train.ema.validation is %s but no EMA weights were given: validating the training weights", mode)
        mode = "none"
    passes = {"none": ["training"], "ema_only": ["ema"], "comparison": ["training", "ema"]}[mode]
    weights = {"none": "training", "ema_only": "ema", "comparison": "comparison"}[mode]
    source = _embeddings_source(embeddings_for)
    negative = (None, None)
    if v.guidance > 1.0:
        negative = _batched(source(v.negative_prompt, negative=True), "the negative prompt")
    positives = {nick: _batched(source(text), f"prompt {nick!r}") for nick, text in prompts.items()}

    step_dir = ws.validation_dir / step_dir_name(step)
    step_dir.mkdir(parents=True, exist_ok=True)
    result = ValidationResult(step=int(step), folder=step_dir, weights=weights)
    condition = i2v_condition_image(spec, ws, components.vae) if trains_i2v(spec) else None
    pipe = pipeline if pipeline is not None else build_pipeline(components, speed=spec.speed,
                                                                 image_to_video=condition is not None)
    transformer = pipe.transformer
    offload = bool(spec.memory.enable_model_cpu_offload)
    want_previews = bool(v.preview.enabled and webhooks is not None and webhooks.wants("preview"))
    several = len(sizes) > 1
    jobs = [(nick, w, h) for nick in prompts for (w, h) in sizes]
    kept: dict[tuple[str, int, int], np.ndarray] = {}  # training-pass frames waiting for their EMA half
    sheet_rows: list[tuple[str, np.ndarray]] = []
    placement = _Placement(pipe, offload)
    try:
        projection = None
        if want_previews:
            from .preview import latent_rgb_for

            placement.vae_on_accelerator()
            projection = latent_rgb_for(pipe.vae, ws.validation_dir)
        placement.for_denoising()
        for which in passes:
            swap = ema_weights(ema, transformer) if which == "ema" else contextlib.nullcontext()
            with swap:
                for nick, width, height in jobs:
                    preview = None
                    if projection is not None:
                        from .preview import PreviewSender

                        preview = PreviewSender(projection, webhooks, v.preview.steps, v.num_inference_steps,
                                                {"step": int(step), "nickname": nick, "weights": which,
                                                 "resolution": f"{width}x{height}"})
                    frames = _render_one(render, pipe, placement, positives[nick], negative, width, height, v, preview,
                                         condition)
                    if preview is not None:
                        result.previews_sent += preview.sent
                    if mode == "comparison" and which == "training":
                        kept[(nick, width, height)] = frames
                        continue
                    layout = "single"
                    if mode == "comparison":
                        frames = np.concatenate([kept.pop((nick, width, height)), frames], axis=2)
                        layout = "comparison"
                    path = write_mp4(step_dir / _file_name(nick, width, height, several), frames, fps)
                    result.videos.append(ValidationVideo(nick, prompts[nick], path, frames.shape[2] + frames.shape[2] % 2,
                                                         frames.shape[1] + frames.shape[1] % 2, frames.shape[0], fps, layout))
                    label = f"{nick} {width}x{height}" + (" (left: training, right: EMA)" if layout == "comparison" else "")
                    sheet_rows.append((label, frames[pick_frames(frames.shape[0], SHEET_FRAMES)]))
                    del frames
    finally:
        placement.restore()
        device_type = placement.device.type
        if pipeline is None:
            del pipe
        if device_type != "cpu":
            gc.collect()  # drop the pipeline's references before the allocator is asked to give memory back
            if device_type == "cuda":
                torch.cuda.empty_cache()

    sheet_png = contact_sheet_png(sheet_rows, frames_per_video=SHEET_FRAMES)
    result.contact_sheet = step_dir / CONTACT_SHEET
    atomic_write_bytes(result.contact_sheet, sheet_png)
    result.manifest = write_manifest(step_dir, {
        "step": int(step), "weights": weights, "fps": fps, "num_frames": v.num_video_frames,
        "num_inference_steps": v.num_inference_steps, "guidance": v.guidance, "seed": v.seed,
        "negative_prompt": v.negative_prompt, "contact_sheet": CONTACT_SHEET,
        "videos": [{"nickname": x.nickname, "prompt": x.prompt, "file": x.path.name, "width": x.width,
                    "height": x.height, "frames": x.frames, "layout": x.layout} for x in result.videos],
    })
    result.index = write_index(ws.validation_dir, title=f"Validation — {spec.name}")
    result.seconds = time.monotonic() - started

    rel = [str(p.relative_to(ws.output_dir)) for p in result.files()]
    log.info("validation at step %d: %d video(s) in %.1f s -> %s", step, len(result.videos), result.seconds, step_dir)
    event("validation_ready", step=int(step), folder=str(step_dir), files=rel, seconds=round(result.seconds, 2))
    if webhooks is not None:
        webhooks.send("validation_ready", {
            "step": int(step), "weights": weights, "folder": str(step_dir), "index": str(result.index),
            "videos": [str(x.path) for x in result.videos],
        }, image_png=sheet_png)
    return result


def trains_i2v(spec) -> bool:
    return any(ds.video.is_i2v for ds in spec.data.active())


def i2v_condition_image(spec, ws, vae):
    """The image-to-video validation condition (a PIL RGB image): `validation.image`, or else the
    first frame of the first cached i2v training clip, decoded from its cached first-frame latent
    (the VAE is already loaded for validation; the clip's source may be gone by now)."""
    from PIL import Image

    if spec.validation.image:
        path = ws.resolve(spec.validation.image)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise InputError(f"validation.image {path} cannot be read as an image ({exc})",
                             "point validation.image at a PNG or JPEG file, or remove it to use the first training clip's first frame") from None
    from job.cache.reader import CachedDataset
    from job.models.sanavideo.latents import decode_latents

    dataset = CachedDataset(ws, spec, split="train")
    i2v_ids = {ds.id for ds in spec.data.active() if ds.video.is_i2v}
    for index, entry in enumerate(dataset.entries):
        if entry.dataset_id in i2v_ids:
            first = dataset[index]["first_frame_latents"]
            if first is not None:
                param = next(vae.parameters())
                with torch.no_grad():
                    pixels = decode_latents(vae, first[None].to(param.device, param.dtype))  # [1, 3, 1, H, W] in [-1, 1]
                frame = ((pixels[0, :, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                return Image.fromarray(frame.permute(1, 2, 0).cpu().numpy())
    raise InputError("image-to-video validation needs a condition image, and no cached i2v clip has a first-frame latent",
                     "run the cache phase (`trainer cache SPEC`), or set validation.image")


def _render_one(render, pipe, placement: _Placement, positive, negative, width: int, height: int, v,
                preview, condition=None) -> np.ndarray:
    """One video as uint8 [F, H, W, 3]; moves the VAE in for the decode when it is offloaded."""
    steps = int(v.num_inference_steps)

    def on_step_end(pipeline, index, timestep, tensors):
        if preview is not None:
            preview(index, tensors["latents"])
        last = getattr(pipeline, "_num_timesteps", steps) - 1
        if index >= last:
            placement.vae_on_accelerator()  # decode next; no-op when it is already there
        return {}

    try:
        frames = render(
            pipe, positive[0], positive[1], negative[0], negative[1], width=width, height=height,
            num_frames=v.num_video_frames, guidance=v.guidance, steps=steps, seed=v.seed,
            callback_on_step_end=on_step_end, image=condition,
        )
    finally:
        placement.for_denoising()  # offloaded VAE back to CPU RAM between videos
    return to_uint8(frames[0])
