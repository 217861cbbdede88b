"""The preflight checks. Each adds rows to the report; none downloads anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .cuda import check_driver
from .estimate import GIB, EstimateInputs, VramEstimate, cache_phase_bytes, estimate_training_vram, suggest
from .facts import DeviceFacts
from .params import load_transformer_config, param_counts
from .remotes import RemoteResult, as_uri
from .report import REMOTE_CHECK, PreflightReport
from .resources import (Need, checkpoint_bytes, checkpoints_kept, count_clips, default_model_download, host_ram_need,
                        latent_cache_bytes, text_cache_bytes)

SUPPORTED_PYTHON = ((3, 10), (3, 12))
#: A model below this many parameters is a smoke-test model: CPU is fine for it.
CPU_OK_MAX_PARAMS = 50_000_000
#: Warn when the estimate uses more than this share of what is free.
TIGHT_FRACTION = 0.9


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


# ----------------------------------------------------------------------------- model / CPU


def model_dir(spec, ws) -> Path:
    return ws.model_dir(spec.model.pretrained_model_name_or_path)


def transformer_config(spec, ws) -> tuple[dict[str, Any], str]:
    """The transformer config: the local model folder's `transformer/config.json` (a local
    source, or an already pulled copy), else the library defaults (the released 2B model)."""
    return load_transformer_config(model_dir(spec, ws))


def spec_allows_cpu(spec, ws) -> bool:
    """Whether this spec may run without a GPU (a CPU smoke job).

    Today's rule, one place to replace (e.g. by a `device: auto|cuda|cpu` spec field): the
    model is a local folder whose transformer config describes fewer than 50M parameters
    (config arithmetic; nothing is built)."""
    location = spec.model.pretrained_model_name_or_path
    local = ws.resolve(location.removeprefix("file://"))
    if as_uri(location, local.exists()) is not None:
        return False
    path = local / "transformer" / "config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return param_counts(config).total < CPU_OK_MAX_PARAMS


# ----------------------------------------------------------------------------- checks


def check_python(report: PreflightReport, facts: DeviceFacts) -> None:
    parts = tuple(int(p) for p in facts.python_version.split(".")[:2])
    lo, hi = SUPPORTED_PYTHON
    if parts < lo:
        report.add("python", "fail", f"Python {facts.python_version} is older than 3.10",
                   "use Python 3.12 (the trainer container image has it), e.g. a venv made with python3.12")
    elif parts > hi:
        report.add("python", "warn", f"Python {facts.python_version} is newer than the supported 3.10-3.12; torch, "
                   "diffusers and their compiled dependencies may lack wheels or misbehave",
                   "use Python 3.12 (the trainer container image), e.g. uv venv --python 3.12")
    else:
        report.add("python", "ok", f"Python {facts.python_version}")


def check_torch(report: PreflightReport, facts: DeviceFacts, cpu_ok: bool) -> bool:
    """torch build and CUDA availability. Returns True when the GPU is usable."""
    if facts.torch_version is None:
        report.add("torch", "fail", facts.torch_cuda_error or "torch is not installed",
                   "pip install torch (a CUDA build: https://pytorch.org/get-started/locally/), or use the trainer container image")
        return False
    has_gpu = bool(facts.gpus) or facts.driver_version is not None
    if facts.cuda_available and facts.gpus:
        report.add("torch", "ok", f"torch {facts.torch_version} (CUDA {facts.torch_cuda}), {len(facts.gpus)} GPU(s)")
        return True
    if not has_gpu:
        if cpu_ok:
            report.add("gpu", "ok", "no GPU; this spec's model is a tiny smoke-test model, so CPU is fine (slow)")
        else:
            report.add("gpu", "fail", "no NVIDIA GPU found (no driver, no device visible to this container)",
                       "run on a machine with an NVIDIA GPU (docker run --gpus all ...); only tiny smoke-test models train on CPU")
        return False
    # a GPU is there but torch cannot use it
    if facts.torch_cuda is None:
        report.add("torch", "fail" if not cpu_ok else "warn",
                   f"torch {facts.torch_version} is a CPU-only build, but a GPU ({facts.gpu_name or 'NVIDIA'}) is present",
                   "install a CUDA build of torch, e.g. pip install torch --index-url https://download.pytorch.org/whl/cu128")
        return False
    why = facts.torch_cuda_error or "torch.cuda.is_available() is False"
    report.add("torch", "fail" if not cpu_ok else "warn", f"torch {facts.torch_version} (CUDA {facts.torch_cuda}) cannot use the GPU: {why}",
               "see the driver row; check that the container sees the GPU (docker run --gpus all, NVIDIA Container Toolkit)")
    return False


def check_driver_row(report: PreflightReport, facts: DeviceFacts) -> None:
    if facts.driver_version is None and facts.driver_cuda is None and not facts.gpus:
        return
    status, detail, fix = check_driver(facts.torch_cuda, facts.driver_version, facts.driver_cuda, facts.capability)
    report.add("driver", status, detail, fix, driver=facts.driver_version, driver_cuda=facts.driver_cuda,
               torch_cuda=facts.torch_cuda, source=facts.source)


def check_precision(report: PreflightReport, spec, facts: DeviceFacts) -> None:
    """Compute capability vs the precision asked for, and the libraries precision needs."""
    model, train = spec.model, spec.train
    cap = facts.capability
    wants_bf16 = model.base_model_precision == "bf16" or train.mixed_precision in ("bf16", "fp8")
    name = facts.gpu_name or "this GPU"
    problems = []
    if cap is not None:
        sm = f"sm{cap[0]}{cap[1]}"
        if wants_bf16 and cap < (8, 0):
            problems.append(("fail", f"bf16 needs an sm80+ GPU (Ampere or newer); {name} is {sm}",
                             "use an A10/A100/L4/RTX 30xx or newer GPU, or (much slower, 2x memory) base_model_precision: fp32 "
                             "with train.mixed_precision: no"))
        if model.base_model_precision == "fp8" and cap < (8, 9):
            problems.append(("fail", f"fp8 needs an sm89+ GPU (Ada, Hopper or newer); {name} is {sm}",
                             "use an L4/L40S/RTX 40xx/H100 or newer GPU, or base_model_precision: bf16 (or int8 with LoRA)"))
        if train.mixed_precision == "fp8" and cap < (8, 9):
            problems.append(("fail", f"mixed_precision fp8 (float8 matrix products) needs an sm89+ GPU (Ada, Hopper or newer); "
                             f"{name} is {sm}", "use train.mixed_precision: bf16, or an L4/L40S/RTX 40xx/H100 or newer GPU"))
    if model.base_model_precision in ("int8", "fp8") and not facts.has_lib("torchao"):
        problems.append(("fail", f"base_model_precision {model.base_model_precision} quantises with torchao, which is not installed",
                         "pip install torchao (a version matching your torch), or use base_model_precision: bf16"))
    if train.mixed_precision == "fp8" and not facts.has_lib("torchao"):
        problems.append(("fail", "mixed_precision fp8 runs its float8 products with torchao, which is not installed",
                         "pip install torchao (a version matching your torch), or use train.mixed_precision: bf16"))
    libs = {"optimi-adamw": ("torch-optimi", "pip install torch-optimi"),
            "adamw_8bit": ("bitsandbytes", "pip install bitsandbytes")}
    if train.optimizer in libs and not facts.has_lib(libs[train.optimizer][0]):
        dist, how = libs[train.optimizer]
        problems.append(("fail", f"optimizer {train.optimizer} needs {dist}, which is not installed",
                         f"{how}, or use train.optimizer: adamw_bf16"))
    if model.type == "lora" and not facts.has_lib("peft"):
        problems.append(("fail", "LoRA training needs peft, which is not installed", "pip install peft"))
    if not problems:
        what = f"{model.base_model_precision} weights, mixed precision {train.mixed_precision}"
        detail = f"{what} on {name}" + (f" (sm{cap[0]}{cap[1]})" if cap else "")
        if (cap is not None and cap >= (8, 9) and train.mixed_precision == "bf16" and model.base_model_precision in ("bf16", "fp32")
                and spec.speed.compile_blocks and not spec.memory.group_offload.enabled and facts.has_lib("torchao")):
            detail += ("; this GPU has float8 tensor cores: train.mixed_precision: fp8 took 7-10 % off a step on an H100 "
                       "(opt-in; bench/RESULTS.md)")
        report.add("precision", "ok", detail)
        return
    for status, detail, fix in problems:
        report.add("precision", status, detail, fix)


def check_vram(report: PreflightReport, spec, facts: DeviceFacts, inputs: EstimateInputs) -> VramEstimate:
    est = estimate_training_vram(inputs)
    free = facts.free_vram(spec.train.num_processes)
    data = {"estimate": est.to_dict(), "free_vram": free}
    if free is None:
        report.add("vram", "warn", f"needs about {est.describe()}; free VRAM unknown", "install nvidia-ml-py so preflight can read it", **data)
        return est
    base = f"needs about {est.describe()}; {_gib(free)} free on {facts.gpu_name or 'the GPU'}"
    if est.total <= TIGHT_FRACTION * free:
        hint = speed_hint(inputs, TIGHT_FRACTION * free)
        if hint is not None:
            data["speed_hint"] = hint.to_dict()
        report.add("vram", "ok", base, _speed_hint_text(hint), **data)
        return est
    if est.total <= free:
        report.add("vram", "warn", base + " (tight: fragmentation or another process can still run it out)",
                   _suggestion_text(suggest(inputs, TIGHT_FRACTION * free)) or None, **data)
        return est
    suggestions = suggest(inputs, free)
    data["suggestions"] = [s.to_dict() for s in suggestions]
    report.add("vram", "fail", base, _suggestion_text(suggestions) or "use a GPU with more memory", **data)
    return est


#: (keep, budget) offered when VRAM is left over, fastest first (bench/RESULTS.md, "Training-step speed": on an
#: H100 at 81x832x480 LoRA 0.97 -> 0.73 / 0.78 / 0.84 s, full 1.16 -> 0.96 / 1.02 s per step)
SPARE_VRAM_SETTINGS = (0.5, 0.3, 0.15)


def speed_hint(inputs: EstimateInputs, budget: float):
    """With every block recomputed (the default) and memory to spare: the fastest setting of
    `speed.keep_activations_blocks` (all blocks) and `speed.activation_memory_budget` whose estimate
    still fits `budget` bytes; None when there is none or the spec already keeps blocks."""
    from dataclasses import replace

    from .estimate import Suggestion

    blocks = inputs.params.num_layers
    if not inputs.compiled or not inputs.gradient_checkpointing or inputs.kept_blocks > 0 or inputs.group_offload:
        return None
    for fraction in SPARE_VRAM_SETTINGS:
        est = estimate_training_vram(replace(inputs, kept_blocks=blocks, activation_budget=fraction))
        if est.total <= budget:
            change = f"speed.keep_activations_blocks: {blocks} with speed.activation_memory_budget: {fraction:g}"
            return Suggestion(change, est, True)
    return None


def _speed_hint_text(hint) -> str | None:
    if hint is None:
        return None
    return (f"memory to spare: {hint.change} -> {hint.estimate.total / GIB:.1f} GiB, faster steps (no block recomputed "
            "whole; bench/RESULTS.md)")


def _suggestion_text(suggestions) -> str:
    parts = []
    for s in suggestions:
        parts.append(f"{s.change} -> {s.estimate.total / GIB:.1f} GiB" + ("" if s.fits else " (not enough alone)"))
    return "; ".join(parts)


def check_cache_vram(report: PreflightReport, spec, facts: DeviceFacts, inputs: EstimateInputs) -> None:
    parts = cache_phase_bytes(inputs.frames, inputs.height * inputs.width, spec.memory.enable_model_cpu_offload,
                              inputs.crepa_encoder, inputs.crepa_image_size, batch_size=spec.data.vae_batch_size,
                              concurrent_batches=spec.data.vae_concurrent_batches)
    total = sum(parts.values())
    free = facts.free_vram(spec.train.num_processes)
    if free is None or total <= free:
        return  # only worth a row when it does not fit (training is the peak otherwise)
    report.add("vram (cache phase)", "fail", f"encoding {inputs.frames}x{inputs.width}x{inputs.height} clips needs about "
               f"{_gib(total)} (Wan VAE fp32 + Gemma2), {_gib(free)} free",
               "memory.enable_model_cpu_offload: true (the text encoder leaves the GPU while the VAE runs), or fewer frames")


def check_host_ram(report: PreflightReport, spec, facts: DeviceFacts, inputs: EstimateInputs, cpu_ok: bool = False) -> None:
    go = spec.memory.group_offload
    to_disk = bool(go.enabled and go.to_disk_path)
    parts = host_ram_need(inputs, to_disk, small_model=cpu_ok)
    total = sum(parts.values())
    shown = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for k, v in parts.items())
    free = facts.host_free_ram
    data = {"need": total, "free": free, "parts": parts}
    if free is None:
        report.add("host ram", "warn", f"needs about {_gib(total)} ({shown}); free RAM unknown", **data)
        return
    detail = f"needs about {_gib(total)} ({shown}); {_gib(free)} available"
    if total > free:
        fix = ("memory.group_offload.to_disk_path: <a fast local disk> (spills offloaded weights to disk)"
               if go.enabled and not to_disk else "use a machine (or container limit) with more RAM")
        if inputs.use_ema and not inputs.ema_on_accelerator:
            fix += "; or train.ema.device: accelerator if VRAM allows"
        report.add("host ram", "fail", detail, fix, **data)
    elif total > TIGHT_FRACTION * free:
        report.add("host ram", "warn", detail + " (tight)", None, **data)
    else:
        report.add("host ram", "ok", detail, **data)


def disk_needs(spec, ws, inputs: EstimateInputs, remote: dict[str, RemoteResult] | None = None) -> tuple[Need, list[Need]]:
    """(workspace need, other volumes' needs): downloads, caches, checkpoints; the offload folder."""
    remote = remote or {}
    need = Need(ws.root)
    location = spec.model.pretrained_model_name_or_path
    mdir = ws.model_dir(location)
    if not (mdir / "model_index.json").is_file() and not (mdir / "transformer").is_dir():
        uri = as_uri(location, ws.resolve(location.removeprefix("file://")).exists())
        if uri is not None:
            size = remote[uri].size if uri in remote else None
            need.parts["model_download"] = float(size if size is not None else default_model_download(inputs.params.total))
            if size is None:
                need.notes.append("model size assumed (bf16 transformer + Gemma2, fp32 VAE): not listed")
    clips_total = 0
    unknown = []
    for ds in spec.data.active():
        local = ws.dataset_dir(ds)
        uri = as_uri(ds.source, local.exists(), allow_bare_repo=False)
        n = count_clips(local)
        if uri is not None and n is None:
            listed = remote.get(uri)
            if listed is not None and listed.size is not None:
                need.parts[f"dataset_{ds.id}"] = float(listed.size)
                n = listed.clips
            else:
                unknown.append(f"{ds.id} (remote, not listed)")
        elif n is None:
            unknown.append(f"{ds.id} (no folder at {local})")
        if n is not None:
            clips_total += n
    if clips_total:
        need.parts["latent_cache"] = latent_cache_bytes(clips_total, inputs.latent_numel, spec.data.cache_dtype)
        need.parts["text_embed_cache"] = text_cache_bytes(clips_total + 2, spec.data.cache_dtype, spec.model.prompt.max_sequence_length)
    if unknown:
        need.notes.append(f"clip count unknown for {', '.join(unknown)}: its caches are not counted")
    ck = spec.checkpoints
    kept = checkpoints_kept(ck.total_limit, spec.train.max_train_steps, ck.step_interval)
    need.parts["checkpoints"] = kept * checkpoint_bytes(inputs)
    need.parts["final_model"] = inputs.trainable * inputs.trainable_bytes
    others = []
    go = spec.memory.group_offload
    if go.enabled and go.to_disk_path:
        off = Need(ws.resolve(go.to_disk_path))
        bytes_per = {"bf16": 2, "fp32": 4, "int8": 1, "fp8": 1}[spec.model.base_model_precision]
        off.parts["offloaded_weights"] = float(inputs.params.total * bytes_per)
        others.append(off)
    return need, others


def check_disk(report: PreflightReport, spec, ws, facts: DeviceFacts, inputs: EstimateInputs,
               remote: dict[str, RemoteResult] | None = None) -> None:
    need, others = disk_needs(spec, ws, inputs, remote)
    for label, n in [("disk (workspace)", need)] + [("disk (offload folder)", o) for o in others]:
        free = facts.free_disk_at(n.where)
        data = {"need": n.total, "free": free, "parts": n.parts, "path": str(n.where)}
        notes = ("; " + "; ".join(n.notes)) if n.notes else ""
        detail = f"{n.where}: needs about {n.describe()}; {_gib(free)} free{notes}"
        if free is None:
            report.add(label, "warn", detail, "make sure the folder's volume exists and is writable", **data)
        elif n.total > free:
            fix = ("point memory.group_offload.to_disk_path at a larger volume, or drop it if RAM allows" if label.endswith("folder)")
                   else "mount a larger volume as the workspace, or lower checkpoints.total_limit"
                   + (" (set one)" if spec.checkpoints.total_limit is None else ""))
            report.add(label, "fail", detail, fix, **data)
        elif n.total > TIGHT_FRACTION * free:
            report.add(label, "warn", detail + " (tight)", "lower checkpoints.total_limit or free space", **data)
        else:
            report.add(label, "ok", detail, **data)


def add_remote_rows(report: PreflightReport, results: list[RemoteResult]) -> None:
    for r in results:
        report.add(f"{REMOTE_CHECK}{r.target.role}", r.status, r.detail, r.fix, uri=r.target.uri, size=r.size, files=r.files)
