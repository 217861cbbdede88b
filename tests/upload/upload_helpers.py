"""Specs, workspaces and fake checkpoint folders for the upload tests (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def smoke_spec_data(workspace: Path, push_to: str | None, endpoint: str | None = None, **overrides) -> dict:
    data = yaml.safe_load((ROOT / "specs" / "smoke-cpu.yaml").read_text())
    data["workspace"] = str(workspace)
    data["output"]["push_to"] = push_to
    if endpoint:
        data["storage"] = {"s3": {"endpoint_url": endpoint, "region": "us-east-1", "addressing_style": "path"}}
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def load(data: dict):
    from job.spec.loader import validate_data
    from job.workspace import Workspace

    loaded = validate_data(data)
    return loaded, Workspace.for_spec(loaded.spec)


def fake_checkpoint(ws, step: int, payload: bytes | None = None) -> Path:
    """A complete local checkpoint folder written the way CheckpointStore writes one."""
    from job.train.checkpoints import CheckpointStore

    store = CheckpointStore(ws.checkpoints_dir)
    tmp = store.begin(step)
    (tmp / "transformer").mkdir()
    (tmp / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(payload or bytes([step % 256]) * (1000 + step))
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    (tmp / "optimizer.pt").write_bytes(b"opt" * step)
    return store.commit(tmp, step)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
