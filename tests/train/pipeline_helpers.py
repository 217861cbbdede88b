"""Helpers for tests that run the real cache phase and then training: synthetic H.264 clips, a spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from job.spec import validate_data
from job.workspace import Workspace

FRAMES = 5  # pixel frames per sample -> 2 latent frames
SIZE = 64  # px -> 8x8 latents, 4x4 transformer tokens
CLIPS = 2


def write_clips(folder: Path, clips: int = CLIPS) -> Path:
    from job.smoke import write_synthetic_dataset

    write_synthetic_dataset(folder, clips=clips, frames=9, width=SIZE, height=SIZE, fps=8)
    return folder


def pipeline_spec(workspace: Path, model_path: Path, dataset: dict[str, Any] | None = None, **sections: dict[str, Any]):
    """A spec over `workspace/clips`: one dataset at 64 px and 5 frames, caching in fp32 on the CPU."""
    spec = loaded(workspace, model_path, dataset, **sections).spec
    return spec, Workspace.for_spec(spec)


def loaded(workspace: Path, model_path: Path, dataset: dict[str, Any] | None = None, **sections: dict[str, Any]):
    """`pipeline_spec`'s spec as a LoadedSpec (with its warnings); raises SpecErrors for bad ones. The train
    tests' base spec (`train_helpers.spec_dict`) with a real dataset of clips to cache."""
    from train_helpers import spec_dict

    overrides: dict[str, Any] = {
        "name": "tiny-pipeline",
        "data": {"datasets": [{"id": "clips", "source": "clips", "caption_strategy": "textfile", "resolution": SIZE,
                               "resolution_type": "pixel", "video": {"num_frames": FRAMES}, **(dataset or {})}],
                 "text_embeds": {"cache_dir": "cache/text"}, "vae_batch_size": 2, "cache_dtype": "fp32", "framerate": 8},
        "train": {"max_train_steps": 2},
    }
    for section, values in sections.items():
        overrides[section] = {**overrides.get(section, {}), **values}
    return validate_data(spec_dict(workspace, model_path, **overrides), "<test>", env={})


def cache(spec, ws):
    from job.cache.phase import run_cache

    return run_cache(spec, ws, device="cpu", num_workers=0, show=False)


def loss_with_changed_prediction(s, batch, change=None, seen: dict | None = None) -> float:
    """`compute_loss` of a session's batch with the transformer's prediction passed through `change`
    (None: unchanged), with the same noise and sigmas every call (the generator is rewound). `seen`
    gets the transformer's inputs (`noisy`, `timestep`)."""
    import torch

    from job.train.step import compute_loss

    state = s.generator.get_state()
    real = s.transformer

    def changed(*args, **kwargs):
        if seen is not None:
            seen.update(noisy=args[0], timestep=kwargs["timestep"])
        pred = real(*args, **kwargs)[0]
        return (pred if change is None else change(pred),)

    s.transformer = changed
    try:
        with torch.no_grad():
            return float(compute_loss(s, batch))
    finally:
        s.transformer = real
        s.generator.set_state(state)
