"""`job.models.sanavideo.vae_kernels`: the fused RMS norm + SiLU Triton kernel and the pad-free causal
convolution, run in Triton's CPU interpreter against diffusers' own Wan VAE modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from job.models.sanavideo import vae_kernels
from job.models.sanavideo.tiny import TINY_VAE_CONFIG


def _norm(channels: int, dtype, images: bool = False, bias: bool = False, seed: int = 0) -> WanRMS_norm:
    torch.manual_seed(seed)
    norm = WanRMS_norm(channels, images=images, bias=bias).to(dtype)
    with torch.no_grad():
        norm.gamma.normal_()
        if bias:
            norm.bias.normal_()
    return norm


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


@pytest.mark.parametrize("channels,images,bias,silu", [(96, False, False, True), (37, False, True, True),
                                                       (12, True, False, False), (200, False, False, False)])
def test_kernel_equals_the_module_bit_for_bit_in_bf16(triton_interpreter, channels, images, bias, silu):
    """The kernel repeats WanRMS_norm's bf16 roundings (and SiLU's), so bf16 outputs are identical."""
    norm = _norm(channels, torch.bfloat16, images=images, bias=bias)
    shape = (2, channels, 5, 7) if images else (2, channels, 3, 5, 7)
    x = _channels_last(torch.randn(shape, dtype=torch.bfloat16) * 3)
    assert vae_kernels.fused_rms_norm_usable(x, norm.gamma, norm.bias)
    with torch.no_grad():
        expected = norm(x)
        expected = F.silu(expected) if silu else expected
        got = vae_kernels.fused_rms_norm(x, norm.gamma, norm.bias, norm.scale, silu=silu)
    assert got.shape == x.shape and got.stride() == x.stride() and got.dtype == x.dtype
    assert torch.equal(got, expected)


def test_kernel_in_float32_matches_to_float32_rounding(triton_interpreter):
    norm = _norm(96, torch.float32)
    x = _channels_last(torch.randn(1, 96, 2, 4, 9))
    with torch.no_grad():
        got = vae_kernels.fused_rms_norm(x, norm.gamma, norm.bias, norm.scale, silu=True)
        torch.testing.assert_close(got, F.silu(norm(x)), rtol=1e-6, atol=1e-6)


def test_kernel_is_not_used_where_it_cannot_reproduce_the_module(triton_interpreter):
    norm = _norm(16, torch.bfloat16)
    x = torch.randn(1, 16, 2, 3, 4, dtype=torch.bfloat16)
    assert not vae_kernels.fused_rms_norm_usable(x, norm.gamma, norm.bias)  # NCDHW: channels not innermost
    cl = _channels_last(x)
    assert vae_kernels.fused_rms_norm_usable(cl, norm.gamma, norm.bias)
    assert not vae_kernels.fused_rms_norm_usable(cl.half(), norm.gamma.half(), norm.bias)  # float16: other rounding
    assert not vae_kernels.fused_rms_norm_usable(cl, norm.gamma.float(), norm.bias)  # promotion to float32
    assert not vae_kernels.fused_rms_norm_usable(cl.requires_grad_(), norm.gamma, norm.bias)  # no autograd


def test_without_the_interpreter_cpu_tensors_take_diffusers_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    norm = _norm(16, torch.bfloat16)
    x = _channels_last(torch.randn(1, 16, 2, 3, 4, dtype=torch.bfloat16))
    assert not vae_kernels.fused_rms_norm_usable(x, norm.gamma, norm.bias)


def _tiny_vae(dtype) -> AutoencoderKLWan:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**{k: v for k, v in TINY_VAE_CONFIG.items() if not k.startswith("_")})
    with torch.no_grad():  # non-trivial gammas, so a wrong channel or rounding shows
        for m in vae.modules():
            if isinstance(m, WanRMS_norm):
                m.gamma.uniform_(0.5, 1.5)
    return vae.to(dtype).eval()


def _record_norm_kernel_calls(monkeypatch) -> list[bool]:
    """The `silu` flag of every fused-norm kernel call from here on (the kernel still runs)."""
    calls: list[bool] = []
    real = vae_kernels.fused_rms_norm
    monkeypatch.setattr(vae_kernels, "fused_rms_norm", lambda *a, **k: calls.append(k["silu"]) or real(*a, **k))
    return calls


def _patched_pair(dtype):
    from job.cache.vae_speed import to_channels_last

    plain = to_channels_last(_tiny_vae(dtype))
    fused = copy.deepcopy(plain)
    assert vae_kernels.use_fused_vae_ops(fused) > 0
    assert vae_kernels.use_fused_vae_ops(fused) == 0  # idempotent
    assert fused.state_dict().keys() == plain.state_dict().keys()
    return plain, fused


def _errors(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Largest and mean absolute error of `out` against a float32 `reference`."""
    error = (out.float() - reference).abs()
    return error.max().item(), error.mean().item()


