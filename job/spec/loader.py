"""Reading a spec: YAML -> `${ENV}` expansion -> Pydantic validation -> cross-field rules.

Every problem is collected and reported at once, each with its YAML path, the
bad value, what is allowed, and a fix. Nothing here prints a traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from job.errors import InputError, SpecError, SpecProblem

from .root import JobSpec
from .rules import check_rules, spec_warnings

_ENV_PATTERN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Environment variables whose values are secrets: never printed, never saved.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|WEBHOOK|CREDENTIAL|AUTH", re.I)


@dataclass
class LoadedSpec:
    spec: JobSpec
    source: str
    warnings: list[SpecProblem] = field(default_factory=list)
    secret_values: list[str] = field(default_factory=list)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain YAML keeps the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1}); each key may appear once", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    for number, line in enumerate(text.splitlines(), start=1):
        indent = line[: len(line) - len(line.lstrip())]
        if "\t" in indent:
            raise SpecError([SpecProblem(f"line {number}", "indented with a tab; YAML allows only spaces", "replace the tab with spaces")], source)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(unknown line)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([SpecProblem(where, f"not valid YAML: {problem}", "fix the YAML syntax there")], source) from None


def expand_env(data: Any, env: typing.Mapping[str, str], path: str = "",
               problems: list[SpecProblem] | None = None, secrets: list[str] | None = None) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string; `$$` is a literal `$`."""
    problems = [] if problems is None else problems
    secrets = [] if secrets is None else secrets
    if isinstance(data, dict):
        return {k: expand_env(v, env, _join(path, k), problems, secrets) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, env, f"{path}[{i}]", problems, secrets) for i, v in enumerate(data)]
    if not isinstance(data, str):
        return data

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                problems.append(SpecProblem(path, f"environment variable {name} is not set", f"export {name}=... or write ${{{name}:-default}}"))
                return ""
            value = default
        if _SECRET_NAME.search(name) and value:
            secrets.append(value)
        return value

    if "${" in _ENV_PATTERN.sub("", data):  # what is left after every well-formed reference and $$
        problems.append(SpecProblem(path, "has a ${ that is not a complete ${NAME} or ${NAME:-default} reference",
                                    "close it with }, or write $${ for a literal ${"))
        return data
    expanded = _ENV_PATTERN.sub(replace, data)
    # A whole-value reference may stand for a number or a boolean: let YAML type it.
    if expanded != data and _ENV_PATTERN.fullmatch(data.strip()) and expanded:
        try:
            typed = yaml.safe_load(expanded)
            if isinstance(typed, (int, float, bool)):
                return typed
        except yaml.YAMLError:
            pass
    return expanded


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _loc_to_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, part)
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The Pydantic model class that owns the last key of `loc` (for did-you-mean)."""
    current: Any = JobSpec
    for part in loc[:-1]:
        current = _unwrap(current)
        if isinstance(part, int):
            args = [a for a in typing.get_args(current)]
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """Optional[X] / X | None / list[X] -> the model inside, where there is one."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        models = [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)]
        lists = [a for a in typing.get_args(tp) if typing.get_origin(a) is list]
        if models:
            return models[0]
        if lists:
            return lists[0]
    return tp


def _describe_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_FIXES = {  # pydantic's error kind -> how to write the value
    "int_parsing": "write a whole number without units or quotes, e.g. 480",
    "int_type": "write a whole number without units or quotes, e.g. 480",
    "int_from_float": "write a whole number, e.g. 480",
    "float_parsing": "write a number without units or quotes, e.g. 0.0001 or 1e-4",
    "float_type": "write a number without units or quotes, e.g. 0.0001 or 1e-4",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
}


def _yaml_boolean_word(value: Any, expected: str) -> str | None:
    """The allowed choice (no, off, yes, on, ...) that YAML turned into `value`, a boolean, if any."""
    if not isinstance(value, bool):
        return None
    words = ("no", "off", "false", "n") if value is False else ("yes", "on", "true", "y")
    return next((w for w in words if f"'{w}'" in expected.lower()), None)


