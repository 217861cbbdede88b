"""torchao in training (`job.train.quantize`): int8 / fp8 LoRA bases (`model.base_model_precision`)
train on the CPU; float8 matrix products (`train.mixed_precision: fp8`) convert the block linears
(LoRA: the frozen base only), route the fused feed-forward's three GEMMs through torchao's float8
product and stay close to bf16; a missing torchao or an old GPU is a clear environment problem.
Speed and memory on a GPU: bench/offload_quant.py and bench/train_step.py (bench/RESULTS.md)."""

from __future__ import annotations

import copy
import json
import shutil
import sys

import pytest
import torch

from job.errors import EnvironmentProblem
from job.models.sanavideo import speed
from job.train import run_train
from job.train.model import prepare_transformer
from job.train.quantize import Float8Product, enable_fp8_matmuls, quantize_base
from train_helpers import make_job, make_spec, spec_dict

pytest.importorskip("torchao")

LORA = {"type": "lora", "prompt": {"max_sequence_length": 8}, "lora": {"rank": 4, "target_modules": ["to_q", "to_k", "to_v"]}}
# rank 16: the adapters' sizes are multiples of 16, so only the trainability filter keeps them out of float8
LORA16 = {**LORA, "lora": {"rank": 16, "target_modules": ["to_q", "to_k", "to_v"]}}
FP8 = {"mixed_precision": "fp8", "optimizer": "adamw_bf16", "max_train_steps": 2}


def _losses(ws) -> list[float]:
    return [json.loads(line)["loss"] for line in (ws.logs_dir / "metrics.jsonl").read_text().splitlines()]


def _close(losses, ref, rel=0.05) -> bool:
    return len(losses) == len(ref) and all(abs(a - b) <= rel * abs(b) + 1e-3 for a, b in zip(losses, ref))


def _lora_run(tmp_path, model_path, precision, mixed="no", lora=LORA):
    spec, ws = make_job(tmp_path / f"{precision}-{mixed}", model_path,
                        model={**lora, "pretrained_model_name_or_path": str(model_path), "base_model_precision": precision},
                        train={"max_train_steps": 4, "optimizer": "adamw", "learning_rate": 1e-3, "mixed_precision": mixed})
    assert run_train(spec, ws).status == "completed"
    return _losses(ws), ws


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantised_base_lora_trains_close_to_bf16(tmp_path, tiny_model, precision):
    ref, _ = _lora_run(tmp_path, tiny_model, "bf16")
    losses, ws = _lora_run(tmp_path, tiny_model, precision)
    assert _close(losses, ref), (losses, ref)
    assert (ws.final_dir / "pytorch_lora_weights.safetensors").is_file()


def test_lora_quantises_the_frozen_linears_only(tiny_model):
    from diffusers import SanaVideoTransformer3DModel

    spec = make_spec(spec_dict(tiny_model.parent / "unused", tiny_model,
                               model={**LORA, "pretrained_model_name_or_path": str(tiny_model), "base_model_precision": "int8"}))
    model = SanaVideoTransformer3DModel.from_pretrained(tiny_model / "transformer", torch_dtype=torch.bfloat16)
    params = prepare_transformer(model, spec)
    assert params and all(p.dtype == torch.float32 for p in params)  # the adapters train in fp32
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    frozen = [m for m in linears.values() if not m.weight.requires_grad]
    assert frozen and all(type(m.weight).__name__ == "Int8Tensor" or "Quantized" in type(m.weight).__name__
                          or m.weight.dtype == torch.int8 for m in frozen), {type(m.weight).__name__ for m in frozen}
    assert all(type(m.weight) is torch.nn.Parameter for n, m in linears.items() if "lora_" in n)
    # mixed_precision is not fp8: no float8 products anywhere
    assert not any(hasattr(block.ff, speed.FF_MATMUL_ATTR) for block in model.transformer_blocks)


def _fp8_model(dim_per_head: int = 16):
    """A tiny transformer whose block linears and feed-forward products have sizes divisible by 16
    (float8 matmuls need that); `dim_per_head=12` gives the tiny model's sizes, which are not."""
    from diffusers import SanaVideoTransformer3DModel

    from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    config = {**TINY_TRANSFORMER_CONFIG, "attention_head_dim": dim_per_head, "cross_attention_head_dim": dim_per_head,
              "cross_attention_dim": 2 * dim_per_head}
    return SanaVideoTransformer3DModel(**config).to(torch.bfloat16)


