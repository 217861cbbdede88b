"""The on-disk cache format: the contract between the cache phase (writer) and training (reader).

Latent cache, one folder per dataset (`ws.latent_cache_dir(ds)`):

    <sample_key>.safetensors   tensors  latents [C, F, H, W]      normalised: (raw - mean) / std
                                        first_frame_latents [C, 1, H, W]   (optional, i2v)
                                        mask [1, F, H, W]          (optional, latent resolution, 0..1)
                                        crepa_features [F, rows, cols, D]  (optional, CREPA's DINOv2 features
                                                                   per latent frame, `job.train.crepa`)
                               metadata caption_key, bucket ("832x480@81"), source, is_holdout ("0"/"1"),
                                        format_version, plus any extra string fields (cache key fields)
    manifest.json              {"format_version": 1, "samples": {sample_key: {"file": ..., "caption_key": ...,
                                "bucket": ..., "is_holdout": bool, "key": {cache key fields}}}}

Text cache (`ws.text_cache_dir`):

    <caption_key>.safetensors  tensors prompt_embeds [L, D], prompt_attention_mask [L]
                               metadata kind ("prompt" | "negative"), format_version

`caption_key` is the sha256 of (caption text, instruction hash, max_sequence_length, text-encoder
identity): the same caption encoded differently gets a different file. The caption text is the
final string handed to the text encoder (with any motion-score suffix), before the pipeline's own
lower-casing. Negative prompts (and the empty prompt used for caption dropout, which is the
negative prompt "") are encoded WITHOUT the complex human instruction, as `SanaVideoPipeline`
does, so they have their own keys: `TextKeyContext.negative_key(text)` / `.empty_key()`.

Every file is written atomically (temporary name, fsync, rename): a cache file is whole or absent.
With `data.compress_disk_cache` the cache phase writes the same files compressed
(`job.cache.compression`); every reader here reads both kinds.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from job.errors import InputError
from job.workspace import atomic_write_text

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SUFFIX = ".safetensors"

# tensor names
LATENTS = "latents"
FIRST_FRAME_LATENTS = "first_frame_latents"
MASK = "mask"
CREPA_FEATURES = "crepa_features"
PROMPT_EMBEDS = "prompt_embeds"
PROMPT_ATTENTION_MASK = "prompt_attention_mask"

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_BUCKET_PATTERN = re.compile(r"^(\d+)x(\d+)@(\d+)$")
_RESERVED_META = {"caption_key", "bucket", "source", "is_holdout", "format_version"}
_FIX_RECACHE = "run the cache phase again (`trainer cache SPEC`); broken files are recomputed"


# --- keys -------------------------------------------------------------------------------------


def instruction_hash(lines: Sequence[str] | None) -> str:
    """Hash of the complex human instruction actually used (None or [] = none)."""
    if not lines:
        return "none"
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def caption_key(prompt: str, *, instruction: str, max_sequence_length: int, text_encoder: str) -> str:
    """sha256 of (prompt, instruction hash, max_sequence_length, text-encoder identity)."""
    payload = json.dumps(
        {"prompt": prompt, "instruction": instruction, "max_sequence_length": int(max_sequence_length),
         "text_encoder": text_encoder},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def text_encoder_identity(model_dir: Path | str) -> str:
    """A stable identity of the text encoder + tokenizer under a diffusers model folder.

    Hash of their config/tokenizer files and of the weight files' names and sizes (cheap: no
    weight is read). A folder without `text_encoder/` falls back to its absolute path.
    """
    root = Path(model_dir)
    h = hashlib.sha256()
    found = False
    for part in ("text_encoder", "tokenizer"):
        folder = root / part
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            found = True
            rel = path.relative_to(root).as_posix()
            if path.suffix in (".json", ".txt", ".model") and path.stat().st_size < 64 * 2**20:
                h.update(f"{rel}\0".encode() + path.read_bytes() + b"\0")
            else:
                h.update(f"{rel}\0{path.stat().st_size}\0".encode())
    return h.hexdigest()[:32] if found else f"path:{root.absolute()}"


@dataclass(frozen=True)
class TextKeyContext:
    """Everything besides the caption text that decides a text embedding."""

    instruction: str  # instruction_hash(...) of the lines used for captions
    max_sequence_length: int
    text_encoder: str  # text_encoder_identity(...)

    def key(self, prompt: str) -> str:
        """Key of a training caption (encoded with the complex human instruction)."""
        return caption_key(prompt, instruction=self.instruction, max_sequence_length=self.max_sequence_length,
                           text_encoder=self.text_encoder)

    def negative_key(self, prompt: str) -> str:
        """Key of a negative prompt (encoded without the instruction, as the pipeline does)."""
        return caption_key(prompt, instruction=instruction_hash(None), max_sequence_length=self.max_sequence_length,
                           text_encoder=self.text_encoder)

    def empty_key(self) -> str:
        """Key of the empty prompt used for caption dropout: the pipeline's default negative ""."""
        return self.negative_key("")


