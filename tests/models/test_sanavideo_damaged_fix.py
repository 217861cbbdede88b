"""The fix for a damaged model file: "re-download" only for a folder the pull phase downloaded; a local
path (which pull never touches) is told to replace the files at that path."""

from __future__ import annotations

import shutil

import pytest
import torch

from job.errors import InputError
from job.models.sanavideo.loading import PULL_MARKER, load_components


def _damage(folder, what: str):
    if what == "truncated weights":
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        return {"transformer"}
    (folder / "transformer" / "config.json").write_text('{"_class_name": "SanaVideo')  # cut short
    return {"transformer"}


@pytest.mark.parametrize("what", ["truncated weights", "broken config.json"])
def test_a_damaged_local_model_is_not_told_to_re_download(tiny_model_path, tmp_path, what):
    local = shutil.copytree(tiny_model_path, tmp_path / "my-model")
    parts = _damage(local, what)
    with pytest.raises(InputError) as info:
        load_components(local, dtype=torch.float32, parts=parts)
    fix = info.value.fix
    assert "re-download" not in fix and "run the pull phase again" not in fix
    assert str(local) in fix and "local path" in fix and "copy" in fix


@pytest.mark.parametrize("what", ["truncated weights", "broken config.json"])
def test_a_damaged_pulled_model_is_told_to_re_download(tiny_model_path, tmp_path, what):
    pulled = shutil.copytree(tiny_model_path, tmp_path / "pulled")
    (pulled / PULL_MARKER).write_text("{}")  # what the pull phase writes into the folders it downloads
    parts = _damage(pulled, what)
    with pytest.raises(InputError) as info:
        load_components(pulled, dtype=torch.float32, parts=parts)
    assert info.value.fix == "re-download the model (run the pull phase again)"
