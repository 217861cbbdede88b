"""Training-capable group offload (`job.train.offload`): same numbers as no offload, gradients on the
CPU parameters, the trainer end to end, the spill-to-disk path and the spec rules.

The onload device is the CPU here (no GPU in CI): every code path runs (the differentiable copy,
the parameter swap, the checkpoint recompute, CPU-side gradients and optimizer), only the copies
stay on one device. The GPU run is in bench/offload_quant.py (results in bench/RESULTS.md)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from job.spec import validate_data
from job.train import run_train
from job.train.offload import apply_group_offload, group_offload_of
from train_helpers import make_job, spec_dict, trained_state


def _transformer(tiny_model):
    from diffusers import SanaVideoTransformer3DModel

    return SanaVideoTransformer3DModel.from_pretrained(tiny_model / "transformer").float()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                encoder_attention_mask=torch.ones(1, 8, dtype=torch.int64),
                timestep=torch.tensor([500.0]))


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("level,per_group,ckpt", [("block_level", 1, True), ("block_level", 2, True),
                                                  ("leaf_level", 1, True), ("block_level", 1, False)])
def test_same_outputs_and_gradients_as_no_offload(tiny_model, level, per_group, ckpt):
    plain = _transformer(tiny_model)
    offloaded = copy.deepcopy(plain)
    for m in (plain, offloaded):
        m.train()
        if ckpt:
            m.enable_gradient_checkpointing()
    params_before = {n: p for n, p in offloaded.named_parameters()}
    go = type("G", (), dict(type=level, blocks_per_group=per_group, use_stream=True))()
    offload = apply_group_offload(offloaded, go, "cpu")
    assert group_offload_of(offloaded) is offload and offload.offloaded_params > offload.resident_params > 0
    ref_out, ref_grads = _loss_and_grads(plain, _inputs())
    out, grads = _loss_and_grads(offloaded, _inputs())
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # the trained objects are still the module's parameters, none left swapped out after backward
    assert dict(offloaded.named_parameters()) == params_before
    assert all(isinstance(p, torch.nn.Parameter) for m in offloaded.modules() for p in m._parameters.values() if p is not None)
    # inference (validation) through the offloaded model gives the same output too
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**_inputs(1), return_dict=False)[0], plain(**_inputs(1), return_dict=False)[0],
                                   rtol=1e-5, atol=1e-6)


def test_compiling_an_offloaded_block_keeps_it_correct(tiny_model):
    """Validation may compile the blocks after training offloaded them: the offload wrapper is not traced."""
    plain = _transformer(tiny_model)
    offloaded = copy.deepcopy(plain)
    apply_group_offload(offloaded, type("G", (), dict(type="block_level", blocks_per_group=1, use_stream=True))(), "cpu")
    for block in offloaded.transformer_blocks:
        block.compile(backend="eager")
    ref_out, ref_grads = _loss_and_grads(plain, _inputs())
    out, grads = _loss_and_grads(offloaded, _inputs())
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_offloaded_blocks_match_and_share_one_graph(tiny_model):
    """`GroupOffload.compile_blocks` (what training does on CUDA with speed.compile_blocks): the blocks'
    own forwards compiled, the swapped-in copies are graph inputs (no recompile per block)."""
    from torch._dynamo.utils import counters

    plain = _transformer(tiny_model)
    offloaded = copy.deepcopy(plain)
    for m in (plain, offloaded):
        m.train()
        m.enable_gradient_checkpointing()
    offload = apply_group_offload(offloaded, type("G", (), dict(type="block_level", blocks_per_group=1, use_stream=True))(), "cpu")
    torch._dynamo.reset()
    counters.clear()
    assert offload.compile_blocks(backend="aot_eager") == len(plain.transformer_blocks)
    for _ in range(2):
        ref_out, ref_grads = _loss_and_grads(plain, _inputs())
        out, grads = _loss_and_grads(offloaded, _inputs())
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # not one per block and step


def test_applying_twice_and_models_without_blocks_are_refused(tiny_model):
    go = type("G", (), dict(type="block_level", blocks_per_group=1, use_stream=False))()
    model = _transformer(tiny_model)
    apply_group_offload(model, go, "cpu")
    with pytest.raises(RuntimeError, match="already"):
        apply_group_offload(model, go, "cpu")
    with pytest.raises(RuntimeError, match="no block list"):
        apply_group_offload(torch.nn.Linear(2, 2), go, "cpu")


def _train(tmp_path, tiny_model, memory, **sections):
    spec, ws = make_job(tmp_path, tiny_model, memory=memory,
                        train={"max_train_steps": 3, "optimizer": "adamw", "learning_rate": 1e-3}, **sections)
    result = run_train(spec, ws)
    assert result.status == "completed" and result.step == 3
    losses = [json.loads(line)["loss"] for line in (ws.logs_dir / "metrics.jsonl").read_text().splitlines()]
    return trained_state(ws), losses


def test_full_fine_tune_with_group_offload_matches_the_plain_run(tmp_path, tiny_model):
    plain, plain_losses = _train(tmp_path / "plain", tiny_model, {"gradient_checkpointing": True})
    off, off_losses = _train(tmp_path / "off", tiny_model,
                             {"gradient_checkpointing": True, "group_offload": {"enabled": True, "blocks_per_group": 1}})
    assert off_losses == pytest.approx(plain_losses, rel=1e-5)
    assert set(off) == set(plain)
    for k in plain:
        torch.testing.assert_close(off[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_lora_with_leaf_offload_spilled_to_disk_trains(tmp_path, tiny_model):
    lora = {"pretrained_model_name_or_path": str(tiny_model), "base_model_precision": "fp32", "type": "lora",
            "prompt": {"max_sequence_length": 8}, "lora": {"rank": 4, "target_modules": ["to_q", "to_v"]}}
    plain, plain_losses = _train(tmp_path / "plain", tiny_model, {"gradient_checkpointing": True}, model=lora)
    off, off_losses = _train(tmp_path / "off", tiny_model,
                             {"gradient_checkpointing": True,
                              "group_offload": {"enabled": True, "type": "leaf_level", "to_disk_path": "offload"}},
                             model=lora)
    assert off_losses == pytest.approx(plain_losses, rel=1e-5)
    for k in plain:
        torch.testing.assert_close(off[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)
    # the spill files are unlinked once mapped: nothing is left behind, even by a killed run
    assert (tmp_path / "off" / "ws" / "offload" / "group_offload").is_dir()
    assert not list((tmp_path / "off" / "ws" / "offload" / "group_offload").iterdir())


def test_disk_spilled_weights_are_file_backed_and_leave_no_files(tmp_path):
    from job.train.offload import _to_disk

    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    before = [p.detach().clone() for p in params]
    files = _to_disk(params, tmp_path / "spill")
    assert len(files) == 2 and not list((tmp_path / "spill").iterdir())
    for p, old, path in zip(params, before, files):
        assert p.untyped_storage().filename == str(path)  # backed by the (unlinked) file, not anonymous RAM
        assert torch.equal(p.detach(), old)
    with torch.no_grad():
        params[0].add_(1.0)  # writable: the optimizer updates the weights in place
    assert torch.equal(params[0].detach(), before[0] + 1.0)


def _rules(tmp_path, **sections):
    """(errors, warnings) of a spec: the messages as `path: message`."""
    from job.errors import SpecError

    data = spec_dict(tmp_path, tmp_path / "model", **sections)
    try:
        loaded = validate_data(data, "<t>", env={})
    except SpecError as exc:
        return [f"{p.path}: {p.message}" for p in exc.problems], []
    return [], [f"{w.path}: {w.message}" for w in loaded.warnings]


def test_spec_rules_for_group_offload(tmp_path):
    on = {"gradient_checkpointing": True, "group_offload": {"enabled": True}}
    assert _rules(tmp_path, memory=on)[0] == []
    errors, _ = _rules(tmp_path, memory={**on, "enable_model_cpu_offload": True})
    assert any(e.startswith("memory.enable_model_cpu_offload") for e in errors)
    errors, _ = _rules(tmp_path, memory=on, train={"num_processes": 2, "max_train_steps": 2})
    assert any("single-process" in e for e in errors)
    for precision in ("int8", "fp8"):
        model = {"pretrained_model_name_or_path": "m", "base_model_precision": precision, "type": "lora"}
        errors, _ = _rules(tmp_path, memory=on, model=model)
        assert any(e.startswith("memory.group_offload.enabled") and precision in e for e in errors), errors
    errors, _ = _rules(tmp_path, memory=on, train={"optimizer": "adamw_8bit", "max_train_steps": 2})
    assert any(e.startswith("train.optimizer") and "CPU RAM" in e for e in errors), errors
    _, warnings = _rules(tmp_path, memory={"gradient_checkpointing": False, "group_offload": {"enabled": True}})
    assert any("gradient checkpointing" in w for w in warnings)
    _, warnings = _rules(tmp_path, memory=on)
    assert not any("gradient checkpointing" in w for w in warnings)


def test_preflight_counts_offloaded_gradients_and_optimizer_states_in_host_ram():
    import dataclasses

    from job.preflight.estimate import inputs_from_spec
    from job.preflight.resources import host_ram_need
    from train_helpers import make_spec

    spec = make_spec(spec_dict("/tmp/unused", "/tmp/unused-model", model={"pretrained_model_name_or_path": "m", "base_model_precision": "bf16"},
                               memory={"gradient_checkpointing": True, "group_offload": {"enabled": True}}))
    inp = dataclasses.replace(inputs_from_spec(spec, None, frames=81, height=480, width=832), optimizer="adamw")
    need = host_ram_need(inp, to_disk=False)
    n = inp.params.total
    assert need["group_offload_weights"] == need["group_offload_gradients"] == n * 2
    assert need["group_offload_optimizer_states"] == n * 4  # two bf16 moments
    spilled = host_ram_need(inp, to_disk=True)  # the folder holds the weights, not gradients or moments
    assert "group_offload_weights" not in spilled and spilled["group_offload_optimizer_states"] == n * 4
    assert "group_offload_gradients" not in host_ram_need(dataclasses.replace(inp, group_offload=False), to_disk=False)


# --- the optimizer step in the background (BackgroundStepOptimizer) --------------------------------

def _final_state(ws) -> dict[str, torch.Tensor]:
    """Weights, optimizer state and EMA of the newest checkpoint, flat."""
    from job.train.checkpoints import CheckpointStore

    folder = CheckpointStore(ws.checkpoints_dir).latest()
    state = {f"w.{k}": v for k, v in trained_state(folder).items()}
    for index, values in torch.load(folder / "optimizer.pt", weights_only=True)["state"].items():
        for key, value in values.items():
            state[f"opt.{index}.{key}"] = torch.as_tensor(value)
    if (folder / "ema.pt").is_file():
        for i, t in enumerate(torch.load(folder / "ema.pt", weights_only=True)["shadow_params"]):
            state[f"ema.{i}"] = t
    return state


@pytest.mark.parametrize("case", [
    # fp32 weights, clipping by norm from the norms taken as gradients are sent back, EMA
    dict(train={"optimizer": "adamw", "max_grad_norm": 0.05, "use_ema": True, "ema": {"decay": 0.9}}),
    # bf16 weights, stochastic rounding, 2 micro-batches (the norm of the CPU sums), clipping by value
    dict(model={"base_model_precision": "bf16"},
         train={"optimizer": "adamw_bf16", "gradient_accumulation_steps": 2, "max_grad_norm": 0.01, "grad_clip_method": "value"}),
    # no clipping; a threshold never reached (the coefficient is exactly 1)
    dict(train={"optimizer": "adamw", "max_grad_norm": 0.0}),
    dict(train={"optimizer": "adamw", "max_grad_norm": 1000.0}),
])
def test_background_optimizer_step_is_bitwise_the_synchronous_one(tmp_path, tiny_model, monkeypatch, case):
    """The trainer with group offload, its CPU step in the background (stopped after 3 steps, resumed to
    6, a checkpoint in between), against the same job stepping synchronously: the same bits."""
    import job.train.session as session_mod
    from train_helpers import make_spec, write_caches

    def job(folder, steps):
        model = {"pretrained_model_name_or_path": str(tiny_model), "base_model_precision": "fp32",
                 "prompt": {"max_sequence_length": 8}, **case.get("model", {})}
        train = {"max_train_steps": steps, "learning_rate": 1e-3, "lr_scheduler": "constant_with_warmup",
                 "lr_warmup_steps": 3, **case["train"]}
        spec = make_spec(spec_dict(folder, tiny_model, model=model, train=train, checkpoints={"step_interval": 2},
                                   memory={"gradient_checkpointing": True, "group_offload": {"enabled": True}}))
        return spec, write_caches(spec, n_samples=3)

    spec, ws = job(tmp_path / "resumed", 3)
    assert run_train(spec, ws).step == 3
    spec, ws = job(tmp_path / "resumed", 6)
    result = run_train(spec, ws)
    assert result.status == "completed" and result.step == 6
    got = _final_state(ws)

    with monkeypatch.context() as m:
        m.setattr(session_mod, "step_in_background", lambda optimizer, offload: optimizer)
        spec, ws = job(tmp_path / "sync", 6)
        assert run_train(spec, ws).step == 6
    ref = _final_state(ws)
    assert set(ref) == set(got)
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, different[:5]


class _GatedAdamW(torch.optim.AdamW):
    """AdamW whose steps wait for `gate` (the test opens it)."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        import threading

        self.gate = threading.Event()
        self.fail = False

    def step(self, closure=None):
        self.gate.wait()
        if self.fail:
            raise ValueError("broken update")
        return super().step(closure)


