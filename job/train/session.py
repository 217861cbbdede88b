"""Everything the loop needs, built from the spec: model, optimizer, schedule, EMA, data, state.

`build_session` does the setup (in the order exact resume needs); `save_checkpoint` and
`resume` move the whole training state to and from a checkpoint folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import job
from job.cache import format as fmt
from job.cache.reader import BucketBatchSampler, CachedDataset, collate_cached, require_samples
from job.errors import InputError
from job.models.sanavideo.objective import FlowMatchingObjective

from . import checkpoints as ckpt
from .collectives import all_reduce
from .crepa import CrepaRegularizer, build_crepa, check_resume_without_crepa
from .ema import Ema
from .metrics import MetricsLog, available_trackers, restore_history, save_history
from .model import load_transformer, load_weights, prepare_transformer, save_weights, weight_dtype
from .offload import group_offload_of, offload_for_training, step_in_background
from .optimizers import build_optimizer, check_optimizer_available
from .schedulers import build_scheduler

log = logging.getLogger("trainer.train")


def training_hash(spec) -> str:
    """Hash of what decides the trained weights (model, train, data), for resume and 'already complete'."""
    data = spec.model_dump(mode="json", include={"model", "train", "data"})
    data["train"].pop("max_train_hours", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def total_steps_for(train_spec, batches_per_epoch: int) -> int:
    accum = train_spec.gradient_accumulation_steps
    by_epochs = None if train_spec.num_train_epochs is None else math.ceil(train_spec.num_train_epochs * batches_per_epoch / accum)
    if train_spec.max_train_steps is None:
        return max(1, by_epochs or 1)
    if by_epochs is None or train_spec.ignore_final_epochs:
        return train_spec.max_train_steps
    return max(1, min(train_spec.max_train_steps, by_epochs))


@dataclass
class TrainSession:
    spec: Any
    ws: Any
    accelerator: Any
    transformer: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    model: torch.nn.Module  # the plain transformer
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    ema: Ema | None
    objective: FlowMatchingObjective
    dataset: CachedDataset
    sampler: BucketBatchSampler
    loader: DataLoader
    generator: torch.Generator
    empty_prompt: tuple[torch.Tensor, torch.Tensor] | None
    store: ckpt.CheckpointStore
    metrics: MetricsLog
    total_steps: int
    weight_dtype: torch.dtype
    spec_hash: str
    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of `epoch` consumed
    bad_in_row: int = 0
    bad_total: int = 0
    samples_seen: int = 0
    last_loss: float = float("nan")
    resumed_from: Path | None = None
    started: float = field(default_factory=time.monotonic)
    last_save: float = field(default_factory=time.monotonic)
    last_checkpoint: Path | None = None
    crepa: CrepaRegularizer | None = None  # the CREPA projector and hook (train.crepa.enabled)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def batches(self):
        """An endless stream of batches across epochs, counting what was consumed (for resume).

        The count is kept here, not read from the sampler: with DataLoader workers the sampler
        runs ahead of training."""
        while True:
            self.sampler.set_epoch(self.epoch)
            self.sampler.position = self.position
            for batch in self.loader:
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    # --- checkpoints --------------------------------------------------------------------------
    def finish_optimizer_step(self) -> None:
        """Wait for an optimizer step still updating offloaded weights in the background (group offload)."""
        offload = group_offload_of(self.model)
        if offload is not None:
            offload.finish_optimizer_step()

    def save_checkpoint(self) -> Path:
        acc, step = self.accelerator, self.step
        self.finish_optimizer_step()
        tmp = self.store.tmp_dir(step)
        what = f"checkpoint step {step}"
        self._all_or_none(lambda: self.store.begin(step) if acc.is_main_process else None, what)
        self._all_or_none(lambda: self._write_checkpoint_files(tmp, step), what)
        path = self.store.root / ckpt.step_dir_name(step)

        def commit() -> None:
            nonlocal path
            if acc.is_main_process:
                path = self.store.commit(tmp, step)
                self.store.rotate()
                self.metrics.note("checkpoint_saved", step=step, path=str(path))
                log.info("checkpoint written: %s", path)

        self._all_or_none(commit, what)
        self.last_save = time.monotonic()
        self.last_checkpoint = path
        return path

    def _write_checkpoint_files(self, tmp: Path, step: int) -> None:
        if self.accelerator.is_main_process:
            save_weights(tmp, self.model, self.spec)
            ckpt.save_pt(self.optimizer.state_dict(), tmp / "optimizer.pt")
            ckpt.save_pt(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.crepa is not None:
                self.crepa.save(tmp)
            if self.ema is not None:
                ckpt.save_pt(self.ema.state_dict(), tmp / "ema.pt")
            state = dict(step=step, epoch=self.epoch, position=self.position, bad_in_row=self.bad_in_row,
                         bad_total=self.bad_total, samples_seen=self.samples_seen, last_loss=self.last_loss,
                         total_steps=self.total_steps, world_size=self.world, spec_hash=self.spec_hash,
                         model_type=self.spec.model.type, trainer_version=job.__version__, time=round(time.time(), 3),
                         sampler={**self.sampler.state_dict(batches_consumed=self.position), "epoch": self.epoch})
            (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
            save_history(self.metrics.path, tmp)
        ckpt.save_pt(ckpt.capture_rng(self.generator), tmp / f"rng_{self.rank}.pt")

    def _all_or_none(self, write, what: str) -> None:
        """Run this process's part of a checkpoint write, then agree with every process on the outcome (a
        collective, so it is also the barrier between the parts): when a write fails anywhere (a full disk, a
        permission), every process raises, instead of the others waiting at the next barrier for one that
        has left. The others raise an OSError with the failing one's errno (the CLI's disk-full message)."""
        error = None
        try:
            write()
        except OSError as exc:
            error = exc
        acc = self.accelerator
        if acc.num_processes > 1:
            code = torch.tensor([float((error.errno or errno.EIO) if error is not None else 0)], device=acc.device)
            code = int(all_reduce(code, "max").item())
            if code and error is None:
                raise OSError(code, f"another process could not write {what}: {os.strerror(code)}")
        if error is not None:
            raise error

    def resume(self, folder: Path) -> None:
        state = ckpt.read_state(folder)
        if state.get("model_type") != self.spec.model.type:
            raise InputError(f"checkpoint {folder} is from a {state.get('model_type')} run, this spec trains {self.spec.model.type}",
                             "resume from a matching checkpoint, or set checkpoints.resume_from_checkpoint: none")
        if state.get("spec_hash") != self.spec_hash:
            log.warning("the spec changed since checkpoint %s (model/train/data settings differ); resuming anyway", folder.name)
        if state.get("world_size") != self.world:
            log.warning("checkpoint %s was written by %s processes, this run has %s: the data order and noise will not "
                        "continue exactly", folder.name, state.get("world_size"), self.world)
        if self.crepa is not None:  # before the optimizer: its state holds the projector's parameters
            self.crepa.restore(folder)
        else:
            check_resume_without_crepa(folder)
        self.optimizer.load_state_dict(ckpt.load_pt(folder / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_pt(folder / "scheduler.pt"))
        if self.ema is not None:
            if (folder / "ema.pt").is_file():
                self.ema.load_state_dict(ckpt.load_pt(folder / "ema.pt"))
            else:
                log.warning("checkpoint %s has no EMA state; the EMA restarts from the current weights", folder.name)
        rng_file = folder / f"rng_{self.rank}.pt"
        if rng_file.is_file():
            ckpt.restore_rng(ckpt.load_pt(rng_file), self.generator)
        for key in ("step", "epoch", "position", "bad_in_row", "bad_total", "samples_seen"):
            setattr(self, key, int(state.get(key, 0)))
        try:
            self.sampler.load_state_dict(state["sampler"])  # checks that the cached data is the same
        except (KeyError, ValueError) as exc:
            log.warning("the cached data changed since checkpoint %s (%s): epoch %d restarts with a fresh order",
                        folder.name, exc, self.epoch)
            self.position = 0
        self.last_loss = float(state.get("last_loss", float("nan")))
        self.resumed_from = folder
        self.last_checkpoint = folder
        log.info("resumed from %s at step %d", folder, self.step)


def _accelerator(spec, ws):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    if AcceleratorState._shared_state and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(True)  # a previous in-process run (tests, `trainer run` phases)
    trackers = available_trackers(spec.tracking.trackers())
    accelerator = Accelerator(
        # without CUDA, say so: accelerate then runs several processes as MULTI_CPU over gloo
        cpu=not torch.cuda.is_available(),
        # fp8: bf16 autocast here; the float8 products are torchao's (`quantize.enable_fp8_matmuls`), not accelerate's
        mixed_precision="bf16" if spec.train.mixed_precision == "fp8" else spec.train.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(ws.output_dir), logging_dir=str(ws.logs_dir / "trackers")),
        step_scheduler_with_optimizer=False,
    )
    if spec.train.num_processes != accelerator.num_processes:
        log.warning("train.num_processes is %d but %d process(es) are running", spec.train.num_processes, accelerator.num_processes)
    return accelerator, trackers


def _load_empty_prompt(spec, ws, dataset: CachedDataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    if spec.train.caption_dropout_probability <= 0:
        return None
    key = fmt.text_key_context(spec, ws).empty_key()
    if not fmt.has_text_embedding(ws.text_cache_dir, key):
        raise InputError(
            f"caption dropout needs the cached empty-prompt embedding ({fmt.text_path(ws.text_cache_dir, key).name}), which is missing",
            "run the cache phase again (it writes it), or set train.caption_dropout_probability: 0",
        )
    embeds, mask = fmt.read_text_embedding(ws.text_cache_dir, key)
    sample = dataset[0]["prompt_embeds"]
    if embeds.shape != sample.shape:
        raise InputError(f"the cached empty-prompt embedding is {tuple(embeds.shape)} but the captions' are {tuple(sample.shape)}",
                         "run the cache phase again with this spec (model.prompt.max_sequence_length decides both)")
    return embeds, mask


def build_session(spec, ws) -> TrainSession:
    from accelerate.utils import set_seed

    t = spec.train
    check_optimizer_available(t.optimizer)
    dtype = weight_dtype(spec)
    accelerator, trackers = _accelerator(spec, ws)

    dataset = CachedDataset(ws, spec, split="train")
    sampler = BucketBatchSampler(dataset.buckets, t.train_batch_size, seed=t.seed,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes)
    require_samples(dataset, sampler, needed_batches=t.gradient_accumulation_steps)
    total_steps = total_steps_for(t, len(sampler))
    empty_prompt = _load_empty_prompt(spec, ws, dataset)

    store = ckpt.CheckpointStore(ws.checkpoints_dir, spec.checkpoints.total_limit)
    resume_from = store.resolve(spec.checkpoints.resume_from_checkpoint, ws.resolve)
    if spec.checkpoints.resume_from_checkpoint == "none" and store.complete():
        raise InputError(f"checkpoints of an earlier run are in {store.root}, and resume_from_checkpoint is 'none': the runs would mix",
                         "use resume_from_checkpoint: latest to continue it, or move that folder away to start fresh")
    resume_step = 0 if resume_from is None else ckpt.checkpoint_step(resume_from) or 0
    if resume_step > total_steps:
        raise InputError(f"checkpoint {resume_from} is at step {resume_step}, past this spec's {total_steps} training steps",
                         "raise train.max_train_steps (or num_train_epochs) to continue it, or name an earlier checkpoint "
                         "in checkpoints.resume_from_checkpoint")
    if accelerator.is_main_process:
        for moved in store.set_aside_after(resume_step):
            log.warning("checkpoint %s is past the step this run starts from (%d), so it belongs to another history: moved "
                        "to %s, so that rotation and later resumes keep to this run's checkpoints", moved.name, resume_step, moved)

    set_seed(t.seed)
    transformer = load_transformer(spec, ws)
    params = prepare_transformer(transformer, spec)
    if resume_from is not None:
        load_weights(resume_from, transformer, spec)
    offload = offload_for_training(transformer, spec, accelerator.device, ws.resolve)
    offloaded = offload is not None
    crepa = build_crepa(spec, transformer, dataset, accelerator.device)
    optimizer = build_optimizer(params + (crepa.parameters() if crepa else []), t, seed=t.seed)
    if offloaded:  # the CPU step overlaps the next forward pass
        optimizer = step_in_background(optimizer, offload)
    scheduler = build_scheduler(optimizer, t, total_steps)
    # group offload placed the weights itself (blocks in CPU RAM): accelerate must not move them
    prepared, optimizer = accelerator.prepare(transformer, optimizer, device_placement=[not offloaded] * 2)
    if crepa is not None:
        crepa.forward_projector = accelerator.prepare(crepa.projector)
    ema = Ema(params, t.ema, accelerator.device, before_read=offload.finish_optimizer_step if offloaded else None) if t.use_ema else None
    generator = torch.Generator("cpu").manual_seed(t.seed)

    cuda = accelerator.device.type == "cuda"
    # its own generator: iter(loader) draws a worker seed, which must not consume the global RNG
    # (dropout draws from that one, and exact resume restores it)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_cached, num_workers=2 if cuda else 0,
                        pin_memory=cuda, generator=torch.Generator().manual_seed(t.seed))
    session = TrainSession(
        spec=spec, ws=ws, accelerator=accelerator, transformer=prepared, model=accelerator.unwrap_model(prepared),
        params=params, optimizer=optimizer, scheduler=scheduler, ema=ema, objective=FlowMatchingObjective(t.timesteps),
        dataset=dataset, sampler=sampler, loader=loader, generator=generator, empty_prompt=empty_prompt, store=store,
        metrics=None, total_steps=total_steps, weight_dtype=dtype, spec_hash=training_hash(spec), crepa=crepa,
    )
    if resume_from is not None:
        session.resume(resume_from)
    session.metrics = MetricsLog(ws, spec, accelerator, total_steps, session.step, trackers)
    if resume_from is not None and accelerator.is_main_process:
        restore_history(session.metrics.path, resume_from, session.step)
    return session
