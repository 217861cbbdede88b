"""Everything a finished job leaves behind is usable outside trainer: the final model loads into
diffusers' `SanaVideoPipeline` and renders, a LoRA loads through `load_lora_weights`, the validation
videos decode, and the logs are valid JSON lines. (Remote copies, the model card and the HTML index
on the store are tested with the upload phase.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml

from tests.e2e.smoke_job import ROOT, trainer_run

PROMPT = "a red square moving to the right"


def run_job(workspace: Path, spec: Path) -> None:
    result = trainer_run(workspace, spec)
    assert result.returncode == 0, result.stdout + result.stderr


def render(pipe) -> np.ndarray:
    out = pipe(prompt=PROMPT, height=64, width=64, frames=9, num_inference_steps=2, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), output_type="np", use_resolution_binning=False)
    return np.asarray(out.frames)


def check_videos_and_logs(workspace: Path) -> None:
    videos = sorted((workspace / "output" / "validation").rglob("*.mp4"))
    assert videos, "no validation video"
    for video in videos:
        with av.open(str(video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 9 and frames[0].shape == (64, 64, 3), (video, len(frames))
        assert np.ptp(np.stack(frames)) > 0  # not a blank render
    for log in (workspace / "logs").glob("*.jsonl"):
        lines = log.read_text(encoding="utf-8").splitlines()
        assert lines and all(isinstance(json.loads(line), dict) for line in lines), log
    assert (workspace / "logs" / "events.jsonl").is_file()


def test_full_fine_tune_loads_into_sana_video_pipeline_and_renders(undisturbed_run):
    from diffusers import SanaVideoPipeline, SanaVideoTransformer3DModel

    model_dir = undisturbed_run / "models" / "tiny-sanavideo"
    final = undisturbed_run / "output" / "final"
    transformer = SanaVideoTransformer3DModel.from_pretrained(final / "transformer")
    pipe = SanaVideoPipeline.from_pretrained(model_dir, transformer=transformer)
    frames = render(pipe)
    assert frames.shape == (1, 9, 64, 64, 3) and np.isfinite(frames).all()
    base = render(SanaVideoPipeline.from_pretrained(model_dir))
    assert not np.allclose(frames, base), "the fine-tuned model renders exactly what the base model does"
    summary = json.loads((final / "training_summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 6
    check_videos_and_logs(undisturbed_run)


@pytest.mark.slow
def test_lora_loads_through_load_lora_weights_and_renders(tmp_path, smoke_template):
    from diffusers import SanaVideoPipeline

    workspace = tmp_path / "ws"
    shutil.copytree(smoke_template, workspace, symlinks=True)
    model_dir = workspace / "models" / "tiny-sanavideo"
    spec = yaml.safe_load((ROOT / "specs" / "smoke-cpu.yaml").read_text())
    spec["model"]["type"] = "lora"
    spec["model"]["lora"] = {"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    spec["train"]["learning_rate"] = 2e-2
    spec_path = tmp_path / "lora.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    run_job(workspace, spec_path)
    final = workspace / "output" / "final"

    pipe = SanaVideoPipeline.from_pretrained(model_dir)
    base = render(pipe)
    pipe.load_lora_weights(final)
    frames = render(pipe)
    assert frames.shape == (1, 9, 64, 64, 3) and np.isfinite(frames).all()
    assert not np.allclose(frames, base), "the LoRA changed nothing"
    check_videos_and_logs(workspace)
