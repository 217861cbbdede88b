"""masks_dir in the data plan: a masks folder that is not there is an error (not training without masks),
and masked_loss with clips that found no mask is reported."""

from __future__ import annotations

import logging

import pytest

from data_helpers import make_spec, put, workspace_for
from job.data import plan_dataset
from job.errors import EXIT_BAD_INPUT, InputError


def _dataset(tmp_path, corpus, masks: list[str] | None):
    root = tmp_path / "ds"
    for i in range(2):
        put(corpus["c24"], root / f"clip{i}.mp4", caption=f"clip {i}")
    if masks is not None:
        (root / "masks").mkdir()
        for name in masks:
            (root / "masks" / name).write_bytes(b"png")  # planning only indexes the names
    return root


def _plan(tmp_path, root, masks_dir="masks", masked_loss=True):
    spec = make_spec(tmp_path / "ws", [{"id": "other", "source": str(root)},
                                       {"id": "shots", "source": str(root), "masks_dir": masks_dir}],
                     {"masked_loss": masked_loss})
    return plan_dataset(spec, workspace_for(spec), probe_workers=1, show=False)


@pytest.mark.parametrize("masked_loss", [True, False])
def test_a_masks_dir_that_does_not_exist_is_an_input_error(tmp_path, corpus, masked_loss):
    root = _dataset(tmp_path, corpus, masks=None)
    with pytest.raises(InputError) as info:
        _plan(tmp_path, root, masks_dir="maks", masked_loss=masked_loss)
    message = info.value.message
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert "'shots'" in message and "data.datasets[1].masks_dir" in message and str(root / "maks") in message
    assert "does not exist" in message
    assert "check the path" in info.value.fix and "remove data.datasets[1].masks_dir" in info.value.fix


def test_a_masks_dir_that_is_a_file_is_an_input_error(tmp_path, corpus):
    root = _dataset(tmp_path, corpus, masks=None)
    (root / "masks").write_text("not a folder")
    with pytest.raises(InputError, match="is not a folder"):
        _plan(tmp_path, root)


def test_masked_loss_with_no_mask_found_warns_and_notes_it(tmp_path, corpus, caplog):
    root = _dataset(tmp_path, corpus, masks=["other_name.png"])
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        plan = _plan(tmp_path, root)
    assert not any(s.mask_path for s in plan.for_dataset("shots"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("none of the 2 clip(s) of dataset 'shots' has a mask" in w and "clip0.png" in w for w in warnings), warnings
    notes = [n for n in plan.report.notes if n.dataset == "shots"]
    assert len(notes) == 1 and "train on the whole frame" in notes[0].message
    assert not [n for n in plan.report.notes if n.dataset == "other"]  # no masks_dir: nothing to say


def test_masked_loss_with_some_masks_notes_the_clips_without(tmp_path, corpus, caplog):
    root = _dataset(tmp_path, corpus, masks=["clip0.png"])
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        plan = _plan(tmp_path, root)
    assert {s.relpath: bool(s.mask_path) for s in plan.for_dataset("shots")} == {"clip0.mp4": True, "clip1.mp4": False}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "mask" in r.getMessage()]
    notes = [n.message for n in plan.report.notes if n.dataset == "shots"]
    assert len(notes) == 1 and "1 of 2 clip(s)" in notes[0] and "clip1.mp4" in notes[0]


def test_every_clip_with_a_mask_says_nothing(tmp_path, corpus, caplog):
    root = _dataset(tmp_path, corpus, masks=["clip0.png", "clip1.png"])
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        plan = _plan(tmp_path, root)
    assert all(s.mask_path for s in plan.for_dataset("shots"))
    assert not plan.report.notes and not [r for r in caplog.records if "mask" in r.getMessage()]
