"""The cache phase (`trainer cache SPEC`): text embeddings and VAE latents, computed once.

    result = run_cache(spec, ws, prune=False)   # -> CacheResult (counts, time); also state/cache.json

Training reads only what this phase writes (`job.cache.format`, read by `job.cache.reader`).

What is cached
--------------
Text (`ws.text_cache_dir`, one `<caption_key>.safetensors` per distinct prompt), encoded with
`prompts.encode_prompts` exactly as `SanaVideoPipeline.encode_prompt` does (the spec's
`model.prompt` instruction and max length), in batches of `data.text_embeds.write_batch_size`:

- every caption of the data plan (with the motion-score suffix the planner already appended),
  keyed by `TextKeyContext.key(caption)`;
- the validation prompt and the prompt library (`validation_prompts(spec, ws)`), keyed the same way;
- the negative prompt and the empty prompt of caption dropout, encoded WITHOUT the instruction
  (as the pipeline encodes negatives), keyed by `negative_key(text)` / `empty_key()`.

Latents (`ws.latent_cache_dir(ds)`, one file per planned sample, see `latent_sample_key`):
`latents.encode_videos(vae, videos, sample=data.vae_latent_mode == "sample")` in batches of
`data.vae_batch_size` clips of one bucket, stored in `data.cache_dtype`. In `sample` mode each clip
draws its posterior sample from its own generator seeded from the sample's identity, so a rerun,
another batch size or another order gives the same latents. i2v samples also get
`first_frame_latents` (the mode of the first frame alone, as `SanaImageToVideoPipeline` encodes
its condition image); samples with a mask (`masks_dir`) get `mask` [1, F', H', W'] in [0, 1]
(the mask's frames averaged over each latent frame's pixel frames and over 8x8 pixels). With
`train.crepa.enabled`, each sample also gets `crepa_features` (`job.train.crepa.encode_frames`:
DINOv2 features of the same decoded frames, one frame per latent frame), and the encoder's identity
joins the cache key (turning CREPA on re-encodes; turning it off reuses the files as they are).

Keys, skips, stale items, orphans
---------------------------------
A text file's name is its key (prompt text + instruction hash + max length + text-encoder
identity, `format.caption_key`): an edited caption is a new key, computed once; the old file is
an orphan. A latent's cache key (`latent_key`) holds the source fingerprint (size + mtime), the
VAE identity (config + weight files), the bucket, frames, window start, frame rate, crop box,
rotation, latent mode, dtype and mask; it is stored in the file's metadata and in the manifest.
A rerun skips every item whose key is unchanged (without loading any model when nothing is left),
recomputes the ones whose key changed ("stale": other VAE, other frame count, edited clip), and
only rewrites the metadata of a latent whose caption changed (no re-encoding). Files that no
planned item uses (orphans) are dropped from the manifests, so training never sees them, and
deleted only with `prune=True`.

Crash safety: every file is written atomically (temporary name, fsync, rename), and so are the
manifests, which are rewritten at the start (without stale/orphan entries) and then every
`MANIFEST_FLUSH_SECONDS` and at the end. A file that reached disk carries its full cache key, so a
run killed between a file and the next manifest flush loses nothing: the rerun checks that
file's header and adopts it. A kill loses at most the batch in flight. Damage after the fact: a
rerun reads every cached file's header (not its tensors; a plain file's header also gives its
size), so a file cut short or with a broken header is recomputed ("stale"), not skipped. A
compressed file cut short keeps a readable header: it is found when training reads it, the reader
sets it aside (`job.cache.reader`) and the next run recomputes it. Tensor bytes changed in place,
at the same size, are not detected (there is no checksum: it would mean reading the whole cache on
every start); delete such a file to have it recomputed. Note
that a recomputed latent equals the first one only up to float rounding (~1e-7 on the CPU) unless it
is encoded in the same VAE batch: the VAE's output depends slightly on the batch it runs in.

Memory and speed: one model at a time. The text encoder is loaded, used and freed before the VAE is
loaded; the VAE is freed at the end. Both are loaded on the CPU and moved to the device only for
their stage (`memory.enable_model_cpu_offload` therefore changes nothing here). Clips are decoded
in DataLoader worker processes while the VAE encodes the previous batch, and files are compressed
and written by a thread pool, so decode, encode and write overlap. The workers run
`job.data.load_frames` (the decode/crop/resize half of `load_sample`) and ship uint8 frames; the
other half, the conversion to float in [-1, 1], runs on the device with the same float32 ops
(bit-identical input, a quarter of the bytes through shared memory, pinned memory and PCIe).
The VAE itself is then the bottleneck, so its encoder runs in channels-last layout
(`data.vae_channels_last`, default on) and, for buckets with many clips, compiled
(`data.vae_compile`, `job.cache.vae_speed`). Measured on an H100 (bench/cache_throughput.py,
bench/RESULTS.md), 81-frame 832x480 clips in bf16, steady state: 0.99 clips/s at vae_batch_size 1
(0.84 in NCDHW layout), 1.58 compiled, 1.28 at batch 2; latents within bf16 rounding of a plain
encode (bit-identical to it with `vae_channels_last: false`, compile off, batch 1).

Dtypes: on CUDA the text encoder runs in bf16 (the released checkpoint's dtype) and the VAE in
bf16 when `cache_dtype` is bf16 (the latents are stored in bf16 anyway), else fp32; on the CPU both
run in fp32. The compute dtype is recorded in each file but is not part of the key: moving a job
between machines does not invalidate its cache.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from job.errors import EnvironmentProblem, InputError
from job.report import console, event, is_interactive
from job.spec import JobSpec
from job.workspace import Workspace, atomic_write_text

from . import compression
from . import format as fmt
from .vae_speed import EncoderSpeed

log = logging.getLogger("trainer.cache")

#: Seconds between manifest rewrites during a run (a kill never loses written files: see the module doc).
MANIFEST_FLUSH_SECONDS = 30.0
#: Seconds between progress lines in the log (for headless containers).
PROGRESS_LOG_SECONDS = 30.0
#: File of the last run's result under `ws.state_dir`.
RESULT_FILE = "cache.json"
LOCK_FILE = "cache.lock"
#: Bump when the latent computation changes meaning: every latent becomes stale.
LATENT_SCHEME = "1"
#: cuDNN autotuning while the VAE encodes on CUDA. Off: on an H100 it changed nothing (0.84 clips/s
#: either way, bench/RESULTS.md), and without it the latents are bit-identical to a plain encode.
CUDNN_BENCHMARK = False

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


# ==============================================================================================
# results


@dataclass
class CacheCounts:
    """What happened to the items of one kind (text embeddings or latents)."""

    cached: int = 0  # computed for the first time
    stale: int = 0  # cached before under another key (other model, frames, caption...): recomputed
    rewritten: int = 0  # metadata or compression refreshed without recomputing
    skipped: int = 0  # already cached and unchanged
    failed: int = 0  # could not be computed (broken clip): reported, left out of the manifest
    orphans: int = 0  # files in the cache that no planned item uses
    removed: int = 0  # orphans deleted (prune=True)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.cached + self.stale + self.rewritten + self.skipped + self.failed


@dataclass
class CacheResult:
    """The outcome of `run_cache`; `cached`, `skipped`, ... are totals over text and latents."""

    text: CacheCounts = field(default_factory=CacheCounts)
    latents: CacheCounts = field(default_factory=CacheCounts)
    seconds: float = 0.0
    device: str = "cpu"
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def cached(self) -> int:
        return self.text.cached + self.latents.cached

    @property
    def skipped(self) -> int:
        return self.text.skipped + self.latents.skipped

    @property
    def stale_recomputed(self) -> int:
        return self.text.stale + self.latents.stale

    @property
    def failed(self) -> int:
        return self.text.failed + self.latents.failed

    @property
    def orphans(self) -> int:
        return self.text.orphans + self.latents.orphans

    @property
    def nothing_to_do(self) -> bool:
        return not (self.cached or self.stale_recomputed or self.text.rewritten or self.latents.rewritten or self.failed)

    def to_dict(self) -> dict[str, Any]:
        return {"text": asdict(self.text), "latents": asdict(self.latents), "seconds": round(self.seconds, 3),
                "device": self.device, "failures": self.failures,
                "totals": {"cached": self.cached, "skipped": self.skipped, "stale_recomputed": self.stale_recomputed,
                           "failed": self.failed, "orphans": self.orphans}}

    def print_summary(self, out=None) -> None:
        from rich.table import Table

        out = out or console
        table = Table(title=f"cache ({self.device}, {self.seconds:.1f} s)")
        for col in ("", "cached", "stale recomputed", "rewritten", "skipped", "failed", "orphans", "removed", "time"):
            table.add_column(col, justify="left" if not col else "right")
        for name, c in (("text embeddings", self.text), ("latents", self.latents)):
            table.add_row(name, str(c.cached), str(c.stale), str(c.rewritten), str(c.skipped), str(c.failed), str(c.orphans),
                          str(c.removed), f"{c.seconds:.1f} s")
        out.print(table)


# ==============================================================================================
# what to cache: prompts


def prompt_library(spec: JobSpec, ws: Workspace) -> dict[str, str]:
    """`validation.prompt_library`: the inline mapping, or the JSON file it names (nickname -> prompt)."""
    value = spec.validation.prompt_library
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    path = ws.resolve(value)
    fix = 'make validation.prompt_library a JSON file of {"nickname": "prompt", ...} (or an inline mapping)'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"the prompt library {path} does not exist", fix) from None
    except (OSError, UnicodeError, ValueError) as exc:
        raise InputError(f"the prompt library {path} is not readable JSON ({exc})", fix) from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in data.items()):
        raise InputError(f"the prompt library {path} must map nicknames to non-empty prompt strings", fix)
    return data


def validation_prompts(spec: JobSpec, ws: Workspace) -> dict[str, str]:
    """Name -> prompt of every validation render: `validation` (the primary prompt) and the library.

    The validation code looks their embeddings up with `text_key_context(spec, ws).key(prompt)`,
    and the negative prompt's with `.negative_key(spec.validation.negative_prompt)`.
    """
    return {"validation": spec.validation.prompt, **prompt_library(spec, ws)}


@dataclass
class TextItem:
    key: str
    text: str
    kind: str  # "prompt" (with the instruction) | "negative" (without)
    owners: list[str] = field(default_factory=list)


def plan_text(spec: JobSpec, ws: Workspace, samples: Iterable[Any], ctx: fmt.TextKeyContext) -> dict[str, TextItem]:
    """Every prompt to cache, by key. Owners name what uses each key (for stale counts)."""
    items: dict[str, TextItem] = {}

    def add(key: str, text: str, kind: str, owner: str) -> None:
        item = items.setdefault(key, TextItem(key, text, kind))
        if owner not in item.owners:
            item.owners.append(owner)

    for s in samples:
        add(ctx.key(s.caption), s.caption, "prompt", f"caption:{s.dataset_id}/{s.relpath}")
    for name, prompt in validation_prompts(spec, ws).items():
        add(ctx.key(prompt), prompt, "prompt", f"validation:{name}")
    add(ctx.negative_key(spec.validation.negative_prompt), spec.validation.negative_prompt, "negative", "negative")
    add(ctx.empty_key(), "", "negative", "empty")
    return items


# ==============================================================================================
# what to cache: latents


def latent_sample_key(sample) -> str:
    """File name (without suffix) of a planned sample: readable stem + start frame + a hash of its id."""
    import hashlib

    stem = os.path.splitext(sample.relpath)[0]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[-80:].strip("._-")
    if not slug or not slug[0].isalnum():
        slug = "c" + slug
    digest = hashlib.sha256(sample.key.encode("utf-8")).hexdigest()[:12]
    return fmt.check_sample_key(f"{slug}.f{int(sample.start_frame)}-{digest}")


def vae_location(spec: JobSpec, ws: Workspace) -> tuple[Path, Path | None]:
    """(base model folder, VAE path or None for the base model's own vae/)."""
    model_dir = ws.model_dir(spec.model.pretrained_model_name_or_path)
    vae = spec.model.pretrained_vae_model_name_or_path
    return model_dir, (ws.model_dir(vae) if vae else None)


def vae_identity(spec: JobSpec, ws: Workspace) -> str:
    """A stable identity of the VAE: its config and its weight files' names and sizes (no weight is read)."""
    import hashlib

    model_dir, vae_path = vae_location(spec, ws)
    root = vae_path if vae_path is not None else model_dir
    folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
    config = folder / "config.json"
    if not config.is_file():
        return f"path:{folder.absolute()}"
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix == ".json":
            h.update(f"{path.name}\0".encode() + path.read_bytes() + b"\0")
        elif path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
            h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    return h.hexdigest()[:32]


def sample_seed(sample) -> int:
    """The seed of a sample's posterior draw: from its identity only, the same on every run."""
    from job.data.sampler import stable_seed

    return stable_seed("vae-latent-sample", sample.key)


def latent_key(sample, spec: JobSpec, vae_id: str, crepa_id: str | None = None) -> dict[str, str]:
    """Everything that decides a sample's cached latents (all strings, stored in the file's metadata;
    no name may be one of the format's own metadata fields: caption_key, bucket, source, ...)."""
    key = {
        "scheme": LATENT_SCHEME,
        "fingerprint": f"{sample.fingerprint[0]}:{sample.fingerprint[1]}",  # size:mtime_ns of the clip
        "vae": vae_id,
        "bucket": sample.bucket,
        "frames": str(sample.num_frames),
        "start": f"{sample.start_time:.6f}",
        "fps": f"{sample.fps:.6f}",
        "crop": ",".join(str(int(v)) for v in sample.crop_box),
        "rotation": str(int(sample.rotation)),
        "latent_mode": spec.data.vae_latent_mode,
        "dtype": spec.data.cache_dtype,
        "i2v": "1" if sample.is_i2v else "0",
        "mask": _mask_fingerprint(sample.mask_path),
    }
    if spec.data.vae_latent_mode == "sample":
        key["seed"] = str(sample_seed(sample))
    if crepa_id:  # absent when CREPA is off, so files with features still match (they are read, never used)
        key["crepa"] = crepa_id
    return key


def _mask_fingerprint(path: str | None) -> str:
    if not path:
        return ""
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


# ==============================================================================================
# machinery


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA if available (the current device), else the CPU; an explicit device wins."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_num_workers() -> int:
    """DataLoader decode workers: the CPUs this process may use, minus two (main + writer), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 2))


def _workspace_lock(ws: Workspace, wait: bool = True) -> contextlib.AbstractContextManager[Path]:
    """One cache phase per workspace at a time; the OS drops the lock when its process dies (`Workspace.lock`).

    A second run (another container on the same volume, or every rank of a multi-GPU job) waits
    for the first and then finds everything cached, so it returns fast. `wait=False` refuses instead.
    """
    def waiting(path: Path) -> None:
        log.info("another cache phase is running on %s; waiting for it to finish", ws.root)
        event("cache.waiting", lock=str(path))

    return ws.lock(LOCK_FILE, holder="cache phase", wait=wait, on_wait=waiting,
                   fix="wait for it to finish, or stop it; two runs would write the same files")


def _remove_temporaries(folder: Path) -> None:
    """Leftovers of writes a killed run did not finish (`.<name>.<random>.tmp`): never whole files."""
    if not folder.is_dir():
        return
    for path in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()


def _file_state(path: Path) -> tuple[int, bool] | None:
    """(size, compressed) of a file, None if it does not exist."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    try:
        return size, compression.is_compressed(path)
    except OSError:
        return None


def _free(device: torch.device) -> None:
    """After a model's last reference is dropped: give its GPU memory back before the next model loads.

    On CUDA this collects reference cycles and empties the allocator's cache. On the CPU the
    weights go with their last reference; a full `gc.collect()` there would cost seconds in a
    big process and is left to Python's own collector.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class _Progress:
    """A rich progress bar (items/s, ETA) when interactive, and a log line + event every 30 s always."""

    def __init__(self, show: bool):
        self._bar = None
        self._tasks: dict[str, Any] = {}
        self._state: dict[str, dict[str, float]] = {}
        if show and is_interactive():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=False)
            self._bar.start()

    def add(self, name: str, total: int) -> None:
        self._state[name] = {"total": total, "done": 0, "start": time.monotonic(), "last": time.monotonic()}
        if self._bar is not None:
            self._tasks[name] = self._bar.add_task(name, total=total, rate="")

    def advance(self, name: str, n: int = 1) -> None:
        st = self._state[name]
        st["done"] += n
        now = time.monotonic()
        rate = st["done"] / max(now - st["start"], 1e-9)
        eta = (st["total"] - st["done"]) / rate if rate > 0 else float("inf")
        if self._bar is not None:
            self._bar.update(self._tasks[name], advance=n, rate=f"{rate:.2f} it/s")
        if now - st["last"] >= PROGRESS_LOG_SECONDS:
            st["last"] = now
            log.info("%s: %d/%d (%.2f items/s, ETA %s)", name, st["done"], st["total"], rate, _fmt_eta(eta))
            event("cache.progress", stage=name, done=int(st["done"]), total=int(st["total"]), items_per_s=round(rate, 3),
                  eta_s=None if eta == float("inf") else round(eta, 1))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _fmt_eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _Writer:
    """Compress + write files on a thread pool (zlib and file I/O release the GIL), bounded in flight."""

    def __init__(self, threads: int = 2, max_in_flight: int = 8):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-writer")
        self._in_flight: list[tuple[Future, Callable[[Any], None]]] = []
        self._max = max_in_flight

    def submit(self, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        self._in_flight.append((self._pool.submit(fn), done))
        self.collect(block=len(self._in_flight) > self._max)

    def collect(self, block: bool = False) -> None:
        """Run the `done` callbacks (in this thread) of finished writes; block: wait for the oldest."""
        while self._in_flight and (self._in_flight[0][0].done() or block):
            self._finish(*self._in_flight.pop(0))
            block = block and len(self._in_flight) > self._max

    def drain(self) -> None:
        while self._in_flight:
            self._finish(*self._in_flight.pop(0))

    @staticmethod
    def _finish(future: Future, done: Callable[[Any], None]) -> None:
        try:
            value = future.result()
        except OSError as exc:  # disk full, read-only volume, ...
            raise EnvironmentProblem(f"cannot write a cache file: {exc}",
                                     "free disk space on the workspace volume (or point the cache folders elsewhere) "
                                     "and run the cache phase again; what was written is kept") from exc
        done(value)

    def close(self, wait_for_writes: bool = True) -> None:
        try:
            if wait_for_writes:
                self.drain()
        finally:
            self._pool.shutdown(wait=True)


# ==============================================================================================
# the phase


def run_cache(spec: JobSpec, ws: Workspace, *, prune: bool = False, device: str | torch.device | None = None,
              num_workers: int | None = None, show: bool = True, plan=None) -> CacheResult:
    """Cache the text embeddings and latents of `spec` (see the module doc); returns the counts.

    `prune`: delete orphan files (cached files no planned item uses). `device`: default CUDA if
    available, else the CPU. `num_workers`: decode worker processes (default from the CPU count;
    0 decodes in this process). `plan`: a `DataPlan` already made (default: `plan_dataset`).
    Raises InputError for unusable data (from the planner); broken clips are reported, not fatal.
    """
    from job.data import plan_dataset

    t0 = time.monotonic()
    dev = pick_device(device)
    result = CacheResult(device=str(dev))
    with _workspace_lock(ws):
        if plan is None:
            plan = plan_dataset(spec, ws, show=show)
        _check_cache_dirs(spec, ws)
        event("cache.started", samples=len(plan.samples), device=str(dev), prune=prune,
              compress=spec.data.compress_disk_cache)
        progress = _Progress(show)
        try:
            _cache_text(spec, ws, plan, dev, result, progress, prune)
            _cache_latents(spec, ws, plan, dev, result, progress, prune,
                           default_num_workers() if num_workers is None else num_workers)
        finally:
            progress.close()
        result.seconds = time.monotonic() - t0
        atomic_write_text(ws.state_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=1) + "\n")
    event("cache.finished", **result.to_dict()["totals"], seconds=round(result.seconds, 3), device=str(dev))
    if show:
        result.print_summary()
    if result.nothing_to_do:
        log.info("cache: everything was already cached (%d text embeddings, %d latents)", result.text.skipped,
                 result.latents.skipped)
    if result.failed:
        log.warning("cache: %d clip(s) failed and are left out (see %s)", result.failed, ws.state_dir / "data_report.json")
    return result


def _check_cache_dirs(spec: JobSpec, ws: Workspace) -> None:
    seen: dict[Path, str] = {}
    for ds in spec.data.active():
        folder = ws.latent_cache_dir(ds).resolve()
        if folder in seen:
            raise InputError(f"datasets {seen[folder]!r} and {ds.id!r} use the same latent cache folder {folder}",
                             "give each dataset its own cache_dir_vae (or leave it unset)")
        if folder == ws.text_cache_dir.resolve():
            raise InputError(f"dataset {ds.id!r} caches its latents in the text-embedding folder {folder}",
                             "use different folders for data.text_embeds.cache_dir and cache_dir_vae")
        seen[folder] = ds.id


# ----------------------------------------------------------------------------------------------
# text


def _cache_text(spec: JobSpec, ws: Workspace, plan, dev: torch.device, result: CacheResult, progress: _Progress,
                prune: bool) -> None:
    t0 = time.monotonic()
    counts = result.text
    folder = ws.text_cache_dir
    folder.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(folder)
    ctx = fmt.text_key_context(spec, ws)
    items = plan_text(spec, ws, plan.samples, ctx)
    compress = spec.data.compress_disk_cache
    dtype_name = spec.data.cache_dtype
    want_dtype = _ST_DTYPES[dtype_name]

    old = _read_text_manifest(folder)
    old_owners: dict[str, str] = old.get("owners", {})

    todo: list[TextItem] = []
    rewrite: list[TextItem] = []
    entries: dict[str, dict] = {}
    stale_keys: set[str] = set()
    for key, item in items.items():
        path = fmt.text_path(folder, key)
        state = _file_state(path)
        was_other = any(old_owners.get(o) not in (None, key) for o in item.owners)
        if state is None:
            todo.append(item)
            if was_other:
                stale_keys.add(key)
            continue
        size, is_comp = state
        # The file's header is read either way (cheap): a file damaged since it was written is recomputed.
        valid = _text_file_valid(path, want_dtype, ctx.max_sequence_length)
        if not valid:
            todo.append(item)
            stale_keys.add(key)  # a file of that name with other contents (dtype, length, unreadable)
        elif is_comp != compress:
            rewrite.append(item)
            entries[key] = _text_entry(item, dtype_name, ctx.max_sequence_length, size, is_comp)
        else:
            counts.skipped += 1
            entries[key] = _text_entry(item, dtype_name, ctx.max_sequence_length, size, is_comp)

    orphan_paths = [p for p in folder.glob(f"*{fmt.SUFFIX}") if not p.name.startswith(".") and p.stem not in items]
    counts.orphans = len(orphan_paths)
    if prune:
        for p in orphan_paths:
            with contextlib.suppress(OSError):
                p.unlink()
                counts.removed += 1

    owners = {o: key for key, item in items.items() for o in item.owners}
    context = asdict(ctx)

    def flush() -> None:
        _write_text_manifest(folder, entries, owners, context)

    flush()
    if todo or rewrite:
        log.info("text embeddings: %d to encode, %d to rewrite, %d cached", len(todo), len(rewrite), counts.skipped)
    writer = _Writer(threads=2, max_in_flight=64)
    try:
        for item in rewrite:
            def do_rewrite(item=item):
                tensors, meta = compression.load(fmt.text_path(folder, item.key))
                path = compression.save(fmt.text_path(folder, item.key), tensors, meta, compress)
                return item, path.stat().st_size

            def rewritten(res):
                item, size = res
                entries[item.key] = _text_entry(item, dtype_name, ctx.max_sequence_length, size, compress)
                counts.rewritten += 1

            writer.submit(do_rewrite, rewritten)
        if todo:
            _encode_text(spec, ws, todo, dev, folder, compress, dtype_name, ctx, writer, entries, counts, stale_keys,
                         progress, flush)
        writer.drain()
    finally:
        try:
            writer.close(wait_for_writes=True)
        finally:
            flush()
    counts.seconds = time.monotonic() - t0
    event("cache.text_done", **{k: v for k, v in asdict(counts).items()})


def _text_entry(item: TextItem, dtype: str, length: int, size: int, compressed: bool) -> dict:
    return {"kind": item.kind, "text": item.text, "dtype": dtype, "length": length, "bytes": size,
            "compressed": compressed}


def _text_file_valid(path: Path, want_dtype: str, length: int) -> bool:
    try:
        info = compression.tensor_info(path)
    except InputError:
        return False
    embeds, mask = info.get(fmt.PROMPT_EMBEDS), info.get(fmt.PROMPT_ATTENTION_MASK)
    return bool(embeds and mask and embeds["dtype"] == want_dtype and embeds["shape"][:1] == [length]
                and mask["shape"] == [length])


def _read_text_manifest(folder: Path) -> dict:
    path = folder / fmt.MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as exc:
        log.warning("text-embedding manifest %s is unreadable (%s): checking every file instead", path, exc)
        return {}


def _write_text_manifest(folder: Path, entries: dict[str, dict], owners: dict[str, str], context: dict) -> None:
    payload = {"format_version": fmt.FORMAT_VERSION, "context": context,
               "prompts": dict(sorted(entries.items())),
               "owners": {o: k for o, k in sorted(owners.items()) if k in entries}}
    atomic_write_text(folder / fmt.MANIFEST_NAME, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


def _encode_text(spec, ws, todo: list[TextItem], dev, folder, compress, dtype_name, ctx, writer: _Writer,
                 entries, counts: CacheCounts, stale_keys: set[str], progress: _Progress, flush) -> None:
    from job.models.sanavideo.loading import load_components
    from job.models.sanavideo.prompts import encode_prompts, instruction_from_spec

    model_dir = ws.model_dir(spec.model.pretrained_model_name_or_path)
    te_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    log.info("loading the text encoder from %s (%s, %s)", model_dir, str(te_dtype).removeprefix("torch."), dev)
    parts = load_components(model_dir, parts={"text_encoder"}, dtype=te_dtype)
    text_encoder, tokenizer = parts.text_encoder, parts.tokenizer
    del parts
    text_encoder.to(dev)
    instruction = instruction_from_spec(spec.model.prompt.complex_human_instruction)
    max_len = spec.model.prompt.max_sequence_length
    batch_size = spec.data.text_embeds.write_batch_size
    store_dtype = _DTYPES[dtype_name]
    progress.add("text embeddings", len(todo))
    last_flush = time.monotonic()
    try:
        for kind in ("prompt", "negative"):
            group = [it for it in todo if it.kind == kind]
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                embeds, mask = encode_prompts(text_encoder, tokenizer, [it.text for it in batch], max_sequence_length=max_len,
                                              complex_human_instruction=instruction if kind == "prompt" else None,
                                              device=dev)
                embeds = embeds.to(store_dtype).cpu()
                mask = mask.cpu()
                for i, item in enumerate(batch):
                    def write(item=item, e=embeds[i].clone(), m=mask[i].clone()):
                        path = fmt.write_text_embedding(folder, item.key, e, m, kind=item.kind, compress=compress,
                                                                extra={"te_dtype": str(te_dtype).removeprefix("torch.")})
                        return item, path.stat().st_size

                    def written(res):
                        item, size = res
                        entries[item.key] = _text_entry(item, dtype_name, max_len, size, compress)
                        if item.key in stale_keys:
                            counts.stale += 1
                        else:
                            counts.cached += 1
                        progress.advance("text embeddings")

                    writer.submit(write, written)
                if time.monotonic() - last_flush > MANIFEST_FLUSH_SECONDS:
                    writer.collect()
                    flush()
                    last_flush = time.monotonic()
        writer.drain()
    finally:
        del text_encoder, tokenizer
        _free(dev)


# ----------------------------------------------------------------------------------------------
# latents


@dataclass
class _Planned:
    sample: Any
    sample_key: str
    cache_dir: Path
    key: dict[str, str]
    caption_key: str


def _cache_latents(spec: JobSpec, ws: Workspace, plan, dev: torch.device, result: CacheResult, progress: _Progress,
                   prune: bool, num_workers: int) -> None:
    t0 = time.monotonic()
    counts = result.latents
    ctx = fmt.text_key_context(spec, ws)
    vae_id = vae_identity(spec, ws)
    crepa_id = None
    if spec.train.crepa.enabled:
        from job.train.crepa import encoder_identity

        crepa_id = encoder_identity(spec, ws)
    compress = spec.data.compress_disk_cache

    datasets = {ds.id: ds for ds in spec.data.active()}
    planned: dict[str, list[_Planned]] = {ds_id: [] for ds_id in datasets}
    for s in plan.samples:
        ds = datasets[s.dataset_id]
        planned[s.dataset_id].append(_Planned(s, latent_sample_key(s), ws.latent_cache_dir(ds), latent_key(s, spec, vae_id, crepa_id),
                                              ctx.key(s.caption)))

    manifests: dict[str, dict[str, dict]] = {}
    todo: list[tuple[_Planned, bool]] = []  # (item, stale)
    relabel: list[_Planned] = []
    for ds_id, items in planned.items():
        folder = ws.latent_cache_dir(datasets[ds_id])
        folder.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(folder)
        try:
            old = fmt.read_manifest(folder)
        except InputError as exc:
            log.warning("%s; checking every file instead", exc)
            old = {}
        keep: dict[str, dict] = {}
        for item in items:
            status, entry = _latent_status(item, old.get(item.sample_key), compress)
            if status == "skip":
                keep[item.sample_key] = entry
                counts.skipped += 1
            elif status == "relabel":
                relabel.append(item)
            else:
                todo.append((item, status == "stale"))
        wanted = {it.sample_key for it in items}
        orphan_paths = [p for p in folder.glob(f"*{fmt.SUFFIX}") if not p.name.startswith(".") and p.stem not in wanted]
        counts.orphans += len(orphan_paths)
        if prune:
            for p in orphan_paths:
                with contextlib.suppress(OSError):
                    p.unlink()
                    counts.removed += 1
        manifests[ds_id] = keep

    def manifest_extra(ds_id: str) -> dict:
        return {"dataset": ds_id, "vae": vae_id, "latent_mode": spec.data.vae_latent_mode, "dtype": spec.data.cache_dtype,
                "compression": compression.CODEC if compress else None}

    def flush() -> None:
        for ds_id, entries in manifests.items():
            fmt.write_manifest(ws.latent_cache_dir(datasets[ds_id]), entries, **manifest_extra(ds_id))

    flush()  # from here on, the manifests list only files valid for this plan
    if todo or relabel:
        log.info("latents: %d to encode (%d stale), %d to rewrite, %d cached", len(todo), sum(st for _, st in todo),
                 len(relabel), counts.skipped)
    writer = _Writer(threads=2, max_in_flight=max(4, 2 * spec.data.vae_batch_size))
    try:
        for item in relabel:
            def do_relabel(item=item):
                tensors, meta = compression.load(fmt.sample_path(item.cache_dir, item.sample_key))
                meta.update(caption_key=item.caption_key, is_holdout="1" if item.sample.is_holdout else "0")
                path = compression.save(fmt.sample_path(item.cache_dir, item.sample_key), tensors, meta, compress)
                return item, path.stat().st_size

            def relabelled(res):
                item, size = res
                manifests[item.sample.dataset_id][item.sample_key] = _latent_entry(item, size, compress)
                counts.rewritten += 1

            writer.submit(do_relabel, relabelled)
        writer.drain()
        if todo:
            _encode_latents(spec, ws, todo, dev, compress, writer, manifests, counts, result, progress, flush,
                            num_workers)
        writer.drain()
    finally:
        try:
            writer.close(wait_for_writes=True)
        finally:
            flush()
    counts.seconds = time.monotonic() - t0
    event("cache.latents_done", **{k: v for k, v in asdict(counts).items()})


def _latent_entry(item: _Planned, size: int, compressed: bool) -> dict:
    entry = fmt.manifest_entry(item.sample_key, caption_key=item.caption_key, bucket=item.sample.bucket,
                               is_holdout=item.sample.is_holdout, key=item.key)
    entry.update(bytes=size, compressed=compressed, source=item.sample.relpath)
    return entry


def _latent_status(item: _Planned, entry: dict | None, compress: bool) -> tuple[str, dict | None]:
    """'skip' (with its manifest entry), 'relabel' (caption/holdout/compression changed), 'new' or 'stale'."""
    path = fmt.sample_path(item.cache_dir, item.sample_key)
    state = _file_state(path)
    if state is None:
        return ("stale" if entry is not None and entry.get("key") != item.key else "new"), None
    size, is_comp = state
    labels_ok = None
    if entry is not None and entry.get("bytes") == size and entry.get("key") == item.key:
        try:  # the header only (cheap): a file damaged since it was written is recomputed
            compression.read_header(path)
        except InputError:
            return "stale", None
        labels_ok = entry.get("caption_key") == item.caption_key and bool(entry.get("is_holdout")) == item.sample.is_holdout
    else:  # not (yet) in the manifest, e.g. written just before a kill: trust the file's own header
        try:
            meta = compression.read_metadata(path)
        except InputError:
            return "stale", None
        if any(meta.get(k) != v for k, v in item.key.items()):
            return "stale", None
        labels_ok = meta.get("caption_key") == item.caption_key and (meta.get("is_holdout") == "1") == item.sample.is_holdout
    if not labels_ok or is_comp != compress:
        return "relabel", None
    return "skip", _latent_entry(item, size, is_comp)


class _CacheItems(torch.utils.data.Dataset):
    """Decoded frames (and masks) of planned samples; runs in DataLoader worker processes.

    Items carry the uint8 frames of `job.data.load_frames` (the decode + crop + resize of
    `load_sample`, without its float conversion) as [F, H, W, 3]: a quarter of the bytes of
    `load_sample`'s float32 video through shared memory, pinning and the PCIe copy.
    `_to_video` then does `load_sample`'s conversion on the device, with the same float32
    operations, so the VAE sees bit-identical input. A broken clip becomes an item with an error
    (for `record_decode_failure` in the main process), a broken mask one with a mask error.
    """

    def __init__(self, samples: Sequence[Any], threads: int, temporal: int, spatial: int):
        self.samples = list(samples)
        self.threads = threads
        self.temporal = temporal
        self.spatial = spatial

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from job.data import DecodeError, load_frames

        sample = self.samples[index]
        item: dict[str, Any] = {"index": index, "frames": None, "mask": None, "error": None, "mask_error": None}
        try:
            item["frames"] = torch.from_numpy(load_frames(sample, threads=self.threads))
        except DecodeError as exc:
            item["error"] = {"reason": exc.reason, "message": exc.message}
            return item
        if sample.mask_path:
            try:
                item["mask"] = load_mask(sample, self.temporal, self.spatial)
            except Exception as exc:  # noqa: BLE001 - a broken mask fails its sample, never the run
                item["mask_error"] = f"{type(exc).__name__}: {exc}"
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good items of a batch (one bucket: equal shapes); list the failed ones."""
    good = [it for it in items if it["error"] is None and it["mask_error"] is None]
    return {
        "indices": [it["index"] for it in good],
        "frames": torch.stack([it["frames"] for it in good]) if good else None,  # uint8 [B, F, H, W, 3]
        "masks": [it["mask"] for it in good],
        "errors": [(it["index"], it["error"]) for it in items if it["error"] is not None],
        "mask_errors": [(it["index"], it["mask_error"]) for it in items if it["mask_error"] is not None],
    }


def _fit_workers(workers: int, todo: list[tuple[_Planned, bool]], batch_size: int, shm: str = "/dev/shm") -> int:
    """Fewer decode workers when shared memory cannot hold the batches they prefetch.

    Worker processes hand batches over through shared memory (/dev/shm): up to 2 prefetched
    batches per worker plus the one in use. Docker gives containers 64 MiB of it unless told
    otherwise (`--shm-size 8g` or `--ipc=host`); workers past that limit would die with a bus error.
    """
    if workers == 0:
        return 0
    largest = max(s.sample.width * s.sample.height * s.sample.num_frames * 3 for s, _ in todo) * batch_size
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return workers
    fit = max(0, int(free * 0.8) // largest - 1) // 2
    if fit < workers:
        log.warning("shared memory %s has %.0f MiB free, room for %d decode worker(s) of batches of %.0f MiB (wanted %d); "
                    "give the container more (docker run --shm-size 8g, or --ipc=host) for faster caching",
                    shm, free / 2**20, fit, largest / 2**20, workers)
        return fit
    return workers


def _to_video(frames: torch.Tensor, dev: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float32 [B, 3, F, H, W] in [-1, 1] on `dev`: `frames_to_tensor`'s ops.

    `channels_last`: stored NDHWC (the frames' own order, so no transpose), for a channels-last VAE."""
    video = frames.to(dev, non_blocking=True).permute(0, 4, 1, 2, 3)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    return video.to(torch.float32, memory_format=layout).div_(127.5).sub_(1.0)


def _batches(todo: list[tuple[_Planned, bool]], batch_size: int) -> list[list[int]]:
    """Indices into `todo`, `batch_size` at a time, never mixing buckets (or i2v with t2v)."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, (item, _) in enumerate(todo):
        groups.setdefault((item.sample.bucket, bool(item.sample.is_i2v)), []).append(i)
    out: list[list[int]] = []
    for key in sorted(groups):
        idx = groups[key]
        out.extend(idx[j:j + batch_size] for j in range(0, len(idx), batch_size))
    return out


def _encode_latents(spec, ws, todo: list[tuple[_Planned, bool]], dev, compress, writer: _Writer, manifests, counts,
                    result: CacheResult, progress: _Progress, flush, num_workers: int) -> None:
    from torch.utils.data import DataLoader

    from job.data import DecodeError, record_decode_failure
    from job.models.sanavideo.loading import load_components

    model_dir, vae_path = vae_location(spec, ws)
    vae_dtype = torch.bfloat16 if dev.type == "cuda" and spec.data.cache_dtype == "bf16" else torch.float32
    log.info("loading the VAE from %s (%s, %s)", vae_path or model_dir, str(vae_dtype).removeprefix("torch."), dev)
    vae = load_components(model_dir, vae_path=vae_path, parts={"vae"}, vae_dtype=vae_dtype).vae
    vae.to(dev)
    speed = EncoderSpeed(vae, spec.data, dev, dict(Counter(item.sample.bucket for item, _ in todo)))
    if speed.applied:
        log.info("VAE encoder speed-ups: %s", ", ".join(speed.applied))
    temporal = int(getattr(vae.config, "scale_factor_temporal", None) or 4)
    spatial = int(getattr(vae.config, "scale_factor_spatial", None) or 8)
    store_dtype = _DTYPES[spec.data.cache_dtype]
    sample_mode = spec.data.vae_latent_mode == "sample"
    info = {"vae_dtype": str(vae_dtype).removeprefix("torch."), **speed.info()}
    encoder = None
    if spec.train.crepa.enabled:
        from job.train import crepa

        encoder = crepa.load_encoder(spec, ws, dev, vae_dtype)

    samples = [item.sample for item, _ in todo]
    workers = _fit_workers(max(0, min(num_workers, len(todo))), todo, spec.data.vae_batch_size)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    threads = max(1, cpus // max(1, workers)) if workers else 0
    dataset = _CacheItems(samples, threads=threads, temporal=temporal, spatial=spatial)
    loader = DataLoader(dataset, batch_sampler=_batches(todo, spec.data.vae_batch_size), collate_fn=_collate,
                        num_workers=workers, pin_memory=dev.type == "cuda", prefetch_factor=2 if workers else None,
                        persistent_workers=False)
    progress.add("latents", len(todo))
    last_flush = time.monotonic()

    def fail(index: int, reason: str, message: str, decode: bool) -> None:
        item = todo[index][0]
        counts.failed += 1
        result.failures.append({"dataset": item.sample.dataset_id, "path": item.sample.relpath, "reason": reason,
                                "message": message})
        if decode:
            record_decode_failure(spec, ws, item.sample, DecodeError(message, reason=reason, path=item.sample.path))
        else:
            log.warning("sample %s/%s skipped: %s", item.sample.dataset_id, item.sample.relpath, message)
            event("cache.item_failed", dataset=item.sample.dataset_id, path=item.sample.relpath, reason=reason,
                  detail=message)
        progress.advance("latents")

    lanes = _EncodeLanes(vae, spec.data.vae_concurrent_batches, dev, speed)

    def encode(batch, lane) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batch through the VAE: on a lane (its own encoder copy and CUDA stream), or inline."""
        batch_samples = [todo[i][0].sample for i in batch["indices"]]
        speed.ready()
        with lanes.stream(lane):
            video = _to_video(batch["frames"], dev, channels_last=speed.channels_last)
            if lane is None:
                latents, first = speed.run(batch_samples[0].bucket, len(batch_samples),
                                           lambda: _encode_batch(vae, video, batch_samples, dev, sample_mode))
            else:
                latents, first = _encode_batch(lanes.vae(lane), video, batch_samples, dev, sample_mode)
            # on the lane's stream: the copy to the CPU waits for this batch's kernels only
            return latents.to(store_dtype).cpu(), None if first is None else first.to(store_dtype).cpu()

    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = CUDNN_BENCHMARK if dev.type == "cuda" else benchmark
    try:
        for batch in lanes.in_order(loader, encode, lambda batch: _route(batch, todo, speed)):
            for index, error in batch["errors"]:
                fail(index, error["reason"], error["message"], decode=True)
            for index, message in batch["mask_errors"]:
                fail(index, "mask", f"its mask {todo[index][0].sample.mask_path} cannot be read ({message})", decode=False)
            if batch["frames"] is None:
                continue
            indices = batch["indices"]
            latents, first = batch["encoded"]
            feats = None
            if encoder is not None:
                feats = crepa.encode_frames(encoder, batch["frames"], spec.train.crepa.encoder_image_size, temporal,
                                            crepa.feature_grid(*latents.shape[-2:])).to(store_dtype).cpu()
            del batch["frames"], batch["encoded"]
            # .contiguous(): a channels-last encoder returns NDHWC-strided latents; files store NCDHW
            latents = latents.contiguous()
            first = first.contiguous() if first is not None else None
            for j, index in enumerate(indices):
                item, stale = todo[index]
                mask = batch["masks"][j]

                def write(item=item, lat=latents[j].clone(), ff=None if first is None else first[j].clone(), mask=mask,
                          cf=None if feats is None else feats[j].clone()):
                    path = fmt.write_sample(
                        item.cache_dir, item.sample_key, lat, caption_key=item.caption_key, bucket=item.sample.bucket,
                        source=item.sample.relpath, is_holdout=item.sample.is_holdout, first_frame_latents=ff,
                        mask=None if mask is None else mask.to(store_dtype), extra={**item.key, **info}, compress=compress,
                        crepa_features=cf)
                    return path.stat().st_size

                def written(size, item=item, stale=stale):
                    manifests[item.sample.dataset_id][item.sample_key] = _latent_entry(item, size, compress)
                    if stale:
                        counts.stale += 1
                    else:
                        counts.cached += 1
                    progress.advance("latents")

                writer.submit(write, written)
            if time.monotonic() - last_flush > MANIFEST_FLUSH_SECONDS:
                writer.collect()
                flush()
                last_flush = time.monotonic()
        writer.drain()
    finally:
        torch.backends.cudnn.benchmark = benchmark
        lanes.close()
        del loader, vae, encoder, speed, lanes
        _free(dev)


#: Concurrent VAE lanes on the CPU: no gain there (the batches share the cores); the tests turn it on to
#: run the lanes' ordering and hand-over logic without a GPU.
LANES_ON_CPU = False


def _route(batch, todo, speed) -> bool:
    """Whether a batch may go to a concurrent lane: not for the compiled encoder (one graph, one VAE)."""
    if batch["frames"] is None:
        return False
    return not speed.uses_compile(todo[batch["indices"][0]][0].sample.bucket, len(batch["indices"]))


class _EncodeLanes:
    """`data.vae_concurrent_batches` batches encoded at the same time (CUDA only): each lane has its own
    copy of the VAE (the weights as prepared for the phase) and its own CUDA stream, and a thread that
    drives it. A batch is computed by the same kernels as when batches go one after another, so the
    latents are the same; the GPU overlaps one batch's memory-bound passes (norms, SiLU, pads, the
    cached-frame copies) with another's convolutions. Results come back in the loader's order."""

    def __init__(self, vae, count: int, dev: torch.device, speed):
        import copy
        from concurrent.futures import ThreadPoolExecutor

        self.count = count if dev.type == "cuda" or LANES_ON_CPU else 1
        self.vaes = [vae] + [copy.deepcopy(vae) for _ in range(self.count - 1)]
        self.streams = [torch.cuda.Stream(dev) for _ in range(self.count)] if self.count > 1 and dev.type == "cuda" else []
        self.pool = ThreadPoolExecutor(self.count, thread_name_prefix="vae-lane") if self.count > 1 else None
        if self.count > 1:
            log.info("VAE: %d batches encoded at once (data.vae_concurrent_batches), each on its own CUDA stream", self.count)
        self._speed = speed

    def vae(self, lane: int):
        return self.vaes[lane]

    def stream(self, lane: int | None):
        return torch.cuda.stream(self.streams[lane]) if lane is not None and self.streams else contextlib.nullcontext()

    def in_order(self, batches, encode, concurrent):
        """Yield each batch with `batch["encoded"]` = `encode(batch, lane)`, in order, at most `count` at work."""
        import collections

        pending: collections.deque = collections.deque()
        submitted = 0
        for batch in batches:
            if batch["frames"] is not None and self.pool is not None and concurrent(batch):
                lane = submitted % self.count  # the batch `count` places back on this lane has been collected
                submitted += 1
                pending.append((batch, self.pool.submit(encode, batch, lane)))
                while len(pending) >= self.count:
                    yield self._collect(*pending.popleft())
                continue
            while pending:  # keep the order: finish what is at work before an inline batch
                yield self._collect(*pending.popleft())
            if batch["frames"] is not None:
                batch["encoded"] = encode(batch, None)
            yield batch
        while pending:
            yield self._collect(*pending.popleft())

    @staticmethod
    def _collect(batch, future):
        batch["encoded"] = future.result()
        return batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.vaes.clear()


def _encode_batch(vae, video: torch.Tensor, samples: list, dev: torch.device,
                  sample_mode: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode one batch [B, 3, F, H, W] (and, for i2v, its first frames alone, by their mode, as
    `SanaImageToVideoPipeline` encodes its condition image). On a CUDA out-of-memory error, retry
    clip by clip, then give a clear error."""
    from job.models.sanavideo.latents import encode_videos

    def run(v: torch.Tensor, ss: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        gens = [torch.Generator(device=dev).manual_seed(sample_seed(s)) for s in ss] if sample_mode else None
        lat = encode_videos(vae, v, sample=sample_mode, generator=gens)
        first = encode_videos(vae, v[:, :, :1].contiguous(), sample=False) if ss[0].is_i2v else None
        return lat, first

    try:
        return run(video, samples)
    except torch.OutOfMemoryError as exc:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if video.shape[0] > 1:
            log.warning("the VAE ran out of memory on a batch of %d clips; encoding them one at a time", video.shape[0])
            parts = [run(video[i:i + 1], samples[i:i + 1]) for i in range(video.shape[0])]
            lat = torch.cat([p[0] for p in parts])
            first = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
            return lat, first
        _, _, frames, height, width = video.shape
        raise EnvironmentProblem(
            f"the VAE ran out of GPU memory encoding one {width}x{height} clip of {frames} frames",
            "lower data.vae_batch_size to 1, lower the resolution or num_frames, or free the GPU of other processes") from exc


# ----------------------------------------------------------------------------------------------
# masks


def load_mask(sample, temporal: int = 4, spatial: int = 8) -> torch.Tensor:
    """A sample's mask at latent resolution: float [1, F', H', W'] in [0, 1] (1 = counts in the loss).

    The mask file (an image: the same mask for every frame; or a video: the same window as the
    clip) gets the clip's crop and resize; white is 1, or, for an image or video with transparency, opaque. Each latent frame averages its pixel frames
    (the first alone, then groups of `temporal`), each latent pixel its `spatial` x `spatial` block.
    """
    import numpy as np

    path = sample.mask_path
    w, h = sample.width, sample.height
    if os.path.splitext(path)[1].lower() in _IMAGE_EXTENSIONS:
        from PIL import Image

        with Image.open(path) as img:
            # an image with transparency is a cut-out: its alpha channel is the mask (opaque counts)
            rgba = img.convert("RGBA") if "A" in img.getbands() or "transparency" in img.info else None
            alpha = rgba.getchannel("A") if rgba is not None else None
            gray = alpha if alpha is not None and alpha.getextrema()[0] < 255 else img.convert("L")
            sx, sy = gray.width / sample.source_width, gray.height / sample.source_height
            left, top, cw, ch = sample.crop_box
            box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
            frame = np.asarray(gray.resize((w, h), Image.Resampling.BOX, box=box), dtype=np.float32) / 255.0
        pixels = torch.from_numpy(frame)[None].expand(sample.num_frames, h, w)
    else:
        from job.data.decode import Window, decode_window, has_alpha
        from job.data.probe import probe_video

        meta = probe_video(path)
        if not meta.get("ok"):
            raise ValueError(f"{meta.get('reason')}: {meta.get('detail')}")
        rotation = int(meta.get("rotation", 0))
        mw, mh = (meta["height"], meta["width"]) if rotation % 180 else (meta["width"], meta["height"])
        sx, sy = mw / sample.source_width, mh / sample.source_height
        left, top, cw, ch = sample.crop_box
        crop = (round(left * sx), round(top * sy), max(1, round(cw * sx)), max(1, round(ch * sy)))
        window = Window(sample.start_time, sample.num_frames, sample.fps, float(meta["fps"]), float(meta.get("start_time", 0.0)))
        # a video with transparency is a cut-out, like an image: its alpha channel is the mask (opaque counts)
        alpha = decode_window(path, window, size=(w, h), crop=crop, rotation=rotation, alpha=True) if has_alpha(path) else None
        if alpha is not None and int(alpha.min()) < 255:
            pixels = torch.from_numpy(alpha.astype(np.float32) / 255.0)
        else:
            frames = decode_window(path, window, size=(w, h), crop=crop, rotation=rotation)
            pixels = torch.from_numpy(frames.astype(np.float32).mean(axis=-1) / 255.0)
    return mask_to_latent(pixels, temporal, spatial)


def mask_to_latent(pixels: torch.Tensor, temporal: int = 4, spatial: int = 8) -> torch.Tensor:
    """Pixel mask [F, H, W] (F = k*temporal + 1) -> latent mask [1, F', H/spatial, W/spatial]."""
    frames = pixels.shape[0]
    if (frames - 1) % temporal:
        raise ValueError(f"{frames} mask frames is not of the form {temporal}k+1")
    groups = [pixels[:1].mean(0)] + [pixels[1 + i:1 + i + temporal].mean(0) for i in range(0, frames - 1, temporal)]
    stacked = torch.stack(groups)[None]  # [1, F', H, W]
    return torch.nn.functional.avg_pool2d(stacked, spatial).clamp_(0.0, 1.0).contiguous()
