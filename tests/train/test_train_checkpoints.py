"""Checkpoint folders: rotation, atomicity, `latest`, explicit resume paths."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from job.errors import InputError
from job.train import TrainHooks, run_train
from job.train.checkpoints import COMPLETE, CheckpointStore, capture_rng, restore_rng
from train_helpers import make_job, make_spec, spec_dict, trained_state


def names(ws) -> list[str]:
    return sorted(p.name for p in ws.checkpoints_dir.iterdir())


def test_rotation_keeps_the_newest_and_reports_each_checkpoint(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 9},
                        checkpoints={"step_interval": 2, "total_limit": 2})
    written = []
    hooks = TrainHooks(on_checkpoint=[lambda path, step: written.append((path.name, step, (path / COMPLETE).is_file()))])
    result = run_train(spec, ws, hooks)
    assert written == [(f"step_{s:06d}", s, True) for s in (2, 4, 6, 8, 9)]
    assert names(ws) == ["step_000008", "step_000009"]
    assert result.checkpoint.name == "step_000009"
    state = json.loads((ws.checkpoints_dir / "step_000009" / "state.json").read_text())
    assert state["step"] == 9 and state["model_type"] == "full" and state["world_size"] == 1


def test_store_rules(tmp_path):
    store = CheckpointStore(tmp_path, total_limit=1)
    assert store.latest() is None and store.complete() == []
    for step in (1, 2):
        tmp = store.begin(step)
        (tmp / "x").write_text(str(step))
        store.commit(tmp, step)
    (tmp_path / "step_000003").mkdir()  # killed between rename and marker
    (tmp_path / ".tmp-step_000004").mkdir()  # killed while writing
    assert store.latest().name == "step_000002"
    assert [p.name for p in store.incomplete()] == [".tmp-step_000004", "step_000003"]
    store.rotate()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]
    # re-writing a step replaces an incomplete leftover of the same name
    (tmp_path / "step_000005").mkdir()
    (tmp_path / "step_000005" / "junk").write_text("half")
    tmp = store.begin(5)
    (tmp / "x").write_text("5")
    final = store.commit(tmp, 5)
    assert (final / COMPLETE).is_file() and not (final / "junk").exists()
    # total_limit never removes the newest complete checkpoint
    store.total_limit = 1
    store.rotate()
    assert [p.name for _, p in store.complete()] == ["step_000005"]


def test_resume_ignores_leftovers_of_a_killed_save(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 4}, checkpoints={"step_interval": 2, "total_limit": 3})
    run_train(spec, ws)
    shutil.rmtree(ws.final_dir)
    # simulate a kill during a later save: a half-written temp folder, and a renamed folder without its marker
    (ws.checkpoints_dir / ".tmp-step_000006").mkdir()
    (ws.checkpoints_dir / ".tmp-step_000006" / "optimizer.pt").write_bytes(b"\0" * 10)
    shutil.copytree(ws.checkpoints_dir / "step_000004", ws.checkpoints_dir / "step_000005")
    (ws.checkpoints_dir / "step_000005" / COMPLETE).unlink()
    (ws.checkpoints_dir / "step_000005" / "optimizer.pt").write_bytes(b"broken")
    store = CheckpointStore(ws.checkpoints_dir)
    assert store.latest().name == "step_000004"

    longer = make_spec(spec_dict(tmp_path / "ws", tiny_model, train={
        "max_train_steps": 6, "mixed_precision": "no", "optimizer": "adamw", "learning_rate": 1e-3, "lr_scheduler": "constant",
        "caption_dropout_probability": 0.0, "seed": 7}, checkpoints={"step_interval": 2, "total_limit": 3}))
    result = run_train(longer, ws)
    assert result.status == "completed" and result.step == 6
    assert names(ws) == ["step_000002", "step_000004", "step_000006"]


def test_explicit_resume_paths(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 4}, checkpoints={"step_interval": 2})
    run_train(spec, ws)
    bad = make_spec(spec_dict(tmp_path / "ws", tiny_model, checkpoints={"resume_from_checkpoint": "output/checkpoints/step_000099"}))
    with pytest.raises(InputError, match="does not exist"):
        run_train(bad, ws)
    shutil.copytree(ws.checkpoints_dir / "step_000002", tmp_path / "half")
    (tmp_path / "half" / COMPLETE).unlink()
    bad = make_spec(spec_dict(tmp_path / "ws", tiny_model, checkpoints={"resume_from_checkpoint": str(tmp_path / "half")}))
    with pytest.raises(InputError, match="incomplete"):
        run_train(bad, ws)
    fresh = make_spec(spec_dict(tmp_path / "ws", tiny_model, train={"max_train_steps": 5, "optimizer": "adamw"},
                                checkpoints={"resume_from_checkpoint": "none"}))
    with pytest.raises(InputError, match="earlier run"):
        run_train(fresh, ws)
    # resuming from the step-2 checkpoint by path gives the same weights at step 4 as the first run
    first = trained_state(ws.checkpoints_dir / "step_000004")
    shutil.rmtree(ws.final_dir)
    again = make_spec(spec_dict(tmp_path / "ws", tiny_model, train={"max_train_steps": 4, "mixed_precision": "no",
                                                                     "optimizer": "adamw", "learning_rate": 1e-3,
                                                                     "lr_scheduler": "constant", "caption_dropout_probability": 0.0,
                                                                     "seed": 7},
                                checkpoints={"resume_from_checkpoint": "output/checkpoints/step_000002", "step_interval": 2}))
    assert run_train(again, ws).status == "completed"
    second = trained_state(ws.checkpoints_dir / "step_000004")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_rng_roundtrip():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(3)
    state = capture_rng(g)
    before = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    restore_rng(state, g)
    after = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    assert before == after


def test_minutes_interval_and_time_budget(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path / "a", tiny_model, train={"max_train_steps": 3},
                        checkpoints={"step_interval": 1000, "minutes_interval": 1e-7, "total_limit": None})
    assert run_train(spec, ws).status == "completed"
    assert names(ws) == ["step_000001", "step_000002", "step_000003"]

    spec, ws = make_job(tmp_path / "b", tiny_model, train={"max_train_steps": 5, "max_train_hours": 1e-9})
    result = run_train(spec, ws)
    assert result.status == "stopped_early" and result.step == 1 and "max_train_hours" in result.message
    assert result.checkpoint.name == "step_000001" and not ws.final_dir.exists()


def _logged_steps(ws) -> list[int]:
    return [json.loads(line)["step"] for line in (ws.logs_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_loss_history_survives_a_resume_once_per_step_and_comes_back_on_a_fresh_machine(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 6}, checkpoints={"step_interval": 2, "total_limit": 3})
    run_train(spec, ws)
    assert _logged_steps(ws) == [1, 2, 3, 4, 5, 6]
    first_run = (ws.logs_dir / "metrics.jsonl").read_text().splitlines()
    assert (ws.checkpoints_dir / "step_000004" / "metrics.jsonl").is_file()

    # killed after logging steps 5 and 6 but before their checkpoint was complete: 5 and 6 are redone, logged once
    shutil.rmtree(ws.final_dir)
    shutil.rmtree(ws.checkpoints_dir / "step_000006")
    run_train(spec, ws)
    assert _logged_steps(ws) == [1, 2, 3, 4, 5, 6]

    # a fresh machine (no logs) resuming from the checkpoint of step 4: steps 1..4 come from the checkpoint
    shutil.rmtree(ws.final_dir)
    shutil.rmtree(ws.checkpoints_dir / "step_000006")
    shutil.rmtree(ws.logs_dir)
    run_train(spec, ws)
    restored = (ws.logs_dir / "metrics.jsonl").read_text().splitlines()
    assert _logged_steps(ws) == [1, 2, 3, 4, 5, 6]
    assert restored[:4] == first_run[:4]
