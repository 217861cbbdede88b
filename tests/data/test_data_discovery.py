"""Finding clips, probing them once, and the metadata cache."""

from __future__ import annotations

import json
import os

import pytest

import job.data.probe as probe_mod
from data_helpers import make_spec, put, workspace_for
from job.data import plan_dataset
from job.data.discovery import discover_videos
from job.data.probe import MetadataCache, probe_many, probe_video


def test_discovery_extensions_recursion_hidden_and_odd_names(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c24"], root / "a.mp4")
    put(corpus["c24"], root / "B.MOV")
    put(corpus["c24"], root / "sub" / "deeper" / "c.WebM")
    put(corpus["c24"], root / "sub" / "d.mkv")
    put(corpus["c24"], root / "sub" / "e.AVI")
    put(corpus["c24"], root / "naïve clip ✓ 01.mp4")
    put(corpus["c24"], root / ".quarantine" / "old.mp4")
    put(corpus["c24"], root / ".cache" / "x.mp4")
    put(corpus["c24"], root / "._a.mp4")  # macOS resource fork
    (root / "notes.txt").write_text("x")
    (root / "clip.gif").write_bytes(b"GIF89a")
    found = discover_videos(root)
    assert [f.relpath for f in found.files] == sorted(
        ["a.mp4", "B.MOV", "sub/deeper/c.WebM", "sub/d.mkv", "sub/e.AVI", "naïve clip ✓ 01.mp4"])
    assert all(f.size > 0 and f.mtime_ns > 0 and f.path.is_absolute() for f in found.files)


def test_discovery_follows_links_without_looping(tmp_path, corpus):
    outside = tmp_path / "outside"
    put(corpus["c24"], outside / "linked.mp4")
    root = tmp_path / "ds"
    put(corpus["c24"], root / "a.mp4")
    os.symlink(outside, root / "more")                 # a linked folder
    os.symlink(root, root / "loop")                    # a link back to the root
    os.symlink(root / "a.mp4", root / "alias.mp4")     # a linked file
    os.symlink(tmp_path / "nowhere.mp4", root / "dangling.mp4")
    found = discover_videos(root)
    assert [f.relpath for f in found.files] == ["a.mp4", "alias.mp4", "more/linked.mp4"]
    assert found.broken_links == ["dangling.mp4"]


def test_probe_good_files(corpus):
    expect = {"c30": (60, 30, "h264"), "c12": (24, 12, "h264"), "mkv": (40, 30, "h264"), "webm": (20, 12, "vp8"),
              "avi": (20, 12, "mpeg4"), "mov": (24, 24, "mpeg4"), "one_frame": (1, 24, "h264")}
    for name, (frames, fps, codec) in expect.items():
        meta = probe_video(str(corpus[name]))
        assert meta["ok"], (name, meta)
        assert (meta["frames"], meta["fps"], meta["codec"], meta["width"], meta["height"]) == (frames, fps, codec, 64, 48), name
        assert meta["duration"] == pytest.approx(frames / fps, abs=0.01), name
    portrait = probe_video(str(corpus["portrait"]))
    assert (portrait["width"], portrait["height"]) == (96, 160)


@pytest.mark.parametrize("name, reason", [
    ("zero", "zero bytes"),
    ("truncated", "not a readable video"),   # moov atom cut off
    ("truncated_fs", "truncated"),           # index intact, data cut off
    ("random", "not a readable video"),
    ("audio", "no video stream"),
    ("wrong_codec", "unsupported codec"),
])
def test_probe_broken_files(corpus, name, reason):
    meta = probe_video(str(corpus[name]))
    assert not meta["ok"] and meta["reason"] == reason, meta
    assert meta["detail"]


def test_probe_in_worker_processes(tmp_path, corpus):
    from job.data.discovery import FoundFile

    files = []
    for i, name in enumerate(["c24", "zero", "mkv"]):
        path = put(corpus[name], tmp_path / f"{i}{corpus[name].suffix}")
        st = path.stat()
        files.append(FoundFile(path, path.name, st.st_size, st.st_mtime_ns))
    results = probe_many(files, workers=2)
    assert [results[f.relpath]["ok"] for f in files] == [True, False, True]


def test_metadata_cache_reused_and_refreshed(tmp_path, corpus, monkeypatch, mtime_safe):
    root = tmp_path / "ds"
    for i in range(3):
        put(corpus["c24"], root / f"clip{i}.mp4", caption=f"clip {i}")
    put(corpus["zero"], root / "broken.mp4", caption="x")
    calls: list[str] = []
    real = probe_mod.probe_video
    monkeypatch.setattr(probe_mod, "probe_video", lambda path: calls.append(path) or real(path))
    spec = make_spec(tmp_path / "ws", [{"id": "d", "source": str(root)}])
    ws = workspace_for(spec)

    plan_dataset(spec, ws, probe_workers=1, show=False)
    assert len(calls) == 4
    cache_file = ws.metadata_cache(spec.data.datasets[0])
    entries = json.loads(cache_file.read_text())["entries"]
    assert set(entries) == {"clip0.mp4", "clip1.mp4", "clip2.mp4", "broken.mp4"}
    assert entries["clip0.mp4"]["result"]["frames"] == 48

    calls.clear()
    second = plan_dataset(spec, ws, probe_workers=1, show=False)
    assert calls == []                               # nothing re-probed, broken file included
    assert len(second.samples) == 3 and len(second.report.problems) == 1

    mtime_safe(root / "clip1.mp4")                   # one clip changed
    (root / "clip2.mp4").unlink()                    # one is gone
    calls.clear()
    third = plan_dataset(spec, ws, probe_workers=1, show=False)
    assert [os.path.basename(c) for c in calls] == ["clip1.mp4"]
    assert sorted(s.relpath for s in third.samples) == ["clip0.mp4", "clip1.mp4"]
    assert "clip2.mp4" not in json.loads(cache_file.read_text())["entries"]


def test_unreadable_cache_file_is_rebuilt(tmp_path, corpus):
    cache = tmp_path / "meta.json"
    cache.write_text("{not json")
    mc = MetadataCache(cache)
    assert mc.entries == {} and mc.dirty
