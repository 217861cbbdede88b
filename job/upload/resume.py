"""Remote resume: continue from the newest complete checkpoint, local or in `output.push_to`.

A rented GPU can come back on another machine with an empty disk. With
`checkpoints.resume_from_checkpoint: latest` and `output.push_to` set, the train phase first looks
for the newest complete checkpoint in the store (one with its `COMPLETE` marker: a folder whose
upload was cut off is never used). When it is newer than the newest complete local one it is
downloaded into `.tmp-step_N` (a name local rotation removes if this download is killed), renamed
to `step_N`, and only then marked `COMPLETE` locally; training then resumes from it as from any
local checkpoint.

This runs at the start of the train phase, not at the end of pull: `trainer train SPEC` on its
own must resume the same way, and pull fetches the job's inputs, while a checkpoint is the train
phase's own state (its spec hash and step are only meaningful to it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from job.report import console, event
from job.storage import Storage
from job.train.checkpoints import COMPLETE, TMP_PREFIX, CheckpointStore, checkpoint_step, step_dir_name
from job.workspace import atomic_write_text, fsync_dir

from .remote import newest_complete, open_push_store

log = logging.getLogger("trainer.upload")


def remote_resume_wanted(spec) -> bool:
    return bool(spec.output.push_to) and spec.checkpoints.resume_from_checkpoint == "latest"


def fetch_newer_remote_checkpoint(spec, ws, store: Storage | None = None) -> Path | None:
    """Download the newest complete remote checkpoint when it is newer than every complete local
    one. Returns the local folder it now is in, or None when the local state is as new."""
    if not remote_resume_wanted(spec):
        return None
    local_store = CheckpointStore(ws.checkpoints_dir, spec.checkpoints.total_limit)
    local = local_store.latest()
    local_step = checkpoint_step(local) if local is not None else -1
    own = store is None
    store = store or open_push_store(spec)
    try:
        remote = newest_complete(store)
        if remote is None or remote.step <= local_step:
            if remote is not None:
                log.info("remote checkpoint step %d is not newer than the local step %d: resuming locally", remote.step, local_step)
            return None
        started = time.monotonic()
        target = download_checkpoint(store, remote.path, local_store.root, remote.step)
    finally:
        if own:
            store.close()
    seconds = round(time.monotonic() - started, 2)
    event("checkpoint_downloaded", step=remote.step, source=store.display(remote.path), seconds=seconds)
    console.print(f"train: resuming from the remote checkpoint {store.display(remote.path)} "
                  f"(step {remote.step}; newest local: {local.name if local else 'none'})")
    return target


def download_checkpoint(store: Storage, remote_dir: str, root: Path, step: int) -> Path:
    """Mirror a remote checkpoint folder into `root/step_N`, atomically; the marker last."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"  # kept across a kill: files already there are skipped
    store.download_folder(remote_dir, tmp, exclude=[COMPLETE], progress=False)
    final = root / step_dir_name(step)
    if final.exists():  # an incomplete local folder of the same step (its marker is missing)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(final / COMPLETE, json.dumps({"step": step, "time": round(time.time(), 3),
                                                    "source": store.display(remote_dir)}) + "\n")
    return final
