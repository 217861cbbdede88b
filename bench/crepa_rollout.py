"""Cost of CREPA and scheduled sampling on a GPU, against the plain step in the same run.

    python bench/crepa_rollout.py [--out results.json]

Random weights, real shapes (nothing is downloaded): the 2B `SanaVideoTransformer3DModel()` in
bf16 with gradient checkpointing at 81x832x480 (21x60x104 latents, 32,760 tokens), and DINOv2
giant / small built from their published configs.

- cache phase: `job.train.crepa.encode_frames` on one 81-frame 832x480 clip (21 frames through
  the encoder), seconds and peak memory above the weights, vs the estimate's term;
- train phase: `job.train.step.compute_loss` + backward, plain vs CREPA (block 10) vs scheduled
  sampling with one rollout step for every sample (probability 1, max_rollout_steps 1), seconds
  and peak memory.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

GIANT = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, use_swiglu_ffn=True,
             image_size=518, patch_size=14)
SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=518, patch_size=14)
GIB = 2**30


def timed(fn, repeats: int = 3) -> tuple[float, float]:
    """(mean seconds after one warm-up, peak GiB allocated above the start)."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, (torch.cuda.max_memory_allocated() - base) / GIB


def bench_encoders(dev) -> dict:
    from transformers import Dinov2Config, Dinov2Model

    from job.preflight.estimate import cache_phase_bytes
    from job.train.crepa import encode_frames, feature_grid

    frames = torch.randint(0, 256, (1, 81, 480, 832, 3), dtype=torch.uint8).pin_memory()
    out = {}
    for name, config, size in (("dinov2_vitg14", GIANT, 518), ("dinov2_vits14", SMALL, 224)):
        torch.manual_seed(0)
        encoder = Dinov2Model(Dinov2Config(**config)).to(dev, torch.bfloat16).eval()
        weights = sum(p.numel() for p in encoder.parameters())
        seconds, peak = timed(lambda: encode_frames(encoder, frames, size, 4, feature_grid(60, 104)))
        est = cache_phase_bytes(81, 832 * 480, crepa_encoder=name, crepa_image_size=size)["crepa_encoder_forward"] / GIB
        out[name] = dict(image_size=size, params=weights, seconds_per_clip=round(seconds, 3), forward_peak_gib=round(peak, 3),
                         estimate_forward_gib=round(est, 3))
        print(name, out[name], flush=True)
        del encoder
        torch.cuda.empty_cache()
    return out


def bench_steps(dev) -> dict:
    from diffusers import SanaVideoTransformer3DModel

    from job.models.sanavideo.objective import FlowMatchingObjective
    from job.spec.train import CrepaSpec, ScheduledSamplingSpec, TimestepSpec
    from job.train.crepa import CrepaRegularizer
    from job.train.step import compute_loss

    torch.manual_seed(0)
    model = SanaVideoTransformer3DModel().to(dev, torch.bfloat16)
    model.enable_gradient_checkpointing()
    model.train()
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 300, dtype=torch.int64)
    mask[:, :120] = 1
    batch = {"latents": torch.randn(1, 16, 21, 60, 104, generator=g).bfloat16(), "prompt_embeds": torch.randn(1, 300, 2304, generator=g),
             "prompt_attention_mask": mask, "mask": None, "crepa_features": torch.randn(1, 21, 5, 8, 1536, generator=g)}

    def session(crepa: bool, rollout: float):
        train = SimpleNamespace(caption_dropout_probability=0.0, masked_loss=False,
                                scheduled_sampling=ScheduledSamplingSpec(probability=rollout, max_rollout_steps=1))
        s = SimpleNamespace(spec=SimpleNamespace(train=train), accelerator=SimpleNamespace(device=dev), world=1, rank=0,
                            generator=torch.Generator().manual_seed(1), empty_prompt=None, weight_dtype=torch.bfloat16,
                            transformer=model, model=model, objective=FlowMatchingObjective(TimestepSpec()), crepa=None)
        if crepa:
            s.crepa = CrepaRegularizer(CrepaSpec(enabled=True), model, 1536, dev)
        return s

    out = {}
    for name, crepa, rollout in (("plain", False, 0.0), ("crepa", True, 0.0), ("rollout_1_step", False, 1.0)):
        s = session(crepa, rollout)

        def step():
            compute_loss(s, batch).backward()
            for p in model.parameters():
                p.grad = None
            if s.crepa is not None:
                for p in s.crepa.parameters():
                    p.grad = None

        seconds, peak = timed(step)
        out[name] = dict(seconds=round(seconds, 3), peak_gib=round(peak, 3))
        if crepa:
            out[name]["projector_params"] = sum(p.numel() for p in s.crepa.parameters())
            for h in list(model.transformer_blocks[10]._forward_hooks):
                del model.transformer_blocks[10]._forward_hooks[h]
        print(name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "encoders": bench_encoders(dev),
              "steps": bench_steps(dev)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
