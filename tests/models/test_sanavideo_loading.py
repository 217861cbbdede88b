"""load_components: parts as asked, and one clear InputError for each thing a user can get wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLWan

from job.errors import EXIT_BAD_INPUT, InputError
from job.models.sanavideo.loading import load_components
from job.models.sanavideo.tiny import TINY_VAE_CONFIG, build_tiny_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_every_part(tiny_components):
    c = tiny_components
    assert type(c.transformer).__name__ == "SanaVideoTransformer3DModel"
    assert type(c.vae).__name__ == "AutoencoderKLWan"
    assert type(c.text_encoder).__name__ == "Gemma2Model"
    assert type(c.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert c.tokenizer.padding_side == "right"
    assert not c.transformer.training and not c.vae.training and not c.text_encoder.training
    assert c.configs["vae"]["z_dim"] == 4


def test_default_parts_and_dtypes(tiny_model_path):
    c = load_components(tiny_model_path, dtype=torch.bfloat16)
    assert c.transformer.dtype == torch.bfloat16
    assert c.text_encoder.dtype == torch.bfloat16
    assert c.vae.dtype == torch.float32  # the VAE stays float32 unless asked
    assert c.tokenizer is not None and c.scheduler is not None  # they come with the text encoder / transformer


def test_only_requested_parts(tiny_model_path):
    c = load_components(tiny_model_path, dtype=torch.float32, parts={"vae"})
    assert c.vae is not None
    assert c.transformer is None and c.text_encoder is None and c.tokenizer is None and c.scheduler is None


def test_unknown_part_is_a_bug():
    with pytest.raises(ValueError):
        load_components("/nonexistent", parts={"unet"})


def test_missing_folder(tmp_path):
    with pytest.raises(InputError) as info:
        load_components(tmp_path / "nope")
    assert "does not exist" in str(info.value) and info.value.exit_code == EXIT_BAD_INPUT


def test_missing_parts_are_all_named(tiny_model_path, tmp_path):
    broken = _copy(tiny_model_path, tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder")
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(InputError) as info:
        load_components(broken, dtype=torch.float32)
    assert "text_encoder/" in info.value.message and "scheduler/" in info.value.message
    assert info.value.fix
    # parts that are not asked for may be missing
    assert load_components(broken, dtype=torch.float32, parts={"vae"}).vae is not None


def test_unreadable_weights(tiny_model_path, tmp_path):
    broken = _copy(tiny_model_path, tmp_path / "broken")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError) as info:
        load_components(broken, dtype=torch.float32, parts={"transformer"})
    assert "transformer" in info.value.message


def test_vae_path_of_same_model_family_loads(tiny_model_path, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=7)
    c = load_components(tiny_model_path, vae_path=other, dtype=torch.float32, parts={"vae"})
    base = load_components(tiny_model_path, dtype=torch.float32, parts={"vae"})
    assert c.vae_path == other
    w, w0 = c.vae.state_dict(), base.vae.state_dict()
    assert any(not torch.equal(w[k], w0[k]) for k in w)  # really the other VAE
    # a bare VAE folder (config.json at the top) works too
    c2 = load_components(tiny_model_path, vae_path=other / "vae", dtype=torch.float32, parts={"vae"})
    assert torch.equal(next(iter(c2.vae.state_dict().values())), next(iter(w.values())))


def test_vae_with_other_latent_channels_is_refused(tiny_model_path, tmp_path):
    config = dict(TINY_VAE_CONFIG, z_dim=8, latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
    AutoencoderKLWan(**config).save_pretrained(tmp_path / "vae8")
    with pytest.raises(InputError) as info:
        load_components(tiny_model_path, vae_path=tmp_path / "vae8", dtype=torch.float32)
    message = str(info.value)
    assert "8 latent channels" in message and "expects 4" in message
    assert "pretrained_vae_model_name_or_path" in message  # the fix names the spec field
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_vae_of_wrong_class_is_refused(tiny_model_path, tmp_path):
    fake = tmp_path / "dcae"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"_class_name": "AutoencoderDC", "latent_channels": 32}))
    with pytest.raises(InputError, match="AutoencoderDC"):
        load_components(tiny_model_path, vae_path=fake, dtype=torch.float32, parts={"vae"})


def test_vae_with_wrong_stats_is_refused(tiny_model_path, tmp_path):
    broken = _copy(tiny_model_path, tmp_path / "broken")
    config_path = broken / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["latents_std"] = config["latents_std"][:2]
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="latents_std"):
        load_components(broken, dtype=torch.float32, parts={"vae"})


def test_vae_with_other_compression_is_refused(tiny_model_path, tmp_path):
    config = dict(TINY_VAE_CONFIG, scale_factor_spatial=16)
    AutoencoderKLWan(**config).save_pretrained(tmp_path / "vae16")
    with pytest.raises(InputError, match="scale_factor_spatial"):
        load_components(tiny_model_path, vae_path=tmp_path / "vae16", dtype=torch.float32, parts={"vae"})


def test_missing_vae_path(tiny_model_path, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_components(tiny_model_path, vae_path=tmp_path / "nope", parts={"vae"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no VAE found"):
        load_components(tiny_model_path, vae_path=tmp_path / "empty", parts={"vae"})
