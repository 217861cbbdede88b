"""Microbenchmark of one SANA-Video block's cross-attention core (video queries -> prompt keys), forward + backward.

Shapes of the 2B model at 81x832x480: 32,760 queries, 20 heads of 112 channels, batch 1; the prompt's key count
after `speed.trim_text_padding` (multiples of 64, at most 300), with diffusers' -10000 bias on the padded keys.
q, k, v are bf16 (B, N, H, D) tensors viewed as (B, H, N, D), as the processors pass them. Variants, each
timed as forward + backward (median, CUDA events) and forward only:

- `sdpa`: `F.scaled_dot_product_attention` as diffusers calls it (on an H100 the cuDNN kernels), eager and compiled;
- `sdpa-efficient`: the same, forced to the memory-efficient backend;
- `dense`: `job.models.sanavideo.cross_attention.dense_backward_attention` (same forward, backward as dense
  products over the score matrix), eager and compiled (how the compiled blocks run it).

Errors of the output and of dq, dk, dv against a float64 reference of the same inputs. `--tiny` checks the
script on the CPU. Run on a GPU:

    PYTHONUNBUFFERED=1 python bench/cross_attention.py --out $OUT/cross_attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from benchutil import cleanup, cuda, errors, median_ms  # noqa: E402

from job.models.sanavideo.cross_attention import dense_backward_attention  # noqa: E402


def sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def sdpa_efficient(q, k, v, bias):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def make_inputs(queries: int, keys: int, valid: int, heads: int, dim: int, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, dim, generator=g, device=device, dtype=dtype) for n in (queries, keys, keys))
    # q and k after the blocks' RMS norms have unit RMS; a learned scale makes the logits spread further
    q = q * 2.0
    bias = torch.zeros(1, heads, 1, keys, device=device, dtype=dtype)
    bias[..., valid:] = -10000.0
    grad_out = torch.randn(1, queries, heads, dim, generator=g, device=device, dtype=dtype)
    return q, k, v, bias, grad_out


def run_variant(fn, q, k, v, bias, grad_out):
    """Forward + backward on (B, H, N, D) views of fresh leaves; returns output and the three gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    views = [t.transpose(1, 2) for t in leaves]
    out = fn(*views, bias)
    out.backward(grad_out.transpose(1, 2))
    return out.detach().transpose(1, 2), [t.grad for t in leaves]


def measure(variants: dict, keys_list: list[int], queries: int, heads: int, dim: int, iters: int, device) -> list[dict]:
    rows = []
    for keys in keys_list:
        valid = keys if keys % 64 else keys - 17  # a padded tail, as after trimming
        q, k, v, bias, grad_out = make_inputs(queries, keys, valid, heads, dim, device, torch.bfloat16)
        ref_out, ref_grads = run_variant(sdpa, *(t.double() for t in (q, k, v, bias, grad_out)))
        for name, fn in variants.items():
            cleanup()
            row = {"keys": keys, "valid_keys": valid, "variant": name}
            try:
                out, grads = run_variant(fn, q, k, v, bias, grad_out)
                row["errors"] = {"out": errors(out, ref_out),
                                 **{f"d{n}": errors(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}
                row["fwd_bwd"] = median_ms(lambda: run_variant(fn, q, k, v, bias, grad_out), 3, iters)

                def forward_only():
                    with torch.no_grad():
                        fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias)
                row["fwd"] = median_ms(forward_only, 3, iters)
                if cuda():
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as exc:  # a backend that refuses these shapes is a result, not a crash
                row["error"] = f"{exc.__class__.__name__}: {exc}"[:500]
                traceback.print_exc()
            print(json.dumps({k: row[k] for k in row if k != "errors"}), flush=True)
            print("   rel errors:", {n: round(e["rel"], 6) for n, e in row.get("errors", {}).items()}, flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (checks the script)")
    ap.add_argument("--keys", default="64,128,192,256,300")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if cuda() and not args.tiny else "cpu")
    queries, heads, dim = (32760, 20, 112) if not args.tiny else (300, 4, 16)
    keys_list = [int(x) for x in args.keys.split(",")] if not args.tiny else [32, 40]
    variants = {"sdpa": sdpa, "dense": dense_backward_attention}
    if device.type == "cuda":
        variants.update({"sdpa-efficient": sdpa_efficient,
                         "sdpa-compiled": torch.compile(sdpa, dynamic=False),
                         "dense-compiled": torch.compile(dense_backward_attention, dynamic=False)})
    rows = measure(variants, keys_list, queries, heads, dim, args.iters if not args.tiny else 2, device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "queries": queries, "heads": heads, "head_dim": dim, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
