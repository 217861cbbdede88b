"""Latent normalisation: exactly the inverse of what the pipeline does before decoding."""

from __future__ import annotations

import pytest
import torch

from job.models.sanavideo.geometry import latent_shape
from job.models.sanavideo.latents import decode_latents, denormalize_latents, encode_videos, normalize_latents


def _video(frames=9, height=32, width=48, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


def _capture_decode(pipe, **call):
    """Run the stock pipeline; return (final latents, the VAE decode input, the VAE decode output)."""
    seen = {}
    original = pipe.vae.decode

    def spy(z, *args, **kwargs):
        seen["input"] = z.clone()
        out = original(z, *args, **kwargs)
        seen["output"] = out[0].clone()
        return out

    def last_latents(_pipe, _step, _t, kwargs):
        seen["latents"] = kwargs["latents"].clone()
        return {}

    pipe.vae.decode = spy
    try:
        pipe(callback_on_step_end=last_latents, **call)
    finally:
        del pipe.vae.decode  # back to the class method
    return seen["latents"], seen["input"], seen["output"]


def test_denormalize_equals_pipeline_decode_input(tiny_pipeline):
    latents, decode_input, decode_output = _capture_decode(
        tiny_pipeline,
        prompt="a cat",
        num_inference_steps=2,
        height=32,
        width=64,
        frames=9,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
        use_resolution_binning=False,
    )
    vae = tiny_pipeline.vae
    assert torch.equal(denormalize_latents(latents.to(vae.dtype), vae.config), decode_input)
    assert torch.equal(decode_latents(vae, latents), decode_output)
    # the pipeline's latents have the shape geometry predicts
    assert latents.shape == (1, *latent_shape(9, 32, 64, vae.config, tiny_pipeline.transformer.config))


def test_round_trip(tiny_pipeline):
    vae = tiny_pipeline.vae
    raw = torch.randn(2, 4, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    normed = normalize_latents(raw, vae.config)
    torch.testing.assert_close(denormalize_latents(normed, vae.config), raw)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(normed, (raw - mean) / std)
    # works from a plain config dict too (latents already on disk, no VAE loaded)
    torch.testing.assert_close(normalize_latents(raw, dict(vae.config)), normed)


def test_encode_videos_shape_and_normalisation(tiny_pipeline):
    vae = tiny_pipeline.vae
    video = _video()
    latents = encode_videos(vae, video, sample=False)
    assert latents.shape == (1, *latent_shape(9, 32, 48, vae.config)) == (1, 4, 3, 4, 6)
    raw = vae.encode(video).latent_dist.mode()
    torch.testing.assert_close(latents, normalize_latents(raw, vae.config))
    assert not latents.requires_grad


def test_encode_sample_uses_generator(tiny_pipeline):
    vae = tiny_pipeline.vae
    video = _video()
    a = encode_videos(vae, video, sample=True, generator=torch.Generator().manual_seed(5))
    b = encode_videos(vae, video, sample=True, generator=torch.Generator().manual_seed(5))
    mode = encode_videos(vae, video, sample=False)
    assert torch.equal(a, b) and not torch.equal(a, mode)


@pytest.mark.parametrize("frames,height,width", [(1, 32, 32), (5, 32, 64), (13, 64, 32)])
def test_cached_latent_decodes_to_pipeline_shape(tiny_pipeline, frames, height, width):
    vae = tiny_pipeline.vae
    latents = encode_videos(vae, _video(frames, height, width), sample=False)
    assert latents.shape[2] == (frames - 1) // 4 + 1
    assert latents.shape[3:] == (height // 8, width // 8)
    video = decode_latents(vae, latents)
    assert video.shape == (1, 3, frames, height, width)
    rendered = tiny_pipeline(
        prompt="a cat",
        num_inference_steps=1,
        height=height,
        width=width,
        frames=frames,
        guidance_scale=1.0,
        output_type="pt",
        use_resolution_binning=False,
    ).frames
    assert rendered.shape == (1, frames, 3, height, width)  # the pipeline's pt layout is [B, F, C, H, W]


def test_bad_video_shapes(tiny_pipeline):
    with pytest.raises(ValueError, match="4k\\+1"):
        encode_videos(tiny_pipeline.vae, _video(frames=8), sample=False)
    with pytest.raises(ValueError, match="B, 3, F, H, W"):
        encode_videos(tiny_pipeline.vae, torch.zeros(1, 9, 3, 32, 32), sample=False)


def test_dropping_the_vae_encoder_keeps_decoding_and_refuses_to_encode(tiny_model_path):
    from diffusers import AutoencoderKLWan

    from job.models.sanavideo.loading import drop_vae_encoder

    vae = AutoencoderKLWan.from_pretrained(tiny_model_path, subfolder="vae")
    latents = encode_videos(vae, _video(frames=5, height=32, width=32), sample=False)
    before = decode_latents(vae, latents)
    total = sum(p.numel() for p in vae.parameters())
    freed = drop_vae_encoder(vae)
    assert 0 < freed < total and sum(p.numel() for p in vae.parameters()) == total - freed
    torch.testing.assert_close(decode_latents(vae, latents), before)
    with pytest.raises(Exception):
        encode_videos(vae, _video(frames=5, height=32, width=32), sample=False)
