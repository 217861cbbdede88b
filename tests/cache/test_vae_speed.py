"""`data.vae_channels_last` and `data.vae_compile`: the cache phase's VAE encoder speed-ups (issue #6)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from cache_helpers import job, make_workspace, spec_dict

from job.cache import format as fmt
from job.cache import vae_speed
from job.cache.phase import latent_sample_key, run_cache
from job.errors import SpecError


def _cache(spec, ws):
    return run_cache(spec, ws, device="cpu", num_workers=0, show=False)


def _latents(spec, ws) -> dict[str, torch.Tensor]:
    from job.data import plan_dataset

    folder = ws.latent_cache_dir(spec.data.datasets[0])
    return {latent_sample_key(s): fmt.read_sample(folder, latent_sample_key(s)).latents
            for s in plan_dataset(spec, ws, show=False).samples}


def test_the_switches_default_to_channels_last_and_auto_compile(job_dict):
    spec, _ = job(job_dict)
    assert spec.data.vae_channels_last is True and spec.data.vae_compile == "auto"
    job_dict["data"]["vae_compile"] = "yes"
    with pytest.raises(SpecError, match="vae_compile"):
        job(job_dict)


def test_channels_last_on_and_off_give_the_same_latents(job_dict, tmp_path, tiny_model_path, clips_template):
    """Mean latents (deterministic) of the tiny VAE with the layout switch on and off; off is also
    bit-identical to a plain `encode_videos` of `load_sample` (the phase before the switch existed)."""
    from job.data import load_sample, plan_dataset
    from job.models.sanavideo.latents import encode_videos
    from job.models.sanavideo.loading import load_components

    results = {}
    for on in (True, False):
        data = spec_dict(make_workspace(tmp_path / str(on), clips_template), tiny_model_path)
        data["data"].update(vae_channels_last=on, vae_latent_mode="mean", vae_batch_size=1)
        spec, ws = job(data)
        result = _cache(spec, ws)
        assert result.latents.cached == 4 and result.latents.failed == 0
        results[on] = (spec, ws, _latents(spec, ws))
        folder = ws.latent_cache_dir(spec.data.datasets[0])
        meta = fmt.read_sample(folder, next(iter(results[on][2]))).extra
        assert meta.get("vae_layout") == ("channels_last" if on else "contiguous")
    fast, plain = results[True][2], results[False][2]
    assert fast.keys() == plain.keys()
    for key in fast:
        assert fast[key].is_contiguous()
        torch.testing.assert_close(fast[key], plain[key], atol=1e-5, rtol=1e-5)
    spec, ws, _ = results[False]
    vae = load_components(tiny_model_path, parts={"vae"}).vae
    for sample in plan_dataset(spec, ws, show=False).samples:
        ref = encode_videos(vae, load_sample(sample, spec)[None], sample=False)[0]
        assert torch.equal(plain[latent_sample_key(sample)], ref)


def test_fused_vae_ops_in_the_phase_give_the_unfused_latents(triton_interpreter, tmp_path, tiny_model_path,
                                                             clips_template, caplog):
    """`data.vae_fused_ops` (on the CPU only under Triton's interpreter): the phase's encoder runs the fused
    norms and pad-free convs, and its latents equal the unfused phase's within bf16 rounding."""
    results = {}
    for on in (True, False):
        data = spec_dict(make_workspace(tmp_path / str(on), clips_template), tiny_model_path)
        data["data"].update(vae_fused_ops=on, vae_latent_mode="mean", vae_batch_size=1)
        spec, ws = job(data)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trainer.cache"):
            result = _cache(spec, ws)
        assert result.latents.cached == 4 and result.latents.failed == 0
        assert ("fused RMS norm + SiLU kernels" in caplog.text) is on
        results[on] = _latents(spec, ws)
    assert results[True].keys() == results[False].keys()
    for key, plain in results[False].items():
        torch.testing.assert_close(results[True][key].float(), plain.float(), rtol=2e-2,
                                   atol=2e-2 * plain.abs().max().item())


def test_compile_on_the_cpu_is_skipped_with_the_reason_in_the_log(job_dict, caplog):
    job_dict["data"]["vae_compile"] = "always"
    spec, ws = job(job_dict)
    with caplog.at_level(logging.INFO, logger="trainer.cache"):
        result = _cache(spec, ws)
    assert result.latents.cached == 4 and result.latents.failed == 0
    assert "not compiling the VAE encoder: no CUDA device" in caplog.text


def test_to_channels_last_converts_every_conv_weight():
    from diffusers import AutoencoderKLWan

    from job.models.sanavideo.tiny import TINY_VAE_CONFIG

    vae = vae_speed.to_channels_last(AutoencoderKLWan(**TINY_VAE_CONFIG))
    convs = [m for m in vae.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert any(isinstance(m, torch.nn.Conv2d) for m in convs) and any(isinstance(m, torch.nn.Conv3d) for m in convs)
    for m in convs:
        fmt_ = torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last
        assert m.weight.is_contiguous(memory_format=fmt_), m


class _TinyVae(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Conv3d(3, 4, 3)


def _data(compile_mode: str, batch: int = 2, channels_last: bool = False):
    return SimpleNamespace(vae_channels_last=channels_last, vae_batch_size=batch, vae_compile=compile_mode,
                           vae_fused_ops=False)


def test_auto_compiles_only_buckets_that_pay_back_and_only_full_batches():
    vae = _TinyVae()
    eager = vae.encoder
    big, small = "832x480x81", "480x832x81"
    speed = vae_speed.EncoderSpeed(vae, _data("auto"), torch.device("cuda"),
                                   {big: vae_speed.COMPILE_MIN_CLIPS, small: vae_speed.COMPILE_MIN_CLIPS - 1})
    assert speed.compile_buckets == {big} and speed.compiled is not None
    # the callable sees which encoder is installed; nothing runs on a GPU here
    assert speed.run(big, 2, lambda: vae.encoder) is speed.compiled
    assert speed.run(big, 1, lambda: vae.encoder) is eager  # a short last batch: no new compiled shape
    assert speed.run(small, 2, lambda: vae.encoder) is eager
    assert vae.encoder is eager  # restored after each batch
    never = vae_speed.EncoderSpeed(_TinyVae(), _data("never"), torch.device("cuda"), {big: 10_000})
    assert never.compiled is None
    always = vae_speed.EncoderSpeed(_TinyVae(), _data("always"), torch.device("cuda"), {small: 1})
    assert always.compile_buckets == {small}


def test_a_failing_compiled_encoder_falls_back_to_eager_with_a_warning(caplog):
    vae = _TinyVae()
    eager = vae.encoder
    speed = vae_speed.EncoderSpeed(vae, _data("always", batch=1), torch.device("cuda"), {"b": 1})
    compiled = speed.compiled

    def encode():
        if vae.encoder is compiled:
            raise RuntimeError("inductor: no working C compiler")
        return "eager result"

    with caplog.at_level(logging.WARNING, logger="trainer.cache"):
        assert speed.run("b", 1, encode) == "eager result"
    assert "compiled VAE encoder failed (RuntimeError: inductor: no working C compiler)" in caplog.text
    assert speed.compiled is None and vae.encoder is eager
    assert speed.run("b", 1, encode) == "eager result"  # compile stays off for the rest of the run


def test_an_out_of_memory_error_is_not_taken_for_a_compile_failure():
    vae = _TinyVae()
    speed = vae_speed.EncoderSpeed(vae, _data("always", batch=1), torch.device("cuda"), {"b": 1})

    def encode():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        speed.run("b", 1, encode)
    assert speed.compiled is not None


@pytest.mark.parametrize("lanes", [2, 3])
def test_concurrent_batches_give_the_same_latents_in_the_same_files(job_dict, tmp_path, tiny_model_path, clips_template,
                                                                     monkeypatch, lanes):
    """`data.vae_concurrent_batches` (lanes: a VAE copy and a thread each; CUDA streams on a GPU), run here
    on the CPU: every latent (sampled, seeded per clip) equals the one-at-a-time phase's bit for bit."""
    from job.cache import phase

    monkeypatch.setattr(phase, "LANES_ON_CPU", True)
    lanes_made = []
    real = phase._EncodeLanes.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        lanes_made.append(self.count)

    monkeypatch.setattr(phase._EncodeLanes, "__init__", spy)
    results = {}
    for count in (1, lanes):
        data = spec_dict(make_workspace(tmp_path / str(count), clips_template), tiny_model_path)
        data["data"].update(vae_concurrent_batches=count, vae_batch_size=1)
        spec, ws = job(data)
        lanes_made.clear()
        result = _cache(spec, ws)
        assert lanes_made == [count] and result.latents.cached == 4 and result.latents.failed == 0
        results[count] = _latents(spec, ws)
    assert results[1].keys() == results[lanes].keys()
    for key, latents in results[1].items():
        assert torch.equal(results[lanes][key], latents), key
