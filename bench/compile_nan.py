"""Why compiled SANA-Video blocks give NaN gradients in plain bf16 (no autocast): bench/NOTES.md item 1.

Run on a GPU (one command, a few minutes on an H100: every inductor configuration compiles afresh):

    PYTHONUNBUFFERED=1 python bench/compile_nan.py --out compile_nan.json

It builds the full-size random-weight `SanaVideoTransformer3DModel()` (2B config) in bf16 on the GPU
with the job's fused linear attention, records the inputs of the first transformer block at each token
count (81x832x480 = 32,760 tokens, and smaller clips), and runs that block forward + backward with one
fixed output gradient, eagerly (the reference) and through `torch.compile` under several inductor
configurations, without autocast (the failing mode) and with bf16 autocast (the default). For each run
it reports which gradients (block parameters and block inputs) are not finite, the relative error of
every gradient against eager, and whether a second identical call repeats the first bit for bit. Before
each compiled call the allocator's free memory is filled with NaN, so a kernel that leaves part of its
output unwritten shows up as NaN instead of as stale, plausible numbers.

Then the real thing: the whole model with gradient checkpointing and every block compiled (as the
job's `speed.compile_blocks`), one flow-matching step, non-finite gradient count and step time, for the
default configuration and the candidate fix.

Experiments run in priority order until `--budget-s` is spent; results go to JSON as they come.
`--tiny` runs everything on the CPU with the tiny test model (checks the script, not the bug).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from benchutil import cuda, sync, cleanup  # noqa: E402

GIB = 1024 ** 3
#: latent (frames, height, width) -> tokens f * h/2 * w/2 (patch 1x2x2)
LATENTS = {32760: (21, 60, 104), 8190: (21, 30, 52), 1170: (3, 30, 52)}
TINY_LATENTS = {72: (3, 8, 12), 24: (2, 4, 6)}
#: inductor configurations tried (name -> torch._inductor.config patch)
CONFIGS = {
    "default": {},
    "no-mix-order-reduction": {"triton.mix_order_reduction": False},
    "emulate-precision-casts": {"emulate_precision_casts": True},
    "no-split-reductions": {"split_reductions": False},
    "fallback-random": {"fallback_random": True},
    "emulate-precision-casts-no-mix-order": {"emulate_precision_casts": True, "triton.mix_order_reduction": False},
}
#: the proposed fix, scoped to the blocks' compile: `block.compile(options=...)` instead of a global patch
FIX_OPTIONS = {"triton.mix_order_reduction": False}


def device() -> str:
    return "cuda" if cuda() else "cpu"


def poison_free_memory(gib: float) -> None:
    """Fill `gib` of memory with NaN and hand it back to the caching allocator (not to the driver):
    the next allocations reuse it, so whatever a kernel leaves unwritten reads as NaN."""
    if not cuda():
        return
    free = torch.cuda.mem_get_info()[0] / GIB
    size = int(max(0.0, min(gib, free - 8)) * GIB) // 2
    if size:
        torch.empty(size, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))
        sync()  # freed at once; the block stays cached


def build_model(tiny: bool, attention: str):
    from diffusers import SanaVideoTransformer3DModel

    from job.models.sanavideo.speed import use_fused_linear_attention
    from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    with torch.device(device()):
        model = SanaVideoTransformer3DModel(**(TINY_TRANSFORMER_CONFIG if tiny else {}))
    model.to(torch.bfloat16)
    if attention == "fused":
        use_fused_linear_attention(model)
    return model


def model_inputs(model, latent: tuple[int, int, int], text_len: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = latent
    cfg = model.config
    x0 = torch.randn(1, cfg.in_channels, f, h, w, generator=g)
    noise = torch.randn(1, cfg.in_channels, f, h, w, generator=g)
    sigma = 0.6
    mask = torch.ones(1, text_len, dtype=torch.long)
    mask[:, text_len * 2 // 5:] = 0
    return dict(noisy=((1 - sigma) * x0 + sigma * noise).to(device(), torch.bfloat16), target=(noise - x0).to(device()),
                timestep=torch.tensor([sigma * 1000], device=device()),
                embeds=torch.randn(1, text_len, cfg.caption_channels, generator=g).to(device(), torch.bfloat16),
                mask=mask.to(device()))


class _Captured(Exception):
    pass


def block_inputs(model, inp: dict) -> tuple:
    """The positional arguments the model passes to its first block (detached copies)."""
    saved = {}

    def hook(module, args):
        saved["args"] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else
                              tuple(t.detach().clone() for t in a) if isinstance(a, tuple) else a for a in args)
        raise _Captured

    handle = model.transformer_blocks[0].register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), contextlib.suppress(_Captured):
            model(inp["noisy"], encoder_hidden_states=inp["embeds"], encoder_attention_mask=inp["mask"],
                  timestep=inp["timestep"], return_dict=False)
    finally:
        handle.remove()
    return saved["args"]


#: block inputs that get gradients (positions in the block's signature)
GRAD_INPUTS = {0: "input.hidden_states", 2: "input.encoder_hidden_states", 4: "input.timestep"}


def block_grads(fn, block, args: tuple, grad_out: torch.Tensor, autocast: bool) -> tuple[dict, float]:
    """Gradients of the block's parameters and float inputs for one forward + backward; seconds it took."""
    args = list(args)
    for i in GRAD_INPUTS:
        args[i] = args[i].detach().clone().requires_grad_(True)
    for p in block.parameters():
        p.grad = None
    sync()
    t = time.perf_counter()
    with torch.autocast(device(), dtype=torch.bfloat16, enabled=autocast):
        out = fn(*args)
    out.backward(grad_out)
    sync()
    seconds = time.perf_counter() - t
    grads = {name: p.grad.detach().float().clone() for name, p in block.named_parameters() if p.grad is not None}
    grads.update({name: args[i].grad.detach().float().clone() for i, name in GRAD_INPUTS.items()})
    for p in block.parameters():
        p.grad = None
    return grads, seconds


