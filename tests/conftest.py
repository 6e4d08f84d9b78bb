"""Session fixtures: the local emulation stack and an isolated Covalent server, each started once.

Covalent reads where its configuration lives when it is first imported, so the isolation is put
into os.environ here, at conftest import, before any test module imports covalent.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from covalent_gcpbatch_plugin.local.covalent_server import CovalentServer, isolated_env

ON_CI = os.environ.get("CI", "").lower() == "true"
ROOT = Path(tempfile.mkdtemp(prefix="gcpbatch-tests-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COVALENT_PORT = _free_port()
os.environ.update(isolated_env(ROOT / "covalent", COVALENT_PORT))
os.environ.pop("COVALENT_SERVER_IFACE_ANY", None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(ROOT, ignore_errors=True)
