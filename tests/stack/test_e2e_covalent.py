"""End to end: Covalent workflows on GCPBatchExecutor through the whole local pipeline.

executor -> fake-gcs-server -> notification -> bridge -> functions-framework -> local Batch ->
worker process -> fake-gcs-server; Batch -> Pub/Sub emulator -> the executor's subscriber.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import covalent as ct
import pytest
from workflow_helpers import active_jobs, failure_details, node_results, nodes_by_name, wait_for

# Electrons defined in a test module are pickled by value, as they would be from a script.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.stack
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "svm.py"


def test_workers_have_only_what_the_image_has(covalent_server, local_stack):
    """The local workers run in the worker image's environment (built from worker_image/Dockerfile),
    not in this one: pytest is here, not in the image, so a task that imports it fails as it would
    on Google Cloud. What a task's ct.DepsPip installs stays in its attempt, as in a container."""
    executor = ct.executor.GCPBatchExecutor(time_limit=300)

    @ct.electron(executor=executor)
    def needs_pytest():
        import pytest  # noqa: F401

    @ct.lattice
    def without_deps():
        return needs_pytest()

    result = wait_for(ct.dispatch(without_deps)(), timeout_s=300)
    node = nodes_by_name(result)["needs_pytest"]
    assert str(node["status"]) == "FAILED"
    assert "No module named 'pytest'" in f"{node['stderr']}{node['error']}"

    @ct.electron(executor=executor, deps_pip=ct.DepsPip(packages=["inflection==0.5.1"]))
    def installs_inflection():
        import sys as _sys

        import inflection

        return inflection.__file__, _sys.prefix

    @ct.electron(executor=executor)
    def inflection_is_gone_again(earlier):
        import importlib.util

        return importlib.util.find_spec("inflection") is None

    @ct.lattice
    def with_deps():
        return inflection_is_gone_again(installs_inflection())

    result = wait_for(ct.dispatch(with_deps)(), timeout_s=300)
    assert str(result.status) == "COMPLETED", failure_details(result)
    where, prefix = nodes_by_name(result)["installs_inflection"]["output"].get_deserialized()
    assert not where.startswith(prefix), "installed in the attempt, not in the shared image environment"
    assert prefix != sys.prefix, "the worker ran in the image's environment, not this test's"
    assert result.result is True, "the next task starts from the image again"


def test_a_result_of_a_package_only_the_worker_has_names_the_missing_module(covalent_server, local_stack):
    """The electron returns a pydash object, pydash installed on its worker only (DepsPip): the
    electron COMPLETES (its result stored and handed to Covalent, never lost), and the failure,
    Covalent's own when it unpickles the value in its server (its post-processing), names the
    missing module."""
    executor = ct.executor.GCPBatchExecutor(time_limit=300, pack_window=0)

    @ct.electron(executor=executor, deps_pip=ct.DepsPip(packages=["pydash==5.1.0"]))
    def chain():
        import pydash

        return pydash.chain([1, 2, 3])

    @ct.lattice
    def flow():
        return chain()

    result = wait_for(ct.dispatch(flow)(), timeout_s=300)
    assert str(nodes_by_name(result)["chain"]["status"]) == "COMPLETED", failure_details(result)
    assert str(result.status) == "FAILED"
    said = "".join(f"{n['error'] or ''}{n['stderr'] or ''}" for n in node_results(result) if str(n["status"]) == "FAILED")
    assert "ModuleNotFoundError: No module named 'pydash'" in said, failure_details(result)


@pytest.mark.slow
def test_the_svm_example_completes_on_workers_with_only_the_image(covalent_server, local_stack):
    """examples/svm.py as the README shows it: every electron brings numpy and scikit-learn with
    ct.DepsPip (the image has neither), and the dispatching side needs neither."""
    # As a script (its electrons pickled by value), in a process where numpy and sklearn cannot be imported.
    run_without = ("import runpy, sys; sys.modules.update(numpy=None, sklearn=None); "
                   f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", run_without], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-4000:]}"
    score = float(done.stdout.split("SVM score: ")[1].split()[0])
    assert 0.5 < score <= 1.0
    assert active_jobs(local_stack) == []
