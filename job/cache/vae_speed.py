"""Speed-ups of the Wan VAE encoder for the cache phase (`data.vae_channels_last`, `data.vae_fused_ops`,
`data.vae_compile`).

    speed = EncoderSpeed(vae, spec.data, device, clips_per_bucket)  # applies the spec to the VAE
    latents = speed.run(bucket, n_clips, lambda: encode(speed.input(video)))

Why: the Wan encoder is a stack of 3x3x3 causal Conv3d layers over 832x480 frames. In the default
NCDHW layout cuDNN's bf16 kernels first transpose each input to NDHWC (the tensor cores want the
channels innermost; `nchwToNhwcKernel`, about 80 ms of a 1.28 s encode on an H100) and write NCDHW back.
With weights and input in channels-last layout the convolutions run on NDHWC directly and every
intermediate (pads, the concatenated cached frames, norms, SiLU) keeps that layout. The arithmetic
is the same; the kernels differ, so latents match the default layout within bf16 rounding, not bit
for bit (bench/RESULTS.md, "Latent caching throughput").

On that layout `data.vae_fused_ops` runs each RMS norm + SiLU as one Triton pass and lets the causal
convs pad inside cuDNN (`job.models.sanavideo.vae_kernels`): the eager encoder's elementwise work.

`torch.compile` of the encoder (CUDA only) fuses the norms, SiLU, pads and the concatenation of
cached frames around the convolutions. It traces without graph breaks into 3 graphs per clip size
(the first chunk of 1 frame, the second with a 1-frame cache, the rest), compiled on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from job.errors import TrainerError
from job.models.sanavideo.triton_support import interpreting, triton_importable
from job.models.sanavideo.vae_kernels import to_channels_last, use_fused_vae_ops, warm_up_in_background

log = logging.getLogger("trainer.cache")
T = TypeVar("T")


def channels_last_input(video: torch.Tensor) -> torch.Tensor:
    """A [B, C, F, H, W] video stored as NDHWC (no copy when it already is)."""
    return video.contiguous(memory_format=torch.channels_last_3d)


#: `data.vae_compile: auto` compiles a bucket's encoder only when at least this many of its clips are
#: encoded: on an H100 the compile of one clip size costs about 90 s on a cold inductor cache (3
#: graphs: the first chunk, the second, the rest; ~50 s warm) and saves about 0.38 s a clip at
#: 81x832x480 in the phase (0.99 -> 1.58 clips/s, bench/RESULTS.md), so it pays back after ~240 clips.
COMPILE_MIN_CLIPS = 256


def compile_unavailable(device: torch.device) -> str | None:
    """Why the encoder is not compiled on `device` (None: it can be)."""
    if device.type != "cuda":
        return "no CUDA device (inductor's CPU kernels would cost more compile time than they save)"
    return None


class EncoderSpeed:
    """`data.vae_channels_last` and `data.vae_compile` applied to the cache phase's VAE.

        speed = EncoderSpeed(vae, spec.data, dev, clips_per_bucket)   # converts the weights once
        latents = speed.run(bucket, clips, lambda: encode(speed.input(video)))

    The compiled encoder is used for a batch of a bucket that is compiled (`always`, or `auto` with
    at least `COMPILE_MIN_CLIPS` clips of that bucket to encode) and that has the full
    `vae_batch_size` clips (a short last batch would compile a new shape for one batch). If the
    compiled encoder fails (inductor missing a compiler, an unsupported op), the batch is encoded
    again without it and compile stays off for the rest of the run, with a warning.
    """

    def __init__(self, vae, data, device: torch.device, clips_per_bucket: dict[str, int]):
        self.vae = vae
        self.channels_last = bool(data.vae_channels_last)
        self.batch_size = int(data.vae_batch_size)
        self.eager = vae.encoder
        self.compiled = None
        self.applied: list[str] = []
        self.warm_up = None
        if self.channels_last:
            to_channels_last(vae)
            self.applied.append("channels-last layout")
            # (on the CPU only under Triton's interpreter: the tests)
            if data.vae_fused_ops and triton_importable() and (device.type == "cuda" or interpreting()):
                use_fused_vae_ops(vae.encoder)
                self.applied.append("fused RMS norm + SiLU kernels, padding inside the convolutions")
                self.warm_up = warm_up_in_background(vae.encoder)  # overlaps the decode workers' start
        mode = data.vae_compile
        self.compile_buckets: set[str] = set()
        if mode == "never":
            return
        wanted = {b for b, n in clips_per_bucket.items() if mode == "always" or n >= COMPILE_MIN_CLIPS}
        if not wanted:
            log.info("data.vae_compile auto: not compiling the VAE encoder: no bucket has %d clips to encode "
                     "(the compile would cost more than it saves)", COMPILE_MIN_CLIPS)
            return
        why = compile_unavailable(device)
        if why is not None:
            log.info("data.vae_compile: not compiling the VAE encoder: %s", why)
            return
        self.compile_buckets = wanted
        # static shapes: one set of graphs per clip size, no dynamic-shape kernels
        self.compiled = torch.compile(self.eager, dynamic=False)
        self.applied.append(f"torch.compile ({len(wanted)} bucket(s); the first batch of each compiles, about 1-1.5 min)")

    def input(self, video: torch.Tensor) -> torch.Tensor:
        return channels_last_input(video) if self.channels_last else video

    def uses_compile(self, bucket: str, clips: int) -> bool:
        """Whether a batch of `clips` clips of `bucket` goes through the compiled encoder."""
        return self.compiled is not None and bucket in self.compile_buckets and clips == self.batch_size

    def ready(self) -> None:
        """Wait for the kernels' background compile (call before each encode; any thread)."""
        warm_up = self.warm_up
        if warm_up is not None:
            warm_up.join()

    def run(self, bucket: str, clips: int, encode: Callable[[], T]) -> T:
        use = self.uses_compile(bucket, clips)
        self.vae.encoder = self.compiled if use else self.eager
        if not use:
            return encode()
        import torch._dynamo

        # 3 graphs per clip size; dynamo's default limit (8 per code object) would stop at the 3rd bucket
        limit = max(8, 4 * len(self.compile_buckets))
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        try:
            with torch._dynamo.config.patch(**{name: limit}):
                return encode()
        except (torch.OutOfMemoryError, TrainerError):
            raise
        except Exception as exc:  # noqa: BLE001 - inductor/triton failures vary; eager is always right
            log.warning("data.vae_compile: the compiled VAE encoder failed (%s: %s); encoding without compile from "
                        "here on (set data.vae_compile: never to skip the attempt)", type(exc).__name__,
                        str(exc).splitlines()[0][:300] if str(exc) else "")
            self.compiled = None
            self.vae.encoder = self.eager
            return encode()
        finally:
            self.vae.encoder = self.eager

    def info(self) -> dict[str, str]:
        """What each latent file records about how it was computed (metadata, not part of the cache key)."""
        return {"vae_layout": "channels_last" if self.channels_last else "contiguous"}
