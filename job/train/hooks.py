"""What the train phase returns, and the hooks other components plug into.

    hooks = TrainHooks()
    hooks.on_step_end.append(lambda info: ...)        # validation, eval loss: after each optimizer step
    hooks.on_checkpoint.append(lambda path, step: ...)  # upload: a COMPLETE checkpoint exists at `path`
    result = run_train(spec, ws, hooks)

Hooks run on every process (check `info.is_main_process` for main-only work such as uploads or
rendering; collective work such as an eval loss must run on all processes). `on_checkpoint`
runs on the main process only. An exception in a hook stops training (it is a bug or a
`TrainerError` with a message) — catch inside the hook what may fail harmlessly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["completed", "stopped_early", "already_complete"]


@dataclass
class StepInfo:
    step: int  # optimizer steps done (1-based after the first step)
    total_steps: int
    epoch: int
    metrics: dict[str, float]  # loss, lr, grad_norm, step_time, samples_per_s, tokens_per_s, peak_mem_gb
    is_main_process: bool
    session: Any  # job.train.session.TrainSession: transformer (unwrapped), ema, accelerator, spec, ws


@dataclass
class TrainHooks:
    on_step_end: list[Callable[[StepInfo], None]] = field(default_factory=list)
    on_checkpoint: list[Callable[[Path, int], None]] = field(default_factory=list)


@dataclass
class TrainResult:
    status: Status
    step: int  # the last optimizer step reached
    total_steps: int
    checkpoint: Path | None = None  # the newest complete checkpoint
    final_dir: Path | None = None  # set when the final model exists
    message: str = ""

    @property
    def resumable(self) -> bool:
        return self.status == "stopped_early"
