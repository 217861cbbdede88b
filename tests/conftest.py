"""Fixtures shared by every test directory."""

from __future__ import annotations

import os

import pytest

# Triton reads TRITON_INTERPRET when it is first imported (torch may import it early), and its interpreter
# is what runs the package's kernels on CPU tensors. Setting it changes nothing else: CPU tensors reach
# a kernel only with TRAINER_TRITON_ON_CPU=1 as well (`triton_interpreter` below), and CI has no GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run the package's Triton kernels on CPU tensors, through Triton's interpreter.

    Skips where triton is not installed (the CPU test setup installs it: `.[test]`) or where the process
    started with TRITON_INTERPRET set to something else. Outside this fixture CPU tensors take the plain
    PyTorch paths (`job.models.sanavideo.triton_support.kernels_usable`)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1 in this test process")
    monkeypatch.setenv("TRAINER_TRITON_ON_CPU", "1")
