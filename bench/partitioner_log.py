"""What the compiler's memory-budget partitioner decided: the knapsack's candidates and the values saved for backward.

`record(path)` wraps two functions of `torch._functorch.partitioners` for the compiles inside it and writes one
JSON list, an entry per partitioned graph:

- `knapsack`: each compute-heavy forward node the budget decides on (matrix products, convolutions, reductions):
  its op, output shape and dtype, size in MB, the runtime estimate the knapsack used, the roofline estimate
  (`job.train.recompute_cost.roofline_ms`) and whether it is recomputed;
- `saved`: the values the forward pass saves for the backward pass (op, shape, dtype, MB), the largest first.

A diagnostic of bench/train_step.py (`--log-partitioner`); it changes no decision. The committed logs
(`partitioner_full_fp8_*_h100.json`) hold one line per node.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from unittest import mock


def _describe(node) -> dict:
    from job.train.recompute_cost import _bytes, _tensors

    values = _tensors(node.meta.get("val"))
    return {"name": node.name, "op": str(node.target),
            "shape": [list(map(int, t.shape)) for t in values][:2],
            "dtype": [str(t.dtype).replace("torch.", "") for t in values][:2],
            "mb": round(_bytes(values) / 1e6, 3)}


@contextlib.contextmanager
def record(path: Path):
    from torch._functorch import partitioners

    from job.train.recompute_cost import _flops, roofline_ms

    graphs: list[dict] = []
    rooflines: dict = {}
    choose, optimize = partitioners.choose_saved_values_set, partitioners._optimize_runtime_with_given_memory
    estimate = partitioners.estimate_runtime

    def logged_estimate(node):
        # here, not in logged_optimize: the knapsack runs under no_dispatch, where no FLOPs are counted
        rooflines[node] = float(f"{roofline_ms(node, _flops(node)):.4g}")
        return estimate(node)

    def logged_optimize(joint_graph, memory, runtimes, max_memory, node_info, nodes):
        result = optimize(joint_graph, memory, runtimes, max_memory, node_info, nodes)
        recomputed = set(result[2])
        graphs.append({"max_memory": max_memory, "knapsack": [
            {**_describe(n), "runtime": runtimes[i], "roofline_ms": rooflines.get(n),
             "recomputed": i in recomputed} for i, n in enumerate(nodes)]})
        return result

    def logged_choose(joint_graph, node_info, memory_budget=1):
        saved = choose(joint_graph, node_info, memory_budget)
        entry = {"memory_budget": memory_budget}
        if graphs and "saved" not in graphs[-1]:
            entry = graphs.pop() | entry
        described = sorted((_describe(n) for n in saved), key=lambda d: -d["mb"])
        entry["saved"] = described
        entry["saved_mb"] = round(sum(d["mb"] for d in described), 1)
        graphs.append(entry)
        return saved

    try:
        with mock.patch.object(partitioners, "choose_saved_values_set", logged_choose), \
                mock.patch.object(partitioners, "_optimize_runtime_with_given_memory", logged_optimize), \
                mock.patch.object(partitioners, "estimate_runtime", logged_estimate):
            yield graphs
    finally:
        Path(path).write_text(json.dumps(graphs, indent=1))
