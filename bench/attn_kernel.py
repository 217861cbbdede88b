"""The linear attention's two token reductions as Triton kernels (`job/models/sanavideo/attn_kernel.py`) against
the float32 einsums they replace (`FusedLinearAttnProcessor`, compiled), for validation inference (no grad,
batch 2 for CFG), at the model's shapes: q, k, v, q_rot, k_rot (B=2, N=32,760, H=20, C=112) bf16.

Recorded as each part finishes (a failing configuration is recorded and the rest still run):
- `current`: the processor's einsum path from the five bf16 tensors to the bf16 output, compiled (inductor).
- each tile configuration of the two kernels alone (scores + key_sum, then the output), and the custom op
  with the fastest pair; median ms of `--iters`, GB/s on the fewest bytes (each input read once, the output
  written once), a device-to-device copy for the bandwidth ceiling;
- errors of the op and of the current path vs a float64 reference, and vs each other; repeat equality.

    PYTHONUNBUFFERED=1 python bench/attn_kernel.py --out attn_kernel.json
    python bench/attn_kernel.py --tiny      # checks the script on the CPU (Triton's interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if "--tiny" in sys.argv:  # Triton's interpreter: read when triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRAINER_TRITON_ON_CPU", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from benchutil import cleanup, cuda, errors, median_ms  # noqa: E402

#: (TOKENS_PER_SPLIT, BLOCK_N, num_warps) of the scores kernel, and (BLOCK_N, num_warps) of the output kernel
SCORES_CONFIGS = [(2048, 64, 4), (1024, 64, 4), (4096, 64, 4), (2048, 128, 4), (1024, 32, 4), (2048, 32, 4),
                  (2048, 64, 8), (1024, 64, 8)]
APPLY_CONFIGS = [(128, 4), (64, 4), (256, 4), (128, 8), (32, 4)]  # (64, 2): 18 ms (register spills)


def make_inputs(b, n, h, c, device, seed=1):
    """q, k after ReLU, v, and the rotary versions of q, k (random angles), bf16, (B, N, H, C) views of
    (B, N, H * C) projections as in the model."""
    from job.models.sanavideo.speed import _rotate

    g = torch.Generator(device).manual_seed(seed)

    def proj():
        return torch.randn(b, n, h * c, device=device, generator=g).to(torch.bfloat16).unflatten(2, (h, -1))

    q, k, v = torch.relu(proj()), torch.relu(proj()), proj()
    angle = torch.rand(1, n, 1, c, device=device, generator=g) * 6.3
    cos, sin = angle.cos(), angle.sin()
    return q, k, v, _rotate(q, cos, sin), _rotate(k, cos, sin)


def current_path(q, k, v, q_rot, k_rot):
    """`FusedLinearAttnProcessor`'s einsums, as the processor runs them without the kernels."""
    key_sum = k.float().sum(dim=1)
    z = 1.0 / (torch.einsum("bnhc,bhc->bnh", q.float(), key_sum) + 1e-15)
    scores = torch.einsum("bnhc,bnhd->bhcd", v.float(), k_rot.float())
    out = torch.einsum("bhcd,bnhd->bnhc", scores, q_rot.float()) * z.unsqueeze(-1)
    return out.flatten(2).to(q.dtype)


