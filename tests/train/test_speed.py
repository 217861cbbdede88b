"""`speed:` the fast path computes what the plain diffusers path computes; each switch turns its part off.

CPU only, tiny model: the fused attention and selective checkpointing are checked numerically
against stock diffusers; compile is checked for being applied / skipped, not run (inductor on
the CPU costs minutes; its numerics are checked on the GPU by bench/train_step.py).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from diffusers import SanaVideoTransformer3DModel
from diffusers.models.transformers.transformer_sana_video import SanaLinearAttnProcessor3_0

from job.models.sanavideo import speed as speed_mod
from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_feedforward
from job.spec.speed import SpeedSpec
from job.train.model import prepare_transformer
from train_helpers import make_spec, spec_dict


def _model(dtype=torch.float64, layers: int = 3):
    torch.manual_seed(0)
    return SanaVideoTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": layers}).to(dtype)


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return dict(hidden_states=torch.randn(2, 4, 3, 8, 12, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g).to(dtype),
                timestep=torch.tensor([100.0, 900.0]), encoder_attention_mask=mask, return_dict=False)


def _loss_and_grads(model, dtype=torch.float64):
    model.zero_grad(set_to_none=True)
    out = model(**_inputs(dtype))[0]
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _spec(tmp_path, tiny_model, **sections):
    return make_spec(spec_dict(tmp_path, tiny_model, **sections))


def test_fused_linear_attention_matches_diffusers_in_float64():
    plain = _model()
    fast = copy.deepcopy(plain)
    assert speed_mod.use_fused_linear_attention(fast) == 3
    assert speed_mod.use_fused_linear_attention(fast) == 0  # idempotent
    loss_p, grads_p = _loss_and_grads(plain)
    loss_f, grads_f = _loss_and_grads(fast)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) > 10
    # diffusers' processor casts to float32 (even from float64): agreement at float32 level
    assert abs(float(loss_f - loss_p)) <= 1e-6 * float(loss_p)
    for name in grads_p:
        assert _rel(grads_f[name], grads_p[name]) < 1e-5, name


def test_fused_linear_attention_in_bf16_stays_within_bf16_tolerance():
    plain = _model(torch.bfloat16)
    fast = copy.deepcopy(plain)
    speed_mod.use_fused_linear_attention(fast)
    loss_p, grads_p = _loss_and_grads(plain, torch.bfloat16)
    loss_f, grads_f = _loss_and_grads(fast, torch.bfloat16)
    norm_p = torch.stack([g.float().norm() for g in grads_p.values()]).norm()
    norm_f = torch.stack([g.float().norm() for g in grads_f.values()]).norm()
    assert abs(float(loss_f - loss_p)) <= 0.01 * float(loss_p)
    assert abs(float(norm_f - norm_p)) <= 0.02 * float(norm_p)


def test_selective_checkpointing_recomputes_only_the_other_blocks(monkeypatch):
    plain = _model()
    plain.enable_gradient_checkpointing()
    fast = copy.deepcopy(plain)
    assert speed_mod.selective_checkpointing(fast, keep_last=1) == 2
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    loss_p, grads_p = _loss_and_grads(plain)
    plain_calls = len(calls)
    calls.clear()
    loss_f, grads_f = _loss_and_grads(fast)
    assert plain_calls == 3 and len(calls) == 2
    assert float(loss_f) == float(loss_p)
    for name in grads_p:
        assert _rel(grads_f[name], grads_p[name]) < 1e-12, name


def test_prepare_transformer_applies_the_speed_defaults_and_skips_compile_on_cpu(tmp_path, tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = _spec(tmp_path, tiny_model, memory={"gradient_checkpointing": True}, speed={"keep_activations_blocks": 1})
    model = _model(torch.float32, layers=2)
    params = prepare_transformer(model, spec)
    assert params and all(p.requires_grad for p in params)
    assert all(isinstance(b.attn1.processor, speed_mod.FusedLinearAttnProcessor) for b in model.transformer_blocks)
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in model.transformer_blocks)
    assert "not compiling: no CUDA device" in caplog.text
    assert model.gradient_checkpointing


def test_speed_switches_off_leave_the_plain_diffusers_model(tmp_path, tiny_model, monkeypatch):
    compiled = []
    monkeypatch.setattr(speed_mod, "compile_available", lambda transformer: (True, ""))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    spec = _spec(tmp_path, tiny_model, memory={"gradient_checkpointing": False},
                 speed={"compile_blocks": False, "linear_attention": "diffusers", "keep_activations_blocks": 3})
    model = _model(torch.float32, layers=2)
    prepare_transformer(model, spec)
    assert all(type(b.attn1.processor) is SanaLinearAttnProcessor3_0 for b in model.transformer_blocks)
    assert not model.gradient_checkpointing  # keep_activations_blocks only acts with checkpointing on
    assert compiled == []


def test_compile_is_applied_per_block_where_available(tmp_path, tiny_model, monkeypatch):
    compiled = []
    monkeypatch.setattr(speed_mod, "compile_available", lambda transformer: (True, ""))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model = _model(torch.float32, layers=2)
    prepare_transformer(model, _spec(tmp_path, tiny_model))
    assert compiled == list(model.transformer_blocks)
    compiled.clear()
    spec = _spec(tmp_path, tiny_model, memory={"group_offload": {"enabled": True}})
    prepare_transformer(_model(torch.float32, layers=2), spec)
    assert compiled == []  # group offload hooks move weights inside the blocks: no compile
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.triton, "mix_order_reduction", True, raising=False)
    for mixed_precision in ("no", "bf16"):  # bf16 without autocast too, now that the miscompile is avoided
        spec = _spec(tmp_path, tiny_model, model={"base_model_precision": "bf16"}, train={"mixed_precision": mixed_precision})
        model = _model(torch.float32, layers=2)
        prepare_transformer(model, spec)
        assert compiled[-2:] == list(model.transformer_blocks)
    assert inductor_config.triton.mix_order_reduction is False  # pytorch#193061: wrong modulation gradients


def test_tune_reductions_sets_inductor_multi_kernel_for_every_compile_path(tmp_path, tiny_model, monkeypatch):
    import torch._inductor.config as inductor_config

    from job.train.offload import apply_group_offload

    monkeypatch.setattr(speed_mod, "compile_available", lambda transformer: (True, ""))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: None)
    # (config.patch, not monkeypatch: monkeypatch's undo deletes an attribute it did not find, hiding the option)
    with inductor_config.patch({"triton.multi_kernel": 0}):
        prepare_transformer(_model(torch.float32, layers=2), _spec(tmp_path, tiny_model))
        assert inductor_config.triton.multi_kernel == 1  # the default: each reduction persistent or looped, the faster
        prepare_transformer(_model(torch.float32, layers=2), _spec(tmp_path, tiny_model, speed={"tune_reductions": False}))
        assert inductor_config.triton.multi_kernel == 0  # off means off, whatever an earlier job of the process set
        speed_mod.apply_inference_speedups(_model(torch.float32, layers=1).eval(), SpeedSpec())
        assert inductor_config.triton.multi_kernel == 1  # the validation render's compile follows the same spec
        monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
        offload = apply_group_offload(_model(torch.float32, layers=1),
                                      SimpleNamespace(type="block_level", blocks_per_group=1, use_stream=False), "cpu")
        assert offload.compile_blocks(reductions_tuned=False) > 0  # group offload's own compile of the blocks
        assert inductor_config.triton.multi_kernel == 0


def test_activation_memory_budget_reaches_the_compiler_config(tmp_path, tiny_model, monkeypatch):
    import torch._functorch.config as functorch_config

    monkeypatch.setattr(speed_mod, "compile_available", lambda transformer: (True, ""))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: None)
    spec = _spec(tmp_path, tiny_model, speed={"keep_activations_blocks": 2, "activation_memory_budget": 0.3})
    # (config.patch, not monkeypatch: monkeypatch's undo deletes the attribute, which hides the option for good)
    with functorch_config.patch(activation_memory_budget=1.0):
        prepare_transformer(_model(torch.float32, layers=2), spec)
        assert functorch_config.activation_memory_budget == 0.3
        prepare_transformer(_model(torch.float32, layers=2), _spec(tmp_path, tiny_model))  # the default puts 1.0 back
        assert functorch_config.activation_memory_budget == 1.0
    with pytest.raises(Exception, match="activation_memory_budget"):
        _spec(tmp_path, tiny_model, speed={"activation_memory_budget": 1.5})


def test_validation_pipeline_gets_the_speedups(tiny_model):
    from job.models.sanavideo.loading import load_components
    from job.models.sanavideo.validation import build_pipeline

    parts = load_components(tiny_model, dtype=torch.float32, parts={"transformer", "vae", "scheduler"})
    pipe = build_pipeline(parts)
    assert all(type(b.attn1.processor) is SanaLinearAttnProcessor3_0 for b in pipe.transformer.transformer_blocks)
    pipe = build_pipeline(parts, speed=SpeedSpec())
    assert all(isinstance(b.attn1.processor, speed_mod.FusedLinearAttnProcessor) for b in pipe.transformer.transformer_blocks)
    training = _model(torch.float32, layers=1).train()  # the transformer being trained: validation leaves it alone
    assert speed_mod.apply_inference_speedups(training, SpeedSpec()) == []
    assert type(training.transformer_blocks[0].attn1.processor) is SanaLinearAttnProcessor3_0
    off = SimpleNamespace(linear_attention="diffusers", compile_blocks=False)
    model = _model(torch.float32, layers=1).eval()
    assert speed_mod.apply_inference_speedups(model, off) == []
    assert type(model.transformer_blocks[0].attn1.processor) is SanaLinearAttnProcessor3_0


def test_speed_spec_rejects_a_negative_block_count():
    with pytest.raises(ValueError):
        SpeedSpec(keep_activations_blocks=-1)


# --------------------------------------------------------------------------- channels-last feed-forward

_glumb = build_tiny_feedforward  # float64, random parameters


def _ff_grads(forward, ff, x, grad_out):
    x = x.clone().requires_grad_(True)
    ff.zero_grad(set_to_none=True)
    out = forward(x)
    out.backward(grad_out)
    return out.detach(), {"input": x.grad, **{n: p.grad.clone() for n, p in ff.named_parameters()}}


@pytest.mark.parametrize("frames", [1, 4])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("depthwise,temporal", [("conv", "one"), ("conv", "three"), ("shifted", "one"), ("shifted", "three")])
def test_fused_feedforward_matches_diffusers_in_float64(depthwise, temporal, residual, frames):
    ff = _glumb(residual)
    g = torch.Generator().manual_seed(frames)
    x = torch.randn(2, frames, 3, 5, 12, generator=g, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ref_out, ref_grads = _ff_grads(ff, ff, x, grad_out)
    out, grads = _ff_grads(lambda t: speed_mod.glumb_forward_channels_last(ff, t, depthwise, temporal), ff, x, grad_out)
    assert out.shape == ref_out.shape and _rel(out, ref_out) < 1e-10
    assert grads.keys() == ref_grads.keys() and len(grads) == 7  # input + 4 weights + 2 biases
    for name in ref_grads:
        assert _rel(grads[name], ref_grads[name]) < 1e-10, name


def _compile_blocks_aot_eager(model):
    """What `compile_blocks` does on CUDA, with the aot_eager backend: dynamo and autograd tracing as on
    the GPU (the fused feed-forward runs only under compile), no inductor code generation."""
    torch._dynamo.reset()
    for block in model.transformer_blocks:
        block.compile(backend="aot_eager")


def test_fused_feedforward_in_the_compiled_transformer_matches_and_keeps_the_state_dict(monkeypatch):
    plain = _model()
    fast = copy.deepcopy(plain)
    keys_before = list(fast.state_dict())
    assert speed_mod.use_fused_feedforward(fast) == (3, [])
    assert speed_mod.use_fused_feedforward(fast) == (0, [])  # idempotent
    calls = []
    real = speed_mod.glumb_forward_channels_last
    monkeypatch.setattr(speed_mod, "glumb_forward_channels_last", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, eager_grads = _loss_and_grads(fast)
    assert calls == []  # eagerly diffusers' forward runs (measured faster without compile)
    _compile_blocks_aot_eager(fast)
    loss_p, grads_p = _loss_and_grads(plain)
    loss_f, grads_f = _loss_and_grads(fast)
    assert len(calls) >= 1  # traced into the compiled blocks' graph
    assert abs(float(loss_f - loss_p)) <= 1e-10 * float(loss_p)
    assert grads_p.keys() == grads_f.keys() == eager_grads.keys()
    for name in grads_p:
        assert _rel(grads_f[name], grads_p[name]) < 1e-10, name
    state = fast.state_dict()
    assert list(state) == keys_before == list(plain.state_dict())
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    for block in fast.transformer_blocks:  # undo: back to diffusers' forward
        del block.ff.forward
        assert not speed_mod.feedforward_fused(block.ff)


def test_fused_feedforward_leaves_adapters_hooks_and_norms_alone(tiny_model):
    from diffusers.hooks import HookRegistry, ModelHook

    from job.train import lora as lora_mod

    model = _model(torch.float32, layers=3)
    lora_mod.add_lora(model, SimpleNamespace(rank=2, alpha=None, dropout=0.0, target_modules=["conv_inverted"]))
    assert type(model.transformer_blocks[0].ff.conv_inverted) is not torch.nn.Conv2d  # peft wrapped it
    patched, skipped = speed_mod.use_fused_feedforward(model)
    assert patched == 0 and len(skipped) == 3
    assert all("conv_inverted" in why and "not a plain nn.Conv2d" in why for why in skipped)
    assert not any(speed_mod.feedforward_fused(b.ff) for b in model.transformer_blocks)

    hooked = _model(torch.float32, layers=2)
    HookRegistry.check_if_exists_or_initialize(hooked.transformer_blocks[1].ff.conv_temp).register_hook(ModelHook(), "probe")
    assert speed_mod.use_fused_feedforward(hooked)[0] == 1
    assert not speed_mod.feedforward_fused(hooked.transformer_blocks[1].ff)

    assert "norm_type" in speed_mod.feedforward_unfusable(_glumb(norm_type="rms_norm"))


def test_a_conv_wrapped_after_patching_runs_its_wrapper():
    """An offload-style wrapper put on a conv after the patch (it swaps weights inside the conv's own
    forward) is honoured, also when compiled: diffusers' forward runs, which calls the conv."""
    ff = _glumb()
    x = torch.randn(1, 3, 2, 4, 12, dtype=torch.float64)
    ref = ff(x)
    ff.forward = speed_mod.types.MethodType(speed_mod._fused_forward, ff)
    calls = []
    conv = ff.conv_point
    conv.forward = lambda t: calls.append(1) or torch.nn.Conv2d.forward(conv, t)
    torch._dynamo.reset()
    assert _rel(torch.compile(ff, backend="aot_eager")(x), ref) < 1e-12 and calls


