"""Fixtures for the train tests: one tiny random SANA-Video model per session."""

from __future__ import annotations

import logging

import pytest
import torch

from job.models.sanavideo.tiny import build_tiny_model

# The tiny model's ops are too small to gain from threads, and on a busy 2-core machine
# spinning intra-op threads make every step many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny SANA-Video diffusers folder (read-only for the tests)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-sanavideo-train") / "model", seed=0)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="trainer")
    yield
