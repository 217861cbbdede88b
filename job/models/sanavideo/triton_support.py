"""When this package's hand-written Triton kernels can run.

They run on CUDA tensors when Triton is importable (the CUDA builds of torch ship it). On CPU
tensors they run only in Triton's interpreter, for the tests (the CPU test setup installs triton
for that), which takes two variables: `TRITON_INTERPRET=1`, which Triton reads when it is first
imported (so `tests/conftest.py` sets it before anything imports triton), and
`TRAINER_TRITON_ON_CPU=1` (the `triton_interpreter` test fixture), so that only the tests that ask
pay the interpreter's slowness. Anywhere else a CPU tensor takes the plain PyTorch path the kernel
replaces.

    if kernels_usable(x):
        out = fused_op(x, ...)
    else:
        out = reference(x, ...)
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """The kernels may run on CPU tensors, in Triton's interpreter (see the module docstring)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("TRAINER_TRITON_ON_CPU") == "1"


def kernels_usable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on `t` here."""
    if not triton_importable():
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())
