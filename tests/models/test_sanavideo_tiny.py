"""The tiny model builder: complete layout, fast, deterministic, loadable by stock diffusers."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from diffusers import SanaVideoPipeline
from safetensors.torch import load_file

from job.models.sanavideo.tiny import TINY_VAE_CONFIG, build_tiny_model, build_tiny_tokenizer


def test_layout_and_classes(tiny_model_path):
    index = json.loads((tiny_model_path / "model_index.json").read_text())
    assert index["_class_name"] == "SanaVideoPipeline"
    assert index["transformer"] == ["diffusers", "SanaVideoTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "Gemma2Model"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    for part in ("transformer", "vae", "text_encoder"):
        assert (tiny_model_path / part / "config.json").is_file()
    assert (tiny_model_path / "tokenizer" / "tokenizer.json").is_file()
    sched = json.loads((tiny_model_path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["flow_shift"] == 8.0 and sched["use_flow_sigmas"] and sched["prediction_type"] == "flow_prediction"


def test_build_is_fast_and_deterministic(tmp_path):
    build_tiny_model(tmp_path / "warm")  # imports are warm after this
    start = time.perf_counter()
    a = build_tiny_model(tmp_path / "a", seed=3)
    assert time.perf_counter() - start < 5.0
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    for part, name in (("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        wa, wb, wc = (load_file(p / part / name) for p in (a, b, c))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_build_leaves_global_rng_alone(tmp_path):
    state = torch.get_rng_state()
    build_tiny_model(tmp_path / "m")
    assert torch.equal(state, torch.get_rng_state())


def test_stock_pipeline_renders_tiny_video(tiny_pipeline):
    start = time.perf_counter()
    out = tiny_pipeline(
        prompt="A cat sleeping",
        negative_prompt="",
        num_inference_steps=2,
        height=32,
        width=64,
        frames=9,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        use_resolution_binning=False,
    ).frames
    assert time.perf_counter() - start < 10
    assert out.shape == (1, 9, 32, 64, 3)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_tokenizer_is_gemma_like():
    tok = build_tiny_tokenizer()
    assert tok.padding_side == "right"
    ids = tok("a cat sleeping").input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[1:] == ["a", "▁cat", "▁sleeping"]
    text = "Ünïcode 猫 motion score: 30."
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text  # byte fallback, no <unk>
    padded = tok(["a", "a cat"], padding="max_length", max_length=6).attention_mask
    assert padded == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]


def test_vae_stats_match_z_dim(tiny_model_path):
    vae = json.loads((tiny_model_path / "vae" / "config.json").read_text())
    assert vae["z_dim"] == len(vae["latents_mean"]) == len(vae["latents_std"]) == TINY_VAE_CONFIG["z_dim"]
    transformer = json.loads((tiny_model_path / "transformer" / "config.json").read_text())
    assert transformer["in_channels"] == vae["z_dim"]
    assert tuple(transformer["patch_size"]) == (1, 2, 2)


def test_reloaded_pipeline_has_gemma_tokenizer(tiny_pipeline):
    assert type(tiny_pipeline.tokenizer).__name__ in ("GemmaTokenizer", "GemmaTokenizerFast")
    assert isinstance(tiny_pipeline, SanaVideoPipeline)
