"""The fused feed-forward's elementwise backward: Triton kernels (`job/models/sanavideo/ff_grad.py`) vs the
same work compiled by inductor, at one block's size (81x832x480: 32,760 tokens, 2C = 11,200 channels).

    python bench/ff_grad.py --out ff_grad.json

Two passes, each with the sum over tokens a bias gradient needs:
- gate: gd = (gx * silu(g), gx * a * silu'(g)) from d (tokens, 2C) and gx (tokens, C);
- silu: gv = gu * silu'(v + b) from gu, v (tokens, 2C) and conv_inverted's bias b, then what the float8 product does with gv (amax, cast),
  once fused by inductor with the gradient (its choice), once on the kernel's output.
Prints median ms (CUDA events, after warm-up), the bytes each pass must move at least and the bandwidth
that makes, and the largest difference to a float64 reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from job.models.sanavideo import ff_grad  # noqa: E402

CONFIGS = [(32, 128, 4, 32), (16, 256, 4, 32), (64, 64, 4, 32), (32, 64, 4, 64), (32, 256, 8, 16), (64, 128, 8, 32),
           (16, 128, 4, 64), (8, 256, 4, 64), (32, 128, 4, 16)]
F8 = torch.float8_e4m3fn
F8_MAX = torch.finfo(F8).max


def cast_fp8(t):
    """Tensorwise float8 cast as torchao's dynamic scaling does it (amax over the tensor, scale, clamp)."""
    amax = t.abs().max().float()
    scale = F8_MAX / amax.clamp(min=1e-12)
    return (t.float() * scale).clamp(-F8_MAX, F8_MAX).to(F8), scale


def gate_inductor(d, gx):
    a, g = d.chunk(2, dim=-1)
    gd = torch.cat([gx * torch.nn.functional.silu(g), torch.ops.aten.silu_backward(gx * a, g)], dim=-1)
    return gd, gd.float().sum(0)


def silu_inductor(gu, v, b):
    gv = torch.ops.aten.silu_backward(gu, v + b)
    return gv, gv.float().sum(0), cast_fp8(gv)


def timed(fn, warmup=3, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("ff_grad.json"))
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--channels", type=int, default=5600, help="C: half of the 2C channels of v")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    n, c = args.tokens, args.channels
    d, v, gu = (torch.randn(n, 2 * c, device=dev, dtype=bf) for _ in range(3))
    gx = torch.randn(n, c, device=dev, dtype=bf)
    b = torch.randn(2 * c, device=dev, dtype=bf)
    elt = 2  # bytes per bf16
    bytes_gate = n * (2 * c * elt * 2 + c * elt)  # read d, gx; write gd
    bytes_silu = n * 2 * c * elt * 3  # read gu, v; write gv
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": n, "channels_2c": 2 * c}

    def record(name, ms, nbytes):
        res[name] = {"ms": ms, "gb_per_s": nbytes / ms / 1e6}
        print(f"{name}: {ms:.3f} ms, {nbytes / ms / 1e6:.0f} GB/s on the fewest bytes", flush=True)

    gate_c, silu_c, cast_c = torch.compile(gate_inductor), torch.compile(silu_inductor), torch.compile(cast_fp8)
    record("gate_inductor", timed(lambda: gate_c(d, gx)), bytes_gate)
    record("silu_inductor_with_cast", timed(lambda: silu_c(gu, v, b)), bytes_silu)
    gv_ref = silu_c(gu, v, b)[0]
    record("cast_inductor_alone", timed(lambda: cast_c(gv_ref)), n * 2 * c * (elt * 2 + 1))
    copy_out = torch.empty_like(d)
    record("copy_2c", timed(lambda: copy_out.copy_(d)), n * 2 * c * elt * 2)

    # errors against float64
    rd = ff_grad.gate_backward_reference(d.double(), gx.double(), True)
    rv = ff_grad.silu_backward_reference(gu.double(), v.double(), b.double(), True)
    for cfg in CONFIGS:
        try:
            gd, sd = ff_grad.gate_backward(d, gx, True, cfg)
            gv, sv = ff_grad.silu_backward(gu, v, b, True, cfg)
            err = {"gate": (gd.double() - rd[0]).abs().max().item(), "gate_sum": ((sd.double() - rd[1]).norm() / rd[1].norm()).item(),
                   "silu": (gv.double() - rv[0]).abs().max().item(), "silu_sum": ((sv.double() - rv[1]).norm() / rv[1].norm()).item()}
            name = "x".join(map(str, cfg))
            record(f"gate_triton_{name}", timed(lambda: ff_grad.gate_backward(d, gx, True, cfg)), bytes_gate)
            record(f"silu_triton_{name}", timed(lambda: ff_grad.silu_backward(gu, v, b, True, cfg)), bytes_silu)
            record(f"silu_triton_{name}_then_cast", timed(lambda: cast_c(ff_grad.silu_backward(gu, v, b, True, cfg)[0])),
                   bytes_silu)
            res[f"errors_{name}"] = err
            print(f"  errors {err}", flush=True)
        except Exception as exc:  # noqa: BLE001
            res[f"error_{cfg}"] = f"{type(exc).__name__}: {exc}"
            print(f"config {cfg}: {type(exc).__name__}: {exc}", flush=True)
    gd, sd = gate_c(d, gx)
    gv, sv, _ = silu_c(gu, v, b)
    res["errors_inductor"] = {"gate": (gd.double() - rd[0]).abs().max().item(), "gate_sum": ((sd.double() - rd[1]).norm() / rd[1].norm()).item(),
                              "silu": (gv.double() - rv[0]).abs().max().item(), "silu_sum": ((sv.double() - rv[1]).norm() / rv[1].norm()).item()}
    print(f"  errors inductor {res['errors_inductor']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
