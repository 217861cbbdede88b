"""Peak VRAM of real SANA-Video 2B training steps vs the preflight estimate.

Run on a GPU (one command, a few minutes on an H100):

    PYTHONUNBUFFERED=1 python bench/vram_estimate.py --out results.json

It builds the full-size random-weight `SanaVideoTransformer3DModel()` (the 2B config) on the GPU,
runs real training steps (forward, flow-matching MSE loss, backward, grad clipping, optimizer
step, zero_grad) for several configurations, and records `torch.cuda.max_memory_allocated` per
phase (forward / backward / optimizer step) next to the estimate `job.preflight` makes for the
same spec. It also measures the validation pieces (one CFG-batch-2 denoising forward; Wan VAE
decode and encode at 81x832x480, fp32). Every configuration runs in its own try block: an
out-of-memory is recorded as such (and is a data point: the estimate should be above the card).

Without a GPU, `--report results.json` re-computes the estimates with the current estimator
and prints the Markdown table of `bench/RESULTS.md` (so the estimator can be re-calibrated
offline against recorded measurements).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024 ** 3

# name, type (full/lora), weights (bf16/fp32), autocast, checkpointing, frames, height, width, batch
CONFIGS = [
    dict(name="full-bf16-ckpt", type="full", weights="bf16", autocast=False, ckpt=True, frames=81, height=480, width=832, batch=1),
    dict(name="full-fp32master-autocast-ckpt", type="full", weights="fp32", autocast=True, ckpt=True, frames=81, height=480, width=832, batch=1),
    dict(name="lora64-attn-autocast-ckpt", type="lora", weights="bf16", autocast=True, ckpt=True, frames=81, height=480, width=832, batch=1),
    dict(name="full-bf16-autocast-ckpt", type="full", weights="bf16", autocast=True, ckpt=True, frames=81, height=480, width=832, batch=1),
    dict(name="full-bf16-nockpt-81x480x288", type="full", weights="bf16", autocast=False, ckpt=False, frames=81, height=288, width=480, batch=1),
    dict(name="full-bf16-nockpt-33x832x480", type="full", weights="bf16", autocast=False, ckpt=False, frames=33, height=480, width=832, batch=1),
    dict(name="full-bf16-autocast-nockpt-17x832x480", type="full", weights="bf16", autocast=True, ckpt=False, frames=17, height=480, width=832, batch=1),
    dict(name="lora64-attn-autocast-nockpt-81x480x288", type="lora", weights="bf16", autocast=True, ckpt=False, frames=81, height=288, width=480, batch=1),
    dict(name="full-bf16-ckpt-bs2-81x480x288", type="full", weights="bf16", autocast=False, ckpt=True, frames=81, height=288, width=480, batch=2),
]

#: Held out: run after the estimator was calibrated on CONFIGS, to check it out of sample.
HELDOUT = [
    dict(name="full-bf16-autocast-ckpt-bs2", type="full", weights="bf16", autocast=True, ckpt=True, frames=81, height=480, width=832, batch=2),
    dict(name="full-bf16-ckpt-121x832x480", type="full", weights="bf16", autocast=False, ckpt=True, frames=121, height=480, width=832, batch=1),
    dict(name="full-fp32master-autocast-nockpt-17x832x480", type="full", weights="fp32", autocast=True, ckpt=False, frames=17, height=480, width=832, batch=1),
    dict(name="lora16-attn+ff-autocast-ckpt-49x832x480", type="lora", weights="bf16", autocast=True, ckpt=True, frames=49, height=480, width=832, batch=1,
         lora_rank=16, lora_targets=["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point"]),
    dict(name="full-bf16-autocast-ckpt-optimi-kahan", type="full", weights="bf16", autocast=True, ckpt=True, frames=81, height=480, width=832, batch=1,
         optimizer="optimi-adamw"),
    dict(name="lora64-attn-autocast-ckpt-groupoffload", type="lora", weights="bf16", autocast=True, ckpt=True, frames=81, height=480, width=832, batch=1,
         group_offload=True),
]

#: Measurements on an H100 with the plain diffusers model (random weights, bs 1, 81x832x480)
#: given with the task, before this bench existed; kept as calibration points.
PRIOR_MEASUREMENTS = [
    dict(name="prior: full-bf16-ckpt (torch AdamW)", config="full-bf16-ckpt", peak_gib=22.3),
    dict(name="prior: full-fp32master-autocast-ckpt", config="full-fp32master-autocast-ckpt", peak_gib=38.0),
    dict(name="prior: lora64-attn-autocast-ckpt", config="lora64-attn-autocast-ckpt", peak_gib=14.7),
]


def spec_for(cfg: dict):
    """A JobSpec that describes a bench configuration (what the trainer would run)."""
    from job.spec import JobSpec

    full = cfg["type"] == "full"
    data = {
        "version": 1,
        "workspace": "/tmp/bench-ws",
        "model": {"type": cfg["type"], "base_model_precision": cfg["weights"],
                  "pretrained_model_name_or_path": "hf://Efficient-Large-Model/SANA-Video_2B_480p_diffusers"},
        "data": {"datasets": [{"id": "clips", "source": "clips", "resolution_type": "pixel_area",
                               "video": {"num_frames": cfg["frames"]}}]},
        "train": {"mixed_precision": "bf16" if cfg["autocast"] else "no", "optimizer": cfg.get("optimizer", "adamw"),
                  "train_batch_size": cfg["batch"], "max_train_steps": 10},
        "memory": {"gradient_checkpointing": cfg["ckpt"],
                   "group_offload": {"enabled": bool(cfg.get("group_offload")), "blocks_per_group": 1, "use_stream": True}},
        "validation": {"enabled": False},
        "speed": {"compile_blocks": False},  # this bench measures eager steps (the estimate differs when compiled)
    }
    if not full:
        data["model"]["lora"] = {"rank": cfg.get("lora_rank", 64),
                                 "target_modules": cfg.get("lora_targets", ["to_q", "to_k", "to_v", "to_out.0"])}
    return JobSpec.model_validate(data)


def estimate_for(cfg: dict) -> dict | None:
    try:
        from job.preflight.estimate import estimate_training_vram, inputs_from_spec
    except Exception as exc:  # noqa: BLE001 - the estimator may not be importable on the device
        return {"error": f"{type(exc).__name__}: {exc}"}
    spec = spec_for(cfg)
    inputs = inputs_from_spec(spec, transformer_config=None, frames=cfg["frames"], height=cfg["height"], width=cfg["width"])
    est = estimate_training_vram(inputs)
    return {"allocated_gib": est.allocated / GIB, "total_gib": est.total / GIB,
            "parts_gib": {k: v / GIB for k, v in est.parts.items()}, "phase_gib": {k: v / GIB for k, v in est.phases.items()}}


# --------------------------------------------------------------------------------- GPU side

def _mem():
    import torch

    return torch.cuda.memory_allocated() / GIB


def _peak():
    import torch

    return torch.cuda.max_memory_allocated() / GIB


def _reset():
    import torch

    torch.cuda.reset_peak_memory_stats()


def _cleanup():
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    _reset()


def build_transformer(weights: str, device: str = "cuda"):
    import torch
    from diffusers import SanaVideoTransformer3DModel

    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    with torch.device(device):
        model = SanaVideoTransformer3DModel()
    model.to(dtype)
    return model


def add_lora(model, rank: int = 64, targets: list[str] | None = None):
    import torch
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=targets or ["to_q", "to_k", "to_v", "to_out.0"]))
    for p in model.parameters():  # what diffusers' training scripts do: fp32 LoRA params
        if p.requires_grad:
            p.data = p.data.to(torch.float32)


def run_training_config(cfg: dict, steps: int = 3) -> dict:
    import torch

    _cleanup()
    t0 = time.time()
    offload = bool(cfg.get("group_offload"))
    model = build_transformer(cfg["weights"], device="cpu" if offload else "cuda")
    if cfg["type"] == "lora":
        add_lora(model, cfg.get("lora_rank", 64), cfg.get("lora_targets"))
    if offload:
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(model, onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    if cfg["ckpt"]:
        model.enable_gradient_checkpointing()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    if cfg.get("optimizer") == "optimi-adamw":
        from optimi import AdamW as OptimiAdamW

        opt = OptimiAdamW(trainable, lr=1e-5, kahan_sum=True)
    elif offload:
        opt = torch.optim.AdamW(trainable, lr=1e-5, foreach=False)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    B, F, H, W = cfg["batch"], cfg["frames"], cfg["height"], cfg["width"]
    lf, lh, lw = (F - 1) // 4 + 1, H // 8, W // 8
    dtype = torch.bfloat16 if cfg["weights"] == "bf16" else torch.float32
    # What the trainer feeds: cached latents / embeddings (bf16 cache), fp32 noise arithmetic.
    latents = torch.randn(B, 16, lf, lh, lw, device="cuda", dtype=torch.bfloat16)
    embeds = torch.randn(B, 300, 2304, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(B, 300, device="cuda", dtype=torch.long)
    mask[:, 120:] = 0
    _reset()
    static = _mem()
    record = {"config": cfg, "params_total": n_total, "params_trainable": n_train, "static_gib": static,
              "build_s": time.time() - t0, "steps": []}
    for step in range(steps):
        ts = time.time()
        x0 = latents.float()
        noise = torch.randn_like(x0)
        sigma = torch.rand(B, device="cuda")
        s = sigma.view(B, 1, 1, 1, 1)
        noisy = ((1 - s) * x0 + s * noise).to(dtype if not cfg["autocast"] else (torch.bfloat16 if cfg["weights"] == "bf16" else torch.float32))
        target = noise - x0
        del x0, noise
        _reset()
        start = _mem()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg["autocast"]):
            pred = model(noisy, encoder_hidden_states=embeds.to(dtype) if not cfg["autocast"] else embeds,
                         timestep=sigma * 1000, encoder_attention_mask=mask, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        del pred
        after_fwd, peak_fwd = _mem(), _peak()
        _reset()
        loss.backward()
        after_bwd, peak_bwd = _mem(), _peak()
        _reset()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step, peak_step = _mem(), _peak()
        torch.cuda.synchronize()
        del loss, noisy, target
        record["steps"].append(dict(start_gib=start, after_fwd_gib=after_fwd, peak_fwd_gib=peak_fwd, after_bwd_gib=after_bwd,
                                    peak_bwd_gib=peak_bwd, after_step_gib=after_step, peak_step_gib=peak_step,
                                    seconds=time.time() - ts))
    record["peak_gib"] = max(max(s["peak_fwd_gib"], s["peak_bwd_gib"], s["peak_step_gib"]) for s in record["steps"])
    record["max_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    del model, opt, trainable, latents, embeds, mask
    _cleanup()
    return record


def run_validation_probe(frames: int = 81, height: int = 480, width: int = 832) -> dict:
    """One denoising forward with CFG (batch 2), bf16 weights, no grad: the transformer's share of the
    validation peak. Then the Wan VAE (fp32, the loader's default) decoding and encoding one video."""
    import torch
    from diffusers import AutoencoderKLWan

    out = {}
    _cleanup()
    model = build_transformer("bf16").eval()
    lf, lh, lw = (frames - 1) // 4 + 1, height // 8, width // 8
    x = torch.randn(2, 16, lf, lh, lw, device="cuda", dtype=torch.bfloat16)
    embeds = torch.randn(2, 300, 2304, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 300, device="cuda", dtype=torch.long)
    base = _mem()
    _reset()
    with torch.no_grad():
        model(x, encoder_hidden_states=embeds, timestep=torch.full((2,), 500.0, device="cuda"), encoder_attention_mask=mask, return_dict=False)
    out["transformer_cfg2_transient_gib"] = _peak() - base
    out["transformer_weights_gib"] = base
    del model, x, embeds, mask
    _cleanup()
    vae = AutoencoderKLWan().to("cuda", torch.float32).eval()
    base = _mem()
    out["vae_weights_gib"] = base
    for latent_frames, key in ((9, "vae_decode_33f_transient_gib"), (lf, "vae_decode_transient_gib")):
        z = torch.randn(1, 16, latent_frames, lh, lw, device="cuda")
        _reset()
        t = time.time()
        with torch.no_grad():
            video = vae.decode(z, return_dict=False)[0]
        out[key] = _peak() - base
        out[key.replace("transient_gib", "s")] = time.time() - t
        del video, z
        _cleanup()
    v = torch.randn(1, 3, frames, height, width, device="cuda")
    base = _mem()
    _reset()
    t = time.time()
    with torch.no_grad():
        vae.encode(v).latent_dist.sample()
    out["vae_encode_transient_gib"] = _peak() - base
    out["vae_encode_s"] = time.time() - t
    del vae, v
    _cleanup()
    return out


def environment() -> dict:
    import torch

    env = {"date": _dt.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda}
    try:
        import diffusers
        import peft

        env["diffusers"], env["peft"] = diffusers.__version__, peft.__version__
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, total_gib=p.total_memory / GIB, capability=f"{p.major}.{p.minor}")
        free, total = torch.cuda.mem_get_info()
        env["free_after_init_gib"] = free / GIB
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    try:
        from job.preflight import gather_facts

        env["gather_facts"] = gather_facts(workspace=Path("/tmp")).to_dict()
    except Exception as exc:  # noqa: BLE001
        env["gather_facts_error"] = f"{type(exc).__name__}: {exc}"
    return env


