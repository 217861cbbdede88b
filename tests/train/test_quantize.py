"""Quantised base (`job.train.quantize`, torchao): int8 / fp8 LoRA bases train on the CPU, fp8 full
fine-tune converts the block linears and stays close to bf16, and a missing torchao is a clear
environment problem. Speed and memory on a GPU: bench/offload_quant.py (bench/RESULTS.md)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from job.errors import EnvironmentProblem
from job.train import run_train
from job.train.model import prepare_transformer
from job.train.quantize import quantize_base
from train_helpers import make_job, make_spec, spec_dict

pytest.importorskip("torchao")

LORA = {"type": "lora", "prompt": {"max_sequence_length": 8}, "lora": {"rank": 4, "target_modules": ["to_q", "to_k", "to_v"]}}


def _losses(ws) -> list[float]:
    return [json.loads(line)["loss"] for line in (ws.logs_dir / "metrics.jsonl").read_text().splitlines()]


def _lora_run(tmp_path, tiny_model, precision):
    spec, ws = make_job(tmp_path / precision, tiny_model, model={**LORA, "pretrained_model_name_or_path": str(tiny_model),
                                                                 "base_model_precision": precision},
                        train={"max_train_steps": 4, "optimizer": "adamw", "learning_rate": 1e-3})
    assert run_train(spec, ws).status == "completed"
    return _losses(ws), ws


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantised_base_lora_trains_close_to_bf16(tmp_path, tiny_model, precision):
    ref, _ = _lora_run(tmp_path, tiny_model, "bf16")
    losses, ws = _lora_run(tmp_path, tiny_model, precision)
    assert all(abs(a - b) <= 0.05 * abs(b) + 1e-3 for a, b in zip(losses, ref)), (losses, ref)
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


def _fp8_model():
    """A tiny transformer whose block linears have sizes divisible by 16 (float8 matmuls need that)."""
    from diffusers import SanaVideoTransformer3DModel

    from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    config = {**TINY_TRANSFORMER_CONFIG, "attention_head_dim": 16, "cross_attention_head_dim": 16, "cross_attention_dim": 32}
    return SanaVideoTransformer3DModel(**config).to(torch.bfloat16)


def test_fp8_full_fine_tune_converts_block_linears_and_tracks_bf16(tiny_model):
    import copy

    spec = make_spec(spec_dict(tiny_model.parent / "unused", tiny_model,
                               model={"pretrained_model_name_or_path": str(tiny_model), "base_model_precision": "fp8"},
                               train={"optimizer": "adamw_bf16", "max_train_steps": 2}))
    reference = _fp8_model()
    model = copy.deepcopy(reference)
    reference.requires_grad_(True)
    prepare_transformer(model, spec)
    converted = [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert converted and all(n.startswith("transformer_blocks.") for n in converted)
    assert set(model.state_dict()) == set(reference.state_dict())  # checkpoints keep the diffusers layout

    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g, dtype=torch.bfloat16),
                  encoder_attention_mask=torch.ones(1, 8, dtype=torch.int64), timestep=torch.tensor([500.0]))
    outs = []
    for m in (reference, model):
        out = m(**inputs, return_dict=False)[0].float()
        out.square().mean().backward()
        outs.append(out.detach())
    rel = (outs[1] - outs[0]).norm() / outs[0].norm()
    assert 0 < rel < 0.1, rel  # float8 rounding: close, not equal
    name = converted[0] + ".weight"
    g_ref, g_fp8 = dict(reference.named_parameters())[name].grad.float(), dict(model.named_parameters())[name].grad.float()
    assert torch.nn.functional.cosine_similarity(g_ref.flatten(), g_fp8.flatten(), dim=0) > 0.9


def test_fp8_full_fine_tune_of_a_model_without_fp8_sized_layers_runs_in_bf16(tmp_path, tiny_model, caplog):
    spec, ws = make_job(tmp_path, tiny_model, model={"pretrained_model_name_or_path": str(tiny_model),
                                                     "base_model_precision": "fp8", "prompt": {"max_sequence_length": 8}},
                        train={"max_train_steps": 2, "optimizer": "adamw_bf16"})
    assert run_train(spec, ws).status == "completed"
    assert "all stay bf16" in caplog.text


def test_missing_torchao_is_an_environment_problem(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    spec = make_spec(spec_dict(tiny_model.parent / "unused", tiny_model,
                               model={**LORA, "pretrained_model_name_or_path": str(tiny_model), "base_model_precision": "int8"}))
    with pytest.raises(EnvironmentProblem, match="torchao"):
        quantize_base(torch.nn.Linear(2, 2), spec)


def test_int8_full_fine_tune_is_refused_by_the_spec(tmp_path, tiny_model):
    from job.errors import SpecError

    with pytest.raises(SpecError, match="int8 quantises the frozen base"):
        make_spec(spec_dict(tmp_path, tiny_model, model={"pretrained_model_name_or_path": str(tiny_model),
                                                         "base_model_precision": "int8"}))


def test_fp8_on_a_gpu_older_than_sm89_is_an_environment_problem(tiny_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    spec = make_spec(spec_dict(tiny_model.parent / "unused", tiny_model,
                               model={"pretrained_model_name_or_path": str(tiny_model), "base_model_precision": "fp8"},
                               train={"optimizer": "adamw_bf16", "max_train_steps": 2}))
    with pytest.raises(EnvironmentProblem, match="sm89.*A100 is sm80"):
        quantize_base(torch.nn.Linear(16, 16), spec)
