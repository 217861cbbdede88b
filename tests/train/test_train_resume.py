"""Exact resume (SIGKILL in a subprocess, SIGTERM in-process) and the second-signal hard stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from job.train import TrainHooks, run_train
from job.train.checkpoints import COMPLETE, CheckpointStore
from job.train.signals import HardStop
from train_helpers import make_spec, spec_dict, trained_state, write_caches

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)  # as in the tests' process: the same kernels, the same bits
from train_helpers import make_spec
from job.train import TrainHooks, run_train
from job.workspace import Workspace
spec = make_spec(json.loads(open(sys.argv[1]).read()))
hooks = TrainHooks(on_step_end=[lambda info: time.sleep(0.1)])
run_train(spec, Workspace.for_spec(spec), hooks)
print("FINISHED")
"""


def _resume_spec(workspace: Path, model: Path) -> dict:
    # bf16 weights + the stochastic-rounding optimizer, EMA, caption dropout, warmup + cosine, accumulation
    # across epoch boundaries (3 clips, 2 micro-batches per step): every piece of state must come back.
    return spec_dict(
        workspace, model,
        model={"pretrained_model_name_or_path": str(model), "base_model_precision": "bf16", "prompt": {"max_sequence_length": 8}},
        train={"max_train_steps": 10, "optimizer": "adamw_bf16", "use_ema": True, "ema": {"decay": 0.9},
               "caption_dropout_probability": 0.4, "lr_scheduler": "cosine", "lr_warmup_steps": 2,
               "gradient_accumulation_steps": 2},
        checkpoints={"step_interval": 3, "total_limit": 2},
    )


def _final_state(ws) -> dict[str, torch.Tensor]:
    folder = CheckpointStore(ws.checkpoints_dir).latest()
    state = {f"w.{k}": v for k, v in trained_state(folder).items()}
    opt = torch.load(folder / "optimizer.pt", weights_only=True)
    for index, values in opt["state"].items():
        for key, value in values.items():
            state[f"opt.{index}.{key}"] = torch.as_tensor(value)
    for i, t in enumerate(torch.load(folder / "ema.pt", weights_only=True)["shadow_params"]):
        state[f"ema.{i}"] = t
    return state


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_model):
    # 1. uninterrupted reference, in-process
    ref_spec = make_spec(_resume_spec(tmp_path / "ref", tiny_model))
    ref_ws = write_caches(ref_spec, n_samples=3)
    assert run_train(ref_spec, ref_ws).step == 10

    # 2. the same job in a subprocess, SIGKILLed once the step-6 checkpoint exists
    data = _resume_spec(tmp_path / "killed", tiny_model)
    spec = make_spec(data)
    ws = write_caches(spec, n_samples=3)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(data))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(spec_file)], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = ws.checkpoints_dir / "step_000006" / COMPLETE
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the child never wrote the step-6 checkpoint"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    out = child.communicate()[0].decode()
    assert child.returncode == -signal.SIGKILL and "FINISHED" not in out
    assert not ws.final_dir.exists()

    # 3. resume in-process to the end
    result = run_train(spec, ws)
    assert result.status == "completed" and result.step == 10
    summary = json.loads((ws.final_dir / "training_summary.json").read_text())
    assert summary["resumed_from"] is not None

    ref, got = _final_state(ref_ws), _final_state(ws)
    assert set(ref) == set(got)
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, different[:5]


def _lora_spec(workspace: Path, model: Path, **train) -> dict:
    return spec_dict(
        workspace, model,
        model={"pretrained_model_name_or_path": str(model), "type": "lora", "prompt": {"max_sequence_length": 8},
               "lora": {"rank": 4, "alpha": 8, "dropout": 0.1}},
        train={"max_train_steps": 6, "learning_rate": 1e-2, "caption_dropout_probability": 0.3, **train},
        checkpoints={"step_interval": 100},
    )


def test_sigterm_writes_a_checkpoint_and_resume_is_exact_for_lora(tmp_path, tiny_model):
    ref_spec = make_spec(_lora_spec(tmp_path / "ref", tiny_model))
    ref_ws = write_caches(ref_spec, n_samples=2)
    assert run_train(ref_spec, ref_ws).status == "completed"

    spec = make_spec(_lora_spec(tmp_path / "stopped", tiny_model))
    ws = write_caches(spec, n_samples=2)
    hooks = TrainHooks(on_step_end=[lambda info: os.kill(os.getpid(), signal.SIGTERM) if info.step == 3 else None])
    result = run_train(spec, ws, hooks)
    assert result.status == "stopped_early" and result.step == 3 and result.resumable
    assert result.checkpoint.name == "step_000003" and (result.checkpoint / COMPLETE).is_file()
    assert "resumable" in result.message and not ws.final_dir.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))

    again = run_train(spec, ws)
    assert again.status == "completed" and again.step == 6
    ref = trained_state(ref_ws.final_dir)
    got = trained_state(ws.final_dir)
    assert set(ref) == set(got) and ref
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_second_signal_stops_at_once_without_corruption(tmp_path, tiny_model):
    spec = make_spec(spec_dict(tmp_path / "ws", tiny_model, train={"max_train_steps": 6}, checkpoints={"step_interval": 2}))
    ws = write_caches(spec, n_samples=2)

    def twice(info):
        if info.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(HardStop):
        run_train(spec, ws, TrainHooks(on_step_end=[twice]))
    store = CheckpointStore(ws.checkpoints_dir)
    assert store.latest().name == "step_000002"
    assert run_train(spec, ws).status == "completed"
