"""Decoding real clips: frame picking by timestamp (resampling), seeking, crop/resize, rotation."""

from __future__ import annotations

import math
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch

from data_helpers import BLUE, GREEN, RED, WHITE, frame_index
from job.data.decode import DecodeError, Window, decode_window, frames_to_tensor
from job.data.geometry import crop_box
from job.data.probe import probe_video


def expected_indices(start: int, count: int, source_fps: int, fps: int) -> list[int]:
    """The documented rule: the nearest source frame, ties to the earlier one."""
    return [math.ceil(Fraction((start + j) * source_fps, fps) - Fraction(1, 2)) for j in range(count)]


def indices(frames: np.ndarray) -> list[int]:
    return [frame_index(f) for f in frames]


def test_native_rate_gives_consecutive_frames(corpus):
    frames = decode_window(corpus["c30"], Window(0.0, 21, 30, 30))
    assert frames.shape == (21, 48, 64, 3) and frames.dtype == np.uint8
    assert indices(frames) == list(range(21))


@pytest.mark.parametrize("name, source_fps", [("c30", 30), ("c24", 24), ("c12", 12)])
def test_resampling_to_16fps_picks_frames_by_timestamp(corpus, name, source_fps):
    frames = decode_window(corpus[name], Window(0.0, 25, 16, source_fps))
    assert indices(frames) == expected_indices(0, 25, source_fps, 16)


def test_mid_clip_window_seeks_and_matches_a_full_decode(corpus):
    # keyframe every 10 frames: the window starts between keyframes
    start = 13  # frames at 16 fps -> 0.8125 s
    frames = decode_window(corpus["c30_gop"], Window(start / 16, 17, 16, 30))
    assert indices(frames) == expected_indices(start, 17, 30, 16)
    full = decode_window(corpus["c30_gop"], Window(0.0, 30, 16, 30))
    assert np.array_equal(full[start:start + 17], frames)


@pytest.mark.parametrize("name, fps", [("mkv", 30), ("webm", 12), ("avi", 12), ("mov", 24)])
def test_other_containers_and_codecs(corpus, name, fps):
    meta = probe_video(str(corpus[name]))
    assert meta["ok"] and meta["fps"] == fps
    frames = decode_window(corpus[name], Window(0.25, 9, fps, fps))
    start = round(0.25 * fps)
    got = indices(frames)
    # lossy mpeg4/vp8 move gray levels a little: allow one step
    assert all(abs(g - e) <= 1 for g, e in zip(got, range(start, start + 9))), got
    assert got == sorted(got)


def test_window_past_the_end_is_a_decode_error(corpus):
    with pytest.raises(DecodeError) as info:
        decode_window(corpus["c24"], Window(1.5, 17, 16, 24))
    assert info.value.reason == "truncated"
    again = pickle.loads(pickle.dumps(info.value))  # crosses DataLoader workers
    assert again.reason == "truncated" and again.message == info.value.message


def test_missing_file_is_a_decode_error(tmp_path):
    with pytest.raises(DecodeError) as info:
        decode_window(tmp_path / "gone.mp4", Window(0.0, 5, 16, 16))
    assert info.value.reason in ("missing", "undecodable")


def test_resize_without_crop_keeps_the_quadrants(corpus):
    frames = decode_window(corpus["quad"], Window(0.0, 1, 24, 24), size=(112, 64))
    f = frames[0].astype(int)
    assert f.shape == (64, 112, 3)
    # quadrant boundaries scale to x = 56, y = 32; sample away from the edges and the column
    for (y, x), colour in {(10, 50): RED, (10, 100): GREEN, (50, 10): BLUE, (50, 100): WHITE}.items():
        assert np.abs(f[y, x] - colour).max() < 24, ((y, x), f[y, x])
    # the yellow column (x = 40..43 of 160, centre 42) lands at 42 * 112 / 160 - 0.5 = 28.9
    yellow = np.where((f[5, :, 0] > 200) & (f[5, :, 1] > 200) & (f[5, :, 2] < 120))[0]
    assert yellow.size and abs(yellow.mean() - 28.9) < 1.0


def test_center_crop_cuts_the_sides(corpus):
    box = crop_box(160, 96, (48, 48), crop=True)  # x 32..128 of 160
    frames = decode_window(corpus["quad"], Window(0.0, 1, 24, 24), size=(48, 48), crop=box)
    f = frames[0].astype(int)
    assert f.shape == (48, 48, 3)
    # the vertical quadrant boundary (x = 80) is now in the middle (x = 24)
    assert np.abs(f[10, 18] - RED).max() < 24 and np.abs(f[10, 30] - GREEN).max() < 24
    assert np.abs(f[40, 18] - BLUE).max() < 24 and np.abs(f[40, 30] - WHITE).max() < 24
    # the yellow column (centre x = 42 in the source) is 10 px into the crop: 5 px at half scale
    yellow = np.where((f[30, :, 0] > 200) & (f[30, :, 1] > 200) & (f[30, :, 2] < 120))[0]
    assert yellow.size and abs(yellow.mean() - 4.5) < 1.0


def test_random_crop_moves_the_column(corpus):
    import random

    box = crop_box(160, 96, (48, 48), True, "random", random.Random(2))
    frames = decode_window(corpus["quad"], Window(0.0, 1, 24, 24), size=(48, 48), crop=box)
    f = frames[0].astype(int)
    yellow = np.where((f[30, :, 0] > 200) & (f[30, :, 1] > 200) & (f[30, :, 2] < 120))[0]
    expected = (42 - box[0]) * 48 / 96 - 0.5  # column centre, in output pixels
    assert box[0] == 7  # seed 2: far from the centred 32, so the column moves by 12 px
    assert yellow.size and abs(yellow.mean() - expected) < 1.0


