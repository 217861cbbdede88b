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
      state/                  phase results (preflight.json, ...)
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