def _offloaded_with_background_step(tiny_model):
    from job.train.offload import BackgroundStepOptimizer

    model = _transformer(tiny_model)
    offload = apply_group_offload(model, type("G", (), dict(type="block_level", blocks_per_group=1, use_stream=False))(), "cpu")
    inner = _GatedAdamW([p for p in model.parameters()], lr=1e-2)
    return model, offload, BackgroundStepOptimizer(inner, offload)


def test_background_step_returns_before_the_update_and_readers_wait_for_it(tiny_model):
    import threading

    model, offload, opt = _offloaded_with_background_step(tiny_model)
    _loss_and_grads(model, _inputs())
    params = list(model.parameters())
    assert opt.clip_gradients(params, 0.5, "norm") == float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.step()  # on this CPU run every parameter is left to the worker, which waits for the gate
    assert offload.pending_step is not None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    threading.Timer(0.2, opt.inner.gate.set).start()
    after = model.state_dict()  # waits for the whole step
    assert all(not torch.equal(after[n], before[n]) for n, _ in model.named_parameters())
    assert all(p.grad is None for p in params)  # applied, so consumed by the step
    opt.wait()
    assert offload.pending_step is None


def test_an_error_in_the_background_step_reaches_the_training_thread(tiny_model):
    model, offload, opt = _offloaded_with_background_step(tiny_model)
    _loss_and_grads(model, _inputs())
    opt.inner.gate.set()
    opt.inner.fail = True
    opt.step()
    with pytest.raises(RuntimeError, match="broken update"):
        model(**_inputs(), return_dict=False)  # the next forward waits for the step, and fails with it
    with pytest.raises(RuntimeError, match="broken update"):
        opt.state_dict()


