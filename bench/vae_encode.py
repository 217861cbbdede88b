"""Microbenchmark: one `vae.encode` of an 81x832x480 clip with the Wan 2.1 VAE in bf16, several layouts.

    PYTHONUNBUFFERED=1 python3 bench/vae_encode.py --json $OUT/vae_encode.json --profile-dir $OUT
    python bench/vae_encode.py --tiny --device cpu          # check the script on a CPU

Variants (each: one warm-up encode, then `--repeats` timed ones, CUDA events, median):
  base            NCDHW weights and input, cudnn.benchmark off (the cache phase before issue #6)
  base-autotune   the same with cudnn.benchmark on
  cl              weights + input channels-last (`job.cache.vae_speed`), cudnn.benchmark off
  cl-autotune     channels-last with cudnn.benchmark on
  compile         `torch.compile(vae.encoder)` (NCDHW; inductor may change conv layouts itself)
  cl-compile      channels-last + compile
  cl-fused        channels-last + `data.vae_fused_ops` (job.models.sanavideo.vae_kernels: one Triton pass per
                  RMS norm + SiLU, padding inside the convolutions), eager: the cache phase's default
With `--decode`: the same for `vae.decode` of the clip's latents in float32 (validation's VAE dtype),
variants dec-base (NCDHW), dec-cl, dec-cl-fused; numerics vs dec-base.
For compile: the first call's time (compilation), graph count and graph breaks (dynamo counters).
Numerics: the latent mode of each variant vs `base`: ||a - b|| / ||b|| and max |a - b| / max |b|;
with `--fp32-ref` also vs an fp32 encode (how far bf16 itself is from the exact result).
Profiles (torch.profiler, one encode, top kernels by self device time) of base and cl are written
to `--profile-dir`. The JSON is rewritten after every variant, so a run cut short keeps what it got.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile-dir", type=Path, default=None)
    parser.add_argument("--compile-budget", type=float, default=200.0,
                        help="skip the second compile variant if the first one's compile took longer than this")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--decode", action="store_true", help="also time float32 decodes (dec-base, dec-cl, dec-cl-fused)")
    parser.add_argument("--fp32-ref", action="store_true",
                        help="also compare every variant with an fp32 encode (NCDHW, TF32 off) of the same input")
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKLWan

    from job.cache.vae_speed import channels_last_input, to_channels_last

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 3
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.tiny:
        from job.models.sanavideo.tiny import TINY_VAE_CONFIG

        cpu_vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
        frames, height, width = 9, 64, 96
    else:
        cpu_vae = AutoencoderKLWan()
        frames, height, width = 81, 480, 832
    state = {k: v.clone() for k, v in cpu_vae.state_dict().items()}
    config = dict(cpu_vae.config)
    # a smooth moving pattern (not zeros, not white noise): a low-res random field upsampled
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(1, 3, frames, height // 16, width // 16, generator=g) * 2 - 1
    video = torch.nn.functional.interpolate(coarse, size=(frames, height, width), mode="trilinear").clamp(-1, 1)
    video = video.to(dev, dtype)
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
            "cudnn": torch.backends.cudnn.version(), "shape": list(video.shape), "dtype": str(dtype)}
    print(json.dumps(info))
    report: dict = {"info": info, "variants": {}}

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def fresh_vae(channels_last: bool, fused: bool = False, vae_dtype=None):
        vae = AutoencoderKLWan.from_config(config)
        vae.load_state_dict(state)
        vae = vae.to(dev, vae_dtype or dtype).eval()
        if fused:
            from job.models.sanavideo.vae_kernels import use_fused_vae_ops

            use_fused_vae_ops(vae)
        return to_channels_last(vae) if channels_last else vae

    def encode(vae, x):
        with torch.no_grad():
            return vae.encode(x).latent_dist.mode()

    def timed(vae, x) -> tuple[float, torch.Tensor]:
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = encode(vae, x)
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1000.0, out
        t = time.perf_counter()
        out = encode(vae, x)
        return time.perf_counter() - t, out

    def profile(vae, x, name):
        if args.profile_dir is None:
            return
        from torch.profiler import ProfilerActivity, profile as prof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with prof(activities=acts) as p:
            encode(vae, x)
            sync()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        try:
            table = p.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=90)
        except Exception:  # noqa: BLE001 - newer torch names it "device"
            table = p.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=90)
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        (args.profile_dir / f"profile_{name}.txt").write_text(table)
        print(f"--- profile {name} (top rows)\n" + "\n".join(table.splitlines()[:18]))

    variants = [("base", False, False, False), ("cl", True, False, False), ("cl-fused", True, False, False),
                ("base-autotune", False, True, False), ("cl-autotune", True, True, False),
                ("cl-compile", True, False, True), ("compile", False, False, True)]
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v[0] in keep]
    ref = None
    ref_cl = None
    ref32 = None
    if args.fp32_ref:
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        vae32 = AutoencoderKLWan.from_config(config)
        vae32.load_state_dict(state)
        vae32 = vae32.to(dev, torch.float32).eval()
        t = time.perf_counter()
        ref32 = encode(vae32, video.float()).float()
        sync()
        torch.backends.cudnn.allow_tf32 = tf32
        report["fp32_ref_s"] = time.perf_counter() - t
        print(f"fp32 reference encode: {report['fp32_ref_s']:.2f} s")
        del vae32
    compile_cost = 0.0
    for name, cl, autotune, compiled in variants:
        if compiled and compile_cost > args.compile_budget:
            print(f"skipping {name}: the first compile took {compile_cost:.0f} s")
            continue
        entry: dict = {"channels_last": cl, "cudnn_benchmark": autotune, "compile": compiled}
        report["variants"][name] = entry
        try:
            torch.backends.cudnn.benchmark = autotune
            vae = fresh_vae(cl, fused=name.endswith("-fused"))
            x = channels_last_input(video) if cl else video
            if compiled:
                import torch._dynamo

                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                vae.encoder = torch.compile(vae.encoder)
            sync()
            t = time.perf_counter()
            first = encode(vae, x)
            sync()
            entry["first_call_s"] = time.perf_counter() - t
            if compiled:
                compile_cost = entry["first_call_s"]
                c = torch._dynamo.utils.counters
                entry["graph_breaks"] = {str(k): v for k, v in c["graph_break"].items()}
                entry["unique_graphs"] = c["stats"].get("unique_graphs")
                entry["frames_ok"] = c["frames"].get("ok")
                # a second call: chunk shapes that only appear from the 2nd clip on would recompile here
                t = time.perf_counter()
                encode(vae, x)
                sync()
                entry["second_call_s"] = time.perf_counter() - t
                entry["unique_graphs_after_2"] = c["stats"].get("unique_graphs")
            times = []
            out = first
            for _ in range(args.repeats):
                s, out = timed(vae, x)
                times.append(s)
            entry["times_s"] = times
            entry["median_s"] = statistics.median(times)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                encode(vae, x)
                entry["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out = out.float()
            if not torch.isfinite(out).all():
                entry["nonfinite"] = True
            if ref is None:
                ref = out
            if name == "cl":
                ref_cl = out
            if name.endswith("-fused") and ref_cl is not None:
                entry["max_abs_diff_vs_cl"] = float((out - ref_cl).abs().max())
                entry["frac_elements_differing_vs_cl"] = float((out != ref_cl).float().mean())
            entry["rel_err_vs_base"] = float((out - ref).norm() / ref.norm())
            entry["max_abs_rel_vs_base"] = float((out - ref).abs().max() / ref.abs().max())
            entry["out_contiguous"] = out.is_contiguous()
            if ref32 is not None:
                entry["rel_err_vs_fp32"] = float((out - ref32).norm() / ref32.norm())
                entry["max_abs_rel_vs_fp32"] = float((out - ref32).abs().max() / ref32.abs().max())
            if name in ("base", "cl", "cl-fused"):
                profile(vae, x, name)
            print(f"{name}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()
                                             if k != "times_s"}))
            del vae, out, first
        except Exception as exc:  # noqa: BLE001 - report and go on
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            print(f"{name} failed: {entry['error']}")
        finally:
            torch.backends.cudnn.benchmark = False
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        save()

    if args.decode and ref is not None:
        dec_ref = None
        for name, cl, fused in (("dec-base", False, False), ("dec-cl", True, False), ("dec-cl-fused", True, True)):
            entry = {"decode": True, "channels_last": cl, "fused": fused, "dtype": "float32"}
            report["variants"][name] = entry
            try:
                vae = fresh_vae(cl, fused=fused, vae_dtype=torch.float32)
                z = ref.to(dev, torch.float32)
                z = channels_last_input(z) if cl else z.contiguous()
                times = []
                for i in range(1 + max(2, args.repeats // 2)):
                    sync()
                    t = time.perf_counter()
                    with torch.no_grad():
                        out = vae.decode(z).sample
                    sync()
                    times.append(time.perf_counter() - t)
                entry["first_call_s"] = times[0]
                entry["times_s"] = times[1:]
                entry["median_s"] = statistics.median(times[1:])
                out = out.float()
                dec_ref = out if dec_ref is None else dec_ref
                entry["rel_err_vs_base"] = float((out - dec_ref).norm() / dec_ref.norm())
                entry["max_abs_rel_vs_base"] = float((out - dec_ref).abs().max() / dec_ref.abs().max())
                if dev.type == "cuda":
                    entry["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    torch.cuda.reset_peak_memory_stats()
                print(f"{name}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                 for k, v in entry.items() if k != "times_s"}))
                del vae, out
            except Exception as exc:  # noqa: BLE001 - report and go on
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
                print(f"{name} failed: {entry['error']}")
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            save()

    print(f"\n{info['device']} | torch {info['torch']} | cudnn {info['cudnn']} | {tuple(video.shape)} {dtype}")
    print(f"{'variant':16} {'median s':>9} {'first s':>9} {'peak GiB':>9} {'rel err':>9} {'maxrel':>9} {'vs fp32':>9}")
    base_t = report["variants"].get("base", {}).get("median_s")
    for name, e in report["variants"].items():
        if "error" in e:
            print(f"{name:16} failed: {e['error'][:150]}")
            continue
        print(f"{name:16} {e['median_s']:9.3f} {e['first_call_s']:9.2f} {e.get('peak_gib') or 0:9.2f} "
              f"{e['rel_err_vs_base']:9.2e} {e['max_abs_rel_vs_base']:9.2e} {e.get('rel_err_vs_fp32', float('nan')):9.2e}"
              + (f"  x{base_t / e['median_s']:.2f}" if base_t else ""))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
