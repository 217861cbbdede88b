"""The `output.push_to` store and the checkpoint layout inside it.

    <push_to>/
      checkpoints/step_000300/...      a checkpoint folder, file for file as written locally
      checkpoints/step_000300/COMPLETE uploaded last: only a folder with it is ever used to resume
      final/ validation/ logs/ spec.yaml README.md training_loss.svg

Shared by the background checkpoint uploader, remote resume and the upload phase, so the three
agree on what "complete" means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from job.storage import RemoteFile, RemoteNotFound, RetryPolicy, S3Options, Storage, open_storage
from job.train.checkpoints import COMPLETE, step_dir_name

CHECKPOINTS = "checkpoints"
_REMOTE_STEP = re.compile(r"^checkpoints/(step_(\d+))/(.+)$")


def retry_policy() -> RetryPolicy:
    """The retry policy of every push_to call (tests replace this function to retry in milliseconds)."""
    return RetryPolicy()


def open_push_store(spec) -> Storage:
    s3 = spec.storage.s3
    options = S3Options(endpoint_url=s3.endpoint_url, region=s3.region, addressing_style=s3.addressing_style)
    return open_storage(spec.output.push_to, options, retry=retry_policy())


def remote_checkpoint_dir(step: int) -> str:
    return f"{CHECKPOINTS}/{step_dir_name(step)}"


@dataclass(frozen=True)
class RemoteCheckpoint:
    step: int
    path: str  # store path of the folder, e.g. checkpoints/step_000300
    complete: bool  # the COMPLETE marker is there
    files: int  # files in the folder, marker included


def list_or_empty(store: Storage, prefix: str) -> list[RemoteFile]:
    """The files under `prefix`; none when the repo (or bucket prefix) does not exist yet."""
    try:
        return store.list(prefix)
    except RemoteNotFound:
        return []


def remote_checkpoints(store: Storage) -> list[RemoteCheckpoint]:
    """Every checkpoint folder under `checkpoints/`, oldest first (complete or not)."""
    found: dict[int, dict] = {}
    for f in list_or_empty(store, CHECKPOINTS):
        match = _REMOTE_STEP.match(f.path)
        if not match:
            continue
        step = int(match.group(2))
        entry = found.setdefault(step, {"complete": False, "files": 0})
        entry["files"] += 1
        entry["complete"] |= match.group(3) == COMPLETE
    return [RemoteCheckpoint(step, remote_checkpoint_dir(step), e["complete"], e["files"]) for step, e in sorted(found.items())]


def newest_complete(store: Storage) -> RemoteCheckpoint | None:
    done = [c for c in remote_checkpoints(store) if c.complete]
    return done[-1] if done else None
