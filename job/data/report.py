"""The data report: broken clips, skipped clips, caption notes and counts, as JSON and as a table.

Broken clips (zero bytes, truncated, undecodable, no video stream, unsupported codec, broken
link, or a decode failure in the cache phase) are *problems*: always reported, and moved to
`<dataset folder>/.quarantine/<relative path>` when `data.delete_problematic_videos` is on
(never deleted; each move is also logged in `.quarantine/quarantine.jsonl`). Skipped clips (too
short, too small, no caption) are fine files that this spec cannot use: reported, never moved.

The JSON report lives at `<workspace>/state/data_report.json` (`report_path(ws)`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from job.workspace import Workspace, atomic_write_text

from .discovery import QUARANTINE_DIR

log = logging.getLogger("trainer.data")

REPORT_VERSION = 1
QUARANTINE_LOG = "quarantine.jsonl"


def report_path(ws: Workspace) -> Path:
    return ws.state_dir / "data_report.json"


@dataclass
class Problem:
    """A broken clip."""

    dataset: str
    relpath: str
    reason: str  # short: "zero bytes", "truncated", "undecodable", "no video stream", ...
    detail: str
    stage: str = "probe"  # discovery | probe | decode
    quarantined_to: str | None = None
    quarantine_error: str | None = None


@dataclass
class Skip:
    """A good clip this spec cannot use."""

    dataset: str
    relpath: str
    why: str  # too_short | too_small | no_caption
    detail: str


@dataclass
class Note:
    """Not fatal, worth knowing (caption encoding, bad caption-file lines)."""

    dataset: str
    path: str
    message: str


@dataclass
class DataReport:
    problems: list[Problem] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    counts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def problems_for(self, dataset: str) -> list[Problem]:
        return [p for p in self.problems if p.dataset == dataset]

    def skipped_for(self, dataset: str, why: str | None = None) -> list[Skip]:
        return [s for s in self.skipped if s.dataset == dataset and (why is None or s.why == why)]

    def to_dict(self) -> dict[str, Any]:
        return {"version": REPORT_VERSION, "created": round(time.time(), 3), "counts": self.counts,
                "problems": [asdict(p) for p in self.problems], "skipped": [asdict(s) for s in self.skipped],
                "notes": [asdict(n) for n in self.notes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataReport":
        return cls(problems=[Problem(**p) for p in data.get("problems", [])], skipped=[Skip(**s) for s in data.get("skipped", [])],
                   notes=[Note(**n) for n in data.get("notes", [])], counts=dict(data.get("counts", {})))

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> "DataReport":
        if not path.exists():
            return cls()
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("data report %s is unreadable (%s): starting a new one", path, exc)
            return cls()

    # -- console -----------------------------------------------------------------------------
    def print_summary(self, console=None, max_rows: int = 20) -> None:
        from rich.table import Table

        if console is None:
            from job.report import console
        table = Table(title="datasets", show_lines=False)
        for col in ("dataset", "clips", "samples", "train", "held out", "buckets", "too short", "too small", "no caption", "broken"):
            table.add_column(col, justify="left" if col == "dataset" else "right")
        for ds, c in self.counts.items():
            buckets = c.get("buckets", {})
            table.add_row(ds, str(c.get("clips_found", 0)), str(c.get("samples", 0)), str(c.get("train_samples", 0)),
                          str(c.get("holdout_samples", 0)), ", ".join(f"{k}: {v}" for k, v in buckets.items()) or "-",
                          str(c.get("too_short", 0)), str(c.get("too_small", 0)), str(c.get("no_caption", 0)), str(c.get("problems", 0)))
        console.print(table)
        if self.problems:
            bad = Table(title=f"broken clips ({len(self.problems)})")
            for col in ("dataset", "file", "reason", "detail", "moved to"):
                bad.add_column(col, overflow="fold")
            for p in self.problems[:max_rows]:
                moved = p.quarantined_to or (f"not moved: {p.quarantine_error}" if p.quarantine_error else "-")
                bad.add_row(p.dataset, p.relpath, p.reason, p.detail, moved)
            if len(self.problems) > max_rows:
                bad.add_row("...", f"{len(self.problems) - max_rows} more in the JSON report", "", "", "")
            console.print(bad)
        if self.notes:  # caption-file lines ignored, encodings replaced, clips without a mask: on screen, not only in the JSON
            notes = Table(title=f"notes ({len(self.notes)})")
            for col in ("dataset", "where", "note"):
                notes.add_column(col, overflow="fold")
            for n in self.notes[:max_rows]:
                notes.add_row(n.dataset, n.path, n.message)
            if len(self.notes) > max_rows:
                notes.add_row("...", f"{len(self.notes) - max_rows} more in the JSON report", "")
            console.print(notes)


def quarantine(root: Path, relpath: str, reason: str, detail: str) -> Path:
    """Move `root/relpath` (and its `.txt` caption) to `root/.quarantine/relpath`; returns the new path.

    Never overwrites: an existing name gets a numbered suffix. Raises OSError if the move fails.
    """
    src = root / relpath
    dest = root / QUARANTINE_DIR / relpath
    dest.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while dest.exists() or dest.is_symlink():
        dest = dest.with_name(f"{Path(relpath).stem}.{n}{Path(relpath).suffix}")
        n += 1
    shutil.move(str(src), str(dest))  # a symlink is moved as a link, its target is untouched
    for sidecar in (src.with_suffix(".txt"), src.with_suffix(".TXT")):
        if sidecar.exists() and not any(sidecar.with_suffix(ext).exists() for ext in (".mp4", ".mov", ".webm", ".mkv", ".avi")):
            try:
                shutil.move(str(sidecar), str(dest.with_suffix(sidecar.suffix)))
            except OSError:
                pass
            break
    line = json.dumps({"time": round(time.time(), 3), "from": relpath, "to": os.path.relpath(dest, root / QUARANTINE_DIR),
                       "reason": reason, "detail": detail}, ensure_ascii=False)
    with open(root / QUARANTINE_DIR / QUARANTINE_LOG, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return dest


def apply_quarantine(problem: Problem, root: Path, enabled: bool) -> Problem:
    """Move the problem's file when `enabled`; records where it went (or why it could not move)."""
    if not enabled or problem.quarantined_to:
        return problem
    try:
        dest = quarantine(root, problem.relpath, problem.reason, problem.detail)
        problem.quarantined_to = str(dest)
        log.warning("moved broken clip %s to %s (%s)", problem.relpath, dest, problem.reason)
    except OSError as exc:
        problem.quarantine_error = str(exc)
        log.warning("could not move broken clip %s to %s: %s", problem.relpath, root / QUARANTINE_DIR, exc)
    return problem
