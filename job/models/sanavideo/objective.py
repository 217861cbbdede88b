"""The flow-matching training objective of SANA-Video.

Rectified flow with the data at sigma 0 and the noise at sigma 1:

    x_t    = (1 - sigma) * x0 + sigma * noise
    target = noise - x0                       (the velocity the transformer predicts)

Training sigmas come from diffusers' `compute_density_for_timestep_sampling` (logit-normal by
default, uniform, or "mode"), then get the SANA-Video shift `s' = shift*s / (1 + (shift-1)*s)`
(`train.timesteps.flow_shift`, 3.0 for 480p training). The transformer receives
`timestep = sigma * 1000`: the pipeline's convention, whose flow-sigma DPM-Solver passes
`scheduler.timesteps = sigmas * num_train_timesteps` (1000, stored as int64, so truncated)
straight to the transformer. Training keeps the fraction (a float timestep; the sinusoidal
embedding is continuous, and the difference is under 0.1% of the range). The loss is the MSE in float32, optionally weighted per sample by
`compute_loss_weighting_for_sd3` and restricted to a mask.

Randomness comes only from the `torch.Generator` passed in (kept on the CPU, so the same seed
gives the same noise on every device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class FlowInputs:
    noisy: torch.Tensor  # x_t, float32 [B, C, F, H, W]
    target: torch.Tensor  # noise - x0, float32
    sigmas: torch.Tensor  # float32 [B]
    timesteps: torch.Tensor  # sigma * 1000, float32 [B] (per token [B, 1, F', H', W'] once i2v-conditioned)
    noise: torch.Tensor
    loss_mask: torch.Tensor | None = None  # [B, 1, F, H, W]: latents the loss counts (i2v: not the condition frame)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift: shift*s / (1 + (shift-1)*s). shift 1 is the identity."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas * NUM_TRAIN_TIMESTEPS


class FlowMatchingObjective:
    """`train.timesteps` (a TimestepSpec) turned into inputs, targets and a loss."""

    def __init__(self, timesteps_spec):
        self.spec = timesteps_spec

    def sample_sigmas(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training sigmas [B] in (0, 1), shifted, float32 on the generator's device (the CPU)."""
        s = self.spec
        device = generator.device if generator is not None else "cpu"
        u = compute_density_for_timestep_sampling(
            weighting_scheme=s.weighting_scheme, batch_size=batch_size, logit_mean=s.logit_mean,
            logit_std=s.logit_std, mode_scale=s.mode_scale, device=device, generator=generator,
        )
        return shift_sigmas(u.float().clamp(0.0, 1.0), s.flow_shift)

    def make_inputs(self, x0: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor) -> FlowInputs:
        """Deterministic part: x_t and target from given sigmas and noise (eval loss uses this)."""
        x0 = x0.float()
        noise = noise.to(device=x0.device, dtype=torch.float32)
        sig = sigmas.to(device=x0.device, dtype=torch.float32)
        s = sig.view(-1, *([1] * (x0.ndim - 1)))
        noisy = (1.0 - s) * x0 + s * noise
        return FlowInputs(noisy=noisy, target=noise - x0, sigmas=sig, timesteps=sigmas_to_timesteps(sig), noise=noise)

    def training_inputs(self, x0: torch.Tensor, generator: torch.Generator | None = None,
                        world_size: int = 1, rank: int = 0) -> FlowInputs:
        """Draw sigmas and noise from `generator` and build the inputs.

        The shared generator gives, for the whole global batch (`world_size` x this process's
        batch), one sigma and one noise seed per sample; this process keeps its slice and makes
        each sample's noise from its own seed. So the generator advances the same way on every
        process whatever the latent shapes, and N processes draw exactly what one process with
        the global batch would. The noise is drawn on the latents' device: on a GPU that takes no
        host time (on the CPU it was ~15 ms per 81x832x480 clip, with the GPU idle meanwhile), and a
        seed gives other numbers there than on the CPU, so a run repeats exactly on the same kind of
        device.
        """
        b = x0.shape[0]
        lo, hi = rank * b, (rank + 1) * b
        sigmas = self.sample_sigmas(b * world_size, generator)[lo:hi]
        device = generator.device if generator is not None else "cpu"
        seeds = torch.randint(0, 2**62, (b * world_size,), generator=generator, device=device)[lo:hi].tolist()
        noise = torch.stack([
            torch.randn(tuple(x0.shape[1:]), generator=torch.Generator(device=x0.device).manual_seed(seed), device=x0.device,
                        dtype=torch.float32)
            for seed in seeds
        ])
        return self.make_inputs(x0, sigmas, noise)

    @staticmethod
    def condition_on_first_frame(inputs: FlowInputs, first_frame: torch.Tensor, is_i2v: torch.Tensor,
                                 patch_size: tuple[int, int, int]) -> FlowInputs:
        """Image-to-video conditioning, as `SanaImageToVideoPipeline` feeds the transformer.

        For the i2v samples (`is_i2v` [B] bool): latent frame 0 of x_t is the clean latent of the
        clip's first frame (`first_frame` [B, C, 1, H, W], the VAE's mode of that frame encoded
        alone, normalised), and the timestep is given per token: 0 on frame 0's tokens (clean),
        sigma * 1000 elsewhere, shape [B, 1, F/pt, H/ph, W/pw] (the pipeline's `conditioning_mask`
        layout). The pipeline never uses the prediction for frame 0, so the loss leaves it out.
        Text-to-video samples of the same batch get the same per-token timestep everywhere, which
        the transformer embeds exactly like the scalar one."""
        b, _, f, h, w = inputs.noisy.shape
        pt, ph, pw = patch_size
        rows = is_i2v.to(device=inputs.noisy.device, dtype=torch.bool).view(b, 1, 1, 1, 1)
        noisy = inputs.noisy.clone()
        noisy[:, :, :1] = torch.where(rows, first_frame.to(noisy), noisy[:, :, :1])
        timesteps = inputs.timesteps.to(noisy.device).view(b, 1, 1, 1, 1).expand(b, 1, f // pt, h // ph, w // pw).clone()
        timesteps[:, :, :1] = torch.where(rows, torch.zeros_like(timesteps[:, :, :1]), timesteps[:, :, :1])
        keep = torch.ones((b, 1, f, h, w), dtype=torch.float32, device=noisy.device)
        keep[:, :, :1] = torch.where(rows, torch.zeros_like(keep[:, :, :1]), keep[:, :, :1])
        if inputs.loss_mask is not None:
            keep = keep * inputs.loss_mask
        return FlowInputs(noisy=noisy, target=inputs.target, sigmas=inputs.sigmas, timesteps=timesteps,
                          noise=inputs.noise, loss_mask=keep)

    def loss_per_sample(self, pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted MSE per sample [B], float32. `mask` [B, 1, F, H, W] (0..1) restricts it."""
        if pred.shape[1] == 2 * target.shape[1]:  # learned-sigma heads: the first half is the prediction
            pred = pred.chunk(2, dim=1)[0]
        err = (pred.float() - target.float()) ** 2
        dims = tuple(range(1, err.ndim))
        if mask is None:
            per_sample = err.mean(dim=dims)
        else:
            mask = mask.to(device=err.device, dtype=torch.float32).expand_as(err)
            per_sample = (err * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1.0)
        weights = compute_loss_weighting_for_sd3(self.spec.loss_weighting, sigmas.to(err.device).float())
        return per_sample * weights.float()

    def loss(self, pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss_per_sample(pred, target, sigmas, mask).mean()