def compare(grads: dict, ref: dict) -> dict:
    nonfinite = sorted(n for n, g in grads.items() if not bool(torch.isfinite(g).all()))
    rel = {}
    for name, g in grads.items():
        if name in nonfinite:
            continue
        r = ref[name]
        rel[name] = float((g - r).norm() / r.norm().clamp_min(1e-30))
    worst = sorted(rel.items(), key=lambda kv: -kv[1])[:6]
    return {"nonfinite": nonfinite, "nonfinite_count": len(nonfinite), "tensors": len(grads),
            "max_rel_err": max(rel.values()) if rel else None, "worst_rel_err": worst,
            "scale_shift_table_rel_err": rel.get("scale_shift_table"), "input_timestep_rel_err": rel.get("input.timestep"),
            "input_hidden_rel_err": rel.get("input.hidden_states")}


def inductor_patch(patch: dict):
    import torch._inductor.config as inductor_config

    return inductor_config.patch(patch) if patch else contextlib.nullcontext()


def run_block(block, args, grad_out, config: str, autocast: bool, ref: dict, repeats: int) -> dict:
    torch._dynamo.reset()
    res: dict = {"config": config, "autocast": autocast}
    with inductor_patch(CONFIGS[config]):
        compiled = torch.compile(block)
        poison_free_memory(24)
        first, res["first_call_s"] = block_grads(compiled, block, args, grad_out, autocast)  # compiles fwd + bwd
        res.update(compare(first, ref))
        times, same = [], True
        for _ in range(repeats):
            poison_free_memory(24)
            again, seconds = block_grads(compiled, block, args, grad_out, autocast)
            times.append(seconds)
            same = same and all(torch.equal(again[n], first[n]) or (not bool(torch.isfinite(first[n]).all()))
                                for n in first)
            res["repeat_nonfinite"] = sorted(n for n, g in again.items() if not bool(torch.isfinite(g).all()))
    res["repeat_equal"] = same
    res["fwd_bwd_median_s"] = statistics.median(times) if times else None
    torch._dynamo.reset()
    return res


