"""Learning-rate schedules: diffusers' `get_scheduler`, stepped once per optimizer step."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler


def build_scheduler(optimizer: torch.optim.Optimizer, train_spec, total_steps: int):
    """`train.lr_scheduler` with `train.lr_warmup_steps` over `total_steps` optimizer steps.

    The scheduler is NOT passed through `accelerator.prepare` (which would step it once per
    process): the loop steps it exactly once per optimizer step, whatever the process count.
    """
    name = train_spec.lr_scheduler
    warmup = train_spec.lr_warmup_steps
    if name == "constant":
        return get_scheduler("constant", optimizer=optimizer)
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))
