"""EMA of the trained weights: diffusers' `EMAModel`, every `ema.update_interval` steps, on CPU or accelerator.

With `device: cpu` the shadow weights live in CPU RAM (float32) and each update copies the
trained weights over first (EMAModel itself needs both on one device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from diffusers.training_utils import EMAModel


class Ema:
    def __init__(self, params: list[torch.nn.Parameter], ema_spec, accelerator_device: torch.device,
                 before_read: Callable[[], None] | None = None):
        self.params = params
        # waits for an optimizer step still updating the weights in the background (group offload)
        self.before_read = before_read or (lambda: None)
        self.interval = ema_spec.update_interval
        self.device = torch.device("cpu") if ema_spec.device == "cpu" else accelerator_device
        self.model = EMAModel([p.detach().to(self.device, torch.float32) for p in params], decay=ema_spec.decay,
                              foreach=self.device.type != "cpu")

    def _views(self) -> list[torch.Tensor]:
        # EMAModel reads requires_grad to tell trained weights from frozen ones: keep it.
        return [p.detach().to(self.device, torch.float32).requires_grad_(p.requires_grad) for p in self.params]

    def maybe_update(self, step: int) -> bool:
        if step % self.interval:
            return False
        self.before_read()
        self.model.step(self._views())
        return True

    def state_dict(self) -> dict:
        state = dict(self.model.state_dict())
        state["shadow_params"] = [t.detach().cpu() for t in state["shadow_params"]]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
        self.model.to(self.device)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily swap the EMA weights into the model (validation, saving), then restore."""
        self.before_read()
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.model.shadow_params):
                p.copy_(s.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)
