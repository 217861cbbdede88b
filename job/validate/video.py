"""Writing validation videos: H.264 / yuv420p MP4 through PyAV, atomically.

Why not diffusers' `export_to_video`: in diffusers 0.42 it writes through imageio-ffmpeg (or a
legacy OpenCV path with the `mp4v` codec, which browsers do not play), not PyAV. PyAV ships
its own FFmpeg with libx264, so we encode directly:

- codec libx264 (an H.264 fallback encoder if this FFmpeg build lacks it; MPEG-4 part 2 as the
  last resort, with a warning: browsers will not play that one), CRF 18, `yuv420p`;
- even width and height (yuv420p needs them; frames are edge-padded by a pixel if needed);
- `movflags=+faststart` (the index is at the front, so a browser starts playing before the
  whole file has arrived);
- written to a temporary name in the same folder, fsynced, then renamed: an uploader that
  watches the folder never picks up half a video.
"""

from __future__ import annotations

import logging
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from job.workspace import fsync_dir

log = logging.getLogger("trainer.validate")

H264_ENCODERS = ("libx264", "libopenh264", "h264")
_warned_fallback = False


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] float in [0, 1] (or uint8) -> uint8, rounded and clipped."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def even_frames(frames: np.ndarray) -> np.ndarray:
    """Pad [F, H, W, 3] by one edge pixel where a side is odd (yuv420p needs even sides)."""
    _, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def pick_encoder() -> str:
    """The best H.264 encoder this PyAV build has (libx264 in the PyAV wheels)."""
    import av

    global _warned_fallback
    for name in H264_ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - unknown encoder in this build
            continue
    if not _warned_fallback:
        log.warning("this PyAV/FFmpeg build has no H.264 encoder; validation videos are MPEG-4 part 2 "
                    "(VLC plays them, browsers may not)")
        _warned_fallback = True
    return "mpeg4"


def encode_mp4(path: Path | str, frames: np.ndarray, fps: int, crf: int = 18) -> None:
    """Encode [F, H, W, 3] frames (float in [0, 1] or uint8) into an MP4 at `path` (not atomic)."""
    import av

    frames = even_frames(to_uint8(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected frames shaped [F, H, W, 3], got {frames.shape}")
    _, height, width, _ = frames.shape
    codec = pick_encoder()
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(codec, rate=Fraction(int(fps), 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, int(fps))
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "medium", "profile": "high"}
        elif codec == "mpeg4":
            stream.options = {"qscale": "3"}
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = i
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_mp4(path: Path | str, frames: np.ndarray, fps: int, crf: int = 18) -> Path:
    """`encode_mp4` to a temporary file next to `path`, fsync, rename: the video is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.mp4", dir=path.parent)
    os.close(fd)
    try:
        encode_mp4(tmp, frames, fps, crf)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def read_mp4(path: Path | str) -> tuple[np.ndarray, dict]:
    """Decode an MP4 back to uint8 [F, H, W, 3] plus {codec, pix_fmt, width, height, fps, frames}."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate) if stream.average_rate else None,
        }
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    info["frames"] = len(frames)
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8), info
