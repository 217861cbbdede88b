"""Fixtures for the data tests: one corpus of real tiny clips per session (~1 s to build)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from data_helpers import make_audio_only, make_video, quadrant_pattern


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Good and broken clips, generated once. Read-only: copy them into a test's own folder."""
    root = tmp_path_factory.mktemp("corpus")
    v: dict[str, Path] = {}
    v["c30"] = make_video(root / "c30.mp4", 64, 48, 30, 60)  # 2 s counter at 30 fps
    v["c24"] = make_video(root / "c24.mp4", 64, 48, 24, 48)  # 2 s at 24 fps
    v["c12"] = make_video(root / "c12.mp4", 64, 48, 12, 24)  # 2 s at 12 fps
    v["c30_gop"] = make_video(root / "c30_gop.mp4", 64, 48, 30, 60, options={"qp": "0", "preset": "ultrafast", "g": "10"})
    v["mkv"] = make_video(root / "c30.mkv", 64, 48, 30, 40)
    v["webm"] = make_video(root / "c12.webm", 64, 48, 12, 20, codec="libvpx", options={"crf": "4", "b:v": "0"})
    v["avi"] = make_video(root / "c12.avi", 64, 48, 12, 20, codec="mpeg4")
    v["mov"] = make_video(root / "c24.mov", 64, 48, 24, 24, codec="mpeg4")
    v["quad"] = make_video(root / "quad.mp4", 160, 96, 24, 24, pattern=lambda i, w, h: quadrant_pattern(i, w, h, column=40))
    v["portrait"] = make_video(root / "portrait.mp4", 96, 160, 24, 24, pattern=quadrant_pattern)
    v["square"] = make_video(root / "square.mp4", 96, 96, 24, 24, pattern=quadrant_pattern)
    # non-reference B-frames (lossless x264 uses none, qp 1 keeps the levels): exercises skipping them
    v["c30_bframes"] = make_video(root / "c30_b.mp4", 64, 48, 30, 60,
                                  options={"qp": "1", "x264-params": "bframes=3:b-adapt=0:b-pyramid=none"})
    v["one_frame"] = make_video(root / "one.mp4", 64, 48, 24, 1)
    v["rotated"] = make_video(root / "rotated.mp4", 160, 96, 24, 24, pattern=quadrant_pattern, rotation=90)
    faststart = make_video(root / "fs.mp4", 64, 48, 24, 48, container_options={"movflags": "faststart"})
    data = faststart.read_bytes()
    (root / "truncated_fs.mp4").write_bytes(data[: len(data) // 3])
    v["truncated_fs"] = root / "truncated_fs.mp4"
    data = v["c24"].read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end: gone
    v["truncated"] = root / "truncated.mp4"
    (root / "zero.mp4").write_bytes(b"")
    v["zero"] = root / "zero.mp4"
    (root / "random.mkv").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    v["random"] = root / "random.mkv"
    v["audio"] = make_audio_only(root / "audio.mp4")
    # an AVI whose codec tag no decoder knows (the MPEG-4 tag FMP4 renamed)
    (root / "wrong_codec.avi").write_bytes(v["avi"].read_bytes().replace(b"FMP4", b"ZZZ9"))
    v["wrong_codec"] = root / "wrong_codec.avi"
    return v


@pytest.fixture
def mtime_safe():
    """Some filesystems have coarse mtimes: helper to bump a file's mtime for sure."""

    def bump(path: Path) -> None:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))

    return bump
