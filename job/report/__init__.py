"""Console output and the JSON event log.

Phases log with the standard library (`logging.getLogger("trainer.<phase>")`)
and report structured events with `event(name, **fields)`. `setup_logging`
sends both to the rich console and, once a workspace exists, to
`<workspace>/logs/events.jsonl` so a headless container can be followed.
Secrets never reach either: see `job.spec.redact`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("trainer")

_json_lock = threading.Lock()
_json_path: Path | None = None
_secret_values: set[str] = set()
_listeners: list[Callable[[str, dict[str, Any]], None]] = []


def register_secrets(values: list[str]) -> None:
    """Values (tokens, keys, webhook URLs) that must never be written anywhere."""
    _secret_values.update(v for v in values if v and len(v) >= 4)


def scrub(text: str) -> str:
    for value in _secret_values:
        if value in text:
            text = text.replace(value, "***")
    return text


class _JsonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _write_json({"event": "log", "level": record.levelname.lower(),
                     "logger": record.name, "message": record.getMessage()})


def _write_json(payload: dict[str, Any]) -> None:
    if _json_path is None:
        return
    payload = {"time": round(time.time(), 3), **payload}
    line = scrub(json.dumps(payload, default=str, ensure_ascii=False))
    with _json_lock:
        with open(_json_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if any(isinstance(h, RichHandler) for h in log.handlers):
        log.setLevel(level)
        return
    handler = RichHandler(console=console, show_path=False, show_time=False,
                          rich_tracebacks=False, markup=False)
    handler.addFilter(_ScrubFilter())
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        return True


def attach_json_log(path: Path) -> None:
    """Start appending events and log lines to `path` (JSON lines)."""
    global _json_path
    path.parent.mkdir(parents=True, exist_ok=True)
    _json_path = path
    if not any(isinstance(h, _JsonLogHandler) for h in log.handlers):
        handler = _JsonLogHandler()
        handler.addFilter(_ScrubFilter())
        log.addHandler(handler)


def event(name: str, **fields: Any) -> None:
    """A structured event (phase started, checkpoint saved, ...) for the JSON log and its listeners."""
    _write_json({"event": name, **fields})
    for listener in list(_listeners):
        try:
            listener(name, fields)
        except Exception as exc:  # reporting never breaks the job
            log.debug("event listener failed on %s: %s", name, exc)


def subscribe(listener: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
    """Call `listener(name, fields)` on every later `event()`, from whichever thread emits it
    (background uploads too). Returns the function that unsubscribes it."""
    _listeners.append(listener)

    def unsubscribe() -> None:
        if listener in _listeners:
            _listeners.remove(listener)

    return unsubscribe


def is_interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI") != "true"
