"""Optimizers, by `train.optimizer`.

- `adamw`         torch AdamW, fused where the build supports it (else foreach).
- `adamw_bf16`    `AdamWBF16` below: AdamW whose weight update is stochastically rounded into bf16
                  weights (no fp32 master copy; moments kept in fp32). On fp32 weights it is plain AdamW.
- `optimi-adamw`  torch-optimi's AdamW (Kahan-summation for low-precision weights).
- `adamw_8bit`    bitsandbytes' AdamW8bit (8-bit moments; needs a CUDA build of bitsandbytes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

from job.errors import EnvironmentProblem

log = logging.getLogger("trainer.train")


def check_optimizer_available(name: str) -> None:
    """Raise EnvironmentProblem at start (not mid-run) when the optimizer's package is missing."""
    if name == "optimi-adamw":
        try:
            import optimi  # noqa: F401
        except ImportError:
            raise EnvironmentProblem("train.optimizer 'optimi-adamw' needs the torch-optimi package, which is not installed",
                                     "pip install torch-optimi, or use optimizer: adamw_bf16") from None
    elif name == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # bitsandbytes raises more than ImportError on machines without CUDA
            raise EnvironmentProblem(f"train.optimizer 'adamw_8bit' needs bitsandbytes, which cannot be imported ({exc.__class__.__name__}: {exc})",
                                     "pip install bitsandbytes on a CUDA machine, or use optimizer: adamw_bf16 / optimi-adamw") from None


def build_optimizer(params: Iterable[torch.nn.Parameter], train_spec, seed: int = 0) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    name = train_spec.optimizer
    check_optimizer_available(name)
    kw = dict(lr=train_spec.learning_rate, betas=(train_spec.adam_beta1, train_spec.adam_beta2),
              eps=train_spec.adam_epsilon, weight_decay=train_spec.weight_decay)
    if name == "adamw":
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError) as exc:
            log.debug("fused AdamW not available here (%s); using the foreach implementation", exc)
            return torch.optim.AdamW(params, foreach=True, **kw)
    if name == "adamw_bf16":
        return AdamWBF16(params, seed=seed, **kw)
    if name == "optimi-adamw":
        import optimi

        return optimi.AdamW(params, **kw)
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    raise ValueError(f"unknown optimizer {name!r}")


def stochastic_round_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None) -> None:
    """Copy float32 `source` into bf16 `target`, rounding up or down at random in proportion to the
    remainder (unbiased: E[target] = source). Adds 16 random low bits, then truncates them."""
    bits = source.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise) & -65536  # clear the 16 bits bf16 does not keep
    target.copy_(rounded.view(torch.float32))  # exact: the value is representable in bf16


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bf16 weights: fp32 moments, the new weight computed in fp32 and stochastically rounded.

    Without stochastic rounding, updates smaller than half a bf16 ulp (~0.4% of the weight) are
    lost; with it they survive in expectation. The rounding noise comes from a seeded generator
    whose state is part of `state_dict()`, so a resumed run continues the same random stream.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending_generator_states: dict[str, torch.Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed + 7919)
            pending = self._pending_generator_states.pop(str(device), None)
            if pending is not None:
                gen.set_state(pending)
            self._generators[device] = gen
        return gen

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = state["step"]
                grad = p.grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias1 = 1 - beta1 ** step
                bias2 = 1 - beta2 ** step
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
                weights = p.float()
                if wd:
                    weights.mul_(1 - lr * wd)
                weights.addcdiv_(exp_avg, denom, value=-lr / bias1)
                if p.dtype == torch.bfloat16:
                    stochastic_round_(p, weights, self._generator(p.device))
                else:
                    p.copy_(weights)
        return loss

    def state_dict(self):
        state = super().state_dict()
        state["sr_generators"] = {str(dev): gen.get_state() for dev, gen in self._generators.items()}
        state["sr_generators"].update({k: v for k, v in self._pending_generator_states.items() if k not in state["sr_generators"]})
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        generators = state_dict.pop("sr_generators", {})
        saved = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        # torch casts loaded state to the parameter dtype (bf16 here): put the fp32 moments back
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            p = params[int(index)]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in values:
                    self.state[p][key] = values[key].to(p.device, torch.float32, copy=True)
        self._generators = {}
        self._pending_generator_states = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in generators.items()}