def test_zero_grad_after_a_skipped_step_clears_the_offloaded_gradients(tiny_model):
    """The NaN guard skips a step with zero_grad alone: those gradients must not leak into the next step."""
    model, offload, opt = _offloaded_with_background_step(tiny_model)
    opt.inner.gate.set()
    _loss_and_grads(model, _inputs())
    opt.step()
    opt.zero_grad(set_to_none=True)  # right after a step: the worker consumes the gradients
    model(**_inputs(1), return_dict=False)[0].square().mean().backward()  # its forward waits for the step
    opt.clip_gradients(list(model.parameters()), 1.0, "norm")
    opt.zero_grad(set_to_none=True)  # a skipped step
    assert all(p.grad is None for p in model.parameters())


def test_each_group_is_released_as_soon_as_its_own_update_is_done(tiny_model):
    """A block's next forward waits for its group only: group k's "stepped" flag is set once k is updated,
    while the groups after it are still untouched."""
    import threading

    model, offload, opt = _offloaded_with_background_step(tiny_model)
    opt.inner.gate.set()
    tokens = threading.Semaphore(0)  # one update of a segment per token
    inner_step = opt.inner.step
    opt.inner.step = lambda closure=None: (tokens.acquire(), inner_step())[1]
    _loss_and_grads(model, _inputs())
    before = [[p.detach().clone() for p in params] for _, params in opt.segments]
    opt.step()
    pending = offload.pending_step
    seen: dict = {}
    for i, (key, params) in enumerate(opt.segments):
        tokens.release()
        event = pending.events_by_group[key][seen.get(key, 0)]
        seen[key] = seen.get(key, 0) + 1
        assert event.wait(10)
        if key is not None:
            offload.wait_stepped(key)  # returns: its group is done
        assert all(not torch.equal(p, b) for p, b in zip(params, before[i]))
        later = [(q, b) for (_, ps), bs in zip(opt.segments[i + 1:], before[i + 1:]) for q, b in zip(ps, bs)]
        assert all(torch.equal(q, b) for q, b in later)
    opt.wait()


def test_optimizers_that_count_steps_per_group_step_synchronously(tiny_model):
    """torch-optimi's AdamW keeps its step count in the parameter group: stepping a group's parameters in
    parts would count several steps, so it is left as it is (a synchronous step)."""
    optimi = pytest.importorskip("optimi")
    from job.train.offload import BackgroundStepOptimizer, step_in_background

    model = _transformer(tiny_model)
    offload = apply_group_offload(model, type("G", (), dict(type="block_level", blocks_per_group=1, use_stream=False))(), "cpu")
    plain = optimi.AdamW(list(model.parameters()), lr=1e-3)
    assert step_in_background(plain, offload) is plain
    assert isinstance(step_in_background(torch.optim.AdamW(list(model.parameters()), lr=1e-3), offload), BackgroundStepOptimizer)
