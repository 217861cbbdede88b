"""The cache phase on a tiny random SANA-Video model and real H.264 clips, on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cache_helpers import CLIPS, FRAMES, SEQ_LEN, job, set_dataset

from job.cache import compression
from job.cache import format as fmt
from job.cache.phase import CacheResult, _workspace_lock, latent_sample_key, run_cache, validation_prompts
from job.errors import InputError

# 4 captions (the validation prompt and the library prompt repeat two of them) + negative + empty
TEXTS = CLIPS + 2
LATENT_SHAPE = (4, (FRAMES - 1) // 4 + 1, 8, 8)  # tiny VAE: 4 channels; 64x64 px -> 8x8


def cache(spec, ws, **kwargs) -> CacheResult:
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("show", False)
    return run_cache(spec, ws, **kwargs)


def latent_dir(spec, ws):
    return ws.latent_cache_dir(spec.data.datasets[0])


def plan(spec, ws):
    from job.data import plan_dataset

    return plan_dataset(spec, ws, show=False)


def check_consistent(spec, ws) -> dict:
    """Manifests parse, every listed latent loads and its caption's embedding exists, no temporaries."""
    folder = latent_dir(spec, ws)
    manifest = fmt.read_manifest(folder)
    for key, entry in manifest.items():
        sample = fmt.read_sample(folder, key)
        assert sample.caption_key == entry["caption_key"]
        assert sample.bucket == entry["bucket"]
        embeds, mask = fmt.read_text_embedding(ws.text_cache_dir, sample.caption_key)
        assert embeds.shape[0] == mask.shape[0] == SEQ_LEN
    assert not list(folder.glob(".*.tmp")) and not list(ws.text_cache_dir.glob(".*.tmp"))
    json.loads((ws.text_cache_dir / fmt.MANIFEST_NAME).read_text())
    return manifest


def test_first_run_caches_everything_and_a_rerun_skips_everything(job_dict, monkeypatch):
    from job.cache.reader import CachedDataset

    spec, ws = job(job_dict)
    result = cache(spec, ws)
    assert (result.text.cached, result.latents.cached, result.failed, result.orphans) == (TEXTS, CLIPS, 0, 0)
    manifest = check_consistent(spec, ws)
    assert len(manifest) == CLIPS
    assert set(manifest) == {latent_sample_key(s) for s in plan(spec, ws).samples}
    assert (ws.state_dir / "cache.json").is_file()

    # the training reader reads what the phase wrote
    dataset = CachedDataset(ws, spec)
    assert len(dataset) == CLIPS
    item = dataset[0]
    assert tuple(item["latents"].shape) == LATENT_SHAPE
    assert tuple(item["prompt_embeds"].shape) == (SEQ_LEN, 32)
    ctx = fmt.text_key_context(spec, ws)
    assert fmt.has_text_embedding(ws.text_cache_dir, ctx.empty_key())  # caption dropout
    assert fmt.has_text_embedding(ws.text_cache_dir, ctx.negative_key(spec.validation.negative_prompt))
    for prompt in validation_prompts(spec, ws).values():
        assert fmt.has_text_embedding(ws.text_cache_dir, ctx.key(prompt))

    # a rerun has nothing to do and loads no model
    def no_models(*args, **kwargs):
        raise AssertionError("a rerun with everything cached must not load a model")

    monkeypatch.setattr("job.models.sanavideo.loading.load_components", no_models)
    again = cache(spec, ws)
    assert again.nothing_to_do
    assert (again.text.skipped, again.latents.skipped, again.cached, again.stale_recomputed) == (TEXTS, CLIPS, 0, 0)


