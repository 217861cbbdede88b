"""`optimizer.step()` over the real SANA-Video 2B parameter set: torch fused AdamW vs `adamw_bf16`.

Run on a GPU (one command, about a minute on an H100, the compile of the fused update included):

    PYTHONUNBUFFERED=1 python bench/optimizer_step.py --out optimizer_step.json

It builds the full-size random-weight `SanaVideoTransformer3DModel()` (the 2B config, 496 tensors) in
bf16 on the GPU, gives every parameter a random bf16 gradient, and for each optimizer times
`optimizer.step()` (CUDA events around the call, median of `--iters` after `--warmup` steps; the
first step, which allocates the states and compiles, is reported apart) and the peak memory the step
adds on top of weights, gradients and states:

- `torch-adamw-fused`: `torch.optim.AdamW(fused=True)` on the bf16 weights (bf16 states; what
  `train.optimizer: adamw` runs);
- `adamw_bf16-loop-old`: the `AdamWBF16` of before issue #12 (copied below as the reference: a
  Python loop of ~12 eager ops per tensor with fp32 temporaries, `torch.randint` noise);
- `adamw_bf16-eager`: the current `AdamWBF16(fused=False)` (the CPU path, run on the GPU);
- `adamw_bf16`: the current `AdamWBF16` (one compiled, fused kernel per tensor).

It also checks the compiled update against the eager one on the GPU from identical weights, moments
and gradients (moments: relative error; bf16 weights: share of elements that differ, and by how much),
and the stochastic rounding's mean on the GPU, and measures the device-to-device copy bandwidth to
give the memory floor of the update (22 bytes per parameter: bf16 weight and gradient read, fp32
moments read and written, bf16 weight written).

`--tiny` runs everything on the CPU with the tiny test model (checks the script, not speed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from benchutil import cuda, sync, cleanup  # noqa: E402

GIB = 1024 ** 3
BYTES_PER_PARAM = 2 + 2 + 4 * 4 + 2  # bf16 w, g read; fp32 m, v read + written; bf16 w written


class OldAdamWBF16(torch.optim.Optimizer):
    """`job.train.optimizers.AdamWBF16` as it was before issue #12 (the per-tensor eager loop), for timing."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._seed = seed
        self._generators = {}

    def _generator(self, device):
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self._seed + 7919)
        return gen

    @staticmethod
    def _stochastic_round_(target, source, generator):
        bits = source.contiguous().view(torch.int32)
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
        target.copy_(((bits + noise) & -65536).view(torch.float32))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = state["step"]
                grad = p.grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                weights = p.float()
                if wd:
                    weights.mul_(1 - lr * wd)
                weights.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
                if p.dtype == torch.bfloat16:
                    self._stochastic_round_(p, weights, self._generator(p.device))
                else:
                    p.copy_(weights)


def allocated() -> int:
    return torch.cuda.memory_allocated() if cuda() else 0


def build_params(tiny: bool) -> list[torch.nn.Parameter]:
    from diffusers import SanaVideoTransformer3DModel

    from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

    with torch.device("cuda" if cuda() else "cpu"):
        model = SanaVideoTransformer3DModel(**(TINY_TRANSFORMER_CONFIG if tiny else {}))
    model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=params[0].device).manual_seed(0)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * 1e-3).to(p.dtype)
    return params


def make_optimizer(name: str, params):
    from job.train.optimizers import AdamWBF16

    kw = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    if name == "torch-adamw-fused":
        return torch.optim.AdamW(params, fused=True, **kw) if cuda() else torch.optim.AdamW(params, foreach=True, **kw)
    if name == "adamw_bf16-loop-old":
        return OldAdamWBF16(params, seed=0, **kw)
    if name == "adamw_bf16-eager":
        return AdamWBF16(params, seed=0, fused=False, **kw)
    if name == "adamw_bf16":
        return AdamWBF16(params, seed=0, **kw)
    raise ValueError(name)


def time_steps(opt, warmup: int, iters: int) -> dict:
    before = allocated()
    t = time.perf_counter()
    opt.step()  # allocates the states; compiles the fused update
    sync()
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        opt.step()
    sync()
    steady = allocated()  # weights + gradients + states
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    gpu, host, wall = [], [], []
    for _ in range(iters):
        if cuda():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()  # the host is done issuing: the launch overhead is this, if larger than the GPU time
        if cuda():
            end.record()
        sync()
        wall.append(time.perf_counter() - t0)
        host.append(t1 - t0)
        gpu.append(start.elapsed_time(end) / 1000 if cuda() else wall[-1])
    peak = torch.cuda.max_memory_allocated() if cuda() else 0
    return {"median_s": statistics.median(gpu), "min_s": min(gpu), "max_s": max(gpu), "times_s": gpu,
            "host_issue_median_s": statistics.median(host), "wall_median_s": statistics.median(wall),
            "first_step_s": first, "state_gib": (steady - before) / GIB, "step_transient_gib": (peak - steady) / GIB}


def copy_bandwidth() -> float | None:
    """Device-to-device copy, GB/s counting bytes read + written."""
    if not cuda():
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    sync()
    return 2 * a.numel() * 20 / (start.elapsed_time(end) / 1000) / 1e9


