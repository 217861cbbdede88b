"""Local faults during a real job: `trainer run` in a subprocess on the CPU smoke spec, a fault at an
exact point, then the same command again. The rerun must complete the job, and wherever the fault
did not change the data, the final weights must equal those of an undisturbed run, tensor for tensor.

Faults are placed by `fault_runner.py` (it hooks the JSON event log writer: the fault happens when
the job reports a given event), so every run breaks at the same point on any machine.

Remote faults (store down, preemption through the store) are tested in tests/upload and
tests/e2e/test_preemption.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.smoke_job import FINAL_WEIGHTS as WEIGHTS
from tests.e2e.smoke_job import ROOT, SMOKE_SPEC, job_env, trainer_run

RUNNER = Path(__file__).with_name("fault_runner.py")


def faulty_run(workspace: Path, on: str, do: str, command: str = "run") -> subprocess.CompletedProcess:
    """`trainer COMMAND SPEC` with the fault `do` at the first event log line matching `on`."""
    result = subprocess.run([sys.executable, str(RUNNER), "--on", on, "--do", do, "--", command, str(SMOKE_SPEC)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=job_env(workspace))
    assert read_events(workspace), result.stdout + result.stderr
    return result


def read_events(workspace: Path) -> list[dict]:
    """The JSON event log; every line must parse, also after a kill."""
    path = workspace / "logs" / "events.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def final_weights(workspace: Path) -> dict[str, torch.Tensor]:
    return load_file(str(workspace / WEIGHTS))


def assert_same_weights(workspace: Path, reference: dict[str, torch.Tensor]) -> None:
    got = final_weights(workspace)
    assert got.keys() == reference.keys()
    different = [name for name in reference if not torch.equal(got[name], reference[name])]
    assert not different, f"{len(different)} tensors differ from the undisturbed run, e.g. {different[:3]}"


@pytest.fixture
def workspace(smoke_template, tmp_path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(smoke_template, ws, symlinks=True)
    return ws


@pytest.fixture(scope="module")
def reference(undisturbed_run) -> dict[str, torch.Tensor]:
    """Final weights of an undisturbed run."""
    return final_weights(undisturbed_run)


def rerun_completes(workspace: Path, reference: dict[str, torch.Tensor] | None) -> subprocess.CompletedProcess:
    result = trainer_run(workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    events = read_events(workspace)
    assert events[-1]["event"] == "job_finished" and "stopped_in" not in events[-1], events[-1]
    if reference is not None:
        assert_same_weights(workspace, reference)
    return result


def killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stdout + result.stderr)


# ---------------------------------------------------------------------------------------------
# SIGKILL at each phase boundary and inside cache and train, SIGTERM inside cache and train


# (where, what, the phases the run records as finished). Each run starts from what the one before it
# left, so every recovery is on the path: if one breaks, the next run stops short of its fault point
# (or fails) and the test says which.
FAULTS = [
    ("phase_finished~'phase': 'preflight'", "kill", []),  # just before the job records a phase as finished
    ("phase_finished~'phase': 'pull'", "kill", ["preflight"]),
    ("cache.text_done", "kill", ["preflight", "pull"]),  # inside cache: text embeddings written, latents not
    ("cache.text_done", "term", ["preflight", "pull"]),  # docker stop inside cache: exit 130 with the phase named
    ("phase_finished~'phase': 'cache'", "kill", ["preflight", "pull"]),
    ("log~step 2/6", "term", ["preflight", "pull", "cache"]),  # preemption inside train: checkpoint, exit 0
    ("log~step 5/6", "kill", ["preflight", "pull", "cache"]),  # inside train: step 5 done, checkpoint of step 3 the newest
    ("phase_finished~'phase': 'train'", "kill", ["preflight", "pull", "cache"]),  # the final model is written
]


def test_killed_at_every_phase_boundary_and_inside_cache_and_train_then_rerun_completes(workspace, reference):
    for on, do, finished_before in FAULTS:
        result = faulty_run(workspace, on, do)
        expected = (0 if on.startswith("log~step") else 130) if do == "term" else -signal.SIGKILL
        assert result.returncode == expected, (on, result.returncode, result.stdout + result.stderr)
        events = read_events(workspace)
        run_start = max(i for i, e in enumerate(events) if e["event"] == "job_started")
        finished = [e["phase"] for e in events[run_start:] if e["event"] == "phase_finished"]
        assert finished == finished_before, (on, finished)
        checkpoints = sorted(p.name for p in (workspace / "output" / "checkpoints").glob("step_*"))
        if on == "phase_finished~'phase': 'cache'":  # the run after the kill inside cache
            text_done = [e for e in events[run_start:] if e["event"] == "cache.text_done"][-1]
            assert int(text_done["cached"]) == 0 and int(text_done["skipped"]) == 6, text_done  # nothing embedded twice
        if do == "term" and on == "cache.text_done":  # outside training: stop where it is, say so, rerun resumes
            assert "interrupted by SIGTERM during the cache phase" in result.stderr, result.stderr
            assert events[-1]["event"] == "job_failed" and events[-1]["exit_code"] == 130, events[-1]
        elif do == "term":  # SIGTERM in training: the step finishes, a checkpoint is written, exit 0, resumable
            assert "resumable" in result.stderr and checkpoints == ["step_000002"]
            assert events[-1]["event"] == "job_finished" and events[-1]["stopped_in"] == "train"
        if on == "log~step 5/6":
            assert "resumed from" in result.stderr and "step_000002" in result.stderr
            assert checkpoints == ["step_000002", "step_000003"] and not (workspace / WEIGHTS).exists()
        if on == "phase_finished~'phase': 'train'":
            assert "resumed from" in result.stderr and "step_000003" in result.stderr
    again = rerun_completes(workspace, reference)
    assert "already complete" in again.stderr and "everything was already cached" in again.stderr


# ---------------------------------------------------------------------------------------------
# damaged files


def test_corrupt_cache_files_are_detected_and_recomputed(workspace, reference):
    killed(faulty_run(workspace, "phase_finished~'phase': 'cache'", "kill"))
    cached = sorted((workspace / "cache").rglob("*.safetensors"))
    latent_files = [p for p in cached if p.name.startswith("clip_")]  # latents are named after their clip
    text_files = [p for p in cached if p not in latent_files]
    assert len(latent_files) == 4 and text_files, cached
    # A latent cut short (its header intact), a latent and a text embedding whose headers are garbage.
    # The two latents are the two clips of one VAE batch: the VAE's output depends on the batch it runs
    # in by ~1e-7 on the CPU, so the same batch must be recomputed for the weights to match bit for bit.
    latent_files[0].write_bytes(latent_files[0].read_bytes()[:-100])
    for garbled in (latent_files[1], text_files[0]):
        data = bytearray(garbled.read_bytes())
        data[8:40] = b"#" * 32
        garbled.write_bytes(bytes(data))

    again = rerun_completes(workspace, reference)
    finished = next(e for e in read_events(workspace)[::-1] if e["event"] == "cache.finished")
    assert int(finished["stale_recomputed"]) == 3 and int(finished["failed"]) == 0, finished
    assert "everything was already cached" not in again.stderr


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(workspace, reference):
    # killed after the checkpoint of the last step, before the final model is written
    killed(faulty_run(workspace, "checkpoint_saved~'step': 6", "kill"))
    newest = workspace / "output" / "checkpoints" / "step_000006"
    assert (newest / "COMPLETE").is_file() and not (workspace / WEIGHTS).exists()
    weights = newest / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])  # same size, other values
    weights.write_bytes(bytes(data))

    again = rerun_completes(workspace, reference)
    assert "step_000006" in again.stderr and "damaged" in again.stderr  # the warning names what was skipped
    assert "resumed from" in again.stderr and "step_000003" in again.stderr


def test_clip_broken_between_planning_and_decoding_is_reported_and_the_job_completes(workspace):
    clip = workspace / "datasets" / "synthetic" / "clip_002.mp4"
    result = faulty_run(workspace, "data.planned", f"break:{clip}")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((workspace / "state" / "data_report.json").read_text())
    problems = [p for p in report["problems"] if p["relpath"] == "clip_002.mp4"]
    assert problems and problems[0]["stage"] == "decode", report["problems"]
    assert (workspace / WEIGHTS).exists()
    finished = next(e for e in read_events(workspace)[::-1] if e["event"] == "cache.finished")
    assert int(finished["failed"]) == 1


@pytest.mark.slow
def test_clip_broken_between_pull_and_cache_is_reported_and_the_job_completes(workspace):
    killed(faulty_run(workspace, "phase_finished~'phase': 'pull'", "kill"))
    (workspace / "datasets" / "synthetic" / "clip_001.mp4").write_bytes(b"\x00" * 300)
    rerun_completes(workspace, None)
    report = json.loads((workspace / "state" / "data_report.json").read_text())
    assert [p["relpath"] for p in report["problems"]] == ["clip_001.mp4"], report
    planned = next(e for e in read_events(workspace)[::-1] if e["event"] == "data.planned")
    assert int(planned["samples"]) == 3


# ---------------------------------------------------------------------------------------------
# disk full


def _mount_small_tmpfs(folder: Path, size: str) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_while_training_is_a_clear_error_and_the_rerun_completes(workspace, reference):
    output = workspace / "output"
    if not _mount_small_tmpfs(output, "16m"):
        pytest.skip("needs root and tmpfs (mount -t tmpfs) for a size-limited output folder")
    try:
        # once the checkpoint of step 3 is written, the output volume fills up (another process's files)
        filler = output / "filler.bin"
        result = faulty_run(workspace, "checkpoint_saved~'step': 3", f"fill:{filler}")
        assert result.returncode == 3, result.stdout + result.stderr
        assert "disk" in result.stderr and "Traceback" not in result.stderr
        failed = read_events(workspace)[-1]
        assert failed["event"] == "job_failed" and failed["exit_code"] == 3
        filler.unlink()
        again = rerun_completes(workspace, reference)
        assert "step_000003" in again.stderr
    finally:
        subprocess.run(["umount", "-l", str(output)], capture_output=True)


def test_disk_full_anywhere_is_exit_3_with_the_fix_not_a_traceback(monkeypatch, capsys):
    """Where no size-limited folder can be mounted, the mapping itself: libraries report ENOSPC as
    OSError, as their own error with the OS message (safetensors, torch), or chained."""
    import errno

    import job.cli as cli

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed") from exc

    monkeypatch.setattr(cli, "app", full)
    assert cli.main(["run", "spec.yaml"]) == 3
    err = capsys.readouterr().err
    assert "the disk is full" in err and "free space" in err and "Traceback" not in err
    assert cli._disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not cli._disk_full(OSError(errno.EACCES, "Permission denied"))

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "app", bug)
    assert cli.main(["run", "spec.yaml"]) == 1
