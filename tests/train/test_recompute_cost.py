"""`job/train/recompute_cost.py`: the memory-budget partitioner's runtime estimate (`speed.recompute_cost`)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._functorch.config as functorch_config
from torch.fx.experimental.proxy_tensor import make_fx

from job.train import model as model_mod
from job.train import recompute_cost
from job.train.recompute_cost import BANDWIDTH, PEAK_FLOPS, roofline_ms
from train_helpers import make_spec, spec_dict


@pytest.fixture(autouse=True)
def _restore_functorch_config():
    with functorch_config.patch(activation_memory_budget_runtime_estimator="flops", activation_memory_budget=1.0,
                                enable_autograd_cache=False):
        yield


def _nodes(fn, *shapes, dtype=torch.bfloat16) -> dict:
    """The call nodes of `fn` traced on fake tensors (their meta values hold shapes and dtypes, as in the
    partitioner's joint graph), by op name."""
    graph = make_fx(fn, tracing_mode="fake")(*(torch.empty(s, dtype=dtype) for s in shapes)).graph
    return {n.target.__name__.split(".")[0]: n for n in graph.nodes if n.op == "call_function"}


def test_a_large_product_costs_its_arithmetic_and_a_reduction_its_memory_traffic():
    n = 4096
    nodes = _nodes(lambda x, w: (x @ w, x.abs().amax()), (n, n), (n, n))
    product = roofline_ms(nodes["mm"], recompute_cost._flops(nodes["mm"]))
    assert product == pytest.approx(1e3 * 2 * n ** 3 / PEAK_FLOPS[torch.bfloat16], rel=1e-6)
    reduction = roofline_ms(nodes["amax"], recompute_cost._flops(nodes["amax"]))
    assert reduction == pytest.approx(1e3 * (n * n * 2 + 2) / BANDWIDTH, rel=1e-6)  # one bf16 read, one scalar
    # torch's FLOP count rates the reduction as free next to the product; by time it is ~1/15 of it
    assert recompute_cost._flops(nodes["amax"]) <= 1
    assert 0.05 < reduction / product < 0.1


def test_float8_operands_use_the_float8_peak():
    nodes = _nodes(lambda x, w: x @ w, (2048, 2048), (2048, 2048))
    node = nodes["mm"]
    bf16 = roofline_ms(node, 1e12)
    for arg in node.args:  # the same product with float8 operands: twice the peak
        arg.meta["val"] = arg.meta["val"].to(torch.float8_e4m3fn)
    assert roofline_ms(node, 1e12) == pytest.approx(bf16 * PEAK_FLOPS[torch.bfloat16] / PEAK_FLOPS[torch.float8_e4m3fn])


def _block(x, w1, w2):
    h = torch.nn.functional.silu(x @ w1)
    scale = h.abs().amax()  # a reduction over a whole activation, as the float8 casts take
    return ((h * scale) @ w2).square().mean()


def test_the_compiler_uses_the_roofline_estimate_and_computes_the_same(monkeypatch):
    calls = []
    real = recompute_cost.roofline_ms
    monkeypatch.setattr(recompute_cost, "roofline_ms", lambda node, flops: calls.append(node.target) or real(node, flops))
    torch.manual_seed(0)
    x, w1, w2 = (torch.randn(64, 64, requires_grad=True) for _ in range(3))
    eager = torch.autograd.grad(_block(x, w1, w2), (x, w1, w2))

    functorch_config.activation_memory_budget = 0.3
    assert recompute_cost.use_for_compiles("roofline") == "roofline"
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = torch.autograd.grad(torch.compile(_block)(x, w1, w2), (x, w1, w2))
    assert torch.ops.aten.mm.default in calls and torch.ops.aten.amax.default in calls
    for a, b in zip(compiled, eager):  # float32 sums in another order: a few 1e-5 relative
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_flops_is_torchs_default_and_roofline_falls_back_to_it_with_a_log_line(monkeypatch, caplog):
    assert recompute_cost.use_for_compiles("flops") == "flops"
    assert functorch_config.activation_memory_budget_runtime_estimator == "flops"
    monkeypatch.setattr(recompute_cost, "_estimator_class", lambda: None)  # a torch without pluggable estimators
    with caplog.at_level(logging.INFO, logger="trainer.train"):
        assert recompute_cost.use_for_compiles("roofline") == "flops"
    assert functorch_config.activation_memory_budget_runtime_estimator == "flops"
    assert "FLOP count is used" in caplog.text


def _spec(tmp_path, **speed):
    return make_spec(spec_dict(tmp_path / "ws", tmp_path / "model", model={"type": "full"},
                               memory={"gradient_checkpointing": True}, speed=speed))


@pytest.mark.parametrize("budget, compiled, estimator", [(0.15, True, "roofline"), (1.0, True, None),
                                                          (0.15, False, None)])
def test_prepare_transformer_sets_the_estimate_only_for_compiled_blocks_under_a_budget(monkeypatch, tmp_path, budget,
                                                                                        compiled, estimator):
    from job.models.sanavideo import speed as speed_mod

    class Transformer(torch.nn.Module):  # blocks as `compile_blocks` leaves them (compiling needs CUDA)
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
            if compiled:
                self.transformer_blocks[0]._compiled_call_impl = lambda *args: None

        def enable_gradient_checkpointing(self):
            pass

    monkeypatch.setattr(speed_mod, "apply_training_speedups", lambda transformer, spec: [])
    used = []
    monkeypatch.setattr(recompute_cost, "use_for_compiles", lambda how: used.append(how) or how)
    model_mod.prepare_transformer(Transformer(), _spec(tmp_path, activation_memory_budget=budget))
    assert used == ([estimator] if estimator else [])
