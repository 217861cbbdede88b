"""`trainer smoke`: a whole job on a tiny random model and synthetic clips, on the CPU.

It checks that a fresh machine (or the container) can run every phase, in
about a minute, with nothing downloaded. The same material backs CI's
end-to-end tests.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CAPTIONS = (
    "a red square moving to the right",
    "a green square moving down",
    "a blue square moving to the left",
    "a yellow square moving up",
)
_COLOURS = ((230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40))
_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def write_synthetic_clip(path: Path, index: int, frames: int = 17, width: int = 96, height: int = 64, fps: int = 8) -> None:
    """An H.264 clip of a coloured square moving over a gradient; content depends on `index`."""
    import av

    colour = _COLOURS[index % len(_COLOURS)]
    dx, dy = _DIRECTIONS[index % len(_DIRECTIONS)]
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), np.full_like(xx, 96)], axis=-1).astype(np.uint8)
    side = max(8, min(width, height) // 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for t in range(frames):
            image = background.copy()
            x = (width // 2 - side // 2 + dx * t * 2 + index * 3) % (width - side)
            y = (height // 2 - side // 2 + dy * t * 2 + index * 2) % (height - side)
            image[y:y + side, x:x + side] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def write_synthetic_dataset(folder: Path, clips: int = 4, frames: int = 17, width: int = 96, height: int = 64, fps: int = 8) -> list[Path]:
    """`clip_000.mp4` + `clip_000.txt` pairs (caption_strategy: textfile)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(clips):
        video = folder / f"clip_{i:03d}.mp4"
        write_synthetic_clip(video, i, frames=frames, width=width, height=height, fps=fps)
        video.with_suffix(".txt").write_text(CAPTIONS[i % len(CAPTIONS)] + "\n", encoding="utf-8")
        paths.append(video)
    return paths


@dataclass
class SmokeMaterial:
    workspace: Path
    model_dir: Path
    dataset_dir: Path


def prepare_smoke_workspace(workspace: Path, fresh: bool = False) -> SmokeMaterial:
    """The tiny model and synthetic clips `specs/smoke-cpu.yaml` expects, under `workspace`."""
    from job.models.sanavideo.tiny import build_tiny_model

    workspace = workspace.absolute()
    if fresh and workspace.exists():
        shutil.rmtree(workspace)
    model_dir = workspace / "models" / "tiny-sanavideo"
    dataset_dir = workspace / "datasets" / "synthetic"
    if not (model_dir / "model_index.json").exists():
        build_tiny_model(model_dir)
    if not any(dataset_dir.glob("*.mp4")):
        write_synthetic_dataset(dataset_dir)
    return SmokeMaterial(workspace=workspace, model_dir=model_dir, dataset_dir=dataset_dir)
