"""The starter spec `trainer init` writes: the reference quickstart's job, commented."""

from importlib.resources import files

STARTER_SPEC = files("job.spec").joinpath("starter.yaml").read_text(encoding="utf-8")
