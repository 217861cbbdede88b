"""The resolved spec as the user may see and save it: secrets replaced by '***'."""

from __future__ import annotations

from typing import Any

import yaml

from .root import JobSpec

REDACTED = "***"


def redacted_dict(spec: JobSpec, secret_values: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The spec as plain data. SecretStr fields and any value that came from a secret env var are masked."""
    data = spec.model_dump(mode="json")  # SecretStr dumps as '**********'

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: mask(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        if isinstance(value, str):
            if set(value) == {"*"}:
                return REDACTED
            for secret in secret_values:
                if secret and secret in value:
                    value = value.replace(secret, REDACTED)
        return value

    return mask(data)


def redacted_yaml(spec: JobSpec, secret_values: list[str] | tuple[str, ...] = ()) -> str:
    return yaml.safe_dump(redacted_dict(spec, secret_values), sort_keys=False, allow_unicode=True)
