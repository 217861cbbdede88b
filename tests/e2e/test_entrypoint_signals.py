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
