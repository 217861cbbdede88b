"""The job spec: every rule, every message, redaction, schema and the shipped specs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from job.errors import InputError, SpecError
from job.spec import json_schema, load_spec, redacted_yaml, validate_data
from job.spec.docs import markdown_reference

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "specs").glob("*.yaml"))

MINIMAL = {
    "data": {"datasets": [{"id": "clips", "source": "datasets/clips"}]},
    "train": {"max_train_steps": 10},
}


def spec_with(**changes) -> dict:
    """MINIMAL with dotted-path changes, e.g. spec_with(**{"memory.gradient_checkpointing": False})."""
    data = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def problems_of(data: dict, env: dict | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_data(data, env=env or {})
    return [str(p) for p in info.value.problems]


def test_minimal_spec_gets_quickstart_defaults():
    spec = validate_data(MINIMAL, env={}).spec
    assert spec.validation.num_video_frames == 81
    assert spec.validation.resolutions == ["832x480"]
    assert spec.validation.num_inference_steps == 50
    assert spec.validation.guidance == 6.0
    assert spec.data.framerate == 16
    assert spec.data.datasets[0].video.num_frames == 81
    assert spec.model.prompt.max_sequence_length == 300


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    loaded = load_spec(path, env={})
    assert loaded.spec.model.family == "sanavideo"
    assert not loaded.warnings, loaded.warnings  # `trainer init` writes one of these: no warning on a user's first validate


def test_crepa_options_changed_while_crepa_is_off_are_named():
    spelled_out = validate_data(spec_with(**{"train.crepa": {"enabled": False, "weight": 0.5, "block_index": 10}}), "<test>", env={})
    assert not spelled_out.warnings  # the defaults, written out
    changed = validate_data(spec_with(**{"train.crepa": {"enabled": False, "weight": 0.8, "block_index": 10}}), "<test>", env={})
    assert [(w.path, "weight set but CREPA is off" in str(w)) for w in changed.warnings] == [("train.crepa", True)]


def test_shipped_specs_cover_full_lora_and_smoke():
    names = {p.name for p in SHIPPED}
    assert {"sanavideo-2b-480p-full.yaml", "sanavideo-2b-480p-lora.yaml", "smoke-cpu.yaml"} <= names


def test_the_spec_that_spells_out_the_speed_defaults_lists_each_of_them():
    """specs/sanavideo-2b-480p-i2v-lora.yaml says its `speed:` section is the defaults spelled out: every switch,
    each at its default (so a new switch or a changed default cannot leave it stale)."""
    import yaml

    from job.spec.speed import SpeedSpec

    path = ROOT / "specs" / "sanavideo-2b-480p-i2v-lora.yaml"
    assert "# the defaults, spelled out" in path.read_text()
    section = yaml.safe_load(path.read_text())["speed"]
    defaults = SpeedSpec().model_dump()
    assert set(section) == set(defaults)
    assert section == defaults


# One row per cross-field or field rule: (changes, expected path, a word of the message).
RULES = [
    ({"memory.group_offload": {"enabled": True}, "memory.enable_model_cpu_offload": True}, "memory.enable_model_cpu_offload", "cannot be combined"),
    ({"data.datasets.0.video": {"num_frames": 80}}, "data.datasets[0].video.num_frames", "4k+1"),
    ({"validation.num_video_frames": 50}, "validation.num_video_frames", "4k+1"),
    ({"data.datasets.0.video": {"num_frames": 81, "min_frames": 85}}, "data.datasets[0].video", "min_frames <= num_frames"),
    ({"data.datasets.0.video": {"num_frames": 81, "max_frames": 41}}, "data.datasets[0].video", "min_frames <= num_frames"),
    ({"validation.resolutions": ["830x480"]}, "validation.resolutions", "multiples of 32"),
    ({"validation.resolutions": ["848x480"]}, "validation.resolutions", "try 832x480"),
    ({"validation.resolutions": ["832by480"]}, "validation.resolutions", "WIDTHxHEIGHT"),
    ({"data.datasets.0.resolution_type": "pixel", "data.datasets.0.resolution": 470}, "data.datasets[0].resolution", "multiple of 16"),
    ({"train.ema": {"decay": 0.99}}, "train.ema", "use_ema"),
    ({"train.ema": {"validation": "ema_only"}}, "train.ema", "use_ema"),
    ({"train.max_train_steps": None}, "train.max_train_steps", "no length"),
    ({"model.base_model_precision": "int8"}, "model.base_model_precision", "lora"),
    ({"model.base_model_precision": "fp8"}, "model.base_model_precision", "train.mixed_precision: fp8"),
    ({"model.type": "lora", "model.base_model_precision": "int8", "train.mixed_precision": "fp8"}, "train.mixed_precision", "int8"),
    ({"model.type": "lora", "model.base_model_precision": "fp8", "train.mixed_precision": "fp8"}, "train.mixed_precision", "fp8"),
    ({"memory.group_offload": {"enabled": True}, "train.mixed_precision": "fp8"}, "memory.group_offload.enabled", "mixed_precision: fp8"),
    ({"model.lora": {"rank": 8}}, "model.lora", "model.type"),
    ({"validation.preview": {"enabled": True}}, "validation.preview.enabled", "webhook"),
    ({"validation.eval_loss": {"enabled": True}}, "validation.eval_loss.enabled", "holdout_fraction"),
    ({"train.masked_loss": True}, "train.masked_loss", "masks_dir"),
    ({"data.datasets.0.caption_strategy": "instance_prompt"}, "data.datasets[0].instance_prompt", "instance_prompt"),
    ({"data.datasets.0.caption_strategy": "captions_file"}, "data.datasets[0].captions_file", "captions_file"),
    ({"data.datasets.0.captions_file": "captions.txt"}, "data.datasets[0].captions_file", ".jsonl or .csv"),
    ({"data.datasets.0.maximum_image_size": 900}, "data.datasets[0].target_downsample_size", "maximum_image_size"),
    ({"data.datasets.0.video": {"frame_interval": 8}}, "data.datasets[0].video.frame_interval", "resolution_frames"),
    ({"data.datasets.0.source": "ftp://host/clips"}, "data.datasets[0].source", "unknown scheme"),
    ({"data.datasets.0.source": "s3://Bad_Bucket/x"}, "data.datasets[0].source", "not a valid s3"),
    ({"output.push_to": "/local/folder"}, "output.push_to", "not a remote store"),
    ({"storage.s3.endpoint_url": "127.0.0.1:9000"}, "storage.s3.endpoint_url", "https://host[:port]"),
    ({"storage.s3.endpoint_url": "http://minio:S3cretPass@127.0.0.1:9000"}, "storage.s3.endpoint_url", "must not contain credentials"),
    ({"output.push_to": "hf://datasets/me/repo"}, "output.push_to", "model repo"),
    ({"model.pretrained_model_name_or_path": "gs://bucket/model"}, "model.pretrained_model_name_or_path", "unknown scheme"),
    ({"data.datasets": [{"id": "a", "source": "x"}, {"id": "a", "source": "y"}]}, "data.datasets", "used twice"),
    ({"data.datasets": [{"id": "a", "source": "x", "cache_dir_vae": "c"}, {"id": "b", "source": "y", "cache_dir_vae": "c"}]},
     "data.datasets[1].cache_dir_vae", "also used"),
    ({"data.datasets.0.disabled": True}, "data.datasets", "disabled"),
    ({"data.datasets.0.id": "bad name/../x"}, "data.datasets[0].id", "does not match"),
    ({"validation.prompt_library": {"bad name": "a prompt"}}, "validation.prompt_library", "file names"),
    ({"validation.prompt_library": {"validation": "a prompt"}}, "validation.prompt_library", "reserved"),
    ({"speed.tune_reductions": "maybe"}, "speed.tune_reductions", "valid boolean"),
    ({"train.num_processes": 2, "memory.group_offload": {"enabled": True}}, "memory.group_offload.enabled", "single-process"),
    ({"train.crepa": {"enabled": True, "encoder_image_size": 224}}, "train.crepa.encoder_image_size", "518"),
    ({"webhooks": [{"url": "not-a-url"}]}, "webhooks[0].url", "http"),
    ({"webhooks": [{"url": "https://h/x", "events": ["nope"]}]}, "webhooks[0].events", "unknown events"),
    ({"train.optimizer": "sgd"}, "train.optimizer", "expected"),
    ({"train.learning_rate": -1}, "train.learning_rate", "greater than 0"),
    ({"train.train_batch_size": "two"}, "train.train_batch_size", "integer"),
    ({"data.datasets.0.resolution": "480p"}, "data.datasets[0].resolution", "write a whole number without units"),
    ({"train.learning_rate": "abc"}, "train.learning_rate", "e.g. 0.0001 or 1e-4"),
    ({"memory.gradient_checkpointing": "maybe"}, "memory.gradient_checkpointing", "write true or false"),
    ({"model.family": "flux"}, "model.family", "sanavideo"),
    ({"checkpoints.resume_from_checkpoint": "  "}, "checkpoints.resume_from_checkpoint", "latest"),
]


@pytest.mark.parametrize("changes,path,word", RULES, ids=[r[1] + ":" + r[2] for r in RULES])
def test_each_rule_names_the_field(changes, path, word):
    problems = problems_of(spec_with(**changes))
    matching = [p for p in problems if p.startswith(path + ":") or p.startswith(path + " ")]
    assert matching, f"no problem at {path}: {problems}"
    assert any(word in p for p in matching), matching


def test_an_unquoted_no_is_explained_as_yaml_reading_a_boolean(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_with()))
    text = spec.read_text().replace("train:\n", "train:\n  mixed_precision: no\n", 1)
    spec.write_text(text)
    with pytest.raises(SpecError) as raised:
        load_spec(spec, env={})
    message = str(raised.value)
    assert "train.mixed_precision" in message and "YAML reads an unquoted no as a boolean" in message, message
    assert 'quote it: "no"' in message, message


def test_a_token_under_an_unknown_key_points_at_the_environment_not_at_a_similar_key():
    problems = problems_of(spec_with(**{"output.hub_token": "hf_abcdefgh"}))
    assert any(p.startswith("output.hub_token") and "HF_TOKEN" in p and "hub_private" not in p for p in problems), problems
    assert not any("hf_abcdefgh" in p for p in problems), problems


def test_a_half_written_variable_reference_is_a_problem_not_literal_text():
    problems = problems_of(spec_with(**{"data.datasets.0.source": "${MY_DATA/clips"}))
    assert any(p.startswith("data.datasets[0].source") and "not a complete ${NAME}" in p for p in problems), problems
    escaped = validate_data(spec_with(**{"data.datasets.0.source": "clips$${x}"}), env={})  # $$ escapes a literal ${
    assert escaped.spec.data.datasets[0].source == "clips${x}"


def test_an_endpoint_with_credentials_is_refused_without_repeating_them():
    problems = problems_of(spec_with(**{"storage.s3.endpoint_url": "http://minio:S3cretPass@127.0.0.1:9000"}))
    assert problems and not any("S3cretPass" in p for p in problems), problems


@pytest.mark.parametrize("model_type", ["full", "lora"])
def test_fp8_products_with_a_bf16_base_are_valid(model_type):
    spec = validate_data(spec_with(**{"model.type": model_type, "train.mixed_precision": "fp8"}), env={}).spec
    assert spec.train.mixed_precision == "fp8" and spec.model.base_model_precision == "bf16"


def test_fp8_full_fine_tune_through_the_base_precision_points_at_mixed_precision():
    (problem,) = problems_of(spec_with(**{"model.base_model_precision": "fp8"}))
    assert problem.startswith("model.base_model_precision:") and "needs model.type: lora" in problem
    assert "train.mixed_precision: fp8" in problem.split("(fix:")[1]  # the fix names the setting to use instead


def test_five_mistakes_give_five_messages():
    data = spec_with(**{
        "train.optimizer": "sgd",
        "train.learning_rate": 0,
        "data.datasets.0.video": {"num_frames": 80},
        "validation.resolutions": ["100x100"],
        "modle": {},
    })
    problems = problems_of(data)
    assert len(problems) == 5, problems
    paths = sorted(p.split(":")[0] for p in problems)
    assert paths == sorted(["train.optimizer", "train.learning_rate", "data.datasets[0].video.num_frames", "validation.resolutions", "modle"])


def test_cross_field_mistakes_all_reported():
    problems = problems_of(spec_with(**{
        "memory.group_offload": {"enabled": True}, "memory.enable_model_cpu_offload": True,
        "validation.num_video_frames": 50, "model.base_model_precision": "int8",
    }))
    assert len(problems) == 3, problems


def test_unknown_key_suggests_the_right_one():
    problems = problems_of(spec_with(**{"train.learning_rat": 1e-4, "memory.gradient_checkpoint": True}))
    assert any("train.learning_rat: unknown key" in p and "did you mean 'learning_rate'" in p for p in problems)
    assert any("did you mean 'gradient_checkpointing'" in p for p in problems)
    nested = problems_of(spec_with(**{"data.datasets.0.video": {"num_frame": 81}}))
    assert any("data.datasets[0].video.num_frame" in p and "num_frames" in p for p in nested), nested


def test_warnings_for_ignored_shift_and_endless_warmup():
    loaded = validate_data(spec_with(**{"model.flow_schedule_shift": 5.0, "model.flow_schedule_auto_shift": True,
                                        "train.lr_warmup_steps": 10}), env={})
    paths = [w.path for w in loaded.warnings]
    assert "model.flow_schedule_shift" in paths and "model.flow_schedule_auto_shift" in paths
    assert "train.lr_warmup_steps" in paths
    assert all("ignored" in str(w) for w in loaded.warnings if w.path.startswith("model.flow"))


# --- environment expansion -------------------------------------------------

def test_env_expansion_with_defaults_and_types():
    data = spec_with(**{"workspace": "${WS}", "train.max_train_steps": "${STEPS}", "name": "${NAME:-fallback}",
                        "validation.prompt": "price $$5 for ${THING}"})
    spec = validate_data(data, env={"WS": "/tmp/ws", "STEPS": "25", "THING": "a cat"}).spec
    assert spec.workspace == "/tmp/ws"
    assert spec.train.max_train_steps == 25
    assert spec.name == "fallback"
    assert spec.validation.prompt == "price $5 for a cat"


def test_missing_env_var_is_a_problem_with_its_path():
    problems = problems_of(spec_with(**{"output.push_to": "s3://bucket/${RUN_PREFIX}"}))
    assert any(p.startswith("output.push_to:") and "RUN_PREFIX is not set" in p for p in problems), problems


# --- secrets -----------------------------------------------------------------

def test_resolved_spec_is_redacted():
    secret_url = "https://discord.com/api/webhooks/123/very-secret-token"
    token = "hf_abcdefghijklmnop"
    data = spec_with(**{"webhooks": [{"url": "${DISCORD_WEBHOOK}"}], "validation.prompt": "token ${HF_TOKEN} here"})
    loaded = validate_data(data, env={"DISCORD_WEBHOOK": secret_url, "HF_TOKEN": token})
    text = redacted_yaml(loaded.spec, loaded.secret_values)
    assert secret_url not in text and token not in text
    assert "***" in text
    assert yaml.safe_load(text)["webhooks"][0]["url"] == "***"
    # the values themselves are still usable by the job
    assert loaded.spec.webhooks[0].url.get_secret_value() == secret_url


def test_bad_webhook_url_message_does_not_echo_it():
    problems = problems_of(spec_with(**{"webhooks": [{"url": "discord-secret-abc"}]}))
    assert all("discord-secret-abc" not in p for p in problems), problems


# --- files -------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_tabs_are_reported_with_line(tmp_path):
    path = write(tmp_path, "train:\n\tmax_train_steps: 3\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, env={})
    assert "line 2" in str(info.value) and "tab" in str(info.value)


def test_duplicate_keys_are_errors(tmp_path):
    path = write(tmp_path, "train:\n  max_train_steps: 3\n  max_train_steps: 4\n")
    with pytest.raises(SpecError, match="duplicate key 'max_train_steps'"):
        load_spec(path, env={})


def test_broken_yaml_has_line_and_column(tmp_path):
    path = write(tmp_path, "train: [1, 2\nmodel: {}\n")
    with pytest.raises(SpecError, match=r"line \d+, column \d+"):
        load_spec(path, env={})


@pytest.mark.parametrize("text,word", [("", "empty"), ("- a\n- b\n", "mapping")])
def test_empty_or_non_mapping(tmp_path, text, word):
    with pytest.raises(SpecError, match=word):
        load_spec(write(tmp_path, text), env={})


# --- schema and docs ---------------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_json_schema_validates_shipped_specs(path):
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    data = yaml.safe_load(path.read_text())
    # The schema describes the spec after ${VAR} expansion.
    from job.spec.loader import expand_env

    expanded = expand_env(data, {})
    jsonschema.validate(expanded, schema)


def test_json_schema_rejects_unknown_keys():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(spec_with(**{"train.learning_rat": 1}), json_schema())


def test_docs_spec_reference_is_in_sync():
    committed = (ROOT / "docs" / "SPEC.md").read_text(encoding="utf-8")
    assert committed == markdown_reference(), "docs/SPEC.md is stale: run `trainer schema --markdown -o docs/SPEC.md`"


def test_reference_groups_a_list_of_choices_apart_from_the_other_choices():
    """tracking.report_to is a list of trackers or one value: the list's choices are bracketed."""
    row = next(line for line in markdown_reference().splitlines() if line.startswith("| `report_to` |"))
    assert "list of (`wandb` \\| `tensorboard`) \\| `none`" in row, row


def test_every_field_is_described():
    from pydantic import BaseModel

    from job.spec.root import JobSpec

    missing = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            if not info.description:
                missing.append(prefix + name)
            for sub in _models_in(info.annotation):
                walk(sub, f"{prefix}{name}.")

    walk(JobSpec, "")
    assert not missing, missing


def _models_in(annotation):
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out.extend(_models_in(arg))
    return out


def test_schema_json_is_serialisable():
    json.dumps(json_schema())
