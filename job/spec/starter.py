"""Specs shipped inside the package: the starter `trainer init` writes, and the CPU smoke job."""

from importlib.resources import files

STARTER_SPEC = files("job.spec").joinpath("starter.yaml").read_text(encoding="utf-8")
# specs/smoke-cpu.yaml links here, so `trainer smoke` works from an installed package too.
SMOKE_SPEC_PATH = files("job.spec").joinpath("smoke.yaml")
