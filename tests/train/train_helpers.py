"""Helpers for the train tests: specs as dicts, a workspace with cached latents and embeddings.

Also used by the subprocess scripts of the resume tests (on PYTHONPATH there).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from job.cache import format as fmt
from job.spec import validate_data
from job.workspace import Workspace

LATENT_SHAPE = (4, 2, 8, 8)  # tiny model: 4 channels; 2 latent frames (5 px frames), 8x8 latents (64x64 px)
BUCKET = "64x64@5"
SEQ_LEN = 8
CAPTION_DIM = 32


def spec_dict(workspace: Path, model_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tiny-train",
        "workspace": str(workspace),
        "model": {"pretrained_model_name_or_path": str(model_path), "base_model_precision": "fp32",
                  "prompt": {"max_sequence_length": SEQ_LEN}},
        "data": {"datasets": [{"id": "clips", "source": "clips"}], "text_embeds": {"cache_dir": "cache/text"}},
        "train": {"max_train_steps": 6, "mixed_precision": "no", "optimizer": "adamw", "learning_rate": 1e-3,
                  "lr_scheduler": "constant", "train_batch_size": 1, "caption_dropout_probability": 0.0, "seed": 7},
        "memory": {"gradient_checkpointing": False},
        "validation": {"enabled": False},
        "checkpoints": {"step_interval": 1000, "total_limit": 3},
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


def write_caches(spec, n_samples: int = 2, seed: int = 0, with_mask: bool = False, holdout: int = 0) -> Workspace:
    """Random normalised latents and text embeddings written with job.cache.format, as the cache phase would."""
    ws = Workspace.for_spec(spec)
    ctx = fmt.text_key_context(spec, ws)
    g = torch.Generator().manual_seed(seed)
    ds = spec.data.active()[0]
    cache_dir = ws.latent_cache_dir(ds)
    manifest = {}
    for i in range(n_samples + holdout):
        caption = f"clip number {i}"
        key = ctx.key(caption)
        embeds = torch.randn(SEQ_LEN, CAPTION_DIM, generator=g)
        mask = torch.zeros(SEQ_LEN, dtype=torch.int64)
        mask[: 3 + i % 4] = 1
        fmt.write_text_embedding(ws.text_cache_dir, key, embeds, mask)
        latents = torch.randn(*LATENT_SHAPE, generator=g)
        loss_mask = None
        if with_mask:
            loss_mask = torch.zeros(1, *LATENT_SHAPE[1:])
            loss_mask[..., :4] = 1.0
        sample_key = f"clip{i:03d}"
        is_holdout = i >= n_samples
        fmt.write_sample(cache_dir, sample_key, latents, caption_key=key, bucket=BUCKET, source=f"clip{i}.mp4",
                         is_holdout=is_holdout, mask=loss_mask, extra={"vae": "tiny"})
        manifest[sample_key] = fmt.manifest_entry(sample_key, caption_key=key, bucket=BUCKET, is_holdout=is_holdout,
                                                  key={"vae": "tiny"})
    fmt.write_manifest(cache_dir, manifest)
    empty = torch.randn(SEQ_LEN, CAPTION_DIM, generator=g)
    empty_mask = torch.zeros(SEQ_LEN, dtype=torch.int64)
    empty_mask[0] = 1
    fmt.write_text_embedding(ws.text_cache_dir, ctx.empty_key(), empty, empty_mask, kind="negative")
    return ws


def make_job(tmp_path: Path, model_path: Path, n_samples: int = 2, with_mask: bool = False, **sections):
    spec = make_spec(spec_dict(tmp_path / "ws", model_path, **sections))
    ws = write_caches(spec, n_samples=n_samples, with_mask=with_mask)
    return spec, ws


def trained_state(folder_or_ws) -> dict[str, torch.Tensor]:
    """The weights of the newest checkpoint (or a checkpoint folder) as a flat dict."""
    from safetensors.torch import load_file

    from job.train.checkpoints import CheckpointStore

    folder = Path(folder_or_ws) if isinstance(folder_or_ws, (str, Path)) else CheckpointStore(folder_or_ws.checkpoints_dir).latest()
    files = sorted((folder / "transformer").glob("*.safetensors")) or sorted(folder.glob("pytorch_lora_weights.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def deterministic_inputs(self, x0, generator=None, world_size=1, rank=0):
    """A stand-in for FlowMatchingObjective.training_inputs: noise and sigma as functions of the sample
    itself, so neither the data order inside a step nor its split across processes matters."""
    noise = torch.sin(x0 * 7.3 + 1.0)
    sigmas = 0.2 + 0.6 * torch.sigmoid(x0.flatten(1).mean(1) * 10)
    return self.make_inputs(x0, sigmas, noise)
