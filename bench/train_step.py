"""Training-step speed: the plain diffusers path vs the job's own step, in one process, same inputs.

Run on a GPU (one command, a few minutes on an H100; the first compiled step pays the compile):

    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor PYTHONUNBUFFERED=1 python bench/train_step.py --out results.json

It builds the full-size random-weight `SanaVideoTransformer3DModel()` (the 2B config, bf16) and, for
a full fine-tune and for LoRA (rank 64 on attention):

- the plain path: stock diffusers model, gradient checkpointing of every block, torch fused AdamW,
  flow-matching MSE, clipping (what the issue measured as "plain diffusers");
- the job's path: the same weights through `job.train.model.prepare_transformer(model, spec)` (LoRA,
  checkpointing and the `speed:` section) and the session pieces `build_session` uses (accelerate,
  `build_optimizer` with the spec's default optimizer unless `--optimizer` or a variant says otherwise,
  `build_scheduler`, `FlowMatchingObjective`), stepped by
  `job.train.step.train_step` itself, fed CPU batches shaped like the latent cache's;

and prints step time (median of >= 10 after warm-up), peak memory, model-FLOP utilisation against
a measured bf16 matmul, the ratio, and the numerics check (loss and gradient norm of both paths on
the same weights and inputs). It also times the transformer share of a 50-step CFG render
(batch 2; section `validation`) for the stock model and for the model `build_pipeline(..., speed=...)` hands the
validation renderer. Results go to JSON as they come (a failing configuration is recorded, the
rest still runs).

`--tiny` runs everything on the CPU with the tiny test model (checks the script, not speed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from benchutil import cuda, sync, cleanup  # noqa: E402
import partitioner_log  # noqa: E402

GIB = 1024 ** 3
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

#: job variants of the full fine-tune: name -> `speed:` section, plus `mixed_precision` / `optimizer` of `train:`
#: where a variant sets them (otherwise: the spec's default optimizer, `--optimizer` to override). The first is the default spec.
FULL_VARIANTS = {
    "job-default": {"mixed_precision": "bf16"},  # the spec's defaults: bf16 autocast over bf16 weights, speed: defaults
    "job-default-ffbwd-triton": {"mixed_precision": "bf16", "feedforward_backward": "triton"},  # defaults + Triton FF backward
    "job-ff-diffusers": {"mixed_precision": "bf16", "feedforward": "diffusers"},  # the defaults but diffusers' feed-forward
    "job-default-adamw": {"mixed_precision": "bf16", "optimizer": "adamw"},  # the defaults with torch fused AdamW (as plain)
    "job-ff-diffusers-adamw": {"mixed_precision": "bf16", "feedforward": "diffusers", "optimizer": "adamw"},
    "job-bf16-no-autocast": {},  # train.mixed_precision "no" as the plain path: compiled with mix-order reduction off (NOTES item 8)
    "job-no-speedups": {"compile_blocks": False, "linear_attention": "diffusers", "keep_activations_blocks": 0},
    "job-fused-attn-only": {"compile_blocks": False},
    "job-compile-diffusers-attn": {"linear_attention": "diffusers"},
    "job-keep4": {"keep_activations_blocks": 4},
    "job-keep8": {"keep_activations_blocks": 8},
    "job-keep12": {"keep_activations_blocks": 12},
    "job-autocast-keep4": {"mixed_precision": "bf16", "keep_activations_blocks": 4},
    # the defaults plus blocks that keep their activations, with the compiler's memory budget
    "job-keep10-budget0.3": {"mixed_precision": "bf16", "keep_activations_blocks": 10, "activation_memory_budget": 0.3},
    "job-keep20-budget0.3": {"mixed_precision": "bf16", "keep_activations_blocks": 20, "activation_memory_budget": 0.3},
    "job-keep20-budget0.15": {"mixed_precision": "bf16", "keep_activations_blocks": 20, "activation_memory_budget": 0.15},
    "job-autocast-keep8": {"mixed_precision": "bf16", "keep_activations_blocks": 8},
    "job-autocast-keep12": {"mixed_precision": "bf16", "keep_activations_blocks": 12},
    "job-autocast-no-speedups": {"mixed_precision": "bf16", "compile_blocks": False, "linear_attention": "diffusers"},
    # float8 products (train.mixed_precision: fp8; a full fine-tune's weight gradients in float8 by default,
    # speed.fp8_weight_gradient). "torchao_fp8_weight_gradient": torchao's own float8 weight gradient instead
    # (`quantize.FP8_WEIGHT_GRADIENT`; with speed.fp8_weight_gradient off, so that torchao runs the products)
    "job-fp8": {"mixed_precision": "fp8"},
    "job-fp8-keep20-budget0.15": {"mixed_precision": "fp8", "keep_activations_blocks": 20, "activation_memory_budget": 0.15},
    # the feed-forward's SiLU/depthwise/gate backward compiled by inductor instead of the Triton kernels (ff_grad.py)
    "job-fp8-keep20-budget0.15-ffbwd-compiled": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                 "activation_memory_budget": 0.15, "feedforward_backward": "compiled"},
    # inductor's coordinate-descent tuning of the pointwise/reduction kernels' launch configurations: its first compile
    # did not finish within 7 minutes on an H100 (bench/RESULTS.md), kept to reproduce that
    "job-fp8-keep20-budget0.15-cdt": {"mixed_precision": "fp8", "keep_activations_blocks": 20, "activation_memory_budget": 0.15,
                                      "inductor": {"coordinate_descent_tuning": True}},
    "job-fp8-gw-keep20-budget0.15": {"mixed_precision": "fp8", "fp8_weight_gradient": False, "torchao_fp8_weight_gradient": True, "keep_activations_blocks": 20,
                                     "activation_memory_budget": 0.15},
    # the depthwise conv's input gradient from cuDNN's data-gradient kernel (`speed.DEPTHWISE_INPUT_GRAD`)
    "job-fp8-keep20-budget0.15-dw-cudnn": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                           "activation_memory_budget": 0.15, "depthwise_input_grad": "cudnn"},
    # the same with diffusers' cross-attention processor (the fused SDPA backward) instead of the dense backward
    "job-fp8-keep20-budget0.15-sdpa-xattn": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                             "activation_memory_budget": 0.15, "cross_attention": "diffusers"},
    # the input-gradient products without cuBLAS's fast accumulation (torchao's default; speed.fp8_fast_accumulation)
    "job-fp8-keep20-budget0.15-dgrad-exact": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                              "activation_memory_budget": 0.15, "fp8_fast_accumulation": False},
    # the output gradient cast to e4m3 instead of e5m2 (`quantize.FP8_GRADIENT_E4M3`)
    "job-fp8-keep20-budget0.15-grad-e4m3": {"mixed_precision": "fp8", "fp8_weight_gradient": False, "keep_activations_blocks": 20,
                                            "activation_memory_budget": 0.15, "fp8_grad_e4m3": True},
    "job-fp8-gw-e4m3-keep20-budget0.15": {"mixed_precision": "fp8", "fp8_weight_gradient": False, "torchao_fp8_weight_gradient": True, "fp8_grad_e4m3": True,
                                          "keep_activations_blocks": 20, "activation_memory_budget": 0.15},
    "job-fp8-gw-e4m3-keep20-budget0.2": {"mixed_precision": "fp8", "fp8_weight_gradient": False, "torchao_fp8_weight_gradient": True, "fp8_grad_e4m3": True,
                                         "keep_activations_blocks": 20, "activation_memory_budget": 0.2},
    # torchao's rowwise recipe with a bf16 weight gradient instead of the tensorwise one (`quantize.FP8_RECIPE`)
    "job-fp8-rowwise-gw-hp-keep20-budget0.15": {"mixed_precision": "fp8", "fp8_weight_gradient": False, "fp8_recipe": "rowwise_with_gw_hp",
                                                "keep_activations_blocks": 20, "activation_memory_budget": 0.15},
    "job-fp8-keep20-budget0.2": {"mixed_precision": "fp8", "keep_activations_blocks": 20, "activation_memory_budget": 0.2},
    # the weight gradients in bf16 (speed.fp8_weight_gradient off: the default before 2026-11-25 11:30)
    "job-fp8-keep20-budget0.15-gw-bf16": {"mixed_precision": "fp8", "fp8_weight_gradient": False,
                                          "keep_activations_blocks": 20, "activation_memory_budget": 0.15},
    # the memory-budget partitioner's runtime estimate (speed.recompute_cost; "roofline" is the default):
    # torch's FLOP count, and the roofline at a larger budget
    "job-fp8-keep20-budget0.15-flops": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                        "activation_memory_budget": 0.15, "recompute_cost": "flops"},
    # inductor fuses nodes even where they share no input (`aggressive_fusion`)
    "job-fp8-keep20-budget0.15-aggressive-fusion": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                    "activation_memory_budget": 0.15,
                                                    "inductor": {"aggressive_fusion": True}},
    "job-fp8-keep20-budget0.15-roofline": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                           "activation_memory_budget": 0.15, "recompute_cost": "roofline"},
    "job-fp8-keep20-budget0.2-roofline": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                          "activation_memory_budget": 0.2, "recompute_cost": "roofline"},
    # inductor benchmarks Triton templates against cuBLAS for every product and fuses neighbouring pointwise work
    # into the template's prologue/epilogue where the benchmark says it pays (`max_autotune_gemm`)
    # inductor compiles each reduction both persistent (the row held in registers, read once) and looped, and keeps
    # the faster at the first call (`triton.multi_kernel`; it also raises the persistent size limit 16x, past the
    # 2,240-channel rows of the norms). The run of 2026-11-25 15:00 measured it as this bench setting; it is now the
    # job's default (speed.tune_reductions), and "-untuned" is the job without it
    "job-fp8-keep20-budget0.15-multi-kernel": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                               "activation_memory_budget": 0.15,
                                               "inductor": {"triton.multi_kernel": 1}},
    # reductions tiled over two dimensions, so a reduction that reads a transposed operand (the attention's backward
    # reads its value gradient channel-major) can load it coalesced (`triton.tile_reductions` + `prefer_nd_tiling`)
    "job-fp8-keep20-budget0.15-tile-reductions": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                  "activation_memory_budget": 0.15,
                                                  "inductor": {"triton.prefer_nd_tiling": True,
                                                               "triton.tile_reductions": True}},
    "job-fp8-keep20-budget0.15-untuned": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                          "activation_memory_budget": 0.15, "tune_reductions": False},
    "job-fp8-keep20-budget0.15-max-autotune-gemm": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                    "activation_memory_budget": 0.15,
                                                    "inductor": {"max_autotune_gemm": True}},
    # the names this session's runs used for speed.fp8_weight_gradient before it became the default (same settings)
    "job-fp8-owngw-keep20-budget0.15": {"mixed_precision": "fp8", "fp8_weight_gradient": True,
                                        "keep_activations_blocks": 20, "activation_memory_budget": 0.15},
    "job-fp8-owngw-keep20-budget0.2": {"mixed_precision": "fp8", "fp8_weight_gradient": True,
                                       "keep_activations_blocks": 20, "activation_memory_budget": 0.2},
}
LORA_VARIANTS = {"job-lora-default": {}, "job-lora-ff-diffusers": {"feedforward": "diffusers"},
                 "job-lora-keep8": {"keep_activations_blocks": 8},
                 # no block recomputed whole; the compiler recomputes elementwise work within the memory budget
                 "job-lora-keep20-budget0.5": {"keep_activations_blocks": 20, "activation_memory_budget": 0.5},
                 "job-lora-keep20-budget0.3": {"keep_activations_blocks": 20, "activation_memory_budget": 0.3},
                 "job-lora-keep20-budget0.15": {"keep_activations_blocks": 20, "activation_memory_budget": 0.15},
                 "job-lora-fp8": {"mixed_precision": "fp8"},
                 "job-lora-fp8-keep20-budget0.5": {"mixed_precision": "fp8", "keep_activations_blocks": 20, "activation_memory_budget": 0.5},
                 "job-lora-fp8-keep20-budget0.5-untuned": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                           "activation_memory_budget": 0.5, "tune_reductions": False},
                 "job-lora-fp8-keep20-budget0.3": {"mixed_precision": "fp8", "keep_activations_blocks": 20, "activation_memory_budget": 0.3},
                 "job-lora-fp8-keep20-budget0.5-no-trim": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                           "activation_memory_budget": 0.5, "trim_text_padding": False},
                 "job-lora-fp8-keep20-budget0.5-adamw": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                         "activation_memory_budget": 0.5, "optimizer": "adamw"},
                 "job-lora-fp8-keep20-budget0.5-sdpa-xattn": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                              "activation_memory_budget": 0.5, "cross_attention": "diffusers"},
                 # the frozen base cast to float8 in every pass instead of once (`quantize.CACHE_FROZEN_FLOAT8`)
                 "job-lora-fp8-keep20-budget0.5-no-cache": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                            "activation_memory_budget": 0.5, "cache_frozen_float8": False},
                 "job-lora-fp8-keep20-budget0.5-host-guard": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                              "activation_memory_budget": 0.5, "guard_on_device": False},
                 # the partitioner's recompute choices by torch's FLOP count (speed.recompute_cost; roofline is the default)
                 "job-lora-fp8-keep20-budget0.5-flops": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                         "activation_memory_budget": 0.5, "recompute_cost": "flops"},
                 "job-lora-fp8-keep20-budget0.5-dw-cudnn": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                            "activation_memory_budget": 0.5, "depthwise_input_grad": "cudnn"},
                 "job-lora-fp8-keep20-budget0.6": {"mixed_precision": "fp8", "keep_activations_blocks": 20, "activation_memory_budget": 0.6},
                 # the input-gradient products without fast accumulation (speed.fp8_fast_accumulation: false)
                 "job-lora-fp8-keep20-budget0.5-dgrad-exact": {"mixed_precision": "fp8", "keep_activations_blocks": 20,
                                                               "activation_memory_budget": 0.5, "fp8_fast_accumulation": False}}


# ------------------------------------------------------------------------------------ helpers

def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if cuda() else float("nan")


def timed(fn, warmup: int, iters: int) -> dict:
    """Run `fn` warmup + iters times; step times (s) and the peak memory of the timed steps."""
    first = None
    for i in range(warmup):
        t = time.perf_counter()
        fn()
        sync()
        if i == 0:
            first = time.perf_counter() - t
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times,
            "first_step_s": first, "peak_gib": peak_gib()}


def matmul_peak_tflops() -> float | None:
    if not cuda():
        return None
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    sync()
    return 2 * n ** 3 * 20 / (start.elapsed_time(end) / 1000) / 1e12


def environment() -> dict:
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except Exception:  # noqa: BLE001
        pass
    if cuda():
        env["gpu"] = torch.cuda.get_device_name(0)
        with contextlib.suppress(Exception):
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
    return env


# ------------------------------------------------------------------------------------ model and inputs

def build_model(tiny: bool):
    from diffusers import SanaVideoTransformer3DModel

    from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

    device = "cuda" if cuda() else "cpu"
    with torch.device(device):
        model = SanaVideoTransformer3DModel(**(TINY_TRANSFORMER_CONFIG if tiny else {}))
    return model.to(torch.bfloat16)


def shapes(args, model) -> dict:
    cfg = model.config
    lf, lh, lw = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    return dict(latent=(args.batch, cfg.in_channels, lf, lh, lw), text=(args.batch, args.text_len, cfg.caption_channels),
                tokens=lf * (lh // 2) * (lw // 2))


def fixed_inputs(sh: dict, seed: int = 1234) -> dict:
    """One set of inputs for the numerics check (fp32 flow-matching arithmetic, bf16 embeddings)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(sh["latent"], generator=g)
    noise = torch.randn(sh["latent"], generator=g)
    b = x0.shape[0]
    sigmas = torch.rand(b, generator=g) * 0.8 + 0.1
    s = sigmas.view(b, 1, 1, 1, 1)
    device = "cuda" if cuda() else "cpu"
    mask = torch.ones(sh["text"][:2], dtype=torch.long)
    mask[:, sh["text"][1] * 2 // 5:] = 0
    return dict(noisy=((1 - s) * x0 + s * noise).to(device), target=(noise - x0).to(device), sigmas=sigmas.to(device),
                timesteps=(sigmas * 1000).to(device), embeds=torch.randn(sh["text"], generator=g).to(device, torch.bfloat16),
                mask=mask.to(device))


def cache_batches(sh: dict):
    """An endless stream of CPU batches shaped like the latent cache's (what `TrainSession.batches` yields):
    4 batches made up front and repeated, because the job's loader makes them in worker processes while
    the GPU steps (drawing them here, ~15 ms of host time per step, would count against both paths).
    Their prompts have 120, 60, 200 and 120 real tokens of the 300 positions (the plain path attends over
    all 300 either way; `speed.trim_text_padding` cuts to 128, 64, 256, 128)."""
    g = torch.Generator().manual_seed(7)
    pool = []
    for fraction in (0.4, 0.2, 2 / 3, 0.4):
        mask = torch.ones(sh["text"][:2], dtype=torch.long)
        mask[:, round(sh["text"][1] * fraction):] = 0
        latents = torch.randn(sh["latent"], generator=g).to(torch.bfloat16)
        pool.append({"latents": latents.pin_memory() if cuda() else latents,
                     "prompt_embeds": torch.randn(sh["text"], generator=g).to(torch.bfloat16), "prompt_attention_mask": mask})
    while True:
        yield from pool


def make_spec(kind: str, speed: dict, args):
    from job.spec import JobSpec

    speed = dict(speed)
    mixed_precision = speed.pop("mixed_precision", "no" if kind == "full" else "bf16")
    optimizer = speed.pop("optimizer", args.optimizer)  # None: the spec's default (what a job runs)

    data = {
        "version": 1, "workspace": tempfile.mkdtemp(prefix="bench-ws-"),
        "model": {"type": kind, "base_model_precision": "bf16",
                  "pretrained_model_name_or_path": "hf://Efficient-Large-Model/SANA-Video_2B_480p_diffusers"},
        "data": {"datasets": [{"id": "clips", "source": "clips", "resolution_type": "pixel_area",
                               "video": {"num_frames": args.frames}}]},
        # full: bf16 weights computing in bf16 (the plain path); LoRA: fp32 adapters under bf16 autocast
        "train": {"mixed_precision": mixed_precision, "learning_rate": 1e-5,
                  "train_batch_size": args.batch, "max_train_steps": 1000, "caption_dropout_probability": 0.0,
                  "lr_scheduler": "constant", **({"optimizer": optimizer} if optimizer else {})},
        "memory": {"gradient_checkpointing": True},
        "speed": speed,
        "validation": {"enabled": False},
    }
    if kind == "lora":
        data["model"]["lora"] = {"rank": 64, "target_modules": LORA_TARGETS}
    return JobSpec.model_validate(data)


# ------------------------------------------------------------------------------------ the two paths

def loss_and_grad_norm(forward, objective, params, inp, autocast: bool, names: dict | None = None) -> tuple[float, float]:
    for p in params:
        p.grad = None
    with torch.autocast("cuda" if cuda() else "cpu", dtype=torch.bfloat16, enabled=autocast):
        pred = forward(inp["noisy"].to(torch.bfloat16), encoder_hidden_states=inp["embeds"], encoder_attention_mask=inp["mask"],
                       timestep=inp["timesteps"], return_dict=False)[0]
    loss = objective.loss(pred, inp["target"], inp["sigmas"])
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]))
    value = (float(loss.detach()), float(norm))
    if names is not None and not torch.isfinite(norm):  # where a non-finite gradient shows up first (diagnosis)
        bad = [names.get(id(p), "?") for p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
        print(f"non-finite gradients in {len(bad)} of {len(params)} tensors; last: {bad[-12:]}; first: {bad[:6]}", flush=True)
    for p in params:
        p.grad = None
    return value


class PlainPath:
    """The issue's reference: stock diffusers, checkpoint every block, torch fused AdamW."""

    def __init__(self, model, kind: str, sh: dict, objective):
        from job.train import lora as lora_mod

        self.model, self.kind, self.objective = model, kind, objective
        if kind == "lora":
            lora_mod.add_lora(model, SimpleNamespace(rank=64, alpha=None, dropout=0.0, target_modules=LORA_TARGETS))
        else:
            model.requires_grad_(True)
        model.enable_gradient_checkpointing()
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, **({"fused": True} if cuda() else {"foreach": True}))
        self.autocast = kind == "lora"
        self.batches = cache_batches(sh)
        self.gen = torch.Generator().manual_seed(3)

    def numerics(self, inp):
        return loss_and_grad_norm(self.model, self.objective, self.params, inp, self.autocast)

    def step(self):
        batch = next(self.batches)
        device = "cuda" if cuda() else "cpu"
        x0 = batch["latents"].to(device, torch.float32)
        inputs = self.objective.training_inputs(x0, self.gen)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast):
            pred = self.model(inputs.noisy.to(torch.bfloat16), encoder_hidden_states=batch["prompt_embeds"].to(device),
                              encoder_attention_mask=batch["prompt_attention_mask"].to(device), timestep=inputs.timesteps,
                              return_dict=False)[0]
        loss = self.objective.loss(pred, inputs.target, inputs.sigmas)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class JobPath:
    """The trainer's own step: `prepare_transformer` + the session pieces + `train_step`."""

    def __init__(self, model, spec, sh: dict):
        from job.models.sanavideo.objective import FlowMatchingObjective
        from job.train.model import prepare_transformer
        from job.train.optimizers import build_optimizer
        from job.train.schedulers import build_scheduler
        from job.train.session import TrainSession, _accelerator

        ws = SimpleNamespace(output_dir=Path(spec.workspace) / "output", logs_dir=Path(spec.workspace) / "logs")
        params = prepare_transformer(model, spec)
        accelerator, _ = _accelerator(spec, ws)
        optimizer = build_optimizer(params, spec.train, seed=spec.train.seed)
        scheduler = build_scheduler(optimizer, spec.train, spec.train.max_train_steps)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        self.session = TrainSession(
            spec=spec, ws=ws, accelerator=accelerator, transformer=prepared, model=accelerator.unwrap_model(prepared),
            params=params, optimizer=optimizer, scheduler=scheduler, ema=None, objective=FlowMatchingObjective(spec.train.timesteps),
            dataset=None, sampler=None, loader=None, generator=torch.Generator("cpu").manual_seed(spec.train.seed),
            empty_prompt=None, store=None, metrics=None, total_steps=spec.train.max_train_steps, weight_dtype=torch.bfloat16,
            spec_hash="bench",
        )
        self.batches = cache_batches(sh)

    def numerics(self, inp):
        s = self.session
        # the call compute_loss makes (accelerate adds the autocast of train.mixed_precision to prepared.forward)
        names = {id(p): n for n, p in s.model.named_parameters()}
        return loss_and_grad_norm(s.transformer, s.objective, s.params, inp, autocast=False, names=names)

    def step(self):
        from job.train.step import train_step

        outcome = train_step(self.session, self.batches)
        if outcome.skipped:
            raise RuntimeError(f"train_step skipped a step (loss {outcome.loss}, grad norm {outcome.grad_norm})")


