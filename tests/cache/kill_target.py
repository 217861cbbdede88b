"""Run the cache phase slowly, so that a test can SIGKILL it mid-run.

    python kill_target.py SPEC_JSON PAUSE_SECONDS

Every cache file write is followed by a pause of PAUSE_SECONDS (in the writer thread), which
leaves the run in the middle of a stage for a while after each file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import cache_helpers as helpers  # noqa: E402

import job.cache.compression as compression  # noqa: E402


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text())
    pause = float(sys.argv[2])
    original = compression.save

    def slow_save(*args, **kwargs):
        path = original(*args, **kwargs)
        print(f"wrote {path.name}", flush=True)
        time.sleep(pause)
        return path

    compression.save = slow_save
    from job.cache.phase import run_cache

    spec, ws = helpers.job(data)
    run_cache(spec, ws, device="cpu", num_workers=0, show=False)
    print("done", flush=True)


if __name__ == "__main__":
    main()
