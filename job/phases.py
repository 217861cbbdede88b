"""The phases of a job, each one entry function `(loaded, ws) -> None`, in the order `trainer run` uses.

Every phase may be re-run: it skips what an earlier run finished and says so.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from job.errors import TrainerError
from job.report import console, event
from job.spec import LoadedSpec
from job.workspace import Workspace, atomic_write_text, is_remote

log = logging.getLogger("trainer.phases")

# Files of a diffusers folder the job needs; weights in other formats (.bin duplicates, ONNX,
# fp16 variants) are not downloaded.
MODEL_FILES = ["model_index.json", "*/config.json", "*.safetensors", "*.safetensors.index.json", "*/*.json",
               "tokenizer/*", "scheduler/*"]


def _s3_options(spec):
    from job.storage import S3Options

    s3 = spec.storage.s3
    return S3Options(endpoint_url=s3.endpoint_url, region=s3.region, addressing_style=s3.addressing_style)


def _hub_uri(location: str) -> str:
    return location if is_remote(location) else f"hf://{location}"


def _pull_one(spec, uri: str, dest: Path, include: list[str] | None) -> int:
    """Download `uri` into `dest`; files already there with the right size/hash are skipped."""
    from job.models.sanavideo.loading import PULL_MARKER  # the loader tells a pulled copy from a local path by it
    from job.storage import open_storage

    with open_storage(uri, _s3_options(spec)) as store:
        files = store.download_folder("", dest, include=include)
    atomic_write_text(dest / PULL_MARKER, json.dumps({"source": uri, "files": len(files), "time": time.time()}))
    return len(files)


# What a local model folder must hold, for the fix text of `_check_local_model`.
_LOCAL_LAYOUT = {
    "base model": "a diffusers folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/, with their "
                  "*.safetensors weights",
    "VAE": "the Wan VAE: config.json and its weights, or a model folder with vae/",
    "CREPA encoder": "a DINOv2 folder saved with transformers' save_pretrained: config.json and model.safetensors",
}


def _check_local_model(spec, field: str, label: str, folder: Path) -> None:
    """A local model path the pull phase uses in place: InputError (exit 2) now, naming the spec field,
    when it is missing, empty or lacks the model's files — not later in the cache phase. The checks
    are the loader's own (`check_model_folder`, `locate_vae`), with the weight files required too."""
    from job.errors import InputError

    try:
        if label == "base model":
            from job.models.sanavideo.loading import check_model_folder

            check_model_folder(folder, separate_vae=bool(spec.model.pretrained_vae_model_name_or_path), weights=True)
        elif label == "VAE":
            from job.models.sanavideo.loading import locate_vae

            locate_vae(folder, weights=True)
        else:
            from job.train.crepa import check_encoder_folder

            check_encoder_folder(folder)
    except InputError as exc:
        raise InputError(
            f"{field}: {exc.message}",
            f"correct the path (a local path is used as it is, the pull phase downloads nothing for it; it must hold "
            f"{_LOCAL_LAYOUT[label]}), or use an hf://owner/repo id so the pull phase downloads it",
        ) from None


def pull(loaded: LoadedSpec, ws: Workspace) -> None:
    """Weights and datasets into the workspace. Local paths are used in place, after a check that
    they hold what the job needs (a mistyped path fails here, with exit 2)."""
    from job.data.plan import dataset_folder
    from job.train.crepa import ENCODER_FILES as CREPA_ENCODER_FILES, encoder_location as crepa_encoder_location

    spec = loaded.spec
    wanted: list[tuple[str, str, Path, list[str] | None]] = []
    for field, label, location in (
            ("model.pretrained_model_name_or_path", "base model", spec.model.pretrained_model_name_or_path),
            ("model.pretrained_vae_model_name_or_path", "VAE", spec.model.pretrained_vae_model_name_or_path),
            ("train.crepa.encoder_path", "CREPA encoder", crepa_encoder_location(spec.train.crepa) if spec.train.crepa.enabled else None)):
        if not location:
            continue
        local = ws.model_dir(location)
        # ws.model_dir maps remote locations (and bare Hub ids with no such local folder) to a pull folder.
        if local != ws.resolve(location.removeprefix("file://")):
            wanted.append((label, _hub_uri(location), local, MODEL_FILES if label != "CREPA encoder" else CREPA_ENCODER_FILES))
        else:
            _check_local_model(spec, field, label, local)
    for ds in spec.data.active():
        if is_remote(ds.source):
            wanted.append((f"dataset {ds.id}", ds.source, ws.dataset_dir(ds), None))
        else:
            dataset_folder(spec, ws, ds)  # a local folder that is not there: InputError naming the source field
    if not wanted:
        console.print("pull: nothing to download (every model and dataset is a local path)")
        return
    seen: set[tuple[str, Path]] = set()
    for label, uri, dest, include in wanted:
        if (uri, dest) in seen:
            continue
        seen.add((uri, dest))
        started = time.monotonic()
        count = _pull_one(spec, uri, dest, include)
        event("pulled", what=label, source=uri, files=count, seconds=round(time.monotonic() - started, 2))
        console.print(f"pull: {label}: {count} files in {dest}")


def preflight(loaded: LoadedSpec, ws: Workspace, json_output: bool = False, check_remotes: bool = True) -> None:
    from job.preflight import preflight_phase

    preflight_phase(loaded, ws, json_output=json_output, check_remotes=check_remotes)


