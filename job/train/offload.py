"""Group offload that trains: `apply_group_offload(transformer, group_spec, device)`.

diffusers' `apply_group_offloading` is made for inference: it moves the *parameters themselves*
between devices, so in a training step autograd meets weights that have already gone back to the
CPU, gradients land on whichever device the weight was on at that moment, and the optimizer sees
parameters that move. Here the parameters never move:

- The transformer blocks' parameters live in CPU RAM (pinned when CUDA is there, so copies are
  asynchronous; or memory-mapped from `to_disk_path`, where the OS keeps what fits in RAM).
  The optimizer, its states and the gradients of these parameters stay on the CPU as well.
- When a block runs, each of its parameters is replaced, for the duration of that call only, by a
  copy on the accelerator made through `_Onload`, a differentiable copy: its backward sends the
  gradient back to the CPU parameter, where autograd accumulates it as for any leaf.
- With gradient checkpointing (needed for the memory saving: without it autograd keeps every
  block's weight copy alive for the backward pass) the recompute of a block in the backward pass
  calls the block again, which copies its weights again.
- `use_stream` (CUDA): while group k computes, group k+1 (k-1 in the backward recompute) is
  already being copied on a side stream, and gradients go back to pinned CPU memory on a second one
  while the backward pass goes on (they land in `.grad` when it ends). Measured on an H100 the
  copies are fully hidden; the extra cost is the part of the CPU optimizer step that the next
  forward pass does not hide (below).
- torch.compile: a block compiled *after* offloading runs its offload wrapper eagerly; training
  compiles the blocks' own forwards instead (`GroupOffload.compile_blocks`), which see the copies
  as graph inputs, so all blocks share one compiled graph.
- Everything outside the block lists (patch and caption embeddings, timestep embedding, output
  head: ~2% of the weights) stays on the accelerator, so code that asks "which device is this
  model on" from its first parameter gets the compute device.

`block_level` groups `blocks_per_group` consecutive blocks; `leaf_level` makes every leaf layer
inside the blocks its own group (less VRAM, more and smaller copies).

The optimizer step on the CPU (`step_in_background`): training wraps the optimizer in
`BackgroundStepOptimizer`, whose `step()` updates the accelerator's own parameters at once and
hands the CPU parameters to a worker thread, group by group in the blocks' order, while the next
forward pass starts: block k's forward waits only for group k's update. Gradient clipping needs
the global norm before any update; it comes from per-parameter norms taken on the accelerator as
each gradient is sent back (no CPU pass), and the clip is applied to each group just before its
update. The updates are the synchronous step's, bitwise (same clip coefficient, same per-tensor
arithmetic, same order of parameters on each device). Whatever reads the weights outside the
blocks' forward waits for the whole step: `model.state_dict()`, `optimizer.state_dict()`, the
EMA update (`finish_optimizer_step`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("trainer.train")

#: Attribute set on an offloaded model (its `GroupOffload`).
ATTR = "_trainer_group_offload"


class _Onload(torch.autograd.Function):
    """A copy of a CPU parameter on the compute device whose gradient goes back to the parameter.

    `box` holds a copy made ahead of time on the side stream (or nothing: copy now). It is a list so
    autograd does not see the copy as an input of this function."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, offload: "GroupOffload", box: list) -> torch.Tensor:
        ctx.param, ctx.offload = param, offload
        if box:
            return box[0]
        return param.to(offload.device, non_blocking=True, copy=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        offload = ctx.offload
        offload.note_grad_norm(ctx.param, grad)
        if offload.stream is None or grad.device.type != "cuda":
            # a plain (synchronous) copy: autograd accumulates it into the CPU `.grad` right after
            return grad.to(ctx.param.device), None, None
        offload.send_grad(ctx.param, grad)  # asynchronous; lands in `.grad` when the backward pass ends
        return None, None, None


@dataclass
class _Member:
    """One module whose forward is wrapped, with the parameters it swaps in and out."""

    module: torch.nn.Module
    slots: list[tuple[torch.nn.Module, str, torch.nn.Parameter]]
    group: int
    forward: object = None  # the module's own forward, called with the parameters swapped in


@dataclass
class GroupOffload:
    device: torch.device
    groups: list[list[_Member]]
    stream: torch.cuda.Stream | None = None  # weights to the accelerator
    grad_stream: torch.cuda.Stream | None = None  # gradients back: its own stream, so both directions copy at once
    offloaded_params: int = 0
    resident_params: int = 0
    offloaded_ids: frozenset[int] = frozenset()
    disk_files: list[Path] = field(default_factory=list)
    _ready: dict[int, tuple[dict[int, torch.Tensor], object]] = field(default_factory=dict)
    _grads: list = field(default_factory=list)  # (param, pinned CPU copy) on their way back
    _task: int | None = None  # the autograd graph task the gradients in `_grads` belong to
    _norms: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> norm of its gradient, on the accelerator
    _norms_usable: bool = True  # False once a gradient was accumulated onto an earlier one (the norm needs the sum)
    pending_step: "_PendingStep | None" = None  # the optimizer step running in the background
    last_land_s: float = 0.0  # time from the end of the last backward pass on the CPU to its gradients in `.grad`
    waited_s: float = 0.0  # total time blocks waited for their group's background optimizer step

    # --- the optimizer step running in the background ---------------------------------------------
    def wait_stepped(self, group: int | None) -> None:
        """Wait until the background optimizer step updated `group` (None: the CPU parameters outside the blocks)."""
        pending = self.pending_step
        if pending is not None:
            started = time.perf_counter()
            pending.wait(group)
            self.waited_s += time.perf_counter() - started

    def finish_optimizer_step(self) -> None:
        """Wait until the background optimizer step (if any) has updated every parameter."""
        pending = self.pending_step
        if pending is not None:
            pending.wait_all()

    # --- gradient norms, taken on the accelerator -----------------------------------------------
    def note_grad_norm(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """Keep the norm of `grad` (on the compute device, before it is sent back) while it is the whole
        gradient of `param`: the first and only one since the last step, in `param`'s dtype."""
        if not self._norms_usable:
            return
        if param.grad is not None or id(param) in self._norms or grad.dtype != param.dtype:
            self._norms_usable = False  # gradient accumulation: only the CPU sum has the norm
            return
        self._norms[id(param)] = torch.linalg.vector_norm(grad)

    def grad_norms(self, params: list[torch.nn.Parameter]) -> dict[int, torch.Tensor] | None:
        """The kept norms, when every offloaded parameter of `params` that has a gradient has one."""
        if not self._norms_usable:
            return None
        if any(p.grad is not None and id(p) not in self._norms and id(p) in self.offloaded_ids for p in params):
            return None
        return self._norms

    def forget_grad_norms(self) -> None:
        self._norms, self._norms_usable = {}, True

    # --- gradients back to the CPU ------------------------------------------------------------
    def send_grad(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """Copy `grad` into pinned CPU memory on the side stream, overlapping the rest of the backward
        pass; `_land_grads` (queued to run when autograd finishes) waits and accumulates."""
        task = torch._C._current_graph_task_id()
        if task != self._task:  # the first gradient of this backward pass (a failed one left nothing behind)
            self._task, self._grads = task, []
            torch.autograd.Variable._execution_engine.queue_callback(self._land_grads)
        current = torch.cuda.current_stream(self.device)
        self.grad_stream.wait_stream(current)
        host = torch.empty(grad.shape, dtype=grad.dtype, device="cpu", pin_memory=True)
        with torch.cuda.stream(self.grad_stream):
            host.copy_(grad, non_blocking=True)
        grad.record_stream(self.grad_stream)
        self._grads.append((param, host))

    def _land_grads(self) -> None:
        started = time.perf_counter()
        self.grad_stream.synchronize()  # also waits for the end of the backward pass on the GPU
        grads, self._grads, self._task = self._grads, [], None
        for param, host in grads:
            host = host if host.dtype == param.dtype else host.to(param.dtype)
            if param.grad is None:
                param.grad = host
            else:
                param.grad.add_(host)
        self.last_land_s = time.perf_counter() - started

    # --- copies -------------------------------------------------------------------------------
    def _copy_group(self, index: int) -> tuple[dict[int, torch.Tensor], object]:
        self.wait_stepped(index)
        copies = {id(p): p.detach().to(self.device, non_blocking=True, copy=True)
                  for member in self.groups[index] for _, _, p in member.slots}
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def prefetch(self, index: int) -> None:
        if self.stream is None or not 0 <= index < len(self.groups) or index in self._ready:
            return
        with torch.cuda.stream(self.stream):
            self._ready[index] = self._copy_group(index)

    def take(self, member: _Member) -> dict[int, torch.Tensor]:
        """The accelerator copies of `member`'s parameters: prefetched ones (each used once), else fresh."""
        for other in [k for k in self._ready if k != member.group]:
            # a prefetch the run did not use (the order changed direction): free it
            self._ready.pop(other)
        ready = self._ready.get(member.group)
        if ready is None:
            return {}
        copies, event = ready
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        mine = {}
        for _, _, p in member.slots:
            t = copies.pop(id(p), None)
            if t is not None:
                t.record_stream(current)  # made on the side stream, used (and freed) on this one
                mine[id(p)] = t
        if not copies:
            self._ready.pop(member.group, None)
        return mine

    def compile_blocks(self, reductions_tuned: bool = True, **compile_kwargs) -> int:
        """`torch.compile` each offloaded module's own forward (the wrapper with the swap and the
        copies stays eager). The parameters it reads are the onloaded copies, graph inputs to
        dynamo, so the blocks share one compiled graph as with the speed settings' regional compile.
        `reductions_tuned`: `speed.tune_reductions`, as there."""
        from job.models.sanavideo.speed import avoid_inductor_miscompiles, tune_reductions

        avoid_inductor_miscompiles()
        tune_reductions(reductions_tuned)
        members = [m for g in self.groups for m in g]
        for m in members:
            m.forward = torch.compile(m.forward, **compile_kwargs)
        return len(members)

    # --- the wrapped forward ------------------------------------------------------------------
    def run(self, member: _Member, forward, args, kwargs):
        in_backward = torch._C._current_graph_task_id() != -1  # the checkpoint recompute
        self.wait_stepped(member.group)
        prefetched = self.take(member)
        swapped = []
        try:
            for owner, name, p in member.slots:
                box = [prefetched[id(p)]] if id(p) in prefetched else []
                owner._parameters[name] = _Onload.apply(p, self, box)
                swapped.append((owner, name, p))
            if in_backward:  # before: the recompute may stop early (it raises out of the forward)
                self.prefetch(member.group - 1)
                return forward(*args, **kwargs)
            out = forward(*args, **kwargs)
            # after this block's kernels are queued: the next group may still wait for its optimizer step
            self.prefetch(member.group + 1)
            return out
        finally:
            # also when the checkpoint recompute stops early (it raises out of the forward)
            for owner, name, p in swapped:
                owner._parameters[name] = p


def _wrap(offload: GroupOffload, member: _Member) -> None:
    forward = member.module.forward

    # Not traced by torch.compile (a compiled block would trace the swap and the copies): a block
    # compiled after offloading runs this wrapper, and the block, eagerly.
    @torch._dynamo.disable
    def offloaded_forward(*args, **kwargs):
        return offload.run(member, member.forward, args, kwargs)

    member.forward = forward
    member.module.forward = offloaded_forward  # an instance attribute: state_dict and names unchanged


def _block_lists(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    return [child for child in model.children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))]


def _slots(module: torch.nn.Module, recurse: bool) -> list[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    mods = module.modules() if recurse else [module]
    return [(m, name, p) for m in mods for name, p in m._parameters.items() if p is not None]


def _groups(model: torch.nn.Module, level: str, blocks_per_group: int) -> list[list[_Member]]:
    groups: list[list[_Member]] = []
    for blocks in _block_lists(model):
        blocks = list(blocks)
        if level == "block_level":
            for start in range(0, len(blocks), blocks_per_group):
                index = len(groups)
                groups.append([_Member(b, _slots(b, True), index) for b in blocks[start:start + blocks_per_group]])
        else:
            for block in blocks:
                for leaf in block.modules():
                    slots = _slots(leaf, False)
                    if slots:
                        groups.append([_Member(leaf, slots, len(groups))])
    return groups


def _to_disk(params: list[torch.nn.Parameter], folder: Path) -> list[Path]:
    """Back each parameter with a file under `folder` (memory-mapped: the OS keeps in RAM what fits).

    Each file is unlinked as soon as it is mapped: the mapping keeps its blocks on the disk while the
    process runs, and the space is freed when it ends, however it ends (SIGKILL, OOM kill), so no
    run leaves spill files behind. The list holds the (now nameless) files' paths, for the log."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, p in enumerate(params):
        path = folder / f"param_{os.getpid()}_{i:05d}.bin"
        mapped = torch.from_file(str(path), shared=True, size=p.numel(), dtype=p.dtype).view(p.shape)
        path.unlink()
        mapped.copy_(p.data)
        p.data = mapped
        files.append(path)
    return files


def apply_group_offload(model: torch.nn.Module, group_spec, device: torch.device | str,
                        disk_folder: Path | None = None) -> GroupOffload:
    """Offload `model`'s transformer blocks to CPU RAM (or `disk_folder`) for training and inference.

    Call it after LoRA is added and weights are loaded, before the optimizer is built (the
    parameter objects stay the same; their storage moves). `device` is where blocks compute."""
    device = torch.device(device)
    if getattr(model, ATTR, None) is not None:
        raise RuntimeError("group offload is already applied to this model")
    groups = _groups(model, group_spec.type, group_spec.blocks_per_group)
    if not groups:
        raise RuntimeError(f"{type(model).__name__} has no block list (ModuleList) to offload")
    offloaded = {id(p): p for g in groups for m in g for _, _, p in m.slots}
    stream = None
    if group_spec.use_stream:
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
        else:
            log.debug("memory.group_offload.use_stream ignored: the compute device is %s, not CUDA", device)
    pin = device.type == "cuda" and disk_folder is None
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in offloaded:
                cpu = p.data.to("cpu")
                p.data = cpu.pin_memory() if pin else cpu
            else:
                p.data = p.data.to(device)
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b.to(device)
    offload = GroupOffload(device=device, groups=groups, stream=stream, offloaded_ids=frozenset(offloaded),
                           grad_stream=torch.cuda.Stream(device) if stream is not None else None,
                           offloaded_params=sum(p.numel() for p in offloaded.values()),
                           resident_params=sum(p.numel() for p in model.parameters() if id(p) not in offloaded))
    if disk_folder is not None:
        offload.disk_files = _to_disk(list(offloaded.values()), Path(disk_folder))
    for g in groups:
        for member in g:
            _wrap(offload, member)
    # a background optimizer step must be finished before the weights are read as a whole (saving)
    # or the CPU parameters outside the blocks are used (a CPU compute device)
    model.register_state_dict_pre_hook(lambda *_: offload.finish_optimizer_step())
    model.register_forward_pre_hook(lambda *_: offload.wait_stepped(None))
    setattr(model, ATTR, offload)
    log.info("group offload: %d groups (%s), %.0fM parameters in %s, %.0fM resident on %s%s",
             len(groups), group_spec.type, offload.offloaded_params / 1e6,
             f"files under {disk_folder}" if disk_folder else "CPU RAM", offload.resident_params / 1e6, device,
             ", copies on a side stream" if stream is not None else "")
    return offload


def group_offload_of(model: torch.nn.Module) -> GroupOffload | None:
    return getattr(model, ATTR, None)


def offload_for_training(model: torch.nn.Module, spec, device: torch.device, resolve=None) -> GroupOffload | None:
    """Apply `memory.group_offload` to the trained transformer when the spec asks for it."""
    go = spec.memory.group_offload
    if not go.enabled:
        return None
    folder = None
    if go.to_disk_path:
        folder = Path(resolve(go.to_disk_path) if resolve is not None else go.to_disk_path) / "group_offload"
    offload = apply_group_offload(model, go, device, disk_folder=folder)
    # spec.speed.compile_blocks compiles the blocks before this call only without group offload
    # (a compiled block would trace the swap); here the blocks' own forwards are compiled instead
    speed = getattr(spec, "speed", None)
    if speed is not None and speed.compile_blocks and offload.device.type == "cuda" and go.type == "block_level":
        log.info("group offload: compiling the %d offloaded blocks' forwards", offload.compile_blocks(speed.tune_reductions))
    return offload


# --- the optimizer step in the background ---------------------------------------------------------

def _steps_per_parameter(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` updates each parameter from that parameter, its gradient and its own state
    alone (AdamWBF16's rounding noise too: a hash of the seed, the step and the parameter's fixed
    index): then stepping a few parameters at a time gives the same result. Not torch-optimi's AdamW:
    it counts steps per parameter group."""
    from .optimizers import AdamWBF16

    return isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam, AdamWBF16))


class _PendingStep:
    """One optimizer step running on a worker thread: a "done" event per segment of parameters."""

    def __init__(self, events_by_group: dict[int | None, list[threading.Event]]):
        self.events_by_group = events_by_group
        self.error: BaseException | None = None
        self.seconds = 0.0

    def wait(self, group: int | None) -> None:
        for event in self.events_by_group.get(group, ()):
            event.wait()
        self._raise()

    def wait_all(self) -> None:
        for events in self.events_by_group.values():
            for event in events:
                event.wait()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the optimizer step on the offloaded parameters failed: {self.error}") from self.error


@dataclass
class _Clip:
    """Gradient clipping measured before the step and applied to each part of it."""

    method: str  # "norm" or "value"
    max_value: float
    total_norm: torch.Tensor  # on the CPU

    def apply(self, params: list[torch.nn.Parameter]) -> None:
        # the same calls on a subset: per-tensor arithmetic with the same coefficient as clip_grad_norm_
        if self.method == "norm":
            if self.unclipped:
                return  # a coefficient of exactly 1: multiplying would change no bit
            torch.nn.utils.clip_grads_with_norm_(params, self.max_value, self.total_norm)
        else:
            torch.nn.utils.clip_grad_value_(params, self.max_value)

    @property
    def unclipped(self) -> bool:
        # clip_grads_with_norm_'s coefficient, computed the same way
        coefficient = torch.clamp(self.max_value / (self.total_norm + 1e-6), max=1.0)
        return bool(coefficient == 1.0)


class BackgroundStepOptimizer(torch.optim.Optimizer):
    """`inner` whose `step()` returns at once for the group-offloaded (CPU) parameters: a worker thread
    updates them group by group, in the blocks' order, while the next forward pass runs (each block
    waits for its own group). The parameters on the accelerator are updated in `step()` itself.

    - `param_groups` are this wrapper's own (the LR scheduler writes them at any time); their
      hyperparameters are given to `inner` when a step starts, so a step uses the lr of its launch.
    - `step()` consumes the offloaded parameters' gradients (sets them to None once applied), as the
      `zero_grad(set_to_none=True)` that follows it in training would.
    - `clip_gradients` measures the global norm now and clips each group inside the step.
    - `state_dict`, `load_state_dict` and `wait` wait for the step; `state_dict` is `inner`'s
      (checkpoints are the same with and without the background step).
    """

    def __init__(self, inner: torch.optim.Optimizer, offload: GroupOffload):
        super().__init__([dict(g) for g in inner.param_groups], inner.defaults)
        self.inner, self.offload = inner, offload
        self.state = inner.state
        params = [p for g in inner.param_groups for p in g["params"]]
        group_of = {id(p): m.group for g in offload.groups for m in g for _, _, p in m.slots}
        #: stepped in `step()` itself: parameters on the accelerator (its kernels are queued in order)
        self.on_device = [p for p in params if p.device.type != "cpu"]
        #: stepped by the worker: runs of CPU parameters of one group (None: outside the blocks), in
        #: the optimizer's order (AdamWBF16's rounding noise depends only on each parameter's fixed
        #: index and the step, so stepping in parts draws what one whole step would)
        self.segments: list[tuple[int | None, list[torch.nn.Parameter]]] = []
        for p in params:
            if p.device.type != "cpu":
                continue
            key = group_of.get(id(p))
            if self.segments and self.segments[-1][0] == key:
                self.segments[-1][1].append(p)
            else:
                self.segments.append((key, [p]))
        self._group_index = {id(p): i for i, g in enumerate(inner.param_groups) for p in g["params"]}
        self._clip: _Clip | None = None
        self._thread: threading.Thread | None = None
        self._consuming = False  # a step was started since the last zero_grad: it consumes the offloaded gradients

    # --- the step -----------------------------------------------------------------------------
    def clip_gradients(self, params: list[torch.nn.Parameter], max_value: float, method: str) -> float:
        """The global L2 norm of the gradients, now; clip by `max_value` (`method` norm or value; 0: off)
        inside the next `step()`. The same numbers as accelerate's/torch's clip_grad_norm_ / clip_grad_value_."""
        grads = [p for p in params if p.grad is not None]
        kept = self.offload.grad_norms(grads)
        if kept is None:  # gradient accumulation: measure the sums on the CPU
            total = torch.nn.utils.get_total_norm([p.grad for p in grads])
        else:
            # the same per-tensor norms in the same order: get_total_norm of them is clip_grad_norm_'s total
            total = torch.nn.utils.get_total_norm([kept[id(p)] if id(p) in kept else torch.linalg.vector_norm(p.grad)
                                                   for p in grads])
        total = total.cpu()
        self._clip = _Clip(method, max_value, total) if max_value > 0 else None
        return float(total)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("BackgroundStepOptimizer.step does not take a closure")
        self.wait()
        for public, own in zip(self.param_groups, self.inner.param_groups):
            own.update({k: v for k, v in public.items() if k != "params"})  # the lr of this step's launch
        clip, self._clip = self._clip, None
        self.offload.forget_grad_norms()
        self._step_subset(self.on_device, clip)
        events: dict[int | None, list[threading.Event]] = {}
        work = []
        for key, params in self.segments:
            event = threading.Event()
            events.setdefault(key, []).append(event)
            work.append((params, event))
        pending = _PendingStep(events)
        self.offload.pending_step = pending
        self._consuming = True
        self._thread = threading.Thread(target=self._work, args=(work, clip, pending), daemon=True,
                                        name="offload-optimizer-step")
        self._thread.start()

    def _work(self, work, clip: _Clip | None, pending: _PendingStep) -> None:
        started = time.perf_counter()
        try:
            for params, event in work:
                self._step_subset(params, clip)
                for p in params:
                    p.grad = None  # applied: the next backward pass starts from None, as after zero_grad
                event.set()
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by the next wait
            pending.error = exc
        finally:
            pending.seconds = time.perf_counter() - started
            for _, event in work:
                event.set()

    def _step_subset(self, params: list[torch.nn.Parameter], clip: _Clip | None) -> None:
        """`inner.step()` restricted to `params` (those with a gradient), after clipping them."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        if clip is not None:
            clip.apply(params)
        by_group: dict[int, list[torch.nn.Parameter]] = {}
        for p in params:  # in the optimizer's order
            by_group.setdefault(self._group_index[id(p)], []).append(p)
        full = self.inner.param_groups
        self.inner.param_groups = [dict(full[i], params=group) for i, group in sorted(by_group.items())]
        try:
            self.inner.step()
        finally:
            self.inner.param_groups = full

    def wait(self) -> None:
        """Wait until the running step (if any) is finished; raise what it raised."""
        thread, pending = self._thread, self.offload.pending_step
        if thread is not None:
            thread.join()
            self._thread = None
        if pending is not None:
            self.offload.pending_step = None
            pending.wait_all()

    # --- the rest of the optimizer API ---------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._consuming:  # the step just started consumes the offloaded gradients itself: leave them to it
            for p in self.on_device:
                if p.grad is not None:
                    p.grad = None if set_to_none else p.grad.zero_()
            self._consuming = False
        else:  # no step since the last zero_grad (a skipped step): the gradients are all here
            self.wait()
            self.inner.zero_grad(set_to_none=set_to_none)
        self._clip = None
        self.offload.forget_grad_norms()

    def state_dict(self):
        self.wait()
        for public, own in zip(self.param_groups, self.inner.param_groups):
            own.update({k: v for k, v in public.items() if k != "params"})
        return self.inner.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.wait()
        self.inner.load_state_dict(state_dict)
        for public, own in zip(self.param_groups, self.inner.param_groups):
            public.update({k: v for k, v in own.items() if k != "params"})
        self.state = self.inner.state


def step_in_background(optimizer: torch.optim.Optimizer, offload: GroupOffload) -> torch.optim.Optimizer:
    """`optimizer` with its CPU step overlapping the next forward pass (`BackgroundStepOptimizer`),
    when its update is per parameter; else `optimizer` itself (the step stays synchronous)."""
    if not _steps_per_parameter(optimizer):
        log.info("group offload: %s steps synchronously (its update is not known to be per parameter)",
                 type(optimizer).__name__)
        return optimizer
    log.info("group offload: the CPU optimizer step runs in the background, overlapping the next forward pass")
    return BackgroundStepOptimizer(optimizer, offload)


def background_optimizer(optimizer) -> BackgroundStepOptimizer | None:
    """The `BackgroundStepOptimizer` inside `optimizer` (accelerate wraps it), or None."""
    while optimizer is not None and not isinstance(optimizer, BackgroundStepOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer
