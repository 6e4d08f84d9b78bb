"""An electron's attempts, end to end through Covalent on the local stack: spot fallback (after
preemptions, after a queue without Spot capacity), out of memory then more memory, capacity
problems said as they happen and impossible requests failed at once, cancel across attempts.
The decisions themselves are tests/unit/test_attempt_rules.py's table."""

from __future__ import annotations

import sys

import cloudpickle
import covalent as ct
import pytest
from workflow_helpers import (
    batch_admin,
    ended_jobs_of_dispatch,
    jobs_of_dispatch,
    no_active_job_left,
    nodes_by_name,
    nonzero_exit_codes,
    one_node_flow,
    run_flow,
    wait_for,
    wait_until,
)

from covalent_gcpbatch_plugin import clients, protocol
from covalent_gcpbatch_plugin.gcpbatch import GCPBatchExecutor
from covalent_gcpbatch_plugin.local.batch.faults import CAPACITY_EVENTS
from covalent_gcpbatch_plugin.local.batch.runner import MEMORY_ALLOWANCE_MIB

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.stack

#: A bound for a machine three times slower than ours (speed is bench/'s to measure).
SETTLE_S = 90
MIB = 1024 * 1024
STOCKOUT = CAPACITY_EVENTS["stockout"].format(machine="e2-standard-2", zone="us-east1-b")


@pytest.fixture(autouse=True)
def clean_faults(local_stack):
    batch_admin(local_stack, "reset", {})
    yield
    batch_admin(local_stack, "reset", {})


def provisioning(job) -> str:
    return job.allocation_policy.instances[0].policy.provisioning_model.name


def by_creation(jobs) -> list:
    return sorted(jobs, key=lambda job: job.create_time.timestamp())


def test_a_spot_electron_preempted_n_times_finishes_on_a_standard_vm(covalent_server, local_stack):
    """spot_fallback=2: Batch retries the first preemption itself (the Spot job's max_retry_count
    is 1), the second ends the Spot job, and the electron's next attempt is a STANDARD job of its
    own, which runs it to the end. The node's log says what happened."""
    batch_admin(local_stack, "faults", {"preempt": {"*": 2}})
    executor = GCPBatchExecutor(provisioning="SPOT", spot_fallback=2, retries=3, time_limit=120, pack_window=0)
    dispatch_id, result, elapsed = run_flow(one_node_flow(executor, lambda: "on standard"), timeout_s=SETTLE_S)
    assert str(result.status) == "COMPLETED" and result.result == "on standard", nodes_by_name(result)["task"]["stderr"]
    spot, standard = by_creation(ended_jobs_of_dispatch(local_stack, dispatch_id))
    assert (provisioning(spot), provisioning(standard)) == ("SPOT", "STANDARD")
    assert nonzero_exit_codes(spot) == [50001, 50001] and spot.status.state.name == "FAILED"
    assert spot.task_groups[0].task_spec.max_retry_count == 1 and standard.task_groups[0].task_spec.max_retry_count == 1
    stderr = nodes_by_name(result)["task"]["stderr"]
    assert "preempted 2 time(s)" in stderr and "STANDARD" in stderr, stderr
    assert "on demand" in stderr.split("preempted 2 time(s)")[1], "what the Spot attempt cost"
    no_active_job_left(local_stack)


def test_a_spot_electron_without_a_vm_for_spot_wait_s_runs_on_a_standard_vm(covalent_server, local_stack):
    """No Spot capacity (Batch keeps the job SCHEDULED and says why): after spot_wait_s the Spot job
    is cancelled and a STANDARD one runs the electron. Batch's words reach the node's log."""
    batch_admin(local_stack, "faults", {"no_capacity": {"SPOT": STOCKOUT}})
    executor = GCPBatchExecutor(provisioning="SPOT", spot_fallback=1, spot_wait_s=3, queue_timeout=600, time_limit=120,
                                pack_window=0)
    dispatch_id, result, elapsed = run_flow(one_node_flow(executor, lambda: 7), timeout_s=SETTLE_S)
    assert str(result.status) == "COMPLETED" and result.result == 7, nodes_by_name(result)["task"]["stderr"]
    spot, standard = by_creation(ended_jobs_of_dispatch(local_stack, dispatch_id))
    assert (provisioning(spot), spot.status.state.name) == ("SPOT", "CANCELLED")
    assert (provisioning(standard), standard.status.state.name) == ("STANDARD", "SUCCEEDED")
    stderr = nodes_by_name(result)["task"]["stderr"]
    assert "ZONE_RESOURCE_POOL_EXHAUSTED" in stderr and "spot_wait_s=3" in stderr, stderr
    assert elapsed < SETTLE_S, "spot_wait_s, not queue_timeout"
    no_active_job_left(local_stack)


def test_an_electron_cancelled_in_its_second_attempt_is_cancelled_with_every_job(covalent_server, local_stack):
    """Cancel spans the attempts: Covalent's job handle is the current attempt's, and no job of the
    electron is left running."""
    batch_admin(local_stack, "faults", {"no_capacity": {"SPOT": STOCKOUT, "STANDARD": STOCKOUT}})
    executor = GCPBatchExecutor(provisioning="SPOT", spot_fallback=1, spot_wait_s=2, queue_timeout=600, time_limit=120,
                                pack_window=0)
    dispatch_id = ct.dispatch(one_node_flow(executor, lambda: 1))()
    wait_until(lambda: len(jobs_of_dispatch(local_stack, dispatch_id)) == 2, SETTLE_S, "the electron's second attempt")
    ct.cancel(dispatch_id)
    result = wait_for(dispatch_id, timeout_s=SETTLE_S)
    assert str(nodes_by_name(result)["task"]["status"]) == "CANCELLED"
    assert {job.status.state.name for job in ended_jobs_of_dispatch(local_stack, dispatch_id)} == {"CANCELLED"}
    no_active_job_left(local_stack)


def test_a_request_no_quota_can_ever_hold_fails_in_seconds_with_batchs_words(covalent_server, local_stack):
    """A quota whose limit is 0 is never raised by waiting: the job is cancelled and the electron
    fails as soon as a read sees Batch's event, not at queue_timeout (dsub #303, Nextflow #5550)."""
    quota = CAPACITY_EVENTS["quota"].format(quota="GPUS_ALL_REGIONS", limit="0.0", region=local_stack.region)
    batch_admin(local_stack, "faults", {"no_capacity": {"*": quota}})
    executor = GCPBatchExecutor(queue_timeout=3600, reconcile_interval=2, time_limit=120, pack_window=0)
    dispatch_id, result, elapsed = run_flow(one_node_flow(executor, lambda: 1), timeout_s=SETTLE_S)
    node = nodes_by_name(result)["task"]
    assert str(node["status"]) == "FAILED"
    assert "GPUS_ALL_REGIONS" in node["stderr"] and "cannot place" in node["stderr"], node["stderr"]
    assert elapsed < SETTLE_S
    (job,) = ended_jobs_of_dispatch(local_stack, dispatch_id)
    assert job.status.state.name == "CANCELLED"


def test_an_electron_killed_for_memory_runs_again_with_more(covalent_server, local_stack, tmp_path):
    """memory_retry_factor=2: the first attempt is SIGKILLed (what the kernel's OOM killer does:
    exit 137, no outcome), the second runs with twice the memory (its address-space limit on the
    local stack shows it) and returns."""
    runs = tmp_path / "runs"

    def body(path):
        import os as _os
        import resource as _resource
        import signal as _signal

        with open(path, "a") as f:
            f.write("ran\n")
        if open(path).read().count("ran") == 1:
            _os.kill(_os.getpid(), _signal.SIGKILL)
        return _resource.getrlimit(_resource.RLIMIT_AS)[0]

    executor = GCPBatchExecutor(memory=256, memory_retry_factor=2, retries=2, time_limit=120, pack_window=0)
    dispatch_id, result, elapsed = run_flow(one_node_flow(executor, body), str(runs), timeout_s=SETTLE_S)
    assert str(result.status) == "COMPLETED", nodes_by_name(result)["task"]["stderr"]
    assert result.result == (512 + MEMORY_ALLOWANCE_MIB) * MIB
    first, second = by_creation(ended_jobs_of_dispatch(local_stack, dispatch_id))
    assert nonzero_exit_codes(first) == [137]
    assert (first.task_groups[0].task_spec.compute_resource.memory_mib,
            second.task_groups[0].task_spec.compute_resource.memory_mib) == (256, 512)
    assert "out of memory with memory=256 MiB" in nodes_by_name(result)["task"]["stderr"]
    assert runs.read_text() == "ran\nran\n"
    no_active_job_left(local_stack)


def test_a_memory_error_runs_again_with_more_and_without_the_factor_fails(covalent_server, local_stack):
    """The task's own MemoryError (the local stack enforces memory as an address-space limit) is
    an out-of-memory end too: with memory_retry_factor the next attempt has more; without, the
    electron fails with the MemoryError, run once."""

    def body():
        import resource as _resource

        limit = _resource.getrlimit(_resource.RLIMIT_AS)[0]
        if limit < 1536 * 1024 * 1024:
            return bytearray(limit)  # more than is left under the limit: MemoryError
        return limit

    retried = GCPBatchExecutor(memory=128, memory_retry_factor=8, retries=1, time_limit=120, pack_window=0)
    dispatch_id, result, _ = run_flow(one_node_flow(retried, body), timeout_s=SETTLE_S)
    assert str(result.status) == "COMPLETED" and result.result == (1024 + MEMORY_ALLOWANCE_MIB) * MIB
    first, second = by_creation(ended_jobs_of_dispatch(local_stack, dispatch_id))
    storage = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host)
    left = {protocol.job_id_of_job_name(job.name): [blob.name for blob in storage.list_blobs(
        local_stack.bucket_name, prefix=protocol.TaskObjects(protocol.job_id_of_job_name(job.name)).prefix)]
        for job in (first, second)}
    first_id, second_id = left
    assert left[first_id] == [], "the replaced attempt's MemoryError record and logs are removed"
    assert left[second_id] == [protocol.TaskObjects(second_id).result], "the delivered result is kept (lifecycle rule)"

    once = GCPBatchExecutor(memory=128, retries=1, time_limit=120, pack_window=0)
    dispatch_id, result, _ = run_flow(one_node_flow(once, body), timeout_s=SETTLE_S)
    node = nodes_by_name(result)["task"]
    assert str(node["status"]) == "FAILED" and "MemoryError" in node["stderr"]
    assert len(jobs_of_dispatch(local_stack, dispatch_id)) == 1
    no_active_job_left(local_stack)
