"""Edge cases of the loop's checkpoints: a stop on the last step, a skipped step at a checkpoint interval,
a resume past the spec's length, and checkpoints of another history after a resume from an earlier one."""

from __future__ import annotations

import json
import os
import signal

import pytest

from job.errors import InputError
from job.models.sanavideo.objective import FlowMatchingObjective
from job.train import TrainHooks, run_train
from job.train.checkpoints import SET_ASIDE
from train_helpers import make_job, make_spec, spec_dict, write_caches


def _names(ws) -> list[str]:
    return sorted(p.name for p in ws.checkpoints_dir.glob("step_*"))


def test_a_stop_on_the_last_step_finishes_the_job_instead_of_dropping_the_step(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 3}, checkpoints={"step_interval": 1000})
    hooks = TrainHooks(on_step_end=[lambda info: os.kill(os.getpid(), signal.SIGTERM) if info.step == 3 else None])
    result = run_train(spec, ws, hooks)
    assert result.status == "completed" and result.step == 3, result
    assert _names(ws) == ["step_000003"] and ws.final_dir.is_dir()


def test_a_skipped_step_at_a_checkpoint_interval_writes_no_checkpoint(tmp_path, tiny_model, monkeypatch):
    real_loss, calls = FlowMatchingObjective.loss, {"n": 0}

    def nan_on_calls_1_and_4(self, *args, **kwargs):  # the first step, and the one right after a checkpoint
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] in (1, 4) else loss

    monkeypatch.setattr(FlowMatchingObjective, "loss", nan_on_calls_1_and_4)
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 4}, checkpoints={"step_interval": 2, "total_limit": 2})
    saved = []
    result = run_train(spec, ws, TrainHooks(on_checkpoint=[lambda path, step: saved.append(path.name)]))
    assert result.status == "completed" and result.step == 4
    assert saved == ["step_000002", "step_000004"], saved  # before: step_000000 and step_000002 twice


def test_a_checkpoint_past_a_lowered_max_train_steps_is_refused_not_called_complete(tmp_path, tiny_model):
    data = spec_dict(tmp_path / "ws", tiny_model, train={"max_train_steps": 6}, checkpoints={"step_interval": 2, "total_limit": 3})
    ws = write_caches(make_spec(data), n_samples=2)
    assert run_train(make_spec(data), ws).step == 6
    data["train"]["max_train_steps"] = 3
    with pytest.raises(InputError) as raised:
        run_train(make_spec(data), ws)
    assert "step_000006 is at step 6, past this spec's 3 training steps" in raised.value.message
    assert "raise train.max_train_steps" in raised.value.fix
    summary = json.loads((ws.final_dir / "training_summary.json").read_text())
    assert summary["final_step"] == 6 and summary["total_steps"] == 6  # the first run's, untouched


def test_a_resume_from_an_earlier_checkpoint_sets_the_newer_ones_aside_and_keeps_its_own(tmp_path, tiny_model):
    """Rotation keeps the highest steps: with the newer checkpoints of the first history in place, each new
    checkpoint of the resumed run was deleted right after it was written (total_limit 1)."""
    data = spec_dict(tmp_path / "ws", tiny_model, train={"max_train_steps": 6}, checkpoints={"step_interval": 1, "total_limit": 2})
    ws = write_caches(make_spec(data), n_samples=2)
    assert run_train(make_spec(data), ws).step == 6
    assert _names(ws) == ["step_000005", "step_000006"]
    data["train"]["learning_rate"] = 5e-4
    data["checkpoints"] = {"step_interval": 1, "total_limit": 1,
                           "resume_from_checkpoint": str(ws.checkpoints_dir / "step_000005")}
    stop_at_6 = TrainHooks(on_step_end=[lambda info: os.kill(os.getpid(), signal.SIGTERM) if info.step == 6 else None])
    data["train"]["max_train_steps"] = 7
    result = run_train(make_spec(data), ws, stop_at_6)
    assert result.status == "stopped_early" and result.checkpoint.name == "step_000006" and result.checkpoint.is_dir()
    assert _names(ws) == ["step_000006"]  # this run's, not the first history's
    assert (ws.checkpoints_dir / SET_ASIDE / "step_000006").is_dir()  # the first history's step 6: kept, out of the way
