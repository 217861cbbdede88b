"""The whole job as the container runs it: `trainer run` in a subprocess on the CPU smoke spec,
with results pushed to a real S3 server on 127.0.0.1, then a rerun that has nothing to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import boto3

from tests.servers.fixtures import FAKE_KEY_ID, FAKE_SECRET, REGION

ROOT = Path(__file__).resolve().parents[2]


def _run(workspace: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "job.cli", "run", str(ROOT / "specs" / "smoke-cpu.yaml")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "TRAINER_WORKSPACE": str(workspace), "COLUMNS": "200", **env})


def test_smoke_job_end_to_end_with_s3_upload(tmp_path, s3_env, s3_bucket):
    from job.smoke import prepare_smoke_workspace

    workspace = tmp_path / "ws"
    prepare_smoke_workspace(workspace)
    env = {"TRAINER_PUSH_TO": f"s3://{s3_bucket}/runs/smoke", "AWS_ENDPOINT_URL": s3_env.url,
           "AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    first = _run(workspace, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "train: completed at step 6/6" in first.stderr

    output = workspace / "output"
    # The final transformer loads through diffusers, and the validation videos play.
    from diffusers import SanaVideoTransformer3DModel

    SanaVideoTransformer3DModel.from_pretrained(output / "final" / "transformer")
    videos = sorted((output / "validation").rglob("*.mp4"))
    assert [v.parent.name for v in videos] == ["step_000003", "step_000006"]
    with av.open(str(videos[-1])) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (frames, stream.codec_context.width, stream.codec_context.height) == (9, 64, 64)
    # Logs are valid JSON lines and never contain the secret key.
    events = [json.loads(line) for line in (workspace / "logs" / "events.jsonl").read_text().splitlines()]
    assert {"job_started", "phase_finished", "uploaded"} <= {e["event"] for e in events}
    # Every file the job wrote (logs, resolved spec, model card, checkpoints, caches, videos), as bytes.
    secret = FAKE_SECRET.encode()
    for path in workspace.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
    assert FAKE_SECRET not in first.stdout + first.stderr

    # Everything reached the store.
    s3 = boto3.client("s3", endpoint_url=s3_env.url, region_name=REGION)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/smoke/")["Contents"]}
    for key in ("final/transformer/config.json", "validation/index.html", "logs/events.jsonl", "spec.yaml"):
        assert f"runs/smoke/{key}" in keys, sorted(keys)

    # A rerun of a finished job does nothing expensive.
    weights = (output / "final" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    second = _run(workspace, env)
    assert second.returncode == 0, second.stderr
    assert "already_complete" in second.stderr and "everything was already cached" in second.stderr
    assert (output / "final" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_trainer_smoke_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "job.cli", "smoke", "--workspace", str(tmp_path / "smoke")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "COLUMNS": "200", "TRAINER_PUSH_TO": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke test passed" in result.stderr