def cache(loaded: LoadedSpec, ws: Workspace, prune: bool = False) -> None:
    from job.cache.phase import run_cache

    result = run_cache(loaded.spec, ws, prune=prune)
    if result.failed:
        log.warning("%d items could not be cached; see %s", result.failed, ws.state_dir / "cache.json")


def _validation_hook(spec, ws: Workspace, webhooks) -> Callable:
    """Render validation videos on the main process at `validation.step_interval` and at the end."""
    from job.cache import format as fmt
    from job.validate.render import i2v_condition_image, run_validation, trains_i2v, validation_due

    if spec.validation.enabled and spec.validation.image and trains_i2v(spec):
        i2v_condition_image(spec, ws, None)  # a bad validation.image stops the job now, not at the first render
    state: dict = {}

    def embeddings_for(text: str, negative: bool = False):
        keys = state.setdefault("keys", fmt.text_key_context(spec, ws))
        key = keys.negative_key(text) if negative else keys.key(text)
        if not fmt.has_text_embedding(ws.text_cache_dir, key):
            raise TrainerError(f"the validation prompt {text[:60]!r} has no cached embedding",
                               "run `trainer cache SPEC` again (it embeds validation prompts)")
        return fmt.read_text_embedding(ws.text_cache_dir, key)

    def parts():
        if "parts" not in state:
            from diffusers import DPMSolverMultistepScheduler

            from job.models.sanavideo.loading import drop_vae_encoder, load_components
            from job.validate.render import trains_i2v

            model_dir = ws.model_dir(spec.model.pretrained_model_name_or_path)
            vae = spec.model.pretrained_vae_model_name_or_path
            loaded = load_components(model_dir, vae_path=ws.model_dir(vae) if vae else None, parts={"vae"})
            loaded.scheduler = DPMSolverMultistepScheduler.from_pretrained(model_dir, subfolder="scheduler")
            if spec.memory.drop_vae_encoder:
                if trains_i2v(spec):  # the image-to-video pipeline encodes its condition image
                    log.info("memory.drop_vae_encoder: keeping the VAE encoder, image-to-video validation needs it")
                else:
                    freed = drop_vae_encoder(loaded.vae)
                    log.info("memory.drop_vae_encoder: VAE encoder freed (%.1fM parameters)", freed / 1e6)
            state["parts"] = loaded
        return state["parts"]

    def on_step_end(info) -> None:
        if not info.is_main_process or not validation_due(spec, info.step, info.total_steps):
            return
        components = parts()
        components.transformer = info.session.model
        device = next(info.session.model.parameters()).device
        components.vae.to(device)
        run_validation(spec, ws, components, info.step, embeddings_for, ema=info.session.ema, webhooks=webhooks)

    return on_step_end


def _eval_loss_hook(spec, ws: Workspace) -> Callable:
    from job.cache.reader import CachedDataset
    from job.validate.eval_loss import EvalLoss

    holdout = CachedDataset(ws, spec, split="holdout")
    items = [holdout[i] for i in range(min(len(holdout), spec.validation.eval_loss.max_samples))]
    evaluator = EvalLoss(spec, items)

    def on_step_end(info) -> None:
        if items and evaluator.due(info.step):
            result = evaluator.evaluator(info.session.model)
            metrics = result.metrics()
            event("eval_loss", step=info.step, **metrics)
            if info.is_main_process:
                console.print(f"eval loss at step {info.step}: {result.overall:.5f}")

    return on_step_end


def train(loaded: LoadedSpec, ws: Workspace, webhooks=None) -> None:
    """`webhooks`: the job's `job.report.webhooks.Webhooks` (the CLI owns and closes it)."""
    from job.train import TrainHooks, run_train, train_lock

    spec = loaded.spec
    hooks = TrainHooks()
    if spec.validation.enabled:
        hooks.on_step_end.append(_validation_hook(spec, ws, webhooks))
    if spec.validation.eval_loss.enabled:
        hooks.on_step_end.append(_eval_loss_hook(spec, ws))
    if webhooks is not None:
        hooks.on_checkpoint.append(lambda path, step: webhooks.send("checkpoint_saved", {"step": step, "path": str(path)}))
    from job.upload import TrainUploads

    with train_lock(ws):  # before the remote resume, which writes into the checkpoints folder too
        uploads = TrainUploads.start(spec, ws, hooks)  # remote resume, then checkpoints uploaded in the background
        try:
            result = run_train(spec, ws, hooks, lock=False)
        except BaseException:
            uploads.abandon()
            raise
        uploads.finish(result)
    console.print(f"train: {result.status} at step {result.step}/{result.total_steps}" + (f" — {result.message}" if result.message else ""))
    if result.resumable:
        # Stopped by a signal or the wall-clock budget: the next start resumes. Nothing after train runs.
        raise StoppedEarly(result.message or "stopped early; the next run resumes from the latest checkpoint")


class StoppedEarly(Exception):
    """Training stopped at a checkpoint on request (signal, time budget): exit 0, skip later phases."""


def upload(loaded: LoadedSpec, ws: Workspace) -> None:
    """Push what is missing in `output.push_to`: checkpoint, validation, logs, spec, final model, model card."""
    from job.upload import upload_phase

    upload_phase(loaded, ws)


PHASES: dict[str, Callable[[LoadedSpec, Workspace], None]] = {
    "preflight": preflight,
    "pull": pull,
    "cache": cache,
    "train": train,
    "upload": upload,
}
