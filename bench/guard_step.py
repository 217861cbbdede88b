"""The NaN/inf guard decided on the device (`speed.guard_on_device`, `job.train.guard`) against the host's decision.

Run on a GPU (one command, a few minutes on an H100, the compile of `adamw_bf16`'s fused update included):

    PYTHONUNBUFFERED=1 python bench/guard_step.py --out guard_step.json

A stand-in for the transformer with only torch (no diffusers, no weights): `--blocks` residual MLP blocks
(LayerNorm, Linear d->4d, GELU, Linear 4d->d) over `--tokens` tokens, bf16. Two jobs: `full` (every weight
trained, bf16) and `lora` (the base frozen, rank-64 float32 adapters on both Linears of each block). For each
job and optimizer (`adamw`: torch's fused AdamW; `adamw_bf16`: `AdamWBF16`, its compiled update on bf16
weights, torch's fused kernel on the float32 adapters) three ways to end a step:

- `before`: what `train_step` did before: `float(loss)`, clip, `float(norm)`, then `optimizer.step()`;
- `host`:   `guarded_step(on_device=False)`: clip, one read of loss and norm, then the step;
- `device`: `guarded_step(on_device=True)`: clip and the step queued with the verdict on the device, then one read.

Per way: host syncs in the tail of a step (clip + guard + step), counted by `torch.cuda.set_sync_debug_mode`
(each synchronising call warns); wall time per step over `--iters` back-to-back steps (median of `--repeats`);
and, from the same start, 6 steps with a NaN loss at the fourth, compared bit for bit (weights, optimizer
state, losses, norms) with `before`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.train.guard import guarded_step  # noqa: E402
from job.train.optimizers import AdamWBF16  # noqa: E402


class Lora(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / base.in_features ** 0.5)
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device) + 1e-3)

    def forward(self, x):
        return self.base(x) + ((x.float() @ self.down.t()) @ self.up.t()).to(x.dtype)


class Block(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = torch.nn.LayerNorm(d), torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def build(job: str, d: int, blocks: int, seed: int = 0) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[Block(d) for _ in range(blocks)]).cuda().to(torch.bfloat16)
    if job == "lora":
        model.requires_grad_(False)
        for block in model:
            block.fc1, block.fc2 = Lora(block.fc1, 64), Lora(block.fc2, 64)
    return model, [p for p in model.parameters() if p.requires_grad]


def make_optimizer(name: str, params):
    kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    return torch.optim.AdamW(params, fused=True, **kw) if name == "adamw" else AdamWBF16(params, seed=1, **kw)


def step(model, params, opt, x, way: str, nan: bool = False, count: list | None = None):
    loss = model(x).float().pow(2).mean()
    if nan:
        loss = loss * float("nan")
    loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if count is not None:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            if way == "before":
                loss_value = float(loss.detach())
                norm_value = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
                if loss_value == loss_value and norm_value == norm_value:
                    opt.step()
            else:
                loss_value, norm_value, _ = guarded_step(opt, loss.detach(), torch.nn.utils.clip_grad_norm_(params, 1.0),
                                                         on_device=way == "device")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    if count is not None:
        count.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))
    opt.zero_grad(set_to_none=True)
    return loss_value, norm_value


def run(job: str, name: str, args) -> dict:
    x = torch.randn(args.tokens, args.d, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(torch.bfloat16)
    out: dict = {}
    reference = None
    for way in ("before", "host", "device"):
        model, params = build(job, args.d, args.blocks)
        opt = make_optimizer(name, params)
        history = [step(model, params, opt, x, way, nan=i == 3) for i in range(6)]
        state = (copy.deepcopy([p.detach().cpu() for p in params]), copy.deepcopy(_cpu(opt.state_dict())))
        if reference is None:
            reference = (history, state)
        same = repr(history) == repr(reference[0]) and _equal(state, reference[1])
        syncs: list[str] = []
        step(model, params, opt, x, way, count=syncs)  # warm (compiled) by now: a steady-state step
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.iters):
                step(model, params, opt, x, way)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / args.iters)
        out[way] = {"step_s": statistics.median(times), "step_s_all": times, "host_syncs_in_tail": len(syncs),
                    "sync_calls": sorted(set(syncs)), "bitwise_same_as_before": same,
                    "skipped_history": repr(history[3])}
        print(job, name, way, json.dumps(out[way]), flush=True)
        del model, params, opt
        torch.cuda.empty_cache()
    return out


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="guard_step.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    for job in ("full", "lora"):
        for name in ("adamw", "adamw_bf16"):
            results[f"{job}/{name}"] = run(job, name, args)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
