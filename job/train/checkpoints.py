"""Checkpoint folders: atomic, rotated, resumable.

    checkpoints/
      step_000100/            a complete checkpoint (has COMPLETE)
        COMPLETE              written last; its presence is what makes the folder count
        state.json            step, epoch, sampler position, counters, spec hash, world size
        transformer/          full fine-tune: diffusers layout (loads with from_pretrained)
        pytorch_lora_weights.safetensors   LoRA: loads with SanaVideoPipeline.load_lora_weights
        optimizer.pt  scheduler.pt  ema.pt (with use_ema)  rng_0.pt ... (one per process)
      .tmp-step_000200/       being written (or left by a kill): never read, removed on the next save

A save writes into `.tmp-step_N`, fsyncs every file, renames it to `step_N`, then writes
`COMPLETE`. `latest` is the highest-numbered folder that has the marker, so a kill at any moment
leaves the previous checkpoint usable. Rotation keeps the newest `total_limit` complete
checkpoints and removes incomplete leftovers; it never removes the newest complete one.

The marker also lists every file with its size and CRC-32, read back at commit (zlib.crc32 runs
at about 2.5 GB/s on one core: some 8 s for the ~20 GB of a 2B full fine-tune's checkpoint with
AdamW states, a fraction of a second for a LoRA), and read again once when resuming. Resuming
from `latest` checks them (`damage`): a checkpoint whose files were changed or cut short after
it was written (a bad disk, a copy that stopped half-way) is skipped with a warning naming the
file, and the job resumes from the previous complete checkpoint (or from the start if there is
none). Markers of older versions, without the list, are trusted as before.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from job.errors import InputError
from job.workspace import fsync_dir, atomic_write_text

log = logging.getLogger("trainer.train")

COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-"
SET_ASIDE = "set-aside"  # checkpoints of another history (see CheckpointStore.set_aside_after)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (and `folder` itself)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def file_crc32(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def file_list(folder: Path) -> dict[str, dict[str, int]]:
    """relative path -> {"bytes", "crc32"} of every file under `folder` (what COMPLETE records)."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "crc32": file_crc32(path)}
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)}


def damage(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint's files, or None (as written, or a marker of an older
    version without the file list). Reads every file once."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError) as exc:
        return f"its {COMPLETE} marker is unreadable ({exc})"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        return None
    for name, expected in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != expected.get("bytes"):
            return f"{name} is {size} bytes, {expected.get('bytes')} were written"
        if file_crc32(path) != expected.get("crc32"):
            return f"{name} does not hold what was written (CRC-32 mismatch)"
    return None


class CheckpointStore:
    def __init__(self, root: Path, total_limit: int | None = None):
        self.root = Path(root)
        self.total_limit = total_limit

    def complete(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(checkpoint_step(p), p) for p in self.root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
        return sorted((s, p) for s, p in found if is_complete(p))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def latest_intact(self) -> Path | None:
        """The newest complete checkpoint whose files are as written (see `damage`); each damaged
        newer one is skipped with a warning. None when there is none."""
        for _, path in reversed(self.complete()):
            problem = damage(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged: %s; it is skipped, the job resumes from the previous complete "
                        "checkpoint (or from the start if there is none)", path, problem)
        return None

    def incomplete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (
            p.name.startswith(TMP_PREFIX) or (checkpoint_step(p) is not None and not is_complete(p))))

    def tmp_dir(self, step: int) -> Path:
        return self.root / f"{TMP_PREFIX}{step_dir_name(step)}"

    def begin(self, step: int) -> Path:
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int) -> Path:
        """fsync `tmp`, rename it to `step_N`, then write the COMPLETE marker."""
        fsync_tree(tmp)
        final = self.root / step_dir_name(step)
        old = None
        if final.exists():  # an incomplete leftover, or a checkpoint of the same step being replaced
            old = self.root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
            if is_complete(final):
                (final / COMPLETE).unlink()
                fsync_dir(final)
            os.replace(final, old)
        files = file_list(tmp)
        os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(final / COMPLETE, json.dumps({"step": step, "time": round(time.time(), 3), "files": files}) + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def rotate(self) -> list[Path]:
        """Remove incomplete leftovers and the oldest complete checkpoints beyond `total_limit`."""
        removed = []
        for path in self.incomplete():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        done = self.complete()
        if self.total_limit is not None and len(done) > self.total_limit:
            for _, path in done[: len(done) - max(self.total_limit, 1)]:
                (path / COMPLETE).unlink(missing_ok=True)  # incomplete first, so a crash mid-delete is harmless
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def set_aside_after(self, step: int) -> list[Path]:
        """Move the complete checkpoints numbered above `step` into `set-aside/`, returning their new paths.

        A run resuming from `step` (`latest` skipped damaged newer ones, or an earlier checkpoint was named)
        starts another history. Left in place, those newer folders would outrank its checkpoints: rotation
        (which keeps the highest steps) would delete each new checkpoint in their favour, and a later `latest`
        would resume them. They are moved, not deleted: they are the user's.
        """
        moved = []
        for found, path in self.complete():
            if found <= step:
                continue
            dest = self.root / SET_ASIDE / path.name
            if dest.exists():
                dest = dest.with_name(f"{path.name}-{time.time_ns()}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            moved.append(dest)
        if moved:
            fsync_dir(self.root)
        return moved

    def resolve(self, value: str, resolve_path) -> Path | None:
        """`checkpoints.resume_from_checkpoint` -> the folder to resume from (None = start fresh)."""
        if value == "none":
            return None
        if value == "latest":
            return self.latest_intact()
        path = resolve_path(value)
        if not path.is_dir():
            raise InputError(f"checkpoints.resume_from_checkpoint {value!r}: {path} does not exist",
                             "use 'latest', 'none', or the path of a checkpoint folder (step_NNNNNN)")
        if not is_complete(path):
            raise InputError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): it was interrupted while being written",
                             "resume from an earlier checkpoint, or use 'latest' (which skips incomplete ones)")
        problem = damage(path)
        if problem is not None:
            raise InputError(f"checkpoint {path} is damaged: {problem}",
                             "resume from an earlier checkpoint, or use 'latest' (which skips damaged ones)")
        return path


# --- RNG states -------------------------------------------------------------------------------


def capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _to_tuple(value):
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


def save_pt(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def load_pt(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"checkpoint file {path} is missing", "resume from another checkpoint, or set checkpoints.resume_from_checkpoint: none")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"checkpoint {folder} has no readable state.json ({exc})",
                         "resume from another checkpoint, or set checkpoints.resume_from_checkpoint: none") from exc
