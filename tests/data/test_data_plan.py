"""The data plan end to end: buckets, frame windows, the too-small rule, broken clips, holdout, loading."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from data_helpers import BLUE, GREEN, RED, WHITE, frame_index, make_spec, put, workspace_for
from job.data import (BucketBatchSampler, DecodeError, SampleDataset, collate_samples, load_frames, load_i2v_sample,
                      load_sample, plan_dataset, record_decode_failure, report_path)
from job.data.plan import holdout_score
from job.errors import InputError


def plan_of(tmp_path, datasets, train=None, **data):
    spec = make_spec(tmp_path / "ws", datasets, train, **data)
    ws = workspace_for(spec)
    return spec, ws, plan_dataset(spec, ws, probe_workers=1, show=False)


def test_buckets_for_landscape_portrait_and_square(tmp_path, corpus):
    root = tmp_path / "ds"
    for name in ("quad", "portrait", "square", "rotated"):
        put(corpus[name], root / f"{name}.mp4", caption=name)
    _, _, plan = plan_of(tmp_path, [{"id": "shapes", "source": str(root), "video": {"num_frames": 9}}], framerate=None)
    got = {s.relpath: (s.bucket, s.crop_box, s.num_frames) for s in plan.samples}
    # resolution 64: native area 64 x 112 = 7168 px; 160x96 -> aspect 1.67 -> 112x64
    assert got == {"quad.mp4": ("112x64@9", (0, 0, 160, 96), 9),
                   "portrait.mp4": ("64x112@9", (0, 0, 96, 160), 9),
                   "square.mp4": ("80x80@9", (0, 0, 96, 96), 9),
                   "rotated.mp4": ("64x112@9", (0, 0, 96, 160), 9)}  # stored 160x96, shown rotated
    assert plan.counts["shapes"]["buckets"] == {"112x64@9": 1, "64x112@9": 2, "80x80@9": 1}
    rotated = next(s for s in plan.samples if s.relpath == "rotated.mp4")
    assert load_sample(rotated).shape == (3, 9, 112, 64)


def test_resolution_frames_buckets_by_length(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c30"], root / "long.mp4", caption="x")   # 2 s -> 32 frames at 16 fps
    put(corpus["c12"], root / "mid.mp4", caption="x")    # 2 s -> 32 frames
    put(corpus["mkv"], root / "short.mkv", caption="x")  # 1.33 s -> 22 frames -> 16 -> 13
    video = {"num_frames": 25, "min_frames": 9, "bucket_strategy": "resolution_frames", "frame_interval": 8}
    _, _, plan = plan_of(tmp_path, [{"id": "rf", "source": str(root), "video": video}])
    assert {s.relpath: s.bucket for s in plan.samples} == {"long.mp4": "96x80@25", "mid.mp4": "96x80@25", "short.mkv": "96x80@13"}


def test_frame_windows_min_frames_and_resampling(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c30"], root / "two_seconds.mp4", caption="x")
    put(corpus["one_frame"], root / "one.mp4", caption="x")
    put(corpus["mkv"], root / "short.mkv", caption="x")
    ds = {"id": "w", "source": str(root), "video": {"num_frames": 9, "windows": "all", "min_frames": 13}}
    spec, _, plan = plan_of(tmp_path, [ds], framerate=16)
    starts = [(s.relpath, s.start_frame, s.start_time, s.num_frames) for s in plan.samples]
    # 2 s at 16 fps = 32 frames -> windows at 0, 9, 18; 1.33 s -> 22 frames -> 0, 9
    assert starts == [("short.mkv", 0, 0.0, 9), ("short.mkv", 9, 9 / 16, 9),
                      ("two_seconds.mp4", 0, 0.0, 9), ("two_seconds.mp4", 9, 9 / 16, 9), ("two_seconds.mp4", 18, 18 / 16, 9)]
    assert [(s.relpath, s.why) for s in plan.report.skipped] == [("one.mp4", "too_short")]
    assert plan.counts["w"]["too_short"] == 1
    # the third window decodes the right frames: 16 fps from 30 fps, from 1.125 s
    sample = plan.samples[-1]
    frames = load_frames(sample)
    assert frames.shape == (9, 80, 96, 3)
    assert [frame_index(f) for f in frames] == [34, 36, 37, 39, 41, 43, 45, 47, 49]  # nearest frame, ties to the earlier


def test_one_frame_clip_is_usable_as_a_one_frame_sample(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["one_frame"], root / "one.mp4", caption="x")
    _, _, plan = plan_of(tmp_path, [{"id": "img", "source": str(root), "video": {"num_frames": 1}}])
    assert [s.bucket for s in plan.samples] == ["96x80@1"]
    assert load_sample(plan.samples[0]).shape == (3, 1, 80, 96)


def test_minimum_image_size_skips_small_clips(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c24"], root / "small.mp4", caption="x")   # 64x48
    put(corpus["quad"], root / "big.mp4", caption="x")    # 160x96
    _, _, plan = plan_of(tmp_path, [{"id": "m", "source": str(root), "minimum_image_size": 64}])
    assert [s.relpath for s in plan.samples] == ["big.mp4"]
    assert [(s.relpath, s.why) for s in plan.report.skipped] == [("small.mp4", "too_small")]


def test_load_sample_crop_and_range(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["quad"], root / "q.mp4", caption="x")
    ds = {"id": "c", "source": str(root), "resolution": 64, "resolution_type": "pixel", "crop": True,
          "video": {"num_frames": 5}}
    _, _, plan = plan_of(tmp_path, [ds], framerate=None)
    (sample,) = plan.samples
    # 160x96 -> shorter side 64, longer round16(106.7) = 112; 1.75 is wider than 1.67: cut top and bottom
    assert (sample.width, sample.height) == (112, 64)
    assert sample.crop_box == (0, 2, 160, 91)
    video = load_sample(sample)
    assert video.shape == (3, 5, 64, 112) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    rgb = ((video[:, 0].permute(1, 2, 0) + 1) * 127.5).round().int().numpy()
    for (y, x), colour in {(8, 8): RED, (8, 100): GREEN, (56, 8): BLUE, (56, 100): WHITE}.items():
        assert np.abs(rgb[y, x] - colour).max() < 24
    # the yellow column (x 40..43 of 160) at 0.7 scale: centre 42 * 0.7 - 0.5 = 28.9
    yellow = np.where((rgb[20, :, 0] > 200) & (rgb[20, :, 1] > 200) & (rgb[20, :, 2] < 120))[0]
    assert yellow.size and abs(yellow.mean() - 28.9) < 1.0


def test_i2v_first_frame(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c30"], root / "a.mp4", caption="x")
    _, _, plan = plan_of(tmp_path, [{"id": "i2v", "source": str(root), "video": {"num_frames": 9, "is_i2v": True}}])
    (sample,) = plan.samples
    assert sample.is_i2v
    video, first = load_i2v_sample(sample)
    assert first.shape == (3, 1, 80, 96) and torch.equal(first, video[:, :1])
    item = SampleDataset(plan.samples)[0]
    assert torch.equal(item["first_frame"], first)


def test_too_small_dataset_says_no_samples_detected_and_which_repeats_fixes_it(tmp_path, corpus):
    root = tmp_path / "tiny"
    put(corpus["c24"], root / "a.mp4", caption="x")
    put(corpus["c24"], root / "b.mp4", caption="x")
    put(corpus["portrait"], root / "p.mp4", caption="x")
    ds = {"id": "tiny-set", "source": str(root), "video": {"num_frames": 9}}
    train = {"train_batch_size": 2, "gradient_accumulation_steps": 3}
    with pytest.raises(InputError) as info:
        plan_of(tmp_path, [ds], train)
    text = str(info.value)
    assert "no samples detected" in text and "'tiny-set'" in text
    assert "96x80@9: 2" in text and "64x112@9: 1" in text   # samples per bucket
    # 2 + 1 clips, batches of 2, need 6: repeats 1 -> 4 + 2 (2 whole batches of the first bucket + 1 of the second)
    assert "repeats: 1" in text
    assert info.value.exit_code == 2
    assert report_path(workspace_for(make_spec(tmp_path / "ws", [dict(ds)]))).exists()  # the report is written first
    ds["repeats"] = 1
    _, _, plan = plan_of(tmp_path, [ds], train)
    assert len(plan.epoch_samples()) == 6


def test_vae_batch_size_counts_too(tmp_path, corpus):
    root = tmp_path / "tiny"
    put(corpus["c24"], root / "a.mp4", caption="x")
    with pytest.raises(InputError, match="vae_batch_size 4") as info:
        plan_of(tmp_path, [{"id": "v", "source": str(root)}], vae_batch_size=4)
    assert "repeats: 3" in str(info.value)


def test_dataset_without_usable_clips_explains_why(tmp_path, corpus):
    root = tmp_path / "bad"
    put(corpus["zero"], root / "a.mp4", caption="x")
    put(corpus["c24"], root / "b.mp4")  # no caption
    with pytest.raises(InputError) as info:
        plan_of(tmp_path, [{"id": "bad", "source": str(root)}])
    text = str(info.value)
    assert "no samples detected" in text and "no usable clip" in text and "broken 1" in text and "no caption 1" in text


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(InputError, match="no folder"):
        plan_of(tmp_path, [{"id": "x", "source": str(tmp_path / "nope")}])


def broken_dataset(root, corpus):
    put(corpus["c24"], root / "good.mp4", caption="good")
    put(corpus["c24"], root / "good2.mp4", caption="good")
    for name in ("zero", "truncated", "truncated_fs", "random", "audio"):
        put(corpus[name], root / "bad" / f"{name}{corpus[name].suffix}", caption=name)


@pytest.mark.parametrize("move", [False, True])
def test_problem_report_and_quarantine(tmp_path, corpus, move):
    root = tmp_path / "ds"
    broken_dataset(root, corpus)
    spec, ws, plan = plan_of(tmp_path, [{"id": "b", "source": str(root)}], delete_problematic_videos=move)
    assert sorted(s.relpath for s in plan.samples) == ["good.mp4", "good2.mp4"]
    reasons = {p.relpath: p.reason for p in plan.report.problems}
    assert reasons == {"bad/zero.mp4": "zero bytes", "bad/truncated.mp4": "not a readable video",
                       "bad/truncated_fs.mp4": "truncated", "bad/random.mkv": "not a readable video",
                       "bad/audio.mp4": "no video stream"}
    saved = json.loads(report_path(ws).read_text())
    assert {p["relpath"] for p in saved["problems"]} == set(reasons)
    assert saved["counts"]["b"]["problems"] == 5
    for rel in reasons:
        moved = root / ".quarantine" / rel
        assert moved.exists() == move and (root / rel).exists() == (not move)
    if move:
        assert (root / ".quarantine" / "bad" / "zero.txt").exists()  # its caption went along
        log = [json.loads(line) for line in (root / ".quarantine" / "quarantine.jsonl").read_text().splitlines()]
        assert {entry["from"] for entry in log} == set(reasons)
        assert all(p.quarantined_to for p in plan.report.problems)
        # a rerun no longer sees them, and the good clips are unaffected
        _, _, again = plan_of(tmp_path, [{"id": "b", "source": str(root)}], delete_problematic_videos=move)
        assert again.report.problems == [] and len(again.samples) == 2
    else:
        assert not (root / ".quarantine").exists()


def test_report_summary_prints(tmp_path, corpus):
    from io import StringIO

    from rich.console import Console

    root = tmp_path / "ds"
    broken_dataset(root, corpus)
    _, _, plan = plan_of(tmp_path, [{"id": "b", "source": str(root)}])
    out = StringIO()
    plan.report.print_summary(Console(file=out, width=200))
    text = out.getvalue()
    assert "bad/zero.mp4" in text and "zero bytes" in text and "96x80@9: 2" in text


def test_report_summary_prints_the_notes_too():
    """A caption-file line that was ignored is on screen, not only in state/data_report.json."""
    from io import StringIO

    from rich.console import Console

    from job.data.report import DataReport, Note

    report = DataReport(notes=[Note("b", "caps.jsonl:3", 'not a JSON object with "path" and "caption": line ignored')])
    out = StringIO()
    report.print_summary(Console(file=out, width=200))
    assert "notes (1)" in out.getvalue() and "caps.jsonl:3" in out.getvalue() and "line ignored" in out.getvalue()


def test_clip_broken_after_planning_is_reported_and_skipped(tmp_path, corpus):
    root = tmp_path / "ds"
    for i in range(3):
        put(corpus["c30"], root / f"c{i}.mp4", caption="x")
    spec, ws, plan = plan_of(tmp_path, [{"id": "late", "source": str(root)}], delete_problematic_videos=True)
    victim = root / "c1.mp4"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 3:] = bytes(len(data) - len(data) // 3)  # zero the tail, same size
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))    # same fingerprint: only decoding can tell
    sample = next(s for s in plan.samples if s.relpath == "c1.mp4")
    with pytest.raises(DecodeError) as info:
        load_sample(sample)
    # the cache phase's loop: a DataLoader with workers, errors come back as items
    loader = torch.utils.data.DataLoader(SampleDataset(plan.samples), batch_size=3, num_workers=2, collate_fn=collate_samples)
    (batch,) = list(loader)
    assert batch["video"].shape == (2, 3, 9, 80, 96)
    assert [plan.samples[i].relpath for i, _ in batch["errors"]] == ["c1.mp4"]
    problem = record_decode_failure(spec, ws, sample, info.value)
    assert problem.stage == "decode" and problem.quarantined_to
    assert (root / ".quarantine" / "c1.mp4").exists() and not victim.exists()
    saved = json.loads(report_path(ws).read_text())
    assert [p["relpath"] for p in saved["problems"]] == ["c1.mp4"]
    _, _, again = plan_of(tmp_path, [{"id": "late", "source": str(root)}])
    assert sorted(s.relpath for s in again.samples) == ["c0.mp4", "c2.mp4"]


def test_changed_file_is_refused_not_quarantined(tmp_path, corpus, mtime_safe):
    root = tmp_path / "ds"
    put(corpus["c30"], root / "a.mp4", caption="x")
    spec, ws, plan = plan_of(tmp_path, [{"id": "ch", "source": str(root)}], delete_problematic_videos=True)
    mtime_safe(root / "a.mp4")
    with pytest.raises(DecodeError) as info:
        load_sample(plan.samples[0])
    assert info.value.reason == "changed"
    record_decode_failure(spec, ws, plan.samples[0], info.value)
    assert (root / "a.mp4").exists()


def test_holdout_is_deterministic_by_relative_path(tmp_path, corpus):
    root = tmp_path / "ds"
    for i in range(20):
        put(corpus["c24"], root / f"clip{i:02d}.mp4", caption="x")
    ds = {"id": "h", "source": str(root)}
    _, _, first = plan_of(tmp_path, [ds], holdout_fraction=0.3)
    _, _, second = plan_of(tmp_path, [ds], holdout_fraction=0.3)
    held = sorted(s.relpath for s in first.holdout_samples)
    assert held == sorted(s.relpath for s in second.holdout_samples)
    assert held == sorted(f"clip{i:02d}.mp4" for i in range(20) if holdout_score(f"clip{i:02d}.mp4") < 0.3)
    assert 0 < len(held) < 20
    assert first.counts["h"]["holdout_samples"] == len(held)
    assert all(not s.is_holdout for s in first.epoch_samples())
    # a tiny fraction still holds one clip out when there are at least two
    _, _, tiny = plan_of(tmp_path, [ds], holdout_fraction=0.001)
    assert len(tiny.holdout_samples) == 1


def test_samples_are_picklable_and_keys_unique(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c30"], root / "a.mp4", caption="x")
    _, _, plan = plan_of(tmp_path, [{"id": "p", "source": str(root), "video": {"num_frames": 9, "windows": "all"}}])
    assert pickle.loads(pickle.dumps(plan.samples)) == plan.samples
    assert len({s.key for s in plan.samples}) == len(plan.samples) == 3


def test_repeats_and_sampler_on_a_plan(tmp_path, corpus):
    root = tmp_path / "ds"
    for i in range(3):
        put(corpus["c24"], root / f"l{i}.mp4", caption="x")
        put(corpus["portrait"], root / f"p{i}.mp4", caption="x")
    _, _, plan = plan_of(tmp_path, [{"id": "r", "source": str(root), "repeats": 1}], train={"train_batch_size": 2})
    epoch = plan.epoch_samples()
    assert len(epoch) == 12
    sampler = BucketBatchSampler(epoch, batch_size=2, seed=1)
    for batch in sampler:
        assert len({epoch[i].bucket for i in batch}) == 1
