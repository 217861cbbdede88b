"""`trainer pull`: model and dataset from a real S3 server on 127.0.0.1 into the workspace, then a rerun that fetches nothing."""

from __future__ import annotations

import yaml

from job.cli import main


def test_pull_from_s3_then_rerun_fetches_nothing(tmp_path, s3_env, s3_bucket, s3_options, monkeypatch):
    from job.models.sanavideo.tiny import build_tiny_model
    from job.smoke import write_synthetic_dataset
    from job.storage import open_storage

    model = build_tiny_model(tmp_path / "src" / "model")
    (model / "transformer" / "extra.bin").write_bytes(b"not needed")  # weights in another format: not pulled
    data = tmp_path / "src" / "data"
    write_synthetic_dataset(data, clips=2, frames=9)
    with open_storage(f"s3://{s3_bucket}", s3_options) as store:
        store.upload_folder(model, "model", progress=False)
        store.upload_folder(data, "data", progress=False)

    workspace = tmp_path / "ws"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "workspace": str(workspace),
        "model": {"pretrained_model_name_or_path": f"s3://{s3_bucket}/model"},
        "data": {"datasets": [{"id": "clips", "source": f"s3://{s3_bucket}/data"}]},
        "train": {"max_train_steps": 1},
        "storage": {"s3": {"endpoint_url": s3_env.url, "region": s3_options.region, "addressing_style": "path"}},
    }))
    assert main(["pull", str(spec)]) == 0

    from job.spec import load_spec
    from job.workspace import Workspace

    ws = Workspace.for_spec(load_spec(spec).spec)
    model_dir = ws.model_dir(f"s3://{s3_bucket}/model")
    dataset_dir = ws.dataset_dir(ws.spec.data.datasets[0])
    for name in ("model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (model_dir / name).read_bytes() == (model / name).read_bytes(), name
    assert not (model_dir / "transformer" / "extra.bin").exists()
    assert sorted(p.name for p in dataset_dir.glob("clip_*")) == ["clip_000.mp4", "clip_000.txt", "clip_001.mp4", "clip_001.txt"]

    # The pulled folder loads through the real loading code.
    from job.models.sanavideo.loading import load_components

    assert load_components(model_dir, parts={"transformer"}).transformer is not None

    pulled = [p for folder in (model_dir, dataset_dir) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".trainer-pull")]
    before = {p: p.stat().st_mtime_ns for p in pulled}
    assert main(["pull", str(spec)]) == 0
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after  # nothing was downloaded again
