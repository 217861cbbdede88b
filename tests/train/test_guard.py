"""The NaN/inf guard decided on the device (`speed.guard_on_device`, `job.train.guard`) against the host's
decision: the same weights, moments, step counters, learning rates, losses and norms bit for bit, a
skipped step that leaves the optimizer exactly as it was, and the optimizers that keep the host path."""

from __future__ import annotations

import json

import pytest
import torch

from job.models.sanavideo.objective import FlowMatchingObjective
from job.train import guard, optimizers as O, run_train
from job.train.checkpoints import CheckpointStore
from job.train.optimizers import AdamWBF16
from train_helpers import make_job, trained_state

KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
NAN_AT = (0, 3)  # a skipped first step (the optimizer has no state yet) and one in the middle


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(16, 9), (7,), (3, 5, 2), (300,)]]
    params.append(torch.nn.Parameter(torch.randn(6, 4, generator=g).to(dtype).t()))  # not contiguous
    return params


def _backward(params, step: int) -> torch.Tensor:
    """Gradients and a loss for `step`; NaN (in one gradient element, or in the loss) at the NAN_AT steps."""
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    loss = torch.rand((), generator=g)
    if step == NAN_AT[0]:
        params[1].grad[3] = float("nan")
    elif step == NAN_AT[1]:
        loss = loss * float("inf")
    return loss


def _snapshot(opt, params) -> tuple:
    return [p.detach().clone() for p in params], _clone_state(opt.state_dict())


def _clone_state(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_state(v) for v in value)
    return value


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def _train(make_optimizer, dtype, on_device: bool, steps: int = 6):
    """A guarded loop as `train_step` runs it: clip, guarded step, scheduler only after a taken step."""
    params = _params(dtype)
    opt = make_optimizer(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (1 + n))
    history = []
    for step in range(steps):
        loss = _backward(params, step)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        before = _snapshot(opt, params)
        loss_value, norm_value, skipped = guard.guarded_step(opt, loss, norm, on_device)
        assert not hasattr(opt, "found_inf")  # set for the one call only
        assert skipped == (step in NAN_AT)
        if skipped:  # weights, moments and step counters exactly as they were
            _assert_same(_snapshot(opt, params), before, f"step {step}")
        else:
            sched.step()
        opt.zero_grad(set_to_none=True)
        history.append((loss_value, norm_value, skipped, opt.param_groups[0]["lr"]))
    return params, opt, history


