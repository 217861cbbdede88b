"""The data plan: every training sample of the job, decided once, before anything is decoded.

`plan_dataset(spec, ws)` scans each active dataset, probes new clips (metadata cache), pairs
captions, cuts frame windows, assigns target sizes, crop boxes and buckets, splits off held-out
clips, reports broken and skipped clips, and checks that each dataset can fill a batch.

`load_sample(sample)` decodes one planned sample to a float tensor [C, F, H, W] in [-1, 1]. A
`Sample` is a frozen record of plain values, and `load_sample` keeps no state, so both cross
process boundaries (torch DataLoader workers) freely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from job.errors import InputError
from job.report import event, is_interactive
from job.spec import JobSpec
from job.spec.data import VideoDataset
from job.workspace import Workspace, is_remote

from .captions import CaptionSource
from .decode import DecodeError, Window, decode_window, frames_to_tensor
from .discovery import QUARANTINE_DIR, VIDEO_EXTENSIONS, discover_videos
from .geometry import bucket_key, crop_box, display_size, plan_windows, resampled_frames, target_size
from .probe import MetadataCache, probe_many
from .report import DataReport, Problem, Skip, Note, apply_quarantine, report_path
from .sampler import stable_seed

log = logging.getLogger("trainer.data")


@dataclass(frozen=True)
class Sample:
    """One training sample: a window of one clip, with everything needed to decode it."""

    dataset_id: str
    path: str  # absolute path of the clip (as found, through links)
    relpath: str  # relative to the dataset folder, '/'-separated
    caption: str  # final text: policy and motion score applied
    start_frame: int  # first frame of the window, counted at `fps`
    start_time: float  # seconds after the clip's first frame
    num_frames: int  # frames in the window (4k+1)
    fps: float  # rate the frames are taken at: data.framerate, or the clip's own rate
    width: int  # target width (multiple of 16)
    height: int  # target height (multiple of 16)
    bucket: str  # 'WxH@F'
    crop_box: tuple[int, int, int, int]  # (left, top, width, height) in display-oriented source pixels
    is_holdout: bool
    fingerprint: tuple[int, int]  # (size in bytes, mtime in ns) of the clip when planned
    source_width: int  # display size of the clip (rotation applied)
    source_height: int
    source_fps: float
    first_time: float = 0.0  # timestamp of the clip's first frame
    rotation: int = 0  # display rotation, degrees counter-clockwise
    is_i2v: bool = False  # the first frame is the image condition
    window_index: int = 0
    mask_path: str | None = None  # the clip's mask (same stem) under masks_dir, when found

    @property
    def key(self) -> str:
        """Unique and stable id of the sample: '<dataset>/<relpath>#<start frame>'."""
        return f"{self.dataset_id}/{self.relpath}#{self.start_frame}"

    @property
    def target_size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def window(self) -> Window:
        return Window(self.start_time, self.num_frames, self.fps, self.source_fps, self.first_time)


@dataclass
class DataPlan:
    """Every sample of the job (train and held out), the report, and counts per dataset."""

    samples: list[Sample]
    report: DataReport
    counts: dict[str, dict[str, Any]]
    repeats: dict[str, int] = field(default_factory=dict)
    report_file: Path | None = None

    @property
    def train_samples(self) -> list[Sample]:
        return [s for s in self.samples if not s.is_holdout]

    @property
    def holdout_samples(self) -> list[Sample]:
        return [s for s in self.samples if s.is_holdout]

    def for_dataset(self, dataset_id: str) -> list[Sample]:
        return [s for s in self.samples if s.dataset_id == dataset_id]

    def buckets(self, holdout: bool = False) -> dict[str, list[Sample]]:
        out: dict[str, list[Sample]] = {}
        for s in self.samples:
            if s.is_holdout == holdout:
                out.setdefault(s.bucket, []).append(s)
        return dict(sorted(out.items()))

    def epoch_samples(self) -> list[Sample]:
        """Train samples with `repeats` applied (each is listed repeats + 1 times): feed to BucketBatchSampler."""
        return [s for s in self.train_samples for _ in range(self.repeats.get(s.dataset_id, 0) + 1)]


# --------------------------------------------------------------------------------------------
# planning


def holdout_score(relpath: str) -> float:
    """A uniform number in [0, 1) from the relative path: clips below `holdout_fraction` are held out."""
    return int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") / 2**64


def plan_dataset(spec: JobSpec, ws: Workspace, *, probe_workers: int | None = None, show: bool = True) -> DataPlan:
    """Plan every active dataset of `spec` (see the module doc).

    Raises InputError (exit 2) for a missing dataset folder or captions file, and, after the
    report is written, for a dataset too small to fill a batch ("no samples detected").
    `probe_workers`: processes for probing new clips (None: automatic, by folder size).
    """
    report = DataReport()
    samples: list[Sample] = []
    repeats: dict[str, int] = {}
    for ds in spec.data.active():
        ds_samples = _plan_one(spec, ws, ds, report, probe_workers)
        samples.extend(ds_samples)
        repeats[ds.id] = ds.repeats

    samples = _ensure_holdout(samples, spec.data.holdout_fraction)
    counts = _count(spec, samples, report)
    report.counts = counts
    path = report_path(ws)
    report.save(path)
    for ds_id, c in counts.items():
        event("data.planned", dataset=ds_id, **c)
        log.info("dataset %s: %d clip(s) -> %d sample(s) (%d held out) in %d bucket(s); left out: %d too short, %d too small, "
                 "%d without caption, %d broken%s", ds_id, c["clips_found"], c["samples"], c["holdout_samples"], len(c["buckets"]),
                 c["too_short"], c["too_small"], c["no_caption"], c["problems"], f" (report: {path})" if c["problems"] else "")
    for p in report.problems:
        event("data.problem", dataset=p.dataset, path=p.relpath, reason=p.reason, detail=p.detail, quarantined_to=p.quarantined_to)
    if show:
        report.print_summary()
    _check_sizes(spec, samples, counts)
    return DataPlan(samples=samples, report=report, counts=counts, repeats=repeats, report_file=path)


def _dataset_index(spec: JobSpec, ds: VideoDataset) -> int:
    return next((i for i, d in enumerate(spec.data.datasets) if d.id == ds.id), 0)


def dataset_folder(spec: JobSpec, ws: Workspace, ds: VideoDataset) -> Path:
    """The dataset's folder (a local source, or where the pull phase put a remote one).

    InputError (exit 2) when it is not there; the pull phase calls this for local sources, so a
    mistyped path fails there instead of being reported as nothing to download.
    """
    root = ws.dataset_dir(ds)
    if root.is_dir():
        return root
    if is_remote(ds.source):
        raise InputError(f"dataset {ds.id!r}: no folder pulled into {root} (source: {ds.source})", "run `trainer pull SPEC` first")
    field_name = f"data.datasets[{_dataset_index(spec, ds)}].source"
    what = "is a file, not a folder" if root.exists() else "does not exist"
    raise InputError(f"dataset {ds.id!r}: no folder at {root}: {field_name} {ds.source!r} {what}",
                     f"correct {field_name} (relative paths are under the workspace, {ws.root}), or use an "
                     "hf://datasets/owner/repo or s3://bucket/prefix source so the pull phase downloads it")


def _plan_one(spec: JobSpec, ws: Workspace, ds: VideoDataset, report: DataReport, probe_workers: int | None) -> list[Sample]:
    root = dataset_folder(spec, ws, ds)
    masks_folder = _masks_folder(spec, ds, root)  # before any probing: a mistyped masks_dir fails at once
    found = discover_videos(root)
    captions = CaptionSource(ds, root)  # may raise InputError (captions file missing)
    quarantine_on = spec.data.delete_problematic_videos

    for rel in found.broken_links:
        problem = Problem(ds.id, rel, "broken link", "a symbolic link whose target does not exist", stage="discovery")
        report.problems.append(apply_quarantine(problem, root, quarantine_on))
    for rel, err in found.unreadable:
        report.notes.append(Note(ds.id, rel, f"could not be read while scanning: {err}"))

    cache = MetadataCache(ws.metadata_cache(ds))
    metas: dict[str, dict[str, Any]] = {}
    todo = []
    for f in found.files:
        cached = cache.get(f)
        if cached is None:
            todo.append(f)
        else:
            metas[f.relpath] = cached
    if todo:
        log.info("dataset %s: reading metadata of %d new clip(s) (%d cached)", ds.id, len(todo), len(metas))
        metas.update(_probe_with_progress(todo, probe_workers, ds.id))
        for f in todo:
            cache.put(f, metas[f.relpath])
    cache.prune({f.relpath for f in found.files})
    cache.save()

    masks = _mask_index(masks_folder) if masks_folder else {}
    framerate = spec.data.framerate
    fraction = spec.data.holdout_fraction
    samples: list[Sample] = []
    for f in found.files:
        meta = metas[f.relpath]
        if not meta.get("ok"):
            problem = Problem(ds.id, f.relpath, meta.get("reason", "unreadable"), meta.get("detail", ""), stage=meta.get("stage", "probe"))
            report.problems.append(apply_quarantine(problem, root, quarantine_on))
            continue
        caption = captions.caption(f)
        if caption is None:
            report.skipped.append(Skip(ds.id, f.relpath, "no_caption", f"no caption ({ds.caption_strategy}) and missing_captions: skip"))
            continue
        rotation = int(meta.get("rotation", 0))
        dw, dh = display_size(int(meta["width"]), int(meta["height"]), rotation)
        if ds.minimum_image_size and min(dw, dh) < ds.minimum_image_size:
            report.skipped.append(Skip(ds.id, f.relpath, "too_small", f"{dw}x{dh}: shorter side < minimum_image_size {ds.minimum_image_size}"))
            continue
        source_fps = float(meta["fps"])
        fps = float(framerate) if framerate else source_fps
        available = resampled_frames(int(meta["frames"]), meta.get("duration"), source_fps, fps)
        windows = plan_windows(available, ds.video)
        if windows.skip_reason:
            report.skipped.append(Skip(ds.id, f.relpath, "too_short", f"{windows.skip_reason} (at {fps:g} fps)"))
            continue
        target = target_size(dw, dh, ds)
        key = bucket_key(target, windows.length)
        held = fraction > 0 and holdout_score(f.relpath) < fraction
        mask = masks.get(os.path.splitext(f.relpath)[0])
        for index, start in enumerate(windows.starts):
            rng = random.Random(stable_seed("crop", spec.train.seed, ds.id, f.relpath, start))
            box = crop_box(dw, dh, target, ds.crop, ds.crop_style, rng)
            samples.append(Sample(
                dataset_id=ds.id, path=str(f.path), relpath=f.relpath, caption=caption, start_frame=start,
                start_time=start / fps, num_frames=windows.length, fps=fps, width=target[0], height=target[1], bucket=key,
                crop_box=box, is_holdout=held, fingerprint=f.fingerprint, source_width=dw, source_height=dh,
                source_fps=source_fps, first_time=float(meta.get("start_time", 0.0)), rotation=rotation,
                is_i2v=ds.video.is_i2v, window_index=index, mask_path=mask,
            ))
    report.notes.extend(Note(ds.id, n.path, n.message) for n in captions.notes)
    if masks_folder and spec.train.masked_loss:
        _note_mask_coverage(ds, masks_folder, masks, samples, report)
    return samples


def _masks_folder(spec: JobSpec, ds: VideoDataset, root: Path) -> Path | None:
    """The dataset's masks folder (`masks_dir`, relative to the dataset folder), None without one.

    A masks_dir that names no folder is an InputError: silently training without masks (or with the
    masks of another folder) is never what a spec that names one wants.
    """
    if not ds.masks_dir:
        return None
    folder = root / os.path.expanduser(ds.masks_dir)
    if folder.is_dir():
        return folder
    field_name = f"data.datasets[{_dataset_index(spec, ds)}].masks_dir"
    what = "is not a folder" if folder.exists() else "does not exist"
    raise InputError(f"dataset {ds.id!r}: {field_name} {ds.masks_dir!r}: the masks folder {folder} {what}",
                     f"check the path (a relative masks_dir starts at the dataset folder, {root}), or remove {field_name}"
                     + (" (then this dataset trains on the whole frame)" if spec.train.masked_loss else ""))


def _note_mask_coverage(ds: VideoDataset, folder: Path, masks: dict[str, str], samples: list[Sample], report: DataReport) -> None:
    """With masked_loss on: warn when no clip of the dataset found its mask, note when only some did."""
    clips = sorted({s.relpath for s in samples})
    if not clips:
        return
    with_mask = {s.relpath for s in samples if s.mask_path}
    if not with_mask:
        example = os.path.splitext(clips[0])[0]
        message = (f"train.masked_loss is on, but none of the {len(clips)} clip(s) of dataset {ds.id!r} has a mask in "
                   f"{folder} ({len(masks)} file(s) there); a mask has the clip's relative path and stem, e.g. "
                   f"{folder / example}.png for {clips[0]}: these clips train on the whole frame")
        log.warning("%s", message)
        report.notes.append(Note(ds.id, ds.masks_dir or str(folder), message))
    elif len(with_mask) < len(clips):
        missing = [c for c in clips if c not in with_mask]
        message = (f"{len(missing)} of {len(clips)} clip(s) of dataset {ds.id!r} have no mask in {folder} "
                   f"(first: {missing[0]}): they train on the whole frame")
        log.info("%s", message)
        report.notes.append(Note(ds.id, ds.masks_dir or str(folder), message))


def _probe_with_progress(todo, workers, dataset_id) -> dict[str, dict[str, Any]]:
    if not is_interactive() or len(todo) < 8:
        return probe_many(todo, workers)
    from rich.progress import Progress

    from job.report import console

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"probing {dataset_id}", total=len(todo))
        return probe_many(todo, workers, on_done=lambda *_: progress.advance(task))


def _mask_index(folder: Path) -> dict[str, str]:
    """Relative stem -> mask path, for masks (videos or images) under `folder` (an existing folder:
    `_masks_folder` checks it)."""
    out: dict[str, str] = {}
    for dirpath, _, names in os.walk(folder, followlinks=True):
        for name in sorted(names):
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            stem = os.path.splitext(full.relative_to(folder).as_posix())[0]
            out.setdefault(stem, str(full))
    return out


def _ensure_holdout(samples: list[Sample], fraction: float) -> list[Sample]:
    """With holdout_fraction > 0, hold out at least one clip (the lowest score) when there are 2+ clips."""
    if fraction <= 0 or any(s.is_holdout for s in samples):
        return samples
    clips = sorted({(s.dataset_id, s.relpath) for s in samples}, key=lambda c: (holdout_score(c[1]), c))
    if len(clips) < 2:
        return samples
    chosen = clips[0]
    log.info("holdout_fraction %.3f selected no clip; holding out %s/%s so the eval loss has data", fraction, *chosen)
    return [dataclasses.replace(s, is_holdout=True) if (s.dataset_id, s.relpath) == chosen else s for s in samples]


def _count(spec: JobSpec, samples: list[Sample], report: DataReport) -> dict[str, dict[str, Any]]:
    counts: dict[str, dict[str, Any]] = {}
    for ds in spec.data.active():
        mine = [s for s in samples if s.dataset_id == ds.id]
        train = [s for s in mine if not s.is_holdout]
        buckets: dict[str, int] = {}
        for s in train:
            buckets[s.bucket] = buckets.get(s.bucket, 0) + 1
        problems = report.problems_for(ds.id)
        clips_used = len({s.relpath for s in mine})
        counts[ds.id] = {
            "clips_found": clips_used + len(report.skipped_for(ds.id)) + sum(1 for p in problems if p.stage != "discovery"),
            "clips_used": clips_used,
            "samples": len(mine),
            "train_samples": len(train),
            "holdout_samples": len(mine) - len(train),
            "holdout_clips": len({s.relpath for s in mine if s.is_holdout}),
            "buckets": dict(sorted(buckets.items())),
            "repeats": ds.repeats,
            "epoch_samples": len(train) * (ds.repeats + 1),
            "too_short": len(report.skipped_for(ds.id, "too_short")),
            "too_small": len(report.skipped_for(ds.id, "too_small")),
            "no_caption": len(report.skipped_for(ds.id, "no_caption")),
            "problems": len(problems),
            "quarantined": sum(1 for p in problems if p.quarantined_to),
        }
    return counts


def usable_samples(bucket_counts: dict[str, int], repeats: int, batch_size: int) -> int:
    """Samples per epoch that fill whole batches: a bucket's partial last batch is dropped."""
    return sum((n * (repeats + 1)) // batch_size * batch_size for n in bucket_counts.values())


def repeats_needed(bucket_counts: dict[str, int], batch_size: int, need: int, start: int = 0) -> int | None:
    """The smallest `repeats` >= start with which the buckets fill `need` samples; None without samples."""
    if not bucket_counts or sum(bucket_counts.values()) == 0:
        return None
    repeats = start
    while usable_samples(bucket_counts, repeats, batch_size) < need:
        repeats += 1
    return repeats


def _check_sizes(spec: JobSpec, samples: list[Sample], counts: dict[str, dict[str, Any]]) -> None:
    tbs = spec.train.train_batch_size
    gas = spec.train.gradient_accumulation_steps
    vbs = spec.data.vae_batch_size
    need = max(tbs * gas, vbs)
    messages: list[str] = []
    fixes: list[str] = []
    index = {ds.id: i for i, ds in enumerate(spec.data.datasets)}
    for ds in spec.data.active():
        c = counts[ds.id]
        buckets = c["buckets"]
        usable = usable_samples(buckets, ds.repeats, tbs)
        if usable >= need:
            continue
        if not c["clips_found"] and not c["problems"]:  # nothing to weigh: say what is missing, plainly
            messages.append(f"no samples detected in dataset {ds.id!r}: its folder ({ds.source}) holds no video file "
                            f"({', '.join(sorted(VIDEO_EXTENSIONS))}; names starting with '.' are skipped)")
            fixes.append(f"put the clips in that folder (subfolders count), or point data.datasets[{index[ds.id]}].source "
                         "at the folder that holds them")
            continue
        per_bucket = ", ".join(f"{k}: {v}" for k, v in buckets.items()) or "none"
        why = (f"no samples detected in dataset {ds.id!r}: {c['train_samples']} training sample(s) (samples per bucket: {per_bucket}; "
               f"repeats {ds.repeats}) give {usable} usable per epoch, but at least {need} are needed "
               f"(train_batch_size {tbs} x gradient_accumulation_steps {gas}; vae_batch_size {vbs}; a bucket's samples only "
               f"count in whole batches of {tbs})")
        skipped = f"too short {c['too_short']}, too small {c['too_small']}, no caption {c['no_caption']}, broken {c['problems']}"
        messages.append(f"{why}. Clips left out: {skipped}.")
        fix = repeats_needed(buckets, tbs, need, ds.repeats + 1)
        if fix is None:
            fixes.append(f"dataset {ds.id!r} has no usable clip: see the data report ({skipped}); add clips, or relax "
                         "min_frames / minimum_image_size / missing_captions")
        else:
            fixes.append(f"set data.datasets[{index[ds.id]}].repeats: {fix} (each clip is then seen {fix + 1} times per epoch), "
                         "or add more clips")
    if messages:
        raise InputError("\n".join(messages), "; ".join(fixes))


# --------------------------------------------------------------------------------------------
# loading


def _check_unchanged(sample: Sample) -> None:
    try:
        st = os.stat(sample.path)
    except FileNotFoundError as exc:
        raise DecodeError(f"{sample.path}: the file disappeared after planning", reason="missing", path=sample.path) from exc
    except OSError as exc:
        raise DecodeError(f"{sample.path}: unreadable ({exc})", reason="unreadable", path=sample.path) from exc
    if (st.st_size, st.st_mtime_ns) != tuple(sample.fingerprint):
        raise DecodeError(f"{sample.path}: the file changed after planning (size or modification time differ)",
                          "run the job again: the clip is probed and planned anew", reason="changed", path=sample.path)


def load_frames(sample: Sample, *, threads: int = 0) -> np.ndarray:
    """uint8 frames [F, H, W, 3] of the sample, cropped/resized to its target size. Raises DecodeError."""
    _check_unchanged(sample)
    return decode_window(sample.path, sample.window, size=(sample.width, sample.height), crop=sample.crop_box,
                         rotation=sample.rotation, threads=threads)


def load_sample(sample: Sample, spec: JobSpec | None = None, *, threads: int = 0, dtype=None):
    """Float tensor [C=3, F, H, W] in [-1, 1] of the sample. Raises DecodeError (a picklable InputError).

    Stateless: safe in DataLoader workers. `spec` is accepted for symmetry with the planner; the
    sample already carries every decision. For i2v (`sample.is_i2v`) the condition image is
    `first_frame(video)`. `threads`: FFmpeg decoding threads (0 = FFmpeg's choice; with as many
    DataLoader workers as cores, 1 is best). `dtype`: float32 by default; bfloat16 halves memory.
    """
    return frames_to_tensor(load_frames(sample, threads=threads), dtype)


def first_frame(video):
    """The i2v condition: the window's first frame, [C, 1, H, W]."""
    return video[:, :1]


def load_i2v_sample(sample: Sample, spec: JobSpec | None = None, *, threads: int = 0):
    """(video [C, F, H, W], first frame [C, 1, H, W]), both in [-1, 1]."""
    video = load_sample(sample, spec, threads=threads)
    return video, first_frame(video).clone()


def record_decode_failure(spec: JobSpec, ws: Workspace, sample: Sample, error: DecodeError) -> Problem:
    """Report a clip that failed in the cache phase (call it in the main process, once per failure).

    Adds it to the data report, quarantines it when `delete_problematic_videos` is on (unless it
    only changed after planning), and marks it bad in the metadata cache until the file changes.
    """
    ds = next(d for d in spec.data.datasets if d.id == sample.dataset_id)
    root = ws.dataset_dir(ds)
    path = report_path(ws)
    report = DataReport.load(path)
    for existing in report.problems_for(ds.id):
        if existing.relpath == sample.relpath:
            return existing
    problem = Problem(ds.id, sample.relpath, error.reason, error.message, stage="decode")
    if error.reason != "changed":
        cache = MetadataCache(ws.metadata_cache(ds))
        cache.mark_bad(sample.relpath, error.reason, error.message)
        cache.save()
        if (root / sample.relpath).exists() or (root / sample.relpath).is_symlink():
            apply_quarantine(problem, root, spec.data.delete_problematic_videos)
    report.problems.append(problem)
    if ds.id in report.counts:
        report.counts[ds.id]["problems"] = report.counts[ds.id].get("problems", 0) + 1
    report.save(path)
    log.warning("clip %s/%s skipped: %s", ds.id, sample.relpath, error.message)
    event("data.problem", dataset=ds.id, path=sample.relpath, reason=error.reason, detail=error.message,
          stage="decode", quarantined_to=problem.quarantined_to)
    return problem


class SampleDataset:
    """A map-style torch Dataset over samples for the cache phase's DataLoader.

    Items are dicts: {'index', 'key', 'video' [C,F,H,W] | None, 'first_frame' (i2v) | None,
    'error': None | {'reason', 'message'}}. A broken clip becomes an item with an error instead of
    killing the worker; pass those to `record_decode_failure` in the main process.
    Use `collate_samples` as the DataLoader's collate_fn.
    """

    def __init__(self, samples: list[Sample], threads: int = 0):
        self.samples = list(samples)
        self.threads = threads

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        item: dict[str, Any] = {"index": index, "key": sample.key, "video": None, "first_frame": None, "error": None}
        try:
            video = load_sample(sample, threads=self.threads)
        except DecodeError as exc:
            item["error"] = {"reason": exc.reason, "message": exc.message}
            return item
        item["video"] = video
        if sample.is_i2v:
            item["first_frame"] = first_frame(video).clone()
        return item


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good items of a batch (one bucket: equal shapes); list the failed ones."""
    import torch

    good = [it for it in items if it["error"] is None]
    return {
        "indices": [it["index"] for it in good],
        "keys": [it["key"] for it in good],
        "video": torch.stack([it["video"] for it in good]) if good else None,
        "first_frame": torch.stack([it["first_frame"] for it in good]) if good and good[0]["first_frame"] is not None else None,
        "errors": [(it["index"], it["error"]) for it in items if it["error"] is not None],
    }


__all__ = ["Sample", "DataPlan", "plan_dataset", "load_sample", "load_frames", "load_i2v_sample", "first_frame",
           "record_decode_failure", "SampleDataset", "dataset_folder", "collate_samples", "holdout_score", "usable_samples", "repeats_needed",
           "QUARANTINE_DIR"]
