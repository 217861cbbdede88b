"""The `trainer` command line as a user meets it: exit codes, messages, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from job.cli import main
from job.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "simpletuner"


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess, as a user runs it."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "job.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=120)


def test_validate_shipped_specs_exit_0():
    shipped = sorted((ROOT / "specs").glob("*.yaml"))
    result = run_cli("validate", "-q", *[str(p) for p in shipped])
    assert result.returncode == 0, result.stderr
    assert len(shipped) >= 4 and result.stderr.count("ok ") == len(shipped)


def test_bad_spec_exits_2_with_every_problem_and_no_traceback(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({
        "data": {"datasets": [{"id": "clips", "source": "clips", "video": {"num_frames": 80}}]},
        "train": {"max_train_steps": 5, "optimizer": "sgd", "learning_rat": 1e-4},
        "validation": {"resolutions": ["831x480"]},
        "memory": {"gradient_checkpointing": "maybe"},
    }))
    result = run_cli("validate", str(spec))
    assert result.returncode == 2
    err = result.stderr
    assert "Traceback" not in err
    assert "5 problems" in err
    for path in ("data.datasets[0].video.num_frames", "train.optimizer", "train.learning_rat", "validation.resolutions",
                 "memory.gradient_checkpointing"):
        assert path in err, err
    assert "did you mean 'learning_rate'" in err


def test_phase_command_on_bad_spec_exits_2(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("train:\n\tmax_train_steps: 1\n")
    result = run_cli("run", str(spec))
    assert result.returncode == 2 and "tab" in result.stderr and "Traceback" not in result.stderr


def test_missing_spec_file_exits_2():
    result = run_cli("run", "/nonexistent/spec.yaml")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_usage_error_exits_2():
    result = run_cli("validate")
    assert result.returncode == 2


def test_validate_prints_redacted_resolved_spec(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "workspace": str(tmp_path / "ws"),
        "data": {"datasets": [{"id": "clips", "source": "clips"}]},
        "train": {"max_train_steps": 5},
        "webhooks": [{"url": "${MY_WEBHOOK_URL}"}],
        "validation": {"prompt": "made with ${HF_TOKEN}"},
    }))
    secret_url, token = "https://hooks.example/abc-secret-xyz", "hf_secret_token_value"
    result = run_cli("validate", str(spec), env={"MY_WEBHOOK_URL": secret_url, "HF_TOKEN": token})
    assert result.returncode == 0, result.stderr
    assert secret_url not in result.stdout + result.stderr
    assert token not in result.stdout + result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["webhooks"][0]["url"] == "***"
    assert printed["validation"]["num_video_frames"] == 81


def test_init_writes_a_valid_spec_and_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "spec.yaml"
    assert main(["init", str(target)]) == 0
    assert load_spec(target, env={}).spec.name == "sanavideo-2b-480p"
    assert main(["init", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["init", str(target), "--force"]) == 0


def test_schema_is_json_and_markdown(tmp_path, capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "trainer job spec" and "train" in schema["properties"]
    assert main(["schema", "--markdown", "-o", str(tmp_path / "SPEC.md")]) == 0
    assert "# Job spec reference" in (tmp_path / "SPEC.md").read_text()


def test_import_simpletuner_quickstart(tmp_path, capsys):
    out = tmp_path / "imported.yaml"
    assert main(["import-simpletuner", str(FIXTURES / "config.json"), str(FIXTURES / "multidatabackend.json"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "quantize_via" in err  # reported by name as not imported
    spec = load_spec(out, env={}).spec
    assert spec.model.type == "full" and spec.model.family == "sanavideo"
    assert spec.model.pretrained_model_name_or_path == "hf://Efficient-Large-Model/SANA-Video_2B_480p_diffusers"
    assert spec.train.optimizer == "adamw_bf16" and spec.train.learning_rate == 5e-5
    assert spec.train.use_ema and spec.train.ema.update_interval == 2 and spec.train.ema.validation == "ema_only"
    assert spec.train.grad_clip_method == "value" and spec.train.max_grad_norm == 0.0
    assert spec.validation.resolutions == ["832x480"] and spec.validation.num_video_frames == 81
    assert spec.validation.guidance == 6.0 and spec.validation.step_interval == 200
    assert spec.checkpoints.step_interval == 1000 and spec.checkpoints.total_limit == 5
    assert spec.data.delete_problematic_videos is True and spec.data.framerate == 16
    assert spec.tracking.trackers() == ["wandb"] and spec.tracking.project_name == "video-training"
    (dataset,) = spec.data.datasets
    assert dataset.id == "disney-black-and-white" and dataset.source == "datasets/disney-black-and-white"
    assert dataset.video.num_frames == 81 and dataset.video.min_frames == 81
    assert dataset.resolution_type == "pixel_area" and dataset.caption_strategy == "textfile"
    assert spec.data.text_embeds.cache_dir == "cache/text/sanavideo" and spec.data.text_embeds.write_batch_size == 128


def test_import_simpletuner_reports_unknown_keys(tmp_path, capsys):
    config = json.loads((FIXTURES / "config.json").read_text())
    config["--some_future_option"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["import-simpletuner", str(tmp_path / "config.json"), str(FIXTURES / "multidatabackend.json")]) == 0
    captured = capsys.readouterr()
    assert "--some_future_option" in captured.err
    assert "version: 1" in captured.out


@pytest.mark.parametrize("key,value,field", [("mixed_precision", "fp16", "train.mixed_precision"),
                                               ("base_model_precision", "fp8", "model.base_model_precision")])
def test_import_simpletuner_unsupported_precision_is_a_spec_error(tmp_path, capsys, key, value, field):
    # fp16 autocast is not offered; an fp8 base with the quickstart's full fine-tune points at mixed_precision: fp8
    config = json.loads((FIXTURES / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["import-simpletuner", str(tmp_path / "config.json"), str(FIXTURES / "multidatabackend.json")]) == 2
    err = capsys.readouterr().err
    assert field in err and ("'bf16', 'fp8' or 'no'" in err if value == "fp16" else "train.mixed_precision: fp8" in err), err


def test_import_simpletuner_problems_name_the_simpletuner_key_to_fix(tmp_path, capsys):
    config = json.loads((FIXTURES / "config.json").read_text())
    del config["max_train_steps"]
    config.pop("num_train_epochs", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["import-simpletuner", str(tmp_path / "config.json"), str(FIXTURES / "multidatabackend.json")]) == 2
    err = capsys.readouterr().err
    assert "train.max_train_steps" in err and "--max_train_steps in the SimpleTuner config" in err, err
    assert "fix the SimpleTuner file and import again" in err, err


@pytest.mark.parametrize("value,expected", [("int8-quanto", "int8"), ("fp8-torchao", "fp8"), ("no_change", "bf16"),
                                            ("int4-quanto", None), ("nf4-bnb", None)])
def test_import_simpletuner_base_precision_names(tmp_path, capsys, value, expected):
    # SimpleTuner names the library in the value; the 8-bit ones map to trainer's torchao formats (a LoRA base)
    config = json.loads((FIXTURES / "config.json").read_text())
    config.update({"model_type": "lora", "base_model_precision": value})
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["import-simpletuner", str(tmp_path / "config.json"), str(FIXTURES / "multidatabackend.json")]) == 0
    captured = capsys.readouterr()
    spec = yaml.safe_load(captured.out)
    assert spec["model"].get("base_model_precision") == expected
    assert ("4-bit and 2-bit bases are not supported" in captured.err) == (expected is None)


def test_import_simpletuner_bad_json(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["import-simpletuner", str(bad)]) == 2


@pytest.mark.parametrize("flag", ["--version"])
def test_version(flag, capsys):
    assert main([flag]) == 0
    assert capsys.readouterr().out.startswith("trainer ")


def test_compiled_kernels_are_cached_on_the_workspace_volume_unless_the_user_says_where(tmp_path, monkeypatch):
    from job.cli import _open_job

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"workspace": str(tmp_path / "ws"), "model": {"pretrained_model_name_or_path": "models/none"},
                                    "data": {"datasets": [{"id": "clips", "source": "clips"}]}, "train": {"max_train_steps": 1}}))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # restored after the test
    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    _, ws = _open_job(spec, verbose=False)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(ws.root / "cache" / "compile")
    assert os.environ["TRITON_CACHE_DIR"] == str(ws.root / "cache" / "compile" / "triton")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    _open_job(spec, verbose=False)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")


@pytest.mark.parametrize("where", ["workspace", "output.dir"])
def test_a_workspace_path_the_file_system_refuses_is_an_environment_error_not_a_traceback(tmp_path, where):
    """A file where the workspace or output folder goes (as a read-only volume or a folder without
    permission): exit 3 naming the path and the fix, not a traceback and exit 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    data = {"data": {"datasets": [{"id": "clips", "source": "clips"}]}, "train": {"max_train_steps": 1},
            "workspace": str(tmp_path / "ws")}
    if where == "workspace":
        data["workspace"] = str(blocker / "ws")
    else:
        data["output"] = {"dir": str(blocker)}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    result = run_cli("pull", str(spec))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and str(blocker) in result.stderr, result.stderr
    assert "mount the workspace volume writable" in result.stderr
