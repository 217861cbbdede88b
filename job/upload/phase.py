"""The upload phase, and the train phase's part of uploading (remote resume, background checkpoints).

    upload_phase(loaded, ws)              `trainer upload SPEC` and the last phase of `trainer run`
    uploads = TrainUploads.start(spec, ws, hooks); result = run_train(...); uploads.finish(result)

The upload phase sends only what is missing in `output.push_to` (same size and, where the store
gives a cheap checksum — S3's single-part ETag, the Hub's sha256/git oid — same content): the
newest local checkpoint (if it is not complete there), validation videos and their index, logs,
the redacted spec, the final model and, last, the model card. A part that cannot be uploaded after
the retries stays local and is named; the final model failing ends the job with exit 4.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from job.errors import StorageError, TrainerError
from job.phases import StoppedEarly
from job.report import console, event
from job.spec import LoadedSpec, redacted_yaml
from job.train.checkpoints import CheckpointStore, checkpoint_step
from job.workspace import Workspace, atomic_write_text

from .card import write_card
from .checkpoints import CheckpointUploader, upload_checkpoint
from .remote import list_or_empty, newest_complete, open_push_store
from .resume import fetch_newer_remote_checkpoint

log = logging.getLogger("trainer.upload")


def _local_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def upload_phase(loaded: LoadedSpec, ws: Workspace) -> None:
    spec = loaded.spec
    if not spec.output.push_to:
        console.print(f"upload: nothing to do, results stay local in {ws.output_dir} (output.push_to is not set)")
        return
    want = spec.output.upload
    # Files published at the root of push_to: the redacted spec and, with the final model, its card.
    root_dir = ws.state_dir / "publish"
    atomic_write_text(root_dir / "spec.yaml", redacted_yaml(spec, loaded.secret_values))
    parts: list[tuple[str, Path, str]] = []  # (label, local folder, remote prefix)
    if want.validation and ws.validation_dir.exists():
        parts.append(("validation videos", ws.validation_dir, "validation"))
    if want.logs and ws.logs_dir.exists():
        parts.append(("logs", ws.logs_dir, "logs"))
    final = want.final_model and ws.final_dir.exists()
    if final:
        parts.append(("final model", ws.final_dir, "final"))
        write_card(spec, ws, root_dir, validation_uploaded=want.validation)
    parts.append(("model card" if final else "spec", root_dir, ""))  # last: the card links to what is above

    sent = 0
    not_uploaded: dict[str, list[Path]] = {}
    store_down = False  # the store stopped answering: the other parts are not tried (each would wait out its retries)
    with open_push_store(spec) as store:
        try:
            sent += _upload_newest_checkpoint(spec, ws, store)
        except TrainerError as exc:
            not_uploaded["newest checkpoint"] = [CheckpointStore(ws.checkpoints_dir).latest() or ws.checkpoints_dir]
            log.warning("upload of the newest checkpoint failed: %s", exc)
            event("upload_failed", what="newest checkpoint", target=spec.output.push_to, error=str(exc),
                  files=[str(p) for p in not_uploaded["newest checkpoint"]])
            store_down = _stops_answering(exc, spec)
        for label, folder, prefix in parts:
            if store_down:
                not_uploaded[label] = _local_files(folder)
                event("upload_failed", what=label, target=spec.output.push_to, error="not tried: the store stopped answering",
                      files=[str(p) for p in not_uploaded[label][:50]])
                continue
            try:
                before = {f.path: f.size for f in list_or_empty(store, prefix)}
                store.upload_folder(folder, prefix, progress=False)
                sent += sum(1 for local in _local_files(folder)
                            if before.get("/".join(filter(None, (prefix, local.relative_to(folder).as_posix())))) != local.stat().st_size)
            except TrainerError as exc:
                files = _local_files(folder)
                not_uploaded[label] = files
                log.warning("upload of the %s failed: %s", label, exc)
                event("upload_failed", what=label, target=spec.output.push_to, error=str(exc),
                      files=[str(p) for p in files[:50]])
                store_down = _stops_answering(exc, spec)
    if not_uploaded:
        lines = "; ".join(f"{label}: {', '.join(str(p) for p in files[:5])}" + (f" and {len(files) - 5} more" if len(files) > 5 else "")
                          for label, files in not_uploaded.items())
        message = f"not uploaded to {spec.output.push_to} (the files stay local): {lines}"
        if final and ("final model" in not_uploaded or "model card" in not_uploaded):
            raise StorageError(message, fix="check the store and its credentials, then run `trainer upload SPEC` (it sends only what is missing)")
        console.print(f"[yellow]warning[/yellow] upload: {message}; `trainer upload SPEC` retries")
    event("uploaded", target=spec.output.push_to, files=sent, final_model=final)
    console.print(f"upload: {sent} new or changed files sent to {spec.output.push_to}" + ("" if final else " (no final model yet)"))


def _stops_answering(exc: TrainerError, spec) -> bool:
    """Whether `exc` says the store is down (transient failures until the retries ran out); if so, say
    that the rest of the upload is not tried."""
    down = isinstance(exc, StorageError) and exc.gave_up
    if down:
        log.warning("%s stopped answering: the remaining parts are not tried (they stay local)", spec.output.push_to)
    return down


def _upload_newest_checkpoint(spec, ws: Workspace, store) -> int:
    """The newest complete local checkpoint, when the store has no complete copy of it or newer."""
    if not spec.output.upload.checkpoints:
        return 0
    local = CheckpointStore(ws.checkpoints_dir).latest()
    if local is None:
        return 0
    remote = newest_complete(store)
    step = checkpoint_step(local)
    if remote is not None and remote.step >= step:
        return 0
    files = upload_checkpoint(store, local, step)
    event("checkpoint_uploaded", step=step, target=spec.output.push_to, files=files)
    return files


class TrainUploads:
    """The train phase's remote side: resume from the store first, then upload checkpoints while
    training (main process only), and finish or cut short those uploads when training ends."""

    def __init__(self, spec, uploader: CheckpointUploader | None):
        self.spec = spec
        self.uploader = uploader

    @classmethod
    def start(cls, spec, ws: Workspace, hooks) -> "TrainUploads":
        if not spec.output.push_to or _training_done(spec, ws):
            return cls(spec, None)
        _remote_resume(spec, ws)
        uploader = None
        if spec.output.upload.checkpoints and _is_main_process():
            uploader = CheckpointUploader(spec)
            hooks.on_checkpoint.append(uploader.submit)
        return cls(spec, uploader)

    def finish(self, result) -> None:
        """After run_train returned: a stop (signal, time budget) waits `grace_seconds` at most for
        the newest checkpoint; a completed run waits for its uploads before the upload phase."""
        if self.uploader is None:
            return
        from job.train.signals import StopRequest

        grace = self.spec.output.upload.grace_seconds
        stopped = result.resumable
        if stopped:
            console.print(f"train: uploading checkpoint step {result.step} (at most {grace:g} s)")
        deadline = time.monotonic() + grace if stopped else None
        signalled = False
        # A signal now: after a stop, the job's second one (leave at once); after a completed run,
        # a first one (the newest checkpoint gets grace_seconds, then the job exits 0).
        with StopRequest() as stop:
            while True:
                done = self.uploader.drain(timeout=0.2)
                if done or not self.uploader.busy:
                    break
                if stop.requested and not signalled:
                    signalled = True
                    if stopped:
                        break
                    console.print(f"train: stop requested; the newest checkpoint gets {grace:g} s more to upload")
                    deadline = time.monotonic() + grace
                if deadline is not None and time.monotonic() >= deadline:
                    break
        interrupted = stop.requested and not stopped  # also a signal that came as the last upload ended
        self.uploader.close()
        if not done:
            log.warning("%s; it stays in %s%s", self.uploader.outstanding(), result.checkpoint,
                        "" if stopped or interrupted else " and the upload phase sends it")
        if interrupted:
            raise StoppedEarly("stopped by a signal while uploading checkpoints; training is complete: "
                               "run the same spec again to upload the results")

    def abandon(self) -> None:
        """Training failed or was stopped at once: do not wait (the remote marker is written last)."""
        if self.uploader is not None:
            self.uploader.close()


def _training_done(spec, ws: Workspace) -> bool:
    from job.train.final import read_summary
    from job.train.session import training_hash

    summary = read_summary(ws)
    return bool(summary and summary.get("status") == "completed" and summary.get("spec_hash") == training_hash(spec)
                and spec.checkpoints.resume_from_checkpoint != "none")


def _world_size() -> int:
    import os

    # Set by torchrun / accelerate launch; a plain `trainer run` is one process.
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _is_main_process() -> bool:
    if _world_size() <= 1:
        return True
    return _process_state().is_main_process


def _process_state():
    """accelerate's process state, created the way the train session's Accelerator creates it."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _remote_resume(spec, ws: Workspace) -> None:
    """Download a newer remote checkpoint before the session is built (once per machine).

    An unreachable store stops the job (exit 4) rather than training from an older state: the
    newest progress may be only there, and the next start (or a fixed store) resumes from it."""
    def fetch() -> None:
        try:
            fetch_newer_remote_checkpoint(spec, ws)
        except StorageError as exc:
            raise StorageError(f"could not look for a newer checkpoint in {spec.output.push_to}: {exc.message}",
                               fix=f"{exc.fix + '; or ' if exc.fix else ''}resume from a local checkpoint only with "
                                   "checkpoints.resume_from_checkpoint: <path of a step_N folder>") from exc

    if _world_size() <= 1:
        fetch()
        return
    state = _process_state()
    if state.is_local_main_process:
        fetch()
    state.wait_for_everyone()
