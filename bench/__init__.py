"""Benchmarks of the executor on the local stack: event-driven against polling (`make bench`)."""

import json
import sys
import time
import urllib.request
from typing import Any

#: The local Batch service is on 127.0.0.1: never through a proxy.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


_STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress to stderr (stdout carries the table), with the time since the run started."""
    print(f"bench {time.strftime('%H:%M:%S')} [+{time.monotonic() - _STARTED:.0f} s] {message}", file=sys.stderr, flush=True)


def batch_admin(endpoint: str, path: str, body: dict | None = None, timeout: float = 30) -> Any:
    """The local Batch service's admin API (``GET`` stats or active; ``POST`` faults or reset with ``body``)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{endpoint}/_admin/{path}", data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    with _direct.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def batch_stats(endpoint: str) -> dict:
    """The local Batch service's ``GET /_admin/stats``: call counters and per-job state-entry times."""
    return batch_admin(endpoint, "stats", timeout=60)
