"""Generated odd specs: each one validates or ends in a SpecError naming fields, never another exception."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job.errors import SpecError
from job.spec import validate_data

BASE = {"data": {"datasets": [{"id": "clips", "source": "clips"}]}, "train": {"max_train_steps": 10}}
PLACES = [("train",), ("memory",), ("validation",), ("model",), ("data",), ("checkpoints",), ("output",),
          ("data", "datasets", 0), ("data", "datasets", 0, "video"), ("memory", "group_offload"), ()]
KEYS = ["optimizer", "learning_rate", "num_frames", "resolutions", "enabled", "type", "push_to", "source", "id",
        "gradient_checkpointing", "max_train_steps", "seed", "prompt", "unknown_key", "ünïcödé", "step_interval",
        "resume_from_checkpoint", "min_frames", "max_frames", "repeats", "webhooks", "lora", "rank"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
                   st.floats(allow_nan=True), st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3),
                   st.dictionaries(st.text(max_size=8), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PLACES), st.sampled_from(KEYS), VALUES), min_size=1, max_size=5))
def test_odd_specs_fail_cleanly(edits):
    data = copy.deepcopy(BASE)
    for place, key, value in edits:
        node = data
        for part in place:
            node = node[part] if isinstance(node, (dict, list)) and (part in node if isinstance(node, dict) else part < len(node)) else None
            if node is None:
                break
        if isinstance(node, dict):
            node[key] = value
    try:
        validate_data(data, env={})
    except SpecError as exc:
        assert exc.problems, "a SpecError always names at least one problem"
        for problem in exc.problems:
            assert problem.path and problem.message
