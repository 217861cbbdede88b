"""Validation videos from the tiny model on the CPU: files, formats, determinism, EMA, clean return."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel
from PIL import Image

from job.errors import InputError
from job.report.webhooks import Webhooks
from job.validate.prompts import validation_prompts
from job.validate.render import ema_weights, run_validation, validation_due
from job.validate.video import read_mp4


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.videos = 0

    def handle_starttag(self, tag, attrs):
        self.videos += tag == "video"
        self.links += [value for name, value in attrs if name in ("src", "href")]


def _links(index: Path) -> _Links:
    parser = _Links()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def test_videos_contact_sheet_and_index(spec_factory, tiny_components, embeddings_for):
    library = {"cat": 'A cat <script>alert("x")</script> & a dog'}
    spec, ws = spec_factory(validation={"prompt_library": library, "num_video_frames": 9})
    result = run_validation(spec, ws, tiny_components, 200, embeddings_for)

    step_dir = ws.validation_dir / "step_000200"
    assert result.folder == step_dir and result.weights == "training"
    assert sorted(p.name for p in step_dir.iterdir()) == ["cat.mp4", "contact_sheet.png", "manifest.json", "validation.mp4"]
    for video in result.videos:
        frames, info = read_mp4(video.path)
        assert info == {"codec": "h264", "pix_fmt": "yuv420p", "width": 64, "height": 32, "fps": 12.0, "frames": 9}
        assert frames.shape == (9, 32, 64, 3)
        assert (video.width, video.height, video.frames, video.fps) == (64, 32, 9, 12)
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.format == "PNG" and sheet.width > 4 * 64 // 2

    manifest = json.loads(result.manifest.read_text())
    assert [v["nickname"] for v in manifest["videos"]] == ["validation", "cat"]
    assert manifest["videos"][1]["prompt"] == library["cat"] and manifest["seed"] == 7

    html = result.index.read_text(encoding="utf-8")
    assert result.index == ws.validation_dir / "index.html"
    assert "<script>" not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a dog" in html
    links = _links(result.index)
    assert links.videos == 2 and links.links
    for link in links.links:
        assert not link.startswith(("/", "http")), link  # relative
        assert (ws.validation_dir / unquote(link)).is_file(), link
    assert not any(p.name.startswith(".") for p in step_dir.iterdir())  # no temporary files left


def test_same_seed_same_video_and_index_covers_the_run(spec_factory, tiny_components, embeddings_for, tmp_path):
    library = tmp_path / "library.json"
    library.write_text(json.dumps({"dog-run": "A dog runs on a beach"}))
    spec, ws = spec_factory(validation={"prompt_library": str(library)}, framerate=None)
    first = run_validation(spec, ws, tiny_components, 1, embeddings_for)
    second = run_validation(spec, ws, tiny_components, 2, embeddings_for)
    assert [v.path.name for v in second.videos] == ["validation.mp4", "dog-run.mp4"]
    for a, b in zip(first.videos, second.videos):
        frames_a, info = read_mp4(a.path)
        frames_b, _ = read_mp4(b.path)
        assert np.array_equal(frames_a, frames_b)
        assert info["fps"] == 16.0  # data.framerate null -> 16
    other = run_validation(spec_factory(validation={"seed": 8})[0], ws, tiny_components, 3, embeddings_for)
    assert not np.array_equal(read_mp4(other.videos[0].path)[0], read_mp4(first.videos[0].path)[0])
    links = [unquote(link) for link in _links(ws.validation_dir / "index.html").links]
    for step in ("step_000001", "step_000002", "step_000003"):
        assert f"{step}/validation.mp4" in links
    assert all((ws.validation_dir / link).is_file() for link in links)


def test_several_resolutions_get_size_suffixes(spec_factory, tiny_components, embeddings_for):
    spec, ws = spec_factory(validation={"resolutions": ["64x32", "32x64"], "guidance": 1.0})
    result = run_validation(spec, ws, tiny_components, 5, embeddings_for)
    assert [v.path.name for v in result.videos] == ["validation_64x32.mp4", "validation_32x64.mp4"]
    assert [read_mp4(v.path)[1]["width"] for v in result.videos] == [64, 32]
    assert read_mp4(result.videos[1].path)[1]["frames"] == 5


def _ema_for(transformer, scale=0.05):
    ema = EMAModel(transformer.parameters(), decay=0.9)
    g = torch.Generator().manual_seed(1)
    for shadow in ema.shadow_params:
        shadow.add_(torch.randn(shadow.shape, generator=g) * scale)
    return ema


def test_ema_only_and_comparison(spec_factory, fresh_components, embeddings_for):
    components = fresh_components()
    before = {k: v.clone() for k, v in components.transformer.state_dict().items()}
    ema = _ema_for(components.transformer)
    runs = {}
    for mode in ("none", "ema_only", "comparison"):
        spec, ws = spec_factory(train={"use_ema": True, "ema": {"validation": mode}})
        result = run_validation(spec, ws, components, 10, embeddings_for, ema=ema)
        assert len(result.videos) == 1
        runs[mode] = read_mp4(result.videos[0].path)
        assert result.weights == {"none": "training", "ema_only": "ema", "comparison": "comparison"}[mode]
    assert all(torch.equal(v, components.transformer.state_dict()[k]) for k, v in before.items())

    training, ema_video = runs["none"][0], runs["ema_only"][0]
    both, info = runs["comparison"]
    assert info["width"] == 128 and info["height"] == 32 and info["frames"] == 5
    assert np.abs(training.astype(int) - ema_video.astype(int)).mean() > 1.0  # the EMA weights are different
    assert np.abs(both[:, :, :64].astype(int) - training.astype(int)).mean() < 3.0  # training on the left
    assert np.abs(both[:, :, 64:].astype(int) - ema_video.astype(int)).mean() < 3.0  # EMA on the right


def test_ema_swap_restores_training_weights_bit_for_bit(fresh_components):
    from job.spec.train import EmaSpec
    from job.train.ema import Ema

    transformer = fresh_components().transformer
    before = [p.detach().clone() for p in transformer.parameters()]
    ema = _ema_for(transformer)
    wrapper = Ema([p for p in transformer.parameters()], EmaSpec(), torch.device("cpu"))
    wrapper.model = ema
    for obj in (ema, wrapper):
        with ema_weights(obj, transformer):
            assert all(torch.equal(p, s) for p, s in zip(transformer.parameters(), ema.shadow_params))
        assert all(torch.equal(p, b) for p, b in zip(transformer.parameters(), before))


def _train(components, embeds, validate_at: int | None, spec=None, ws=None, embeddings_for=None, ema=None):
    """A small training loop whose randomness comes from the global RNG (as training code often does)."""
    transformer = components.transformer
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3)
    torch.manual_seed(1234)
    for step in range(1, 4):
        x0 = torch.randn(1, 4, 3, 4, 8)
        noise = torch.randn_like(x0)
        sigma = torch.rand(1)
        pred = transformer(((1 - sigma) * x0 + sigma * noise), encoder_hidden_states=embeds[0],
                           encoder_attention_mask=embeds[1], timestep=sigma * 1000, return_dict=False)[0]
        loss = ((pred - (noise - x0)) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if ema is not None:
            ema.step(transformer.parameters())
        if step == validate_at:
            run_validation(spec, ws, components, step, embeddings_for, ema=ema)
            assert transformer.training
    return {k: v.clone() for k, v in transformer.state_dict().items()}, torch.get_rng_state()


def test_training_is_identical_with_and_without_validation(spec_factory, fresh_components, embeddings_for):
    spec, ws = spec_factory(train={"use_ema": True, "ema": {"validation": "comparison"}})
    embeds = embeddings_for("A cat sleeping on a warm sunny windowsill.")
    plain = fresh_components()
    weights_a, rng_a = _train(plain, embeds, None, ema=EMAModel(plain.transformer.parameters(), decay=0.5))
    validated = fresh_components()
    weights_b, rng_b = _train(validated, embeds, 2, spec, ws, embeddings_for,
                              ema=EMAModel(validated.transformer.parameters(), decay=0.5))
    assert (ws.validation_dir / "step_000002" / "validation.mp4").is_file()
    assert torch.equal(rng_a, rng_b)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_previews_and_validation_ready_reach_the_webhooks(spec_factory, tiny_components, embeddings_for, receiver):
    spec, ws = spec_factory(validation={"num_inference_steps": 3, "preview": {"enabled": True, "steps": 1}},
                            webhooks=[{"url": receiver.url("/hook")}])
    hooks = Webhooks(spec.webhooks, job_name=spec.name)
    result = run_validation(spec, ws, tiny_components, 30, embeddings_for, webhooks=hooks)
    hooks.close(timeout=10)
    assert result.previews_sent == 2  # after denoising steps 1 and 2; step 3 is the final video
    bodies = [json.loads(r["body"]) for r in receiver.requests]
    assert [b["event"] for b in bodies] == ["preview", "preview", "validation_ready"]
    assert [b["denoising_step"] for b in bodies[:2]] == [1, 2] and bodies[0]["nickname"] == "validation"
    for body in bodies:
        png = base64.b64decode(body["image_png_base64"])
        assert png.startswith(b"\x89PNG")
    ready = bodies[2]
    assert ready["step"] == 30 and ready["videos"] == [str(result.videos[0].path)]
    assert Path(ready["index"]).is_file()
    assert (ws.validation_dir / ".preview_projection.json").is_file()


def test_prompt_library_problems_are_input_errors(spec_factory, tmp_path):
    spec, ws = spec_factory()
    assert validation_prompts(spec.validation, ws) == {"validation": spec.validation.prompt}
    bad_files = {"missing.json": None, "broken.json": "{not json", "list.json": "[1, 2]",
                 "names.json": json.dumps({"../evil": "x"}), "empty.json": json.dumps({"ok": " "})}
    for name, text in bad_files.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        spec, ws = spec_factory(validation={"prompt_library": str(tmp_path / name)})
        with pytest.raises(InputError):
            validation_prompts(spec.validation, ws)


def test_validation_due(spec_factory):
    spec, _ = spec_factory(validation={"step_interval": 50})
    assert [s for s in range(0, 125) if validation_due(spec, s, total_steps=125)] == [50, 100]
    assert validation_due(spec, 125, total_steps=125)
    spec, _ = spec_factory(validation={"enabled": False})
    assert not validation_due(spec, 200)


class _Part(torch.nn.Module):
    """A stand-in module that only records where it is moved."""

    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)

    def to(self, device):
        self.device = torch.device(device)
        return self


class _Pipe:
    def __init__(self):
        self._execution_device = torch.device("cuda", 0)
        self.vae = _Part("cuda:0")
        self.text_encoder = _Part("cuda:0")


def test_cpu_offload_keeps_the_vae_off_the_accelerator_until_the_decode(monkeypatch, spec_factory):
    """With memory.enable_model_cpu_offload the VAE is on the accelerator only for the final decode."""
    from job.validate import render as render_module

    monkeypatch.setattr(render_module, "_module_device", lambda module: module.device)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    spec, _ = spec_factory(validation={"num_inference_steps": 3})
    pipe = _Pipe()
    seen: list[tuple[int, str, str]] = []

    def fake_render(pipeline, *args, callback_on_step_end=None, steps=None, **kwargs):
        for i in range(steps):
            seen.append((i, str(pipeline.vae.device), str(pipeline.text_encoder.device)))
            callback_on_step_end(pipeline, i, None, {"latents": None})
        seen.append(("decode", str(pipeline.vae.device), str(pipeline.text_encoder.device)))
        return np.zeros((1, 5, 32, 64, 3), np.float32)

    placement = render_module._Placement(pipe, offload=True)
    placement.for_denoising()
    frames = render_module._render_one(fake_render, pipe, placement, (None, None), (None, None), 64, 32,
                                       spec.validation, None)
    assert frames.shape == (5, 32, 64, 3) and frames.dtype == np.uint8
    assert seen == [(0, "cpu", "cpu"), (1, "cpu", "cpu"), (2, "cpu", "cpu"), ("decode", "cuda:0", "cpu")]
    assert str(pipe.vae.device) == "cpu"  # back in CPU RAM between videos
    placement.restore()
    assert str(pipe.vae.device) == "cuda:0" and str(pipe.text_encoder.device) == "cuda:0"  # where they were

    pipe = _Pipe()
    pipe.vae.device = torch.device("cpu")
    placement = render_module._Placement(pipe, offload=False)  # no offload: the VAE joins the transformer
    placement.for_denoising()
    assert str(pipe.vae.device) == "cuda:0" and str(pipe.text_encoder.device) == "cuda:0"
    placement.restore()
    assert str(pipe.vae.device) == "cpu"
