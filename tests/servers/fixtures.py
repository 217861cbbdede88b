"""Pytest fixtures for the test servers. Import them into a conftest.py:

    from tests.servers.fixtures import *  # noqa: F401,F403

- `s3_server` / `hub_server`: one server per test session, stopped at the end.
- `s3_env` / `hub_env`: per test: fake credentials and endpoint in the environment (via
  monkeypatch), a clean request log, no pending failures, auth checks off.
- `s3_bucket`: a fresh bucket; `s3_options`: the `S3Options` for the server.
- `fast_retry`: a `RetryPolicy` with millisecond waits, for tests that retry.
"""

from __future__ import annotations

import uuid

import pytest

from tests.servers.hub import DEFAULT_TOKEN, HubServer
from tests.servers.moto_s3 import FAKE_KEY_ID, FAKE_SECRET, REGION, MotoS3Server

__all__ = ["fast_retry", "hub_env", "hub_server", "s3_bucket", "s3_env", "s3_options", "s3_server"]


@pytest.fixture(scope="session")
def s3_server():
    server = MotoS3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: MotoS3Server, monkeypatch, tmp_path_factory):
    missing = tmp_path_factory.mktemp("aws") / "absent"
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if s3_server._server is None:
        s3_server.start()
    s3_server.set_auth(False)
    s3_server.clear_requests()
    s3_server.clear_failures()
    yield s3_server
    if s3_server._server is None:  # a test stopped it: bring it back for the next one
        s3_server.start()
    s3_server.set_auth(False)
    s3_server.clear_failures()


@pytest.fixture
def s3_options(s3_env: MotoS3Server):
    from job.storage import S3Options

    return S3Options(endpoint_url=s3_env.url, region=REGION, addressing_style="path")


@pytest.fixture
def s3_bucket(s3_env: MotoS3Server) -> str:
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_env.url, region_name=REGION)
    client.create_bucket(Bucket=name)
    client.close()
    s3_env.clear_requests()
    return name


@pytest.fixture(scope="session")
def hub_server():
    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_env(hub_server: HubServer, monkeypatch, tmp_path_factory):
    """HF_ENDPOINT/HF_TOKEN point at the stand-in. huggingface_hub reads HF_ENDPOINT once at
    import, so its constants are patched too (for code that does not pass `endpoint=`)."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_server.reset()
    yield hub_server
    hub_server.clear_failures()


@pytest.fixture
def fast_retry():
    from job.storage import RetryPolicy

    return RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=20)
