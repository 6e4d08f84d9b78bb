"""Benchmarks of the executor on the local stack: event-driven against polling (`make bench`)."""

import sys
import time


def log(message: str) -> None:
    """Progress to stderr (stdout carries the table)."""
    print(f"bench {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)
