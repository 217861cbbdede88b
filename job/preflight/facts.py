"""What the machine is: gathered once by `gather_facts()`, injected by tests.

NVML (the `pynvml` module of NVIDIA's `nvidia-ml-py` package, if importable) gives the
driver version, the CUDA version it supports, each GPU's name, compute capability and free /
total memory without creating a CUDA context. Without it `nvidia-smi` is parsed; without
that, torch is asked (which creates a context, ~0.5 GiB, on the GPU it measures).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cuda import cuda_from_int

#: Optional libraries some specs need: distribution name -> import name.
OPTIONAL_LIBS = {
    "torchao": "torchao",            # int8 / fp8 quantised base
    "bitsandbytes": "bitsandbytes",  # adamw_8bit
    "torch-optimi": "optimi",        # optimi-adamw
    "peft": "peft",                  # LoRA
    "nvidia-ml-py": "pynvml",        # driver / VRAM facts without a CUDA context
}


@dataclass
class GpuFacts:
    index: int
    name: str
    capability: tuple[int, int] | None
    total_vram: int | None  # bytes
    free_vram: int | None   # bytes


@dataclass
class DeviceFacts:
    """Everything preflight checks against. Bytes for sizes; None where unknown."""

    python_version: str
    torch_version: str | None = None
    torch_cuda: str | None = None          # CUDA runtime torch was built with, e.g. "12.8"
    cuda_available: bool = False           # torch.cuda.is_available()
    torch_cuda_error: str | None = None    # why torch cannot use CUDA, when it cannot
    driver_version: str | None = None      # e.g. "550.54.14"
    driver_cuda: str | None = None         # the newest CUDA the driver supports, e.g. "12.4"
    gpus: list[GpuFacts] = field(default_factory=list)
    host_free_ram: int | None = None       # bytes available to this process (cgroup limit included)
    host_total_ram: int | None = None
    disk_free: dict[str, int] = field(default_factory=dict)  # path -> free bytes
    optional_libs: dict[str, str | None] = field(default_factory=dict)  # distribution -> version or None
    source: str = "none"                   # where GPU facts came from: nvml / nvidia-smi / torch / none

    # -- the GPU this job uses (the first; the smallest free VRAM for several processes) --
    @property
    def gpu(self) -> GpuFacts | None:
        return self.gpus[0] if self.gpus else None

    @property
    def gpu_name(self) -> str | None:
        return self.gpu.name if self.gpu else None

    @property
    def capability(self) -> tuple[int, int] | None:
        return self.gpu.capability if self.gpu else None

    @property
    def total_vram(self) -> int | None:
        return self.gpu.total_vram if self.gpu else None

    def free_vram(self, processes: int = 1) -> int | None:
        used = self.gpus[:max(1, processes)]
        values = [g.free_vram for g in used if g.free_vram is not None]
        return min(values) if values else None

    def free_disk_at(self, path: Path) -> int | None:
        """Free bytes on the volume holding `path` (known paths first, then asked now)."""
        target = Path(path)
        best = None
        for key in self.disk_free:  # the longest known folder that contains `path`
            k = Path(key)
            if (target == k or k in target.parents) and (best is None or len(k.parts) > len(Path(best).parts)):
                best = key
        if best is not None:
            return self.disk_free[best]
        return disk_free(target)

    def has_lib(self, dist: str) -> bool:
        return bool(self.optional_libs.get(dist))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for g in d["gpus"]:
            if g["capability"] is not None:
                g["capability"] = list(g["capability"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeviceFacts":
        data = dict(data)
        gpus = [GpuFacts(**{**g, "capability": tuple(g["capability"]) if g.get("capability") else None})
                for g in data.pop("gpus", [])]
        return cls(gpus=gpus, **data)


# ----------------------------------------------------------------------------- gathering

def disk_free(path: Path) -> int | None:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _host_ram() -> tuple[int | None, int | None]:
    """(available, total) bytes, honouring a cgroup (container) memory limit."""
    available = total = None
    try:
        import psutil

        vm = psutil.virtual_memory()
        available, total = vm.available, vm.total
    except Exception:  # noqa: BLE001 - psutil missing: /proc/meminfo
        try:
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
            available = int(info["MemAvailable"].split()[0]) * 1024
            total = int(info["MemTotal"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            pass
    limit, used = _cgroup_memory()
    if limit is not None:
        room = max(0, limit - (used or 0))
        available = room if available is None else min(available, room)
        total = limit if total is None else min(total, limit)
    return available, total


def _cgroup_memory() -> tuple[int | None, int | None]:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
            return None, None
        try:
            used = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            used = None
        return int(raw), used
    return None, None


def _optional_libs() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist, module in OPTIONAL_LIBS.items():
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "installed" if importlib.util.find_spec(module) is not None else None
        except Exception:  # noqa: BLE001
            out[dist] = None
    return out


def _from_nvml(facts: DeviceFacts) -> bool:
    try:
        import pynvml
    except Exception:  # noqa: BLE001 - not installed
        return False
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver / no GPU
        return False
    try:
        drv = pynvml.nvmlSystemGetDriverVersion()
        facts.driver_version = drv.decode() if isinstance(drv, bytes) else str(drv)
        try:
            facts.driver_cuda = cuda_from_int(int(pynvml.nvmlSystemGetCudaDriverVersion()))
        except Exception:  # noqa: BLE001
            pass
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            try:
                cap = tuple(int(x) for x in pynvml.nvmlDeviceGetCudaComputeCapability(h))
            except Exception:  # noqa: BLE001
                cap = None
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            facts.gpus.append(GpuFacts(i, name.decode() if isinstance(name, bytes) else str(name), cap, int(mem.total), int(mem.free)))
        facts.source = "nvml"
        return True
    except Exception:  # noqa: BLE001 - a partial answer is still an answer
        return bool(facts.driver_version)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _from_nvidia_smi(facts: DeviceFacts) -> bool:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        q = subprocess.run([exe, "--query-gpu=index,name,compute_cap,memory.total,memory.free,driver_version",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15)
        head = subprocess.run([exe], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return False
    if q.returncode != 0:
        return False
    for line in q.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6:
            continue
        try:
            cap = tuple(int(x) for x in parts[2].split(".")) if re.fullmatch(r"\d+\.\d+", parts[2]) else None
            facts.gpus.append(GpuFacts(int(parts[0]), parts[1], cap, int(float(parts[3])) * 1024 ** 2, int(float(parts[4])) * 1024 ** 2))
        except ValueError:
            continue
        facts.driver_version = parts[5]
    m = re.search(r"CUDA Version:\s*([\d.]+)", head.stdout or "")
    if m:
        facts.driver_cuda = m.group(1)
    facts.source = "nvidia-smi"
    return bool(facts.gpus or facts.driver_version)


def _from_torch(facts: DeviceFacts, torch) -> None:
    if not facts.cuda_available:
        return
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        facts.gpus.append(GpuFacts(i, p.name, (p.major, p.minor), int(total), int(free)))
    try:
        v = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        if v:
            facts.driver_cuda = cuda_from_int(int(v))
    except Exception:  # noqa: BLE001
        pass
    facts.source = "torch"


def gather_facts(workspace: Path | None = None, extra_paths: list[Path] | None = None) -> DeviceFacts:
    """Look at this machine: Python, torch, driver, GPUs, RAM, disk and optional libraries."""
    facts = DeviceFacts(python_version=platform.python_version())
    torch = None
    try:
        import torch  # noqa: F811
    except Exception as exc:  # noqa: BLE001
        facts.torch_cuda_error = f"torch cannot be imported: {exc}"
    if torch is not None:
        facts.torch_version = torch.__version__
        facts.torch_cuda = torch.version.cuda
        try:
            facts.cuda_available = bool(torch.cuda.is_available())
        except Exception as exc:  # noqa: BLE001
            facts.cuda_available = False
            facts.torch_cuda_error = str(exc)
        if not facts.cuda_available and facts.torch_cuda and not facts.torch_cuda_error:
            try:
                torch.cuda.init()
            except Exception as exc:  # noqa: BLE001 - this is the message we want to show
                facts.torch_cuda_error = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
    if not _from_nvml(facts):
        if not _from_nvidia_smi(facts) and torch is not None:
            _from_torch(facts, torch)
    facts.host_free_ram, facts.host_total_ram = _host_ram()
    for path in [workspace, *(extra_paths or [])]:
        if path is not None:
            free = disk_free(Path(path))
            if free is not None:
                facts.disk_free[str(path)] = free
    facts.optional_libs = _optional_libs()
    return facts
