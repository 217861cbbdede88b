"""A checkpoint whose files changed after it was written is never resumed from: `latest` falls back
to the previous intact one, an explicit path is refused with a clear message. (The whole job under
this fault: tests/e2e/test_faults.py.)"""

from __future__ import annotations

import json
import logging

import pytest

from job.errors import InputError
from job.train.checkpoints import COMPLETE, CheckpointStore, damage


def write_checkpoint(store: CheckpointStore, step: int) -> None:
    tmp = store.begin(step)
    (tmp / "transformer").mkdir()
    (tmp / "transformer" / "weights.safetensors").write_bytes(bytes(range(256)) * 8)
    (tmp / "optimizer.pt").write_bytes(b"optimizer state %d" % step)
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    store.commit(tmp, step)


@pytest.mark.parametrize("how", ["flipped", "truncated", "missing"])
def test_latest_skips_a_damaged_checkpoint_and_explicit_resume_refuses_it(tmp_path, caplog, how):
    store = CheckpointStore(tmp_path / "checkpoints")
    for step in (3, 6):
        write_checkpoint(store, step)
    newest = tmp_path / "checkpoints" / "step_000006"
    assert store.latest_intact() == newest and damage(newest) is None
    weights = newest / "transformer" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "flipped":
        data[100] ^= 0x01  # one bit, same size
        weights.write_bytes(bytes(data))
    elif how == "truncated":
        weights.write_bytes(bytes(data[:-1]))
    else:
        weights.unlink()

    assert "transformer/weights.safetensors" in damage(newest)
    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        assert store.resolve("latest", lambda v: tmp_path / v) == tmp_path / "checkpoints" / "step_000003"
    assert "step_000006 is damaged" in caplog.text
    assert store.latest() == newest  # the marker is still there: rotation and the next save treat it as before
    with pytest.raises(InputError, match="is damaged") as info:
        store.resolve(str(newest), lambda v: tmp_path / v)
    assert info.value.exit_code == 2


def test_every_checkpoint_damaged_means_a_fresh_start(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    write_checkpoint(store, 3)
    (tmp_path / "checkpoints" / "step_000003" / "optimizer.pt").write_bytes(b"garbage!" * 3)
    assert store.resolve("latest", lambda v: tmp_path / v) is None


def test_markers_without_a_file_list_are_trusted(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    write_checkpoint(store, 3)
    folder = tmp_path / "checkpoints" / "step_000003"
    (folder / COMPLETE).write_text(json.dumps({"step": 3, "time": 0}))  # written by an older trainer
    assert damage(folder) is None and store.latest_intact() == folder