def text_key_context(spec, ws) -> TextKeyContext:
    """The `TextKeyContext` of a job: the cache phase and training both call this."""
    from job.models.sanavideo.prompts import instruction_from_spec

    lines = instruction_from_spec(spec.model.prompt.complex_human_instruction)
    return TextKeyContext(
        instruction=instruction_hash(lines),
        max_sequence_length=spec.model.prompt.max_sequence_length,
        text_encoder=text_encoder_identity(ws.model_dir(spec.model.pretrained_model_name_or_path)),
    )


def check_sample_key(sample_key: str) -> str:
    if not _KEY_PATTERN.match(sample_key):
        raise ValueError(f"sample key {sample_key!r} is not a safe file name (letters, digits, '.', '_', '-'; max 200)")
    return sample_key


def bucket_label(width: int, height: int, frames: int) -> str:
    """`832x480@81`: pixel width x height @ pixel frames."""
    return f"{int(width)}x{int(height)}@{int(frames)}"


def parse_bucket(label: str) -> tuple[int, int, int]:
    match = _BUCKET_PATTERN.match(label)
    if not match:
        raise ValueError(f"bucket {label!r} is not of the form WxH@F")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def sample_path(cache_dir: Path, sample_key: str) -> Path:
    return Path(cache_dir) / f"{check_sample_key(sample_key)}{SUFFIX}"


def text_path(text_cache_dir: Path, key: str) -> Path:
    return Path(text_cache_dir) / f"{check_sample_key(key)}{SUFFIX}"


# --- atomic safetensors -----------------------------------------------------------------------


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], compress: bool) -> None:
    from . import compression  # imports this module: import it lazily

    compression.save(path, tensors, metadata, compress)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a cache file, plain or compressed (`job.cache.compression`)."""
    if not path.is_file():
        raise InputError(f"cache file {path} is missing", _FIX_RECACHE)
    from . import compression  # imports this module: import it lazily

    if compression.is_compressed(path):
        return compression.load(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types for a truncated/corrupt file
        raise InputError(f"cache file {path} is unreadable ({exc})", _FIX_RECACHE) from exc
    return tensors, metadata


def read_metadata(path: Path) -> dict[str, str]:
    """Only the metadata of a cache file, plain or compressed (reads the header, not the tensors)."""
    from . import compression

    return compression.read_metadata(path)


# --- latent samples ---------------------------------------------------------------------------


@dataclass
class CachedSample:
    sample_key: str
    latents: torch.Tensor  # [C, F, H, W]
    caption_key: str
    bucket: str
    source: str
    is_holdout: bool
    first_frame_latents: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [1, F, H, W]
    extra: dict[str, str] | None = None
    crepa_features: torch.Tensor | None = None  # [F, rows, cols, D]


def write_sample(
    cache_dir: Path,
    sample_key: str,
    latents: torch.Tensor,
    *,
    caption_key: str,
    bucket: str,
    source: str,
    is_holdout: bool = False,
    first_frame_latents: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    extra: Mapping[str, str] | None = None,
    compress: bool = False,
    crepa_features: torch.Tensor | None = None,
) -> Path:
    """Write one latent sample atomically; returns its path. `extra` holds cache key fields (strings);
    `compress` writes the file compressed (`job.cache.compression`; every reader here reads both)."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be [C, F, H, W], got {tuple(latents.shape)}")
    parse_bucket(bucket)
    if mask is not None and (mask.ndim != 4 or mask.shape[0] != 1 or tuple(mask.shape[1:]) != tuple(latents.shape[1:])):
        raise ValueError(f"mask must be [1, F, H, W] = [1, {', '.join(map(str, latents.shape[1:]))}], got {tuple(mask.shape)}")
    tensors = {LATENTS: latents}
    if first_frame_latents is not None:
        tensors[FIRST_FRAME_LATENTS] = first_frame_latents
    if mask is not None:
        tensors[MASK] = mask
    if crepa_features is not None:
        if crepa_features.ndim != 4 or crepa_features.shape[0] != latents.shape[1]:
            raise ValueError(f"crepa_features must be [F, rows, cols, D] with F = {latents.shape[1]}, got {tuple(crepa_features.shape)}")
        tensors[CREPA_FEATURES] = crepa_features
    metadata = {str(k): str(v) for k, v in (extra or {}).items() if k not in _RESERVED_META}
    metadata.update(caption_key=caption_key, bucket=bucket, source=str(source), is_holdout="1" if is_holdout else "0",
                    format_version=str(FORMAT_VERSION))
    path = sample_path(cache_dir, sample_key)
    _atomic_save(path, tensors, metadata, compress)
    return path


