"""Scheduled sampling (rollout): sometimes build x_t from the model's own earlier predictions.

At inference the transformer sees x_t produced by its own previous steps, in training the exact
(1 - sigma) x0 + sigma noise; the gap (exposure bias) grows along a sampling trajectory.
Scheduled sampling (Bengio et al. 2015, applied to diffusion as in "Elucidating the Exposure Bias
in Diffusion Models", Ning et al. 2023) trains on the model's own inputs some of the time:

    with probability p a sample gets k ~ U{1..max_rollout_steps} rollout steps:
    sigma_start = sigma_t + k * (1 - sigma_t) / max_rollout_steps      (k = max: pure noise)
    x <- (1 - sigma_start) x0 + sigma_start * noise                    (the same noise)
    k Euler steps of the flow ODE with the model, no gradient:  x <- x + (sigma_next - sigma) * v(x, sigma)
    x_t_hat = x at sigma_t;  target = (x_t_hat - x0) / sigma_t

The target is the velocity that carries x_t_hat to the clean clip x0 in one Euler step (for
x_t_hat = x_t it is exactly noise - x0), so the model learns to correct its own drift instead of
being asked for a velocity that starts from a point it did not reach.

Randomness: one uniform and one step count per sample of the global batch from the session's
generator (each process keeps its slice), so N processes draw what one process would.
"""

from __future__ import annotations

import torch

from job.models.sanavideo.objective import FlowInputs, sigmas_to_timesteps

#: Samples whose sigma is below this get no rollout (the corrected target divides by sigma).
MIN_SIGMA = 0.02


def rollout_plan(probability: float, max_steps: int, sigmas: torch.Tensor, generator: torch.Generator,
                 world_size: int = 1, rank: int = 0) -> torch.Tensor:
    """Rollout steps per sample [B] (0 = none), drawn for the global batch; this process's slice."""
    b = sigmas.shape[0]
    lo, hi = rank * b, (rank + 1) * b
    chosen = torch.rand(b * world_size, generator=generator)[lo:hi] < probability
    steps = torch.randint(1, max_steps + 1, (b * world_size,), generator=generator)[lo:hi]
    return torch.where(chosen & (sigmas.cpu() >= MIN_SIGMA), steps, torch.zeros_like(steps))


@torch.no_grad()
def rollout_inputs(s, x0: torch.Tensor, inputs: FlowInputs, embeds: torch.Tensor, text_mask: torch.Tensor) -> FlowInputs:
    """`inputs` with x_t (and the target) of the samples the plan picks replaced by a rollout."""
    spec = s.spec.train.scheduled_sampling
    steps = rollout_plan(spec.probability, spec.max_rollout_steps, inputs.sigmas, s.generator, s.world, s.rank)
    if not bool(steps.any()):
        return inputs
    device = x0.device
    sigma_t = inputs.sigmas.to(device)
    steps = steps.to(device)
    stride = (1.0 - sigma_t) / spec.max_rollout_steps
    shape = (-1,) + (1,) * (x0.ndim - 1)
    sigma = sigma_t + steps * stride  # where each sample's rollout starts
    x = (1.0 - sigma.view(shape)) * x0 + sigma.view(shape) * inputs.noise
    longest = int(steps.max())
    for i in range(longest):  # all rollouts end together at sigma_t; a sample joins when it has `i` steps left
        active = steps >= longest - i
        pred = s.model(x.to(s.weight_dtype), encoder_hidden_states=embeds, encoder_attention_mask=text_mask,
                       timestep=sigmas_to_timesteps(sigma), return_dict=False)[0]
        if pred.shape[1] == 2 * x.shape[1]:  # learned-sigma heads: the first half is the velocity
            pred = pred.chunk(2, dim=1)[0]
        nxt = torch.where(active, sigma - stride, sigma)
        x = torch.where(active.view(shape), x + (nxt - sigma).view(shape) * pred.float(), x)
        sigma = nxt
    rolled = (steps > 0).view(shape)
    noisy = torch.where(rolled, x, inputs.noisy)
    target = torch.where(rolled, (x - x0) / sigma_t.view(shape), inputs.target)
    return FlowInputs(noisy=noisy, target=target, sigmas=inputs.sigmas, timesteps=inputs.timesteps, noise=inputs.noise)
