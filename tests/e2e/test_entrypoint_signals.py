"""Preemption through the container entrypoint: SIGTERM to entrypoint.sh reaches Python (it `exec`s),
which finishes the step, writes a checkpoint and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_to_the_entrypoint_checkpoints_and_exits_0(tmp_path):
    from job.smoke import prepare_smoke_workspace

    workspace = prepare_smoke_workspace(tmp_path / "ws").workspace
    spec = yaml.safe_load((ROOT / "specs" / "smoke-cpu.yaml").read_text())
    spec["workspace"] = str(workspace)
    spec["train"]["max_train_steps"] = 100000  # far more than the test waits for
    spec["checkpoints"]["step_interval"] = 100000
    spec["validation"]["enabled"] = False
    spec["output"]["push_to"] = None
    spec_path = tmp_path / "long.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    proc = subprocess.Popen(["bash", str(ROOT / "entrypoint.sh"), str(spec_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    metrics = workspace / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        assert metrics.exists(), "training never started"
        proc.send_signal(signal.SIGTERM)  # the entrypoint's PID is Python's after `exec`
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    checkpoints = sorted((workspace / "output" / "checkpoints").glob("step_*"))
    assert checkpoints and (checkpoints[-1] / "COMPLETE").exists(), output
    assert "stopped" in output


def test_entrypoint_fetches_a_spec_from_s3(tmp_path, s3_env, s3_bucket, s3_options):
    from job.storage import open_storage

    spec = tmp_path / "remote.yaml"
    spec.write_text("data: {datasets: [{id: a, source: a}]}\ntrain: {max_train_steps: 2, optimizer: sgd}\n")
    with open_storage(f"s3://{s3_bucket}", s3_options) as store:
        store.upload_file(spec, "specs/job.yaml", progress=False)
    env = {**os.environ, "TRAINER_WORKSPACE": str(tmp_path / "ws"), "AWS_ENDPOINT_URL": s3_env.url}
    result = subprocess.run(["bash", str(ROOT / "entrypoint.sh"), f"s3://{s3_bucket}/specs/job.yaml"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    # The fetched spec was read: its mistake is reported (exit 2), not a fetch failure.
    assert result.returncode == 2, result.stderr
    assert "train.optimizer" in result.stderr
    assert (tmp_path / "ws" / ".trainer-spec.yaml").read_text() == spec.read_text()

    missing = subprocess.run(["bash", str(ROOT / "entrypoint.sh"), f"s3://{s3_bucket}/specs/none.yaml"],
                             capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert missing.returncode == 4, missing.stderr
    assert "Traceback" not in missing.stderr
