"""End to end: Covalent workflows on GCPBatchExecutor through the whole local pipeline.

executor -> fake-gcs-server -> notification -> bridge -> functions-framework -> local Batch ->
worker process -> fake-gcs-server; Batch -> Pub/Sub emulator -> the executor's subscriber.
"""

from __future__ import annotations

import sys
import time

import cloudpickle
import covalent as ct
import pytest
from workflow_helpers import active_jobs, failure_details, node_results, nodes_by_name, wait_for

# Electrons defined in a test module are pickled by value, as they would be from a script.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.stack


def test_workflow_completes_through_the_pipeline(covalent_server, local_stack):
    executor = ct.executor.GCPBatchExecutor(time_limit=120)

    @ct.electron(executor=executor)
    def add(a, b):
        print(f"adding {a} and {b}")
        return a + b

    @ct.electron(executor=executor)
    def square(x):
        return x * x

    @ct.electron(executor=executor)
    def describe(x, y):
        return {"sum_squared": x, "plus": y}

    @ct.lattice
    def flow(a, b):
        total = add(a, b)
        squared = square(total)
        return describe(squared, add(squared, 1))

    result = wait_for(ct.dispatch(flow)(2, 3))
    assert str(result.status) == "COMPLETED", failure_details(result)
    assert result.result == {"sum_squared": 25, "plus": 26}
    add_outputs = sorted(node["stdout"] for node in node_results(result) if node["node_name"] == "add")
    assert add_outputs == ["adding 2 and 3\n", "adding 25 and 1\n"]
    assert active_jobs(local_stack) == []


def test_raising_electron_fails_with_its_traceback_and_others_complete(covalent_server, local_stack):
    executor = ct.executor.GCPBatchExecutor(time_limit=120)

    @ct.electron(executor=executor)
    def double(x):
        return 2 * x

    @ct.electron(executor=executor)
    def explode(x):
        raise ValueError(f"refusing to handle {x}")

    @ct.electron(executor=executor)
    def increment(x):
        return x + 1

    @ct.lattice
    def flow(x):
        doubled = double(x)
        explode(doubled)
        return increment(doubled)

    started = time.monotonic()
    result = wait_for(ct.dispatch(flow)(21))
    assert str(result.status) == "FAILED"
    nodes = nodes_by_name(result)
    assert str(nodes["explode"]["status"]) == "FAILED"
    assert "ValueError: refusing to handle 42" in nodes["explode"]["stderr"]
    assert "Traceback (most recent call last)" in nodes["explode"]["stderr"]
    assert str(nodes["double"]["status"]) == "COMPLETED"
    assert nodes["double"]["output"].get_deserialized() == 42
    assert time.monotonic() - started < 120
    assert active_jobs(local_stack) == []
