"""Pure arithmetic of the data pipeline: frame windows, target sizes, crop boxes, bucket keys.

No I/O and no torch here, so it is cheap to import in probe workers and easy to test.

Sizes
-----
`pixel_area` keeps each clip's aspect ratio at about the pixel count of the model's *native*
frame at `resolution`. The native frame of SANA-Video / Wan at 480 is 832x480 (aspect 26:15),
so the native area at resolution R is

    native_area(R) = R * round16(R * 832 / 480)          480 -> 480 * 832 = 399,360 px
                                                         720 -> 720 * 1248 = 898,560 px

and a clip of aspect a = w/h gets W = round16(sqrt(area * a)), H = round16(sqrt(area / a)).
An 832x480 clip gives exactly 832x480; a 16:9 clip (1280x720) gives 848x480 (its own aspect
at about the same area: resizing it to 832x480 would squash it by 2.5 %); a portrait 480x832
clip gives 480x832 (the rule is symmetric under transposition), a square clip 624x624, 4:3 736x544.
At tiny resolutions (tests) the 16-px rounding distorts more: 64x48 at resolution 64 -> 96x80.

`pixel` makes the shorter side `resolution` (a multiple of 16, checked by the spec rules) and the
longer side round16(resolution * aspect).

`round16` rounds to the *nearest* multiple of 16 (halves up), never below 16.

Buckets
-------
Every bucket key reads `WxH@F` (e.g. `832x480@81`): a batch must stack into one tensor, so
samples of one bucket share width, height and frame count.

- `aspect_ratio`: the aspect (long side / short side) is first rounded to 2 decimals (1.78, 1.33,
  ...) and the size is computed from the rounded aspect, so clips with nearly the same aspect share a bucket.
  F is `num_frames`, or, for a clip shorter than that but not below `min_frames`, the largest
  4k+1 count it holds (such clips form their own `@F` bucket: lengths cannot be mixed).
- `resolution_frames`: the size comes from the clip's exact aspect, and the frame count of a
  clip shorter than `num_frames` is first rounded down to a multiple of `frame_interval` and
  then down to 4k+1 (mixed-duration datasets then fall into a few `@F` buckets).

Windows
-------
Frames are counted *after* resampling to the target rate. `max_frames` limits the span of a
clip that is used (its first `max_frames` frames); windows of `num_frames` are cut inside it:
`windows: one` takes the first window, `all` takes every non-overlapping window.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from job.spec.base import SPATIAL_MULTIPLE, nearest_4k_plus_1
from job.spec.data import VideoDataset, VideoOptions

#: The native frame of the model at 480: 832x480.
NATIVE_WIDTH_480 = 832
NATIVE_HEIGHT_480 = 480


def round16(value: float) -> int:
    """Nearest multiple of 16 (halves up), at least 16."""
    return max(SPATIAL_MULTIPLE, int(math.floor(value / SPATIAL_MULTIPLE + 0.5)) * SPATIAL_MULTIPLE)


def native_area(resolution: int) -> int:
    """Pixel count of the model's native frame at `resolution`: 480 -> 832 * 480 = 399,360."""
    return resolution * round16(resolution * NATIVE_WIDTH_480 / NATIVE_HEIGHT_480)


def display_size(width: int, height: int, rotation: int) -> tuple[int, int]:
    """Size as shown (a clip stored 1920x1080 with a 90 degree display rotation is 1080x1920)."""
    return (height, width) if rotation % 180 else (width, height)


def downsampled_size(width: int, height: int, ds: VideoDataset) -> tuple[int, int]:
    """`maximum_image_size` / `target_downsample_size`: oversized clips first shrink (aspect kept).

    Both resolution types are scale-invariant (they depend on the aspect only), so this stage
    only changes the rounding of the aspect; the pixels are resampled once, from the source
    straight to the target size, which is the same picture up to interpolation and faster.
    """
    short = min(width, height)
    if ds.maximum_image_size and ds.target_downsample_size and short > ds.maximum_image_size:
        scale = ds.target_downsample_size / short
        return max(1, round(width * scale)), max(1, round(height * scale))
    return width, height


def bucket_aspect(width: int, height: int) -> float:
    """The aspect used for `aspect_ratio` bucketing: long side / short side rounded to 2 decimals
    (1.78 for 16:9), as w / h. Rounding the long/short ratio keeps portrait and landscape symmetric."""
    if width >= height:
        return round(width / height, 2)
    return 1.0 / round(height / width, 2)


