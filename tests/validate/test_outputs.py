"""The output pieces on their own: MP4 writer, contact sheet, index page, preview projection."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from job.validate.index import render_index, step_dir_name, write_index, write_manifest
from job.validate.preview import LatentRGB, PreviewSender, fit_latent_rgb, latent_rgb_for
from job.validate.sheet import contact_sheet_png, frame_strip_png
from job.validate.video import read_mp4, write_mp4


def test_mp4_odd_sizes_are_padded_and_writes_are_atomic(tmp_path):
    frames = np.random.default_rng(0).random((5, 31, 45, 3), dtype=np.float32)
    path = write_mp4(tmp_path / "v" / "clip.mp4", frames, fps=8)
    decoded, info = read_mp4(path)
    assert info == {"codec": "h264", "pix_fmt": "yuv420p", "width": 46, "height": 32, "fps": 8.0, "frames": 5}
    assert decoded.shape == (5, 32, 46, 3)
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]
    with open(path, "rb") as f:  # faststart: the index (moov) comes before the media data (mdat)
        head = f.read()
    assert head.index(b"moov") < head.index(b"mdat")


def test_contact_sheet_and_strip(tmp_path):
    video = np.linspace(0, 1, 9 * 16 * 32 * 3, dtype=np.float32).reshape(9, 16, 32, 3)
    sheet = Image.open(io.BytesIO(contact_sheet_png([("a", video), ("b <long name>", video)], thumb_height=64)))
    assert sheet.format == "PNG" and sheet.height > 2 * 64
    strip = Image.open(io.BytesIO(frame_strip_png(video, count=3, height=32)))
    assert strip.height == 32 and strip.width == 3 * 64 + 2 * 4


def test_index_is_rebuilt_from_manifests_and_escapes(tmp_path):
    for step in (100, 20):
        folder = tmp_path / step_dir_name(step)
        folder.mkdir()
        (folder / "a b.mp4").write_bytes(b"")
        write_manifest(folder, {"step": step, "contact_sheet": None,
                                "videos": [{"nickname": "a", "prompt": "x < y", "file": "a b.mp4", "width": 64, "height": 32}]})
    (tmp_path / "step_000300").mkdir()
    (tmp_path / "step_000300" / "manifest.json").write_text("{broken")  # skipped, not fatal
    index = write_index(tmp_path, title="T & T")
    html = index.read_text()
    assert html.index("Step 100") < html.index("Step 20")  # newest first
    assert 'src="step_000020/a%20b.mp4"' in html and "x &lt; y" in html and "<title>T &amp; T</title>" in html
    assert "No validation" in render_index([])


def test_preview_projection_fit_cache_and_sender(tmp_path, tiny_components):
    vae = tiny_components.vae
    rng = torch.get_rng_state()
    projection = fit_latent_rgb(vae)
    assert torch.equal(rng, torch.get_rng_state())
    assert projection.weight.shape == (3, 4) and projection.bias.shape == (3,)
    assert torch.isfinite(projection.weight).all()
    again = latent_rgb_for(vae, tmp_path)
    assert torch.allclose(again.weight, projection.weight) and (tmp_path / ".preview_projection.json").is_file()
    loaded = LatentRGB.from_json((tmp_path / ".preview_projection.json").read_text())
    assert loaded.key == again.key and torch.allclose(loaded.weight, again.weight)
    rgb = projection.project(torch.randn(1, 4, 3, 4, 8))
    assert rgb.shape == (1, 3, 4, 8, 3) and float(rgb.min()) >= 0 and float(rgb.max()) <= 1

    class Sink:
        def __init__(self):
            self.sent = []

        def send(self, name, payload, image_png=None):
            self.sent.append((name, payload, image_png))

    sink = Sink()
    sender = PreviewSender(projection, sink, every=2, total_steps=5, payload={"nickname": "x"})
    latents = torch.randn(2, 4, 3, 4, 8)
    for i in range(5):
        sender(i, latents)
    assert [p["denoising_step"] for _, p, _ in sink.sent] == [2, 4]
    png = Image.open(io.BytesIO(sink.sent[0][2]))
    assert png.height == 4 * 8 and json.dumps(sink.sent[0][1])  # upscaled, at most to the video's size


def test_registered_secrets_stay_out_of_the_manifest_and_the_index(tmp_path, monkeypatch):
    """A ${VAR} secret in the job name or a prompt: the uploaded validation files show *** instead."""
    import job.report as report

    monkeypatch.setattr(report, "_secret_values", set())
    report.register_secrets(["ApiKeyValue_ZZZ"])
    folder = tmp_path / step_dir_name(10)
    folder.mkdir()
    manifest = write_manifest(folder, {"step": 10, "contact_sheet": None, "negative_prompt": "blur ApiKeyValue_ZZZ",
                                       "videos": [{"nickname": "a", "prompt": "p", "file": "a.mp4", "width": 64, "height": 32}]})
    index = write_index(tmp_path, title="Validation — smoke-ApiKeyValue_ZZZ")
    for path in (manifest, index):
        text = path.read_text()
        assert "ApiKeyValue_ZZZ" not in text and "***" in text, text
