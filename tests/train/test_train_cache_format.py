"""The cache format (writer/reader contract), the cached dataset, collate and the bucket sampler."""

from __future__ import annotations

import os

import pytest
import torch

from job.cache import format as fmt
from job.cache.reader import BucketBatchSampler, CachedDataset, collate_cached, require_samples
from job.errors import InputError
from train_helpers import LATENT_SHAPE, make_spec, spec_dict, write_caches


def test_sample_roundtrip_and_atomic_files(tmp_path):
    latents = torch.randn(4, 2, 8, 8).bfloat16()
    mask = torch.rand(1, 2, 8, 8)
    path = fmt.write_sample(tmp_path, "a_1", latents, caption_key="k" * 64, bucket="64x64@5", source="a.mp4",
                            is_holdout=True, mask=mask, extra={"vae": "wan", "caption_key": "ignored"})
    assert path.name == "a_1.safetensors"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    back = fmt.read_sample(tmp_path, "a_1")
    assert torch.equal(back.latents, latents) and torch.equal(back.mask, mask)
    assert back.caption_key == "k" * 64 and back.bucket == "64x64@5" and back.is_holdout and back.source == "a.mp4"
    assert back.extra == {"vae": "wan"} and back.first_frame_latents is None
    with pytest.raises(ValueError):
        fmt.write_sample(tmp_path, "../evil", latents, caption_key="k", bucket="64x64@5", source="")
    with pytest.raises(ValueError):
        fmt.write_sample(tmp_path, "b", latents, caption_key="k", bucket="64x64", source="")
    with pytest.raises(ValueError):
        fmt.write_sample(tmp_path, "b", latents, caption_key="k", bucket="64x64@5", source="", mask=torch.ones(1, 2, 4, 4))


def test_broken_and_missing_files_are_clear_input_errors(tmp_path):
    with pytest.raises(InputError, match="missing"):
        fmt.read_sample(tmp_path, "nope")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(InputError, match="unreadable"):
        fmt.read_sample(tmp_path, "bad")


def test_text_embedding_roundtrip_and_keys(tmp_path):
    embeds, mask = torch.randn(1, 8, 32), torch.ones(1, 8, dtype=torch.int64)
    fmt.write_text_embedding(tmp_path, "abc", embeds, mask)
    e, m = fmt.read_text_embedding(tmp_path, "abc")
    assert e.shape == (8, 32) and m.shape == (8,) and torch.equal(e, embeds[0])
    ctx = fmt.TextKeyContext(instruction=fmt.instruction_hash(["be detailed"]), max_sequence_length=300, text_encoder="te1")
    keys = {ctx.key("a cat"), ctx.key("a dog"), ctx.negative_key("a cat"), ctx.empty_key(),
            fmt.TextKeyContext(ctx.instruction, 301, "te1").key("a cat"),
            fmt.TextKeyContext(ctx.instruction, 300, "te2").key("a cat"),
            fmt.TextKeyContext(fmt.instruction_hash(None), 300, "te1").key("a cat") + "x"}
    assert len(keys) == 7
    assert ctx.key("a cat") == ctx.key("a cat") and len(ctx.key("a cat")) == 64
    assert ctx.empty_key() == ctx.negative_key("")
    # without an instruction, a caption and the same negative prompt are encoded alike: same key
    plain = fmt.TextKeyContext(fmt.instruction_hash([]), 300, "te1")
    assert plain.key("x") == plain.negative_key("x")


def test_text_key_context_of_a_job(tmp_path, tiny_model):
    spec = make_spec(spec_dict(tmp_path / "ws", tiny_model))
    from job.workspace import Workspace

    ws = Workspace.for_spec(spec)
    a = fmt.text_key_context(spec, ws)
    assert a == fmt.text_key_context(spec, ws)
    assert a.max_sequence_length == 8 and not a.text_encoder.startswith("path:")
    no_chi = make_spec(spec_dict(tmp_path / "ws", tiny_model, model={
        "pretrained_model_name_or_path": str(tiny_model), "prompt": {"max_sequence_length": 8, "complex_human_instruction": []}}))
    assert fmt.text_key_context(no_chi, ws).key("x") != a.key("x")


