"""One optimizer step: micro-batches, loss, backward, clipping, the NaN/inf guard, the update."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from job.errors import EXIT_BAD_INPUT, TrainerError

from job.models.sanavideo.speed import trim_text_padding

from .collectives import all_reduce
from .guard import guarded_step
from .offload import background_optimizer
from .rollout import rollout_inputs

log = logging.getLogger("trainer.train")


class TrainingDiverged(TrainerError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""

    exit_code = EXIT_BAD_INPUT


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    samples: int  # clips in this optimizer step, all processes
    tokens: int  # transformer tokens in this optimizer step, all processes
    skipped: bool = False
    extras: dict[str, float] = field(default_factory=dict)  # optional parts' metrics (crepa_loss, ...), this process


def caption_dropout(s, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and mask, with some samples replaced by the cached empty prompt, and with the
    padding after the longest prompt cut (`speed.trim_text_padding`)."""
    embeds, mask = batch["prompt_embeds"], batch["prompt_attention_mask"]
    b = embeds.shape[0]
    drop = (torch.rand(b * s.world, generator=s.generator) < s.spec.train.caption_dropout_probability)[s.rank * b:(s.rank + 1) * b]
    if s.empty_prompt is not None and bool(drop.any()):
        empty_embeds, empty_mask = s.empty_prompt
        embeds = torch.where(drop[:, None, None], empty_embeds.to(embeds.dtype)[None], embeds)
        mask = torch.where(drop[:, None], empty_mask.to(mask.dtype)[None], mask)
    if s.spec.speed.trim_text_padding:
        embeds, mask = trim_text_padding(embeds, mask)
    return embeds.to(device, s.weight_dtype), mask.to(device)


def compute_loss(s, batch: dict) -> torch.Tensor:
    """Flow-matching loss of one micro-batch, with the optional parts the spec turns on: scheduled
    sampling (`rollout`: x_t from the model's own steps), the loss mask, CREPA (`crepa`)."""
    device = s.accelerator.device
    x0 = batch["latents"].to(device, torch.float32)
    embeds, text_mask = caption_dropout(s, batch, device)
    inputs = s.objective.training_inputs(x0, s.generator, world_size=s.world, rank=s.rank)
    if s.spec.train.scheduled_sampling.probability > 0:
        inputs = rollout_inputs(s, x0, inputs, embeds, text_mask)
    if batch.get("first_frame_latents") is not None:  # i2v samples: frame 0 is the clean condition
        inputs = s.objective.condition_on_first_frame(inputs, batch["first_frame_latents"].to(device), batch["i2v"],
                                                      s.model.config.patch_size)
    crepa = getattr(s, "crepa", None)
    with crepa.capture() if crepa is not None else contextlib.nullcontext():
        pred = s.transformer(
            inputs.noisy.to(s.weight_dtype), encoder_hidden_states=embeds, encoder_attention_mask=text_mask,
            timestep=inputs.timesteps, return_dict=False,
        )[0]
    loss_mask = batch["mask"].to(device) if s.spec.train.masked_loss and batch["mask"] is not None else None
    if inputs.loss_mask is not None:
        loss_mask = inputs.loss_mask if loss_mask is None else loss_mask * inputs.loss_mask
    loss = s.objective.loss(pred, inputs.target, inputs.sigmas, loss_mask)
    if crepa is not None:
        loss = loss + crepa.loss(batch.get("crepa_features"), x0.shape)
    return loss


def clip_gradients(s) -> torch.Tensor | float:
    """Clip by `max_grad_norm` (norm or value; 0 = off). Returns the global norm before clipping, as a
    device tensor where there is one (read on the host only after the optimizer step is queued)."""
    t, acc = s.spec.train, s.accelerator
    params = s.params + (s.crepa.parameters() if getattr(s, "crepa", None) is not None else [])
    background = background_optimizer(s.optimizer)
    if background is not None:  # group offload: the norm is known without a CPU pass, the clip is applied in the step
        return background.clip_gradients(params, t.max_grad_norm, t.grad_clip_method)
    if t.max_grad_norm > 0 and t.grad_clip_method == "norm":
        return acc.clip_grad_norm_(params, t.max_grad_norm)
    grads = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, float("inf")) if grads else 0.0  # measures, scales by 1
    if t.max_grad_norm > 0:
        acc.clip_grad_value_(params, t.max_grad_norm)
    return norm


def tokens_per_sample(s, latents: torch.Tensor) -> int:
    pt, ph, pw = s.model.config.patch_size
    _, _, f, h, w = latents.shape
    return (f // pt) * (h // ph) * (w // pw)


def train_step(s, batches) -> StepOutcome:
    t, acc = s.spec.train, s.accelerator
    accum = t.gradient_accumulation_steps
    losses, samples, tokens, crepa_values = [], 0, 0, []
    for micro in range(accum):
        batch = next(batches)
        last = micro == accum - 1
        with contextlib.nullcontext() if last else acc.no_sync(s.transformer):
            loss = compute_loss(s, batch)
            acc.backward(loss / accum)
        losses.append(loss.detach().float())
        if getattr(s, "crepa", None) is not None:
            crepa_values.append((s.crepa.last_loss, s.crepa.last_similarity))
        samples += batch["latents"].shape[0] * s.world
        tokens += tokens_per_sample(s, batch["latents"]) * batch["latents"].shape[0] * s.world
    loss = all_reduce(torch.stack(losses).mean(), "mean")
    loss_value, grad_norm, skipped = guarded_step(s.optimizer, loss, clip_gradients(s), s.spec.speed.guard_on_device)
    if skipped:  # the optimizer left everything as it was
        s.optimizer.zero_grad(set_to_none=True)
        s.bad_in_row += 1
        s.bad_total += 1
        log.warning("step %d skipped: loss %s, gradient norm %s (%d bad in a row, at most %d)",
                    s.step + 1, loss_value, grad_norm, s.bad_in_row, t.max_bad_steps)
        if s.bad_in_row >= t.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {s.bad_in_row} optimizer steps in a row had a NaN/inf loss or gradient "
                f"(steps {s.step + 1}..; train.max_bad_steps is {t.max_bad_steps})",
                "lower train.learning_rate, keep train.max_grad_norm > 0, re-run the cache phase if the latents may be "
                "broken, or resume from an earlier checkpoint",
            )
        return StepOutcome(loss_value, grad_norm, samples, tokens, skipped=True)
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    s.bad_in_row = 0
    s.samples_seen += samples
    s.last_loss = loss_value
    if s.ema is not None:
        s.ema.maybe_update(s.step)
    extras = {}
    if crepa_values:  # one host read for all micro-batches, after the update is queued
        crepa_loss, crepa_similarity = torch.stack([torch.stack(v) for v in crepa_values]).float().mean(0).tolist()
        extras = {"crepa_loss": crepa_loss, "crepa_similarity": crepa_similarity}
    return StepOutcome(loss_value, grad_norm, samples, tokens, extras=extras)
