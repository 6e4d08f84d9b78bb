"""An isolated Covalent server for the demo, the tests and the benchmarks.

Its config, cache, data, database and logs live under one directory, it listens on 127.0.0.1 on
the port given, it runs without Dask (``--no-cluster``: Dask's dashboard would bind 0.0.0.0),
and it is stopped by process group, so nothing it started outlives ``stop()``.

The dispatching process must use the same configuration: apply ``isolated_env(root, port)`` to
``os.environ`` before importing covalent (Covalent reads its config location at import).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import CovalentServerError
from .processes import terminate_group

START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30


def isolated_env(root: Path, port: int) -> dict[str, str]:
    root = Path(root)
    return {
        "COVALENT_CONFIG_DIR": str(root / "config"),
        "COVALENT_CACHE_DIR": str(root / "cache"),
        "COVALENT_DATA_DIR": str(root / "data"),
        "COVALENT_DATABASE": str(root / "data" / "dispatches.sqlite"),
        "COVALENT_LOGDIR": str(root / "logs"),
        "COVALENT_DISPATCH_CACHE_DIR": str(root / "cache" / "dispatches"),
        "COVALENT_RESULTS_DIR": str(root / "results"),
        "COVALENT_EXECUTOR_DIR": str(root / "executors"),
        "COVALENT_DISPATCHER_ADDR": "127.0.0.1",
        "COVALENT_SVC_PORT": str(port),
        "COVALENT_SERVER_IFACE_ANY": "",
        # Covalent picks the default executor ("local" vs "dask") at import from this; the server
        # runs --no-cluster, so the dispatching process must agree from its first import.
        "COVALENT_DISABLE_DASK": "1",
    }


def _covalent_cli() -> str:
    return str(Path(sys.executable).with_name("covalent"))


class CovalentServer:
    def __init__(self, root: Path, port: int) -> None:
        self.root = Path(root)
        self.port = port
        self.pgid: int | None = None

    def env(self) -> dict[str, str]:
        env = {**os.environ, **isolated_env(self.root, self.port), "HOME": str(self.root / "home")}
        env.pop("COVALENT_SERVER_IFACE_ANY", None)
        return env

    def start(self) -> None:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        # `covalent start` spawns the server and returns once it answers; it leads a new
        # session, so the server it leaves behind is in that process group.
        proc = subprocess.Popen(
            [_covalent_cli(), "start", "--no-cluster", "--port", str(self.port)],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = proc.pid
        try:
            out, _ = proc.communicate(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            raise CovalentServerError(f"covalent start did not finish within {START_TIMEOUT_S} s; logs in {self.root / 'logs'}")
        if proc.returncode != 0:
            self.stop()
            raise CovalentServerError(f"covalent start failed ({proc.returncode}): {out.decode(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.pgid is None:
            return
        try:
            subprocess.run([_covalent_cli(), "stop"], env=self.env(), capture_output=True, timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        terminate_group(self.pgid, grace_s=5.0)
        self.pgid = None