@pytest.fixture(scope="module")
def fp8_model_dir(tiny_model, tmp_path_factory):
    """The tiny model folder with `_fp8_model()` as its transformer (same latent and caption sizes)."""
    folder = tmp_path_factory.mktemp("fp8-sanavideo") / "model"
    shutil.copytree(tiny_model, folder)
    shutil.rmtree(folder / "transformer")
    _fp8_model().save_pretrained(folder / "transformer", safe_serialization=True)
    return folder


def _fp8_spec(model_path, **model):
    return make_spec(spec_dict(model_path.parent / "unused", model_path,
                               model={"pretrained_model_name_or_path": str(model_path), "base_model_precision": "bf16", **model},
                               train=FP8))


def _block_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g, dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g, dtype=torch.bfloat16),
                encoder_attention_mask=torch.ones(1, 8, dtype=torch.int64), timestep=torch.tensor([500.0]))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("weight_gradient", [True, False])  # speed.fp8_weight_gradient: job/train/float8_matmul.py, torchao
def test_fp8_full_fine_tune_converts_block_linears_and_tracks_bf16(tiny_model, weight_gradient):
    spec = _fp8_spec(tiny_model)
    spec.speed.fp8_weight_gradient = weight_gradient
    reference = _fp8_model()
    model = copy.deepcopy(reference)
    reference.requires_grad_(True)
    prepare_transformer(model, spec)
    kind = "Float8TrainedLinear" if weight_gradient else "Float8Linear"
    converted = [n for n, m in model.named_modules() if type(m).__name__ == kind]
    assert converted and all(n.startswith("transformer_blocks.") for n in converted)
    plain_in_blocks = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.startswith("transformer_blocks.")]
    assert not plain_in_blocks, plain_in_blocks  # every block linear of this model has float8-sized dims
    assert set(model.state_dict()) == set(reference.state_dict())  # checkpoints keep the diffusers layout
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in model.parameters())  # bf16 weights, all trained
    ffs = [block.ff for block in model.transformer_blocks]
    assert all(isinstance(getattr(ff, speed.FF_MATMUL_ATTR, None), Float8Product) for ff in ffs)

    outs = []
    for m in (reference, model):
        out = m(**_block_inputs(), return_dict=False)[0].float()
        out.square().mean().backward()
        outs.append(out.detach())
    assert 0 < _rel(outs[1], outs[0]) < 0.1, _rel(outs[1], outs[0])  # float8 rounding: close, not equal
    name = converted[0] + ".weight"
    g_ref, g_fp8 = dict(reference.named_parameters())[name].grad, dict(model.named_parameters())[name].grad
    assert _cosine(g_fp8, g_ref) > 0.9


class _CountingMatmul:
    """Stands in for torchao's float8 autograd function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def apply(self, *args):
        self.calls += 1
        return self.fn.apply(*args)


def _ff_forward_and_input_grad(ff, x):
    x = x.detach().clone().requires_grad_(True)
    out = speed.glumb_forward_channels_last(ff, x)
    out.float().square().mean().backward()
    return out.detach(), x.grad


def _first_feedforward_counted(model, monkeypatch):
    """The first block's feed-forward, with a counter on the torchao product its `Float8Product` calls."""
    ff = model.transformer_blocks[0].ff
    product = getattr(ff, speed.FF_MATMUL_ATTR)
    counter = _CountingMatmul(product._matmul)
    monkeypatch.setattr(product, "_matmul", counter)
    return ff, counter


