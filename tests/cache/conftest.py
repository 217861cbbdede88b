"""Fixtures for the cache-phase tests: one tiny model and one set of synthetic clips per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cache_helpers import CLIPS, make_workspace, spec_dict  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    from job.models.sanavideo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-sanavideo") / "model", seed=0)


@pytest.fixture(scope="session")
def clips_template(tmp_path_factory):
    """Four 17-frame 64x64 H.264 clips at 8 fps with textfile captions (read-only: tests copy it)."""
    from job.smoke import write_synthetic_dataset

    folder = tmp_path_factory.mktemp("clips-template") / "clips"
    write_synthetic_dataset(folder, clips=CLIPS, frames=17, width=64, height=64, fps=8)
    return folder


@pytest.fixture
def job_dict(tmp_path, tiny_model_path, clips_template):
    """A spec (as a dict) over a fresh workspace holding a copy of the clips."""
    ws = make_workspace(tmp_path, clips_template)
    return spec_dict(ws, tiny_model_path)
