"""The float8 products of one block at 81x832x480 (32,760 tokens): how fast each of the three products of a
linear layer (forward, input gradient, weight gradient) runs as `torch._scaled_mm` with each setting a
float8 recipe can choose, against the bf16 product; and how exact each recipe is end to end (torchao's
float8 training matmul, as `quantize.Float8Product` calls it, against float64).

    python bench/fp8_gemm.py --out fp8_gemm.json

Why: which float8 settings could make the step's products faster (torchao's recipe runs the input-gradient products
without cuBLAS's fast accumulation and with an e5m2 gradient, the weight-gradient product in bf16 here), and at what
cost in accuracy. bench/NOTES.md items 31-33.

Shapes: the block's linear layers as (out, in) = the attention projections (2240, 2240), the feed-forward's
up (11200, 2240), down (2240, 5600) and temporal (6720, 2240) products.
Timing: CUDA events, median of `--iters` after warm-up; operands laid out as torchao lays them out
(`_scaled_mm` needs its second operand column-major).
Accuracy inputs: x ~ N(0, 1); the weight ~ N(0, 0.02); the output gradient heavy-tailed (N(0, 1) x
exp(1.5 N(0, 1)) x 1e-4) so that the e4m3 gradient's narrower range shows up if it matters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from benchutil import cleanup, errors, median_ms  # noqa: E402

TOKENS = 32760
SHAPES = {"attn_2240x2240": (2240, 2240), "ff_up_11200x2240": (11200, 2240), "ff_down_2240x5600": (2240, 5600),
          "temporal_6720x2240": (6720, 2240)}
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(t: torch.Tensor, dtype, rowwise_dim: int | None = None):
    """Dynamic cast: one scale for the tensor, or one per row along `rowwise_dim` (amax over the other dim)."""
    amax = t.abs().amax() if rowwise_dim is None else t.abs().amax(dim=1 - rowwise_dim, keepdim=True)
    scale = torch.finfo(dtype).max / amax.float().clamp(min=1e-12)
    bits = (t.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return bits, scale.reciprocal()


def gemm_timings(out_f: int, in_f: int, iters: int) -> dict:
    """Each product of `y = x W^T` with each float8 setting, TFLOP/s from 2 M N K."""
    dev = "cuda"
    m = TOKENS
    m_pad = (m + 15) // 16 * 16  # the weight gradient's inner size must be a multiple of 16 in float8
    x = torch.randn(m, in_f, device=dev, dtype=torch.bfloat16)
    w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16) * 0.02
    g = torch.randn(m, out_f, device=dev, dtype=torch.bfloat16)
    flop = 2 * m * out_f * in_f
    res = {}

    def record(name, fn):
        t = median_ms(fn, warmup=5, iters=iters)
        res[name] = {"median_ms": round(t["median_ms"], 4), "tflops": round(flop / t["median_ms"] / 1e9, 1)}

    # forward: x (m, in) @ W^T (in, out), W^T column-major
    record("fwd_bf16", lambda: x @ w.t())
    xq, xs = to_fp8(x, E4M3)
    wq, ws = to_fp8(w, E4M3)
    for fast in (True, False):
        record(f"fwd_e4m3_tensorwise_fast{int(fast)}",
               lambda fast=fast: torch._scaled_mm(xq, wq.t(), xs, ws, out_dtype=torch.bfloat16, use_fast_accum=fast))
    xr, xrs = to_fp8(x, E4M3, rowwise_dim=0)
    wr, wrs = to_fp8(w, E4M3, rowwise_dim=0)
    record("fwd_e4m3_rowwise", lambda: torch._scaled_mm(xr, wr.t(), xrs, wrs.t(), out_dtype=torch.bfloat16,
                                                         use_fast_accum=True))
    # input gradient: g (m, out) @ W (out, in), W column-major: the contiguous (in, out) transpose, viewed back
    record("dgrad_bf16", lambda: g @ w)
    wtq = wq.t().contiguous().t()
    for gdtype, gname in ((E5M2, "e5m2"), (E4M3, "e4m3")):
        gq, gs = to_fp8(g, gdtype)
        for fast in (False, True):
            record(f"dgrad_{gname}_tensorwise_fast{int(fast)}",
                   lambda gq=gq, gs=gs, fast=fast: torch._scaled_mm(gq, wtq, gs, ws, out_dtype=torch.bfloat16,
                                                                   use_fast_accum=fast))
    gr, grs = to_fp8(g, E4M3, rowwise_dim=0)
    wcr, wcrs = to_fp8(w, E4M3, rowwise_dim=1)  # one scale per input channel: the product's output columns
    wcr_col = wcr.t().contiguous().t()
    record("dgrad_e4m3_rowwise", lambda: torch._scaled_mm(gr, wcr_col, grs, wcrs, out_dtype=torch.bfloat16,
                                                          use_fast_accum=True))
    # weight gradient: g^T (out, m) @ x (m, in): g^T row-major, x column-major (the token dim padded for float8)
    record("wgrad_bf16", lambda: g.t() @ x)
    gp = torch.nn.functional.pad(g, (0, 0, 0, m_pad - m))
    xp = torch.nn.functional.pad(x, (0, 0, 0, m_pad - m))
    xtq, xts = to_fp8(xp.t().contiguous(), E4M3)
    for gdtype, gname in ((E5M2, "e5m2"), (E4M3, "e4m3")):
        gtq, gts = to_fp8(gp.t().contiguous(), gdtype)
        for fast in (False, True):
            record(f"wgrad_{gname}_tensorwise_fast{int(fast)}",
                   lambda gtq=gtq, gts=gts, fast=fast: torch._scaled_mm(gtq, xtq.t(), gts, xts,
                                                                       out_dtype=torch.bfloat16, use_fast_accum=fast))
    return res


def recipes():
    """The configurations `quantize._fp8_training_config` builds (with and without `speed.fp8_fast_accumulation`,
    and with each bench switch), plus fast accumulation in all three products, which it has no switch for."""
    from unittest import mock

    from torchao.float8 import Float8GemmConfig, Float8LinearConfig

    from job.train import quantize

    def config(fast_input_gradient: bool, **switches):
        with contextlib.ExitStack() as patches:
            for name, value in switches.items():
                patches.enter_context(mock.patch.object(quantize, name, value))
            return quantize._fp8_training_config(fast_input_gradient)

    fast = Float8GemmConfig(use_fast_accum=True)
    # the names of fp8_gemm_h100.json; "shipped" is the configuration before speed.fp8_fast_accumulation
    return {
        "shipped (tensorwise, dgrad e5m2, gw bf16)": config(False),
        "dgrad fast accumulation": config(True),
        "dgrad fast accumulation, e4m3 gradient": config(True, FP8_GRADIENT_E4M3=True),
        "gw float8 (tensorwise default)": config(False, FP8_WEIGHT_GRADIENT=True),
        "gw float8, fast accumulation everywhere": Float8LinearConfig(
            pad_inner_dim=True, gemm_config_grad_input=fast, gemm_config_grad_weight=fast),
        "rowwise_with_gw_hp": config(False, FP8_RECIPE="rowwise_with_gw_hp"),
    }


def recipe_accuracy(out_f: int, in_f: int) -> dict:
    """Output, input-gradient and weight-gradient errors of each recipe against float64 (same bf16 inputs)."""
    from job.train.quantize import Float8Product

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(TOKENS, in_f, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(out_f, in_f, device="cuda", generator=gen) * 0.02).bfloat16()
    g = (torch.randn(TOKENS, out_f, device="cuda", generator=gen)
         * torch.exp(1.5 * torch.randn(TOKENS, out_f, device="cuda", generator=gen)) * 1e-4).bfloat16()
    xd, wd, gd = x.double(), w.double(), g.double()
    ref = {"out": xd @ wd.t(), "dx": gd @ wd, "dw": gd.t() @ xd}
    res = {}
    cases = {"bf16": None, **recipes()}
    for name, config in cases.items():
        xi = x.clone().requires_grad_()
        wi = w.clone().requires_grad_()
        out = torch.nn.functional.linear(xi, wi) if config is None else Float8Product(config)(xi, wi)
        out.backward(g)
        res[name] = {k: round(errors(v, ref[k])["rel"], 6) for k, v in (("out", out), ("dx", xi.grad), ("dw", wi.grad))}
        del xi, wi, out
    del ref
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("fp8_gemm.json"))
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    import torchao

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "torchao": torchao.__version__,
              "tokens": TOKENS, "gemms": {}, "accuracy": {}}
    for name, (out_f, in_f) in SHAPES.items():
        result["gemms"][name] = gemm_timings(out_f, in_f, args.iters)
        cleanup()
        print(f"[gemm] {name}: " + ", ".join(f"{k} {v['median_ms']:.3f} ms ({v['tflops']:.0f})"
                                             for k, v in result["gemms"][name].items()), flush=True)
    for name, (out_f, in_f) in SHAPES.items():
        result["accuracy"][name] = recipe_accuracy(out_f, in_f)
        cleanup()
        print(f"[accuracy] {name}: {json.dumps(result['accuracy'][name])}", flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
