"""Resuming a LoRA checkpoint with other adapter settings is a clear error, not an optimizer traceback."""

from __future__ import annotations

import os
import signal

import pytest

from job.errors import InputError
from job.train import TrainHooks, run_train
from train_helpers import make_spec, spec_dict, write_caches


@pytest.mark.parametrize("change, word", [({"target_modules": ["to_q", "to_k", "to_v"]}, "no weights for adapters"),
                                          ({"target_modules": ["to_q"]}, "adapters this spec does not add"),
                                          ({"rank": 8}, "rank changed")])
def test_a_lora_checkpoint_from_other_adapter_settings_is_refused_naming_the_setting(tmp_path, tiny_model, change, word):
    data = spec_dict(tmp_path / "ws", tiny_model,
                     model={"pretrained_model_name_or_path": str(tiny_model), "type": "lora", "prompt": {"max_sequence_length": 8},
                            "lora": {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k"]}},
                     train={"max_train_steps": 4}, checkpoints={"step_interval": 2})
    ws = write_caches(make_spec(data), n_samples=2)
    stop_at_2 = TrainHooks(on_step_end=[lambda info: os.kill(os.getpid(), signal.SIGTERM) if info.step == 2 else None])
    assert run_train(make_spec(data), ws, stop_at_2).status == "stopped_early"
    data["model"]["lora"].update(change)
    with pytest.raises(InputError) as raised:
        run_train(make_spec(data), ws)
    assert word in raised.value.message and "step_000002" in raised.value.message, raised.value.message
    assert "model.lora" in raised.value.message + raised.value.fix
