"""Caption pairing for every strategy, the missing-caption policy and the motion score."""

from __future__ import annotations

import pytest

from data_helpers import make_spec, put, workspace_for
from job.data import plan_dataset, with_motion_score
from job.errors import InputError


def plan(tmp_path, root, **ds):
    spec = make_spec(tmp_path / "ws", [{"id": "caps", "source": str(root), **ds}])
    return plan_dataset(spec, workspace_for(spec), probe_workers=1, show=False)


def captions(p) -> dict[str, str]:
    return {s.relpath: s.caption for s in p.samples}


def test_textfile_pairs_by_stem_including_odd_encodings(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c24"], root / "a.mp4", caption="  a cat\non a mat \n")
    put(corpus["c24"], root / "sub" / "b.mp4", caption="\ufeffa dog".encode("utf-8"))         # BOM dropped
    put(corpus["c24"], root / "c.mp4", caption="caf\xe9 au lait".encode("latin-1"))          # not UTF-8
    put(corpus["c24"], root / "d.MP4")
    (root / "d.TXT").write_text("upper case extension")
    put(corpus["c24"], root / "e.mp4", caption="   \n")                                      # empty
    put(corpus["c24"], root / "f.mp4")                                                       # none
    p = plan(tmp_path, root)
    assert captions(p) == {"a.mp4": "a cat on a mat", "sub/b.mp4": "a dog", "c.mp4": "caf\ufffd au lait",
                           "d.MP4": "upper case extension"}
    skipped = {s.relpath: s.why for s in p.report.skipped}
    assert skipped == {"e.mp4": "no_caption", "f.mp4": "no_caption"}
    assert any(n.path == "c.mp4" and "UTF-8" in n.message for n in p.report.notes)
    assert p.counts["caps"]["no_caption"] == 2


def test_missing_captions_fall_back_to_the_instance_prompt(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c24"], root / "a.mp4", caption="own caption")
    put(corpus["c24"], root / "b.mp4")
    p = plan(tmp_path, root, missing_captions="instance_prompt", instance_prompt="a sks clip")
    assert captions(p) == {"a.mp4": "own caption", "b.mp4": "a sks clip"}
    assert p.report.skipped == []


def test_filename_and_instance_prompt(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c24"], root / "a_red_fox_jumping.mp4")
    put(corpus["c24"], root / "sub" / "two words.mov")
    assert captions(plan(tmp_path, root, caption_strategy="filename")) == {
        "a_red_fox_jumping.mp4": "a red fox jumping", "sub/two words.mov": "two words"}
    assert set(captions(plan(tmp_path, root, caption_strategy="instance_prompt", instance_prompt="sks")).values()) == {"sks"}


def test_captions_file_jsonl(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c24"], root / "a.mp4")
    put(corpus["c24"], root / "sub" / "b.mp4")
    put(corpus["c24"], root / "c.mp4")
    (root / "captions.jsonl").write_text(
        '{"path": "./a.mp4", "caption": "first"}\n'
        "not json\n"
        '{"file_name": "sub\\\\b.mp4", "text": "second"}\n'
        '{"path": "c.mp4", "caption": ""}\n', encoding="utf-8")
    p = plan(tmp_path, root, caption_strategy="captions_file", captions_file="captions.jsonl")
    assert captions(p) == {"a.mp4": "first", "sub/b.mp4": "second"}
    assert [s.relpath for s in p.report.skipped] == ["c.mp4"]
    assert any("captions.jsonl:2" in n.path for n in p.report.notes)


@pytest.mark.parametrize("header", [True, False])
def test_captions_file_csv(tmp_path, corpus, header):
    root = tmp_path / "ds"
    put(corpus["c24"], root / "a.mp4")
    put(corpus["c24"], root / "b c.mp4")
    text = ("path,caption\n" if header else "") + 'a.mp4,"a caption, with a comma"\nb c.mp4,plain\n'
    (root / "caps.csv").write_bytes(text.encode("utf-8"))
    p = plan(tmp_path, root, caption_strategy="captions_file", captions_file="caps.csv")
    assert captions(p) == {"a.mp4": "a caption, with a comma", "b c.mp4": "plain"}


def test_missing_captions_file_is_an_input_error(tmp_path, corpus):
    root = tmp_path / "ds"
    put(corpus["c24"], root / "a.mp4")
    with pytest.raises(InputError, match="captions file"):
        plan(tmp_path, root, caption_strategy="captions_file", captions_file="nope.jsonl")


def test_motion_score_suffix(tmp_path, corpus):
    assert with_motion_score("a cat.  ", 30) == "a cat. motion score: 30."
    root = tmp_path / "ds"
    put(corpus["c24"], root / "a.mp4", caption="a cat walks")
    put(corpus["c24"], root / "b.mp4")
    p = plan(tmp_path, root, motion_score=7, missing_captions="instance_prompt", instance_prompt="sks ")
    assert captions(p) == {"a.mp4": "a cat walks motion score: 7.", "b.mp4": "sks motion score: 7."}
