"""Helpers for the cache-phase tests: a tiny model, synthetic clips, specs. Also used by the
subprocess script of the kill test (tests/cache/ is put on its sys.path)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from job.spec import validate_data
from job.workspace import Workspace

SEQ_LEN = 16
FRAMES = 5
CLIPS = 4


def spec_dict(workspace: Path, model_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tiny-cache",
        "workspace": str(workspace),
        "model": {"pretrained_model_name_or_path": str(model_path), "base_model_precision": "fp32",
                  "prompt": {"max_sequence_length": SEQ_LEN}},
        "data": {
            "datasets": [{"id": "clips", "source": "clips", "caption_strategy": "textfile", "resolution": 64,
                          "resolution_type": "pixel", "video": {"num_frames": FRAMES}}],
            "text_embeds": {"cache_dir": "cache/text", "write_batch_size": 3},
            "vae_batch_size": 2,
            "cache_dtype": "fp32",
            "framerate": 8,
        },
        "train": {"max_train_steps": 2, "mixed_precision": "no", "optimizer": "adamw", "learning_rate": 1e-3,
                  "lr_scheduler": "constant", "train_batch_size": 1, "caption_dropout_probability": 0.1, "seed": 7},
        "memory": {"gradient_checkpointing": False},
        "validation": {"prompt": "a red square moving to the right", "negative_prompt": "blurry",
                       "prompt_library": {"green": "a green square moving down"}},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            merged = copy.deepcopy(data[section])
            merged.update(values)
            data[section] = merged
        else:
            data[section] = values
    return data


def make_spec(data: dict[str, Any]):
    return validate_data(copy.deepcopy(data), "<test>", env={}).spec


def set_dataset(data: dict[str, Any], **fields: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    ds = data["data"]["datasets"][0]
    video = fields.pop("video", None)
    ds.update(fields)
    if video:
        ds["video"] = {**ds.get("video", {}), **video}
    return data


def make_workspace(root: Path, clips_template: Path) -> Path:
    """A fresh workspace with a copy of the synthetic clips under clips/."""
    ws = root / "ws"
    shutil.copytree(clips_template, ws / "clips")
    return ws


def job(data: dict[str, Any]):
    spec = make_spec(data)
    return spec, Workspace.for_spec(spec)
