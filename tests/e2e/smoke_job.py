"""The CPU smoke job as the container runs it (`trainer run` in a subprocess), shared by the
end-to-end tests: the material once per session, and one undisturbed run that the fault tests
compare their weights with and the artefact tests inspect (read-only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SPEC = ROOT / "specs" / "smoke-cpu.yaml"
FINAL_WEIGHTS = Path("output/final/transformer/diffusion_pytorch_model.safetensors")


def job_env(workspace: Path) -> dict[str, str]:
    return {**os.environ, "TRAINER_WORKSPACE": str(workspace), "TRAINER_PUSH_TO": "", "COLUMNS": "200"}


def trainer_run(workspace: Path, spec: Path = SMOKE_SPEC) -> subprocess.CompletedProcess:
    """`trainer run SPEC`, undisturbed, with the results kept local."""
    return subprocess.run([sys.executable, "-m", "job.cli", "run", str(spec)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=job_env(workspace))


@pytest.fixture(scope="session")
def smoke_template(tmp_path_factory) -> Path:
    """A workspace holding only the tiny model and the synthetic clips (tests copy it)."""
    from job.smoke import prepare_smoke_workspace

    return prepare_smoke_workspace(tmp_path_factory.mktemp("smoke-template") / "ws").workspace


@pytest.fixture(scope="session")
def undisturbed_run(smoke_template, tmp_path_factory) -> Path:
    """The workspace of one complete, undisturbed smoke job. Read-only for the tests."""
    workspace = tmp_path_factory.mktemp("undisturbed") / "ws"
    shutil.copytree(smoke_template, workspace, symlinks=True)
    result = trainer_run(workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    return workspace
