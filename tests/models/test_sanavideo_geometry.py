"""Geometry numbers for the real 2B config (read from the class signatures: nothing big is built)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKLWan, SanaVideoTransformer3DModel

from job.models.sanavideo import geometry
from job.models.sanavideo.geometry import SANA_VIDEO_2B, Geometry, latent_shape, tokens_per_sample


def _defaults(cls) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


TRANSFORMER_2B = _defaults(SanaVideoTransformer3DModel)
VAE_2B = _defaults(AutoencoderKLWan)


def test_constants_match_diffusers_defaults():
    assert tuple(TRANSFORMER_2B["patch_size"]) == geometry.PATCH_SIZE
    assert TRANSFORMER_2B["in_channels"] == VAE_2B["z_dim"] == geometry.LATENT_CHANNELS
    assert VAE_2B["scale_factor_temporal"] == geometry.VAE_TEMPORAL_COMPRESSION
    assert VAE_2B["scale_factor_spatial"] == geometry.VAE_SPATIAL_COMPRESSION
    assert Geometry.from_configs(VAE_2B, TRANSFORMER_2B) == SANA_VIDEO_2B


def test_2b_numbers():
    assert latent_shape(81, 480, 832, VAE_2B, TRANSFORMER_2B) == (16, 21, 60, 104)
    assert tokens_per_sample(81, 480, 832, VAE_2B, TRANSFORMER_2B) == 32_760
    assert tokens_per_sample(81, 480, 832) == 32_760  # defaults are the 2B model
    assert geometry.spatial_multiple(VAE_2B, TRANSFORMER_2B) == 16
    assert geometry.latent_frames(81) == 21 and SANA_VIDEO_2B.pixel_frames(21) == 81
    assert SANA_VIDEO_2B.latent_numel(81, 480, 832) == 16 * 21 * 60 * 104


def test_compression_derived_from_architecture_when_not_stated():
    derived = Geometry.from_configs({"temperal_downsample": [False, True, True], "dim_mult": [1, 2, 4, 4]})
    assert (derived.temporal_compression, derived.spatial_compression) == (4, 8)


def test_frame_rule():
    assert [f for f in range(1, 22) if geometry.is_valid_frame_count(f)] == [1, 5, 9, 13, 17, 21]
    assert SANA_VIDEO_2B.round_frames_down(80) == 77
    with pytest.raises(ValueError, match="4k\\+1"):
        geometry.latent_frames(80)


def test_spatial_rule():
    with pytest.raises(ValueError, match="multiple of 16"):
        latent_shape(81, 488, 832)
    assert SANA_VIDEO_2B.problems(81, 480, 848) == []  # trainable
    problems = SANA_VIDEO_2B.problems(81, 480, 848, for_pipeline=True)  # but the pipeline refuses 848
    assert len(problems) == 1 and "width 848" in problems[0] and "32" in problems[0]
    assert len(SANA_VIDEO_2B.problems(80, 470, 832)) == 2


def test_configs_as_models_and_objects(tiny_components):
    g = Geometry.from_configs(tiny_components.vae, tiny_components.transformer)
    assert g == Geometry(4, 8, 4, (1, 2, 2))
    assert tokens_per_sample(9, 32, 64, tiny_components.vae.config, tiny_components.transformer.config) == 3 * 2 * 4


def test_matches_pipeline_prepare_latents(tiny_pipeline):
    shape = latent_shape(17, 64, 96, tiny_pipeline.vae.config, tiny_pipeline.transformer.config)
    latents = tiny_pipeline.prepare_latents(1, shape[0], 64, 96, 17, torch.float32, "cpu", None)
    assert tuple(latents.shape) == (1, *shape)


def test_import_is_light():
    code = "import sys, job.models.sanavideo.geometry; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