def test_manifest_roundtrip(tmp_path):
    entries = {"s1": fmt.manifest_entry("s1", caption_key="c", bucket="64x64@5", key={"vae": "x"})}
    fmt.write_manifest(tmp_path, entries, dataset="clips")
    assert fmt.read_manifest(tmp_path)["s1"]["file"] == "s1.safetensors"
    assert fmt.read_manifest(tmp_path / "none") == {}


def test_cached_dataset_splits_and_collate(tmp_path, tiny_model):
    spec = make_spec(spec_dict(tmp_path / "ws", tiny_model, data={"datasets": [{"id": "clips", "source": "clips"}],
                                                                   "text_embeds": {"cache_dir": "cache/text"}, "holdout_fraction": 0.2}))
    ws = write_caches(spec, n_samples=3, holdout=1, with_mask=True)
    train, holdout = CachedDataset(ws, spec, "train"), CachedDataset(ws, spec, "holdout")
    assert len(train) == 3 and len(holdout) == 1
    item = train[0]
    assert item["latents"].shape == LATENT_SHAPE and item["latents"].dtype == torch.float32
    assert item["prompt_embeds"].shape == (8, 32) and item["mask"].shape == (1, *LATENT_SHAPE[1:])
    batch = collate_cached([train[0], train[1]])
    assert batch["latents"].shape == (2, *LATENT_SHAPE) and batch["mask"].shape == (2, 1, *LATENT_SHAPE[1:])
    assert batch["sample_keys"] == ["clip000", "clip001"]
    # without a manifest the reader falls back to reading the file headers
    (ws.latent_cache_dir(spec.data.datasets[0]) / fmt.MANIFEST_NAME).unlink()
    assert len(CachedDataset(ws, spec, "train")) == 3


def test_collate_refuses_mixed_buckets():
    a = {"latents": torch.zeros(4, 2, 8, 8), "prompt_embeds": torch.zeros(8, 32), "prompt_attention_mask": torch.ones(8),
         "mask": None, "first_frame_latents": None, "sample_key": "a", "caption_key": "c", "bucket": "64x64@5"}
    b = dict(a, latents=torch.zeros(4, 2, 8, 6), bucket="48x64@5")
    with pytest.raises(ValueError, match="mixes buckets"):
        collate_cached([a, b])


def test_the_reader_reuses_the_data_package_sampler():
    from job.data.sampler import BucketBatchSampler as DataSampler

    assert BucketBatchSampler is DataSampler


def test_require_samples_says_how_to_fix(tmp_path, tiny_model):
    spec = make_spec(spec_dict(tmp_path / "ws", tiny_model))
    ws = write_caches(spec, n_samples=1)
    ds = CachedDataset(ws, spec)
    with pytest.raises(InputError, match="no samples detected") as info:
        require_samples(ds, BucketBatchSampler(ds.buckets, batch_size=2, seed=0), needed_batches=1)
    assert "repeats" in str(info.value)
    require_samples(ds, BucketBatchSampler(ds.buckets, batch_size=1, seed=0), needed_batches=1)


def test_compressed_cache_files_are_read_too(tmp_path, tiny_model):
    from job.cache import compression

    spec = make_spec(spec_dict(tmp_path / "ws", tiny_model))
    ws = write_caches(spec, n_samples=2)
    folder = ws.latent_cache_dir(spec.data.datasets[0])
    plain = CachedDataset(ws, spec)[0]
    for path in list(folder.glob("*.safetensors")) + list(ws.text_cache_dir.glob("*.safetensors")):
        tensors, meta = compression.load(path)
        compression.save(path, tensors, meta, compress=True)
        assert compression.is_compressed(path)
    (folder / fmt.MANIFEST_NAME).unlink()  # force the header-reading path as well
    packed = CachedDataset(ws, spec)[0]
    assert torch.equal(plain["latents"], packed["latents"]) and torch.equal(plain["prompt_embeds"], packed["prompt_embeds"])
