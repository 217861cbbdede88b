"""Checkpoints to `output.push_to` in the background, while training goes on.

    uploader = CheckpointUploader(spec)
    hooks.on_checkpoint.append(uploader.submit)   # returns at once
    ...
    uploader.drain(timeout=spec.output.upload.grace_seconds)   # on a stop signal
    uploader.close()

- One worker thread, at most one upload in flight. A checkpoint submitted while another is being
  uploaded waits; a newer one replaces a waiting older one (the newest wins: on preemption the
  newest state is what matters, and a slow link must not build a backlog).
- Each checkpoint is uploaded file by file (skipping files already there with the same size and
  checksum), then its `COMPLETE` marker last: a remote folder without the marker is never used.
- A failed upload (after the storage retries) is logged as a warning and an `upload_failed`
  event, kept, and tried again after `retry_interval` seconds or when `drain` is called, unless
  a newer checkpoint replaced it meanwhile. Training is never stopped by an upload.
- After a checkpoint is complete remotely, older remote checkpoints beyond
  `checkpoints.total_limit` (and unfinished leftovers of killed uploads) are removed, the marker
  first, so a crash halfway through a removal leaves an incomplete folder, never a wrong one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from job.report import event
from job.storage import Storage
from job.train.checkpoints import COMPLETE, is_complete

from .remote import open_push_store, remote_checkpoint_dir, remote_checkpoints

log = logging.getLogger("trainer.upload")


class CheckpointGone(Exception):
    """The local checkpoint was rotated away before its upload finished (a newer one exists)."""


def upload_checkpoint(store: Storage, folder: Path, step: int) -> int:
    """Upload one complete local checkpoint folder, marker last. Returns the number of files."""
    dest = remote_checkpoint_dir(step)
    if not is_complete(folder):
        raise CheckpointGone(f"{folder} is no longer a complete checkpoint")
    files = store.upload_folder(folder, dest, exclude=[COMPLETE], progress=False)
    if not is_complete(folder):  # rotated while uploading: some files may be missing remotely
        raise CheckpointGone(f"{folder} was removed while it was being uploaded")
    store.upload_file(folder / COMPLETE, f"{dest}/{COMPLETE}", progress=False)
    return len(files) + 1


def rotate_remote(store: Storage, total_limit: int | None, newest_step: int) -> list[str]:
    """Remove remote checkpoints older than the newest `total_limit` complete ones, and unfinished
    folders older than `newest_step`. Never removes the newest complete checkpoint."""
    found = remote_checkpoints(store)
    complete = [c for c in found if c.complete]
    doomed = [c for c in found if not c.complete and c.step < newest_step]
    if total_limit is not None and len(complete) > max(total_limit, 1):
        doomed += complete[: len(complete) - max(total_limit, 1)]
    removed = []
    for c in sorted(doomed, key=lambda c: c.step):
        if c.complete:
            store.delete(f"{c.path}/{COMPLETE}")
        store.delete(c.path)
        removed.append(c.path)
    return removed


class _SilenceThread(logging.Filter):
    def __init__(self, thread_name: str):
        super().__init__()
        self.thread_name = thread_name

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != self.thread_name


@dataclass
class _Item:
    folder: Path
    step: int


class CheckpointUploader:
    """See the module docstring. `open_store` is called once, in the worker thread."""

    def __init__(self, spec, open_store: Callable[[], Storage] | None = None, *, retry_interval: float = 60.0):
        self._open_store = open_store or (lambda: open_push_store(spec))
        self.target = spec.output.push_to
        self.total_limit = spec.checkpoints.total_limit
        self.retry_interval = retry_interval
        self._cond = threading.Condition()
        self._pending: _Item | None = None
        self._in_flight: _Item | None = None
        self._hurry = False  # drain(): retry failures now, once, instead of after retry_interval
        self._closed = False
        self._thread: threading.Thread | None = None
        self._store: Storage | None = None
        self.uploaded: list[int] = []
        self.failed: dict[int, str] = {}  # step -> last error, for checkpoints not uploaded (yet)
        self.newest_submitted: int | None = None
        self._thread_name = f"checkpoint-upload-{id(self):x}"

    # --- the training side ---------------------------------------------------------------------
    def submit(self, folder: Path, step: int) -> None:
        """Queue a complete local checkpoint; returns at once. Replaces a queued older one."""
        with self._cond:
            if self._closed:
                raise RuntimeError("CheckpointUploader.submit after close")
            if self._pending is not None and self._pending.step != step:
                log.info("checkpoint step %d is replaced in the upload queue by step %d", self._pending.step, step)
            self._pending = _Item(Path(folder), step)
            self.newest_submitted = step
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the newest submitted checkpoint is uploaded, or failed once more without
        waiting for retry_interval, or `timeout` seconds passed. True when it is uploaded."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            while self._pending is not None or self._in_flight is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return self.complete

    @property
    def complete(self) -> bool:
        """Nothing waiting and the newest submitted checkpoint is uploaded (or none was submitted)."""
        return (self._pending is None and self._in_flight is None
                and (self.newest_submitted is None or self.newest_submitted in self.uploaded))

    @property
    def busy(self) -> bool:
        """An upload is queued or in flight."""
        return self._pending is not None or self._in_flight is not None

    def close(self) -> None:
        """Stop the worker after its current upload (which finishes, or is cut off at exit: the
        marker is written last, so a cut-off upload is simply incomplete). From now on the worker
        logs nothing: a daemon thread writing to stderr while the interpreter shuts down can abort
        the process, and a preempted job must still exit 0."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread.is_alive():
            quiet = _SilenceThread(self._thread_name)
            for name in ("trainer.storage", "trainer.upload"):
                logging.getLogger(name).addFilter(quiet)

    def outstanding(self) -> str | None:
        """A sentence about the newest checkpoint not uploaded, or None."""
        if self.complete:
            return None
        step = self.newest_submitted
        why = self.failed.get(step, "its upload did not finish in time")
        return f"checkpoint step {step} was not uploaded to {self.target}: {why}"

    # --- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                item, self._pending, self._in_flight = self._pending, None, self._pending
            ok = self._upload(item)
            with self._cond:
                self._in_flight = None
                retry = not ok and self._pending is None and not self._hurry and not self._closed and item.folder.is_dir()
                if retry:
                    self._pending = item
                    until = time.monotonic() + self.retry_interval
                    self._cond.notify_all()
                    # Wait before trying again, unless a newer checkpoint arrives, drain() asks, or close().
                    while (self._pending is item and not self._hurry and not self._closed
                           and (left := until - time.monotonic()) > 0):
                        self._cond.wait(left)
                self._cond.notify_all()

    def _upload(self, item: _Item) -> bool:
        started = time.monotonic()
        try:
            if self._store is None:
                self._store = self._open_store()
            files = upload_checkpoint(self._store, item.folder, item.step)
        except CheckpointGone as exc:
            log.info("checkpoint step %d not uploaded: %s", item.step, exc)
            self.failed[item.step] = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - an upload must never stop training; it is reported
            message = str(exc) or type(exc).__name__
            self.failed[item.step] = message
            log.warning("upload of checkpoint step %d failed (%s); it stays in %s and is tried again later",
                        item.step, message, item.folder)
            event("upload_failed", what="checkpoint", step=item.step, target=self.target, error=message)
            return False
        self.failed.pop(item.step, None)
        self.uploaded.append(item.step)
        seconds = round(time.monotonic() - started, 3)
        log.info("checkpoint step %d uploaded to %s (%d files, %.1f s)", item.step, self.target, files, seconds)
        event("checkpoint_uploaded", step=item.step, target=self.target, files=files, seconds=seconds)
        try:
            removed = rotate_remote(self._store, self.total_limit, item.step)
            if removed:
                log.info("removed old remote checkpoints: %s", ", ".join(removed))
        except Exception as exc:  # noqa: BLE001 - old checkpoints left behind cost space, not correctness
            log.warning("could not remove old remote checkpoints (%s); they stay in %s", exc, self.target)
        return True
