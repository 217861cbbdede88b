"""One train phase per workspace: `run_train` holds `state/train.lock` (an flock) for its whole run."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager

import pytest

from job.errors import EXIT_BAD_INPUT, InputError
from job.train import TrainHooks, run_train
from job.train.loop import train_lock
from train_helpers import make_job


@contextmanager
def held(path):
    """Hold `path`'s flock as another trainer would. flock belongs to the open file, so this process's own
    second open (the one run_train makes) conflicts with it exactly as another process's would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def is_locked(path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def test_a_second_trainer_on_the_workspace_stops_at_once_and_the_next_run_works(tmp_path, tiny_model):
    spec, ws = make_job(tmp_path, tiny_model, train={"max_train_steps": 2})
    lock = ws.state_dir / "train.lock"
    with held(lock):
        with pytest.raises(InputError) as raised:
            run_train(spec, ws)
    error = raised.value
    assert error.exit_code == EXIT_BAD_INPUT
    assert f"another train phase is running on the workspace {ws.root} (it holds {lock})" in error.message
    assert "wait for it to finish, or stop it" in error.fix
    # it stopped before reading or writing anything
    assert not ws.checkpoints_dir.exists() and not ws.final_dir.exists()
    assert not (ws.logs_dir / "metrics.jsonl").exists()

    seen = []  # the lock is held for the whole run: checked from inside a step
    hooks = TrainHooks()
    hooks.on_step_end.append(lambda info: seen.append(is_locked(lock)))
    result = run_train(spec, ws, hooks)
    assert result.status == "completed" and result.step == 2
    assert seen == [True, True]
    assert not is_locked(lock)  # released at the end
    assert sorted(p.name for p in ws.checkpoints_dir.iterdir()) == ["step_000002"]
    steps = [json.loads(line).get("step") for line in (ws.logs_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1 and steps.count(2) == 1, steps  # one run's metrics, not two

    # a run after the first one finished takes the lock again (here: nothing left to do)
    assert run_train(spec, ws).status == "already_complete"
    assert not is_locked(lock)


def test_only_the_main_process_takes_the_lock(tmp_path, monkeypatch):
    class FakeWs:
        def lock(self, *args, **kwargs):
            raise AssertionError("a non-main rank must not take the train lock")

    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    with train_lock(FakeWs()):
        pass
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(AssertionError):
        train_lock(FakeWs())


def test_the_train_phase_takes_the_lock_before_its_remote_resume(tmp_path, tiny_model, monkeypatch):
    """The phase's remote resume writes into the checkpoints folder too: a second trainer stops before it."""
    import job.phases as phases
    import job.upload
    from job.workspace import Workspace
    from pipeline_helpers import loaded

    started = []
    monkeypatch.setattr(job.upload.TrainUploads, "start", classmethod(lambda cls, *a: started.append(a)))
    job_spec = loaded(tmp_path, tiny_model)
    ws = Workspace.for_spec(job_spec.spec)
    with held(ws.state_dir / "train.lock"):
        with pytest.raises(InputError, match="another train phase is running"):
            phases.train(job_spec, ws)
    assert started == []