def run_full_model(model, inp: dict, config: str, autocast: bool, steps: int) -> dict:
    """The job's setting: checkpointing, every block compiled, one loss; non-finite gradients and step time."""
    torch._dynamo.reset()
    res: dict = {"config": config, "autocast": autocast}
    model.enable_gradient_checkpointing()
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        with inductor_patch(CONFIGS.get(config, {})):
            if config != "eager":
                for block in model.transformer_blocks:
                    block.compile(**({"options": FIX_OPTIONS} if config == "compile-options" else {}))
            times = []
            for step in range(steps):
                model.zero_grad(set_to_none=True)
                poison_free_memory(24)
                sync()
                t = time.perf_counter()
                with torch.autocast(device(), dtype=torch.bfloat16, enabled=autocast):
                    pred = model(inp["noisy"], encoder_hidden_states=inp["embeds"], encoder_attention_mask=inp["mask"],
                                 timestep=inp["timestep"], return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(pred.float(), inp["target"])
                loss.backward()
                sync()
                times.append(time.perf_counter() - t)
                bad = [names[id(p)] for p in model.parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                res[f"step{step}"] = {"loss": float(loss.detach()), "nonfinite_count": len(bad), "nonfinite_first": bad[:30],
                                      "grad_norm": float(torch.linalg.vector_norm(torch.stack(
                                          [torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None])))}
            res["first_step_s"] = times[0]
            res["step_median_s"] = statistics.median(times[1:]) if len(times) > 1 else None
    finally:
        for block in model.transformer_blocks:
            block._compiled_call_impl = None  # back to eager for the next experiment
        model.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("compile_nan.json"))
    p.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (checks the script, not the bug)")
    p.add_argument("--attention", default="fused", choices=["fused", "diffusers"])
    p.add_argument("--text-len", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=330.0, help="start no new experiment after this many seconds")
    p.add_argument("--plan", default="", help="comma list of experiment names to run (default: all, in priority order)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    latents = TINY_LATENTS if args.tiny else LATENTS
    big, *small = sorted(latents, reverse=True)
    text_len = 8 if args.tiny else args.text_len
    results: dict = {"environment": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"),
                                     "torch": torch.__version__, "cuda": torch.version.cuda,
                                     "gpu": torch.cuda.get_device_name(0) if cuda() else None},
                     "attention": args.attention, "block": {}, "full_model": {}, "skipped": []}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    model = build_model(args.tiny, args.attention)
    block = model.transformer_blocks[0]
    cache: dict = {}

    def prepared(tokens: int, autocast: bool):
        """Block inputs, a fixed output gradient and the eager gradients, per token count and autocast."""
        if (tokens, autocast) not in cache:
            cache.clear()  # one size at a time on the GPU
            cleanup()
            inp = model_inputs(model, latents[tokens], text_len)
            args_ = block_inputs(model, inp)
            g = torch.Generator(device=device()).manual_seed(5)
            grad_out = (torch.randn(args_[0].shape, generator=g, device=device()) * 1e-4).to(torch.bfloat16)
            ref, seconds = block_grads(block, block, args_, grad_out, autocast)
            results["block"][f"{tokens}-eager{'-autocast' if autocast else ''}"] = {
                "tokens": tokens, "fwd_bwd_s": seconds, "nonfinite": sorted(n for n, x in ref.items() if not bool(torch.isfinite(x).all()))}
            cache[(tokens, autocast)] = (args_, grad_out, ref)
        return cache[(tokens, autocast)]

    def block_experiment(tokens: int, config: str, autocast: bool = False):
        def run():
            args_, grad_out, ref = prepared(tokens, autocast)
            res = run_block(block, args_, grad_out, config, autocast, ref, args.repeats)
            res["tokens"] = tokens
            return res
        return run

    def full_experiment(config: str, autocast: bool = False):
        def run():
            cache.clear()
            cleanup()
            return run_full_model(model, model_inputs(model, latents[big], text_len), config, autocast, steps=3)
        return run

    plan = [
        (f"block-{big}-default", block_experiment(big, "default")),
        (f"block-{big}-no-mix-order-reduction", block_experiment(big, "no-mix-order-reduction")),
        (f"full-{big}-default", full_experiment("default")),
        (f"full-{big}-no-mix-order-reduction", full_experiment("no-mix-order-reduction")),
        (f"full-{big}-compile-options", full_experiment("compile-options")),
        (f"block-{big}-autocast-default", block_experiment(big, "default", autocast=True)),
        (f"block-{big}-autocast-no-mix-order-reduction", block_experiment(big, "no-mix-order-reduction", autocast=True)),
        (f"full-{big}-autocast-default", full_experiment("default", autocast=True)),
        (f"full-{big}-autocast-compile-options", full_experiment("compile-options", autocast=True)),
        *[(f"block-{n}-default", block_experiment(n, "default")) for n in small],
        (f"block-{big}-no-split-reductions", block_experiment(big, "no-split-reductions")),
        (f"block-{big}-fallback-random", block_experiment(big, "fallback-random")),
        (f"block-{big}-emulate-precision-casts-no-mix-order", block_experiment(big, "emulate-precision-casts-no-mix-order")),
        # last: on torch 2.11 / H100 this one ended in an illegal memory access, which breaks the CUDA context
        (f"block-{big}-emulate-precision-casts", block_experiment(big, "emulate-precision-casts")),
    ]
    wanted = set(args.plan.split(",")) - {""}
    for name, run in plan:
        if wanted and name not in wanted:
            continue
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            results["skipped"].append(name)
            print(f"{name}: skipped (budget spent: {elapsed:.0f} s)", flush=True)
            continue
        t = time.perf_counter()
        try:
            res = run()
        except Exception as exc:  # noqa: BLE001
            res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        res["experiment_s"] = time.perf_counter() - t
        results["full_model" if name.startswith("full") else "block"][name] = res
        save()
        short = {k: res.get(k) for k in ("nonfinite_count", "nonfinite", "max_rel_err", "scale_shift_table_rel_err",
                                          "input_timestep_rel_err", "repeat_equal", "fwd_bwd_median_s", "first_call_s",
                                          "step_median_s", "error") if k in res}
        for key in ("step0", "step1", "step2"):
            if key in res:
                short[key] = {k: res[key][k] for k in ("loss", "nonfinite_count", "nonfinite_first", "grad_norm")}
                short[key]["nonfinite_first"] = short[key]["nonfinite_first"][:8]
        print(f"{name} ({res['experiment_s']:.0f} s): {json.dumps(short, default=str)}", flush=True)
    results["total_s"] = time.perf_counter() - started
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
