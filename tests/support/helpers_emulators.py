"""Test helpers for real local services: free ports, the Pub/Sub emulator, process-group cleanup.

Every process started here leads its own session (``start_new_session=True``), so
``stop_process_group`` stops it together with everything it started (the Pub/Sub launcher script
``exec``s java, and a service's children share its group unless they start their own session).

A missing emulator is a skip on a developer machine and a failure under ``CI=true``: call
``unavailable(reason)`` when a prerequisite is missing.

    proc, host = start_pubsub_emulator(tmp_path)      # host is "127.0.0.1:PORT"
    try:
        ...                                           # set PUBSUB_EMULATOR_HOST=host for clients
    finally:
        stop_process_group(proc)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NoReturn

import pytest

from covalent_gcpbatch_plugin.local.processes import free_ports, terminate_group

ON_CI = os.environ.get("CI", "").lower() == "true"

#: Where the Debian package google-cloud-cli-pubsub-emulator installs its launcher.
PUBSUB_EMULATOR_LAUNCHER = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
PUBSUB_START_TIMEOUT_S = 60.0


class EmulatorUnavailable(RuntimeError):
    """A prerequisite (launcher, java) is not installed on this machine."""


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it under CI=true (where every emulator must be present)."""
    if ON_CI:
        pytest.fail(f"{reason} (CI=true: a missing emulator is a failure)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
    """(status, body) of a GET, or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (OSError, urllib.error.URLError):
        return None


def wait_until_answers(proc: subprocess.Popen, url: str, timeout: float, log_file: Path | None = None,
                       expect_body: bytes | None = None) -> None:
    """Poll ``url`` until it answers 200 (with ``expect_body`` if given); raise if ``proc`` exits
    or ``timeout`` passes (with the tail of ``log_file``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = http_get(url, timeout=1.0)
        if answer and answer[0] == 200 and (expect_body is None or answer[1].strip() == expect_body):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log_file.read_text(errors="replace")[-3000:] if log_file and log_file.exists() else ""
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"did not answer within {timeout:g} s"
    raise RuntimeError(f"{url}: the process {state}\n{tail}")


def pubsub_emulator_launcher() -> Path:
    """The emulator's launcher script; raises EmulatorUnavailable if it (or java) is missing."""
    launcher = Path(os.environ.get("PUBSUB_EMULATOR_LAUNCHER", PUBSUB_EMULATOR_LAUNCHER))
    if not launcher.is_file():
        found = shutil.which("cloud-pubsub-emulator")
        if not found:
            raise EmulatorUnavailable(f"the Pub/Sub emulator is not installed ({launcher} not found)")
        launcher = Path(found)
    if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        raise EmulatorUnavailable("java is not installed: the Pub/Sub emulator needs it")
    return launcher


def start_pubsub_emulator(tmp_dir: Path) -> tuple[subprocess.Popen, str]:
    """Start the real Pub/Sub emulator on a free 127.0.0.1 port; return (process, "127.0.0.1:PORT")
    once ``GET /`` answers ``Ok``. Its output goes to ``tmp_dir/pubsub-emulator.log``.

    Raises EmulatorUnavailable if it is not installed (pass that to ``unavailable``) and
    RuntimeError if it does not come up. Stop it with ``stop_process_group``.
    """
    launcher = pubsub_emulator_launcher()
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_file = tmp_dir / "pubsub-emulator.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([str(launcher), "--host=127.0.0.1", f"--port={port}"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_answers(proc, f"http://127.0.0.1:{port}/", PUBSUB_START_TIMEOUT_S, log_file, expect_body=b"Ok")
    except BaseException:
        stop_process_group(proc)
        raise
    return proc, f"127.0.0.1:{port}"


def stop_process_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group ``proc`` leads (it must have been started with
    ``start_new_session=True``), SIGKILL it after ``timeout`` s, and reap ``proc``."""
    terminate_group(proc.pid, timeout, reap=proc.poll)
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        pass