def test_text_embeddings_equal_encode_prompts(job_dict, tiny_model_path):
    from job.models.sanavideo.loading import load_components
    from job.models.sanavideo.prompts import encode_negative_prompts, encode_prompts, instruction_from_spec

    spec, ws = job(job_dict)
    cache(spec, ws)
    parts = load_components(tiny_model_path, parts={"text_encoder"}, dtype=torch.float32)
    ctx = fmt.text_key_context(spec, ws)
    instruction = instruction_from_spec(spec.model.prompt.complex_human_instruction)
    captions = sorted({s.caption for s in plan(spec, ws).samples})
    ref, ref_mask = encode_prompts(parts.text_encoder, parts.tokenizer, captions, max_sequence_length=SEQ_LEN,
                                   complex_human_instruction=instruction)
    for i, caption in enumerate(captions):
        embeds, mask = fmt.read_text_embedding(ws.text_cache_dir, ctx.key(caption))
        torch.testing.assert_close(embeds, ref[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(mask, ref_mask[i])
    negatives = [spec.validation.negative_prompt, ""]
    ref, ref_mask = encode_negative_prompts(parts.text_encoder, parts.tokenizer, negatives, max_sequence_length=SEQ_LEN)
    for i, key in enumerate([ctx.negative_key(negatives[0]), ctx.empty_key()]):
        embeds, mask = fmt.read_text_embedding(ws.text_cache_dir, key)
        torch.testing.assert_close(embeds, ref[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(mask, ref_mask[i])


def test_latents_equal_a_plain_encode_and_decode_to_the_pipeline_shape(job_dict, tiny_model_path):
    from job.data import load_sample
    from job.models.sanavideo.latents import decode_latents, encode_videos
    from job.models.sanavideo.loading import load_components

    data = job_dict
    data["data"]["vae_latent_mode"] = "mean"
    spec, ws = job(data)
    cache(spec, ws)
    vae = load_components(tiny_model_path, parts={"vae"}).vae
    for sample in plan(spec, ws).samples:
        cached = fmt.read_sample(latent_dir(spec, ws), latent_sample_key(sample)).latents
        assert tuple(cached.shape) == LATENT_SHAPE and cached.dtype == torch.float32
        plain = encode_videos(vae, load_sample(sample, spec)[None], sample=False)[0]
        torch.testing.assert_close(cached, plain, atol=1e-4, rtol=1e-4)
    video = decode_latents(vae, cached[None])
    # what SanaVideoPipeline decodes for 64x64, FRAMES frames: [B, 3, F, H, W]
    assert tuple(video.shape) == (1, 3, FRAMES, 64, 64)


def test_sampled_latents_are_the_same_for_any_batch_size_and_worker_count(job_dict, tmp_path, tiny_model_path, clips_template):
    from cache_helpers import make_workspace, spec_dict

    spec_a, ws_a = job(job_dict)
    cache(spec_a, ws_a)
    data_b = spec_dict(make_workspace(tmp_path / "b", clips_template), tiny_model_path)
    data_b["data"]["vae_batch_size"] = 1
    spec_b, ws_b = job(data_b)
    cache(spec_b, ws_b, num_workers=2)  # decoded in DataLoader worker processes
    for sample in plan(spec_a, ws_a).samples:
        key = latent_sample_key(sample)
        a = fmt.read_sample(latent_dir(spec_a, ws_a), key).latents
        b = fmt.read_sample(latent_dir(spec_b, ws_b), key).latents
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_an_edited_caption_recomputes_one_text_embedding_and_relabels_its_latent(job_dict):
    spec, ws = job(job_dict)
    cache(spec, ws)
    folder = latent_dir(spec, ws)
    sample = next(s for s in plan(spec, ws).samples if s.relpath == "clip_002.mp4")
    before = fmt.read_sample(folder, latent_sample_key(sample))

    (ws.root / "clips" / "clip_002.txt").write_text("a purple square spinning in place\n", encoding="utf-8")
    result = cache(spec, ws)
    assert (result.text.stale, result.text.cached, result.text.skipped, result.text.orphans) == (1, 0, TEXTS - 1, 1)
    assert (result.latents.rewritten, result.latents.skipped, result.latents.stale, result.latents.cached) == (1, CLIPS - 1, 0, 0)
    after = fmt.read_sample(folder, latent_sample_key(sample))
    assert after.caption_key == fmt.text_key_context(spec, ws).key("a purple square spinning in place")
    assert torch.equal(after.latents, before.latents)  # not re-encoded
    check_consistent(spec, ws)

    pruned = cache(spec, ws, prune=True)
    assert (pruned.text.orphans, pruned.text.removed) == (1, 1)
    assert not fmt.text_path(ws.text_cache_dir, before.caption_key).exists()
    assert cache(spec, ws).orphans == 0


def test_another_frame_count_makes_every_latent_stale(job_dict):
    spec, ws = job(job_dict)
    cache(spec, ws)
    spec9, ws9 = job(set_dataset(job_dict, video={"num_frames": 9}))
    result = cache(spec9, ws9)
    assert (result.latents.stale, result.latents.skipped, result.latents.cached) == (CLIPS, 0, 0)
    assert (result.text.skipped, result.text.cached) == (TEXTS, 0)
    manifest = check_consistent(spec9, ws9)
    assert {e["bucket"] for e in manifest.values()} == {"64x64@9"}
    sample = fmt.read_sample(latent_dir(spec9, ws9), next(iter(manifest)))
    assert tuple(sample.latents.shape) == (4, 3, 8, 8)


def test_orphans_leave_the_manifest_and_are_deleted_only_with_prune(job_dict):
    from job.cache.reader import CachedDataset

    spec, ws = job(job_dict)
    cache(spec, ws)
    gone = next(s for s in plan(spec, ws).samples if s.relpath == "clip_003.mp4")
    (ws.root / "clips" / "clip_003.mp4").unlink()
    (ws.root / "clips" / "clip_003.txt").unlink()
    result = cache(spec, ws)
    assert (result.latents.orphans, result.latents.removed, result.latents.skipped) == (1, 0, CLIPS - 1)
    assert result.text.orphans == 1
    assert len(check_consistent(spec, ws)) == CLIPS - 1
    assert len(CachedDataset(ws, spec)) == CLIPS - 1  # training never sees the orphan
    orphan = fmt.sample_path(latent_dir(spec, ws), latent_sample_key(gone))
    assert orphan.exists()
    pruned = cache(spec, ws, prune=True)
    assert (pruned.latents.removed, pruned.text.removed) == (1, 1)
    assert not orphan.exists()


def test_a_clip_that_fails_to_decode_is_reported_and_left_out(job_dict, monkeypatch):
    import job.data as data_package
    from job.data import DataReport, DecodeError, report_path

    original = data_package.load_frames

    def flaky(sample, **kwargs):
        if sample.relpath == "clip_001.mp4":
            raise DecodeError(f"{sample.path}: cannot decode (test)", reason="undecodable", path=sample.path)
        return original(sample, **kwargs)

    monkeypatch.setattr(data_package, "load_frames", flaky)
    spec, ws = job(job_dict)
    result = cache(spec, ws)
    assert (result.latents.failed, result.latents.cached) == (1, CLIPS - 1)
    assert result.failures[0]["path"] == "clip_001.mp4"
    assert len(check_consistent(spec, ws)) == CLIPS - 1
    problems = DataReport.load(report_path(ws)).problems
    assert [(p.relpath, p.stage) for p in problems] == [("clip_001.mp4", "decode")]


def test_compression_round_trip():
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {"latents": torch.randn(16, 3, 12, 16, generator=g).bfloat16(), "mask": torch.ones(7, dtype=torch.int64),
               "f32": torch.randn(33, generator=g)}
    raw = save(tensors, metadata={"caption_key": "abc"})
    packed = compression.compress_bytes(raw)
    assert compression.is_compressed_bytes(packed) and not compression.is_compressed_bytes(raw)
    assert compression.decompress_bytes(packed) == raw  # byte for byte
    assert len(packed) < 0.85 * len(raw)
    # the magic read as a safetensors header length is far beyond any file
    assert int.from_bytes(compression.MAGIC, "little") > 2**60


def test_compressed_cache_is_read_back_and_toggling_it_rewrites_without_recomputing(job_dict):
    from job.cache.reader import CachedDataset

    data = job_dict
    data["data"].update(compress_disk_cache=True, cache_dtype="bf16")
    spec, ws = job(data)
    cache(spec, ws)
    folder = latent_dir(spec, ws)
    files = list(folder.glob("*.safetensors")) + list(ws.text_cache_dir.glob("*.safetensors"))
    assert len(files) == CLIPS + TEXTS and all(compression.is_compressed(p) for p in files)
    manifest = check_consistent(spec, ws)
    before = {k: fmt.read_sample(folder, k).latents for k in manifest}
    assert all(t.dtype == torch.bfloat16 for t in before.values())
    assert compression.read_metadata(folder / manifest[next(iter(manifest))]["file"])["caption_key"]

    data["data"]["compress_disk_cache"] = False
    spec2, ws2 = job(data)
    result = cache(spec2, ws2)
    assert (result.latents.rewritten, result.text.rewritten, result.cached, result.stale_recomputed) == (CLIPS, TEXTS, 0, 0)
    assert not any(compression.is_compressed(p) for p in files)
    for key, tensor in before.items():
        assert torch.equal(fmt.read_sample(folder, key).latents, tensor)  # the plain format reader reads them now
    assert len(CachedDataset(ws2, spec2)) == CLIPS


def test_i2v_first_frame_latents_and_masks(job_dict):
    from PIL import Image

    spec_data = set_dataset(job_dict, masks_dir="masks", video={"is_i2v": True})
    spec_data["data"]["vae_latent_mode"] = "mean"
    spec, ws = job(spec_data)
    masks = ws.root / "clips" / "masks"
    masks.mkdir()
    half = np.zeros((64, 64), dtype=np.uint8)
    half[:, :32] = 255
    for i in range(CLIPS):
        Image.fromarray(half).save(masks / f"clip_{i:03d}.png")
    cache(spec, ws)
    for key in check_consistent(spec, ws):
        sample = fmt.read_sample(latent_dir(spec, ws), key)
        assert tuple(sample.first_frame_latents.shape) == (4, 1, 8, 8)
        # the causal VAE's first latent frame sees the first frame alone
        torch.testing.assert_close(sample.first_frame_latents, sample.latents[:, :1], atol=1e-4, rtol=1e-4)
        assert tuple(sample.mask.shape) == (1, *LATENT_SHAPE[1:])
        assert torch.all(sample.mask[..., :4] == 1) and torch.all(sample.mask[..., 4:] == 0)


def test_mask_to_latent_averages_each_latent_frames_pixels():
    from job.cache.phase import mask_to_latent

    pixels = torch.zeros(9, 16, 16)
    pixels[0] = 1.0  # only the first frame: latent frame 0 alone
    pixels[5:7] = 1.0  # half of the second group of four (frames 5..8)
    latent = mask_to_latent(pixels, temporal=4, spatial=8)
    assert tuple(latent.shape) == (1, 3, 2, 2)
    assert latent[0, :, 0, 0].tolist() == [1.0, 0.0, 0.5]


def test_prompt_library_from_a_json_file(job_dict):
    data = job_dict
    data["validation"]["prompt_library"] = "library.json"
    spec, ws = job(data)
    (ws.root / "library.json").write_text(json.dumps({"cat": "a cat on a windowsill"}), encoding="utf-8")
    assert validation_prompts(spec, ws) == {"validation": spec.validation.prompt, "cat": "a cat on a windowsill"}
    (ws.root / "library.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="not readable JSON"):
        validation_prompts(spec, ws)


def test_a_second_run_on_the_same_workspace_waits_for_the_first(job_dict):
    import threading

    spec, ws = job(job_dict)
    with _workspace_lock(ws, wait=False):
        with pytest.raises(InputError, match="another cache phase is running"):
            with _workspace_lock(ws, wait=False):
                pass
        done = threading.Event()
        thread = threading.Thread(target=lambda: (cache(spec, ws), done.set()), daemon=True)
        thread.start()
        assert not done.wait(0.5)  # blocked on the lock: planned nothing, wrote nothing
        assert not (ws.state_dir / "cache.json").exists()
    thread.join(60)
    assert done.is_set() and (ws.state_dir / "cache.json").exists()


def test_decode_workers_shrink_to_fit_shared_memory(monkeypatch):
    import collections
    from types import SimpleNamespace

    import job.cache.phase as phase

    sample = SimpleNamespace(width=832, height=480, num_frames=81)  # 97 MB of uint8 frames
    todo = [(SimpleNamespace(sample=sample), False)]
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(phase.shutil, "disk_usage", lambda path: usage(0, 0, 64 * 2**20))  # Docker's default
    assert phase._fit_workers(8, todo, batch_size=1) == 0
    monkeypatch.setattr(phase.shutil, "disk_usage", lambda path: usage(0, 0, 1 * 2**30))
    assert phase._fit_workers(8, todo, batch_size=1) == 3
    monkeypatch.setattr(phase.shutil, "disk_usage", lambda path: usage(0, 0, 64 * 2**30))
    assert phase._fit_workers(8, todo, batch_size=2) == 8


def _mask_video(path, rgba: bool) -> None:
    """5 frames, 64x64 at 8 fps: the left half counts. `rgba`: PNG in MOV, white everywhere, the left
    half opaque and the right transparent; else H.264, left half white and right black."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("png" if rgba else "libx264", rate=8)
        stream.width = stream.height = 64
        stream.pix_fmt = "rgba" if rgba else "yuv420p"
        for _ in range(5):
            pixels = np.zeros((64, 64, 4 if rgba else 3), dtype=np.uint8)
            if rgba:
                pixels[..., :3] = 255
                pixels[:, :32, 3] = 255
            else:
                pixels[:, :32] = 255
            frame = av.VideoFrame.from_ndarray(pixels, format="rgba" if rgba else "rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("rgba", [False, True], ids=["luminance", "alpha"])
def test_a_mask_video_counts_where_it_is_white_or_opaque(tmp_path, rgba):
    from types import SimpleNamespace

    from job.cache.phase import load_mask
    from job.data.decode import has_alpha

    path = tmp_path / ("mask.mov" if rgba else "mask.mp4")
    _mask_video(path, rgba)
    assert has_alpha(path) is rgba
    sample = SimpleNamespace(mask_path=str(path), width=64, height=64, source_width=64, source_height=64,
                             crop_box=(0, 0, 64, 64), start_time=0.0, num_frames=5, fps=8.0)
    mask = load_mask(sample, temporal=4, spatial=8)
    assert tuple(mask.shape) == (1, 2, 8, 8)
    assert torch.all(mask[..., :4] > 0.95) and torch.all(mask[..., 4:] < 0.05)
