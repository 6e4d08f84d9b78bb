"""What the phases that go through a real Covalent server share (bench/packing.py, bench/overhead.py):
a local stack and an isolated Covalent server reading its settings, and a bounded wait for a dispatch.

Covalent reads where its config lives when it is first imported: ``on_covalent`` points it at a
temporary directory before importing it, so each phase runs in a process of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from covalent_gcpbatch_plugin.local.covalent_server import CovalentServer, isolated_env
from covalent_gcpbatch_plugin.local.processes import free_ports
from covalent_gcpbatch_plugin.local.stack import LocalStack

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


@contextlib.contextmanager
def on_covalent(prefix: str, **stack_options: Any) -> Iterator[tuple[Any, Any]]:
    """(the covalent module, the stack's settings): a stack up with ``stack_options``, its settings
    in the Covalent config, a Covalent server started after it; all stopped and removed at exit."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    (port,) = free_ports(1)
    os.environ.update(isolated_env(root / "covalent", port))
    os.environ.pop("COVALENT_SERVER_IFACE_ANY", None)
    stack = LocalStack(root / "stack", **stack_options)
    server = CovalentServer(root / "covalent", port)
    try:
        settings = stack.up()
        from covalent_gcpbatch_plugin import covalent_config

        covalent_config.write_executor_section(settings.executor_config())
        server.start()
        import covalent as ct

        yield ct, settings
    finally:
        server.stop()
        stack.down()
        shutil.rmtree(root, ignore_errors=True)


def wait_dispatch(ct, dispatch_id: str, timeout_s: float, step_s: float = 0.5):
    """The dispatch's result once terminal; cancelled and TimeoutError past ``timeout_s``. Covalent
    offers a client no completion event: this is a bounded watch of its API, ``step_s`` apart."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = ct.get_result(dispatch_id, wait=False)
        if result is not None and str(result.status) in TERMINAL:
            return result
        if time.monotonic() > deadline:
            ct.cancel(dispatch_id)
            raise TimeoutError(f"dispatch {dispatch_id} did not end within {timeout_s:g} s")
        time.sleep(step_s)


def electron_nodes(result, name: str) -> list[dict]:
    nodes = [result.get_node_result(n) for n in result.lattice.transport_graph._graph.nodes]
    return [n for n in nodes if n["node_name"] == name]
