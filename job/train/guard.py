"""The NaN/inf guard around the optimizer step: a step whose loss or gradient norm is not finite is skipped.

Two ways to decide, the same result bit for bit (`speed.guard_on_device`):

- on the device (optimizers that can skip a step by themselves, `skips_on_device`): the verdict stays a
  tensor that the optimizer reads (`found_inf`, as `torch.amp.GradScaler` hands it to torch's fused
  Adam), so clipping and the update are queued right behind the backward pass; the host then reads loss
  and norm once while the GPU runs the update, and undoes the host-side bookkeeping of a skipped step;
- on the host (every other optimizer, or the switch off): read loss and norm first, step only if finite.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .optimizers import AdamWBF16


def skips_on_device(optimizer) -> torch.optim.Optimizer | None:
    """The optimizer itself (under accelerate's wrapper) if it can skip a step on the device, else None.

    torch's fused AdamW reads `found_inf` in its kernel and undoes its own step counters; `AdamWBF16`
    honours it on all its paths. Anything else (optimi, bitsandbytes, the group offload's background
    step, foreach AdamW) would ignore the attribute, so it keeps the host-first path."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if isinstance(inner, AdamWBF16):
        return inner
    if type(inner) in (torch.optim.AdamW, torch.optim.Adam) and all(g.get("fused") for g in inner.param_groups):
        return inner
    return None


def guarded_step(optimizer, loss: torch.Tensor, norm: torch.Tensor | float, on_device: bool) -> tuple[float, float, bool]:
    """Step `optimizer` unless `loss` or `norm` is NaN/inf. Returns (loss, norm, skipped) as host values;
    on a skip, weights, moments and step counters are as they were before."""
    inner = skips_on_device(optimizer) if on_device and isinstance(norm, torch.Tensor) else None
    if inner is None:
        loss_value, norm_value = _host_values(loss, norm)
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            optimizer.step()
        return loss_value, norm_value, not finite
    found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm).to(loss.device))).float()
    states_before = len(inner.state)
    with _found_inf(inner, found_inf):
        optimizer.step()
    loss_value, norm_value = _host_values(loss, norm)  # the step's one wait: the GPU runs the update meanwhile
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if not finite:
        if isinstance(inner, AdamWBF16):
            inner.rollback_skipped()
        # a first step creates the state (zero moments, step 0); as if the optimizer had not been called
        for p in list(inner.state)[states_before:]:
            del inner.state[p]
    return loss_value, norm_value, not finite


@contextlib.contextmanager
def _found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor):
    """Set `optimizer.found_inf` for one step only (a later step without the guard must not see it)."""
    had, previous = hasattr(optimizer, "found_inf"), getattr(optimizer, "found_inf", None)
    optimizer.found_inf = found_inf
    try:
        yield
    finally:
        if had:
            optimizer.found_inf = previous
        else:
            del optimizer.found_inf


def _host_values(loss: torch.Tensor, norm: torch.Tensor | float) -> tuple[float, float]:
    """Loss and norm on the host in one transfer where both are tensors on one device."""
    if isinstance(norm, torch.Tensor) and norm.device == loss.device:
        loss_value, norm_value = torch.stack([loss.float(), norm.float()]).tolist()
        return loss_value, norm_value
    return float(loss), float(norm)
