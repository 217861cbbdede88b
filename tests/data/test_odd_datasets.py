"""Odd datasets through the real data planning and the cache phase, each handled as docs/GUIDE.md
("Your clips") says: what is used, what is skipped and reported, what stops the job (exit 2) and how.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import make_spec, put, workspace_for
from job.data import plan_dataset, report_path
from job.errors import InputError
from job.spec import JobSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from job.models.sanavideo.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "tiny-sanavideo"
    build_tiny_model(folder)
    return folder


def plan_of(tmp_path, datasets, **data):
    spec = make_spec(tmp_path / "ws", datasets, **data)
    ws = workspace_for(spec)
    return spec, ws, plan_dataset(spec, ws, probe_workers=1, show=False)


def odd_folder(root: Path, corpus: dict[str, Path], outside: Path) -> Path:
    put(corpus["c24"], root / "my clip (1).mp4", caption="spaces and brackets in the name")
    put(corpus["c24"], root / "über café 视频.mp4", caption="unicode in the name")
    put(corpus["c12"], root / "latin1.mp4", caption="caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8
    put(corpus["c24"], root / "sub folder" / "nested.mp4", caption="in a subfolder")
    put(corpus["portrait"], root / "portrait.mp4", caption="a portrait clip")
    put(corpus["square"], root / "square.mp4", caption="a square clip")
    put(corpus["c24"], root / "no caption.mp4")  # no .txt
    put(corpus["one_frame"], root / "one frame.mp4", caption="a single frame")
    put(corpus["truncated"], root / "broken.mp4", caption="cut in half")
    target = put(corpus["c30"], outside / "elsewhere.mp4")
    (root / "linked.mp4").symlink_to(target)
    (root / "linked.txt").write_text("a clip reached through a symbolic link", encoding="utf-8")
    (root / "dangling.mp4").symlink_to(outside / "gone.mp4")
    put(corpus["c24"], outside / "shared" / "shared clip.mp4", caption="in a linked folder")
    (root / "linked folder").symlink_to(outside / "shared", target_is_directory=True)
    (outside / "shared" / "loop").symlink_to(outside / "shared", target_is_directory=True)  # entered once
    (root / ".hidden.mp4").write_bytes(b"not a clip")  # names starting with '.' are not clips
    return root


def test_an_odd_but_usable_folder_is_planned_reported_and_cached(tmp_path, corpus, tiny_model):
    root = odd_folder(tmp_path / "odd", corpus, tmp_path / "outside")
    spec = JobSpec.model_validate({
        "workspace": str(tmp_path / "ws"),
        "model": {"pretrained_model_name_or_path": str(tiny_model), "base_model_precision": "fp32"},
        "data": {"datasets": [{"id": "odd", "source": str(root), "resolution": 64, "video": {"num_frames": 9}}],
                 "cache_dtype": "fp32", "vae_batch_size": 1},
        "train": {"max_train_steps": 1, "train_batch_size": 1},
    })
    ws = workspace_for(spec)
    plan = plan_dataset(spec, ws, probe_workers=1, show=False)

    used = {s.relpath: s for s in plan.samples}
    assert set(used) == {"my clip (1).mp4", "über café 视频.mp4", "latin1.mp4", "sub folder/nested.mp4", "portrait.mp4",
                         "square.mp4", "linked.mp4", "linked folder/shared clip.mp4"}
    # not UTF-8: decoded with replacement characters, used, and noted in the report
    assert "\ufffd" in used["latin1.mp4"].caption and used["latin1.mp4"].caption.startswith("caf")
    # a portrait and a square clip each get a bucket of their own shape
    assert len({used["portrait.mp4"].bucket, used["square.mp4"].bucket, used["my clip (1).mp4"].bucket}) == 3

    report = json.loads(report_path(ws).read_text(encoding="utf-8"))
    problems = {p["relpath"]: p["reason"] for p in report["problems"]}
    assert set(problems) == {"broken.mp4", "dangling.mp4"} and problems["dangling.mp4"] == "broken link", problems
    skipped = {s["relpath"]: s["why"] for s in report["skipped"]}
    assert skipped == {"no caption.mp4": "no_caption", "one frame.mp4": "too_short"}, skipped
    assert any("latin1" in n["path"] for n in report["notes"]), report["notes"]
    assert (root / "broken.mp4").exists()  # reported, never moved unless delete_problematic_videos is on

    from job.cache.phase import run_cache
    from job.cache.reader import CachedDataset

    result = run_cache(spec, ws, device="cpu", num_workers=0, show=False, plan=plan)
    assert (result.latents.cached, result.latents.failed) == (8, 0)
    dataset = CachedDataset(ws, spec)
    assert len(dataset) == 8 and {dataset[i]["latents"].shape[0] for i in range(8)} == {4}
    names = [p.name for p in ws.latent_cache_dir(spec.data.datasets[0]).glob("*.safetensors")]
    assert len(names) == 8 and all(n.isascii() and " " not in n for n in names), names  # safe on any filesystem
    assert run_cache(spec, ws, device="cpu", num_workers=0, show=False).nothing_to_do


def test_missing_captions_can_fall_back_to_the_instance_prompt(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c24"], root / "a.mp4")
    put(corpus["c24"], root / "b.mp4", caption="   \n")  # empty counts as missing
    _, _, plan = plan_of(tmp_path, [{"id": "x", "source": str(root), "missing_captions": "instance_prompt",
                                     "instance_prompt": "a photo of sks"}])
    assert {s.relpath: s.caption for s in plan.samples} == {"a.mp4": "a photo of sks", "b.mp4": "a photo of sks"}


@pytest.mark.parametrize("case", ["empty", "only broken", "no captions", "only hidden"])
def test_datasets_with_nothing_usable_stop_with_exit_2_and_say_why(tmp_path, corpus, case):
    root = tmp_path / "ds"
    root.mkdir()
    if case == "only broken":
        for name in ("zero", "truncated", "random", "audio"):
            put(corpus[name], root / f"{name}{corpus[name].suffix}", caption="x")
    elif case == "no captions":
        put(corpus["c24"], root / "a.mp4")
        put(corpus["c12"], root / "b.mp4")
    elif case == "only hidden":
        put(corpus["c24"], root / ".a.mp4", caption="x")
    with pytest.raises(InputError) as info:
        plan_of(tmp_path, [{"id": "odd", "source": str(root)}])
    text = str(info.value)
    assert info.value.exit_code == 2 and "no samples detected in dataset 'odd'" in text
    if case in ("empty", "only hidden"):
        assert "holds no video file" in text and "data.datasets[0].source" in text
    elif case == "only broken":
        assert "broken 4" in text and "data report" in text
    else:
        assert "no caption 2" in text and "missing_captions" in text


def test_trainer_cache_on_an_empty_folder_exits_2_without_a_traceback(tmp_path, tiny_model):
    (tmp_path / "ws" / "datasets" / "synthetic").mkdir(parents=True)
    (tmp_path / "ws" / "models").mkdir()
    (tmp_path / "ws" / "models" / "tiny-sanavideo").symlink_to(tiny_model)
    result = subprocess.run([sys.executable, "-m", "job.cli", "cache", str(ROOT / "specs" / "smoke-cpu.yaml")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "TRAINER_WORKSPACE": str(tmp_path / "ws"), "COLUMNS": "200"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "holds no video file" in result.stderr and "Traceback" not in result.stderr + result.stdout
