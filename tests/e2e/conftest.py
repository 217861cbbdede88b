"""End-to-end tests use the real servers on 127.0.0.1 from tests/servers."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.servers.fixtures import *  # noqa: E402,F401,F403
from tests.e2e.smoke_job import smoke_template, undisturbed_run  # noqa: E402,F401
