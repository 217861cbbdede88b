"""Finding the clips of a dataset folder.

- Extensions: mp4, mov, webm, mkv, avi, in any letter case.
- Recursive; symbolic links (files and folders) are followed, but a folder already visited
  (same device and inode, e.g. a link back to a parent) is not entered twice, so link loops
  cannot hang the scan. A link whose target is missing is reported as a problem.
- Names starting with '.' are skipped: `.quarantine/`, `.cache/` (Hub downloads) and macOS
  `._clip.mp4` resource forks are not clips.
- Relative paths use '/' and are returned sorted, so every run sees the same order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("trainer.data")

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".webm", ".mkv", ".avi"})
QUARANTINE_DIR = ".quarantine"


def is_video_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class FoundFile:
    """One clip on disk. `path` is as walked (through links), `relpath` is relative to the dataset folder."""

    path: Path
    relpath: str
    size: int
    mtime_ns: int

    @property
    def fingerprint(self) -> tuple[int, int]:
        return self.size, self.mtime_ns


@dataclass
class Discovery:
    files: list[FoundFile] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)  # relpaths of video-named links with no target
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (relpath, error) of folders/files we could not stat


def discover_videos(root: Path) -> Discovery:
    """Every clip under `root` (see the module doc)."""
    result = Discovery()
    visited: set[tuple[int, int]] = set()

    def walk(folder: Path, rel: str) -> None:
        try:
            st = folder.stat()
        except OSError as exc:
            result.unreadable.append((rel or ".", str(exc)))
            return
        ident = (st.st_dev, st.st_ino)
        if ident in visited:
            log.debug("not entering %s again (link loop or second link to a visited folder)", rel or ".")
            return
        visited.add(ident)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            result.unreadable.append((rel or ".", str(exc)))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=True):
                    walk(Path(entry.path), entry_rel)
                    continue
                if not is_video_name(entry.name):
                    continue
                if entry.is_symlink() and not os.path.exists(entry.path):
                    result.broken_links.append(entry_rel)
                    continue
                if not entry.is_file(follow_symlinks=True):
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                result.unreadable.append((entry_rel, str(exc)))
                continue
            result.files.append(FoundFile(Path(entry.path), entry_rel, st.st_size, st.st_mtime_ns))

    walk(Path(root), "")
    result.files.sort(key=lambda f: f.relpath)
    return result
