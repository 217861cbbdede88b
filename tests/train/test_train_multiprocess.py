"""Two CPU processes (gloo, through accelerate) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from job.errors import EXIT_ENVIRONMENT
from job.models.sanavideo.objective import FlowMatchingObjective
from job.train import run_train
from train_helpers import deterministic_inputs, make_spec, spec_dict, trained_state, write_caches

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
from train_helpers import deterministic_inputs, make_spec
from job.models.sanavideo.objective import FlowMatchingObjective
FlowMatchingObjective.training_inputs = deterministic_inputs
from job.train import run_train
from job.workspace import Workspace
spec = make_spec(json.loads(open(sys.argv[1]).read()))
result = run_train(spec, Workspace.for_spec(spec))
print("RESULT", result.status, result.step)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(child: str, data: dict, tmp_path: Path, timeout: float) -> tuple[list[int], list[str]]:
    """Run the `child` script as ranks 0 and 1 (gloo on loopback) on the spec `data`; their exit codes and
    outputs. Children still running at the timeout are killed (the test then fails on their output)."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(data))
    port = _free_port()
    children = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
        children.append(subprocess.Popen([sys.executable, "-c", child, str(spec_file)], env=env, cwd=ROOT,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outputs = [c.communicate(timeout=timeout)[0].decode() for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    return [c.returncode for c in children], outputs


def _job(workspace: Path, model: Path, batch: int, processes: int) -> dict:
    return spec_dict(workspace, model, train={"max_train_steps": 3, "train_batch_size": batch, "num_processes": processes,
                                              "max_grad_norm": 0.5, "adam_epsilon": 1e-6, "use_ema": True},
                     checkpoints={"step_interval": 2})


def test_two_processes_match_one_process_with_the_global_batch(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(FlowMatchingObjective, "training_inputs", deterministic_inputs)
    single = make_spec(_job(tmp_path / "one", tiny_model, batch=2, processes=1))
    single_ws = write_caches(single, n_samples=2)
    assert run_train(single, single_ws).step == 3

    data = _job(tmp_path / "two", tiny_model, batch=1, processes=2)
    ws = write_caches(make_spec(data), n_samples=2)
    codes, outputs = _run_two_processes(CHILD, data, tmp_path, timeout=240)
    for code, out in zip(codes, outputs):
        assert code == 0, out[-3000:]
        assert "RESULT completed 3" in out, out[-3000:]

    state = json.loads((ws.checkpoints_dir / "step_000003" / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 6
    assert sorted(p.name for p in (ws.checkpoints_dir / "step_000003").glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    one, two = trained_state(single_ws.final_dir), trained_state(ws.final_dir)
    assert set(one) == set(two)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    summary = json.loads((ws.final_dir / "training_summary.json").read_text())
    assert summary["num_processes"] == 2


FULL_DISK_CHILD = """
import errno, os, sys
os.environ["COLUMNS"] = "300"  # the CLI's message on one line
import torch
torch.set_num_threads(1)
from train_helpers import deterministic_inputs
from job.models.sanavideo.objective import FlowMatchingObjective
FlowMatchingObjective.training_inputs = deterministic_inputs
import job.train.session as session
from job.cli import main

def full_disk(*args, **kwargs):  # the main process's volume fills up while it writes the weights
    raise OSError(errno.ENOSPC, "No space left on device")
session.save_weights = full_disk  # only the main process writes the weights
sys.exit(main(["train", sys.argv[1]]))
"""


def test_a_full_disk_on_one_process_stops_every_process(tmp_path, tiny_model):
    """Rank 0 cannot write its checkpoint: rank 1 raises the same errno (the CLI's disk-full message) instead of
    waiting at the next barrier for it (NCCL) or dying on the broken connection (gloo, before: exit 1). Both
    leave through the CLI with its exit code, not aborted by gloo's worker thread at shutdown (-6, one run in
    four before `job.train.collectives`)."""
    data = _job(tmp_path / "two", tiny_model, batch=1, processes=2)
    write_caches(make_spec(data), n_samples=2)
    codes, outputs = _run_two_processes(FULL_DISK_CHILD, data, tmp_path, timeout=180)
    for code, out in zip(codes, outputs):
        assert code == EXIT_ENVIRONMENT, out[-3000:]
        assert "the disk is full" in out, out[-3000:]
    assert "another process could not write checkpoint step 2: No space left on device" in outputs[1]
