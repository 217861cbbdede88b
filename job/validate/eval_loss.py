"""A stable evaluation loss: fixed noise and fixed sigmas on held-out cached clips.

The training loss is noisy (random sigma, random noise per step); this one is not. For every
held-out item i and every sigma s in `validation.eval_loss.timesteps`:

    noise_i  = randn(latents_i.shape, generator=Generator("cpu").manual_seed(NOISE_SEED + i))
    x_t      = (1 - s) * x0_i + s * noise_i                      (job.models.sanavideo.objective)
    target   = noise_i - x0_i
    loss_i,s = mean((transformer(x_t, t = s * 1000, text_i) - target) ** 2)    (float32, unweighted)

Reported: the mean over items per sigma, and the mean over sigmas ("overall"). The same
weights give the same numbers on every call, so a curve of it shows real progress.

Evaluation runs under `torch.no_grad()`, with the transformer in eval mode (restored after),
never draws from the global RNG, and never touches the optimizer. Each process computes the
whole loss on its own (`split` items across ranks yourself if that ever matters: with
`max_samples` 16 it is cheap).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from job.models.sanavideo.objective import FlowMatchingObjective

NOISE_SEED = 20240  # + item index: fixed for the life of a run (and across runs)


@dataclass
class EvalLossResult:
    overall: float
    per_sigma: dict[float, float]
    samples: int
    per_item: list[float] = field(default_factory=list)  # mean over sigmas, per item

    def metrics(self, prefix: str = "eval_loss") -> dict[str, float]:
        """Flat names for trackers: `eval_loss` and `eval_loss/sigma_0.30`, ..."""
        out = {prefix: self.overall}
        out.update({f"{prefix}/sigma_{s:.2f}": v for s, v in self.per_sigma.items()})
        return out


def _eval_spec(spec):
    """Accept a JobSpec, a ValidationSpec or an EvalLossSpec."""
    spec = getattr(spec, "validation", spec)
    return getattr(spec, "eval_loss", spec)


def _item(item: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(latents, prompt_embeds, prompt mask, i2v first-frame latents or None), each batched [1, ...]."""
    if isinstance(item, Mapping):
        latents, embeds, mask = item["latents"], item["prompt_embeds"], item["prompt_attention_mask"]
        first = item.get("first_frame_latents")
    else:
        latents, embeds, mask = item[:3]
        first = item[3] if len(item) > 3 else None
    if latents.ndim == 4:
        latents = latents[None]
    if embeds.ndim == 2:
        embeds = embeds[None]
    if mask.ndim == 1:
        mask = mask[None]
    if first is not None and first.ndim == 4:
        first = first[None]
    return latents, embeds, mask, first


def _execution_device(module: torch.nn.Module) -> torch.device:
    try:  # group offloading keeps weights on the CPU and computes on the onload device
        from diffusers.hooks.group_offloading import _get_group_onload_device

        return _get_group_onload_device(module)
    except Exception:  # noqa: BLE001
        pass
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class EvalLoss:
    """`EvalLoss(spec, holdout_items)(transformer) -> EvalLossResult`.

    `holdout_items`: (latents [C, F, H, W] normalised, prompt_embeds [L, D], mask [L]) tuples
    (batched [1, ...] also works) or dicts with those cache names; at most
    `eval_loss.max_samples` are used (the first ones: keep the order stable).
    """

    def __init__(self, spec, holdout_items: Sequence[Any]):
        self.spec = _eval_spec(spec)
        self.sigmas = [float(s) for s in self.spec.timesteps]
        self.items = [_item(x) for x in list(holdout_items)[: self.spec.max_samples]]
        self.objective = FlowMatchingObjective(None)  # make_inputs only: no sampling, no weighting

    def __len__(self) -> int:
        return len(self.items)

    def due(self, step: int) -> bool:
        return bool(self.spec.enabled and self.items and step > 0 and step % self.spec.step_interval == 0)

    def noise(self, index: int, like: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(NOISE_SEED + index)
        return torch.randn(like.shape, generator=generator, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, transformer, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> EvalLossResult:
        if not self.items:
            raise ValueError("no held-out samples: set data.holdout_fraction > 0 and re-run the cache phase")
        from job.models.sanavideo.validation import _unwrap

        model = _unwrap(transformer)
        device = torch.device(device) if device is not None else _execution_device(model)
        dtype = dtype or model.dtype
        was_training = model.training
        model.eval()
        sums = {s: 0.0 for s in self.sigmas}
        per_item: list[float] = []
        try:
            for index, (latents, embeds, mask, first) in enumerate(self.items):
                x0 = latents.to(device, torch.float32)
                noise = self.noise(index, x0).to(device)
                embeds_d, mask_d = embeds.to(device, dtype), mask.to(device)
                item_losses = []
                for sigma in self.sigmas:
                    sig = torch.full((x0.shape[0],), sigma, dtype=torch.float32)
                    inputs = self.objective.make_inputs(x0, sig, noise)
                    if first is not None:  # i2v: as in training, frame 0 is the clean condition and not scored
                        inputs = self.objective.condition_on_first_frame(
                            inputs, first.to(device), torch.ones(x0.shape[0], dtype=torch.bool), model.config.patch_size)
                    pred = model(inputs.noisy.to(dtype), encoder_hidden_states=embeds_d, encoder_attention_mask=mask_d,
                                 timestep=inputs.timesteps.to(device), return_dict=False)[0]
                    if pred.shape[1] == 2 * inputs.target.shape[1]:  # learned-sigma head
                        pred = pred.chunk(2, dim=1)[0]
                    err = (pred.float() - inputs.target) ** 2
                    if inputs.loss_mask is None:
                        loss = float(err.mean())
                    else:
                        weight = inputs.loss_mask.expand_as(err)
                        loss = float((err * weight).sum() / weight.sum())
                    sums[sigma] += loss
                    item_losses.append(loss)
                per_item.append(sum(item_losses) / len(item_losses))
        finally:
            model.train(was_training)
        n = len(self.items)
        per_sigma = {s: sums[s] / n for s in self.sigmas}
        return EvalLossResult(overall=sum(per_sigma.values()) / len(per_sigma), per_sigma=per_sigma, samples=n,
                              per_item=per_item)

    compute = __call__
