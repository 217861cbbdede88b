"""The train phase: `run_train(spec, ws) -> TrainResult`. The loop itself fits one screen.

Setup (model, LoRA, optimizer, EMA, data, resume) is in `session.py`; one optimizer step is in
`step.py`; checkpoints in `checkpoints.py`; the final model in `final.py`.

One training run per workspace: `run_train` holds `state/train.lock` (see `train_lock`) for its whole run,
and a second trainer on the same workspace stops at once (InputError, exit 2) before it reads or writes
anything, instead of training from step 0 into the same checkpoints and metrics log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from .collectives import all_reduce
from .final import read_summary, write_final
from .hooks import StepInfo, TrainHooks, TrainResult
from .metrics import peak_memory_gb
from .session import TrainSession, build_session, training_hash
from .signals import StopRequest
from .step import train_step

if TYPE_CHECKING:
    from job.spec import JobSpec
    from job.workspace import Workspace

log = logging.getLogger("trainer.train")

#: The train phase's lock file under `ws.state_dir`.
LOCK_FILE = "train.lock"


def run_train(spec: JobSpec, ws: Workspace, hooks: TrainHooks | None = None, *, lock: bool = True) -> TrainResult:
    """Train (or resume) as the spec says. Returns completed | stopped_early | already_complete.

    Raises TrainerError subclasses for what a user can fix (InputError: no cached samples, bad
    checkpoint path, another train phase running on the workspace (`state/train.lock`);
    EnvironmentProblem: a missing optimizer or quantisation package; TrainingDiverged: NaN/inf for max_bad_steps steps),
    and `HardStop` (a KeyboardInterrupt) on a second SIGTERM/SIGINT. `lock=False`: the caller holds
    `train_lock(ws)` already (the train phase, around its remote resume too).
    """
    hooks = hooks or TrainHooks()
    with train_lock(ws) if lock else contextlib.nullcontext():
        return _train(spec, ws, hooks)


def _train(spec: JobSpec, ws: Workspace, hooks: TrainHooks) -> TrainResult:
    done = _already_complete(spec, ws)
    if done is not None:
        return done
    s = build_session(spec, ws)
    try:
        with StopRequest() as stop:
            batches = s.batches()
            s.metrics.note("train_started", step=s.step, total_steps=s.total_steps, resumed_from=str(s.resumed_from or ""))
            while s.step < s.total_steps:
                started = time.perf_counter()
                out = train_step(s, batches)
                if not out.skipped:
                    dt = time.perf_counter() - started
                    metrics = dict(loss=out.loss, lr=s.scheduler.get_last_lr()[0], grad_norm=out.grad_norm, step_time=dt,
                                   samples_per_s=out.samples / dt, tokens_per_s=out.tokens / dt,
                                   peak_mem_gb=peak_memory_gb(s.accelerator.device),
                                   epoch=s.epoch + s.position / len(s.sampler), **out.extras)
                    s.metrics.log(s.step, metrics)
                    if hooks.on_step_end:
                        s.finish_optimizer_step()  # callbacks may read the weights
                    for callback in hooks.on_step_end:
                        callback(StepInfo(s.step, s.total_steps, s.epoch, metrics, s.accelerator.is_main_process, s))
                stop_now, time_due = _agreed_flags(s, stop)
                if s.step >= s.total_steps:
                    break  # the last step: a stop request now is served by finishing (final checkpoint and model)
                interval_due = not out.skipped and s.step % spec.checkpoints.step_interval == 0  # a skipped step saves nothing new
                if stop_now or time_due or interval_due:
                    _checkpoint(s, hooks)
                if stop_now:
                    return _stopped(s, stop)
            if s.last_checkpoint is None or s.last_checkpoint.name != f"step_{s.step:06d}":
                _checkpoint(s, hooks)
            final = write_final(s) if s.accelerator.is_main_process else ws.final_dir
            s.accelerator.wait_for_everyone()
            s.metrics.note("train_completed", step=s.step, final_dir=str(final))
            return TrainResult("completed", s.step, s.total_steps, s.last_checkpoint, final, f"trained {s.step} steps")
    finally:
        s.metrics.close()


def train_lock(ws: Workspace) -> contextlib.AbstractContextManager:
    """The workspace's train lock, non-blocking, taken by the main process (global rank 0) only.

    What must be kept out is another *run*; the ranks of one run share the workspace by design. Only rank 0
    writes the shared files (it begins, commits and rotates checkpoints, writes the metrics log and the final
    model), and the other ranks cannot pass the process-group setup without it, so its lock covers the whole
    run. When rank 0 of a second run stops here, the launcher (torchrun / accelerate launch) ends its other
    ranks. The rank comes from the launcher's environment, as accelerate reads it: the lock is taken before
    the Accelerator exists, before anything is loaded, read or written.
    """
    if _launcher_rank() != 0:
        return contextlib.nullcontext()
    return ws.lock(LOCK_FILE, holder="train phase", wait=False,
                   fix="wait for it to finish, or stop it (two runs would write the same checkpoints and logs); a run that "
                       "died does not hold it: the OS releases the lock when its process exits, so there is nothing to delete")


def _launcher_rank() -> int:
    """This process's global rank as the launcher set it (accelerate's variables), 0 for a plain process."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                continue
    return 0


def _checkpoint(s: TrainSession, hooks: TrainHooks) -> None:
    path = s.save_checkpoint()
    if s.accelerator.is_main_process:
        for callback in hooks.on_checkpoint:
            callback(path, s.step)


def _agreed_flags(s: TrainSession, stop: StopRequest) -> tuple[bool, bool]:
    """(stop now, checkpoint by time), the same on every process."""
    t, c = s.spec.train, s.spec.checkpoints
    if t.max_train_hours is not None and time.monotonic() - s.started >= t.max_train_hours * 3600:
        stop.request(f"the time budget train.max_train_hours={t.max_train_hours} is used up")
    time_due = c.minutes_interval is not None and time.monotonic() - s.last_save >= c.minutes_interval * 60
    if s.world == 1:  # nothing to agree on: no device round trip, which would wait for the queued optimizer step
        return bool(stop.requested), bool(time_due)
    flags = torch.tensor([float(stop.requested), float(time_due)], device=s.accelerator.device)
    flags = all_reduce(flags, "max")
    return bool(flags[0] > 0), bool(flags[1] > 0)


def _stopped(s: TrainSession, stop: StopRequest) -> TrainResult:
    why = stop.reason or "a stop signal"
    message = f"stopped early at step {s.step}/{s.total_steps} ({why}); resumable: run the same spec again"
    log.warning(message)
    s.metrics.note("train_stopped", step=s.step, reason=why, checkpoint=str(s.last_checkpoint))
    return TrainResult("stopped_early", s.step, s.total_steps, s.last_checkpoint, None, message)


def _already_complete(spec, ws) -> TrainResult | None:
    summary = read_summary(ws)
    if (spec.checkpoints.resume_from_checkpoint == "none" or not summary or summary.get("status") != "completed"
            or summary.get("spec_hash") != training_hash(spec)):
        return None
    from .checkpoints import CheckpointStore

    latest = CheckpointStore(ws.checkpoints_dir).latest()
    log.info("training already complete (%s): nothing to do", ws.final_dir)
    return TrainResult("already_complete", summary["final_step"], summary["total_steps"], latest, ws.final_dir,
                       f"already complete at step {summary['final_step']}")
