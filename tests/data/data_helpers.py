"""Helpers for the data tests: real, tiny videos written with PyAV.

Patterns that make decoding checkable:
- `counter`: every pixel of frame i is gray level 8 + 4 * i, so a decoded frame tells its index.
- `quadrants`: red / green / blue / white quadrants and a yellow 4-px column at a known x, so a
  crop or resize shows where it cut.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np

from job.spec import JobSpec
from job.workspace import Workspace

RED, GREEN, BLUE, WHITE = (220, 30, 30), (30, 200, 30), (30, 30, 220), (235, 235, 235)


def counter_level(i: int) -> int:
    return 8 + 4 * i


def frame_index(rgb: np.ndarray) -> int:
    """Index of a `counter` frame from its mean gray level."""
    return int(round((float(rgb.mean()) - 8) / 4))


def counter_pattern(i: int, w: int, h: int) -> np.ndarray:
    return np.full((h, w, 3), counter_level(i), np.uint8)


def quadrant_pattern(i: int, w: int, h: int, column: int | None = None) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = RED
    img[: h // 2, w // 2:] = GREEN
    img[h // 2:, : w // 2] = BLUE
    img[h // 2:, w // 2:] = WHITE
    if column is not None:
        img[:, column:column + 4] = (255, 255, 0)  # yellow, 4 px wide
    return img


def make_video(path: Path, w: int, h: int, fps: int, n: int, codec: str = "libx264", pattern=counter_pattern,
               options: dict | None = None, container_options: dict | None = None, rotation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps, options=options if options is not None else ({"qp": "0", "preset": "ultrafast"} if codec == "libx264" else {}))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 4_000_000
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(pattern(i, w, h), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for i in range(8):
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def put(corpus_file: Path, dest: Path, caption: str | bytes | None = None) -> Path:
    """Copy a corpus clip to `dest` (and write its .txt caption)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(corpus_file, dest)
    if caption is not None:
        txt = dest.with_suffix(".txt")
        txt.write_bytes(caption if isinstance(caption, bytes) else caption.encode("utf-8"))
    return dest


def make_spec(workspace: Path, datasets: list[dict], train: dict | None = None, **data) -> JobSpec:
    for ds in datasets:
        ds.setdefault("resolution", 64)
        ds.setdefault("video", {"num_frames": 9})
    return JobSpec.model_validate({
        "workspace": str(workspace),
        "data": {"datasets": datasets, **data},
        "train": {"max_train_steps": 1, **(train or {})},
    })


def workspace_for(spec: JobSpec) -> Workspace:
    return Workspace.for_spec(spec)
