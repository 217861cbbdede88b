"""The validation prompts: `validation.prompt` (nickname `validation`) plus the prompt library.

The library is `{nickname: prompt}` inline in the spec, or the path of a JSON file holding that
mapping (relative paths are under the workspace). Nicknames become file names, so they follow
the spec's safe-name rule; `validation` is reserved for the primary prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from job.errors import InputError
from job.spec.base import SAFE_NAME_HELP, is_safe_name

PRIMARY_NICKNAME = "validation"
_FIX = 'write the library as a JSON object {"nickname": "prompt", ...}; nicknames: ' + SAFE_NAME_HELP


def _check_library(library: Any, where: str) -> dict[str, str]:
    if not isinstance(library, dict):
        raise InputError(f"the prompt library {where} is a JSON {type(library).__name__}, not an object", _FIX)
    bad = [str(k) for k in library if not isinstance(k, str) or not is_safe_name(k) or k == PRIMARY_NICKNAME]
    if bad:
        raise InputError(
            f"the prompt library {where} has nicknames that are not usable as file names: {bad} "
            f"('{PRIMARY_NICKNAME}' is reserved for validation.prompt)",
            _FIX,
        )
    bad_prompts = [k for k, v in library.items() if not isinstance(v, str) or not v.strip()]
    if bad_prompts:
        raise InputError(f"the prompt library {where} has empty or non-text prompts for {bad_prompts}", _FIX)
    lowered: dict[str, str] = {}
    for name in library:  # file names collide on case-insensitive file systems
        if name.lower() in lowered:
            raise InputError(f"the prompt library {where} has nicknames that differ only in case: "
                             f"{lowered[name.lower()]!r} and {name!r}", "rename one of them")
        lowered[name.lower()] = name
    return dict(library)


def load_prompt_library(validation_spec, ws=None) -> dict[str, str]:
    """`validation.prompt_library` as {nickname: prompt} (empty when unset). Raises `InputError`."""
    library = validation_spec.prompt_library
    if library is None:
        return {}
    if isinstance(library, dict):
        return _check_library(library, "in the spec")
    path = ws.resolve(library) if ws is not None else Path(library)
    if not path.is_file():
        raise InputError(f"the prompt library file {path} does not exist",
                         "fix validation.prompt_library (relative paths are under the workspace)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read the prompt library {path}: {exc}", _FIX) from exc
    return _check_library(data, f"{path}")


def validation_prompts(validation_spec, ws=None) -> dict[str, str]:
    """All prompts to render, in order: {"validation": validation.prompt, **library}."""
    return {PRIMARY_NICKNAME: validation_spec.prompt, **load_prompt_library(validation_spec, ws)}
