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


def median_ms(fn, warmup: int, iters: int) -> dict:
    """`fn`'s time in ms after `warmup` calls: median, min and max of `iters` (CUDA events on a GPU)."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if cuda():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": iters}


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """How far `got` is from `ref` (in float64): max and relative (L2) error, the fraction of elements that differ."""
    got, ref = got.double(), ref.double()
    diff = (got - ref).abs()
    return {"max_abs": float(diff.max()), "rel": float((got - ref).norm() / ref.norm()),
            "ref_max_abs": float(ref.abs().max()), "differing_fraction": float((diff > 0).float().mean()),
            "nonfinite": int((~torch.isfinite(got)).sum())}