OPTIMIZERS = {
    "adamw-fused": (lambda ps: torch.optim.AdamW(ps, fused=True, **KW), torch.float32),
    "adamw_bf16-eager-bf16": (lambda ps: AdamWBF16(ps, fused=False, torch_fused_fp32=False, seed=3, **KW), torch.bfloat16),
    "adamw_bf16-eager-fp32": (lambda ps: AdamWBF16(ps, fused=False, torch_fused_fp32=False, seed=3, **KW), torch.float32),
    "adamw_bf16-torch-fused-fp32": (lambda ps: AdamWBF16(ps, fused=False, torch_fused_fp32=True, **KW), torch.float32),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_device_guard_gives_the_host_guards_run_bit_for_bit(name):
    make_optimizer, dtype = OPTIMIZERS[name]
    assert guard.skips_on_device(make_optimizer(_params(dtype))) is not None
    host = _train(make_optimizer, dtype, on_device=False)
    device = _train(make_optimizer, dtype, on_device=True)
    (p_host, opt_host, hist_host), (p_dev, opt_dev, hist_dev) = host, device
    assert repr(hist_host) == repr(hist_dev)  # losses, norms (NaN too), skips and learning rates, exactly
    _assert_same([p.detach() for p in p_dev], [p.detach() for p in p_host])
    _assert_same(opt_dev.state_dict(), opt_host.state_dict())
    assert any(not torch.equal(p, q) for p, q in zip(p_dev, _params(dtype)))  # it did train
    steps = [s["step"] for s in device[1].state_dict()["state"].values()]
    assert all(int(s) == 6 - len(NAN_AT) for s in steps), steps


@pytest.mark.slow
def test_the_compiled_adamw_bf16_update_skips_on_the_device_bit_for_bit(monkeypatch):
    """The CUDA path of `adamw_bf16` (compiled chunks), compiled by inductor's CPU backend: the flagged
    update (a second graph) gives the unflagged one's bits, and a flagged skip changes nothing."""
    monkeypatch.setattr(O, "FUSED_CHUNK", 4)
    monkeypatch.setattr(O, "_compiled_many", None)
    make = lambda ps: AdamWBF16(ps, fused=True, torch_fused_fp32=False, seed=3, **KW)  # noqa: E731
    host = _train(make, torch.bfloat16, on_device=False, steps=5)
    device = _train(make, torch.bfloat16, on_device=True, steps=5)
    assert device[1]._fused is True and device[1]._compiled_ok == {(torch.bfloat16, torch.bfloat16)}
    assert repr(host[2]) == repr(device[2])
    _assert_same([p.detach() for p in device[0]], [p.detach() for p in host[0]])
    _assert_same(device[1].state_dict(), host[1].state_dict())


def test_the_update_is_queued_before_the_host_reads_loss_and_norm(monkeypatch):
    order = []
    original = guard._host_values
    monkeypatch.setattr(guard, "_host_values", lambda *a: (order.append("read"), original(*a))[1])
    for on_device, expected in ((True, ["step", "read"]), (False, ["read", "step"])):
        params = _params(torch.float32)
        opt = AdamWBF16(params, fused=False, **KW)
        opt.step = (lambda step: lambda *a, **k: (order.append("step"), step(*a, **k))[1])(opt.step)
        _backward(params, 1)
        order.clear()
        guard.guarded_step(opt, torch.tensor(0.5), torch.nn.utils.clip_grad_norm_(params, 1.0), on_device)
        assert order == expected


def test_optimizers_that_cannot_skip_on_the_device_keep_the_host_path():
    optimi = pytest.importorskip("optimi")
    params = _params(torch.float32)
    assert guard.skips_on_device(optimi.AdamW(params, **KW)) is None
    assert guard.skips_on_device(torch.optim.AdamW(params, foreach=True, **KW)) is None  # would ignore found_inf
    assert guard.skips_on_device(torch.optim.SGD(params, lr=0.1)) is None
    opt = optimi.AdamW(params, **KW)
    _backward(params, NAN_AT[1])
    before = [p.detach().clone() for p in params]
    loss, norm, skipped = guard.guarded_step(opt, torch.tensor(float("inf")), torch.tensor(1.0), on_device=True)
    assert skipped and loss == float("inf") and all(torch.equal(p, q) for p, q in zip(params, before))


def _nan_at_step(monkeypatch, bad_calls):
    calls = {"n": 0}
    original = FlowMatchingObjective.loss

    def sometimes_nan(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(FlowMatchingObjective, "loss", sometimes_nan)
    return calls


def _run(tmp_path, tiny_model, monkeypatch, on_device: bool, optimizer: str, precision: str):
    calls = _nan_at_step(monkeypatch, (3,))
    spec, ws = make_job(tmp_path, tiny_model,
                        train={"max_train_steps": 4, "optimizer": optimizer, "max_grad_norm": 1.0,
                               "lr_scheduler": "linear", "lr_warmup_steps": 1},
                        model={"pretrained_model_name_or_path": str(tiny_model), "base_model_precision": precision,
                               "prompt": {"max_sequence_length": 8}},
                        speed={"guard_on_device": on_device})
    assert run_train(spec, ws).status == "completed" and calls["n"] == 5
    rows = [json.loads(line) for line in (ws.logs_dir / "metrics.jsonl").read_text().splitlines()]
    latest = CheckpointStore(ws.checkpoints_dir).latest()
    optimizer_state = torch.load(latest / "optimizer.pt", weights_only=False)
    summary = json.loads((ws.final_dir / "training_summary.json").read_text())
    return trained_state(ws), optimizer_state, [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows], summary


@pytest.mark.parametrize("optimizer,precision", [("adamw", "fp32"), ("adamw_bf16", "bf16"), ("optimi-adamw", "bf16")])
def test_a_training_run_with_a_nan_step_is_the_same_with_either_guard(tmp_path, tiny_model, monkeypatch, optimizer, precision):
    if optimizer == "optimi-adamw":
        pytest.importorskip("optimi")
    host = _run(tmp_path / "host", tiny_model, monkeypatch, False, optimizer, precision)
    device = _run(tmp_path / "device", tiny_model, monkeypatch, True, optimizer, precision)
    assert device[3]["bad_steps_skipped"] == host[3]["bad_steps_skipped"] == 1
    assert repr(device[2]) == repr(host[2]) and [r[0] for r in host[2]] == [1, 2, 3, 4]
    _assert_same(device[0], host[0])
    _assert_same(device[1], host[1])
