"""The benchmark's task functions: trivial, so that what is measured is the pipeline.

Pickled by value (``cloudpickle.register_pickle_by_value``), as Covalent's own callables travel,
so the worker needs nothing from bench/ on its path.
"""


def add_one(x: int, sleep_s: float = 0.0) -> int:
    """P1-P4's task. P1 gives each task a different ``sleep_s`` (spread over one polling interval)
    so that job ends fall anywhere in the interval, as real tasks' do (a sleep uses no CPU)."""
    if sleep_s:
        import time

        time.sleep(sleep_s)
    return x + 1


def echo(payload: bytes) -> bytes:
    """The payload benchmark: the argument comes back as the result (same size both ways)."""
    return payload
