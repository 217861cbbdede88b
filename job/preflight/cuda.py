"""torch's CUDA runtime vs the installed NVIDIA driver.

The rule (NVIDIA's CUDA compatibility guide, "minor version compatibility", and the
CUDA Toolkit release notes' table of toolkit GA drivers, Linux x86_64):

- A driver runs any CUDA runtime up to the CUDA version it reports (`nvidia-smi`'s
  "CUDA Version", NVML's `nvmlSystemGetCudaDriverVersion`): ok.
- Across a major version there is no compatibility: a 12.x driver cannot run a
  cu13x torch. Fail.
- Within a major version, a newer runtime runs on an older driver through *minor
  version compatibility* when the driver is at least the family minimum (11.x:
  450.80.02, 12.x: 525.60.13, 13.x: 580.65.06), with a limited feature set (no JIT
  of newer PTX; APIs that need the newer driver fail). Warn, and say which driver
  gives full support (the toolkit's GA driver below).
- Blackwell GPUs (compute capability 10.x / 12.x) need the CUDA 12.8 feature set,
  i.e. driver 570.26+, whatever the torch runtime says: below that, fail.

Linux drivers only (the job runs in a Linux container); Windows numbers differ.
"""

from __future__ import annotations

import re

#: Minimum driver for CUDA minor-version compatibility, per CUDA major version (Linux).
MINOR_COMPAT_MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

#: Driver shipped with each toolkit's GA release (Linux x86_64): full support of that runtime.
TOOLKIT_GA_DRIVER = {
    (11, 0): "450.36.06", (11, 1): "455.23.05", (11, 2): "460.27.03", (11, 3): "465.19.01",
    (11, 4): "470.42.01", (11, 5): "495.29.05", (11, 6): "510.39.01", (11, 7): "515.43.04",
    (11, 8): "520.61.05", (12, 0): "525.60.13", (12, 1): "530.30.02", (12, 2): "535.54.03",
    (12, 3): "545.23.06", (12, 4): "550.54.14", (12, 5): "555.42.02", (12, 6): "560.28.03",
    (12, 8): "570.26", (12, 9): "575.51.03", (13, 0): "580.65.06", (13, 1): "590.44.01",
}

#: Blackwell (sm100 / sm120) needs CUDA 12.8 features, which need this driver.
BLACKWELL_MIN_DRIVER = "570.26"


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'550.54.14' -> (550, 54, 14); '12.4' -> (12, 4); None/garbage -> None."""
    if not text:
        return None
    m = re.match(r"\s*(\d+(?:\.\d+)*)", str(text))
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def cuda_from_int(value: int) -> str:
    """NVML / cudaDriverGetVersion integer 12040 -> '12.4'."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def ga_driver_for(runtime: tuple[int, int]) -> str | None:
    """The toolkit GA driver of `runtime`, or of the nearest listed version above it."""
    if runtime in TOOLKIT_GA_DRIVER:
        return TOOLKIT_GA_DRIVER[runtime]
    later = sorted(v for v in TOOLKIT_GA_DRIVER if v >= runtime and v[0] == runtime[0])
    return TOOLKIT_GA_DRIVER[later[0]] if later else None


def _ge(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    n = max(len(a), len(b))
    return tuple(a) + (0,) * (n - len(a)) >= tuple(b) + (0,) * (n - len(b))


def check_driver(torch_cuda: str | None, driver_version: str | None, driver_cuda: str | None,
                 capability: tuple[int, int] | None = None) -> tuple[str, str, str | None]:
    """(status, detail, fix) for torch's CUDA runtime `torch_cuda` ('12.8') on a driver
    `driver_version` ('550.54.14') that supports CUDA up to `driver_cuda` ('12.4')."""
    runtime = parse_version(torch_cuda)
    drv = parse_version(driver_version)
    supported = parse_version(driver_cuda)
    if runtime is None:
        return "fail", "this torch build has no CUDA runtime (a CPU-only wheel)", (
            "install a CUDA build of torch, e.g. pip install torch --index-url https://download.pytorch.org/whl/cu128 "
            "(or use the trainer container image)")
    runtime = runtime[:2] if len(runtime) >= 2 else (runtime[0], 0)
    rt = f"{runtime[0]}.{runtime[1]}"
    if drv is None and supported is None:
        return "warn", f"torch uses CUDA {rt}; the driver version could not be read (no NVML, no nvidia-smi)", (
            "install nvidia-ml-py (pip install nvidia-ml-py) or make nvidia-smi available so the driver can be checked")
    if capability is not None and capability[0] in (10, 12) and drv is not None and not _ge(drv, parse_version(BLACKWELL_MIN_DRIVER)):
        return "fail", (f"a Blackwell GPU (sm{capability[0]}{capability[1]}) needs CUDA 12.8 features, i.e. driver "
                        f">= {BLACKWELL_MIN_DRIVER}; found {driver_version}"), (
            f"install NVIDIA driver >= {BLACKWELL_MIN_DRIVER} (570 branch or newer) and a torch build for CUDA 12.8+")
    ga = ga_driver_for(runtime)
    if supported is not None:
        supported = supported[:2] if len(supported) >= 2 else (supported[0], 0)
        if supported >= runtime:
            return "ok", f"torch CUDA {rt} on driver {driver_version or '?'} (supports up to CUDA {supported[0]}.{supported[1]})", None
        sup = f"{supported[0]}.{supported[1]}"
        if supported[0] < runtime[0]:
            minimum = MINOR_COMPAT_MIN_DRIVER.get(runtime[0], ga)
            return "fail", (f"driver {driver_version or '?'} supports CUDA up to {sup}, but torch was built for CUDA {rt}: "
                            f"there is no compatibility across CUDA major versions"), (
                f"install NVIDIA driver >= {ga or minimum} (>= {minimum} at the very least, through minor-version "
                f"compatibility), or use a torch build for CUDA {supported[0]}.x, e.g. pip install torch --index-url "
                f"https://download.pytorch.org/whl/cu{supported[0]}{supported[1]}")
    # Same major (or only the driver version is known): minor-version compatibility.
    minimum = MINOR_COMPAT_MIN_DRIVER.get(runtime[0])
    if drv is not None and minimum is not None and not _ge(drv, parse_version(minimum)):
        return "fail", (f"driver {driver_version} is older than {minimum}, the minimum for any CUDA {runtime[0]}.x runtime "
                        f"(torch uses CUDA {rt})"), (
            f"install NVIDIA driver >= {ga or minimum} for CUDA {rt} (>= {minimum} at the very least)")
    if drv is not None and ga is not None and _ge(drv, parse_version(ga)):
        return "ok", f"torch CUDA {rt} on driver {driver_version}", None
    return "warn", (f"torch CUDA {rt} on driver {driver_version or '?'}"
                    + (f" (supports CUDA {supported[0]}.{supported[1]})" if supported else "")
                    + ": runs through CUDA minor-version compatibility (no JIT of newer PTX, some newer features missing)"), (
        f"for full CUDA {rt} support install NVIDIA driver >= {ga}" if ga else "update the NVIDIA driver")
