"""Optimizers, by `train.optimizer`.

- `adamw`         torch AdamW, fused where the build supports it (else foreach).
- `adamw_bf16`    `AdamWBF16` below: AdamW whose weight update is stochastically rounded into bf16
                  weights (no fp32 master copy; moments kept in fp32). On fp32 weights it is plain AdamW.
                  On CUDA each tensor's update is one compiled, fused kernel (bench/optimizer_step.py).
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


# --------------------------------------------------------------------------- adamw_bf16

_MASK32 = 0xFFFFFFFF
# Chris Wellons' "hash prospector" 32-bit mix (x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97;
# x ^= x >> 15). Both multipliers are below 2**31, so on int64 values below 2**32 no product reaches 2**63:
# no overflow anywhere, and plain Python, eager torch (CPU, CUDA) and inductor's kernels give the same bits.
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97


def mix32(x: int) -> int:
    """A bijection of [0, 2**32) with good avalanche (Python ints; `_mix32_` is the same on tensors)."""
    x ^= x >> 16
    x = (x * _MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 15)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """`mix32` in place on an int64 tensor of values in [0, 2**32) (in place: fewer passes on the CPU)."""
    x ^= x >> 16
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    x ^= x >> 15
    return x


def rounding_key(seed: int, step: int, index: int) -> int:
    """The 32-bit key of the rounding noise of parameter `index` at optimizer step `step`.

    The noise is a pure function of (seed, step, parameter index, element index): nothing to save in
    a checkpoint, the same on every process (data-parallel replicas stay identical), and a resumed run
    draws exactly what the uninterrupted one would have."""
    seed = (seed ^ (seed >> 32)) & _MASK32
    return mix32(mix32(mix32(seed ^ 0x5BD1E995) ^ (step & _MASK32)) ^ (index & _MASK32))


#: elements per piece of the eager CPU noise: 2 MiB of int64, so the hash's passes stay in cache (3-4x faster)
CPU_NOISE_CHUNK = 1 << 18


def rounding_noise(numel: int, key: torch.Tensor, device: torch.device) -> torch.Tensor:
    """16 uniform random bits per element (int32 in [0, 2**16)): the high half of `mix32(index ^ key)`.
    Integer tensor ops only, so `torch.compile` fuses it into the update."""
    if torch.device(device).type == "cpu" and numel > CPU_NOISE_CHUNK and not torch.compiler.is_compiling():
        out = torch.empty(numel, dtype=torch.int32, device=device)
        for start in range(0, numel, CPU_NOISE_CHUNK):
            end = min(start + CPU_NOISE_CHUNK, numel)
            out[start:end] = _noise(start, end, key, device)
        return out
    return _noise(0, numel, key, device)


def _noise(start: int, end: int, key: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = torch.arange(start, end, device=device, dtype=torch.int64)
    x ^= key
    return (_mix32_(x) >> 16).to(torch.int32)


def stochastic_round_(target: torch.Tensor, source: torch.Tensor, key: torch.Tensor) -> None:
    """Copy float32 `source` (1-D) into bf16 `target`, rounding up or down at random in proportion to
    the remainder (unbiased: E[target] = source): add 16 uniform random low bits, then truncate them.
    `key` (0-d int64, see `rounding_key`) selects the noise."""
    bits = source.view(torch.int32)
    rounded = (bits + rounding_noise(bits.numel(), key, bits.device)) & -65536  # clear the bits bf16 drops
    target.copy_(rounded.view(torch.float32))  # exact: the value is representable in bf16


#: The per-parameter scalars of `adamw_update_`, in the order of its `hyper` row. Computed in Python
#: (float64) and stored as float32: the same values eager torch uses when given Python scalars.
HYPER = ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay", "neg_step_size", "bias2_sqrt")


def hyper_row(group: dict, step: int) -> list[float]:
    lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
    return [1 - beta1, beta2, 1 - beta2, eps, 1 - lr * wd, -lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)]


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  hyper: torch.Tensor, key: torch.Tensor, skip: torch.Tensor | None = None) -> None:
    """One AdamW step of one flattened (1-D, contiguous) parameter, in place: fp32 moments, the new
    weight computed in fp32, then stochastically rounded into a bf16 `param` (copied into fp32 ones).

    Written with tensor scalars (`hyper`: float32 row of HYPER; `key`: 0-d int64, `rounding_key`) so that one
    `torch.compile(dynamic=True)` graph serves every parameter and step: on CUDA it becomes a single
    fused kernel (inputs read once, outputs written once, the noise computed in registers). The op
    order is torch's single-tensor AdamW's, so fp32 parameters get exactly torch's AdamW.

    `skip` (0-d bool on the device, the NaN/inf guard's verdict; None = step): True leaves weight and
    moments as they were. The same values are computed into copies and then selected, so a step that is
    not skipped gets the very bits of the unflagged update, without the host having to look first."""
    one_minus_beta1, beta2, one_minus_beta2, eps, decay, neg_step_size, bias2_sqrt = hyper.unbind()
    g = grad.float()
    m = exp_avg if skip is None else exp_avg.clone()
    v = exp_avg_sq if skip is None else exp_avg_sq.clone()
    m.lerp_(g, one_minus_beta1)
    v.mul_(beta2).addcmul_(g * one_minus_beta2, g)  # = addcmul_(g, g, value=1 - beta2), bit for bit
    denom = (v.sqrt() / bias2_sqrt).add_(eps)
    # for fp32 params `.float()` is `param` itself, updated in place; with a skip flag it must stay as it is
    weights = (param.float() if skip is None else param.to(torch.float32, copy=True)).mul_(decay)
    weights.addcdiv_(neg_step_size * m, denom)  # = addcdiv_(exp_avg, denom, value=-lr / bias1)
    if skip is None:
        if param.dtype == torch.bfloat16:
            stochastic_round_(param, weights, key)
        elif param.dtype != torch.float32:  # fp16 weights: round to nearest (fp32 ones were updated in place)
            param.copy_(weights)
        return
    exp_avg.copy_(torch.where(skip, exp_avg, m))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v))
    if param.dtype == torch.bfloat16:
        rounded = torch.empty_like(param)
        stochastic_round_(rounded, weights, key)
        param.copy_(torch.where(skip, param, rounded))
    else:
        param.copy_(torch.where(skip, param, weights.to(param.dtype)))


def adamw_update_many_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                       exp_avg_sqs: list[torch.Tensor], hyper: torch.Tensor, keys: torch.Tensor,
                       skip: torch.Tensor | None = None) -> None:
    """`adamw_update_` over lists of flattened parameters (`hyper`: (n, 7) rows, `keys`: (n,); one `skip` for all).

    What the CUDA path compiles: one call updates a chunk of FUSED_CHUNK tensors (one kernel each),
    so the per-call cost of a compiled function (guards, wrappers: ~0.1 ms) is paid once per chunk
    instead of once per tensor; per tensor it would dominate the step (measured: bench/RESULTS.md)."""
    for i in range(len(params)):
        adamw_update_(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], hyper[i], keys[i], skip)


#: tensors per compiled call (short chunks are padded with scratch tensors: one graph for all)
FUSED_CHUNK = 16
_compiled_many = None


def compiled_adamw_update_many():
    """`adamw_update_many_` compiled once per process: dynamic shapes, so one graph serves every chunk."""
    global _compiled_many
    if _compiled_many is None:
        _compiled_many = torch.compile(adamw_update_many_, dynamic=True, fullgraph=True)
    return _compiled_many


def _run_compiled(fn, *args) -> None:
    # Without duck shaping, tensors of equal size at the first call get separate size symbols, so
    # the chunks that follow (other sizes) reuse the graph instead of recompiling.
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=False):
        fn(*args)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`. To CUDA through pinned memory without blocking: a plain copy from
    pageable memory waits for the stream, i.e. for the backward pass, before the update can be queued."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bf16 weights: fp32 moments, the new weight computed in fp32 and stochastically rounded.

    Without stochastic rounding, updates smaller than half a bf16 ulp (~0.4% of the weight) are
    lost; with it they survive in expectation. The rounding noise is a hash of (seed, step,
    parameter index, element index) (`rounding_key`), so a resumed run continues the same noise
    with no generator state to save. On fp32 weights it is torch's AdamW.

    Parameters on CUDA are updated by `adamw_update_` compiled into one fused kernel each, called
    in chunks (`adamw_update_many_`); `fused`: None = on CUDA, True = everywhere (tests), False =
    never. Elsewhere (CPU) the same function runs eagerly and is the reference. If compiling fails,
    the eager path takes over with a warning. float32 weights with float32 gradients need no rounding:
    on CUDA (`torch_fused_fp32`: None = on CUDA, True = everywhere (tests), False = never) they go
    through torch's multi-tensor fused AdamW kernel instead, a few launches for all of them (LoRA's
    ~320 adapter tensors took ~24 ms of host time as compiled chunk calls on an H100, for ~1 ms of
    GPU work: bench/RESULTS.md); same update, other fp32 rounding order.

    Skipping a step on the device (the NaN/inf guard, `job.train.guard`): like torch's fused Adam under
    `GradScaler`, `step()` honours a `found_inf` attribute (0-d float32 on the device, 1 = skip), so the
    update is queued before the host knows whether the loss was finite. Weights and moments are then left
    as they were by every path; the int step counters, advanced on the host before the launch (they
    pick the bias corrections and the rounding noise), are put back by `rollback_skipped()` once the
    host has read the verdict."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, fused: bool | None = None,
                 torch_fused_fp32: bool | None = None):
        self._param_index: dict[int, int] = {}
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._seed = seed
        self._fused = fused
        self._torch_fused_fp32 = torch_fused_fp32
        self._compiled_ok: set[tuple] = set()  # dtype pairs whose compiled update ran: later failures are errors
        self._scratch_pool: dict[tuple, list] = {}
        self._alias_cache: dict[int, tuple] = {}  # id(param) -> its flat aliases (see _flat_aliases)
        self._flagged_states: list[dict] = []  # states whose step counter the last step() with found_inf advanced

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        # each parameter's index in state_dict() order, fixed here: the group offload's background
        # step (job.train.offload) steps subsets of the groups, and must draw the same noise
        for p in self.param_groups[-1]["params"]:
            self._param_index.setdefault(id(p), len(self._param_index))

    def _use_compiled(self, device: torch.device) -> bool:
        return self._fused is True or (self._fused is None and device.type == "cuda")

    def _use_torch_fused(self, p: torch.Tensor) -> bool:
        if p.dtype != torch.float32 or p.grad.dtype != torch.float32 or p.grad.is_sparse:
            return False
        if not (p.is_contiguous() and p.grad.is_contiguous()):  # the multi-tensor kernel walks memory, not indices
            return False
        return self._torch_fused_fp32 is True or (self._torch_fused_fp32 is None and p.device.type == "cuda")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        self._flagged_states = []
        work: dict[torch.device, list] = {}
        torch_fused: list[tuple[dict, list]] = []
        for group in self.param_groups:
            fp32: list = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["step"] += 1
                if found_inf is not None:
                    self._flagged_states.append(state)
                step = state["step"]
                if self._use_torch_fused(p):
                    fp32.append((p, state))
                    continue
                key = rounding_key(self._seed, step, self._param_index.setdefault(id(p), len(self._param_index)))
                work.setdefault(p.device, []).append((p, state, hyper_row(group, step), key))
            if fp32:
                torch_fused.append((group, fp32))
        for group, entries in torch_fused:
            self._step_torch_fused(group, entries, found_inf)
        for device, items in work.items():
            skip = None if found_inf is None else found_inf.to(device, non_blocking=True) != 0
            if self._use_compiled(device):
                by_dtypes: dict[tuple, list] = {}
                for item in items:
                    by_dtypes.setdefault((item[0].dtype, item[0].grad.dtype), []).append(item)
                for dtypes, group_items in by_dtypes.items():
                    self._step_compiled(device, dtypes, group_items, skip)
            else:
                self._step_eager(device, items, skip)
        return loss

    def rollback_skipped(self) -> None:
        """Put back the step counters of the last `step()` run with `found_inf` set, after the host has
        learnt that the device skipped it (weights and moments were left as they were there)."""
        for state in self._flagged_states:
            state["step"] -= 1
        self._flagged_states = []

    @staticmethod
    def _step_torch_fused(group: dict, entries: list, found_inf: torch.Tensor | None = None) -> None:
        """float32 weights of one group: torch's fused AdamW kernel (the steps are kept as ints in the
        state, so the same state dict serves every path; the kernel reads them as float32 tensors, fresh
        copies: a skipped step, which the kernel leaves alone by `found_inf`, has nothing to undo here)."""
        by_device: dict[torch.device, list] = {}
        for p, state in entries:
            by_device.setdefault(p.device, []).append((p, state))
        beta1, beta2 = group["betas"]
        for device, items in by_device.items():
            steps = _to_device(torch.tensor([float(state["step"]) for _, state in items], dtype=torch.float32), device).unbind()
            device_found_inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
            torch._fused_adamw_([p.detach() for p, _ in items], [p.grad for p, _ in items],
                                [state["exp_avg"] for _, state in items], [state["exp_avg_sq"] for _, state in items],
                                [], list(steps), amsgrad=False, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                                found_inf=device_found_inf)

    @staticmethod
    def _flat(p: torch.Tensor, state: dict, alias=None) -> tuple:
        """(the tensor to update in place of `p`, the four flat operands of `adamw_update_`)."""
        target = p if p.is_contiguous() else p.contiguous()  # element order = the logical (row-major) order
        flat = alias or (lambda t: t.view(-1))
        return target, (flat(target.detach()), flat(p.grad.contiguous()), flat(state["exp_avg"]), flat(state["exp_avg_sq"]))

    def _flat_aliases(self, p: torch.Tensor, state: dict) -> tuple:
        """`_flat` with `_alias`es; those of the weight and the moments are kept between steps (their
        memory does not move), only the gradient's is new each step: this is most of the host time."""
        if not p.is_contiguous():
            return self._flat(p, state, self._alias)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        cached = self._alias_cache.get(id(p))
        if cached is None or cached[0] != p.data_ptr() or cached[1] is not m or cached[2] is not v:
            cached = (p.data_ptr(), m, v, self._alias(p.detach()), self._alias(m), self._alias(v))
            self._alias_cache[id(p)] = cached
        return p, (cached[3], self._alias(p.grad.contiguous()), cached[4], cached[5])

    @staticmethod
    def _alias(t: torch.Tensor) -> torch.Tensor:
        """A flat tensor on the memory of contiguous `t` that is no view: torch.compile guards on the
        bases of view inputs, so chunks would recompile for every new mix of parameter shapes."""
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))

    @staticmethod
    def _scalars(rows: list[list[float]], keys: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # all scalars of this step in two small tensors: one host-to-device copy each, not one per parameter
        return (_to_device(torch.tensor(rows, dtype=torch.float32), device),
                _to_device(torch.tensor(keys, dtype=torch.int64), device))

    def _step_eager(self, device: torch.device, items: list, skip: torch.Tensor | None = None) -> None:
        hyper, keys = self._scalars([h for _, _, h, _ in items], [k for _, _, _, k in items], device)
        for i, (p, state, _, _) in enumerate(items):
            target, flat = self._flat(p, state)
            adamw_update_(*flat, hyper[i], keys[i], skip)
            if target is not p:
                p.copy_(target)

    def _scratch(self, device: torch.device, dtypes: tuple, count: int) -> list[tuple]:
        """`count` sets of distinct 2-element scratch tensors that pad a short chunk (not 0 or 1
        elements: torch.compile specialises those sizes)."""
        pool = self._scratch_pool.setdefault((device, dtypes), [])
        while len(pool) < count:
            pool.append(tuple(torch.zeros(2, dtype=dtype, device=device) for dtype in (*dtypes, torch.float32, torch.float32)))
        return pool[:count]

    def _step_compiled(self, device: torch.device, dtypes: tuple, items: list, skip: torch.Tensor | None = None) -> None:
        if self._fused is False:  # compiling failed for another dtype pair in this step
            self._step_eager(device, items, skip)
            return
        if dtypes not in self._compiled_ok:
            try:
                self._step_chunks(device, dtypes, items[:FUSED_CHUNK], skip)  # the first call compiles before touching any tensor
                self._compiled_ok.add(dtypes)
            except Exception as exc:  # a CUDA build without a working inductor/triton: still train, slower
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                log.warning("adamw_bf16: the compiled update failed (%s: %s); using the eager update (slower)",
                            exc.__class__.__name__, exc)
                self._fused = False
                self._step_eager(device, items, skip)
                return
            items = items[FUSED_CHUNK:]
        self._step_chunks(device, dtypes, items, skip)

    def _step_chunks(self, device: torch.device, dtypes: tuple, items: list, skip: torch.Tensor | None = None) -> None:
        if not items:
            return
        pad = -len(items) % FUSED_CHUNK
        hyper, keys = self._scalars([h for _, _, h, _ in items] + [items[0][2]] * pad,
                                    [k for _, _, _, k in items] + [0] * pad, device)
        flats = [self._flat_aliases(p, state) for p, state, _, _ in items]
        columns = [list(c) for c in zip(*(flat for _, flat in flats), *self._scratch(device, dtypes, pad))]
        update = compiled_adamw_update_many()
        for start in range(0, len(items) + pad, FUSED_CHUNK):
            end = start + FUSED_CHUNK
            _run_compiled(update, *(c[start:end] for c in columns), hyper[start:end], keys[start:end], skip)
        for (p, _, _, _), (target, _) in zip(items, flats):
            if target is not p:
                p.copy_(target)

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        if state_dict.pop("sr_generators", None) is not None:
            # checkpoints of the earlier version carried generator states; the noise is now a hash of the step
            log.debug("adamw_bf16: ignoring the saved rounding generators of an older checkpoint")
        saved = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        # torch casts loaded state to the parameter dtype (bf16 here): put the fp32 moments back
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            p = params[int(index)]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in values:
                    self.state[p][key] = values[key].to(p.device, torch.float32, copy=True).contiguous()
