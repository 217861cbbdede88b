"""`trainer import-simpletuner`: a SimpleTuner config.json (+ multidatabackend.json) as a job spec.

Every key of the reference quickstart maps to a spec field or is reported by
name as not imported, with the reason. The result is validated before it is
written, so an import never produces a spec that `trainer validate` rejects
without saying why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from job.errors import InputError, SpecError, SpecProblem

# SimpleTuner key -> dotted spec path (values copied as they are).
_CONFIG_KEYS: dict[str, str] = {
    "resume_from_checkpoint": "checkpoints.resume_from_checkpoint",
    "seed": "train.seed",
    "output_dir": "output.dir",
    "max_train_steps": "train.max_train_steps",
    "num_train_epochs": "train.num_train_epochs",
    "checkpoint_step_interval": "checkpoints.step_interval",
    "checkpointing_steps": "checkpoints.step_interval",
    "checkpoints_total_limit": "checkpoints.total_limit",
    "tracker_project_name": "tracking.project_name",
    "tracker_run_name": "tracking.run_name",
    "report_to": "tracking.report_to",
    "model_type": "model.type",
    "model_family": "model.family",
    "base_model_precision": "model.base_model_precision",
    "flow_schedule_shift": "model.flow_schedule_shift",
    "flow_schedule_auto_shift": "model.flow_schedule_auto_shift",
    "lora_rank": "model.lora.rank",
    "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout",
    "train_batch_size": "train.train_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "caption_dropout_probability": "train.caption_dropout_probability",
    "mixed_precision": "train.mixed_precision",
    "optimizer": "train.optimizer",
    "learning_rate": "train.learning_rate",
    "max_grad_norm": "train.max_grad_norm",
    "grad_clip_method": "train.grad_clip_method",
    "lr_scheduler": "train.lr_scheduler",
    "lr_warmup_steps": "train.lr_warmup_steps",
    "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2",
    "adam_weight_decay": "train.weight_decay",
    "adam_epsilon": "train.adam_epsilon",
    "use_ema": "train.use_ema",
    "ema_decay": "train.ema.decay",
    "ema_update_interval": "train.ema.update_interval",
    "ema_validation": "train.ema.validation",
    "ignore_final_epochs": "train.ignore_final_epochs",
    "gradient_checkpointing": "memory.gradient_checkpointing",
    "enable_group_offload": "memory.group_offload.enabled",
    "group_offload_type": "memory.group_offload.type",
    "group_offload_blocks_per_group": "memory.group_offload.blocks_per_group",
    "group_offload_use_stream": "memory.group_offload.use_stream",
    "group_offload_to_disk_path": "memory.group_offload.to_disk_path",
    "enable_model_cpu_offload": "memory.enable_model_cpu_offload",
    "vae_batch_size": "data.vae_batch_size",
    "compress_disk_cache": "data.compress_disk_cache",
    "delete_problematic_images": "data.delete_problematic_videos",
    "framerate": "data.framerate",
    "validation_seed": "validation.seed",
    "validation_step_interval": "validation.step_interval",
    "validation_steps": "validation.step_interval",
    "validation_negative_prompt": "validation.negative_prompt",
    "validation_guidance": "validation.guidance",
    "validation_num_inference_steps": "validation.num_inference_steps",
    "validation_num_video_frames": "validation.num_video_frames",
    "validation_prompt": "validation.prompt",
    "validation_preview": "validation.preview.enabled",
    "validation_preview_steps": "validation.preview.steps",
    "user_prompt_library": "validation.prompt_library",
    "crepa_enabled": "train.crepa.enabled",
    "crepa_block_index": "train.crepa.block_index",
    "crepa_lambda": "train.crepa.weight",
    "crepa_weight": "train.crepa.weight",
    "crepa_adjacent_distance": "train.crepa.adjacent_distance",
    "crepa_adjacent_tau": "train.crepa.temporal_decay",
    "crepa_temporal_decay": "train.crepa.temporal_decay",
    "crepa_encoder": "train.crepa.encoder",
    "crepa_encoder_image_size": "train.crepa.encoder_image_size",
    "crepa_drop_vae_encoder": "memory.drop_vae_encoder",
}

# Keys handled specially below, or deliberately not imported (with the reason).
_NOT_IMPORTED: dict[str, str] = {
    "quantize_via": "trainer quantises on the accelerator; base_model_precision picks the precision",
    "validation_prompt_library": "SimpleTuner's built-in prompt library is not shipped; use validation.prompt_library with your own prompts",
    "hub_model_id": "used with push_to_hub to form output.push_to",
    "validation_torch_compile": "validation compile is decided by trainer",
    "disable_benchmark": "trainer has no startup benchmark",
    "aspect_bucket_rounding": "buckets are always multiples of 16 px",
    "minimum_image_size": "set per dataset in data.datasets[].minimum_image_size",
    "validation_using_datasets": "validation renders from prompts only",
    "num_validation_images": "one video per prompt and resolution",
    "validation_noise_scheduler": "validation uses the checkpoint's own scheduler",
    "validation_clip_score": "CLIP score is not offered for video (the quickstart advises against it)",
    "evaluation_type": "not supported for video",
}

_DATASET_KEYS: dict[str, str] = {
    "id": "id",
    "crop": "crop",
    "crop_style": "crop_style",
    "resolution": "resolution",
    "resolution_type": "resolution_type",
    "minimum_image_size": "minimum_image_size",
    "maximum_image_size": "maximum_image_size",
    "target_downsample_size": "target_downsample_size",
    "cache_dir_vae": "cache_dir_vae",
    "instance_data_dir": "source",
    "disabled": "disabled",
    "caption_strategy": "caption_strategy",
    "instance_prompt": "instance_prompt",
    "metadata_backend": "metadata_backend",
    "repeats": "repeats",
    "dataset_type": "dataset_type",
}
_VIDEO_KEYS = ("num_frames", "min_frames", "max_frames", "is_i2v", "bucket_strategy", "frame_interval")
_DATASET_NOT_IMPORTED = {
    "type": "trainer reads local folders (or pulls hf:// / s3:// sources into the workspace); set `source` for remote data",
    "default": "trainer has exactly one text-embeds cache",
    "probability": "datasets are sampled in proportion to their size",
    "skip_file_discovery": "discovery results are cached automatically",
    "preserve_data_backend_cache": "metadata caches are always kept and refreshed when files change",
}
_CAPTION_STRATEGIES = {"textfile": "textfile", "filename": "filename", "instanceprompt": "instance_prompt", "instance_prompt": "instance_prompt"}
_RESOLUTION_TYPES = {"pixel_area": "pixel_area", "pixel": "pixel"}


def _set(spec: dict, dotted: str, value: Any) -> None:
    node = spec
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _bool(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _hub_location(value: Any) -> Any:
    """A bare Hub id `owner/repo` becomes `hf://owner/repo`; paths and URIs stay."""
    if isinstance(value, str) and "://" not in value and value.count("/") == 1 and not value.startswith((".", "/", "~")) and not Path(value).exists():
        return f"hf://{value}"
    return value


#: SimpleTuner's `base_model_precision` names -> trainer's. SimpleTuner picks the quantisation library in
#: the name (quanto or torchao); trainer quantises a frozen base with torchao, to the same 8-bit formats.
_BASE_PRECISIONS = {"no_change": "bf16", "int8-quanto": "int8", "int8-torchao": "int8", "fp8-quanto": "fp8",
                    "fp8uz-quanto": "fp8", "fp8-torchao": "fp8", "fp8wo-torchao": "fp8"}


def _base_precision(value: Any) -> tuple[Any, str | None]:
    """(trainer's value or None to leave the field unset, why it was not imported)."""
    if not isinstance(value, str) or value in ("bf16", "fp32", "int8", "fp8"):
        return value, None
    if value in _BASE_PRECISIONS:
        return _BASE_PRECISIONS[value], None
    return None, (f"{value!r}: trainer quantises a frozen LoRA base to int8 or fp8 only (4-bit and 2-bit bases are not "
                  "supported); the base stays bf16")


def convert(config: dict[str, Any], backends: list[dict[str, Any]] | None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Returns (spec data, [(key, why not imported)])."""
    spec: dict[str, Any] = {"version": 1}
    unsupported: list[tuple[str, str]] = []
    global_resolution = {k: config[k] for k in ("resolution", "resolution_type") if k in config}

    for raw_key, value in config.items():
        key = raw_key.lstrip("-")
        value = _bool(value)
        if key in ("data_backend_config", "resolution", "resolution_type", "pretrained_model_name_or_path",
                   "pretrained_vae_model_name_or_path", "push_to_hub", "validation_resolution"):
            continue
        if key == "base_model_precision":
            value, why = _base_precision(value)
            if why:
                unsupported.append((raw_key, why))
            if value is not None:
                _set(spec, _CONFIG_KEYS[key], value)
        elif key in _CONFIG_KEYS:
            _set(spec, _CONFIG_KEYS[key], value)
        elif key in _NOT_IMPORTED:
            if not (key == "validation_prompt_library" and value is False) and key != "hub_model_id":
                unsupported.append((raw_key, _NOT_IMPORTED[key]))
        else:
            unsupported.append((raw_key, "no equivalent in trainer's spec"))

    for key in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path"):
        if key in config:
            _set(spec, f"model.{key}", _hub_location(config[key]))
    if "validation_resolution" in config:
        sizes = [s.strip() for s in str(config["validation_resolution"]).split(",") if s.strip()]
        _set(spec, "validation.resolutions", sizes)
    if _bool(config.get("push_to_hub")) is True:
        repo = config.get("hub_model_id") or config.get("tracker_run_name") or "sanavideo-finetune"
        if "/" not in str(repo):
            unsupported.append(("push_to_hub", f"the Hub owner of {repo!r} is unknown: set HF_USER or edit output.push_to"))
            repo = f"${{HF_USER:-CHANGE-ME}}/{repo}"
        _set(spec, "output.push_to", f"hf://{repo}")
    if "tracker_run_name" in config:
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in str(config["tracker_run_name"]))[:64].strip("-.")
        if name:
            spec["name"] = name
    ema = spec.get("train", {}).get("ema")
    if ema and not spec.get("train", {}).get("use_ema"):
        unsupported.append(("ema_*", "EMA options are ignored because use_ema is not true"))
        spec["train"].pop("ema")

    datasets: list[dict[str, Any]] = []
    for index, backend in enumerate(backends or []):
        kind = backend.get("dataset_type", "image")
        label = f"backend[{index}] ({backend.get('id', '?')})"
        if kind == "text_embeds":
            text: dict[str, Any] = {}
            for key, value in backend.items():
                if key in ("id", "cache_dir", "write_batch_size"):
                    text[key] = value
                elif key not in ("dataset_type", "type", "default", "disabled"):
                    unsupported.append((f"{label}.{key}", "no equivalent for the text-embeds cache"))
            if backend.get("type", "local") != "local":
                unsupported.append((f"{label}.type", "only a local text-embeds cache is supported"))
            spec.setdefault("data", {})["text_embeds"] = text
            continue
        if kind != "video":
            unsupported.append((label, f"dataset_type {kind!r}: SANA-Video trains on video datasets only"))
            continue
        dataset: dict[str, Any] = {}
        for key, value in backend.items():
            value = _bool(value)
            if key in _DATASET_KEYS:
                if key == "caption_strategy":
                    if value not in _CAPTION_STRATEGIES:
                        unsupported.append((f"{label}.caption_strategy", f"{value!r} is not supported; use textfile, filename, instance_prompt or a captions_file"))
                        continue
                    value = _CAPTION_STRATEGIES[value]
                if key == "resolution_type" and value not in _RESOLUTION_TYPES:
                    unsupported.append((f"{label}.resolution_type", f"{value!r} is not supported; use pixel_area or pixel"))
                    continue
                dataset[_DATASET_KEYS[key]] = value
            elif key == "video" and isinstance(value, dict):
                video = {k: v for k, v in value.items() if k in _VIDEO_KEYS}
                for k in value:
                    if k not in _VIDEO_KEYS:
                        unsupported.append((f"{label}.video.{k}", "no equivalent video option"))
                dataset["video"] = video
            elif key in _DATASET_NOT_IMPORTED:
                if not (key == "type" and value == "local"):
                    unsupported.append((f"{label}.{key}", _DATASET_NOT_IMPORTED[key]))
            else:
                unsupported.append((f"{label}.{key}", "no equivalent dataset option"))
        for key, value in global_resolution.items():
            dataset.setdefault(key, value)
        if "source" not in dataset:
            dataset["source"] = f"datasets/{dataset.get('id', f'dataset-{index}')}"
            unsupported.append((f"{label}.instance_data_dir", f"missing; assumed {dataset['source']}"))
        datasets.append(dataset)
    if datasets:
        spec.setdefault("data", {})["datasets"] = datasets
    from .root import JobSpec

    order = list(JobSpec.model_fields)
    return dict(sorted(spec.items(), key=lambda item: order.index(item[0]))), unsupported


def convert_files(config_path: Path, backend_path: Path | None) -> tuple[str, list[tuple[str, str]]]:
    """Read SimpleTuner files and return (spec YAML text, not-imported keys). The spec is validated."""
    from .loader import validate_data

    config = _read_json(config_path, dict)
    if backend_path is None and config.get("data_backend_config"):
        candidate = Path(config["data_backend_config"])
        for base in (Path.cwd(), config_path.parent, config_path.parent.parent):
            if (base / candidate).exists():
                backend_path = base / candidate
                break
    backends = _read_json(backend_path, list) if backend_path else None
    data, unsupported = convert(config, backends)
    if backends is None:
        unsupported.append(("data_backend_config", "not found; add data.datasets to the spec by hand"))
        data.setdefault("data", {})["datasets"] = [{"id": "my-clips", "source": "datasets/my-clips"}]
    header = (
        f"# Imported from SimpleTuner: {config_path.name}" + (f" + {backend_path.name}" if backend_path else "") + "\n"
        "# Check it with `trainer validate`; keys that were not imported are listed by the import command.\n"
    )
    text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    try:
        validate_data(yaml.safe_load(text), source="imported spec", env={})
    except SpecError as exc:  # every problem, each named by the SimpleTuner key to fix where one maps to it
        raise SpecError([_in_simpletuner_terms(p) for p in exc.problems],
                        f"the spec imported from {config_path.name} (fix the SimpleTuner file and import again)") from None
    return text, unsupported


def _in_simpletuner_terms(problem: SpecProblem) -> SpecProblem:
    keys = [key for key, path in _CONFIG_KEYS.items() if path == problem.path]
    if not keys:
        return problem
    where = f"--{keys[0]} in the SimpleTuner config"
    return SpecProblem(problem.path, problem.message, f"{problem.fix} ({where})" if problem.fix else f"set {where}")


def _read_json(path: Path, kind: type) -> Any:
    if not path.exists():
        raise InputError(f"{path} does not exist", "pass the path of the SimpleTuner file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}", "fix the file (SimpleTuner configs are JSON)") from None
    if not isinstance(value, kind):
        raise InputError(f"{path} should hold a JSON {'object' if kind is dict else 'list'}", "check you passed config.json then multidatabackend.json")
    return value