def test_fp8_feedforward_products_go_through_torchao_and_track_bf16(tiny_model, monkeypatch):
    spec = _fp8_spec(tiny_model)
    spec.speed.fp8_weight_gradient = False  # torchao's products (the float8 weight gradient's: test_float8_matmul.py)
    model = _fp8_model()
    enable_fp8_matmuls(model, spec)
    ff, counter = _first_feedforward_counted(model, monkeypatch)
    x = torch.randn(1, 2, 4, 4, 32, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)

    out8, grad8 = _ff_forward_and_input_grad(ff, x)
    assert counter.calls == 3  # conv_inverted, conv_point and the temporal taps
    monkeypatch.delattr(ff, speed.FF_MATMUL_ATTR)
    out, grad = _ff_forward_and_input_grad(ff, x)
    assert counter.calls == 3
    assert torch.allclose(out.float(), type(ff).forward(ff, x).float(), rtol=2e-2, atol=2e-2)  # the bf16 fused path is diffusers'
    # three chained e4m3 products (~3.6 % rms rounding each, measured 6 % here): close, not equal
    assert 0 < _rel(out8, out) < 0.12, _rel(out8, out)
    assert 0 < _rel(grad8, grad) < 0.15 and _cosine(grad8, grad) > 0.99, (_rel(grad8, grad), _cosine(grad8, grad))


@pytest.mark.parametrize("fast", [True, False])
def test_fp8_fast_accumulation_switch_reaches_every_float8_product(tiny_model, fast):
    """`speed.fp8_fast_accumulation` sets the input-gradient products' accumulation of the converted linears and of
    the feed-forward's products; the forward products use fast accumulation and the weight gradient stays bf16 either way."""
    from torchao.float8.float8_linear import Float8Linear

    spec = _fp8_spec(tiny_model)
    spec.speed.fp8_fast_accumulation = fast
    spec.speed.fp8_weight_gradient = False  # torchao's products; float8_matmul's: test_float8_matmul.py
    model = _fp8_model()
    enable_fp8_matmuls(model, spec)
    linears = [m for m in model.modules() if isinstance(m, Float8Linear)]
    products = [getattr(b.ff, speed.FF_MATMUL_ATTR) for b in model.transformer_blocks]
    assert linears and products
    for mm_config in [m.linear_mm_config for m in linears] + [p.mm_config for p in products]:
        assert mm_config.grad_input.use_fast_accum is fast
        assert mm_config.output.use_fast_accum is True
    for config in [m.config for m in linears] + [p.config for p in products]:
        assert config.cast_config_input_for_grad_weight.scaling_type.name == "DISABLED"


@pytest.mark.parametrize("weight_gradient", [False, True])
@pytest.mark.parametrize("e4m3", [False, True])
def test_fp8_bench_settings_build_configs_whose_products_run(monkeypatch, weight_gradient, e4m3):
    """The bench-only switches (`FP8_WEIGHT_GRADIENT`, `FP8_GRADIENT_E4M3`) make configs torchao accepts (it
    asserts that both uses of the gradient share one dtype), and their products track bf16."""
    from job.train import quantize

    monkeypatch.setattr(quantize, "FP8_WEIGHT_GRADIENT", weight_gradient)
    monkeypatch.setattr(quantize, "FP8_GRADIENT_E4M3", e4m3)
    config = quantize._fp8_training_config()
    grad_dtype = torch.float8_e4m3fn if e4m3 else torch.float8_e5m2
    assert config.cast_config_grad_output.target_dtype == grad_dtype
    assert (config.cast_config_input_for_grad_weight.scaling_type.name == "DISABLED") is not weight_gradient
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(48, 32, generator=g) * 0.1).bfloat16().requires_grad_()
    grad_out = torch.randn(64, 48, generator=g, dtype=torch.bfloat16)
    Float8Product(config)(x, w).backward(grad_out)
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.nn.functional.linear(ref_x, ref_w).backward(grad_out)
    assert 0.01 < _rel(x.grad, ref_x.grad) < 0.15  # float8 input gradient
    # the weight gradient: float8 only with FP8_WEIGHT_GRADIENT, else the bf16 product of the same inputs
    assert (0.01 < _rel(w.grad, ref_w.grad) < 0.15) if weight_gradient else _rel(w.grad, ref_w.grad) < 1e-2


