"""Storage tests run against real servers on 127.0.0.1 (moto S3, a Hub stand-in)."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, _ROOT)

from tests.servers.fixtures import *  # noqa: E402,F401,F403

import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def storage_log(caplog):
    """caplog for `trainer.storage`, even after `setup_logging()` stopped `trainer` propagating."""
    logger = logging.getLogger("trainer.storage")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="trainer.storage")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
