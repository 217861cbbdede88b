"""Upload tests run against the real servers on 127.0.0.1 (moto S3, the Hub stand-in)."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.servers.fixtures import *  # noqa: E402,F401,F403

import pytest  # noqa: E402

from tests.servers.tcp_proxy import TcpProxy  # noqa: E402


@pytest.fixture
def fast_push(monkeypatch, fast_retry):
    """Every push_to call retries in milliseconds."""
    import job.upload.remote

    monkeypatch.setattr(job.upload.remote, "retry_policy", lambda: fast_retry)
    return fast_retry


@pytest.fixture
def s3_proxy(s3_env):
    """A switchable proxy in front of the S3 server: `s3_proxy.set_up(False)` = the store is down."""
    proxy = TcpProxy(s3_env.port).start()
    yield proxy
    proxy.stop()