def test_patched_vae_encodes_and_decodes_like_diffusers_in_bf16(triton_interpreter, monkeypatch):
    """As exact as diffusers' own bf16 VAE, both measured against the same weights in float32. The two bf16
    paths differ from each other by their two roundings (the kernel multiplies by the reciprocal norm, rarely
    one bf16 step off, and the first conv sums its zero-padded channels in another order), which through the
    decoder grew to twice either path's own error on one CPU; a wrong channel, gamma or SiLU would be ~100x off."""
    plain, fused = _patched_pair(torch.bfloat16)
    float32 = copy.deepcopy(plain).float()
    calls = _record_norm_kernel_calls(monkeypatch)
    video = _channels_last(torch.randn(1, 3, 9, 32, 48, dtype=torch.bfloat16))
    with torch.no_grad():
        latents = fused.encode(video).latent_dist.mean
        assert True in calls  # (on the CPU most convolutions return NCDHW, where diffusers' forward runs)
        reference = float32.encode(video.float()).latent_dist.mean
        pairs = [(latents, plain.encode(video).latent_dist.mean, reference)]
        reference = float32.decode(latents.float()).sample
        pairs.append((fused.decode(latents).sample, plain.decode(latents).sample, reference))
    for ours, diffusers_bf16, reference in pairs:
        (ours_max, ours_mean), (theirs_max, theirs_mean) = _errors(ours, reference), _errors(diffusers_bf16, reference)
        assert ours_max <= 2 * theirs_max and ours_mean <= 2 * theirs_mean, (ours_max, theirs_max, ours_mean, theirs_mean)
        assert ours_max <= 0.05 * reference.abs().max().item()
    # a lane copy of the patched VAE (deepcopy, as the cache phase makes) runs its own modules
    lane = copy.deepcopy(fused)
    with torch.no_grad():
        torch.testing.assert_close(lane.encode(video).latent_dist.mean, latents, rtol=0, atol=0)


def test_causal_convs_compute_diffusers_sums_exactly(triton_interpreter):
    """In float64 (the norms then keep diffusers' forward) the pad-free convolutions, the first one with
    its zero channels, give diffusers' encode and decode to float64 rounding."""
    plain, fused = _patched_pair(torch.float64)
    video = _channels_last(torch.randn(1, 3, 9, 32, 48, dtype=torch.float64))
    with torch.no_grad():
        latents = fused.encode(video).latent_dist.mean
        torch.testing.assert_close(latents, plain.encode(video).latent_dist.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused.decode(latents).sample, plain.decode(latents).sample, rtol=1e-12, atol=1e-12)


def test_patched_attention_block_norm_runs_without_silu(triton_interpreter, monkeypatch):
    plain, fused = _patched_pair(torch.bfloat16)
    calls = _record_norm_kernel_calls(monkeypatch)
    x = _channels_last(torch.randn(1, 8, 2, 4, 6, dtype=torch.bfloat16))
    with torch.no_grad():
        got = fused.encoder.mid_block.attentions[0](x)
        torch.testing.assert_close(got, plain.encoder.mid_block.attentions[0](x), rtol=0, atol=0)
    assert calls == [False]


