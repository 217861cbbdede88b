"""Shared pieces of the spec models."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Names that become file names (dataset ids, prompt nicknames): portable and safe.
SAFE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SAFE_NAME_HELP = "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"

SafeName = Annotated[str, Field(pattern=SAFE_NAME_PATTERN)]


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, every field is described."""

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=False,
                              populate_by_name=True)


def is_safe_name(name: str) -> bool:
    return re.match(SAFE_NAME_PATTERN, name) is not None


def parse_wxh(value: str) -> tuple[int, int]:
    """'832x480' -> (832, 480). Raises ValueError with the expected form."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(value))
    if not match:
        raise ValueError(f"{value!r} is not of the form WIDTHxHEIGHT, e.g. '832x480'")
    return int(match.group(1)), int(match.group(2))


def is_4k_plus_1(frames: int) -> bool:
    return frames >= 1 and (frames - 1) % 4 == 0


def nearest_4k_plus_1(frames: int) -> int:
    return max(1, ((frames - 1) // 4) * 4 + 1)


# The Wan VAE downsamples 8x in space and the transformer patches 2x2:
# every pixel side must be a multiple of 16.
SPATIAL_MULTIPLE = 16