def compare_fused_eager(params) -> dict:
    """Three steps of `AdamWBF16` compiled (the default on CUDA) and eager (`fused=False`) from identical
    weights and gradients, over a sample of the tensors (the largest and the first ones)."""
    from job.train.optimizers import AdamWBF16

    sample = sorted(params, key=lambda p: -p.numel())[:12] + params[:12]
    runs = []
    for fused in (None, False):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in sample]
        for c, p in zip(copies, sample):
            c.grad = p.grad
        opt = AdamWBF16(copies, lr=1e-3, weight_decay=0.01, fused=fused)
        for _ in range(3):
            opt.step()
        runs.append((copies, opt))
    (cw, co), (ew, eo) = runs
    out = {"tensors": len(sample), "elements": sum(p.numel() for p in sample), "compiled_path": sorted(map(str, co._compiled_ok)),
           "weights_differing": 0, "weights_max_diff_bf16_ulps": 0.0, "exp_avg_max_rel": 0.0, "exp_avg_sq_max_rel": 0.0,
           "weights_moved_share": 0.0}
    moved = 0
    for pa, pb, p in zip(cw, ew, sample):
        a, b = pa.detach(), pb.detach()
        differ = a != b
        out["weights_differing"] += int(differ.sum())
        moved += int((b != p).sum())
        if bool(differ.any()):  # in bf16 ulps of the eager value (large where an update cancels a weight to ~0)
            ulp = (b.float().abs() * 2 ** -7).clamp_min(1e-30)
            out["weights_max_diff_bf16_ulps"] = max(out["weights_max_diff_bf16_ulps"], float(((a.float() - b.float()).abs() / ulp).max()))
        for key, name in (("exp_avg_max_rel", "exp_avg"), ("exp_avg_sq_max_rel", "exp_avg_sq")):
            x, y = co.state[pa][name], eo.state[pb][name]  # the state is keyed by the Parameter itself
            out[key] = max(out[key], float((x - y).norm() / y.norm().clamp_min(1e-30)))
    out["weights_differing_share"] = out["weights_differing"] / max(out["elements"], 1)
    out["weights_moved_share"] = moved / max(out["elements"], 1)
    return out


def rounding_mean_on_device() -> dict:
    """Unbiasedness on the device, compiled path: 2**22 weights at 1.0, one Adam step of exactly +2**-10
    (g = -1, lr = 2**-10): an eighth of a bf16 ulp, so 1/8 of them should round up."""
    from job.train.optimizers import AdamWBF16

    device = "cuda" if cuda() else "cpu"
    n, value = 1 << 22, 1.0 + 2 ** -10
    res = {"value": value, "std_error": (2 ** -7) * math.sqrt(0.125 * 0.875 / n)}
    for fused in (None, False):
        w = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=device))
        w.grad = -torch.ones(n, dtype=torch.bfloat16, device=device)
        AdamWBF16([w], lr=2 ** -10, seed=3, fused=fused).step()
        res["compiled_mean" if fused is None else "eager_mean"] = float(w.detach().double().mean())
        res["compiled_weights" if fused is None else "eager_weights"] = w.detach().clone()
    res["eager_equals_compiled"] = bool(torch.equal(res.pop("compiled_weights"), res.pop("eager_weights")))
    res["compiled_error_in_std_errors"] = (res["compiled_mean"] - value) / res["std_error"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("optimizer_step.json"))
    p.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (checks the script, not speed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--optimizers", default="torch-adamw-fused,adamw_bf16-loop-old,adamw_bf16-eager,adamw_bf16")
    args = p.parse_args(argv)
    results: dict = {"environment": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"),
                                     "torch": torch.__version__, "cuda": torch.version.cuda,
                                     "gpu": torch.cuda.get_device_name(0) if cuda() else None},
                     "optimizers": {}}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    params = build_params(args.tiny)
    numel = sum(p.numel() for p in params)
    results["params"] = {"tensors": len(params), "elements": numel}
    results["copy_gb_per_s"] = bw = copy_bandwidth()
    if bw:
        results["memory_floor_s"] = numel * BYTES_PER_PARAM / (bw * 1e9)
    save()
    print(f"{len(params)} tensors, {numel / 1e9:.3f} G parameters; copy {bw} GB/s; floor {results.get('memory_floor_s')} s", flush=True)
    for name in args.optimizers.split(","):
        try:
            cleanup()
            opt = make_optimizer(name, params)
            results["optimizers"][name] = res = time_steps(opt, args.warmup, args.iters)
            print(f"{name}: median {res['median_s'] * 1e3:.2f} ms (host issue {res['host_issue_median_s'] * 1e3:.2f} ms), "
                  f"first {res['first_step_s']:.2f} s, states {res['state_gib']:.2f} GiB, "
                  f"transient {res['step_transient_gib']:.2f} GiB", flush=True)
        except Exception as exc:  # noqa: BLE001
            results["optimizers"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
        finally:
            opt = None
            save()
    for key, fn in (("fused_vs_eager", lambda: compare_fused_eager(params)), ("rounding_mean", rounding_mean_on_device)):
        try:
            cleanup()
            results[key] = fn()
            print(f"{key}: {results[key]}", flush=True)
        except Exception as exc:  # noqa: BLE001
            results[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(f"{key}: FAILED {type(exc).__name__}: {exc}", flush=True)
        save()
    print("\noptimizer            median ms   first s   states GiB   transient GiB")
    for name, res in results["optimizers"].items():
        if "error" in res:
            print(f"{name:20s} error: {res['error'][:80]}")
        else:
            print(f"{name:20s} {res['median_s'] * 1e3:9.2f} {res['first_step_s']:9.2f} {res['state_gib']:12.2f} "
                  f"{res['step_transient_gib']:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
