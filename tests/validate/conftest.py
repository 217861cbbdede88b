"""Fixtures for the validation tests: a tiny model, specs, and a local webhook receiver."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
import torch

from job.models.sanavideo.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-sanavideo-validate") / "model", seed=0)


def load_tiny(path):
    from job.models.sanavideo.loading import load_components

    return load_components(path, dtype=torch.float32, parts={"transformer", "vae", "text_encoder", "scheduler"})


@pytest.fixture
def fresh_components(tiny_model_path):
    """A loader of private tiny parts (for tests that change weights or modes)."""
    return lambda: load_tiny(tiny_model_path)


@pytest.fixture(scope="session")
def tiny_components(tiny_model_path):
    """Shared tiny parts in float32 on the CPU; tests that change weights load their own."""
    return load_tiny(tiny_model_path)


@pytest.fixture(scope="session")
def embeddings_for(tiny_components):
    from job.validate.render import embeddings_from_text_encoder

    return embeddings_from_text_encoder(tiny_components.text_encoder, tiny_components.tokenizer)


def make_spec(workspace, validation: dict | None = None, train: dict | None = None, webhooks: list | None = None,
              framerate: int | None = 12, memory: dict | None = None):
    from job.spec import JobSpec

    v = {"resolutions": ["64x32"], "num_video_frames": 5, "num_inference_steps": 2, "guidance": 4.0, "seed": 7}
    v.update(validation or {})
    return JobSpec.model_validate({
        "name": "validate-test",
        "workspace": str(workspace),
        "data": {"datasets": [{"id": "clips", "source": "clips"}], "framerate": framerate},
        "train": train or {},
        "memory": memory or {},
        "validation": v,
        "webhooks": webhooks or [],
    })


@pytest.fixture
def spec_factory(tmp_path):
    from job.workspace import Workspace

    def factory(**kwargs):
        spec = make_spec(tmp_path / "ws", **kwargs)
        return spec, Workspace.for_spec(spec)

    return factory


class Receiver:
    """A webhook endpoint on 127.0.0.1: records every POST; `/fail` answers 500."""

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(500 if self.path.startswith("/fail") else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.02)
        with self.lock:
            return list(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()