def test_display_rotation_is_applied(corpus):
    meta = probe_video(str(corpus["rotated"]))
    assert (meta["width"], meta["height"], meta["rotation"]) == (160, 96, 90)
    frames = decode_window(corpus["rotated"], Window(0.0, 1, 24, 24), rotation=90)
    f = frames[0].astype(int)
    assert f.shape == (160, 96, 3)
    # 90 degrees counter-clockwise: the top-right (green) quadrant goes to the top-left
    assert np.abs(f[20, 20] - GREEN).max() < 24
    assert np.abs(f[140, 20] - RED).max() < 24
    assert np.abs(f[20, 76] - WHITE).max() < 24


def test_frames_to_tensor_layout_and_range():
    frames = np.zeros((5, 4, 6, 3), np.uint8)
    frames[:, :, :, 0] = 255
    video = frames_to_tensor(frames)
    assert video.shape == (3, 5, 4, 6) and video.dtype == torch.float32 and video.is_contiguous()
    assert torch.all(video[0] == 1.0) and torch.all(video[1:] == -1.0)


def test_unused_nonreference_frames_are_skipped_without_changing_the_result(corpus, monkeypatch):
    import job.data.decode as decode

    calls = {"skipped": 0}
    real = decode._h264_nonref

    def counting(packet, size):
        result = real(packet, size)
        calls["skipped"] += result
        return result

    monkeypatch.setattr(decode, "_h264_nonref", counting)
    window = Window(5 / 16, 17, 16, 30)
    fast = decode_window(corpus["c30_bframes"], window, size=(48, 32))
    assert calls["skipped"] > 5  # B-frames the window does not use were never decoded
    monkeypatch.setattr(decode, "SKIP_UNUSED_NONREF", False)
    slow = decode_window(corpus["c30_bframes"], window, size=(48, 32))
    assert np.array_equal(fast, slow)
    assert indices(decode_window(corpus["c30_bframes"], window)) == expected_indices(5, 17, 30, 16)


def test_bfloat16_tensors(corpus):
    frames = decode_window(corpus["quad"], Window(0.1, 5, 16, 24), size=(48, 32))
    half = frames_to_tensor(frames, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), frames_to_tensor(frames), atol=8e-3)


def _colour_texture(i: int, w: int, h: int) -> np.ndarray:
    """Smooth colour gradients plus sharp coloured blocks that move: chroma detail at every scale."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // w + 3 * i) % 256, y * 255 // h, ((x + y + 5 * i) % 32) * 8], -1).astype(np.uint8)
    img[10:30, 20 + i:50 + i] = (250, 20, 200)
    img[h // 2:h // 2 + 12, w // 3:w // 3 + 9] = (10, 240, 30)
    return img


@pytest.fixture(scope="module")
def colour_clip(tmp_path_factory):
    from data_helpers import make_video

    return make_video(tmp_path_factory.mktemp("colour") / "colour.mp4", 160, 96, 24, 24, pattern=_colour_texture,
                      options={"crf": "12", "preset": "ultrafast"})


@pytest.mark.parametrize("name, window, size, crop, rotation", [
    ("colour", Window(0.0, 9, 16, 24), (112, 64), None, 0),
    ("colour", Window(0.1, 5, 24, 24), (48, 48), crop_box(160, 96, (48, 48), True), 0),
    ("quad", Window(0.0, 3, 24, 24), (112, 64), None, 0),
    ("rotated", Window(0.0, 3, 24, 24), (48, 80), None, 90),
    ("c12", Window(0.0, 9, 16, 12), (48, 32), None, 0),  # upsampling: repeated frames are copies
])
def test_planar_rgb_matches_the_packed_exact_chroma_path(corpus, colour_clip, monkeypatch, name, window, size, crop, rotation):
    import job.data.decode as decode

    path = colour_clip if name == "colour" else corpus[name]
    planar = decode_window(path, window, size=size, crop=crop, rotation=rotation)
    monkeypatch.setattr(decode, "PLANAR_RGB", False)
    packed = decode_window(path, window, size=size, crop=crop, rotation=rotation)
    assert planar.shape == packed.shape == (window.num_frames, size[1], size[0], 3)
    assert planar.dtype == np.uint8 and planar.flags.c_contiguous
    diff = planar.astype(int) - packed
    # swscale's planar and packed RGB outputs round a few values differently, never by more than 1
    assert np.abs(diff).max() <= 1
    assert np.abs(diff).mean() < 0.02, np.abs(diff).mean()


def test_one_single_threaded_swscale_context_serves_the_whole_window(corpus, monkeypatch):
    """PyAV's `frame.reformat` sets up a new swscale context (and thread pool) per frame: the
    decoder must not use it, but one single-threaded reformatter per window."""
    from av.video import reformatter

    made, calls = [], []
    real = reformatter.VideoReformatter

    class Counting:  # PyAV's class cannot be subclassed: wrap it
        def __init__(self):
            made.append(self)
            self.real = real()

        def reformat(self, frame, *args, **kwargs):
            calls.append(kwargs.get("threads"))
            return self.real.reformat(frame, *args, **kwargs)

    monkeypatch.setattr(reformatter, "VideoReformatter", Counting)
    frames = decode_window(corpus["c24"], Window(0.0, 17, 16, 24), size=(48, 32))
    assert len(made) == 1 and len(calls) == 17 and set(calls) == {1}
    assert indices(frames) == expected_indices(0, 17, 24, 16)