def test_fused_feedforward_with_block_level_offload_matches(tiny_model):
    """`block_level` group offload swaps a block's parameters in for the block's call (and compiles the
    blocks' own forwards, as training does on CUDA); the fused forward reads them at call time, so it
    computes with the onloaded copies and the gradients go back to the parameters."""
    from diffusers import SanaVideoTransformer3DModel

    from job.train.offload import apply_group_offload

    plain = SanaVideoTransformer3DModel.from_pretrained(tiny_model / "transformer").float().train()
    plain.enable_gradient_checkpointing()
    fast = copy.deepcopy(plain)
    assert speed_mod.use_fused_feedforward(fast)[0] == len(fast.transformer_blocks)
    offload = apply_group_offload(fast, SimpleNamespace(type="block_level", blocks_per_group=1, use_stream=True), "cpu")
    torch._dynamo.reset()
    offload.compile_blocks(backend="aot_eager")
    calls = []
    real = speed_mod.glumb_forward_channels_last
    speed_mod.glumb_forward_channels_last = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        loss_p, grads_p = _loss_and_grads(plain, torch.float32)
        loss_f, grads_f = _loss_and_grads(fast, torch.float32)
    finally:
        speed_mod.glumb_forward_channels_last = real
    assert calls
    assert abs(float(loss_f - loss_p)) <= 1e-5 * float(loss_p)
    assert grads_p.keys() == grads_f.keys()
    for name in grads_p:
        assert _rel(grads_f[name], grads_p[name]) < 1e-4, name


