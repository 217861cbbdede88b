"""`data:` the video datasets and the text-embedding cache (the quickstart's multidatabackend.json)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import SAFE_NAME_HELP, SafeName, Section, is_4k_plus_1, nearest_4k_plus_1


class VideoOptions(Section):
    """Per-dataset video options (the quickstart's `video:` block)."""

    num_frames: int = Field(81, ge=1, description="Frames per training sample; of the form 4k+1 (81 -> 21 latent frames).")
    min_frames: int | None = Field(None, ge=1, description="Clips with fewer frames (after resampling to `framerate`) are skipped and counted in the report. Default: `num_frames`.")
    max_frames: int | None = Field(None, ge=1, description="Longest part of a clip that is used, in frames (windows are always `num_frames` long). Default: no limit.")
    is_i2v: bool = Field(False, description="Keep the first frame as an image condition for image-to-video training.")
    bucket_strategy: Literal["aspect_ratio", "resolution_frames"] = Field(
        "aspect_ratio",
        description="`aspect_ratio`: group clips by spatial aspect ratio (e.g. 1.78, 0.75); clips shorter than `num_frames` "
        "(but at least `min_frames`) get buckets of their own frame count, since a batch cannot mix lengths. `resolution_frames`: "
        "group by `WxH@F` (e.g. `832x480@81`), for mixed resolution/duration datasets.",
    )
    frame_interval: int | None = Field(None, ge=1, description="With `resolution_frames`: clips shorter than `num_frames` have their frame count rounded down to this interval (then to 4k+1); full windows stay `num_frames`.")
    windows: Literal["one", "all"] = Field("one", description="A long clip gives `one` window (its start) or `all` non-overlapping windows of `num_frames`.")

    @field_validator("num_frames")
    @classmethod
    def _frames_4k1(cls, value: int) -> int:
        if not is_4k_plus_1(value):
            raise ValueError(f"{value} is not of the form 4k+1 (the Wan VAE compresses time by 4); use {nearest_4k_plus_1(value)} or {nearest_4k_plus_1(value) + 4}")
        return value


class VideoDataset(Section):
    """One video dataset: a folder of clips and their captions."""

    id: SafeName = Field(description=f"Unique name of the dataset; used in cache paths and reports ({SAFE_NAME_HELP}).")
    dataset_type: Literal["video"] = Field("video", description="Only `video` datasets are supported for SANA-Video.")
    source: str = Field(
        description="Where the clips are: a local folder (relative paths are under the workspace), `hf://datasets/owner/repo[/sub]`, "
        "or `s3://bucket/prefix`. Remote sources are pulled into the workspace once."
    )
    disabled: bool = Field(False, description="Skip this dataset entirely.")
    caption_strategy: Literal["textfile", "filename", "instance_prompt", "captions_file"] = Field(
        "textfile",
        description="`textfile`: `clip.mp4` + `clip.txt`. `filename`: the file name (underscores -> spaces). `instance_prompt`: "
        "the same `instance_prompt` for every clip. `captions_file`: a JSONL/CSV file mapping path -> caption.",
    )
    instance_prompt: str | None = Field(None, description="Caption for `caption_strategy: instance_prompt`, and the fallback for missing captions when `missing_captions: instance_prompt`.")
    captions_file: str | None = Field(None, description="JSONL (`{\"path\": ..., \"caption\": ...}`) or CSV (`path,caption`) file, relative to the dataset folder, for `caption_strategy: captions_file`.")
    missing_captions: Literal["skip", "instance_prompt"] = Field("skip", description="A clip with a missing or empty caption is skipped (and reported) or captioned with `instance_prompt`.")
    motion_score: int | None = Field(None, ge=0, le=100, description="Append SANA-Video's motion-score suffix (` motion score: N.`) to every caption of this dataset. Inference docs use 30.")
    metadata_backend: Literal["discovery"] = Field("discovery", description="How clips are found: `discovery` scans the folder (metadata is cached, so reruns do not re-probe).")
    resolution: int = Field(480, ge=64, le=4096, description="Target resolution; see `resolution_type`.")
    resolution_type: Literal["pixel_area", "pixel"] = Field(
        "pixel_area",
        description="`pixel_area`: each clip keeps its aspect ratio at about the pixel count of a native frame at this resolution "
        "(480 -> the area of 832x480), sides multiples of 16. `pixel`: the shorter side becomes `resolution`.",
    )
    minimum_image_size: int | None = Field(None, ge=1, description="Clips whose shorter side is below this many pixels are skipped (reported).")
    maximum_image_size: int | None = Field(None, ge=1, description="Clips larger than this on their shorter side are first downsampled to `target_downsample_size`.")
    target_downsample_size: int | None = Field(None, ge=1, description="Shorter side to downsample oversized clips to before bucketing.")
    crop: bool = Field(False, description="Crop to the bucket's exact aspect instead of resizing (which would distort).")
    crop_style: Literal["center", "random"] = Field("center", description="Where to crop when `crop` is on.")
    repeats: int = Field(0, ge=0, description="Extra times each clip is seen per epoch (0 = once). Raise it for tiny datasets.")
    cache_dir_vae: str | None = Field(None, description="Latent cache folder for this dataset. Default: `cache/vae/<id>` under the workspace.")
    masks_dir: str | None = Field(None, description="Folder of masks (same stem as the clip; video or image; white counts, or for an image with transparency, its opaque part) for masked loss, relative to the dataset folder.")
    video: VideoOptions = Field(default_factory=VideoOptions, description="Video options.")


class TextEmbedsSpec(Section):
    """The text-embedding cache (the quickstart's `text_embeds` backend)."""

    id: SafeName = Field("text-embeds", description="Name of the text-embedding backend.")
    cache_dir: str = Field("cache/text/sanavideo", description="Folder of cached prompt embeddings (relative paths are under the workspace).")
    write_batch_size: int = Field(128, ge=1, description="Prompts encoded and written per batch.")


class DataSpec(Section):
    """Datasets and caches."""

    datasets: list[VideoDataset] = Field(min_length=1, description="One or more video datasets.")
    text_embeds: TextEmbedsSpec = Field(default_factory=TextEmbedsSpec, description="Text-embedding cache.")
    vae_batch_size: int = Field(1, ge=1, description="Clips encoded by the VAE at once in the cache phase.")
    vae_channels_last: bool = Field(
        True,
        description="Cache phase: run the VAE encoder with its weights and the clips in channels-last (NDHWC) layout, which "
        "cuDNN's bf16 convolutions use directly (1.14x faster encode on an H100, a little less memory; bench/RESULTS.md). "
        "Latents equal the default layout's within bf16 rounding (the cache key does not change). false: the plain "
        "NCDHW layout, latents bit-identical to a plain `vae.encode`.",
    )
    vae_fused_ops: bool = Field(
        True,
        description="Cache phase, with `vae_channels_last`: each RMS norm of the VAE encoder and the SiLU after it run as one "
        "Triton kernel (one pass over the activations instead of about nine), and the causal 3D convolutions pad height "
        "and width inside cuDNN instead of copying their input. CUDA with Triton only; the kernel repeats the module's "
        "roundings, so latents equal diffusers' encoder's up to float32 summation order. Not used where the encoder is "
        "compiled (`vae_compile`: inductor fuses these itself). false: diffusers' modules as they are.",
    )
    vae_compile: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Cache phase: `torch.compile` the VAE encoder (CUDA only; skipped on the CPU, with the reason in the log). "
        "About 1.6x faster per clip than without it on an H100 (1.58 vs 0.99 clips/s at 81x832x480), but the first batch "
        "of each clip size (bucket) compiles for about 1-1.5 minutes (its kernels are cached in `<workspace>/cache/compile`, "
        "or TORCHINDUCTOR_CACHE_DIR when set, for later runs). `auto`: compile for a bucket with at least 256 clips to encode (where it pays back); `always`; "
        "`never`. Falls back to no compile, with a warning, if compiling fails.",
    )
    vae_concurrent_batches: int = Field(
        2, ge=1, le=4,
        description="Cache phase, CUDA only: batches of `vae_batch_size` clips encoded at the same time, each by its own copy "
        "of the VAE (about 0.25 GiB bf16) on its own CUDA stream. Each batch runs the same kernels as alone, so the latents do "
        "not change; the GPU overlaps one batch's memory-bound passes with another's convolutions. 1: one batch after "
        "another. Batches of a compiled bucket (`vae_compile`) go one at a time.",
    )
    vae_latent_mode: Literal["sample", "mean"] = Field(
        "sample",
        description="Cache a sample of the VAE's latent distribution (default: the model was trained on samples, so fine-tuning on "
        "them matches its training) or its mean (deterministic).",
    )
    cache_dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Dtype of cached latents and embeddings.")
    compress_disk_cache: bool = Field(False, description="Compress cache files (smaller on disk, a little CPU to read).")
    framerate: int | None = Field(16, ge=1, le=240, description="Resample clips to this many frames per second before taking frames (SANA-Video: 16). null keeps each clip's own rate.")
    delete_problematic_videos: bool = Field(False, description="Move broken clips (truncated, undecodable, no video stream) to `<dataset>/.quarantine/`. They are always reported; never deleted silently.")
    holdout_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="Fraction of clips held out from training for the stable evaluation loss.")

    @field_validator("datasets")
    @classmethod
    def _unique_ids(cls, datasets: list[VideoDataset]) -> list[VideoDataset]:
        seen: set[str] = set()
        for ds in datasets:
            if ds.id in seen:
                raise ValueError(f"dataset id {ds.id!r} is used twice; ids must be unique")
            seen.add(ds.id)
        return datasets

    def active(self) -> list[VideoDataset]:
        return [ds for ds in self.datasets if not ds.disabled]
