"""`trainer` exactly as the container runs it, plus one fault injected at an exact point.

    python tests/e2e/fault_runner.py --on EVENT[~TEXT] --do ACTION -- run SPEC

The job runs in this process through `job.cli.main` (the console entry point). The first time the
job writes a line to its JSON event log (`logs/events.jsonl`) whose `event` is EVENT (and, with
`~TEXT`, whose line contains TEXT), ACTION happens, right there, before the line is written:

    kill             SIGKILL this process (a crash, an OOM kill, a pulled plug)
    term             SIGTERM this process (preemption; the job keeps running until it reacts)
    break:PATH       overwrite the file PATH with bytes no decoder reads (a clip going bad on disk)
    fill:PATH        write PATH until its volume is full (another process filling the disk)

Why in-process: the smoke job's steps take milliseconds, so a test that polls the log from outside
and then kills would land anywhere. Hooking the log writer puts the fault at the same point on every
run, on any machine, and the product code runs unchanged (nothing is read from the environment).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _act(action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action.startswith("break:"):
        path = Path(action.removeprefix("break:"))
        path.write_bytes(b"\x00not a video any more\x00" * 64)
    elif action.startswith("fill:"):
        chunk = b"\0" * (1 << 20)
        with open(action.removeprefix("fill:"), "wb", buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError:  # ENOSPC: the volume is full; what fitted stays
                pass
    else:
        raise SystemExit(f"fault_runner: unknown action {action!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--on", required=True, help="EVENT or EVENT~TEXT")
    parser.add_argument("--do", required=True, help="kill | term | break:PATH")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    name, _, text = options.on.partition("~")
    args = options.args[1:] if options.args[:1] == ["--"] else options.args

    import job.report as report

    original = report._write_json
    fired = False

    def write_json(payload: dict) -> None:
        nonlocal fired
        if not fired and payload.get("event") == name and (not text or text in repr(payload)):
            fired = True
            _act(options.do)
        original(payload)

    report._write_json = write_json
    from job.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
