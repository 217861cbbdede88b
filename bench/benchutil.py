"""Device helpers shared by the GPU benchmarks (`from benchutil import cuda, sync, cleanup`: a script's
own folder is on `sys.path` when it runs as `python bench/<script>.py`)."""

from __future__ import annotations

import gc

import torch


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def cleanup() -> None:
    """Free what the last configuration left (Python garbage, cached blocks) and restart the peak counter."""
    gc.collect()
    if cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
