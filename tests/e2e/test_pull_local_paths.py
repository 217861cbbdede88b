"""`trainer pull` with local paths: they are used in place, so pull checks them (exit 2 naming the spec
field and the path) instead of saying "nothing to download" and leaving the error to the cache phase."""

from __future__ import annotations

import shutil

import pytest
import yaml

from job.cli import main
from job.errors import EXIT_BAD_INPUT, InputError


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from job.models.sanavideo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("pull-local") / "model", seed=0)


def _spec(tmp_path, base: str, source: str | None = None, **extra):
    if source is None:
        source = str(tmp_path / "clips")
        (tmp_path / "clips").mkdir(exist_ok=True)
    data = {"workspace": str(tmp_path / "ws"), "model": {"pretrained_model_name_or_path": base, **extra.pop("model", {})},
            "data": {"datasets": [{"id": "clips", "source": source}]}, "train": {"max_train_steps": 1, **extra.pop("train", {})},
            **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _pull(spec_path):
    from job.phases import pull
    from job.spec import load_spec
    from job.workspace import Workspace

    loaded = load_spec(spec_path)
    pull(loaded, Workspace.for_spec(loaded.spec))


def _copy(model, dest):
    shutil.copytree(model, dest)
    return dest


@pytest.mark.parametrize("case", ["missing", "empty", "no transformer", "no weights"])
def test_a_bad_local_model_folder_fails_in_pull(tmp_path, tiny_model, case):
    folder = tmp_path / "nonexist_model"
    if case == "empty":
        folder.mkdir()
    elif case == "no transformer":
        shutil.rmtree(_copy(tiny_model, folder) / "transformer")
    elif case == "no weights":
        (_copy(tiny_model, folder) / "text_encoder" / "model.safetensors").unlink()
    spec = _spec(tmp_path, str(folder))
    with pytest.raises(InputError) as info:
        _pull(spec)
    text = str(info.value)
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert text.startswith("model.pretrained_model_name_or_path: ") and str(folder) in text
    assert {"missing": "does not exist", "empty": "is empty", "no transformer": "missing transformer/",
            "no weights": "no weight file (*.safetensors) in text_encoder/"}[case] in text
    assert "correct the path" in info.value.fix and "hf://" in info.value.fix
    assert main(["pull", str(spec)]) == EXIT_BAD_INPUT  # not 0 with "nothing to download"


def test_a_complete_local_model_and_dataset_pull_nothing(tmp_path, tiny_model, capsys):
    assert main(["pull", str(_spec(tmp_path, str(tiny_model)))]) == 0


def test_a_missing_local_vae_path_fails_in_pull(tmp_path, tiny_model):
    spec = _spec(tmp_path, str(tiny_model), model={"pretrained_vae_model_name_or_path": str(tmp_path / "no-vae")})
    with pytest.raises(InputError) as info:
        _pull(spec)
    assert info.value.message.startswith("model.pretrained_vae_model_name_or_path: ")
    assert str(tmp_path / "no-vae") in info.value.message and "does not exist" in info.value.message
    # a VAE folder of its own (no vae/ under the base model then) passes
    base = _copy(tiny_model, tmp_path / "base")
    vae = tmp_path / "vae"
    shutil.move(base / "vae", vae)
    _pull(_spec(tmp_path, str(base), model={"pretrained_vae_model_name_or_path": str(vae)}))


def test_a_missing_local_crepa_encoder_fails_in_pull(tmp_path, tiny_model):
    spec = _spec(tmp_path, str(tiny_model), train={"crepa": {"enabled": True, "encoder": "dinov2_vits14",
                                                             "encoder_path": str(tmp_path / "dinov2")}})
    with pytest.raises(InputError) as info:
        _pull(spec)
    assert info.value.message.startswith("train.crepa.encoder_path: ") and str(tmp_path / "dinov2") in info.value.message
    (tmp_path / "dinov2").mkdir()
    (tmp_path / "dinov2" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no weight file"):
        _pull(spec)


def test_a_missing_local_dataset_folder_fails_in_pull(tmp_path, tiny_model):
    spec = _spec(tmp_path, str(tiny_model), source=str(tmp_path / "clpis"))
    with pytest.raises(InputError) as info:
        _pull(spec)
    assert "data.datasets[0].source" in info.value.message and str(tmp_path / "clpis") in info.value.message
    assert "does not exist" in info.value.message and "hf://datasets/" in info.value.fix
    assert main(["pull", str(spec)]) == EXIT_BAD_INPUT
