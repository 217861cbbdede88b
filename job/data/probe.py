"""Reading clip metadata once with PyAV, and the metadata cache that makes reruns free.

`probe_video(path)` opens a clip, reads its first video stream, decodes the first frame (so an
undecodable codec is caught here, not in the cache phase) and checks that the packets reach
the end the container announces (a cut-off download is caught here too). It never raises:
it returns a plain dict, either metadata or a problem, so it can run in worker processes.

The cache (`Workspace.metadata_cache(ds)`, JSON) is keyed by relative path and checked against
size + mtime, so a clip that changed is probed again and all others are not. Problems are cached
too (a broken file is not re-opened on every run; it is still reported every run).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from job.workspace import atomic_write_text

from .discovery import FoundFile

log = logging.getLogger("trainer.data")

#: Bump when the probe's output changes meaning: old cache entries are then probed again.
PROBE_VERSION = 1
#: Folders with at least this many clips to probe use worker processes.
PARALLEL_PROBE_MIN = 24
MAX_PROBE_WORKERS = 8


def _fail(reason: str, detail: str) -> dict[str, Any]:
    return {"ok": False, "reason": reason, "detail": detail}


def _rate(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0 and math.isfinite(float(rate)):
            return float(rate)
    return None


def probe_video(path: str) -> dict[str, Any]:
    """Metadata of one clip: {'ok': True, frames, fps, duration, width, height, codec, rotation,
    start_time} or {'ok': False, reason, detail}. Never raises for a bad file."""
    import av  # imported here: worker processes need nothing else

    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return _fail("unreadable", str(exc))
    if size == 0:
        return _fail("zero bytes", "the file is empty")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.InvalidDataError as exc:
        return _fail("not a readable video", f"FFmpeg cannot parse the container (truncated, or not a video): {exc.strerror or exc}")
    except (av.error.FFmpegError, OSError, UnicodeError) as exc:
        return _fail("unreadable", f"{type(exc).__name__}: {exc}")
    try:
        with container:
            videos = container.streams.video
            if not videos:
                kinds = ", ".join(s.type for s in container.streams) or "none"
                return _fail("no video stream", f"the file has no video stream (streams: {kinds})")
            stream = videos[0]
            if stream.codec_context is None:
                return _fail("unsupported codec", "this FFmpeg build has no decoder for the video stream's codec")
            codec = stream.codec_context.name
            fps = _rate(stream)
            if fps is None:
                return _fail("no frame rate", f"the {codec} stream has no usable frame rate")
            try:
                first = next(iter(container.decode(stream)), None)
            except av.error.DecoderNotFoundError:
                return _fail("unsupported codec", f"this FFmpeg build has no decoder for codec {codec!r}")
            except (av.error.FFmpegError, EOFError) as exc:
                return _fail("undecodable", f"the {codec} stream cannot be decoded (corrupt data?): {exc}")
            if first is None:
                return _fail("undecodable", f"no frame of the {codec} stream could be decoded")
            tb = float(stream.time_base) if stream.time_base else None
            t0 = float(first.time) if first.time is not None else 0.0
            width, height = first.width, first.height
            rotation = int(first.rotation or 0) if hasattr(first, "rotation") else 0
            frames = int(stream.frames or 0)
            end: float | None = None
            if stream.duration and tb:
                end = (float(stream.start_time or 0) + float(stream.duration)) * tb
            elif container.duration:
                end = t0 + container.duration / 1_000_000

            if frames <= 0:
                # mkv/webm do not store a frame count: count the packets (demux only, no decoding)
                container.seek(0, stream=stream, backward=True)
                frames, last_end = _count_packets(container, stream, fps)
                if frames <= 0:
                    return _fail("undecodable", "the video stream has no packets")
                end = last_end if last_end is not None else (end or t0 + frames / fps)
            else:
                announced = end if end is not None else t0 + frames / fps
                seek_to = max(t0, announced - 2.0)
                last_end = None
                if tb:
                    try:
                        container.seek(int(seek_to / tb), stream=stream, backward=True)
                        _, last_end = _count_packets(container, stream, fps)
                    except av.error.FFmpegError:
                        last_end = None
                if last_end is None:
                    return _fail("truncated", f"no video packets near the announced end ({announced:.2f} s)")
                if last_end < announced - max(2.0 / fps, 0.05):
                    return _fail("truncated", f"video data ends at {last_end - t0:.2f} s of the announced {announced - t0:.2f} s")
                end = announced
            duration = max(0.0, (end or t0 + frames / fps) - t0)
            return {
                "ok": True, "frames": frames, "fps": fps, "duration": round(duration, 6), "width": width,
                "height": height, "codec": codec, "rotation": rotation, "start_time": t0,
            }
    except (av.error.FFmpegError, OSError, EOFError) as exc:  # anything else FFmpeg throws; not bugs (ValueError & co)
        return _fail("undecodable", f"{type(exc).__name__}: {exc}")


def _count_packets(container, stream, fps: float) -> tuple[int, float | None]:
    """(packets, end time of the last packet) from the current position to the end of the stream."""
    count, last_end = 0, None
    tb = float(stream.time_base)
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        count += 1
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is not None:
            dur = packet.duration * tb if packet.duration else 1.0 / fps
            end = ts * tb + dur
            last_end = end if last_end is None else max(last_end, end)
    return count, last_end


class MetadataCache:
    """JSON cache of probe results: {relpath: {size, mtime_ns, result}}. Written atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("version") == PROBE_VERSION and isinstance(data.get("entries"), dict):
                    self.entries = data["entries"]
                else:
                    self.dirty = True
            except (OSError, ValueError) as exc:
                log.warning("metadata cache %s is unreadable (%s): probing again", self.path, exc)
                self.dirty = True

    def get(self, found: FoundFile) -> dict[str, Any] | None:
        entry = self.entries.get(found.relpath)
        if entry and entry.get("size") == found.size and entry.get("mtime_ns") == found.mtime_ns:
            return entry.get("result")
        return None

    def put(self, found: FoundFile, result: dict[str, Any]) -> None:
        self.entries[found.relpath] = {"size": found.size, "mtime_ns": found.mtime_ns, "result": result}
        self.dirty = True

    def mark_bad(self, relpath: str, reason: str, detail: str, stage: str = "decode") -> None:
        """A clip that failed later (at decode): remember it until the file changes."""
        entry = self.entries.get(relpath)
        if entry:
            entry["result"] = {**_fail(reason, detail), "stage": stage}
            self.dirty = True

    def prune(self, keep: set[str]) -> None:
        gone = set(self.entries) - keep
        for rel in gone:
            del self.entries[rel]
        self.dirty = self.dirty or bool(gone)

    def save(self) -> None:
        if self.dirty:
            atomic_write_text(self.path, json.dumps({"version": PROBE_VERSION, "entries": self.entries}, ensure_ascii=False, sort_keys=True))
            self.dirty = False


def _probe_by_path(path: str) -> dict[str, Any]:
    # resolved at call time, so tests can count calls by patching `probe_video`
    return probe_video(path)


def probe_many(files: Sequence[FoundFile], workers: int | None = None,
               on_done: Callable[[FoundFile, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Probe clips, in worker processes when there are many (`workers`: None = automatic, 0/1 = here)."""
    results: dict[str, dict[str, Any]] = {}
    if workers is None:
        workers = min(MAX_PROBE_WORKERS, os.cpu_count() or 1) if len(files) >= PARALLEL_PROBE_MIN else 1
    workers = max(1, min(workers, len(files) or 1))
    if workers <= 1:
        for found in files:
            results[found.relpath] = _probe_by_path(str(found.path))
            if on_done:
                on_done(found, results[found.relpath])
        return results
    # spawn: the parent may hold torch threads, which fork does not survive safely
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for found, result in zip(files, pool.map(probe_video, [str(f.path) for f in files], chunksize=4)):
            results[found.relpath] = result
            if on_done:
                on_done(found, result)
    return results