def profile_table(fn, path: Path | None, rows: int = 30, shapes: bool = False) -> list[str]:
    """Profile one call of `fn`: the ops and kernels by self time; with `shapes`, also the matrix products
    grouped by their input shapes (which product each GEMM kernel is)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    with profile(activities=activities, record_shapes=shapes) as prof:
        fn()
        sync()
    key = "self_cuda_time_total" if cuda() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=max(rows, 80), max_name_column_width=120)
    if shapes:
        products = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::_scaled_mm",
                                                                                         "aten::bmm", "aten::addmm")]
        attr = "self_device_time_total" if cuda() else "self_cpu_time_total"  # the averages' name for the sort key
        products.sort(key=lambda e: -getattr(e, attr))
        table += "\n\nmatrix products by input shapes (self time, calls, shapes)\n" + "\n".join(
            f"{getattr(e, attr) / 1000:9.2f} ms {e.count:5d} {e.key:18s} {e.input_shapes}" for e in products)
    if path is not None:
        if cuda():
            trace = path.with_suffix(".trace.json")
            prof.export_chrome_trace(str(trace))
            table += "\n\n" + gpu_idle_report(trace)
            trace.unlink()
        path.write_text(table)
    return table.splitlines()[:min(rows, 80) // 2 + 4]


def gpu_idle_report(trace_path: Path, top: int = 15, min_gap_ms: float = 0.2) -> str:
    """Where the GPU waited during the profiled step: the union of kernel (and memcpy/memset) intervals,
    the gaps between them, and for the longest gaps the CPU ops running meanwhile (longest overlap first)."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime")]
    if not gpu:
        return "no GPU events in the trace"
    busy, gaps, (start, end) = 0.0, [], gpu[0]
    for s, e in gpu[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end, end, s))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    span = gpu[-1][1] - gpu[0][0]
    lines = [f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms "
             f"in {len(gaps)} gaps ({sum(g for g, _, _ in gaps if g >= min_gap_ms * 1e3) / 1e3:.1f} ms in gaps >= {min_gap_ms} ms)"]
    for gap, s, e in sorted(gaps, reverse=True)[:top]:
        overlap = {}
        for c in cpu:
            o = min(e, c["ts"] + c.get("dur", 0)) - max(s, c["ts"])
            if o > 0:
                overlap[c["name"]] = overlap.get(c["name"], 0) + o
        names = ", ".join(f"{n[:60]} {o / 1e3:.2f}" for n, o in sorted(overlap.items(), key=lambda kv: -kv[1])[:6])
        lines.append(f"  gap {gap / 1e3:.2f} ms at +{(s - gpu[0][0]) / 1e3:.1f} ms: {names}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ sections

def run_training(kind: str, variants: dict, args, results: dict, save, fwd_tflop: float | None, peak: float | None):
    from job.models.sanavideo.objective import FlowMatchingObjective
    from job.spec.train import TimestepSpec

    section = results.setdefault(kind, {})
    torch.manual_seed(0)
    model = build_model(args.tiny)
    sh = shapes(args, model)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    inp = fixed_inputs(sh)
    objective = FlowMatchingObjective(TimestepSpec())
    model_tflop = None if fwd_tflop is None else 3 * fwd_tflop  # forward + backward (2x), recompute not counted

    def record(name, res):
        if "median_s" in res and model_tflop and peak and kind == "full":
            res["mfu_vs_matmul_peak"] = model_tflop / res["median_s"] / peak
        if "median_s" in res and "plain" in section and "median_s" in section["plain"]:
            res["speedup_vs_plain"] = section["plain"]["median_s"] / res["median_s"]
        if "numerics" in res and "plain" in section and "numerics" in section["plain"]:
            (lp, gp), (lj, gj) = section["plain"]["numerics"], res["numerics"]
            res["loss_rel_err"], res["grad_norm_rel_err"] = abs(lj - lp) / abs(lp), abs(gj - gp) / abs(gp)
            res["numerics_ok"] = res["loss_rel_err"] <= 0.01 and res["grad_norm_rel_err"] <= 0.02
        section[name] = res
        save()
        print(f"[{kind}] {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in res.items() if k not in ("times_s", "profile_top", "numerics")), flush=True)

    try:
        if args.no_plain:
            raise RuntimeError("skipped (--no-plain)")
        plain = PlainPath(model, kind, sh, objective)
        res = {"numerics": plain.numerics(inp)}
        res.update(timed(plain.step, args.warmup, args.iters))
        if args.profile and kind == "full":
            res["profile_top"] = profile_table(plain.step, args.out.parent / "profile_plain.txt")
        record("plain", res)
    except Exception as exc:  # noqa: BLE001
        record("plain", {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]})
    plain = None
    del model
    cleanup()

    from job.models.sanavideo import speed as speed_mod
    from job.train import quantize

    # module-level switches a variant may set: its key -> (module, attribute); unset ones keep the module's own value
    switches = {"torchao_fp8_weight_gradient": (quantize, "FP8_WEIGHT_GRADIENT"), "cache_frozen_float8": (quantize, "CACHE_FROZEN_FLOAT8"),
                "fp8_grad_e4m3": (quantize, "FP8_GRADIENT_E4M3"), "fp8_recipe": (quantize, "FP8_RECIPE"),
                "depthwise_input_grad": (speed_mod, "DEPTHWISE_INPUT_GRAD")}
    for i, (name, speed) in enumerate(variants.items()):
        job = None
        speed = dict(speed)
        with contextlib.ExitStack() as patches:
            for key in switches.keys() & speed.keys():
                patches.enter_context(mock.patch.object(*switches[key], speed.pop(key)))
            # inductor settings of this variant only (compile happens in the warm-up steps, inside the patch)
            patches.enter_context(torch._inductor.config.patch(speed.pop("inductor", {})))
            if "recompute_cost" in speed:
                patches.enter_context(fresh_compile_caches())
            if args.log_partitioner:
                patches.enter_context(partitioner_log.record(args.out.parent / f"partitioner_{name}.json"))
            try:
                # each variant compiles its own graphs; without a reset dynamo's recompile limit (8 per code object,
                # the block's forward is one) is reached after a few variants and later ones silently run eagerly
                torch._dynamo.reset()
                torch.manual_seed(0)
                model = build_model(args.tiny)
                model.load_state_dict(weights)
                job = JobPath(model, make_spec(kind, speed, args), sh)
                started = time.perf_counter()
                res = {"speed": variants[name], "numerics": job.numerics(inp)}
                res["numerics_call_s"] = time.perf_counter() - started  # the first call: compiles the blocks
                try:
                    res.update(timed(job.step, args.warmup, args.iters))
                except Exception as exc:  # noqa: BLE001 - keep the numerics of a variant whose steps fail
                    res["error"] = f"{type(exc).__name__}: {exc}"
                if args.profile and name in args.profile_variants.split(","):
                    file = "profile_job.txt" if name == "job-default" else f"profile_{name}.txt"
                    res["profile_top"] = profile_table(job.step, args.out.parent / file, args.profile_rows, args.profile_shapes)
                record(name, res)
            except Exception as exc:  # noqa: BLE001
                record(name, {"speed": variants[name], "error": f"{type(exc).__name__}: {exc}",
                              "trace": traceback.format_exc()[-2000:]})
        job = model = None
        cleanup()


@contextlib.contextmanager
def fresh_compile_caches():
    """Compile without reading or writing torch's graph caches: for variants that differ from others only in
    `speed.recompute_cost`, which not every torch version keys its cached partitions by."""
    import torch._functorch.config as functorch_config

    with functorch_config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        yield


def run_validation(args, results: dict, save):
    """Transformer time of a 50-step CFG render: 50 x the median batch-2 forward (no grad, bf16)."""
    from job.models.sanavideo.validation import build_pipeline
    from job.spec.speed import SpeedSpec

    section = results.setdefault("validation", {})
    torch._dynamo.reset()  # see run_training: the training variants' compiled graphs count towards the recompile limit
    torch.manual_seed(0)
    model = build_model(args.tiny).eval()
    sh = shapes(argparse.Namespace(**{**vars(args), "batch": 2}), model)
    inp = fixed_inputs(sh)

    def forward(m):
        with torch.no_grad():
            return m(inp["noisy"].to(torch.bfloat16), encoder_hidden_states=inp["embeds"], encoder_attention_mask=inp["mask"],
                     timestep=inp["timesteps"], return_dict=False)[0]

    try:
        ref = forward(model).float()
        res = timed(lambda: forward(model), 2, args.val_iters)
        res["transformer_50_steps_s"] = 50 * res["median_s"]
        section["plain"] = res
        save()
        print(f"[validation] plain: forward {res['median_s']:.3f} s, 50 steps {res['transformer_50_steps_s']:.1f} s", flush=True)
        from diffusers import AutoencoderKLWan, DPMSolverMultistepScheduler

        # the render's last part: the Wan VAE (SANA-Video's: the class defaults) decodes the clip's latents in
        # float32, as validation loads it; plain = stock modules, then the same weights through build_pipeline
        vae = AutoencoderKLWan() if not args.tiny else AutoencoderKLWan(z_dim=4, base_dim=8, dim_mult=[1, 1, 1, 1],
                                                                        num_res_blocks=1)
        device = "cuda" if cuda() else "cpu"
        vae = vae.to(device, torch.float32).eval()
        latents = torch.randn(1, vae.config.z_dim, *sh["latent"][2:], device=device)

        def decode():
            with torch.no_grad():
                return vae.decode(latents).sample

        decoded_plain = decode().float()
        res.update({f"vae_decode_{k}": v for k, v in timed(decode, 0, args.vae_iters).items() if k in ("median_s", "times_s")})
        res["total_s"] = res["transformer_50_steps_s"] + res["vae_decode_median_s"]
        save()
        print(f"[validation] plain: VAE decode {res['vae_decode_median_s']:.2f} s, total {res['total_s']:.1f} s", flush=True)

        components = SimpleNamespace(transformer=model, vae=vae,
                                     scheduler=DPMSolverMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True,
                                                                           prediction_type="flow_prediction"))
        pipe = build_pipeline(components, speed=SpeedSpec())  # the job's validation builder (speed defaults)
        out = forward(pipe.transformer).float()
        res = timed(lambda: forward(pipe.transformer), 2, args.val_iters)
        res["transformer_50_steps_s"] = 50 * res["median_s"]
        res["output_rel_err"] = float((out - ref).norm() / ref.norm())
        res["speedup_vs_plain"] = section["plain"]["median_s"] / res["median_s"]
        if args.profile:
            res["profile_top"] = profile_table(lambda: forward(pipe.transformer), args.out.parent / "profile_validation_job.txt")
        decoded_job = decode().float()  # pipe.vae is `vae`, now as build_pipeline set it up
        res.update({f"vae_decode_{k}": v for k, v in timed(decode, 0, args.vae_iters).items() if k in ("median_s", "times_s")})
        res["vae_decode_rel_err"] = float((decoded_job - decoded_plain).norm() / decoded_plain.norm())
        res["total_s"] = res["transformer_50_steps_s"] + res["vae_decode_median_s"]
        res["total_vs_plain"] = res["total_s"] / section["plain"]["total_s"]
        section["job"] = res
        save()
        print(f"[validation] job: VAE decode {res['vae_decode_median_s']:.2f} s (rel err {res['vae_decode_rel_err']:.1e}), "
              f"total {res['total_s']:.1f} s = {res['total_vs_plain']:.3f}x plain", flush=True)
        print(f"[validation] job: forward {res['median_s']:.3f} s, 50 steps {res['transformer_50_steps_s']:.1f} s, "
              f"x{res['speedup_vs_plain']:.2f}, output rel err {res['output_rel_err']:.2e}", flush=True)
    except Exception as exc:  # noqa: BLE001
        section["error"] = f"{type(exc).__name__}: {exc}"
        section["trace"] = traceback.format_exc()[-2000:]
        save()
        print(f"[validation] failed: {section['error']}", flush=True)
    del model
    cleanup()