def test_patched_vae_in_ncdhw_or_without_interpreter_runs_diffusers_forward(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plain, fused = _patched_pair(torch.float32)
    monkeypatch.setattr(vae_kernels, "fused_rms_norm", lambda *a, **k: pytest.fail("kernel used on a plain CPU run"))
    video = torch.randn(1, 3, 5, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused.encode(video).latent_dist.mean, plain.encode(video).latent_dist.mean,
                                   rtol=0, atol=0)


def _speed(**kw):
    from job.spec.speed import SpeedSpec

    return SpeedSpec(compile_blocks=False, **kw)


@pytest.mark.parametrize("switch", [True, False])
def test_validation_pipeline_runs_its_vae_fused_when_speed_fused_kernels(triton_interpreter, tiny_components, switch):
    """`speed.fused_kernels` gives validation's VAE channels-last weights and the fused ops (on the CPU only
    under the interpreter); its decode stays diffusers' within float32 rounding."""
    from types import SimpleNamespace

    from job.models.sanavideo.validation import build_pipeline

    parts = SimpleNamespace(**vars(tiny_components))
    parts.vae = copy.deepcopy(tiny_components.vae)
    pipe = build_pipeline(parts, speed=_speed(fused_kernels=switch))
    norm = pipe.vae.decoder.norm_out
    conv = pipe.vae.decoder.conv_in
    assert ("forward" in vars(norm)) is switch and ("forward" in vars(conv)) is switch
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) is switch
    z = torch.randn(1, tiny_components.vae.config.z_dim, 2, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(pipe.vae.decode(z).sample, tiny_components.vae.decode(z).sample,
                                   rtol=1e-5, atol=1e-5)


def test_validation_pipeline_on_the_cpu_keeps_diffusers_vae(tiny_components):
    from types import SimpleNamespace

    from job.models.sanavideo.validation import build_pipeline

    parts = SimpleNamespace(**vars(tiny_components))
    parts.vae = copy.deepcopy(tiny_components.vae)
    pipe = build_pipeline(parts, speed=_speed())
    assert "forward" not in vars(pipe.vae.decoder.norm_out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3.2e-2)])
@pytest.mark.parametrize("in_dim,batch", [(8, 1), (12, 1), (8, 2)])
def test_residual_block_adds_conv_biases_inside_the_kernels(triton_interpreter, monkeypatch, dtype, tol, in_dim, batch):
    """The patched residual block (conv1's bias inside norm2's kernel, conv2's in the residual add) over two
    causal chunks with the frame cache, against diffusers' block. The CPU's convolutions return NCDHW, so
    their outputs are made channels-last here (as cuDNN's are) to reach both kernels. One clip: the norms write
    into the convs' time-padded inputs; two: norm, then the concatenation (both paths). bf16 is compared
    loosely: the CPU's bf16 convolution adds its bias before rounding (cuDNN's path, like the kernels,
    rounds the convolution and then the bias add)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

    torch.manual_seed(0)
    plain = WanResidualBlock(in_dim, 8).to(dtype).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.3)
    fused = copy.deepcopy(plain)
    vae_kernels.use_fused_vae_ops(fused)
    assert "forward" in vars(fused)
    real_conv = vae_kernels._spatially_padded_conv
    monkeypatch.setattr(vae_kernels, "_spatially_padded_conv", lambda *a: _channels_last(real_conv(*a)))
    calls = {"pre_bias": 0, "residual": 0, "into_conv_input": 0}
    real_norm, real_residual = vae_kernels.fused_rms_norm, vae_kernels.fused_bias_residual

    def norm(*a, **k):
        calls["pre_bias"] += k.get("pre_bias") is not None
        calls["into_conv_input"] += k.get("out") is not None
        return real_norm(*a, **k)

    def residual(*a):
        calls["residual"] += 1
        return real_residual(*a)

    monkeypatch.setattr(vae_kernels, "fused_rms_norm", norm)
    monkeypatch.setattr(vae_kernels, "fused_bias_residual", residual)
    caches = {"plain": [None, None, None], "fused": [None, None, None]}
    for frames in (1, 4):  # the first chunk (no cache), then one with the cached frames
        x = _channels_last(torch.randn(batch, in_dim, frames, 6, 10, dtype=dtype))
        with torch.no_grad():
            expected = plain(x, feat_cache=caches["plain"], feat_idx=[0])
            got = fused(x, feat_cache=caches["fused"], feat_idx=[0])
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
        for mine, theirs in zip(caches["fused"], caches["plain"]):
            assert (mine is None) == (theirs is None)
            if theirs is not None:
                torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol)
    assert calls == {"pre_bias": 2, "residual": 2, "into_conv_input": 4 if batch == 1 else 0}


def test_patched_encoder_compiles_without_graph_breaks():
    """`data.vae_compile` over a patched encoder: under torch.compile every patched module takes diffusers'
    forward (inductor fuses those passes itself), traced without a graph break into the usual 3 graphs."""
    import torch._dynamo

    plain, fused = _patched_pair(torch.float32)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fused.encoder = torch.compile(fused.encoder, backend="eager")
    video = _channels_last(torch.randn(1, 3, 9, 32, 48))
    with torch.no_grad():
        got = fused.encode(video).latent_dist.mean
        torch.testing.assert_close(got, plain.encode(video).latent_dist.mean, rtol=0, atol=0)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()
