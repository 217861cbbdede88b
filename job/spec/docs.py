"""The spec reference in Markdown, generated from the Pydantic models (docs/SPEC.md is this output)."""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .root import JobSpec


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is list:
        if not args:
            return "list"
        item = _type_name(args[0])
        return f"list of ({item})" if "\\|" in item else f"list of {item}"  # "list of (a | b) | c", not "list of a | b | c"
    if origin is dict:
        return "mapping"
    if origin is typing.Annotated:
        return _type_name(args[0])
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "SecretStr": "secret string"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{json.dumps(value)}`"
    if info.default is PydanticUndefined:
        return "**required**"
    return f"`{json.dumps(info.default)}`"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found:
            return found
    return None


def _section(model: type[BaseModel], path: str, out: list[str]) -> None:
    title = path or "top level"
    out.append(f"## `{title}`\n")
    out.append(f"{(model.__doc__ or '').strip()}\n")
    out.append("| key | type | default | description |")
    out.append("|---|---|---|---|")
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        desc = (info.description or "").replace("|", "\\|").replace("\n", " ")
        out.append(f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | {desc} |")
        sub = _nested_model(info.annotation)
        if sub is not None:
            is_list = typing.get_origin(info.annotation) is list
            nested.append(((f"{path}.{name}" if path else name) + ("[]" if is_list else ""), sub))
    out.append("")
    for sub_path, sub_model in nested:
        _section(sub_model, sub_path, out)


def markdown_reference() -> str:
    out = [
        "# Job spec reference",
        "",
        "Generated from the spec's Pydantic models by `trainer schema --markdown`; a test keeps this file in sync.",
        "Every string value may use `${VAR}` or `${VAR:-default}` to read the environment (`$$` is a literal `$`).",
        "Unknown keys are errors. Relative paths are under `workspace`.",
        "",
    ]
    _section(JobSpec, "", out)
    return "\n".join(out).rstrip() + "\n"