def test_feedforward_switch_in_training_and_validation(tmp_path, tiny_model, caplog):
    model = _model(torch.float32, layers=2)
    prepare_transformer(model, _spec(tmp_path, tiny_model))  # the default: fused
    assert all(speed_mod.feedforward_fused(b.ff) for b in model.transformer_blocks)
    model = _model(torch.float32, layers=2)
    prepare_transformer(model, _spec(tmp_path, tiny_model, speed={"feedforward": "diffusers"}))
    assert not any("forward" in b.ff.__dict__ for b in model.transformer_blocks)
    model = _model(torch.float32, layers=2)
    spec = _spec(tmp_path, tiny_model, memory={"gradient_checkpointing": True,
                                               "group_offload": {"enabled": True, "type": "leaf_level"}})
    prepare_transformer(model, spec)
    assert not any(speed_mod.feedforward_fused(b.ff) for b in model.transformer_blocks)
    assert "leaf_level" in caplog.text
    model = _model(torch.float32, layers=1).eval()
    assert speed_mod.apply_inference_speedups(model, SimpleNamespace(linear_attention="diffusers", compile_blocks=False,
                                                                     feedforward="diffusers")) == []
    assert not speed_mod.feedforward_fused(model.transformer_blocks[0].ff)
    applied = speed_mod.apply_inference_speedups(model, SpeedSpec(compile_blocks=False, linear_attention="diffusers"))
    assert [a for a in applied if a.startswith("channels-last feed-forward (1 blocks")]
    assert speed_mod.feedforward_fused(model.transformer_blocks[0].ff)


