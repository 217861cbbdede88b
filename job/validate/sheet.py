"""Still images of videos: the per-step contact sheet and the preview frame strip (PNG bytes)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .video import to_uint8

LABEL_HEIGHT = 18
PAD = 4
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)


def pick_frames(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly from the first to the last frame."""
    count = max(1, min(count, num_frames))
    return sorted({int(round(i)) for i in np.linspace(0, num_frames - 1, count)})


def _thumb(frame: np.ndarray, height: int) -> Image.Image:
    image = Image.fromarray(frame)
    if image.height != height:
        width = max(1, round(image.width * height / image.height))
        resample = Image.Resampling.NEAREST if height > image.height else Image.Resampling.LANCZOS
        image = image.resize((width, height), resample)
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _font():
    return ImageFont.load_default()


def frame_strip_png(frames: np.ndarray, count: int = 4, height: int | None = None) -> bytes:
    """A row of `count` frames of one video [F, H, W, 3] (float [0, 1] or uint8) as PNG bytes."""
    frames = to_uint8(frames)
    height = height or frames.shape[1]
    thumbs = [_thumb(frames[i], height) for i in pick_frames(frames.shape[0], count)]
    width = sum(t.width for t in thumbs) + PAD * (len(thumbs) - 1)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    x = 0
    for t in thumbs:
        sheet.paste(t, (x, 0))
        x += t.width + PAD
    return _png(sheet)


def contact_sheet_png(videos: Sequence[tuple[str, np.ndarray]], frames_per_video: int = 4,
                      thumb_height: int = 160) -> bytes:
    """One row per video: its label, then `frames_per_video` frames. PNG bytes."""
    rows: list[tuple[str, list[Image.Image]]] = []
    for label, frames in videos:
        frames = to_uint8(frames)
        height = min(thumb_height, max(64, frames.shape[1]))
        rows.append((label, [_thumb(frames[i], height) for i in pick_frames(frames.shape[0], frames_per_video)]))
    if not rows:
        raise ValueError("contact sheet of no videos")
    font = _font()
    row_widths = [sum(t.width for t in thumbs) + PAD * (len(thumbs) - 1) for _, thumbs in rows]
    width = max(max(row_widths), 200) + 2 * PAD
    height = sum(LABEL_HEIGHT + thumbs[0].height + PAD for _, thumbs in rows) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for label, thumbs in rows:
        draw.text((PAD, y + 2), label, fill=TEXT, font=font)
        y += LABEL_HEIGHT
        x = PAD
        for t in thumbs:
            sheet.paste(t, (x, y))
            x += t.width + PAD
        y += thumbs[0].height + PAD
    return _png(sheet)
