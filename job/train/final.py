"""The final model folder, written once training completes (atomically, as a whole).

    final/
      transformer/                         full: loads with SanaVideoTransformer3DModel.from_pretrained
      pytorch_lora_weights.safetensors     lora: loads with SanaVideoPipeline.load_lora_weights(final/)
      no_ema/...                           with use_ema: the raw trained weights (the top level holds the EMA ones)
      spec.yaml                            the resolved spec, secrets redacted
      training_summary.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import job
from job.report import scrub
from job.spec import redacted_yaml
from job.workspace import fsync_dir

from .checkpoints import fsync_tree
from .model import save_weights

SUMMARY_NAME = "training_summary.json"


def read_summary(ws) -> dict[str, Any] | None:
    path = ws.final_dir / SUMMARY_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_final(session) -> Path:
    """Main process only. Returns the final folder."""
    s, ws = session, session.ws
    final = ws.final_dir
    tmp = final.parent / ".tmp-final"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if s.ema is not None:
        with s.ema.applied():
            save_weights(tmp, s.model, s.spec)
        save_weights(tmp / "no_ema", s.model, s.spec)
    else:
        save_weights(tmp, s.model, s.spec)
    (tmp / "spec.yaml").write_text(scrub(redacted_yaml(s.spec)))  # scrub: secrets the CLI registered from ${ENV}
    summary = {
        "status": "completed",
        "final_step": s.step,
        "total_steps": s.total_steps,
        "epochs": s.epoch + s.position / max(1, len(s.sampler)),
        "samples_seen": s.samples_seen,
        "last_loss": None if math.isnan(s.last_loss) else s.last_loss,
        "bad_steps_skipped": s.bad_total,
        "model_type": s.spec.model.type,
        "base_model": s.spec.model.pretrained_model_name_or_path,
        "weights": "pytorch_lora_weights.safetensors" if s.spec.model.type == "lora" else "transformer/",
        "ema": s.ema is not None,
        "num_processes": s.world,
        "spec_hash": s.spec_hash,
        "resumed_from": str(s.resumed_from) if s.resumed_from else None,
        "trainer_version": job.__version__,
        "time": round(time.time(), 3),
    }
    (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
    fsync_tree(tmp)
    old = final.parent / f".old-final-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final