def _is_secret_field(loc: tuple) -> bool:
    owner = _model_at(loc)
    if owner is None or not loc or loc[-1] not in owner.model_fields:
        return False
    return "SecretStr" in str(owner.model_fields[loc[-1]].annotation)


def problems_from_validation(exc: ValidationError, secrets: list[str] = ()) -> list[SpecProblem]:
    problems: list[SpecProblem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        # Pydantic names the union member or validator in the location; drop those.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        path = _loc_to_path(loc)
        kind = err["type"]
        if _is_secret_field(loc) or any(s and s in str(err.get("input")) for s in secrets):
            err = {**err, "input": "***"}
        if kind == "extra_forbidden":
            owner = _model_at(loc)
            key = str(loc[-1])
            allowed = sorted(owner.model_fields) if owner else []
            guess = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            fix = f"did you mean '{guess[0]}'?" if guess else (f"allowed keys here: {', '.join(allowed)}" if allowed else "remove it")
            if _SECRET_NAME.search(key):  # a credential the user tried to put in the spec: say where it goes instead
                fix = ("credentials are never written in the spec: set HF_TOKEN (the Hub) or AWS_ACCESS_KEY_ID / "
                       "AWS_SECRET_ACCESS_KEY (S3) in the environment, and remove this key")
            problems.append(SpecProblem(path, "unknown key", fix))
            continue
        if kind == "missing":
            problems.append(SpecProblem(path, "is required", "add it (see `trainer schema` or README's spec reference)"))
            continue
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        ctx = err.get("ctx") or {}
        if kind == "literal_error" and "expected" in ctx:
            message = f"{_describe_value(err.get('input'))} is not allowed; expected {ctx['expected']}"
            word = _yaml_boolean_word(err.get("input"), ctx["expected"])
            if word:  # YAML 1.1 reads an unquoted no/off/yes/on as a boolean
                problems.append(SpecProblem(path, f"is the boolean {err['input']}: YAML reads an unquoted {word} as a boolean",
                                            f"quote it: \"{word}\""))
                continue
        elif kind == "string_pattern_mismatch":
            message = f"{_describe_value(err.get('input'))} does not match the allowed form {ctx.get('pattern')}"
        elif "input" in err and kind not in ("model_type", "dict_type"):
            message = f"{message} (got {_describe_value(err['input'])})"
        problems.append(SpecProblem(path, message, _TYPE_FIXES.get(kind)))
    # One problem per path and message (unions report each member).
    unique: dict[tuple[str, str], SpecProblem] = {}
    for p in problems:
        unique.setdefault((p.path, p.message), p)
    return list(unique.values())


def validate_data(data: Any, source: str = "<spec>", env: typing.Mapping[str, str] | None = None) -> LoadedSpec:
    if data is None:
        raise SpecError([SpecProblem("", "the spec is empty", "start from `trainer init` or specs/")], source)
    if not isinstance(data, dict):
        raise SpecError([SpecProblem("", f"the spec must be a mapping of sections, got a {type(data).__name__}", "start from `trainer init`")], source)
    problems: list[SpecProblem] = []
    secrets: list[str] = []
    data = expand_env(data, os.environ if env is None else env, problems=problems, secrets=secrets)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(problems + problems_from_validation(exc, secrets), source) from None
    problems.extend(check_rules(spec))
    if problems:
        raise SpecError(problems, source)
    for hook in spec.webhooks:
        secrets.append(hook.url.get_secret_value())
    return LoadedSpec(spec=spec, source=source, warnings=spec_warnings(spec), secret_values=secrets)


def load_spec(path: str | Path, env: typing.Mapping[str, str] | None = None) -> LoadedSpec:
    """Read and validate a spec file. Raises SpecError (exit 2) listing every problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"spec file {str(path)!r} does not exist", "check the path; `trainer init spec.yaml` writes a starter spec")
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a folder, not a spec file", "pass the path of a .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"spec file {str(path)!r} is not UTF-8 text", "save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"cannot read spec file {str(path)!r}: {exc.strerror}", "check its permissions") from None
    return validate_data(parse_yaml(text, str(path)), str(path), env)
