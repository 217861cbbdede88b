"""Job events (and validation previews) sent to webhooks, without ever slowing training down.

    hooks = Webhooks(spec.webhooks)
    hooks.send("job_started", {"job": spec.name})
    hooks.send("preview", {"step": 200, "nickname": "cat"}, image_png=png_bytes)
    ...
    hooks.close(timeout=10)          # flush what is queued (at the end of the job)

- `send` only puts the message on a bounded queue and returns at once; one background thread
  posts it. When the queue is full (a slow or hanging endpoint) the message is dropped and
  counted: training never waits for a webhook.
- Each webhook gets only the events in its `events` list.
- `kind: json`: a POST of `{"event": ..., "time": ..., "job": ..., **payload}` as
  application/json; an image rides along base64-encoded in `image_png_base64`.
  `kind: discord`: Discord's execute-webhook format: `{"content": ...}` as JSON, or, with an
  image, multipart/form-data with a `payload_json` part and the PNG as `files[0]` (shown
  in an embed through `attachment://`).
- Failures (timeouts, connection refused, 4xx/5xx) are logged as warnings on
  `trainer.report` and never raised. Webhook URLs are secrets (a Discord URL carries its
  token): they are registered with `job.report.register_secrets`, and log lines name a webhook
  only by its position and kind, never by URL.

Only the standard library is used (urllib), so this works in the slimmest container.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from job.report import register_secrets, scrub
from job.spec.validation import WEBHOOK_EVENTS

log = logging.getLogger("trainer.report")

EVENTS = WEBHOOK_EVENTS  # job_started, phase_changed, validation_ready, checkpoint_saved, job_finished, job_failed, preview, + upload events

#: Events the webhooks pick up from the event log (`job.report.event`) rather than from an explicit
#: `send`: they are emitted deep inside the upload code, some on its background thread.
FROM_EVENT_LOG = frozenset({"checkpoint_uploaded", "upload_failed", "uploaded"})

DISCORD_CONTENT_LIMIT = 2000  # characters in a Discord message
USER_AGENT = "trainer-webhooks/1"  # Discord refuses requests without a User-Agent


@dataclass(frozen=True)
class _Hook:
    index: int  # 1-based position in `webhooks:` (how logs name it: the URL is secret)
    url: str
    kind: str  # "json" | "discord"
    events: frozenset[str]

    @property
    def label(self) -> str:
        return f"webhook {self.index} ({self.kind})"


@dataclass
class _Message:
    event: str
    payload: dict[str, Any]
    image_png: bytes | None
    time: float


_STOP = object()


class Webhooks:
    """Fire-and-forget delivery of job events to the spec's `webhooks:`.

    `specs` are `WebhookSpec`s (or any objects with `url` (str or SecretStr), `kind`, `events`).
    `queue_size` bounds the messages waiting; `timeout` is per HTTP request (seconds).
    """

    def __init__(
        self,
        specs: Iterable[Any] | None,
        *,
        job_name: str | None = None,
        queue_size: int = 64,
        timeout: float = 10.0,
    ):
        self._hooks: list[_Hook] = []
        for i, spec in enumerate(specs or (), start=1):
            url = spec.url.get_secret_value() if hasattr(spec.url, "get_secret_value") else str(spec.url)
            events = frozenset(getattr(spec, "events", None) or EVENTS)
            self._hooks.append(_Hook(i, url, getattr(spec, "kind", "json") or "json", events))
        register_secrets([h.url for h in self._hooks])
        self.job_name = job_name
        self.timeout = float(timeout)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.dropped = 0  # messages dropped because the queue was full
        self.sent = 0  # successful deliveries (one per webhook)
        self.failed = 0  # failed deliveries (one per webhook)

    # --- public API ---------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._hooks)

    def wants(self, event_name: str) -> bool:
        """Whether any webhook takes this event (skip building expensive payloads otherwise)."""
        return any(event_name in h.events for h in self._hooks)

    def send(self, event_name: str, payload: dict | None = None, image_png: bytes | None = None) -> bool:
        """Queue `event_name` for every webhook that takes it. Never blocks, never raises.

        Returns True if the message was queued (False: nobody wants it, closed, or queue full).
        """
        try:
            if self._closed or not self.wants(event_name):
                return False
            self._ensure_thread()
            message = _Message(event_name, dict(payload or {}), image_png, time.time())
            try:
                self._queue.put_nowait(message)
            except queue.Full:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 50 == 0:  # say it, without flooding the log
                    log.warning("webhook queue full: dropped a %s event (%d dropped so far); an endpoint is slow or hanging",
                                event_name, self.dropped)
                return False
            return True
        except Exception as exc:  # noqa: BLE001 - a webhook must never break the job
            log.warning("could not queue a %s webhook event: %s", event_name, scrub(str(exc)))
            return False

    def follow_event_log(self) -> Callable[[], None]:
        """Forward the `FROM_EVENT_LOG` events of `job.report.event` (any thread) to the webhooks
        that take them. Returns the function that stops forwarding (call it before `close`)."""
        from job.report import subscribe

        def forward(name: str, fields: dict) -> None:
            if name in FROM_EVENT_LOG:
                self.send(name, fields)

        return subscribe(forward)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (waiting at most `timeout` seconds), then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                self._queue.put(_STOP, timeout=max(0.01, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("webhooks: %d message(s) not delivered within %.1f s at close", self._queue.qsize(), timeout)

    def __enter__(self) -> "Webhooks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- delivery -----------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="trainer-webhooks", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message is _STOP:
                return
            for hook in self._hooks:
                if message.event in hook.events:
                    self._deliver(hook, message)

    def _deliver(self, hook: _Hook, message: _Message) -> None:
        try:
            body, content_type = (_discord_request if hook.kind == "discord" else _json_request)(message, self.job_name)
            for attempt in range(2):
                status, retry_after = self._post(hook.url, body, content_type)
                if status == 429 and attempt == 0 and retry_after is not None and retry_after <= 5.0:
                    time.sleep(retry_after)  # Discord's rate limit: one polite retry
                    continue
                break
            if 200 <= status < 300:
                self.sent += 1
                return
            self.failed += 1
            log.warning("%s: %s event not delivered: HTTP %d", hook.label, message.event, status)
        except Exception as exc:  # noqa: BLE001 - never raise from the delivery thread
            self.failed += 1
            reason = getattr(exc, "reason", None) or exc
            text = scrub(str(reason)).replace(hook.url, "***")
            log.warning("%s: %s event not delivered: %s: %s", hook.label, message.event, type(exc).__name__, text)

    def _post(self, url: str, body: bytes, content_type: str) -> tuple[int, float | None]:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": content_type, "User-Agent": USER_AGENT}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - http(s) only (spec)
                response.read()
                return response.status, None
        except urllib.error.HTTPError as err:
            retry = err.headers.get("Retry-After") if err.headers else None
            try:
                err.read()
            except Exception:  # noqa: BLE001
                pass
            try:
                retry_after = float(retry) if retry is not None else None
            except ValueError:
                retry_after = None
            return err.code, retry_after


# --- payload formats ---------------------------------------------------------------------
def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


def _base(message: _Message, job_name: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"event": message.event, "time": _iso(message.time)}
    if job_name:
        data["job"] = job_name
    data.update(message.payload)
    return data


def _dumps(data: Any) -> bytes:
    return scrub(json.dumps(data, default=str, ensure_ascii=False)).encode("utf-8")


def _json_request(message: _Message, job_name: str | None) -> tuple[bytes, str]:
    data = _base(message, job_name)
    if message.image_png is not None:
        data["image_png_base64"] = base64.b64encode(message.image_png).decode("ascii")
    return _dumps(data), "application/json"


_TITLES = {
    "job_started": "Job started",
    "phase_changed": "Phase changed",
    "validation_ready": "Validation videos ready",
    "checkpoint_saved": "Checkpoint saved",
    "job_finished": "Job finished",
    "job_failed": "Job FAILED",
    "preview": "Validation preview",
}


def discord_content(message_event: str, payload: dict[str, Any], job_name: str | None = None) -> str:
    """A short human-readable Discord message (at most 2000 characters)."""
    title = _TITLES.get(message_event, message_event)
    head = f"**{title}**" + (f" — {job_name}" if job_name else "")
    lines = [head]
    for key, value in payload.items():
        if isinstance(value, (list, tuple)):
            shown = ", ".join(str(v) for v in value[:10]) + (f" … (+{len(value) - 10})" if len(value) > 10 else "")
        elif isinstance(value, dict):
            shown = json.dumps(value, default=str, ensure_ascii=False)
        else:
            shown = str(value)
        lines.append(f"{key}: {shown}")
    text = scrub("\n".join(lines))
    if len(text) > DISCORD_CONTENT_LIMIT:
        text = text[: DISCORD_CONTENT_LIMIT - 1] + "…"
    return text


def _discord_request(message: _Message, job_name: str | None) -> tuple[bytes, str]:
    payload: dict[str, Any] = {
        "content": discord_content(message.event, message.payload, job_name),
        "allowed_mentions": {"parse": []},  # never ping anyone from a caption or an error message
    }
    if message.image_png is None:
        return _dumps(payload), "application/json"
    filename = f"{message.event}.png"
    payload["attachments"] = [{"id": 0, "filename": filename}]
    payload["embeds"] = [{"image": {"url": f"attachment://{filename}"}}]
    return _multipart(
        [("payload_json", None, "application/json", _dumps(payload)), ("files[0]", filename, "image/png", message.image_png)]
    )


def _multipart(parts: Sequence[tuple[str, str | None, str, bytes]]) -> tuple[bytes, str]:
    boundary = f"trainer-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        )
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