def measure(out_path: Path, only: list[str] | None, budget_s: float, configs: list[dict] | None = None,
            validation: bool = True, preflight_spec: str | None = None) -> dict:
    import torch

    start = time.time()
    results = {"environment": environment(), "runs": [], "validation": None}

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2, default=str))

    save()
    if preflight_spec:
        results["preflight"] = preflight_on_this_machine(preflight_spec)
        save()
    for cfg in configs or CONFIGS:
        if only and cfg["name"] not in only:
            continue
        if time.time() - start > budget_s:
            results["runs"].append({"config": cfg, "skipped": "time budget"})
            continue
        print(f"== {cfg['name']}", flush=True)
        try:
            rec = run_training_config(cfg)
            print(f"   peak {rec['peak_gib']:.2f} GiB (static {rec['static_gib']:.2f}); steps "
                  f"{[round(s['seconds'], 1) for s in rec['steps']]} s", flush=True)
        except torch.OutOfMemoryError as exc:
            rec = {"config": cfg, "oom": True, "error": str(exc).splitlines()[0][:300]}
            print(f"   out of memory", flush=True)
        except Exception as exc:  # noqa: BLE001
            rec = {"config": cfg, "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"   error {rec['error']}", flush=True)
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        rec["estimate"] = estimate_for(cfg)
        results["runs"].append(rec)
        save()
    if validation and (not only or "validation" in only):
        try:
            results["validation"] = run_validation_probe()
            print(f"== validation {results['validation']}", flush=True)
        except Exception as exc:  # noqa: BLE001
            results["validation"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        save()
    return results


def preflight_on_this_machine(spec_path: str) -> dict:
    """run_preflight for a shipped spec on this GPU (remotes not contacted): the real facts path."""
    try:
        from job.preflight import run_preflight
        from job.spec import load_spec
        from job.workspace import Workspace

        os.environ.setdefault("TRAINER_WORKSPACE", "/tmp/bench-preflight-ws")
        loaded = load_spec(Path(spec_path))
        t = time.time()
        report = run_preflight(loaded.spec, Workspace.for_spec(loaded.spec), check_remotes=False)
        out = report.to_dict()
        out["seconds"] = time.time() - t
        from rich.console import Console

        report.render(Console(width=160))
        return out
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


# --------------------------------------------------------------------------------- report

def report(results: dict) -> str:
    env = results.get("environment", {})
    lines = [
        f"GPU: {env.get('gpu', '?')} ({env.get('total_gib', 0):.1f} GiB), driver {env.get('driver', '?')}, "
        f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), diffusers {env.get('diffusers', '?')}, "
        f"peft {env.get('peft', '?')}, Python {env.get('python', '?')}, measured {env.get('date', '?')}.",
        "",
        "| configuration | tokens | measured peak (GiB) | estimate (GiB) | error |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    from job.preflight.estimate import estimate_training_vram, inputs_from_spec

    def est(cfg):
        inputs = inputs_from_spec(spec_for(cfg), transformer_config=None, frames=cfg["frames"], height=cfg["height"], width=cfg["width"])
        return estimate_training_vram(inputs)

    def tokens(cfg):
        return cfg["batch"] * ((cfg["frames"] - 1) // 4 + 1) * (cfg["height"] // 16) * (cfg["width"] // 16)

    by_name = {c["name"]: c for c in CONFIGS + HELDOUT}
    for rec in results.get("runs", []):
        cfg = rec["config"]
        e = est(cfg).allocated / GIB
        if rec.get("oom"):
            card = env.get("total_gib", 0)
            lines.append(f"| {cfg['name']} | {tokens(cfg):,} | out of memory (> {card:.0f}) | {e:.1f} | "
                         f"{'ok: above the card' if e > card else 'UNDER: predicted to fit'} |")
        elif "peak_gib" in rec:
            m = rec["peak_gib"]
            lines.append(f"| {cfg['name']} | {tokens(cfg):,} | {m:.2f} | {e:.2f} | {100 * (e - m) / m:+.1f}% |")
        else:
            lines.append(f"| {cfg['name']} | {tokens(cfg):,} | {rec.get('skipped') or rec.get('error', '?')} | {e:.1f} | |")
    calibration_run = any(r["config"]["name"] in {c["name"] for c in CONFIGS} for r in results.get("runs", []))
    for prior in PRIOR_MEASUREMENTS if calibration_run else []:
        cfg = by_name[prior["config"]]
        e = est(cfg).allocated / GIB
        m = prior["peak_gib"]
        lines.append(f"| {prior['name']} | {tokens(cfg):,} | {m:.1f} | {e:.2f} | {100 * (e - m) / m:+.1f}% |")
    val = results.get("validation") or {}
    if "vae_decode_transient_gib" in val:
        lines += ["", f"Validation pieces (81x832x480): transformer CFG-batch-2 forward transient "
                      f"{val['transformer_cfg2_transient_gib']:.2f} GiB; Wan VAE fp32 decode transient "
                      f"{val['vae_decode_transient_gib']:.2f} GiB ({val.get('vae_decode_s', 0):.1f} s), encode transient "
                      f"{val['vae_encode_transient_gib']:.2f} GiB."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "vram_estimate.json")
    parser.add_argument("--only", nargs="*", help="Configuration names (and/or 'validation') to run.")
    parser.add_argument("--budget-s", type=float, default=360.0, help="Skip remaining configurations after this long.")
    parser.add_argument("--report", type=Path, help="Print the RESULTS.md table for a recorded JSON (no GPU needed).")
    parser.add_argument("--heldout", action="store_true", help="Run the held-out configurations (out-of-sample check) instead.")
    parser.add_argument("--no-validation", action="store_true", help="Skip the validation / VAE probe.")
    parser.add_argument("--preflight-spec", help="Also run run_preflight for this spec on this machine (no remotes).")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark measures GPU memory (use --report FILE to print a recorded run)", file=sys.stderr)
        return 3
    results = measure(args.out, args.only, args.budget_s, HELDOUT if args.heldout else CONFIGS,
                      validation=not args.no_validation, preflight_spec=args.preflight_spec)
    try:
        print(report(results))
    except Exception as exc:  # noqa: BLE001 - the table is a convenience; the JSON is the record
        print(f"(no table: {type(exc).__name__}: {exc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
