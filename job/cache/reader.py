"""Reading the caches for training: a Dataset and a collate function.

    dataset = CachedDataset(ws, spec, split="train")
    sampler = BucketBatchSampler(dataset.buckets, batch_size=2, seed=42, rank=rank, world_size=world)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_cached)

`BucketBatchSampler` is the data package's (`job.data.sampler`), re-exported here: one sampler
for raw videos and cached latents, deterministic and exactly resumable.

The cache holds one file per sample window; `repeats` are applied here, when the training split
is listed. Every batch comes from one bucket, so its latents stack.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from job.data.sampler import BucketBatchSampler
from job.errors import InputError

from . import format as fmt

__all__ = ["CachedDataset", "CacheEntry", "collate_cached", "BucketBatchSampler", "require_samples"]

log = logging.getLogger("trainer.train")


@dataclass(frozen=True)
class CacheEntry:
    dataset_id: str
    cache_dir: Path
    sample_key: str
    caption_key: str
    bucket: str
    is_holdout: bool


def _entries_for(dataset_id: str, cache_dir: Path) -> list[CacheEntry]:
    manifest = fmt.read_manifest(cache_dir)
    entries: list[CacheEntry] = []
    if manifest:
        missing = 0
        for key, item in manifest.items():
            if not (cache_dir / item.get("file", f"{key}{fmt.SUFFIX}")).is_file():
                missing += 1
                continue
            entries.append(CacheEntry(dataset_id, cache_dir, key, item["caption_key"], item["bucket"], bool(item.get("is_holdout", False))))
        if missing:
            log.warning("%s: %d samples listed in %s have no file; they are skipped (re-run the cache phase)",
                        dataset_id, missing, cache_dir / fmt.MANIFEST_NAME)
    elif cache_dir.is_dir():  # no manifest: read each file's header
        for path in sorted(cache_dir.glob(f"*{fmt.SUFFIX}")):
            if path.name.startswith("."):
                continue
            meta = fmt.read_metadata(path)
            if "caption_key" not in meta or "bucket" not in meta:
                continue
            entries.append(CacheEntry(dataset_id, cache_dir, path.name[: -len(fmt.SUFFIX)], meta["caption_key"],
                                      meta["bucket"], meta.get("is_holdout", "0") == "1"))
    return sorted(entries, key=lambda e: e.sample_key)


class CachedDataset(Dataset):
    """Every cached sample of every active dataset in one split ("train" or "holdout").

    An item is a dict: latents [C, F, H, W] (float32), prompt_embeds [L, D], prompt_attention_mask [L],
    mask [1, F, H, W] or None, first_frame_latents or None, crepa_features [F, rows, cols, D] or None,
    sample_key, bucket, dataset, caption_key.
    """

    def __init__(self, ws, spec, split: str = "train", dtype: torch.dtype = torch.float32):
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        self.split = split
        self.dtype = dtype
        self.text_cache_dir = Path(ws.text_cache_dir)
        self.entries: list[CacheEntry] = []
        for ds in spec.data.active():
            # `repeats` lists each training clip 1 + repeats times per epoch (the cache holds it once);
            # held-out clips are evaluated once.
            copies = 1 + ds.repeats if split == "train" else 1
            for entry in _entries_for(ds.id, Path(ws.latent_cache_dir(ds))):
                if entry.is_holdout == (split == "holdout"):
                    self.entries.extend([entry] * copies)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def buckets(self) -> list[str]:
        return [e.bucket for e in self.entries]

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        sample = _set_aside_if_broken(fmt.sample_path(entry.cache_dir, entry.sample_key),
                                      lambda: fmt.read_sample(entry.cache_dir, entry.sample_key))
        embeds, mask = _set_aside_if_broken(fmt.text_path(self.text_cache_dir, sample.caption_key),
                                            lambda: fmt.read_text_embedding(self.text_cache_dir, sample.caption_key))
        return {
            "latents": sample.latents.to(self.dtype),
            "prompt_embeds": embeds,
            "prompt_attention_mask": mask,
            "mask": None if sample.mask is None else sample.mask.to(self.dtype),
            "first_frame_latents": None if sample.first_frame_latents is None else sample.first_frame_latents.to(self.dtype),
            "crepa_features": None if sample.crepa_features is None else sample.crepa_features.to(self.dtype),
            "sample_key": entry.sample_key,
            "caption_key": sample.caption_key,
            "bucket": sample.bucket,
            "dataset": entry.dataset_id,
        }


def _set_aside_if_broken(path: Path, read):
    """`read()`; if the file is unreadable (cut short, garbage: InputError), rename it to a temporary
    name first, so the next cache phase finds it missing and recomputes it (it also deletes such
    leftovers). Without this, a broken file whose header still parses would be skipped again."""
    try:
        return read()
    except InputError:
        if path.is_file():
            try:
                os.replace(path, path.with_name(f".{path.name}.broken.tmp"))
                log.warning("cache file %s is unreadable; set aside, the next cache phase recomputes it", path)
            except OSError:
                pass
        raise


def collate_cached(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of one bucket. Missing masks among masked items become all-ones masks; with any
    i2v item, `first_frame_latents` is stacked (zeros for text-to-video items) with `i2v` [B] saying which."""
    if not items:
        raise ValueError("empty batch")
    buckets = {item["bucket"] for item in items}
    shapes = {tuple(item["latents"].shape) for item in items}
    if len(buckets) > 1 or len(shapes) > 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)} / latent shapes {sorted(shapes)}; use BucketBatchSampler")
    out: dict[str, Any] = {
        "latents": torch.stack([i["latents"] for i in items]),
        "prompt_embeds": torch.stack([i["prompt_embeds"] for i in items]),
        "prompt_attention_mask": torch.stack([i["prompt_attention_mask"] for i in items]),
        "sample_keys": [i["sample_key"] for i in items],
        "caption_keys": [i["caption_key"] for i in items],
        "bucket": items[0]["bucket"],
        "mask": None,
        "first_frame_latents": None,
        "crepa_features": None,
    }
    if any(i["mask"] is not None for i in items):
        ones = torch.ones((1, *items[0]["latents"].shape[1:]), dtype=items[0]["latents"].dtype)
        out["mask"] = torch.stack([ones if i["mask"] is None else i["mask"] for i in items])
    if any(i["first_frame_latents"] is not None for i in items):  # i2v samples (a bucket may mix them with t2v)
        like = next(i["first_frame_latents"] for i in items if i["first_frame_latents"] is not None)
        out["first_frame_latents"] = torch.stack([torch.zeros_like(like) if i["first_frame_latents"] is None
                                                  else i["first_frame_latents"] for i in items])
        out["i2v"] = torch.tensor([i["first_frame_latents"] is not None for i in items])
    if all(i.get("crepa_features") is not None for i in items):
        out["crepa_features"] = torch.stack([i["crepa_features"] for i in items])
    return out


def require_samples(dataset: CachedDataset, sampler: BucketBatchSampler, needed_batches: int = 1) -> None:
    """Raise a clear InputError when the cache gives too few batches to train on."""
    if len(dataset) == 0:
        raise InputError(
            f"no samples detected in the latent caches ({dataset.split} split)",
            "run the cache phase first (`trainer cache SPEC`), and check that the datasets have clips and captions",
        )
    if len(sampler) < needed_batches:
        sizes = ", ".join(f"{b}: {len(ix)}" for b, ix in sorted(sampler.buckets.items()))
        raise InputError(
            f"no samples detected: the buckets hold too few clips for one optimizer step, which needs "
            f"{needed_batches} full batch(es) of {sampler.batch_size} clips of one bucket for each of {sampler.world_size} "
            f"process(es) (clips per bucket: {sizes})",
            "raise data.datasets[i].repeats so each clip is seen more often per epoch, or lower train.train_batch_size / "
            "train.gradient_accumulation_steps",
        )