def test_fp8_feedforward_without_float8_sizes_falls_back_to_f_linear(tiny_model, monkeypatch, caplog):
    model = _fp8_model(dim_per_head=12)  # the tiny model's sizes: 24 channels, 144 = 2 x 72 hidden
    assert enable_fp8_matmuls(model, _fp8_spec(tiny_model)) == 0
    assert "they stay bf16" in caplog.text
    ff, counter = _first_feedforward_counted(model, monkeypatch)
    x = torch.randn(1, 2, 4, 4, 24, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    out8, grad8 = _ff_forward_and_input_grad(ff, x)
    monkeypatch.delattr(ff, speed.FF_MATMUL_ATTR)
    out, grad = _ff_forward_and_input_grad(ff, x)
    assert counter.calls == 0
    assert torch.equal(out8, out) and torch.equal(grad8, grad)


def test_fp8_lora_converts_the_frozen_base_and_keeps_the_adapters_fp32(tiny_model):
    spec = _fp8_spec(tiny_model, **LORA16)
    model = _fp8_model()
    params = prepare_transformer(model, spec)
    assert params and all(p.dtype == torch.float32 for p in params)
    modules = dict(model.named_modules())
    adapters = [n for n in modules if n.endswith(("lora_A.default", "lora_B.default"))]
    assert adapters and all(type(modules[n]) is torch.nn.Linear and modules[n].weight.dtype == torch.float32 for n in adapters)
    bases = [n for n in modules if n.endswith(".base_layer")]
    from torchao.float8.float8_linear import Float8Linear

    assert bases and all(isinstance(modules[n], Float8Linear) and not modules[n].weight.requires_grad for n in bases)
    assert all(isinstance(getattr(b.ff, speed.FF_MATMUL_ATTR, None), Float8Product) for b in model.transformer_blocks)

    out = model(**_block_inputs(), return_dict=False)[0]
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # lora_B starts at zero (so lora_A's gradient is zero at step 0); the gradient reaches it through the float8 base
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)