def main(argv=None) -> int:
    from job.models.sanavideo import attn_kernel as K

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("attn_kernel.json"))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--head-dim", type=int, default=112)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--backend", default="inductor")
    args = p.parse_args(argv)
    scores_configs, apply_configs = SCORES_CONFIGS, APPLY_CONFIGS
    if args.tiny:
        args.tokens, args.heads, args.iters, args.warmup, args.backend = 150, 2, 2, 1, "aot_eager"
        scores_configs, apply_configs = [(64, 32, 4), (128, 64, 4)], [(32, 4), (64, 4)]
    device = "cuda" if cuda() else "cpu"
    results = {"environment": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda() else "cpu",
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
               "args": {k: str(v) for k, v in vars(args).items()}}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    b, n, h, c = args.batch, args.tokens, args.heads, args.head_dim
    q, k, v, q_rot, k_rot = make_inputs(b, n, h, c, device)
    tensor_bytes = q.numel() * q.element_size()
    results["bytes_min"] = {"scores": 3 * tensor_bytes, "apply": 3 * tensor_bytes, "total": 6 * tensor_bytes}
    flop = 2 * b * h * n * c * c * 2
    results["tflop"] = flop / 1e12
    try:
        copy_t = median_ms(lambda: q.clone(), args.warmup, args.iters)
        results["copy_of_q"] = {**copy_t, "gb_s": 2 * tensor_bytes / copy_t["median_ms"] / 1e6}
        with torch.no_grad():
            exact = K.reference(*(t.double() for t in (q, k, v, q_rot, k_rot))).flatten(2)
            exact_scores = torch.einsum("bnhc,bnhd->bhcd", v.double(), k_rot.double())
        torch._dynamo.reset()
        compiled = torch.compile(current_path, backend=args.backend)
        with torch.no_grad():
            cur = compiled(q, k, v, q_rot, k_rot)
            t = median_ms(lambda: compiled(q, k, v, q_rot, k_rot), args.warmup, args.iters)
        results["current_compiled"] = {**t, "vs_fp64": errors(cur, exact),
                                       "gb_s": results["bytes_min"]["total"] / t["median_ms"] / 1e6}
        print(f"[current] compiled einsums: {t['median_ms']:.3f} ms, rel vs fp64 "
              f"{results['current_compiled']['vs_fp64']['rel']:.2e}", flush=True)
    except Exception as exc:  # noqa: BLE001
        results["current_compiled"] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        print(f"[current] failed: {results['current_compiled']['error']}", flush=True)
        cur = exact = exact_scores = None
    save()

    res = results.setdefault("scores", {})
    for cfg in scores_configs:
        name = "split=%d n=%d warps=%d" % cfg
        try:
            s, ks = K.scores_and_key_sum(v, k_rot, k, cfg)
            r = {"vs_fp64": errors(s[..., :c, :c], exact_scores) if exact_scores is not None else None}
            r.update(median_ms(lambda: K.scores_and_key_sum(v, k_rot, k, cfg), args.warmup, args.iters))
            r["gb_s"] = results["bytes_min"]["scores"] / r["median_ms"] / 1e6
        except Exception as exc:  # noqa: BLE001
            r = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        res[name] = r
        save()
        print(f"[scores] {name}: " + (f"{r['median_ms']:.3f} ms, {r['gb_s']:.0f} GB/s" if "error" not in r else r["error"]),
              flush=True)
    timed = {nm: r["median_ms"] for nm, r in res.items() if "median_ms" in r}
    best_scores = next(cf for cf in scores_configs if "split=%d n=%d warps=%d" % cf == min(timed, key=timed.get))
    K.DEFAULT_SCORES_CONFIG = best_scores
    s, ks = K.scores_and_key_sum(v, k_rot, k)

    res = results.setdefault("apply", {})
    for cfg in apply_configs:
        name = "n=%d warps=%d" % cfg
        try:
            out = torch.full(q.shape, float("nan"), device=device, dtype=q.dtype)
            K.apply_scores(q, q_rot, s, ks, out, cfg)
            r = {"vs_fp64": errors(out.flatten(2), exact) if exact is not None else None,
                 "vs_current": errors(out.flatten(2), cur) if cur is not None else None}
            r.update(median_ms(lambda: K.apply_scores(q, q_rot, s, ks, out, cfg), args.warmup, args.iters))
            r["gb_s"] = results["bytes_min"]["apply"] / r["median_ms"] / 1e6
        except Exception as exc:  # noqa: BLE001
            r = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        res[name] = r
        save()
        print(f"[apply] {name}: " + (f"{r['median_ms']:.3f} ms, {r['gb_s']:.0f} GB/s" if "error" not in r else r["error"]),
              flush=True)
    timed = {nm: r["median_ms"] for nm, r in res.items() if "median_ms" in r and r["vs_fp64"] is not None
             and r["vs_fp64"]["nonfinite"] == 0}
    best_apply = next(cf for cf in apply_configs if "n=%d warps=%d" % cf == min(timed, key=timed.get))
    K.DEFAULT_APPLY_CONFIG = best_apply

    try:
        with torch.no_grad():
            op = torch.ops.trainer.linear_attention(q, k, v, q_rot, k_rot)
            again = torch.ops.trainer.linear_attention(q, k, v, q_rot, k_rot)
            t = median_ms(lambda: torch.ops.trainer.linear_attention(q, k, v, q_rot, k_rot), args.warmup, args.iters)
        r = {**t, "scores_config": list(best_scores), "apply_config": list(best_apply),
             "gb_s": results["bytes_min"]["total"] / t["median_ms"] / 1e6, "repeat_equal": bool(torch.equal(op, again))}
        if exact is not None:
            r["vs_fp64"] = errors(op.flatten(2), exact)
            r["vs_current"] = errors(op.flatten(2), cur)
            r["speedup_vs_current"] = results["current_compiled"]["median_ms"] / t["median_ms"]
        results["op_best"] = r
        print(f"[op] scores {best_scores} apply {best_apply}: {t['median_ms']:.3f} ms ({r['gb_s']:.0f} GB/s); "
              + (f"x{r['speedup_vs_current']:.2f} vs current {results['current_compiled']['median_ms']:.3f} ms; rel vs fp64 "
                 f"{r['vs_fp64']['rel']:.2e} (current {results['current_compiled']['vs_fp64']['rel']:.2e}), vs current "
                 f"rel {r['vs_current']['rel']:.2e} max {r['vs_current']['max_abs']:.3g}; " if exact is not None else "")
              + f"repeat equal {r['repeat_equal']}", flush=True)
    except Exception as exc:  # noqa: BLE001
        results["op_best"] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        print(f"[op] failed: {results['op_best']['error']}", flush=True)
    save()
    cleanup()
    print(json.dumps({key: val for key, val in results.items() if key not in ("args", "scores", "apply")}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