def target_size(width: int, height: int, ds: VideoDataset) -> tuple[int, int]:
    """Target (W, H), both multiples of 16, for a clip of (display) size width x height."""
    w, h = downsampled_size(width, height, ds)
    aspect = bucket_aspect(w, h) if ds.video.bucket_strategy == "aspect_ratio" else w / h
    if ds.resolution_type == "pixel_area":
        area = native_area(ds.resolution)
        return round16(math.sqrt(area * aspect)), round16(math.sqrt(area / aspect))
    # pixel: the shorter side becomes `resolution`
    if aspect >= 1:
        return round16(ds.resolution * aspect), round16(ds.resolution)
    return round16(ds.resolution), round16(ds.resolution / aspect)


def crop_box(width: int, height: int, target: tuple[int, int], crop: bool, style: str = "center",
             rng: random.Random | None = None) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the source region that becomes the target frame.

    Without `crop` the whole frame is resized to the target (a small aspect change at most,
    since targets follow the clip's aspect). With `crop` the region is the largest one of the
    target's exact aspect, centred or placed by `rng` (seeded by the caller: reproducible).
    """
    if not crop:
        return 0, 0, width, height
    tw, th = target
    if width * th > height * tw:  # source is wider than the target: cut the sides
        cw, ch = min(width, max(1, round(height * tw / th))), height
    else:  # taller: cut top and bottom
        cw, ch = width, min(height, max(1, round(width * th / tw)))
    if style == "random":
        rng = rng or random.Random(0)
        left, top = rng.randint(0, width - cw), rng.randint(0, height - ch)
    else:
        left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, cw, ch


def scaled_layout(width: int, height: int, box: tuple[int, int, int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """How to produce the target from the whole frame with one resize and one slice.

    Returns (scaled_width, scaled_height, offset_x, offset_y): resize the whole (display) frame to
    scaled_width x scaled_height, then take target[0] x target[1] pixels at the offset.
    """
    left, top, cw, ch = box
    tw, th = target
    sx, sy = tw / cw, th / ch
    sw, sh = max(tw, round(width * sx)), max(th, round(height * sy))
    ox = min(max(0, round(left * sx)), sw - tw)
    oy = min(max(0, round(top * sy)), sh - th)
    return sw, sh, ox, oy


def resampled_frames(frames: int, duration: float | None, source_fps: float, fps: float) -> int:
    """Frames a clip holds when sampled at `fps`: targets j / fps for every j with j / fps < duration.

    `duration` is the time the clip's frames cover (frames / source_fps for constant-rate clips).
    """
    covered = duration if duration and duration > 0 else frames / source_fps
    covered = min(covered, frames / source_fps) if frames > 0 else covered
    return max(0, math.ceil(covered * fps - 1e-6))


@dataclass(frozen=True)
class WindowPlan:
    """The windows of one clip, or why it has none."""

    length: int  # frames per window (4k+1), 0 when skipped
    starts: tuple[int, ...]  # start frames (at the target rate)
    skip_reason: str | None = None


def plan_windows(available: int, video: VideoOptions) -> WindowPlan:
    """Windows of a clip holding `available` frames at the target rate (see the module doc)."""
    min_frames = video.min_frames if video.min_frames is not None else video.num_frames
    if available < min_frames:
        return WindowPlan(0, (), f"{available} frames < min_frames {min_frames}")
    span = min(available, video.max_frames) if video.max_frames else available
    if span >= video.num_frames:
        length = video.num_frames
    else:
        usable = span
        if video.bucket_strategy == "resolution_frames" and video.frame_interval:
            usable = span // video.frame_interval * video.frame_interval
        length = nearest_4k_plus_1(usable) if usable >= 1 else 0
        if length < min_frames or length < 1:
            return WindowPlan(0, (), f"{span} frames round to {length} (frame_interval {video.frame_interval}, 4k+1) < min_frames {min_frames}")
    if video.windows == "all":
        starts = tuple(range(0, span - length + 1, length))
    else:
        starts = (0,)
    return WindowPlan(length, starts)


def bucket_key(target: tuple[int, int], frames: int) -> str:
    return f"{target[0]}x{target[1]}@{frames}"


def parse_bucket_key(key: str) -> tuple[int, int, int]:
    """'832x480@81' -> (832, 480, 81)."""
    size, frames = key.split("@")
    w, h = size.split("x")
    return int(w), int(h), int(frames)
