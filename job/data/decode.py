"""Decoding the frames of one window with PyAV, resized (and cropped) in FFmpeg's swscale.

Only what a window needs is decoded: the container seeks to the keyframe at or before the
window's start (a backward seek), decodes forward, and stops after the window's last frame.

Frames are picked by timestamp, which resamples to the target rate and copes with variable
frame rates: target frame j of a window starting at `start_time` is at
`first_time + start_time + j / fps`, and takes the decoded frame *nearest* to that time (a tie
goes to the earlier frame; ties are judged with a margin of 1/1000 frame, so rounded container
timestamps do not flip them). For a constant-rate source frame k = ceil(j * source_fps / fps - 1/2).
Upsampling (a 12 fps clip at 16 fps) repeats frames; downsampling skips them. Skipped frames
are never converted to RGB, and for H.264 (mp4/mov/mkv) a skipped frame that no other frame
references (nal_ref_idc 0, typically half the B-frames) is not even decoded; the others must be,
as later frames are predicted from them.

Each used frame is converted to RGB and resized in one swscale call (AREA interpolation:
averages when downscaling, no aliasing; chroma interpolated at full resolution, see PLANAR_RGB)
into planar RGB, whose planes are read through views of its buffer and interleaved straight into
the output array; a crop is a slice of the resized frame. A display rotation (phones) is applied
after the resize. One single-threaded swscale context serves the whole window.

Speed (bench/decode.py, bench/RESULTS.md): decoding the source frames is ~60 % of a clip's time,
the RGB conversion + resize ~25 %, interleaving ~10 %, opening the file ~5 %; one worker process
per core with a single FFmpeg thread each is the fastest arrangement.
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass

import numpy as np

from job.errors import InputError

from .geometry import display_size, scaled_layout

log = logging.getLogger("trainer.data")

#: swscale interpolation used for resizing. AREA averages when downscaling (no aliasing).
INTERPOLATION = "AREA"
#: Convert to planar RGB (swscale's gbrp output, then interleaved by numpy) rather than packed rgb24.
#: swscale's planar RGB output always interpolates chroma at full resolution and has a SIMD path: at
#: 832x480 it takes ~1.2 ms a frame (+0.5 ms to interleave) where packed rgb24 with the exact chroma
#: path takes ~2.5 ms. Its pixels equal that path's within 1 level (~0.2 % of values differ by 1,
#: mean difference < 0.01 level; measured by bench/decode.py, tested).
PLANAR_RGB = True
#: swscale's exact chroma path (FULL_CHR_H_INT | ACCURATE_RND) for packed rgb24 (PLANAR_RGB off; the
#: planar output always has it). Without it the scaled RGB output is ~2.5 levels too dark on average
#: and chroma edges are off (mean error 3.7 vs 1.6 levels against a float reference).
ACCURATE_COLOR = True
#: Skip decoding H.264 frames that are neither used by the window nor referenced by other frames.
SKIP_UNUSED_NONREF = True


class DecodeError(InputError):
    """A clip that could not be decoded when its frames were needed. Picklable (crosses DataLoader workers)."""

    def __init__(self, message: str, fix: str | None = None, reason: str = "undecodable", path: str | None = None):
        super().__init__(message, fix or "the clip is skipped and reported; replace or remove the file")
        self.reason = reason
        self.path = path

    def __reduce__(self):
        return (type(self), (self.message, self.fix, self.reason, self.path))


@dataclass(frozen=True)
class Window:
    """What to decode: `num_frames` frames at `fps` from `start_time` seconds after the first frame."""

    start_time: float
    num_frames: int
    fps: float
    source_fps: float
    first_time: float = 0.0

    def times(self) -> list[float]:
        return [self.first_time + self.start_time + j / self.fps for j in range(self.num_frames)]


def normalize_rotation(rotation: int | float | None) -> int:
    """Display rotation rounded to 0 / 90 / 180 / 270 (counter-clockwise)."""
    return (int(round((rotation or 0) / 90.0)) % 4) * 90


def decode_window(path: str | os.PathLike, window: Window, *, size: tuple[int, int] | None = None,
                  crop: tuple[int, int, int, int] | None = None, rotation: int = 0,
                  thread_type: str = "AUTO", threads: int = 0, interpolation: str = INTERPOLATION,
                  alpha: bool = False) -> np.ndarray:
    """uint8 frames [F, H, W, 3] of `window`, resized to `size` (W, H) from the `crop` box.

    `crop` is (left, top, width, height) in display (rotation-applied) source pixels; None is the
    whole frame. Without `size` frames keep their source size. `alpha=True` returns the alpha
    channel instead, [F, H, W] (255 where the video has none). Raises DecodeError.
    """
    return _decode(path, window, size, crop, rotation, thread_type, threads, interpolation, alpha)


def has_alpha(path: str | os.PathLike) -> bool:
    """Whether the video's first stream decodes to a pixel format with an alpha channel (PNG / QuickTime
    RLE / ProRes 4444 in MOV, FFV1 with alpha, ...). VP9 alpha in WebM is not seen: FFmpeg's own VP9
    decoder drops it."""
    import av
    from av.video.format import VideoFormat

    with av.open(str(path), metadata_errors="ignore") as container:
        fmt = container.streams.video[0].codec_context.format
        return fmt is not None and len(VideoFormat(fmt.name).components) in (2, 4)  # gray+alpha, colour+alpha


def _decode(path, window: Window, size, crop, rotation, thread_type, threads, interpolation, alpha=False):
    import av

    path = str(path)
    rotation = normalize_rotation(rotation)
    times = window.times()
    if not times:
        raise ValueError("a window needs at least one frame")
    # seek plan: straight to the window, a few seconds earlier if the seek overshoots, then the start
    attempts: list[float | None] = [None]
    if window.start_time > 0:
        attempts = [times[0], max(window.first_time, times[0] - 5.0), None]
    last_error: Exception | None = None
    for seek_to in attempts:
        try:
            result = _decode_once(av, path, times, window, seek_to, size, crop, rotation, thread_type, threads, interpolation,
                                  alpha)
        except FileNotFoundError as exc:
            raise DecodeError(f"{path}: the file disappeared after it was discovered", reason="missing", path=path) from exc
        except (av.error.FFmpegError, OSError, EOFError) as exc:  # not ValueError & co: bugs must not look like broken files
            last_error = exc  # a failed seek may succeed from further back; corrupt data fails every try
            continue
        if result is None:  # the seek landed after the window: try earlier
            log.debug("%s: seek to %.3f s overshot; seeking earlier", path, seek_to or 0.0)
            continue
        frames, got = result
        if got < len(times):
            raise DecodeError(
                f"{path}: only {got} of {len(times)} frames could be decoded from {window.start_time:.2f} s (the file ends early: truncated?)",
                reason="truncated", path=path)
        return frames
    if last_error is not None:
        raise DecodeError(f"{path}: cannot decode ({type(last_error).__name__}: {last_error})", reason="undecodable", path=path) from last_error
    raise DecodeError(f"{path}: cannot find the frames at {window.start_time:.2f} s", reason="undecodable", path=path)


def _swscale_flags(interpolation: str) -> int:
    from av.video.reformatter import Interpolation

    flags = int(Interpolation[interpolation])
    if ACCURATE_COLOR:
        flags |= int(Interpolation.FULL_CHR_H_INT) | int(Interpolation.ACCURATE_RND)
    return flags


def _decode_once(av, path, times, window: Window, seek_to, size, crop, rotation, thread_type, threads, interpolation,
                 alpha=False):
    from av.video.reformatter import VideoReformatter

    frame_dur = 1.0 / window.source_fps
    # a target T takes the previous frame while the current one is more than half a frame later
    eps = (0.5 - 1e-3) * frame_dur
    count = len(times)
    out: np.ndarray | None = None
    flags = _swscale_flags(interpolation)
    # One swscale context for the whole window, single-threaded: `frame.reformat` would set up a
    # new context (and, with its default threads=0, a thread pool) for every frame; parallelism
    # comes from one decode process per core.
    reformatter = VideoReformatter()
    with av.open(path, metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        stream.thread_type = thread_type
        if threads:
            stream.codec_context.thread_count = threads
        if seek_to is not None:
            container.seek(max(0, int(seek_to / float(stream.time_base))), stream=stream, backward=True, any_frame=False)

        layout = None  # (scaled stored w, h, display ox, oy, tw, th), fixed by the first frame
        j = 0
        prev = None
        prev_t = 0.0
        prev_at: int | None = None  # where `prev` was written in `out` (a repeated frame is copied from there)

        def convert_into(frame) -> None:
            """Convert + resize `frame` in one swscale call and write its crop into out[j]."""
            nonlocal layout, out
            if layout is None:
                dw, dh = display_size(frame.width, frame.height, rotation)
                tw, th = size if size is not None else (dw, dh)
                box = crop if crop is not None else (0, 0, dw, dh)
                sw, sh, ox, oy = scaled_layout(dw, dh, box, (tw, th))
                stored = (sh, sw) if rotation % 180 else (sw, sh)
                layout = (stored[0], stored[1], ox, oy, tw, th)
                out = np.empty((count, th, tw) if alpha else (count, th, tw, 3), dtype=np.uint8)
            w, h, ox, oy, tw, th = layout
            dest = out[j]
            if alpha:  # planar with alpha: G, B, R, A planes
                converted = reformatter.reformat(frame, width=w, height=h, format="gbrap", interpolation=flags, threads=1)
                dest[...] = _crop(_plane_view(converted.planes[3], h, w), rotation, ox, oy, tw, th)
            elif PLANAR_RGB:
                converted = reformatter.reformat(frame, width=w, height=h, format="gbrp", interpolation=flags, threads=1)
                for channel, plane in zip(_GBRP_CHANNELS, converted.planes):
                    dest[..., channel] = _crop(_plane_view(plane, h, w), rotation, ox, oy, tw, th)
            else:
                converted = reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation=flags, threads=1)
                plane = converted.planes[0]
                dest[...] = _crop(_plane_view(plane, h, w * 3).reshape(h, w, 3), rotation, ox, oy, tw, th)

        def emit(frame) -> None:
            nonlocal j, prev_at
            if prev_at is None:
                convert_into(frame)
                prev_at = j
            else:  # upsampling repeats a frame: copy it, do not convert it again
                out[j] = out[prev_at]
            j += 1

        for frame in _frames(container, stream, times, frame_dur):
            t = float(frame.time) if frame.time is not None else (prev_t + frame_dur if prev is not None else times[0])
            if prev is None and seek_to is not None and t > times[0] + eps:
                return None  # overshot the window start
            while j < count and times[j] + eps < t:
                if prev is None:  # the stream starts after the target (no seek): use its first frame
                    prev, prev_t, prev_at = frame, t, None
                emit(prev)
            if j >= count:
                break
            prev, prev_t, prev_at = frame, t, None
        else:
            # end of stream: the last frame covers one frame duration (plus slack for rounding)
            while j < count and prev is not None and times[j] < prev_t + 1.5 * frame_dur:
                emit(prev)
    if out is None:
        out = np.empty((0, 0, 0, 3), dtype=np.uint8)
    return out, j


#: swscale's gbrp output holds the planes G, B, R: their channels in RGB order.
_GBRP_CHANNELS = (1, 2, 0)


def _plane_view(plane, height: int, row_bytes: int) -> np.ndarray:
    """The [height, row_bytes] pixels of a frame plane, a view of its buffer (rows are padded to line_size)."""
    return np.frombuffer(plane, np.uint8).reshape(height, plane.line_size)[:, :row_bytes]


def _crop(pixels: np.ndarray, rotation: int, ox: int, oy: int, tw: int, th: int) -> np.ndarray:
    """The display-rotated crop of a resized (stored-orientation) plane or image, a view."""
    if rotation:
        pixels = np.rot90(pixels, k=rotation // 90)
    return pixels[oy:oy + th, ox:ox + tw]


def _frames(container, stream, times: list[float], frame_dur: float):
    """Decoded frames in presentation order; H.264 frames that no target needs and that no other
    frame references (nal_ref_idc 0) are not decoded at all (what FFmpeg's skip_frame=nonref does,
    but only for frames the window does not use)."""
    nal_size = _avcc_length_size(stream) if SKIP_UNUSED_NONREF else None
    if nal_size is None:
        yield from container.decode(stream)
        return
    tb = float(stream.time_base)
    reach = 0.6 * frame_dur  # a frame serves targets within half a frame; 0.1 frame of margin
    first, last = times[0] - reach, times[-1] + reach
    for packet in container.demux(stream):
        if packet.size and packet.pts is not None:
            t = packet.pts * tb
            if (t < first or t > last or not _near(times, t, reach)) and _h264_nonref(packet, nal_size):
                continue
        yield from packet.decode()


def _near(times: list[float], t: float, reach: float) -> bool:
    i = bisect.bisect_left(times, t - reach)
    return i < len(times) and times[i] <= t + reach


def _avcc_length_size(stream) -> int | None:
    """NAL length size of an H.264 stream in AVCC form (mp4, mov, mkv), else None."""
    ctx = stream.codec_context
    if ctx is None or ctx.name != "h264":
        return None
    extra = ctx.extradata
    if not extra or len(extra) < 7 or extra[0] != 1:
        return None  # Annex B (start codes): decode everything
    return (extra[4] & 3) + 1


_NONREF_OK_TYPES = {6, 9, 10, 11, 12}  # SEI, access unit delimiter, end of sequence/stream, filler


def _h264_nonref(packet, nal_size: int) -> bool:
    """True when every slice of the packet has nal_ref_idc 0 and it carries nothing else that matters."""
    data = memoryview(packet).cast("B")
    n = len(data)
    i = 0
    slices = 0
    while i + nal_size < n:
        length = int.from_bytes(data[i:i + nal_size], "big")
        header = data[i + nal_size]
        kind = header & 0x1F
        if kind in (1, 5):
            if header & 0x60:
                return False  # a reference slice
            slices += 1
        elif kind not in _NONREF_OK_TYPES:
            return False  # parameter sets, partitions, extensions: decode
        i += nal_size + length
    return slices > 0 and i == n


def frames_to_tensor(frames: np.ndarray, dtype=None):
    """uint8 [F, H, W, 3] -> torch tensor [3, F, H, W] in [-1, 1] (`dtype`, default float32)."""
    import torch

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)
    video = video.to(dtype or torch.float32, memory_format=torch.contiguous_format)
    return video.div_(127.5).sub_(1.0)
