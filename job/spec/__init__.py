"""The job spec: Pydantic models (one file per section), loading, rules, redaction, schema."""

from .loader import LoadedSpec, load_spec, parse_yaml, validate_data
from .redact import redacted_dict, redacted_yaml
from .root import JobSpec
from .rules import check_rules, spec_warnings

__all__ = ["JobSpec", "LoadedSpec", "load_spec", "parse_yaml", "validate_data", "redacted_dict", "redacted_yaml",
           "check_rules", "spec_warnings", "json_schema"]


def json_schema() -> dict:
    """JSON Schema of the spec, for editors (yaml-language-server) and docs."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "trainer job spec"
    return schema
