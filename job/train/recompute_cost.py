"""What recomputing one operation in the backward pass costs, as the compiler's memory-budget partitioner sees it.

With `speed.activation_memory_budget` below 1, torch's partitioner picks which compute-heavy forward results
(matrix products, convolutions, reductions) to save and which to recompute, by a 0/1 knapsack over their
sizes and estimated runtimes. torch's default estimate is the operation's FLOP count: a depthwise convolution
or an absolute-maximum reduction over a 734 MB activation counts as nearly free, though on an H100 it costs
as long as a large matrix product (they are bound by memory traffic, not arithmetic).

`roofline_ms` estimates the time as the larger of the arithmetic time at the device's peak for the operands'
dtype and the memory time at its bandwidth (inputs read once, outputs written once). Only the ratios between
operations matter to the knapsack, so the peaks are round figures of an H100 SXM; `speed.recompute_cost`
chooses between torch's FLOP count and this.
"""

from __future__ import annotations

import logging

import torch
from torch._functorch.partitioners import estimate_runtime as _TORCH_ESTIMATE_RUNTIME

#: peak dense throughput by operand dtype (FLOP/s) and memory bandwidth (bytes/s): H100 SXM, as cuBLAS and
#: inductor's kernels reach them (bench/RESULTS.md: float8 products ~1.4e15, bf16 ~7.6e14, elementwise ~2.5e12)
PEAK_FLOPS = {torch.float8_e4m3fn: 1.4e15, torch.float8_e5m2: 1.4e15, torch.bfloat16: 7.0e14, torch.float16: 7.0e14}
FLOAT32_PEAK_FLOPS = 5.0e13  # float32 products without TF32 (the linear attention's sums)
TF32_PEAK_FLOPS = 3.5e14
BANDWIDTH = 2.5e12

log = logging.getLogger("trainer.train")


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _node_value(arg):
    meta = getattr(arg, "meta", None)
    return meta.get("val") if meta is not None else None


def _bytes(tensors: list[torch.Tensor]) -> int:
    total = 0
    for t in tensors:
        try:
            total += int(t.numel()) * t.element_size()
        except Exception:  # noqa: BLE001 - a symbolic size without a hint: count nothing rather than fail the compile
            pass
    return total


def _peak(inputs: list[torch.Tensor]) -> float:
    """The peak of the first operand with a low-precision dtype (a float8 product's scales are float32)."""
    float32 = TF32_PEAK_FLOPS if torch.backends.cuda.matmul.allow_tf32 else FLOAT32_PEAK_FLOPS
    return next((PEAK_FLOPS[t.dtype] for t in inputs if t.dtype in PEAK_FLOPS), float32)


def roofline_ms(node, flops: float) -> float:
    """max(arithmetic time, memory time) of one graph node in milliseconds; `flops` as torch counts them."""
    inputs = [t for a in list(node.args) + list(node.kwargs.values()) for t in _tensors(_node_value(a))]
    outputs = _tensors(node.meta.get("val"))
    memory_s = (_bytes(inputs) + _bytes(outputs)) / BANDWIDTH
    return 1e3 * max(flops / _peak(inputs), memory_s)


def _flops(node) -> float:
    """torch's own FLOP estimate of `node` (the partitioner's "flops" mode, through the function this module
    found at import, so that it still answers where `estimate_runtime` itself was replaced)."""
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget_runtime_estimator="flops"):
        return float(_TORCH_ESTIMATE_RUNTIME(node))


def _estimator_class():
    try:
        from torch._inductor.custom_graph_pass import CustomRuntimeEstimator
    except ImportError:  # torch without pluggable estimators
        return None
    return CustomRuntimeEstimator


def roofline_estimator():
    """An estimator object for `torch._functorch.config.activation_memory_budget_runtime_estimator`, or None
    where this torch takes only its built-in names."""
    base = _estimator_class()
    if base is None:
        return None

    class RooflineEstimator(base):
        def __call__(self, node) -> float:
            return roofline_ms(node, _flops(node))

        def uuid(self):  # part of the compiled-graph cache key: a different estimator, a different partition
            return "trainer-roofline-v1"

    return RooflineEstimator()


def use_for_compiles(how: str) -> str:
    """Set the partitioner's runtime estimate for every later compile of this process ("roofline" or torch's
    "flops"); returns the one in use ("flops" where this torch takes no estimator object)."""
    import torch._functorch.config as functorch_config

    estimator = roofline_estimator() if how == "roofline" else None
    if how == "roofline" and estimator is None:
        log.info("speed.recompute_cost: roofline needs torch's pluggable runtime estimators "
                 "(torch._inductor.custom_graph_pass.CustomRuntimeEstimator); the compiler's FLOP count is used")
    functorch_config.activation_memory_budget_runtime_estimator = estimator if estimator is not None else "flops"
    return "roofline" if estimator is not None else "flops"
