"""`speed.fused_kernels` reaches the fused linear-attention processors: validation's transformer
(`apply_inference_speedups`) and the training transformer (`prepare_transformer`), which validation during
training reuses. The kernels themselves: tests/models/test_attn_kernel.py."""

from __future__ import annotations

import torch

from job.models.sanavideo import speed as speed_mod
from job.spec.speed import SpeedSpec


def _model():
    from diffusers import SanaVideoTransformer3DModel

    from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return SanaVideoTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 2}).eval()


def test_switch_reaches_the_processors_for_validation_and_training(tmp_path, tiny_model):
    from job.train.model import prepare_transformer
    from train_helpers import make_spec, spec_dict

    def flags(m):
        return [b.attn1.processor.kernels for b in m.transformer_blocks]

    m = _model()
    speed_mod.apply_inference_speedups(m, SpeedSpec(compile_blocks=False))
    assert flags(m) == [True, True]
    speed_mod.apply_inference_speedups(m, SpeedSpec(compile_blocks=False, fused_kernels=False))  # re-applied: updated
    assert flags(m) == [False, False]
    m = _model().train()
    prepare_transformer(m, make_spec(spec_dict(tmp_path, tiny_model, speed={"fused_kernels": False})))
    assert flags(m) == [False, False]
    m = _model().train()
    prepare_transformer(m, make_spec(spec_dict(tmp_path, tiny_model)))
    assert flags(m) == [True, True]  # used by validation during training (no grad there), never by training steps
