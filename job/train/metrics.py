"""Per-step metrics: console (rich progress bar or a compact line), `logs/metrics.jsonl`, trackers.

Trackers go through accelerate (`report_to`: wandb, tensorboard). A tracker that fails to start
or to log is reported once and dropped; training never stops for it.
"""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import torch

from job.report import console, event, is_interactive

log = logging.getLogger("trainer.train")


def available_trackers(names: list[str]) -> list[str]:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    checks = {"wandb": is_wandb_available, "tensorboard": is_tensorboard_available}
    usable = []
    for name in names:
        if checks.get(name, lambda: False)():
            usable.append(name)
        else:
            log.warning("tracker %r is not installed; training continues without it (pip install %s)", name, name)
    return usable


#: A checkpoint's copy of `logs/metrics.jsonl` up to its step: a resume on a fresh machine (a remote
#: checkpoint) gets the loss history back, so the model card's loss curve starts at step 1.
HISTORY = "metrics.jsonl"


def _records(path: Path) -> list[dict]:
    """The JSON records of a metrics log; a line cut short by a kill is skipped."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def save_history(log_path: Path, checkpoint_dir: Path) -> None:
    """Copy the metrics log into a checkpoint being written (made durable by the checkpoint's commit)."""
    if log_path.is_file():
        (checkpoint_dir / HISTORY).write_bytes(log_path.read_bytes())


def restore_history(log_path: Path, checkpoint_dir: Path, step: int) -> int:
    """At a resume from `step`: keep exactly the records of steps <= `step` (a killed run's later
    records are redone and would repeat); where the local log holds fewer of them than the
    checkpoint's copy (a fresh machine), take the copy. Returns the records kept."""
    from job.workspace import atomic_write_text

    local = [r for r in _records(log_path) if r["step"] <= step]
    saved = [r for r in _records(checkpoint_dir / HISTORY) if r["step"] <= step]
    kept = saved if len(saved) > len(local) else local
    if kept or log_path.exists():
        log_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(kept)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


class MetricsLog:
    def __init__(self, ws, spec, accelerator, total_steps: int, start_step: int, tracker_names: list[str]):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.total_steps = total_steps
        self.path: Path = ws.logs_dir / "metrics.jsonl"
        self.trackers = tracker_names
        self.every = max(1, min(50, total_steps // 20))
        self._progress = None
        self._task = None
        if self.main and self.trackers:
            self._init_trackers(spec)
        if self.main and is_interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                      TextColumn("{task.fields[info]}"), console=console, transient=False)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def _init_trackers(self, spec) -> None:
        from job.spec import redacted_dict

        flat = {f"{section}.{k}": (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                for section in ("model", "train") for k, v in redacted_dict(spec)[section].items()}
        run_name = spec.tracking.run_name or spec.name
        try:
            self.accelerator.init_trackers(spec.tracking.project_name, config=flat,
                                           init_kwargs={"wandb": {"name": run_name}})
        except Exception as exc:  # noqa: BLE001 - any tracker failure must not stop training
            log.warning("could not start trackers %s (%s: %s); training continues without them",
                        self.trackers, exc.__class__.__name__, exc)
            self.trackers = []

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.main:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers:
            try:
                self.accelerator.log({f"train/{k}": v for k, v in values.items()}, step=step)
            except Exception as exc:  # noqa: BLE001
                log.warning("tracker logging failed (%s: %s); trackers are turned off for this run", exc.__class__.__name__, exc)
                self.trackers = []
        line = (f"loss {values['loss']:.4f}  lr {values['lr']:.2e}  grad {values.get('grad_norm', float('nan')):.3f}  "
                f"{values['step_time']:.2f}s/step  {values['samples_per_s']:.2f} clips/s  {values['peak_mem_gb']:.1f} GiB")
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=line)
        elif step == 1 or step % self.every == 0 or step == self.total_steps:
            log.info("step %d/%d  %s", step, self.total_steps, line)

    def note(self, name: str, **fields) -> None:
        if self.main:
            event(name, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.main and self.trackers:
            try:
                self.accelerator.end_training()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing trackers failed (%s)", exc)
