"""Preflight tests: injected DeviceFacts (no GPU needed), specs built in code, real servers for
remote checks (moto S3, the Hub stand-in)."""

import json
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.servers.fixtures import *  # noqa: E402,F401,F403

import pytest  # noqa: E402

from job.preflight import DeviceFacts, GpuFacts  # noqa: E402
from job.spec import JobSpec  # noqa: E402
from job.workspace import Workspace  # noqa: E402

GIB = 1024 ** 3


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def make_spec(tmp_path):
    """A JobSpec for the released 2B model, with nested overrides: make_spec(train={"train_batch_size": 2})."""

    def make(**overrides) -> JobSpec:
        data = {
            "workspace": str(tmp_path / "ws"),
            "model": {"pretrained_model_name_or_path": "hf://Efficient-Large-Model/SANA-Video_2B_480p_diffusers"},
            "data": {"datasets": [{"id": "clips", "source": "clips"}]},
            "train": {"max_train_steps": 100, "optimizer": "adamw_bf16"},
            "checkpoints": {"total_limit": 2},
        }
        return JobSpec.model_validate(_merge(data, overrides))

    return make


@pytest.fixture
def workspace():
    def make(spec: JobSpec) -> Workspace:
        return Workspace.for_spec(spec)

    return make


@pytest.fixture
def facts():
    """DeviceFacts of a healthy H100 machine; keyword overrides change single facts."""

    def make(gpu: bool = True, name: str = "NVIDIA H100 80GB HBM3", capability=(9, 0), total_gib: float = 79.6,
             free_gib: float = 78.6, ram_gib: float = 200.0, disk_gib: float = 2000.0, disk_paths=None,
             libs=None, **kw) -> DeviceFacts:
        gpus = [GpuFacts(0, name, capability, int(total_gib * GIB), int(free_gib * GIB))] if gpu else []
        base = dict(python_version="3.12.3", torch_version="2.8.0+cu128", torch_cuda="12.8", cuda_available=gpu,
                    driver_version="580.95.05" if gpu else None, driver_cuda="13.0" if gpu else None, gpus=gpus,
                    host_free_ram=int(ram_gib * GIB), host_total_ram=int(ram_gib * GIB),
                    disk_free={p: int(disk_gib * GIB) for p in (disk_paths or ["/"])},
                    optional_libs={"torchao": None, "bitsandbytes": None, "torch-optimi": "0.3.3", "peft": "0.17.0",
                                   "nvidia-ml-py": "13.580.82", **(libs or {})},
                    source="nvml" if gpu else "none")
        base.update(kw)
        return DeviceFacts(**base)

    return make


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A local model folder whose transformer config is the tiny test model (CPU smoke job)."""
    from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

    folder = tmp_path / "ws" / "models" / "tiny"
    (folder / "transformer").mkdir(parents=True)
    config = {"_class_name": "SanaVideoTransformer3DModel", **TINY_TRANSFORMER_CONFIG}
    config["patch_size"] = list(config["patch_size"])
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text("{}")
    return folder
