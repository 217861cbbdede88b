"""Microbenchmark of one SANA-Video block's feed-forward (GLUMBTempConv): diffusers vs the channels-last variants.

One block's FF at the 2B config (C=2240, mlp_ratio 2.5 -> 5600 hidden, 11200 after conv_inverted) on
the latent grid of 81x832x480 (F=21, H=30, W=52: 32,760 tokens), bf16 weights and activations:

- `diffusers` eager and compiled (stock `GLUMBTempConv.forward`: cuDNN convs on NCHW views);
- `job.models.sanavideo.speed.glumb_forward_channels_last` compiled, for each depthwise variant
  (`conv`: cuDNN on an NHWC view; `shifted`: 9 shifted slices fused with SiLU/gate) and each temporal
  variant (`one`: one matmul to 3C + shifted sum; `three`: three shifted matmuls), and the default
  variant eagerly (the job runs it only inside compiled blocks; this row says why).

For each: median fwd+bwd time (inputs and all parameters get gradients) and forward-only time,
TFLOP/s on the model FLOPs, and the relative error of output, input gradient and parameter
gradients against a float32 reference (the same module in float32). `--tiny` checks the script on
the CPU. Run on a GPU:

    PYTHONUNBUFFERED=1 python bench/ff_microbench.py --out ff.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from benchutil import cuda, median_ms, sync  # noqa: E402


def median_time(fn, warmup: int, iters: int) -> float:
    return median_ms(fn, warmup, iters)["median_ms"] / 1000


def ff_flops(tokens: int, c: int, hidden: int) -> float:
    """Forward FLOPs: two 1x1 convs, the temporal conv (3 taps), the depthwise 3x3."""
    return 2 * tokens * (c * 2 * hidden + hidden * c + 3 * c * c + 9 * 2 * hidden)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    from diffusers.models.transformers.transformer_sana_video import GLUMBTempConv

    from job.models.sanavideo import speed as S

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("ff_microbench.json"))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--dim", type=int, default=2240)
    p.add_argument("--mlp-ratio", type=float, default=2.5)
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--height", type=int, default=30)
    p.add_argument("--width", type=int, default=52)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager checks the script quickly on the CPU)")
    p.add_argument("--profile", action="store_true", help="top kernels of one fwd+bwd of diffusers-compiled and the fused variants")
    args = p.parse_args(argv)
    if args.tiny:
        args.dim, args.frames, args.height, args.width, args.iters = 16, 3, 4, 6, 2
    device = "cuda" if cuda() else "cpu"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    ff = GLUMBTempConv(args.dim, args.dim, args.mlp_ratio, norm_type=None, residual_connection=False).to(device, dtype)
    hidden = ff.conv_point.in_channels
    tokens = args.frames * args.height * args.width
    flops = ff_flops(tokens, args.dim, hidden)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, args.frames, args.height, args.width, args.dim, device=device, generator=g).to(dtype).requires_grad_(True)
    gout = torch.randn(x.shape, device=device, generator=g).to(dtype)
    results = {"environment": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda() else "cpu"},
               "args": {k: str(v) for k, v in vars(args).items()}, "tokens": tokens, "fwd_tflop": flops / 1e12, "variants": {}}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    # float32 reference: the same module and inputs in float32, diffusers' forward
    ref_ff = copy.deepcopy(ff).float()
    xr = x.detach().float().requires_grad_(True)
    out_ref = ref_ff(xr)
    out_ref.backward(gout.float())
    ref = {"out": out_ref.detach(), "x": xr.grad.detach(), **{n: q.grad.detach() for n, q in ref_ff.named_parameters()}}
    del ref_ff, xr, out_ref
    params = dict(ff.named_parameters())

    def fwd_bwd(fn):
        x.grad = None
        for q in params.values():
            q.grad = None
        out = fn(x)
        out.backward(gout)
        return out

    def forward_only(fn):
        with torch.no_grad():
            return fn(x)

    diffusers_forward = functools.partial(type(ff).forward, ff)
    variants = {"diffusers eager": (diffusers_forward, False),
                "diffusers compiled": (diffusers_forward, True),
                "fused eager (default variant)": (functools.partial(S.glumb_forward_channels_last, ff), False)}
    for d in ("conv", "shifted"):
        for t in ("one", "three"):
            variants[f"fused compiled dw={d} temporal={t}"] = (
                functools.partial(S.glumb_forward_channels_last, ff, depthwise=d, temporal=t), True)

    for name, (fn, compiled) in variants.items():
        res = {}
        try:
            if compiled:
                torch._dynamo.reset()
                fn = torch.compile(fn, backend=args.backend)
            t0 = time.perf_counter()
            out = fwd_bwd(fn)
            sync()
            res["first_call_s"] = time.perf_counter() - t0
            res["rel_err_out"] = rel(out.detach(), ref["out"])
            res["rel_err_grad_x"] = rel(x.grad, ref["x"])
            res["rel_err_grad_params_max"] = max(rel(q.grad, ref[n]) for n, q in params.items())
            res["fwd_bwd_ms"] = 1000 * median_time(lambda: fwd_bwd(fn), args.warmup, args.iters)
            res["fwd_bwd_tflops"] = 3 * flops / (res["fwd_bwd_ms"] / 1000) / 1e12
            forward_only(fn)  # the no-grad graph compiles here
            res["fwd_ms"] = 1000 * median_time(lambda: forward_only(fn), args.warmup, args.iters)
            res["fwd_tflops"] = flops / (res["fwd_ms"] / 1000) / 1e12
            if args.profile and compiled:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])) as prof:
                    fwd_bwd(fn)
                    sync()
                key = "self_cuda_time_total" if cuda() else "self_cpu_time_total"
                res["profile"] = prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60)
        except Exception as exc:  # noqa: BLE001 - keep the other variants
            res["error"] = f"{type(exc).__name__}: {exc}"
            res["trace"] = traceback.format_exc()[-2000:]
        results["variants"][name] = res
        save()
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in res.items() if k not in ("profile", "trace")), flush=True)

    print(f"\nFF of one block, {tokens} tokens, C={args.dim}, hidden={hidden}: {flops / 1e12:.3f} TFLOP forward")
    print("| variant | fwd+bwd ms | TFLOP/s | fwd ms | out err | grad x err | max param grad err |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results["variants"].items():
        if "error" in r:
            print(f"| {name} | error: {r['error'][:80]} | | | | | |")
            continue
        print(f"| {name} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} | {r['fwd_ms']:.2f} | {r['rel_err_out']:.1e} | "
              f"{r['rel_err_grad_x']:.1e} | {r['rel_err_grad_params_max']:.1e} |")
    if args.profile:
        for name, r in results["variants"].items():
            if "profile" in r:
                print(f"\n== {name}\n" + "\n".join(r["profile"].splitlines()[:18]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
