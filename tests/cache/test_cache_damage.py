"""A cache file cut short keeps a good header; every reader must still call it broken, so the cache
phase recomputes it instead of skipping it. (The whole job under this fault: tests/e2e/test_faults.py.)"""

from __future__ import annotations

import pytest
import torch
from cache_helpers import CLIPS, job

from job.cache import compression
from job.cache import format as fmt
from job.errors import InputError


@pytest.mark.parametrize("compress", [False, True])
def test_a_cache_file_cut_short_is_unreadable_not_trusted(tmp_path, compress):
    path = fmt.write_sample(tmp_path, "clip.f0-abc", torch.randn(4, 3, 8, 8), caption_key="k", bucket="64x64@9",
                            source="clip.mp4", is_holdout=False, compress=compress)
    assert compression.read_metadata(path)["caption_key"] == "k"
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    with pytest.raises(InputError, match="unreadable"):
        compression.load(path)
    if not compress:  # a plain file's header declares its size; a compressed one is only caught by a full read
        with pytest.raises(InputError, match="bytes, its header describes"):
            compression.read_metadata(path)
    path.write_bytes(data)
    assert compression.load(path)[1]["caption_key"] == "k"


@pytest.mark.parametrize("compress", [False, True])
def test_a_broken_file_found_by_training_is_recomputed_by_the_next_cache_phase(job_dict, compress):
    from test_cache_phase import cache, latent_dir

    from job.cache.reader import CachedDataset

    job_dict["data"]["compress_disk_cache"] = compress
    spec, ws = job(job_dict)
    assert cache(spec, ws).latents.cached == CLIPS
    victim = sorted(latent_dir(spec, ws).glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-50])  # cut short: a compressed file's header still reads
    dataset = CachedDataset(ws, spec)
    index = next(i for i, e in enumerate(dataset.entries) if victim.name.startswith(e.sample_key))
    with pytest.raises(InputError, match="run the cache phase again"):
        dataset[index]
    assert not victim.exists()  # set aside, so the next cache phase cannot skip it

    result = cache(spec, ws)
    assert (result.latents.skipped, result.latents.cached + result.latents.stale) == (CLIPS - 1, 1)
    assert not list(latent_dir(spec, ws).glob(".*.tmp"))
    assert CachedDataset(ws, spec)[index]["latents"].shape[0] == 4
