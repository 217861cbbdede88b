"""SIGKILL the cache phase mid-run, rerun it: the cache ends complete and consistent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cache_helpers import CLIPS, job
from test_cache_phase import TEXTS, cache, check_consistent, latent_dir

from job.cache import compression
from job.cache import format as fmt

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("kill_target.py")


def _count(folder: Path) -> int:
    return sum(1 for p in folder.glob("*.safetensors") if not p.name.startswith(".")) if folder.is_dir() else 0


@pytest.mark.parametrize("stage", ["text", "latents"])
def test_a_killed_run_resumes_complete_and_consistent(stage, job_dict, tmp_path):
    job_dict["data"]["vae_batch_size"] = 1
    job_dict["data"]["text_embeds"]["write_batch_size"] = 1
    job_dict["data"]["compress_disk_cache"] = stage == "latents"  # both writers
    spec, ws = job(job_dict)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(job_dict))
    folder = ws.text_cache_dir if stage == "text" else latent_dir(spec, ws)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(spec_file), "0.5"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    try:
        while _count(folder) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace")
                pytest.fail(f"the cache run ended or stalled before it was killed (rc {proc.returncode}):\n{out[-3000:]}")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    on_disk = _count(folder)
    assert on_disk < (TEXTS if stage == "text" else CLIPS), "the run finished before the kill"

    # what the killed run left: manifests parse, every file there is whole
    for manifest_dir in (ws.text_cache_dir, latent_dir(spec, ws)):
        if (manifest_dir / fmt.MANIFEST_NAME).exists():
            json.loads((manifest_dir / fmt.MANIFEST_NAME).read_text())
        for path in manifest_dir.glob("*.safetensors"):
            compression.load(path)
    # a write cut short leaves a temporary; the rerun removes it
    (folder / ".clip_x.safetensors.abc123.tmp").write_bytes(b"half a file")

    result = cache(spec, ws)
    assert result.failed == 0
    counts = result.text if stage == "text" else result.latents
    assert counts.skipped == on_disk  # nothing written before the kill is computed again
    assert (result.text.total, result.latents.total) == (TEXTS, CLIPS)
    assert len(check_consistent(spec, ws)) == CLIPS

    from job.cache.reader import CachedDataset

    if stage == "text":  # the plain reader reads an uncompressed cache end to end
        dataset = CachedDataset(ws, spec)
        assert len(dataset) == CLIPS and all(dataset[i]["latents"].shape[0] == 4 for i in range(CLIPS))
    assert cache(spec, ws).nothing_to_do
