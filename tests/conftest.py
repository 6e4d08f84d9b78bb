"""Session fixtures: the local emulation stack and an isolated Covalent server, each started once.

Covalent reads where its configuration lives when it is first imported, so the isolation is put
into os.environ here, at conftest import, before any test module imports covalent.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from covalent_gcpbatch_plugin.clients import LOCAL_TOKEN_ENV
from covalent_gcpbatch_plugin.local.covalent_server import CovalentServer, isolated_env
from covalent_gcpbatch_plugin.local.processes import free_ports

ON_CI = os.environ.get("CI", "").lower() == "true"
ROOT = Path(tempfile.mkdtemp(prefix="gcpbatch-tests-"))


(COVALENT_PORT,) = free_ports(1)
os.environ.update(isolated_env(ROOT / "covalent", COVALENT_PORT))
#: The bearer token every client of the session carries on the local stack (clients.LOCAL_TOKEN_ENV):
#: the test process's, the stack's and the Covalent server's, all started from this environment.
#: Unique and shaped like a Google access token, so that test_no_credentials_in_logs can look for it.
LOCAL_TOKEN = f"ya29.local-{secrets.token_urlsafe(24)}"
os.environ[LOCAL_TOKEN_ENV] = LOCAL_TOKEN
os.environ.pop("COVALENT_SERVER_IFACE_ANY", None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(ROOT, ignore_errors=True)


def require_emulators() -> None:
    """Outside CI a machine without the emulators skips the stack tests; under CI it fails them."""
    from covalent_gcpbatch_plugin.errors import StackError
    from covalent_gcpbatch_plugin.local.stack import find_fake_gcs_server, find_pubsub_emulator

    try:
        find_pubsub_emulator()
        find_fake_gcs_server()
    except StackError as err:
        if ON_CI:
            pytest.fail(f"CI=true and an emulator is missing: {err}")
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def local_stack():
    """The local stack, with its settings in the (isolated) Covalent config, as `local up` does."""
    from covalent._shared_files.config import reload_config

    from covalent_gcpbatch_plugin import covalent_config
    from covalent_gcpbatch_plugin.local.stack import LocalStack

    require_emulators()
    stack = LocalStack(ROOT / "stack")
    settings = stack.up()
    config = settings.executor_config()
    try:
        covalent_config.write_executor_section(config)
        reload_config()
        yield settings
    finally:
        stack.down()
        covalent_config.remove_executor_section_keys(list(config))
        reload_config()


@pytest.fixture(scope="session")
def covalent_server(local_stack):
    """A Covalent server started after `local up`, so it reads the stack's settings."""
    from covalent._shared_files.config import reload_config

    server = CovalentServer(ROOT / "covalent", COVALENT_PORT)
    server.start()
    reload_config()
    try:
        yield server
    finally:
        server.stop()
