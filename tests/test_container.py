"""The container's files, checked without a Docker engine: lint, install parity, the entrypoint."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is a test dependency (pyproject [test] extra); install it with scripts/test"
    return path


def test_hadolint_clean():
    result = subprocess.run([_tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["entrypoint.sh", "scripts/test", ".ci/run"])
def test_shellcheck_clean(script):
    result = subprocess.run([_tool("shellcheck"), str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_and_readme_install_with_the_same_constraints():
    dockerfile = (ROOT / "Dockerfile").read_text()
    test_script = (ROOT / "scripts" / "test").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "COPY pyproject.toml constraints.txt" in dockerfile
    assert re.search(r"pip install .*-c /tmp/constraints.txt", dockerfile)
    # only torch and triton differ: the CUDA build and the Triton it requires
    assert "grep -v -e '^torch==' -e '^triton==' constraints.txt" in dockerfile
    assert "constraints.txt" in test_script
    assert "pip install -c constraints.txt ." in readme
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("exec scripts/test")
    assert "scripts/test" in readme


def test_constraints_pin_cpu_torch_for_tests():
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert pins["torch"] == "2.13.0"


def _entrypoint(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "entrypoint.sh"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT)


def test_entrypoint_without_arguments_prints_usage():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_SPEC")}
    result = subprocess.run(["bash", str(ROOT / "entrypoint.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_entrypoint_passes_subcommands_through():
    result = _entrypoint("validate", "-q", "specs/smoke-cpu.yaml")
    assert result.returncode == 0, result.stderr
    assert "ok specs/smoke-cpu.yaml" in result.stderr


def test_entrypoint_reads_inline_yaml(tmp_path):
    inline = "data: {datasets: [{id: a, source: a}]}\ntrain: {max_train_steps: 2, optimizer: sgd}\n"
    result = _entrypoint(env={"TRAINER_SPEC_YAML": inline, "TRAINER_WORKSPACE": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "train.optimizer" in result.stderr
    assert (tmp_path / ".trainer-spec.yaml").read_text().startswith("data:")


def test_entrypoint_spec_path_runs_the_job(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("data: {datasets: [{id: a, source: a}]}\ntrain: {max_train_steps: 2, learning_rate: 0}\n")
    result = _entrypoint(str(spec))
    assert result.returncode == 2 and "train.learning_rate" in result.stderr


def test_templates_use_the_entrypoint_and_the_workspace_volume():
    import json

    runpod = json.loads((ROOT / "templates" / "runpod.json").read_text())
    vast = json.loads((ROOT / "templates" / "vast.json").read_text())
    assert runpod["volumeMountPath"] == "/workspace" and runpod["dockerArgs"] == ""
    assert {e["key"] for e in runpod["env"]} >= {"TRAINER_SPEC", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert vast["runtype"] == "args"  # SSH/Jupyter modes would replace the entrypoint
    assert "-v /workspace:/workspace" in vast["env"] and "TRAINER_SPEC" in vast["env"]
    # No secret values in templates: only references to the environment or the platform's secrets.
    for text in ((ROOT / "templates" / "runpod.json").read_text(), (ROOT / "templates" / "vast.json").read_text()):
        assert "hf_" not in text.lower().replace("hf_token", "")