def forward_tflop(args) -> float | None:
    """Model FLOPs of one training-sample forward (torch's FLOP counter, bf16, no grad)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(args.tiny).eval()
    inp = fixed_inputs(shapes(args, model))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(inp["noisy"].to(torch.bfloat16), encoder_hidden_states=inp["embeds"], encoder_attention_mask=inp["mask"],
              timestep=inp["timesteps"], return_dict=False)
    del model
    cleanup()
    return counter.get_total_flops() / 1e12


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("train_step.json"))
    p.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (checks the script, not speed)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=300)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--val-iters", type=int, default=5)
    p.add_argument("--vae-iters", type=int, default=2, help="timed float32 VAE decodes per validation path")
    p.add_argument("--sections", default="full,lora,validation", help="comma list of full, lora, validation")
    p.add_argument("--full-variants", default=",".join(FULL_VARIANTS), help="comma list of " + ", ".join(FULL_VARIANTS))
    p.add_argument("--lora-variants", default=",".join(LORA_VARIANTS), help="comma list of " + ", ".join(LORA_VARIANTS))
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one plain step (full) and of the "
                   "--profile-variants steps")
    p.add_argument("--profile-variants", default="job-default,job-ff-diffusers", help="comma list of variants to profile")
    p.add_argument("--profile-rows", type=int, default=30, help="rows of the profile table written next to the JSON (>= 80)")
    p.add_argument("--profile-shapes", action="store_true", help="add the matrix products by input shapes to the profile")
    p.add_argument("--no-plain", action="store_true", help="skip the plain reference (exploratory runs: no ratio, no numerics check)")
    p.add_argument("--log-partitioner", action="store_true",
                   help="write partitioner_<variant>.json: what the memory-budget partitioner saved and recomputed")
    p.add_argument("--optimizer", default=None, help="train.optimizer of the job variants (default: the spec's default)")
    args = p.parse_args(argv)
    if args.tiny:
        args.frames, args.height, args.width, args.text_len = min(args.frames, 9), min(args.height, 64), min(args.width, 96), 8
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "trainer-inductor-cache"))
    results = {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()}}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    results["matmul_peak_tflops"] = peak = matmul_peak_tflops()
    try:
        results["forward_tflop_per_step"] = fwd = forward_tflop(args)
    except Exception as exc:  # noqa: BLE001
        results["forward_tflop_error"], fwd = f"{type(exc).__name__}: {exc}", None
    save()
    print(f"environment {results['environment']}; matmul peak {peak} TFLOP/s; forward {fwd} TFLOP", flush=True)
    sections = args.sections.split(",")
    if "full" in sections:
        run_training("full", {n: FULL_VARIANTS[n] for n in args.full_variants.split(",") if n}, args, results, save, fwd, peak)
    if "lora" in sections:
        run_training("lora", {n: LORA_VARIANTS[n] for n in args.lora_variants.split(",") if n}, args, results, save, fwd, peak)
    if "validation" in sections:
        run_validation(args, results, save)
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print("\n| path | step (median) | peak GiB | x plain | MFU | loss rel err | grad-norm rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in ("full", "lora"):
        for name, r in results.get(kind, {}).items():
            if "error" in r:
                print(f"| {kind}/{name} | error: {r['error'][:60]} | | | | | |")
                continue
            mfu = r.get("mfu_vs_matmul_peak")
            print(f"| {kind}/{name} | {r['median_s']:.3f} s | {r['peak_gib']:.1f} | {r.get('speedup_vs_plain', 1.0):.2f} | "
                  f"{'' if mfu is None else f'{mfu:.0%}'} | {r.get('loss_rel_err', 0):.2e} | {r.get('grad_norm_rel_err', 0):.2e} |")
    for name, r in results.get("full", {}).items():
        if r.get("profile_top"):  # the head of the torch.profiler table (self CUDA time), full file next to the JSON
            print(f"\nprofile of one step, full/{name}:\n" + "\n".join(r["profile_top"]))
    v = results.get("validation", {})
    for name in ("plain", "job"):
        if name in v:
            print(f"| validation/{name} (50 steps, CFG) | {v[name]['transformer_50_steps_s']:.1f} s | {v[name]['peak_gib']:.1f} | "
                  f"{v[name].get('speedup_vs_plain', 1.0):.2f} | | | |")
            if "total_s" in v[name]:
                print(f"| validation/{name} + float32 VAE decode ({v[name]['vae_decode_median_s']:.2f} s) | "
                      f"{v[name]['total_s']:.1f} s | | {v[name].get('total_vs_plain', 1.0):.3f}x plain time | | | |")


if __name__ == "__main__":
    raise SystemExit(main())
