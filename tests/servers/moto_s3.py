"""moto's S3 server on 127.0.0.1, with hooks for tests.

A real S3-compatible HTTP server (moto's own WSGI app, served by werkzeug in a thread),
wrapped with a small WSGI middleware that records every request (so a test can assert
"no GET of object bodies") and can answer the next requests with a transient error.
`stop()` closes the listening socket *and* open keep-alive connections, so a stopped
server is really unreachable; `start()` again on the same port brings it back with its
buckets (moto keeps state in-process).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from urllib.request import Request, urlopen

FAKE_KEY_ID = "testing-key-id"
FAKE_SECRET = "testing-secret-key"
REGION = "us-east-1"


@dataclass
class S3Request:
    method: str
    path: str
    query: str
    status: int = 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MotoS3Server:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port or free_port(host)
        self.requests: list[S3Request] = []
        self._failures: list[tuple[int, str, str | None, str | None]] = []
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._app = None

    # ----- lifecycle

    def _wsgi(self):
        if self._app is None:
            from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

            self._app = DomainDispatcherApplication(create_backend_app)
        app = self._app

        def middleware(environ, start_response):
            method = environ["REQUEST_METHOD"]
            path = environ.get("PATH_INFO", "")
            query = environ.get("QUERY_STRING", "")
            seen = S3Request(method, path, query)
            injected = None
            with self._lock:
                if not path.startswith("/moto-api"):
                    self.requests.append(seen)
                    for i, (status, code, match, meth) in enumerate(self._failures):
                        if (match is None or match in path) and (meth is None or meth == method):
                            injected = (status, code)
                            del self._failures[i]
                            break
            if injected is not None:
                status, code = injected
                seen.status = status
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected failure</Message></Error>").encode()
                # drain the request body so the connection stays usable
                length = int(environ.get("CONTENT_LENGTH") or 0)
                if length:
                    environ["wsgi.input"].read(length)
                start_response(f"{status} Injected", [("Content-Type", "application/xml"),
                                                      ("Content-Length", str(len(body)))])
                return [body]

            def recording_start(status, headers, exc_info=None):
                seen.status = int(status.split()[0])
                return start_response(status, headers, exc_info)

            return app(environ, recording_start)

        return middleware

    def start(self) -> "MotoS3Server":
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        owner = self

        class Handler(MotoRequestHandler):
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def log(self, type: str, message: str, *args) -> None:  # keep test output quiet
                pass

            def setup(self):
                super().setup()
                with owner._lock:
                    owner._connections.add(self.connection)

            def finish(self):
                with owner._lock:
                    owner._connections.discard(self.connection)
                super().finish()

        deadline = time.monotonic() + 5
        while True:  # the port may linger for a moment after a stop
            try:
                self._server = make_server(self.host, self.port, self._wsgi(), threaded=True,
                                           request_handler=Handler)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="moto-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            conns = list(self._connections)
            self._connections.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restart_after(self, delay: float) -> threading.Thread:
        """Stop now; start again on the same port after `delay` seconds (in a thread)."""
        self.stop()

        def later():
            time.sleep(delay)
            self.start()

        t = threading.Thread(target=later, name="moto-s3-restart", daemon=True)
        t.start()
        return t

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ----- hooks

    def _moto_api(self, path: str, data: bytes = b"") -> None:
        request = Request(f"{self.url}/moto-api/{path}", data=data, method="POST",
                          headers={"Content-Type": "text/plain"})
        with urlopen(request, timeout=10) as r:
            r.read()

    def reset(self) -> None:
        """Forget all buckets and objects, recorded requests and pending failures."""
        self._moto_api("reset")
        with self._lock:
            self.requests.clear()
            self._failures.clear()

    def set_auth(self, enabled: bool) -> None:
        """With auth on, moto checks access keys against its IAM: the fake test keys are refused."""
        self._moto_api("reset-auth", b"0" if enabled else b"inf")

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def count(self, method: str | None = None, path_contains: str | None = None,
              query_contains: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests
                       if (method is None or r.method == method)
                       and (path_contains is None or path_contains in r.path)
                       and (query_contains is None or query_contains in r.query))

    def fail_next(self, n: int = 1, status: int = 503, code: str = "SlowDown", match: str | None = None,
                  method: str | None = None) -> None:
        with self._lock:
            self._failures.extend([(status, code, match, method)] * n)