def test_fp8_lora_run_trains_close_to_bf16_with_bf16_autocast(tmp_path, fp8_model_dir, monkeypatch, caplog):
    import accelerate

    seen = []

    class RecordingAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("mixed_precision"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", RecordingAccelerator)
    ref, _ = _lora_run(tmp_path, fp8_model_dir, "bf16", mixed="bf16", lora=LORA16)
    losses, ws = _lora_run(tmp_path, fp8_model_dir, "bf16", mixed="fp8", lora=LORA16)
    assert seen == ["bf16", "bf16"]  # accelerate autocasts in bf16; the float8 products are torchao's
    assert "fp8 matmuls (torchao float8" in caplog.text and "the adapters stay float32" in caplog.text
    assert losses != ref and _close(losses, ref), (losses, ref)
    assert (ws.final_dir / "pytorch_lora_weights.safetensors").is_file()


def test_fp8_full_run_saves_diffusers_weights_and_resumes_exactly(tmp_path, fp8_model_dir, caplog):
    import os
    import signal

    from diffusers import SanaVideoTransformer3DModel

    from job.train import TrainHooks
    from train_helpers import trained_state

    def job(name):
        return make_job(tmp_path / name, fp8_model_dir, model={"pretrained_model_name_or_path": str(fp8_model_dir),
                                                               "base_model_precision": "bf16"},
                        train={**FP8, "max_train_steps": 4})

    ref_spec, ref_ws = job("ref")
    assert run_train(ref_spec, ref_ws).status == "completed"
    assert "fp8 matmuls (torchao float8" in caplog.text
    spec, ws = job("stopped")
    hooks = TrainHooks(on_step_end=[lambda info: os.kill(os.getpid(), signal.SIGTERM) if info.step == 2 else None])
    assert run_train(spec, ws, hooks).status == "stopped_early"
    again = run_train(spec, ws)  # resume loads the saved bf16 weights into the float8-converted model
    assert again.status == "completed" and again.step == 4
    ref, got = trained_state(ref_ws.final_dir), trained_state(ws.final_dir)
    initial = _fp8_model().state_dict()
    assert set(ref) == set(got) == set(initial)  # plain diffusers keys, no float8 wrappers
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    block_linears = [k for k in ref if k.startswith("transformer_blocks.") and k.endswith("to_q.weight")]
    assert block_linears and all(not torch.equal(ref[k], initial[k]) for k in block_linears)  # the float8 layers trained
    saved = SanaVideoTransformer3DModel.from_pretrained(ref_ws.final_dir / "transformer")
    assert not any(type(m).__name__ == "Float8Linear" for m in saved.modules())


def test_fp8_full_fine_tune_of_a_model_without_fp8_sized_layers_runs_in_bf16(tmp_path, tiny_model, caplog):
    spec, ws = make_job(tmp_path, tiny_model, model={"pretrained_model_name_or_path": str(tiny_model),
                                                     "base_model_precision": "bf16", "prompt": {"max_sequence_length": 8}},
                        train=FP8)
    assert run_train(spec, ws).status == "completed"
    assert "they stay bf16" in caplog.text


def test_missing_torchao_is_an_environment_problem(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    spec = make_spec(spec_dict(tiny_model.parent / "unused", tiny_model,
                               model={**LORA, "pretrained_model_name_or_path": str(tiny_model), "base_model_precision": "int8"}))
    with pytest.raises(EnvironmentProblem, match="model.base_model_precision.*torchao") as info:
        quantize_base(torch.nn.Linear(2, 2), spec)
    assert "base_model_precision: bf16" in info.value.fix


def test_missing_torchao_with_fp8_products_names_mixed_precision(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(EnvironmentProblem, match="train.mixed_precision 'fp8' needs torchao") as info:
        enable_fp8_matmuls(torch.nn.Linear(16, 16), _fp8_spec(tiny_model))
    assert "mixed_precision: bf16" in info.value.fix


def test_int8_full_fine_tune_is_refused_by_the_spec(tmp_path, tiny_model):
    from job.errors import SpecError

    with pytest.raises(SpecError, match="int8 quantises the frozen base"):
        make_spec(spec_dict(tmp_path, tiny_model, model={"pretrained_model_name_or_path": str(tiny_model),
                                                         "base_model_precision": "int8"}))


@pytest.fixture
def a100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")


def test_fp8_products_on_a_gpu_older_than_sm89_are_an_environment_problem(tiny_model, a100):
    model = _fp8_model()
    with pytest.raises(EnvironmentProblem, match="train.mixed_precision: fp8 needs an sm89.*A100 is sm80"):
        enable_fp8_matmuls(model, _fp8_spec(tiny_model))
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())  # refused before changing anything


def test_fp8_lora_base_on_a_gpu_older_than_sm89_is_an_environment_problem(tiny_model, a100):
    spec = make_spec(spec_dict(tiny_model.parent / "unused", tiny_model,
                               model={**LORA, "pretrained_model_name_or_path": str(tiny_model), "base_model_precision": "fp8"}))
    with pytest.raises(EnvironmentProblem, match="base_model_precision: fp8 needs an sm89.*A100 is sm80"):
        quantize_base(torch.nn.Linear(16, 16), spec)


def test_fp8_lora_job_renders_its_validation_videos_with_the_training_transformer(tmp_path, fp8_model_dir, caplog):
    """The train phase as `trainer train` runs it, from real caches: validation during training renders with the
    transformer whose products are float8 (in eval mode, without gradients), and training goes on after it."""
    from job.phases import train
    from job.workspace import Workspace
    from pipeline_helpers import cache, loaded, write_clips

    write_clips(tmp_path / "ws" / "clips")
    job_spec = loaded(tmp_path / "ws", fp8_model_dir, model={**LORA16, "base_model_precision": "bf16"},
                      train={"mixed_precision": "fp8", "max_train_steps": 3, "optimizer": "adamw_bf16"},
                      validation={"enabled": True, "step_interval": 2, "resolutions": ["64x64"], "num_video_frames": 5,
                                  "num_inference_steps": 2, "guidance": 1.0})
    spec, ws = job_spec.spec, Workspace.for_spec(job_spec.spec)
    cache(spec, ws)
    train(job_spec, ws)
    assert "fp8 matmuls (torchao float8, dynamic scaling): 16 linear layers" in caplog.text  # the renders go through them
    assert len(_losses(ws)) == 3  # all three steps trained, before and after the render of step 2
    assert sorted(p.parent.name for p in ws.validation_dir.glob("step_*/validation.mp4")) == ["step_000002", "step_000003"]
    assert (ws.final_dir / "pytorch_lora_weights.safetensors").is_file()
