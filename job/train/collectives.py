"""All-reduces across the job's processes that cannot abort the process at exit.

accelerate's `reduce` (like torch's blocking `all_reduce`) drops its handle on the collective as soon as
it returns. gloo's worker thread then holds the last reference and frees the tensors itself, which needs
the GIL. A process that exits right after a collective — every process agreeing that a checkpoint write
failed, or on a stop signal — can reach interpreter shutdown before that thread gets the GIL; the thread
then aborts the whole process ("terminate called without an active exception", SIGABRT, exit -6 instead
of the documented code; pytorch/pytorch#190489). Seen here in about one run in four on a 2-core machine.

`all_reduce` keeps the handle of the latest collective, so the reference the worker thread drops is never
the last one: the tensors are freed by this process's own thread, with the GIL, at the next collective or
at exit.
"""

from __future__ import annotations

from typing import Literal

import torch

_latest_collective = None  # the last all-reduce's handle; see the module docstring


def all_reduce(tensor: torch.Tensor, reduction: Literal["max", "mean"]) -> torch.Tensor:
    """A copy of `tensor` reduced over every process (max, or mean as accelerate computes it: the sum over
    the number of processes). One process: the copy as it is."""
    global _latest_collective
    import torch.distributed as dist

    out = tensor.clone()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return out
    op = dist.ReduceOp.MAX if reduction == "max" else dist.ReduceOp.SUM  # gloo has no AVG
    work = dist.all_reduce(out, op, async_op=True)
    work.wait()
    _latest_collective = work
    return out / dist.get_world_size() if reduction == "mean" else out
