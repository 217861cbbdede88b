"""Cross-field rules: checks that involve more than one field.

Each rule returns problems with the YAML path they concern, so that every
mistake in a spec is reported at once. Warnings are things that work but
probably are not what the user meant.
"""

from __future__ import annotations

import re

from job.errors import SpecProblem

from .base import SPATIAL_MULTIPLE, is_4k_plus_1, nearest_4k_plus_1
from .root import JobSpec

URI_SCHEMES = ("hf://", "s3://", "file://")


def _looks_like_uri(value: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value))


def _check_location(path: str, value: str, allow_bare_repo: bool) -> list[SpecProblem]:
    if _looks_like_uri(value) and not value.startswith(URI_SCHEMES):
        scheme = value.split("://", 1)[0]
        return [SpecProblem(path, f"unknown scheme '{scheme}://' in {value!r}", "use a local path, hf://owner/repo or s3://bucket/prefix")]
    if value.startswith("s3://") and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", value):
        return [SpecProblem(path, f"{value!r} is not a valid s3:// URI", "write s3://bucket-name/optional/prefix (bucket names are lower case)")]
    if value.startswith("hf://") and not re.match(r"^hf://((datasets|models)/)?[\w.-]+/[\w.-]+(@[\w./-]+?)?(/.*)?$", value):
        return [SpecProblem(path, f"{value!r} is not a valid hf:// URI", "write hf://owner/repo, hf://datasets/owner/repo or hf://owner/repo@revision")]
    return []


