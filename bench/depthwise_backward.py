"""Microbenchmark of the feed-forward's depthwise 3x3 convolution, forward + backward, cuDNN's data gradient vs
the rotated-kernel forward convolution (`job.models.sanavideo.speed.DepthwiseConv3x3`).

Shape of one block of the 2B model at 81x832x480, batch 1: (21 frames, 11,200 channels, 30 x 52), bf16,
channels-last (as the fused feed-forward runs it). For each way, timed as forward + backward (median, CUDA events):
with a frozen weight (LoRA: input gradient only) and a trained one (full: input, weight and bias gradients).
Errors of the gradients against the same convolution in float64. `--tiny` checks the script on the CPU.

    PYTHONUNBUFFERED=1 python bench/depthwise_backward.py --out $OUT/depthwise_backward.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from benchutil import cleanup, cuda, errors, median_ms  # noqa: E402

from job.models.sanavideo import speed  # noqa: E402


def run(conv, u, grad_out, how: str):
    """(N, H, W, C) input `u` through the fused feed-forward's depthwise conv; output and gradients."""
    speed.DEPTHWISE_INPUT_GRAD = how
    leaf = u.detach().clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    out = speed._depthwise3x3_conv(leaf, conv)
    out.backward(grad_out)
    grads = [leaf.grad] + ([conv.weight.grad, conv.bias.grad] if conv.weight.requires_grad else [])
    return out.detach(), grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if cuda() and not args.tiny else "cpu")
    n, c, h, w = (21, 11200, 30, 52) if not args.tiny else (2, 32, 5, 7)
    g = torch.Generator(device=device).manual_seed(0)
    u = torch.randn(n, h, w, c, generator=g, device=device, dtype=torch.bfloat16)
    grad_out = torch.randn(n, h, w, c, generator=g, device=device, dtype=torch.bfloat16)
    rows = []
    for trained in (False, True):
        conv = torch.nn.Conv2d(c, c, 3, padding=1, groups=c).to(device, torch.bfloat16).requires_grad_(trained)
        ref64 = torch.nn.Conv2d(c, c, 3, padding=1, groups=c).to(device, torch.float64).requires_grad_(trained)
        ref64.load_state_dict(conv.state_dict())
        _, ref_grads = run(ref64, u.double(), grad_out.double(), "cudnn")
        for how in ("cudnn", "rotated"):
            cleanup()
            _, grads = run(conv, u, grad_out, how)
            row = {"weight": "trained" if trained else "frozen", "input_grad": how,
                   "errors": {name: errors(got, want) for name, got, want in zip(("dx", "dw", "db"), grads, ref_grads)},
                   "fwd_bwd": median_ms(lambda: run(conv, u, grad_out, how), 3, args.iters if not args.tiny else 2)}
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(json.dumps({"weight": row["weight"], "input_grad": how, "fwd_bwd_ms": round(row["fwd_bwd"]["median_ms"], 3),
                              "rel": {k: round(v["rel"], 6) for k, v in row["errors"].items()}}), flush=True)
            rows.append(row)
    speed.DEPTHWISE_INPUT_GRAD = "rotated"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                        "torch": torch.__version__, "shape_nchw": [n, c, h, w], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
