"""The train phase: flow-matching fine-tuning of the SANA-Video transformer (full or LoRA).

    from job.train import run_train, TrainHooks
    result = run_train(spec, ws, hooks)   # TrainResult(status, step, total_steps, checkpoint, final_dir, message)

Modules: `loop` (run_train), `session` (setup, checkpoint save/resume), `step` (one optimizer
step), `optimizers`, `schedulers`, `ema`, `lora`, `model`, `checkpoints`, `final`, `metrics`,
`signals`, `hooks`.
"""

from .hooks import StepInfo, TrainHooks, TrainResult

__all__ = ["run_train", "train_lock", "TrainHooks", "TrainResult", "StepInfo"]


def run_train(spec, ws, hooks: TrainHooks | None = None, *, lock: bool = True) -> TrainResult:
    """See `job.train.loop.run_train`."""
    from .loop import run_train as _run

    return _run(spec, ws, hooks, lock=lock)


def train_lock(ws):
    """See `job.train.loop.train_lock`: one training run per workspace."""
    from .loop import train_lock as _lock

    return _lock(ws)