def test_feedforward_backward_switch_reaches_the_modules(tmp_path, tiny_model):
    """`speed.feedforward_backward` (default auto) is set on every fused feed-forward; validation never asks for it."""
    assert SpeedSpec().feedforward_backward == "auto"
    for choice in ("auto", "triton", "compiled"):
        model = _model(torch.float32, layers=2)
        prepare_transformer(model, _spec(tmp_path, tiny_model, speed={"feedforward_backward": choice}))
        assert [getattr(b.ff, speed_mod.FF_BACKWARD_ATTR) for b in model.transformer_blocks] == [choice] * 2
    model = _model(torch.float32, layers=1).eval()
    speed_mod.apply_inference_speedups(model, SpeedSpec(compile_blocks=False))
    assert getattr(model.transformer_blocks[0].ff, speed_mod.FF_BACKWARD_ATTR) == "compiled"


def test_depthwise_conv_with_the_rotated_input_gradient_under_autocast_with_float32_weights():
    """fp32 master weights under bf16 autocast: the forward conv runs in bf16 (autocast casts the weight), so the
    rotated-kernel backward must too; gradients in their inputs' dtypes, within bf16 tolerance of autograd."""
    g = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    u = torch.randn(2, 5, 7, 6, generator=g).to(torch.bfloat16).requires_grad_(True)
    grad_out = torch.randn(2, 5, 7, 6, generator=g).to(torch.bfloat16)
    results = []
    for how in ("cudnn", "rotated"):
        conv.zero_grad(set_to_none=True)
        u.grad = None
        with pytest.MonkeyPatch.context() as m, torch.autocast("cpu", dtype=torch.bfloat16):
            m.setattr(speed_mod, "DEPTHWISE_INPUT_GRAD", how)
            out = speed_mod._depthwise3x3_conv(u, conv)
        out.backward(grad_out)
        results.append([out.detach(), u.grad, conv.weight.grad, conv.bias.grad])
    assert [t.dtype for t in results[1]] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for plain, rotated in zip(*results):
        assert _rel(rotated.double(), plain.double()) < 2e-2


@pytest.mark.parametrize("trainable", [True, False])
def test_depthwise_conv_with_the_rotated_input_gradient_matches_autograd_in_float64(trainable):
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6).double().requires_grad_(trainable)
    u = torch.randn(2, 5, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)  # (N, H, W, C)
    grad_out = torch.randn(2, 5, 7, 6, generator=g, dtype=torch.float64)
    results = []
    for how in ("cudnn", "rotated"):
        conv.zero_grad(set_to_none=True)
        u.grad = None
        with pytest.MonkeyPatch.context() as m:
            m.setattr(speed_mod, "DEPTHWISE_INPUT_GRAD", how)
            calls = []
            real = speed_mod.DepthwiseConv3x3.apply
            m.setattr(speed_mod.DepthwiseConv3x3, "apply", lambda *a: calls.append(1) or real(*a))
            out = speed_mod._depthwise3x3_conv(u, conv)
        assert len(calls) == (how == "rotated")
        out.backward(grad_out)
        results.append([out.detach(), u.grad] + ([conv.weight.grad, conv.bias.grad] if trainable else []))
        assert trainable or conv.weight.grad is None
    for plain, rotated in zip(*results):
        assert _rel(rotated, plain) < 1e-12
