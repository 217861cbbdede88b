"""Real servers for tests, on 127.0.0.1 only: moto's S3 (`moto_s3`) and a Hub stand-in (`hub`).

Fixtures live in `tests.servers.fixtures`; a test folder uses them with
`from tests.servers.fixtures import *` in its conftest.py.
"""
