"""Gathering facts: this (GPU-less) machine, nvidia-smi parsing, round trips."""

import os
import stat
import sys

from job.preflight import DeviceFacts, GpuFacts, gather_facts
from job.preflight import facts as facts_module


def test_gather_on_this_machine(tmp_path):
    f = gather_facts(workspace=tmp_path)
    assert f.python_version.count(".") == 2
    assert f.torch_version
    assert f.host_free_ram and f.host_free_ram > 0
    assert f.disk_free[str(tmp_path)] > 0
    assert "peft" in f.optional_libs
    assert DeviceFacts.from_dict(f.to_dict()) == f


def test_round_trip_with_gpus():
    f = DeviceFacts(python_version="3.12.3", torch_cuda="12.8", cuda_available=True, driver_version="570.86.15",
                    driver_cuda="12.8", gpus=[GpuFacts(0, "NVIDIA A100-SXM4-80GB", (8, 0), 85_000_000_000, 84_000_000_000)],
                    disk_free={"/ws": 10})
    again = DeviceFacts.from_dict(f.to_dict())
    assert again == f and again.capability == (8, 0) and again.free_vram() == 84_000_000_000
    assert again.free_disk_at(__import__("pathlib").Path("/ws/models/x")) == 10  # the containing folder's volume


def test_nvidia_smi_is_parsed_when_nvml_is_missing(tmp_path, monkeypatch):
    exe = tmp_path / "nvidia-smi"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "if any(a.startswith('--query-gpu') for a in sys.argv):\n"
        "    print('0, NVIDIA GeForce RTX 3090, 8.6, 24576, 23000, 535.104.05')\n"
        "else:\n"
        "    print('| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2     |')\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(facts_module, "_from_nvml", lambda facts: False)
    f = gather_facts()
    assert f.source == "nvidia-smi"
    assert f.driver_version == "535.104.05" and f.driver_cuda == "12.2"
    assert f.gpu_name == "NVIDIA GeForce RTX 3090" and f.capability == (8, 6)
    assert f.total_vram == 24576 * 1024 ** 2 and f.free_vram() == 23000 * 1024 ** 2
