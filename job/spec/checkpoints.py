"""`checkpoints:` when training state is saved and where resume starts."""

from __future__ import annotations

from pydantic import Field, field_validator

from .base import Section


class CheckpointSpec(Section):
    """Checkpointing and resume."""

    step_interval: int = Field(1000, ge=1, description="Save a checkpoint every N optimizer steps (quickstart: `checkpoint_step_interval`).")
    minutes_interval: float | None = Field(None, gt=0, description="Also save when this many minutes passed since the last save (useful on interruptible GPUs).")
    total_limit: int | None = Field(5, ge=1, description="Keep at most this many checkpoints (oldest removed first; the newest complete one is never removed). null keeps all.")
    resume_from_checkpoint: str = Field(
        "latest",
        description="`latest`: continue from the newest complete checkpoint (local or in `output.push_to`), if any. `none`: start fresh. "
        "Or a path to one checkpoint folder.",
    )

    @field_validator("resume_from_checkpoint")
    @classmethod
    def _resume_value(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be 'latest', 'none' or a checkpoint path")
        return value.strip()
