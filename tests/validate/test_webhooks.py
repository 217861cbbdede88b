"""Webhooks: JSON and Discord formats, event filters, and failures that never break the job."""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
from email.parser import BytesParser
from email.policy import default as default_policy

import pytest

from job.report import scrub
from job.report.webhooks import Webhooks
from job.spec.validation import WebhookSpec

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # only the bytes matter here


def parse_multipart(request: dict) -> dict[str, tuple[str | None, str, bytes]]:
    content_type = request["headers"]["Content-Type"]
    message = BytesParser(policy=default_policy).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + request["body"]
    )
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        parts[name] = (part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
    return parts


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def report_log():
    handler = Capture()
    logger = logging.getLogger("trainer.report")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_json_and_discord_payloads_and_event_filters(receiver):
    hooks = Webhooks(
        [
            WebhookSpec(url=receiver.url("/json")),
            WebhookSpec(url=receiver.url("/discord"), kind="discord"),
            WebhookSpec(url=receiver.url("/finished-only"), events=["job_finished"]),
        ],
        job_name="my-job",
    )
    assert hooks.send("job_started", {"phase": "spec"})
    assert hooks.send("preview", {"step": 10, "nickname": "cat"}, image_png=PNG)
    assert hooks.send("job_finished", {"steps": 100})
    hooks.close(timeout=10)
    assert hooks.failed == 0 and hooks.sent == 7

    by_path: dict[str, list[dict]] = {}
    for request in receiver.requests:
        by_path.setdefault(request["path"], []).append(request)
    assert {p: len(r) for p, r in by_path.items()} == {"/json": 3, "/discord": 3, "/finished-only": 1}

    bodies = [json.loads(r["body"]) for r in by_path["/json"]]
    assert [b["event"] for b in bodies] == ["job_started", "preview", "job_finished"]
    assert bodies[0]["job"] == "my-job" and bodies[0]["phase"] == "spec" and "time" in bodies[0]
    assert base64.b64decode(bodies[1]["image_png_base64"]) == PNG and bodies[1]["nickname"] == "cat"
    assert all(r["headers"]["Content-Type"] == "application/json" for r in by_path["/json"])

    started, preview, finished = by_path["/discord"]
    first = json.loads(started["body"])
    assert "Job started" in first["content"] and "phase: spec" in first["content"]
    assert first["allowed_mentions"] == {"parse": []}
    assert preview["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    parts = parse_multipart(preview)
    payload = json.loads(parts["payload_json"][2])
    assert "nickname: cat" in payload["content"]
    assert payload["embeds"][0]["image"]["url"] == "attachment://preview.png"
    assert parts["files[0]"] == ("preview.png", "image/png", PNG)
    assert json.loads(by_path["/finished-only"][0]["body"])["event"] == "job_finished"
    assert "Job finished" in json.loads(finished["body"])["content"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_and_failing_webhooks_never_raise_nor_leak_the_url(receiver, report_log):
    dead = f"http://127.0.0.1:{_closed_port()}/api/webhooks/123/secret-token-abc"
    failing = receiver.url("/fail/secret-token-def")
    hooks = Webhooks([WebhookSpec(url=dead), WebhookSpec(url=failing, kind="discord")], timeout=2)
    assert scrub(f"posting to {dead}") == "posting to ***"  # registered as a secret
    assert hooks.send("job_failed", {"error": "CUDA out of memory"})
    hooks.close(timeout=10)
    assert hooks.failed == 2 and hooks.sent == 0
    text = "\n".join(report_log.lines)
    assert "webhook 1 (json)" in text and "webhook 2 (discord)" in text and "HTTP 500" in text
    assert "secret-token" not in text and "127.0.0.1" not in text
    assert json.loads(receiver.requests[0]["body"])["content"].endswith("error: CUDA out of memory")


def test_send_never_blocks_on_a_hanging_endpoint(report_log):
    with socket.socket() as hang:  # accepts connections (backlog) but never answers
        hang.bind(("127.0.0.1", 0))
        hang.listen(16)
        hooks = Webhooks([WebhookSpec(url=f"http://127.0.0.1:{hang.getsockname()[1]}/x")], queue_size=2, timeout=1)
        started = time.monotonic()
        results = [hooks.send("checkpoint_saved", {"step": i}) for i in range(20)]
        assert time.monotonic() - started < 0.5
        assert hooks.dropped >= 15 and results.count(True) <= 4
        started = time.monotonic()
        hooks.close(timeout=0.2)
        assert time.monotonic() - started < 1.0
        assert hooks.send("job_finished", {}) is False  # closed


def test_nothing_to_do_without_webhooks():
    hooks = Webhooks([])
    assert not hooks.enabled and not hooks.wants("preview")
    assert hooks.send("job_started", {}) is False
    hooks.close()
