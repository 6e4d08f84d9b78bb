"""Benchmarks of the executor on the local stack: event-driven against polling (`make bench`)."""

import json
import sys
import time
import urllib.request

#: The local Batch service is on 127.0.0.1: never through a proxy.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


_STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress to stderr (stdout carries the table), with the time since the run started."""
    print(f"bench {time.strftime('%H:%M:%S')} [+{time.monotonic() - _STARTED:.0f} s] {message}", file=sys.stderr, flush=True)


def batch_stats(endpoint: str) -> dict:
    """The local Batch service's ``GET /_admin/stats``: call counters and per-job state-entry times."""
    with _direct.open(f"{endpoint}/_admin/stats", timeout=60) as response:
        return json.loads(response.read())
