#!/usr/bin/env python
"""Latent caching throughput: a plain per-clip `vae.encode` loop vs the cache phase's pipeline.

    python bench/cache_throughput.py [--clips 12] [--json out.json] [--budget 240]
    python bench/cache_throughput.py --tiny --device cpu --clips 3     # a dry run of the script itself

Both paths turn the same planned samples into bf16 latents on disk with the full-size Wan 2.1 VAE
(`AutoencoderKLWan()`: the class defaults are the Wan 2.1 / SANA-Video VAE, z_dim 16; random
weights, so nothing is downloaded; the speed of a conv net does not depend on its weights):

- clips: 1248x720 H.264 at 24 fps, 5.5 s (a textured scene panning, camera-like bitrate), planned
  by the real `plan_dataset` at resolution 480 (`pixel_area`) -> 81 frames at 16 fps, 832x480.
- `plain`: for each clip, in one process, one after the other: `load_sample` (PyAV decode +
  16 fps resampling + swscale resize to 832x480 + float conversion), `vae.encode` in bf16, a
  posterior sample (seeded per clip), normalisation, copy to the CPU, `safetensors.save_file`.
  Default torch settings. The decode is the same code as ours, so the difference is the pipeline.
- `ours`: the cache phase's own latent stage (`job.cache.phase._cache_latents`: DataLoader decode
  workers shipping uint8 frames, float conversion on the GPU, the VAE encoder in channels-last
  layout (`data.vae_channels_last`, default on), a writer thread pool with atomic writes + fsync,
  manifests), timed end to end INCLUDING its VAE load, plus its steady rate (from the 3rd finished
  clip on). Variants (`--variants`): b1 (the defaults: channels-last, fused norm kernels, `vae_compile: auto`, which
  does not compile for a run this short), b1-compile (`vae_compile: always`; its first batch pays
  the compile), b2 (vae_batch_size 2), b1-ncdhw (channels-last off: the phase before issue #6),
  b1-cudnn-autotune, b1-compressed, b1-unfused (`data.vae_fused_ops: false`: the defaults before the fused
  RMS norm + SiLU kernel).

Numerics: ours vs plain per clip (same seeds, same input): ||a - b|| / ||b|| and max |a - b|
(bf16: expect <= ~1e-2; cuDNN may pick other kernels). Timings are wall clock with the device
synchronised (the plain loop copies each latent to the CPU; ours returns only once every file is
on disk). Prints a table last; `--json` writes every number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SRC_W, SRC_H, SRC_FPS, SRC_SECONDS = 1248, 720, 24, 5.5


def make_clip(args: tuple) -> str:
    """A camera-like H.264 clip: a smooth random texture panning diagonally, with film grain."""
    import av

    path, width, height, fps, seconds, seed = args
    rng = np.random.default_rng(seed)
    big_h, big_w = height + 300, width + 400
    coarse = rng.integers(0, 256, size=(big_h // 16 + 2, big_w // 16 + 2, 3)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[0] - 1.001, big_h)
    xs = np.linspace(0, coarse.shape[1] - 1.001, big_w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    tex = (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
           + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)
    tex = np.clip(tex + rng.normal(0, 6, size=(big_h, big_w, 1)), 0, 255).astype(np.uint8)
    n = int(round(fps * seconds))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "21", "g": str(fps * 2)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            oy, ox = int(i * 300 / n), int(i * 400 / n)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(tex[oy:oy + height, ox:ox + width]), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    Path(path).with_suffix(".txt").write_text(f"a textured scene panning slowly, clip {seed}\n")
    return str(path)


def versions() -> dict:
    import av
    import diffusers
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "av": av.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": len(os.sched_getaffinity(0)),
            "shm_free_gib": round(shutil.disk_usage("/dev/shm").free / 2**30, 2) if os.path.isdir("/dev/shm") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def spec_for(work: Path, model: Path, cache_dir: str, *, batch: int = 1, compress: bool = False, frames: int = 81,
             resolution: int = 480, channels_last: bool = True, compile_mode: str = "auto", lanes: int = 2,
             fused_ops: bool = True):
    from job.spec import validate_data

    data = {
        "name": "bench-cache", "workspace": str(work),
        "model": {"pretrained_model_name_or_path": str(model)},
        "data": {"datasets": [{"id": "bench", "source": "clips", "resolution": resolution, "resolution_type": "pixel_area",
                               "cache_dir_vae": cache_dir, "video": {"num_frames": frames}}],
                 "vae_batch_size": batch, "cache_dtype": "bf16", "vae_latent_mode": "sample", "framerate": 16,
                 "compress_disk_cache": compress, "vae_channels_last": channels_last, "vae_compile": compile_mode,
                 "vae_concurrent_batches": lanes, "vae_fused_ops": fused_ops},
        "train": {"max_train_steps": 1, "train_batch_size": 1},
        "validation": {"enabled": False},
    }
    return validate_data(data, "<bench>", env={}).spec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for the timed runs; later variants are skipped past it")
    parser.add_argument("--workers", type=int, default=None, help="decode workers of ours (default: the phase's own choice)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny VAE, small clips: check the script on a CPU")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    parser.add_argument("--variants", default="b1,b1-compile,b2",
                        help="comma-separated, of: b1, b1-one-lane, b1-compile, b2, b1-ncdhw, b1-cudnn-autotune, b1-compressed, "
                        "b1-unfused")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - {"b1", "b1-one-lane", "b1-compile", "b2", "b1-ncdhw", "b1-cudnn-autotune", "b1-compressed",
                                                "b1-unfused"}
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")

    import torch
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file

    import job.cache.phase as phase
    import job.models.sanavideo.loading as loading
    from job.cache import compression
    from job.data import load_sample, plan_dataset
    from job.models.sanavideo.latents import normalize_latents
    from job.workspace import Workspace

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --tiny --device cpu for a dry run)")
        return 3
    info = versions()
    print(json.dumps(info))
    t_start = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="cache-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    # -- material ---------------------------------------------------------------------------
    w, h, seconds, frames, resolution = (SRC_W, SRC_H, SRC_SECONDS, 81, 480) if not args.tiny else (156, 90, 1.5, 9, 64)
    clips = work / "clips"
    clips.mkdir(exist_ok=True)
    jobs = [(clips / f"clip_{i:03d}.mp4", w, h, SRC_FPS, seconds, i) for i in range(args.clips)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        list(pool.map(make_clip, jobs))
    print(f"wrote {len(jobs)} clips {w}x{h} @ {SRC_FPS} fps in {time.perf_counter() - t0:.1f} s")

    model = work / "model"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if args.tiny:
        from job.models.sanavideo.tiny import TINY_VAE_CONFIG

        vae_cpu = AutoencoderKLWan(**{**TINY_VAE_CONFIG, "z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16})
    else:
        vae_cpu = AutoencoderKLWan()  # the Wan 2.1 VAE (SANA-Video's): z_dim 16, base_dim 96
    assert vae_cpu.config.z_dim == 16
    vae_cpu.save_pretrained(model / "vae")
    del vae_cpu
    print(f"wrote a random-weight Wan VAE in {time.perf_counter() - t0:.1f} s")

    spec = spec_for(work, model, "cache/vae/plain-unused", frames=frames, resolution=resolution)
    ws = Workspace.for_spec(spec)
    samples = plan_dataset(spec, ws, show=False).samples
    buckets = sorted({s.bucket for s in samples})
    print(f"planned {len(samples)} samples, buckets {buckets}")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def steady(done: list[float], skip: int = 2) -> float:
        """Clips/s between the completion of clip `skip` and the last one (no load, warm-up or pipeline fill)."""
        skip = min(skip, len(done) - 2)
        return (len(done) - 1 - skip) / max(done[-1] - done[skip], 1e-9) if len(done) >= 2 else float("nan")

    class Recorder(phase._Progress):
        def __init__(self):
            super().__init__(False)
            self.done: list[float] = []

        def advance(self, name, n=1):
            super().advance(name, n)
            self.done.extend([time.perf_counter()] * n)

    # -- plain loop -------------------------------------------------------------------------
    vae = AutoencoderKLWan.from_pretrained(model / "vae", dtype=torch.bfloat16).to(dev).eval()
    with torch.no_grad():  # warm-up: CUDA context, cuBLAS/cuDNN handles, first-call kernel loads
        vae.encode(load_sample(samples[0])[None].to(dev, torch.bfloat16)).latent_dist.mode()
    sync()
    plain_dir = work / "plain"
    plain_dir.mkdir(exist_ok=True)
    decode_s = encode_s = write_s = 0.0
    plain_done: list[float] = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i, s in enumerate(samples):
        a = time.perf_counter()
        video = load_sample(s)
        b = time.perf_counter()
        with torch.no_grad():
            dist = vae.encode(video[None].to(dev, torch.bfloat16)).latent_dist
            generator = torch.Generator(device=dev).manual_seed(phase.sample_seed(s))
            latents = normalize_latents(dist.sample(generator), vae.config)[0].to(torch.bfloat16).cpu()
        c = time.perf_counter()
        save_file({"latents": latents}, str(plain_dir / f"{i:03d}.safetensors"))
        d = time.perf_counter()
        decode_s, encode_s, write_s = decode_s + b - a, encode_s + c - b, write_s + d - c
        plain_done.append(d)
    plain_s = time.perf_counter() - t0
    n = len(samples)
    plain = {"seconds": plain_s, "clips_per_s": n / plain_s, "steady_clips_per_s": steady(plain_done),
             "decode_s_per_clip": decode_s / n,
             "encode_s_per_clip": encode_s / n, "write_s_per_clip": write_s / n,
             "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}
    print("plain:", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in plain.items()}))
    del vae
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # -- ours -------------------------------------------------------------------------------
    load_seconds: list[float] = []
    original_load = loading.load_components

    def timed_load(*a, **k):
        t = time.perf_counter()
        out = original_load(*a, **k)
        load_seconds.append(time.perf_counter() - t)
        return out

    loading.load_components = timed_load

    def run_ours(name: str, *, batch: int = 1, compress: bool = False, cudnn_benchmark: bool = phase.CUDNN_BENCHMARK,
                 channels_last: bool = True, compile_mode: str = "auto", lanes: int = 2, fused_ops: bool = True) -> dict:
        spec_v = spec_for(work, model, f"cache/vae/{name}", batch=batch, compress=compress, frames=frames,
                          resolution=resolution, channels_last=channels_last, compile_mode=compile_mode, lanes=lanes,
                          fused_ops=fused_ops)
        ws_v = Workspace.for_spec(spec_v)
        plan_v = plan_dataset(spec_v, ws_v, show=False)
        result = phase.CacheResult(device=str(dev))
        phase.CUDNN_BENCHMARK = cudnn_benchmark
        load_seconds.clear()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        recorder = Recorder()
        phase._cache_latents(spec_v, ws_v, plan_v, dev, result, recorder, False,
                             phase.default_num_workers() if args.workers is None else args.workers)
        sync()
        total = time.perf_counter() - t
        assert result.latents.cached == n and result.latents.failed == 0, result.latents
        folder = ws_v.latent_cache_dir(spec_v.data.datasets[0])
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        load = sum(load_seconds)
        out = {"seconds": total, "clips_per_s": n / total, "vae_load_s": load, "steady_clips_per_s": steady(recorder.done),
               "speedup_vs_plain": plain_s / total, "bytes_on_disk": size, "folder": str(folder),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
               "batch": batch, "compress": compress, "cudnn_benchmark": cudnn_benchmark,
               "channels_last": channels_last, "vae_compile": compile_mode, "vae_concurrent_batches": lanes,
               "vae_fused_ops": fused_ops}
        print(f"ours[{name}]:", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
        return out

    variants = {}
    budget_end = time.perf_counter() + args.budget
    known = {"b1": {}, "b1-one-lane": {"lanes": 1}, "b1-compile": {"compile_mode": "always"}, "b2": {"batch": 2},
             "b1-ncdhw": {"channels_last": False, "compile_mode": "never"},
             "b1-cudnn-autotune": {"cudnn_benchmark": True}, "b1-compressed": {"compress": True},
             "b1-unfused": {"fused_ops": False}}
    plan_variants = [(name, known[name]) for name in args.variants.split(",")]
    for name, kw in plan_variants:
        if variants and time.perf_counter() + plain_s > budget_end:
            print(f"skipping ours[{name}]: past the time budget")
            continue
        try:
            variants[name] = run_ours(name, **kw)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            variants[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"ours[{name}] failed: {exc}")

    # -- numerics ---------------------------------------------------------------------------
    numerics = {}
    for name, v in variants.items():
        if "folder" not in v:
            continue
        rels, maxabs = [], 0.0
        for i, s in enumerate(samples):
            ref = compression.load(plain_dir / f"{i:03d}.safetensors")[0]["latents"].float()
            got = phase.fmt.read_sample(Path(v["folder"]), phase.latent_sample_key(s)).latents.float()
            assert got.shape == ref.shape, (got.shape, ref.shape)
            rels.append(float((got - ref).norm() / ref.norm()))
            maxabs = max(maxabs, float((got - ref).abs().max()))
        numerics[name] = {"rel_max": max(rels), "rel_mean": sum(rels) / len(rels), "max_abs": maxabs,
                          "shape": list(got.shape), "ok": max(rels) <= 2e-2}
    report = {"info": info, "clips": n, "source": f"{w}x{h}@{SRC_FPS}fps {seconds}s H.264", "buckets": buckets,
              "plain": plain, "ours": variants, "numerics_vs_plain": numerics,
              "total_script_s": time.perf_counter() - t_start}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))

    print()
    print(f"{info.get('gpu', dev.type)} | torch {info['torch']} | diffusers {info['diffusers']} | av {info['av']} | {info['date']}")
    print(f"{n} clips {buckets}, bf16 VAE, latents bf16 (sample mode)")
    print("clips/s: whole run (ours: including its VAE load); steady: from the 3rd finished clip to the last")
    print(f"{'path':26} {'clips/s':>8} {'steady':>8} {'x plain':>8} {'peak GiB':>9} {'rel err':>9}")
    print(f"{'plain loop':26} {plain['clips_per_s']:8.3f} {plain['steady_clips_per_s']:8.3f} {1.0:8.2f} "
          f"{plain['peak_gib'] or 0:9.1f} {'ref':>9}")
    for name, v in variants.items():
        if "error" in v:
            print(f"{'ours ' + name:26} failed: {v['error']}")
            continue
        rel = numerics.get(name, {}).get("rel_max", float("nan"))
        print(f"{'ours ' + name:26} {v['clips_per_s']:8.3f} {v['steady_clips_per_s']:8.3f} {v['speedup_vs_plain']:8.2f} "
              f"{v['peak_gib'] or 0:9.1f} {rel:9.2e}")
    print(f"plain per clip: decode {plain['decode_s_per_clip']:.3f} s, encode {plain['encode_s_per_clip']:.3f} s, "
          f"write {plain['write_s_per_clip']:.3f} s")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
