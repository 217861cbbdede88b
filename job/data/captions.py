"""Captions: where each clip's text comes from, and what happens when there is none.

Strategies (`caption_strategy`):
- `textfile`: `clip.mp4` + `clip.txt` in the same folder (the `.txt` extension in any case).
  Text that is not UTF-8 is decoded with replacement characters and reported, never fatal.
  Lines are joined with single spaces (a caption is one prompt).
- `filename`: the file name without extension, underscores -> spaces.
- `instance_prompt`: the dataset's `instance_prompt` for every clip.
- `captions_file`: a JSONL (`{"path": ..., "caption": ...}`, also `file_name` / `text`) or CSV
  (`path,caption`, with or without that header) file in the dataset folder. Paths are relative to
  the dataset folder; a bare file name matches when it is unique. Bad lines are reported.

A missing or empty caption is settled by `missing_captions` (skip with a report, or use
`instance_prompt`). `motion_score` appends SANA-Video's suffix: `caption.rstrip() + " motion score: N."`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from job.errors import InputError
from job.spec.data import VideoDataset

from .discovery import FoundFile


@dataclass(frozen=True)
class CaptionNote:
    """Something about captions the user should know (not fatal): bad encoding, bad lines."""

    path: str
    message: str


def read_text_tolerant(path: Path) -> tuple[str, bool]:
    """(text, was_valid_utf8). A UTF-8 BOM is dropped; invalid bytes become U+FFFD."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace").lstrip("\ufeff"), False


def clean_caption(text: str | None) -> str | None:
    if text is None:
        return None
    text = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return text or None


def with_motion_score(caption: str, score: int | None) -> str:
    """SANA-Video's motion-score suffix, appended exactly as `caption.rstrip() + " motion score: N."`."""
    return caption if score is None else caption.rstrip() + f" motion score: {score}."


def _norm_rel(path: str) -> str:
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return str(PurePosixPath(path)) if path else path


@dataclass
class CaptionSource:
    """Resolves the raw caption of each clip of one dataset."""

    ds: VideoDataset
    root: Path
    notes: list[CaptionNote] = field(default_factory=list)
    _mapping: dict[str, str] = field(default_factory=dict)
    _by_name: dict[str, list[str]] = field(default_factory=dict)
    _sidecars: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ds.caption_strategy == "captions_file":
            self._load_captions_file()

    # -- captions_file -----------------------------------------------------------------------
    def _load_captions_file(self) -> None:
        if not self.ds.captions_file:
            raise InputError(f"dataset {self.ds.id!r}: caption_strategy 'captions_file' needs captions_file",
                             "set captions_file: captions.jsonl (relative to the dataset folder)")
        path = self.root / self.ds.captions_file
        if not path.is_file():
            raise InputError(f"dataset {self.ds.id!r}: captions file {path} does not exist",
                             f"put {self.ds.captions_file} in {self.root}, or fix data.datasets[].captions_file")
        text, ok = read_text_tolerant(path)
        if not ok:
            self.notes.append(CaptionNote(self.ds.captions_file, "not valid UTF-8: decoded with replacement characters (U+FFFD)"))
        rows: list[tuple[int, str, str]] = []
        if path.suffix.lower() == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    key = next(obj[k] for k in ("path", "file_name", "file", "video") if k in obj)
                    caption = next((obj[k] for k in ("caption", "text", "prompt") if k in obj), None)
                except (ValueError, StopIteration, TypeError):
                    self.notes.append(CaptionNote(f"{self.ds.captions_file}:{number}", 'not a JSON object with "path" and "caption": line ignored'))
                    continue
                rows.append((number, str(key), "" if caption is None else str(caption)))
        else:
            reader = list(csv.reader(io.StringIO(text)))
            start = 0
            path_col, cap_col = 0, 1
            header = [c.strip().lower() for c in reader[0]] if reader else []
            if header and header[0] in ("path", "file_name", "file", "video"):
                cap_col = next((header.index(k) for k in ("caption", "text", "prompt") if k in header), 1)
                start = 1
            for number, row in enumerate(reader[start:], start=start + 1):
                if not row or not any(c.strip() for c in row):
                    continue
                if len(row) <= max(path_col, cap_col):
                    self.notes.append(CaptionNote(f"{self.ds.captions_file}:{number}", "fewer than 2 columns (path,caption): line ignored"))
                    continue
                rows.append((number, row[path_col], row[cap_col]))
        for number, key, caption in rows:
            rel = _norm_rel(key)
            if rel in self._mapping:
                self.notes.append(CaptionNote(f"{self.ds.captions_file}:{number}", f"{rel!r} appears again: the later caption wins"))
            self._mapping[rel] = caption
        by_name: dict[str, list[str]] = defaultdict(list)
        for rel in self._mapping:
            by_name[PurePosixPath(rel).name].append(rel)
        self._by_name = dict(by_name)

    # -- per clip ----------------------------------------------------------------------------
    def _sidecar(self, found: FoundFile) -> Path | None:
        folder = found.path.parent
        key = str(folder)
        if key not in self._sidecars:
            names: dict[str, str] = {}
            try:
                for name in sorted(os.listdir(folder)):
                    stem, ext = os.path.splitext(name)
                    if ext.lower() == ".txt":
                        names.setdefault(stem, name)  # `.TXT` sorts before `.txt`: either is fine
            except OSError:
                pass
            self._sidecars[key] = names
        stem = os.path.splitext(found.path.name)[0]
        name = self._sidecars[key].get(stem)
        return folder / name if name else None

    def raw_caption(self, found: FoundFile) -> str | None:
        """The clip's caption before the missing-caption policy and motion score; None if missing/empty."""
        strategy = self.ds.caption_strategy
        if strategy == "instance_prompt":
            return clean_caption(self.ds.instance_prompt)
        if strategy == "filename":
            return clean_caption(os.path.splitext(found.path.name)[0].replace("_", " "))
        if strategy == "captions_file":
            rel = _norm_rel(found.relpath)
            if rel in self._mapping:
                return clean_caption(self._mapping[rel])
            candidates = self._by_name.get(PurePosixPath(rel).name, [])
            if len(candidates) == 1 and "/" not in candidates[0]:
                return clean_caption(self._mapping[candidates[0]])
            return None
        # textfile
        sidecar = self._sidecar(found)
        if sidecar is None:
            return None
        try:
            text, ok = read_text_tolerant(sidecar)
        except OSError as exc:
            self.notes.append(CaptionNote(found.relpath, f"caption file unreadable: {exc}"))
            return None
        if not ok:
            self.notes.append(CaptionNote(found.relpath, f"{sidecar.name} is not valid UTF-8: decoded with replacement characters (U+FFFD)"))
        return clean_caption(text)

    def caption(self, found: FoundFile) -> str | None:
        """The final caption (policy + motion score applied), or None: skip the clip."""
        text = self.raw_caption(found)
        if text is None and self.ds.missing_captions == "instance_prompt":
            text = clean_caption(self.ds.instance_prompt)
        if text is None:
            return None
        return with_motion_score(text, self.ds.motion_score)
