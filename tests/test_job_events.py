"""Job-level webhook events from the CLI: started, phase changed, finished, failed (with the error)."""

from __future__ import annotations

import json

import yaml

from job.cli import main
from tests.validate.conftest import Receiver


def _spec(tmp_path, url: str, model: str = "models/none") -> str:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "workspace": str(tmp_path / "ws"),
        "model": {"pretrained_model_name_or_path": model},
        "data": {"datasets": [{"id": "clips", "source": "clips"}]},
        "train": {"max_train_steps": 1},
        "webhooks": [{"url": url, "kind": "json"}],
    }))
    return str(spec)


def test_events_reach_the_webhook_and_a_failure_carries_its_message(tmp_path, monkeypatch):
    receiver = Receiver()
    try:
        # The full 2B spec on this CPU-only machine: preflight fails (exit 3) and says why.
        code = main(["preflight", "--offline", _spec(tmp_path, receiver.url("/hook"))])
        assert code == 3
        bodies = [json.loads(r["body"]) for r in receiver.wait_for(3)]
        names = [b.get("event") for b in bodies]
        assert names[:2] == ["job_started", "phase_changed"], bodies
        failed = [b for b in bodies if b.get("event") == "job_failed"]
        assert failed and "GPU" in json.dumps(failed[0])
    finally:
        receiver.close()
