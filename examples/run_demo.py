"""`make demo`: the SVM example on GCPBatchExecutor, on the local stack, then stop everything.

Runs `covalent-gcpbatch local up` and a Covalent server with their own home under a temporary
directory (nothing touches your Covalent config), dispatches examples/svm.py, prints its score, and
stops the server and the stack, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from covalent_gcpbatch_plugin.local.covalent_server import CovalentServer, isolated_env
from covalent_gcpbatch_plugin.local.processes import free_ports

EXAMPLE = Path(__file__).resolve().with_name("svm.py")
WORKFLOW_TIMEOUT_S = 600


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="gcpbatch-demo-"))
    (port,) = free_ports(1)
    env = {**os.environ, **isolated_env(root / "covalent", port)}
    cli = [str(Path(sys.executable).with_name("covalent-gcpbatch")), "local"]
    state = ["--state-dir", str(root / "stack")]
    server = CovalentServer(root / "covalent", port)
    try:
        subprocess.run([*cli, "up", *state], env=env, check=True, timeout=180)
        print("starting an isolated Covalent server (--no-cluster) ...", flush=True)
        server.start()
        completed = subprocess.run([sys.executable, str(EXAMPLE)], env=env, timeout=WORKFLOW_TIMEOUT_S)
        return completed.returncode
    finally:
        server.stop()
        subprocess.run([*cli, "down", *state], env=env, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
