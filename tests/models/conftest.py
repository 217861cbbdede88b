"""Fixtures for the SANA-Video model tests: one tiny random model folder per test session."""

from __future__ import annotations

import pytest
import torch

from job.models.sanavideo.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny SANA-Video diffusers folder (built offline, ~0.2 s). Treat as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-sanavideo") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_components(tiny_model_path):
    """All five parts of the tiny model in float32. Shared: do not modify the modules."""
    from job.models.sanavideo.loading import load_components

    return load_components(
        tiny_model_path, dtype=torch.float32, parts={"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
    )


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_path):
    """The stock diffusers pipeline loaded from the tiny folder: the reference to compare against."""
    from diffusers import SanaVideoPipeline

    pipe = SanaVideoPipeline.from_pretrained(tiny_model_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