def read_sample(cache_dir: Path, sample_key: str) -> CachedSample:
    path = sample_path(cache_dir, sample_key)
    tensors, meta = _load(path)
    if LATENTS not in tensors or "caption_key" not in meta or "bucket" not in meta:
        raise InputError(f"cache file {path} is not a latent sample (no latents / caption_key / bucket)", _FIX_RECACHE)
    extra = {k: v for k, v in meta.items() if k not in _RESERVED_META}
    return CachedSample(
        sample_key=sample_key, latents=tensors[LATENTS], caption_key=meta["caption_key"], bucket=meta["bucket"],
        source=meta.get("source", ""), is_holdout=meta.get("is_holdout", "0") == "1",
        first_frame_latents=tensors.get(FIRST_FRAME_LATENTS), mask=tensors.get(MASK), extra=extra,
        crepa_features=tensors.get(CREPA_FEATURES),
    )


# --- text embeddings --------------------------------------------------------------------------


def write_text_embedding(text_cache_dir: Path, key: str, prompt_embeds: torch.Tensor,
                         prompt_attention_mask: torch.Tensor, *, kind: str = "prompt", compress: bool = False,
                         extra: Mapping[str, str] | None = None) -> Path:
    """Write one prompt's embedding [L, D] and mask [L] atomically (a batch dim of 1 is squeezed);
    `extra` is more string metadata, `compress` as in `write_sample`."""
    if prompt_embeds.ndim == 3 and prompt_embeds.shape[0] == 1:
        prompt_embeds = prompt_embeds[0]
    if prompt_attention_mask.ndim == 2 and prompt_attention_mask.shape[0] == 1:
        prompt_attention_mask = prompt_attention_mask[0]
    if prompt_embeds.ndim != 2 or prompt_attention_mask.shape != prompt_embeds.shape[:1]:
        raise ValueError(f"need prompt_embeds [L, D] and mask [L], got {tuple(prompt_embeds.shape)} and {tuple(prompt_attention_mask.shape)}")
    path = text_path(text_cache_dir, key)
    metadata = {str(k): str(v) for k, v in (extra or {}).items()}
    metadata.update(kind=kind, format_version=str(FORMAT_VERSION))
    _atomic_save(path, {PROMPT_EMBEDS: prompt_embeds, PROMPT_ATTENTION_MASK: prompt_attention_mask}, metadata, compress)
    return path


def read_text_embedding(text_cache_dir: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [L, D], prompt_attention_mask [L])."""
    path = text_path(text_cache_dir, key)
    tensors, _ = _load(path)
    if PROMPT_EMBEDS not in tensors or PROMPT_ATTENTION_MASK not in tensors:
        raise InputError(f"cache file {path} is not a text embedding", _FIX_RECACHE)
    return tensors[PROMPT_EMBEDS], tensors[PROMPT_ATTENTION_MASK]


def has_text_embedding(text_cache_dir: Path, key: str) -> bool:
    return text_path(text_cache_dir, key).is_file()


# --- manifests --------------------------------------------------------------------------------


def manifest_entry(sample_key: str, *, caption_key: str, bucket: str, is_holdout: bool = False,
                   key: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"file": sample_path(Path("."), sample_key).name, "caption_key": caption_key, "bucket": bucket,
            "is_holdout": bool(is_holdout), "key": dict(key or {})}


def read_manifest(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """sample_key -> entry; {} when the folder has no manifest."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cache manifest {path} is unreadable ({exc})", _FIX_RECACHE) from exc
    return dict(data.get("samples", {}))


def write_manifest(cache_dir: Path, samples: Mapping[str, Mapping[str, Any]], **extra: Any) -> Path:
    """Replace the manifest atomically. `extra` goes to the top level (e.g. the cache key of the dataset)."""
    path = Path(cache_dir) / MANIFEST_NAME
    payload = {"format_version": FORMAT_VERSION, **extra, "samples": {k: dict(v) for k, v in sorted(samples.items())}}
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=False, ensure_ascii=False) + "\n")
    return path
