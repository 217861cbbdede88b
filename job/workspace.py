"""Where everything a job owns lives on disk.

One `Workspace` per job, built from the spec. Phases ask it for paths instead
of building their own, so a restarted container finds what an earlier run left.

    <workspace>/
      models/<name>/          pulled weights (base model, VAE, encoders)
      datasets/<id>/          pulled datasets (local sources are used in place)
      cache/text/...          text embeddings   (data.text_embeds.cache_dir)
      cache/vae/<id>/         latents per dataset (data.datasets[i].cache_dir_vae)
      cache/meta/<id>.json    video metadata cache (discovery)
      output/                 output.dir: checkpoints/, validation/, final/
      logs/events.jsonl       the JSON event log
      state/                  phase results (preflight.json, ...) and phase locks (cache.lock, train.lock)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from job.errors import InputError
from job.spec import JobSpec
from job.spec.data import VideoDataset


def is_remote(location: str) -> bool:
    return location.startswith(("hf://", "s3://"))


def local_name(location: str) -> str:
    """A stable, readable folder name for a remote location."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", location.split("://", 1)[-1]).strip("_")[-60:]
    digest = hashlib.sha256(location.encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


@dataclass(frozen=True)
class Workspace:
    root: Path
    spec: JobSpec

    @classmethod
    def for_spec(cls, spec: JobSpec, create: bool = True) -> "Workspace":
        root = Path(os.path.expanduser(spec.workspace)).absolute()
        ws = cls(root=root, spec=spec)
        if create:
            for folder in (ws.logs_dir, ws.state_dir, ws.output_dir):
                folder.mkdir(parents=True, exist_ok=True)
        return ws

    def resolve(self, path: str) -> Path:
        """A spec path: absolute as given, relative ones under the workspace."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.root / p

    # --- inputs -------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model_dir(self, location: str) -> Path:
        """Local folder of a model location (pulled copy for remote ones, `hf://` or bare Hub ids)."""
        if is_remote(location) or _is_bare_hub_id(location) and not self.resolve(location).exists():
            uri = location if is_remote(location) else f"hf://{location}"
            return self.models_dir / local_name(uri)
        return self.resolve(location.removeprefix("file://"))

    def dataset_dir(self, dataset: VideoDataset) -> Path:
        if is_remote(dataset.source):
            return self.root / "datasets" / f"{dataset.id}-{local_name(dataset.source)[-8:]}"
        return self.resolve(dataset.source.removeprefix("file://"))

    # --- caches -------------------------------------------------------------
    @property
    def text_cache_dir(self) -> Path:
        return self.resolve(self.spec.data.text_embeds.cache_dir)

    def latent_cache_dir(self, dataset: VideoDataset) -> Path:
        return self.resolve(dataset.cache_dir_vae or f"cache/vae/{dataset.id}")

    def metadata_cache(self, dataset: VideoDataset) -> Path:
        return self.root / "cache" / "meta" / f"{dataset.id}.json"

    @property
    def compile_cache_dir(self) -> Path:
        """torch.compile's kernel cache (TORCHINDUCTOR_CACHE_DIR): on the workspace volume, so a rerun or a
        resume after a restart skips most of the compile of the transformer blocks and the VAE encoder."""
        return self.root / "cache" / "compile"

    # --- outputs ------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return self.resolve(self.spec.output.dir)

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def validation_dir(self) -> Path:
        return self.output_dir / "validation"

    @property
    def final_dir(self) -> Path:
        return self.output_dir / "final"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def events_log(self) -> Path:
        return self.logs_dir / "events.jsonl"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    # --- locks --------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, *, holder: str, wait: bool, fix: str | None = None,
             on_wait: Callable[[Path], None] | None = None) -> Iterator[Path]:
        """Hold an exclusive lock on `state/<name>` (fcntl.flock) for the `with` block; yields the lock file.

        One phase of a kind per workspace at a time, across processes and containers sharing the volume.
        When another process holds it: `wait=False` raises InputError ("another <holder> is running on the
        workspace ... (it holds <file>)", with `fix`); `wait=True` calls `on_wait(file)` and blocks until it
        is free. The lock belongs to the open file, not to the file on disk: the OS drops it when its
        process dies (kill -9, OOM, a lost container), so a lock file left behind never blocks anyone and
        is never deleted. Two opens in one process conflict as two processes do (not reentrant). Not POSIX
        (no fcntl): no lock.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl
            except ImportError:  # not POSIX: no lock
                fcntl = None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    if not wait:
                        raise InputError(f"another {holder} is running on the workspace {self.root} (it holds {path})",
                                         fix) from None
                    if on_wait is not None:
                        on_wait(path)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield path
            finally:
                if fcntl is not None:
                    # explicit unlock: a child forked meanwhile (a DataLoader worker) shares this open file,
                    # and closing our descriptor alone would leave the lock held until that child exits
                    with contextlib.suppress(OSError):
                        fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _is_bare_hub_id(location: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", location))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem supports it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
