"""Group offload for training, fp8 full fine-tune and int8/fp8 LoRA bases on the real 2B model.

Run on a GPU (one command, a few minutes on an H100):

    PYTHONUNBUFFERED=1 python bench/offload_quant.py --out results.json

Builds the full-size random-weight `SanaVideoTransformer3DModel()` (the 2B config) with the same
seed for every configuration and runs real training steps at 81x832x480, batch 1, gradient
checkpointing (forward, flow-matching MSE, backward, grad-norm clipping, optimizer step,
zero_grad), with the trainer's own code for the memory savers (`job.train.offload`,
`job.train.quantize`, `job.train.optimizers`). Every step sees the same seeded inputs in every
configuration, so the losses can be compared. Records peak `max_memory_allocated`, the median
step time over the steps after the first two, forward+backward and optimizer time apart, and the
losses. Each configuration runs in its own try block and the JSON is rewritten after each.

The step after backward is split: `clip_s` (global norm + scaling) and `adamw_s` for the
synchronous rows; `land_grads_s` is the time from the CPU's end of the backward pass to the
gradients in `.grad` (mostly the GPU finishing the backward). The `-bgstep` rows use what training
does with group offload (`job.train.offload.BackgroundStepOptimizer`: the CPU step on a worker
thread during the next forward pass) and record the worker's time (`prev_worker_s`) and how long
the forward pass waited for it (`forward_waited_s`).

`--tiny` runs the same code on the CPU with the tiny test model (to check the script).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024 ** 3

FULL = dict(type="full", frames=81, height=480, width=832)
CONFIGS = [
    dict(name="full-bf16-ckpt", **FULL),
    dict(name="full-bf16-ckpt-groupoffload-block1-stream", group_offload=dict(type="block_level", blocks_per_group=1, use_stream=True), **FULL),
    dict(name="full-fp8-ckpt", mixed_precision="fp8", **FULL),  # float8 products: train.mixed_precision fp8
    # float8 is made for torch.compile (eager pays separate amax / cast kernels): the trainer's regional compile
    dict(name="full-bf16-ckpt-compiled-blocks", compile=True, **FULL),
    dict(name="full-fp8-ckpt-compiled-blocks", mixed_precision="fp8", compile=True, **FULL),
    dict(name="lora64-attn-bf16-ckpt", type="lora", frames=81, height=480, width=832),
    dict(name="lora64-attn-int8-ckpt", type="lora", precision="int8", frames=81, height=480, width=832),
    dict(name="lora64-attn-fp8-ckpt", type="lora", precision="fp8", frames=81, height=480, width=832),
    dict(name="full-bf16-ckpt-groupoffload-block2-stream", group_offload=dict(type="block_level", blocks_per_group=2, use_stream=True), **FULL),
    dict(name="full-bf16-ckpt-groupoffload-block1-nostream", group_offload=dict(type="block_level", blocks_per_group=1, use_stream=False), **FULL),
    # the trainer's regional compile with group offload: the blocks' own forwards compiled inside the offload wrapper
    dict(name="full-bf16-ckpt-groupoffload-block1-stream-compiled", compile=True,
         group_offload=dict(type="block_level", blocks_per_group=1, use_stream=True), **FULL),
    dict(name="full-bf16-ckpt-groupoffload-leaf-stream", group_offload=dict(type="leaf_level", blocks_per_group=1, use_stream=True), **FULL),
    # what training does with group offload: the CPU optimizer step in the background (BackgroundStepOptimizer),
    # overlapping the next forward pass; the norm from the gradients' norms taken on the GPU
    dict(name="full-bf16-ckpt-groupoffload-block1-stream-compiled-bgstep", compile=True, background_step=True,
         group_offload=dict(type="block_level", blocks_per_group=1, use_stream=True), **FULL),
    dict(name="full-bf16-ckpt-groupoffload-block1-stream-compiled-bgstep-noclip", compile=True, background_step=True, clip=0.0,
         group_offload=dict(type="block_level", blocks_per_group=1, use_stream=True), **FULL),
]
TINY = dict(frames=5, height=64, width=64)


def build(cfg, device, tiny: bool):
    import torch
    from diffusers import SanaVideoTransformer3DModel

    from job.spec.speed import SpeedSpec
    from job.train import quantize

    torch.manual_seed(0)
    if tiny:
        from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

        config = {**TINY_TRANSFORMER_CONFIG, "attention_head_dim": 16, "cross_attention_head_dim": 16, "cross_attention_dim": 32}
    else:
        config = {}
    with torch.device(device):
        model = SanaVideoTransformer3DModel(**config)
    model.to(torch.bfloat16)
    spec = SimpleNamespace(model=SimpleNamespace(type=cfg["type"], base_model_precision=cfg.get("precision", "bf16"),
                                                 lora=SimpleNamespace(rank=64, alpha=None, dropout=0.0,
                                                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"])),
                           memory=SimpleNamespace(gradient_checkpointing=True,
                                                  group_offload=SimpleNamespace(enabled=bool(cfg.get("group_offload")),
                                                                                **cfg.get("group_offload", {}))),
                           train=SimpleNamespace(mixed_precision=cfg.get("mixed_precision", "bf16")),
                           # the trainer's speed defaults, compile only where the configuration asks
                           speed=SpeedSpec(compile_blocks=bool(cfg.get("compile"))))
    from job.train.model import prepare_transformer

    params = prepare_transformer(model, spec)  # LoRA / trainability, quantisation, checkpointing: the trainer's code
    offload = None
    if cfg.get("group_offload"):
        from job.train.offload import apply_group_offload

        offload = apply_group_offload(model, SimpleNamespace(**cfg["group_offload"]), device)
        if cfg.get("compile"):
            offload.compile_blocks()  # what job.train.offload.offload_for_training does with speed.compile_blocks
    assert quantize  # imported for the error message when torchao is missing
    return model, params, offload, config


def run_config(cfg, device, tiny: bool, steps: int) -> dict:
    import torch

    from job.train.optimizers import build_optimizer

    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, params, offload, config = build(cfg, device, tiny)
    train = SimpleNamespace(optimizer="adamw", learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                            weight_decay=0.0)
    opt = build_optimizer(params, train)
    background = None
    if cfg.get("background_step"):
        from job.train.offload import BackgroundStepOptimizer

        opt = background = BackgroundStepOptimizer(opt, offload)
    max_norm = cfg.get("clip", 1.0)
    channels = model.config.in_channels
    caption = model.config.caption_channels
    F, H, W = cfg["frames"], cfg["height"], cfg["width"]
    lf, lh, lw = (F - 1) // 4 + 1, H // 8, W // 8
    rec = dict(config=cfg, build_s=time.time() - t0, params_trainable=sum(p.numel() for p in params),
               params_offloaded=offload.offloaded_params if offload else 0, steps=[])
    if cuda:
        rec["static_gib"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    waited = offload.waited_s if offload is not None else 0.0
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)  # the same inputs in every configuration
        x0 = torch.randn(1, channels, lf, lh, lw, generator=g).to(device)
        noise = torch.randn(1, channels, lf, lh, lw, generator=g).to(device)
        embeds = torch.randn(1, 300 if not tiny else 8, caption, generator=g).to(device, torch.bfloat16)
        mask = torch.ones(1, embeds.shape[1], dtype=torch.long, device=device)
        mask[:, embeds.shape[1] // 3:] = 0
        sigma = torch.rand(1, generator=g).to(device)
        s = sigma.view(1, 1, 1, 1, 1)
        noisy = ((1 - s) * x0 + s * noise).to(torch.bfloat16)
        sync()
        ts = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            pred = model(noisy, encoder_hidden_states=embeds, timestep=sigma * 1000, encoder_attention_mask=mask,
                         return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        loss.backward()
        sync()
        tb = time.perf_counter()
        parts = {}
        if background is not None:
            # the previous step's background work, finished by now (this step's forward waited for it)
            parts.update(prev_worker_s=offload.pending_step.seconds if offload.pending_step else None,
                         forward_waited_s=offload.waited_s - waited)
            norm = background.clip_gradients(params, max_norm, "norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
            waited = offload.waited_s
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            sync()
            tc = time.perf_counter()
            opt.step()
            sync()
            parts.update(clip_s=tc - tb, adamw_s=time.perf_counter() - tc)
            opt.zero_grad(set_to_none=True)
        sync()
        te = time.perf_counter()
        if offload is not None:
            parts["land_grads_s"] = offload.last_land_s  # inside fwd_bwd: the end of the backward pass
        rec["steps"].append(dict(loss=float(loss.detach()), grad_norm=float(norm), fwd_bwd_s=tb - ts, opt_s=te - tb,
                                 step_s=te - ts, **parts))
        del pred, loss, x0, noise, noisy
    timed = rec["steps"][2:] or rec["steps"]
    rec["step_s_median"] = statistics.median(s["step_s"] for s in timed)
    rec["fwd_bwd_s_median"] = statistics.median(s["fwd_bwd_s"] for s in timed)
    rec["opt_s_median"] = statistics.median(s["opt_s"] for s in timed)
    for key in ("clip_s", "adamw_s", "land_grads_s", "prev_worker_s", "forward_waited_s"):
        values = [s[key] for s in timed if s.get(key) is not None]
        if values:
            rec[f"{key}_median"] = statistics.median(values)
    if background is not None:
        background.wait()
    rec["losses"] = [s["loss"] for s in rec["steps"]]
    if cuda:
        rec["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        rec["max_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        # a validation-style no-grad CFG forward (batch 2) through the same (offloaded) model
        torch.cuda.reset_peak_memory_stats()
        model.eval()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            x = torch.randn(2, channels, lf, lh, lw, device=device, dtype=torch.bfloat16)
            e = torch.randn(2, 300 if not tiny else 8, caption, device=device, dtype=torch.bfloat16)
            sync()
            tv = time.perf_counter()
            model(x, encoder_hidden_states=e, timestep=torch.full((2,), 500.0, device=device),
                  encoder_attention_mask=torch.ones(2, e.shape[1], dtype=torch.long, device=device), return_dict=False)
            sync()
        rec["inference_cfg2_s"] = time.perf_counter() - tv
        rec["inference_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    del model, opt, params, offload
    gc.collect()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--budget-s", type=float, default=540)
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    env = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except Exception as exc:  # noqa: BLE001
        env["torchao_error"] = repr(exc)
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, total_gib=p.total_memory / GIB, capability=f"{p.major}.{p.minor}")
    results = {"environment": env, "runs": []}
    start = time.time()
    for cfg in CONFIGS:
        if args.only and cfg["name"] not in args.only:
            continue
        if time.time() - start > args.budget_s:
            results["runs"].append(dict(config=cfg, skipped="time budget"))
            continue
        cfg = {**cfg, **(TINY if args.tiny else {})}
        print(f"== {cfg['name']}", flush=True)
        try:
            rec = run_config(cfg, device, args.tiny, args.steps)
            print(json.dumps({k: v for k, v in rec.items() if k != "steps"}, default=str), flush=True)
        except Exception as exc:  # noqa: BLE001 - one failure must not lose the others
            rec = dict(config=cfg, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
            print(rec["traceback"], flush=True)
            if device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        results["runs"].append(rec)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