def check_rules(spec: JobSpec) -> list[SpecProblem]:
    problems: list[SpecProblem] = []
    add = problems.append
    mem, train, val, model = spec.memory, spec.train, spec.validation, spec.model

    if mem.group_offload.enabled and mem.enable_model_cpu_offload:
        add(SpecProblem("memory.enable_model_cpu_offload", "cannot be combined with memory.group_offload.enabled",
                        "keep group offload and set enable_model_cpu_offload: false (the quickstart says the same)"))
    if mem.group_offload.type == "leaf_level" and "blocks_per_group" in mem.group_offload.model_fields_set:
        add(SpecProblem("memory.group_offload.blocks_per_group", "only applies to type: block_level", "remove it or use type: block_level"))

    if model.base_model_precision in ("int8", "fp8") and model.type == "full":
        add(SpecProblem("model.base_model_precision", f"{model.base_model_precision} quantises the frozen base, so it needs model.type: lora",
                        "use model.type: lora, or base_model_precision: bf16 (float8 matrix products for a full fine-tune: "
                        "train.mixed_precision: fp8)"))
    elif model.base_model_precision in ("int8", "fp8") and train.mixed_precision == "fp8":
        add(SpecProblem("train.mixed_precision", f"fp8 matrix products cannot be combined with base_model_precision: "
                        f"{model.base_model_precision} (a quantised base is not converted again)",
                        "use base_model_precision: bf16 with mixed_precision: fp8 (faster), or mixed_precision: bf16 with the "
                        "quantised base (less memory)"))
    if model.type != "lora" and "lora" in model.model_fields_set:
        add(SpecProblem("model.lora", "LoRA settings are given but model.type is 'full'", "set model.type: lora or remove model.lora"))

    if "ema" in train.model_fields_set and not train.use_ema:
        add(SpecProblem("train.ema", "EMA options are set but train.use_ema is false", "set train.use_ema: true or remove train.ema"))
    if train.max_train_steps is None and train.num_train_epochs is None:
        add(SpecProblem("train.max_train_steps", "the job has no length", "set train.max_train_steps (or train.num_train_epochs)"))
    if train.masked_loss and not any(ds.masks_dir for ds in spec.data.active()):
        add(SpecProblem("train.masked_loss", "no dataset has masks_dir, so there are no masks", "set data.datasets[i].masks_dir or turn masked_loss off"))
    if train.crepa.enabled and train.crepa.encoder == "dinov2_vitg14" and train.crepa.encoder_image_size != 518:
        add(SpecProblem("train.crepa.encoder_image_size", "dinov2_vitg14 expects 518 px inputs", "use 518, or encoder: dinov2_vits14 with 224"))

    for i, ds in enumerate(spec.data.datasets):
        base = f"data.datasets[{i}]"
        vid = ds.video
        low = vid.min_frames if vid.min_frames is not None else vid.num_frames
        high = vid.max_frames if vid.max_frames is not None else vid.num_frames
        if not low <= vid.num_frames <= high:
            add(SpecProblem(f"{base}.video", f"need min_frames <= num_frames <= max_frames, got {vid.min_frames} <= {vid.num_frames} <= {vid.max_frames}",
                            "adjust min_frames / max_frames around num_frames"))
        if vid.frame_interval is not None and vid.bucket_strategy != "resolution_frames":
            add(SpecProblem(f"{base}.video.frame_interval", "only applies to bucket_strategy: resolution_frames", "remove it or switch bucket_strategy"))
        if ds.caption_strategy == "instance_prompt" and not ds.instance_prompt:
            add(SpecProblem(f"{base}.instance_prompt", "caption_strategy 'instance_prompt' needs instance_prompt", "set instance_prompt: '<your caption>'"))
        if ds.missing_captions == "instance_prompt" and not ds.instance_prompt:
            add(SpecProblem(f"{base}.instance_prompt", "missing_captions 'instance_prompt' needs instance_prompt", "set instance_prompt or use missing_captions: skip"))
        if ds.caption_strategy == "captions_file":
            if not ds.captions_file:
                add(SpecProblem(f"{base}.captions_file", "caption_strategy 'captions_file' needs captions_file", "set captions_file: captions.jsonl"))
        if ds.captions_file and not re.search(r"\.(jsonl|csv)$", ds.captions_file, re.I):
            add(SpecProblem(f"{base}.captions_file", f"{ds.captions_file!r} must end in .jsonl or .csv", "use a JSONL or CSV file"))
        if ds.resolution_type == "pixel" and ds.resolution % SPATIAL_MULTIPLE:
            add(SpecProblem(f"{base}.resolution", f"{ds.resolution} is not a multiple of {SPATIAL_MULTIPLE} (VAE 8x x patch 2)",
                            f"use {max(SPATIAL_MULTIPLE, ds.resolution // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE)}"))
        if ds.maximum_image_size is not None and ds.target_downsample_size is None:
            add(SpecProblem(f"{base}.target_downsample_size", "maximum_image_size needs target_downsample_size", "set what oversized clips are downsampled to"))
        if ds.minimum_image_size and ds.maximum_image_size and ds.minimum_image_size > ds.maximum_image_size:
            add(SpecProblem(f"{base}.minimum_image_size", f"{ds.minimum_image_size} is larger than maximum_image_size {ds.maximum_image_size}", "swap them"))
        problems.extend(_check_location(f"{base}.source", ds.source, allow_bare_repo=False))
        if vid.is_i2v and vid.num_frames < 5:
            add(SpecProblem(f"{base}.video.num_frames", "image-to-video needs frames after the conditioning frame", "use num_frames >= 5"))
        if vid.is_i2v and spec.train.scheduled_sampling.probability > 0:
            add(SpecProblem(f"{base}.video.is_i2v", "scheduled sampling rolls out text-to-video steps, without the first-frame condition",
                            "set train.scheduled_sampling.probability: 0 for image-to-video training"))
    caches = [(f"data.datasets[{i}].cache_dir_vae", ds.cache_dir_vae) for i, ds in enumerate(spec.data.datasets) if ds.cache_dir_vae]
    seen: dict[str, str] = {}
    for path, cache_dir in caches:
        if cache_dir in seen:
            add(SpecProblem(path, f"cache_dir_vae {cache_dir!r} is also used by {seen[cache_dir]}", "give each dataset its own latent cache folder"))
        seen.setdefault(cache_dir, path)
    if not spec.data.active():
        add(SpecProblem("data.datasets", "every dataset is disabled", "enable at least one dataset"))

    if not is_4k_plus_1(val.num_video_frames):
        n = nearest_4k_plus_1(val.num_video_frames)
        add(SpecProblem("validation.num_video_frames", f"{val.num_video_frames} is not of the form 4k+1", f"use {n} or {n + 4}"))
    if val.preview.enabled and not spec.webhooks:
        add(SpecProblem("validation.preview.enabled", "previews are sent to webhooks, and none is configured", "add a webhook under `webhooks:` or turn previews off"))
    if val.preview.enabled and not val.enabled:
        add(SpecProblem("validation.preview.enabled", "previews need validation.enabled: true", "enable validation or turn previews off"))
    if val.preview.enabled and val.preview.steps > val.num_inference_steps:
        add(SpecProblem("validation.preview.steps", f"{val.preview.steps} is more than num_inference_steps {val.num_inference_steps}: no preview would be sent",
                        "use a smaller preview.steps"))
    if val.eval_loss.enabled and spec.data.holdout_fraction == 0:
        add(SpecProblem("validation.eval_loss.enabled", "the eval loss needs held-out clips", "set data.holdout_fraction (e.g. 0.05)"))
    if train.use_ema is False and train.ema.validation != "none":
        add(SpecProblem("train.ema.validation", "EMA validation needs train.use_ema: true", "set use_ema: true or ema.validation: none"))

    for field, value in (("model.pretrained_model_name_or_path", model.pretrained_model_name_or_path),
                         ("model.pretrained_vae_model_name_or_path", model.pretrained_vae_model_name_or_path),
                         ("train.crepa.encoder_path", train.crepa.encoder_path)):
        if value:
            problems.extend(_check_location(field, value, allow_bare_repo=True))
    if spec.output.push_to:
        push = spec.output.push_to
        if not push.startswith(("hf://", "s3://")):
            add(SpecProblem("output.push_to", f"{push!r} is not a remote store", "use hf://owner/repo or s3://bucket/prefix, or remove push_to to keep results local"))
        elif push.startswith("hf://datasets/"):
            add(SpecProblem("output.push_to", "models are published to a model repo, not a dataset repo", "use hf://owner/repo"))
        else:
            problems.extend(_check_location("output.push_to", push, allow_bare_repo=False))
    endpoint = spec.storage.s3.endpoint_url
    if endpoint is not None:
        from job.storage.base import S3Options  # the one place that says what an endpoint may look like

        try:
            S3Options(endpoint_url=endpoint)
        except ValueError as exc:  # its message never repeats credentials
            add(SpecProblem("storage.s3.endpoint_url", str(exc).removeprefix("endpoint_url "),
                            "write http(s)://host[:port]; credentials go in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"))
    resume = spec.checkpoints.resume_from_checkpoint
    if resume not in ("latest", "none"):
        problems.extend(_check_location("checkpoints.resume_from_checkpoint", resume, allow_bare_repo=False))
    if train.num_processes > 1 and mem.group_offload.enabled:
        add(SpecProblem("memory.group_offload.enabled", "group offload is single-process", "use train.num_processes: 1, or turn group offload off"))
    if mem.group_offload.enabled and train.optimizer == "adamw_8bit":
        add(SpecProblem("train.optimizer", "adamw_8bit (bitsandbytes) cannot step parameters in CPU RAM, where group offload keeps them",
                        "use adamw_bf16, optimi-adamw or adamw with group offload"))
    # (int8 with a full fine-tune is already refused above: one problem per cause)
    if mem.group_offload.enabled and model.base_model_precision in ("int8", "fp8") and model.type == "lora":
        add(SpecProblem("memory.group_offload.enabled", f"cannot be combined with base_model_precision: {model.base_model_precision} "
                        "(quantised weights are not offloaded by this build)",
                        "use base_model_precision: bf16 with group offload, or turn group offload off"))
    if mem.group_offload.enabled and train.mixed_precision == "fp8":
        add(SpecProblem("memory.group_offload.enabled", "cannot be combined with train.mixed_precision: fp8 (offloaded blocks "
                        "are not compiled, and float8 products only pay off inside compiled blocks)",
                        "use mixed_precision: bf16 with group offload, or turn group offload off"))
    return problems


def spec_warnings(spec: JobSpec) -> list[SpecProblem]:
    """Things that are valid but probably not what the user meant."""
    warnings: list[SpecProblem] = []
    model, train = spec.model, spec.train
    if model.flow_schedule_shift is not None:
        warnings.append(SpecProblem("model.flow_schedule_shift", "is ignored for sanavideo: the checkpoint's canonical flow schedule is used",
                                    "remove it (train.timesteps.flow_shift sets the training shift)"))
    if model.flow_schedule_auto_shift is not None:
        warnings.append(SpecProblem("model.flow_schedule_auto_shift", "is ignored for sanavideo: the checkpoint's canonical flow schedule is used", "remove it"))
    if train.max_train_steps is not None and train.lr_warmup_steps >= train.max_train_steps:
        warnings.append(SpecProblem("train.lr_warmup_steps", f"{train.lr_warmup_steps} >= max_train_steps {train.max_train_steps}: the learning rate never leaves warmup",
                                    "use a warmup of a few percent of the steps"))
    if model.type == "full" and model.base_model_precision == "bf16" and train.optimizer == "adamw":
        warnings.append(SpecProblem("train.optimizer", "plain AdamW on bf16 weights loses small updates to rounding",
                                    "use adamw_bf16 or optimi-adamw, or base_model_precision: fp32"))
    if spec.memory.group_offload.enabled and not spec.memory.gradient_checkpointing:
        warnings.append(SpecProblem("memory.group_offload.enabled", "without gradient checkpointing the backward pass keeps every block's "
                                    "weight copy on the GPU, so training saves little memory", "set memory.gradient_checkpointing: true"))
    if spec.memory.group_offload.to_disk_path and not spec.memory.group_offload.enabled:
        warnings.append(SpecProblem("memory.group_offload.to_disk_path", "is set but group offload is off", "set memory.group_offload.enabled: true"))
    if train.caption_dropout_probability == 0:
        warnings.append(SpecProblem("train.caption_dropout_probability", "0 means the model never sees the empty prompt; guidance may weaken",
                                    "0.1 is the usual value"))
    # options changed from their defaults while CREPA is off (the starter spec spells out the defaults)
    crepa_options = {name for name in train.crepa.model_fields_set - {"enabled"}
                     if getattr(train.crepa, name) != type(train.crepa).model_fields[name].default}
    if crepa_options and not train.crepa.enabled:
        warnings.append(SpecProblem("train.crepa", f"{', '.join(sorted(crepa_options))} set but CREPA is off", "set train.crepa.enabled: true or remove them"))
    if train.crepa.enabled and train.crepa.weight == 0:
        warnings.append(SpecProblem("train.crepa.weight", "0: CREPA costs a forward hook and cached features but adds nothing to the loss",
                                    "use 0.5 (the usual start), or turn CREPA off"))
    if train.crepa.enabled and train.crepa.adjacent_distance > 0 and train.crepa.temporal_decay == 0:
        warnings.append(SpecProblem("train.crepa.temporal_decay", "0 gives neighbouring frames no weight, so adjacent_distance has no effect",
                                    "use temporal_decay 1.0 for neighbours, or adjacent_distance: 0"))
    if "max_rollout_steps" in train.scheduled_sampling.model_fields_set and train.scheduled_sampling.probability == 0:
        warnings.append(SpecProblem("train.scheduled_sampling.max_rollout_steps", "is set but scheduled sampling is off (probability 0)",
                                    "set train.scheduled_sampling.probability (e.g. 0.1) or remove max_rollout_steps"))
    unused_masks = [ds.id for ds in spec.data.active() if ds.masks_dir]
    if unused_masks and not train.masked_loss:
        warnings.append(SpecProblem("train.masked_loss", f"datasets {', '.join(unused_masks)} have masks_dir, but masked_loss is off: "
                                    "the masks are cached and ignored", "set train.masked_loss: true, or remove masks_dir"))
    return warnings
