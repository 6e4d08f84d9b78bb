"""The Covalent contract, end to end on the local stack: output, errors, a task's exception run
once, cancel, queue_timeout, polling mode and clean-up, each through a real Covalent dispatch.
Preemption retried and time limit exceeded are in tests/stack/test_faults.py, with their bounds."""

from __future__ import annotations

import sys
import time

import cloudpickle
import covalent as ct
import pytest
from workflow_helpers import (nonzero_exit_codes, active_jobs, batch_admin, ended_jobs_of_dispatch, jobs_of_dispatch,
                              node_results, nodes_by_name, wait_for)

from covalent_gcpbatch_plugin import clients

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.stack


exit_codes = nonzero_exit_codes


def test_stdout_and_stderr_reach_the_node_and_an_exception_runs_once(covalent_server, local_stack, tmp_path):
    executor = ct.executor.GCPBatchExecutor(time_limit=120, retries=3)
    attempts = tmp_path / "attempts"

    @ct.electron(executor=executor)
    def chatty(marker: str):
        import sys as _sys

        print("to stdout")
        print("to stderr", file=_sys.stderr)
        with open(marker, "a") as f:
            f.write("attempt\n")
        raise RuntimeError("user code failed")

    @ct.lattice
    def flow(marker):
        return chatty(marker)

    dispatch_id = ct.dispatch(flow)(str(attempts))
    result = wait_for(dispatch_id)
    node = nodes_by_name(result)["chatty"]
    assert str(node["status"]) == "FAILED"
    assert node["stdout"] == "to stdout\n"
    assert node["stderr"].startswith("to stderr\n")
    assert "RuntimeError: user code failed" in node["stderr"]
    assert attempts.read_text() == "attempt\n", "a task's own exception must not be retried"
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    assert exit_codes(job) == [10]


def test_cancel_stops_running_and_queued_jobs(covalent_server, local_stack):
    # One job per electron (pack_window=0): a pack's cancel is tests/stack/test_packing.py's.
    executor = ct.executor.GCPBatchExecutor(time_limit=300, pack_window=0)

    @ct.electron(executor=executor)
    def sleeper(i):
        import time as _time

        _time.sleep(120)
        return i

    @ct.lattice
    def flow():
        return [sleeper(i) for i in range(3)]

    dispatch_id = ct.dispatch(flow)()
    # The local Batch service runs two workers at once: wait for two RUNNING and one QUEUED.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = sorted(job.status.state.name for job in jobs_of_dispatch(local_stack, dispatch_id))
        if states == ["QUEUED", "RUNNING", "RUNNING"]:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"never saw two running and one queued job: {states}")

    started = time.monotonic()
    ct.cancel(dispatch_id)
    result = wait_for(dispatch_id, timeout_s=60)
    assert str(result.status) == "CANCELLED"
    sleepers = [n for n in node_results(result) if n["node_name"] == "sleeper"]
    assert [str(n["status"]) for n in sleepers] == ["CANCELLED"] * 3
    assert time.monotonic() - started < 60, "cancelled, not the sleepers' 120 s"
    assert sorted(job.status.state.name for job in ended_jobs_of_dispatch(local_stack, dispatch_id)) == ["CANCELLED"] * 3
    assert active_jobs(local_stack) == []


def test_polling_mode_completes_and_reads_the_job(covalent_server, local_stack):
    executor = ct.executor.GCPBatchExecutor(time_limit=120, wait_mode="poll", poll_freq=0.5)

    @ct.electron(executor=executor)
    def triple(x):
        return 3 * x

    @ct.lattice
    def flow(x):
        return triple(x)

    reads_before = batch_admin(local_stack, "stats")["calls"]["get"]
    result = wait_for(ct.dispatch(flow)(7))
    assert str(result.status) == "COMPLETED" and result.result == 21
    assert batch_admin(local_stack, "stats")["calls"]["get"] > reads_before


@pytest.mark.parametrize("keep", [False, True])
def test_task_objects_are_removed_unless_kept(covalent_server, local_stack, keep):
    executor = ct.executor.GCPBatchExecutor(time_limit=120, keep_artifacts=keep)

    @ct.electron(executor=executor)
    def one():
        print("kept?")
        return 1

    @ct.lattice
    def flow():
        return one()

    dispatch_id = ct.dispatch(flow)()
    assert str(wait_for(dispatch_id).status) == "COMPLETED"
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    job_id = job.name.rsplit("/", 1)[-1]
    storage = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host)
    prefix = f"covalent-gcpbatch/{job_id}/"
    names = sorted(b.name.removeprefix(prefix) for b in storage.list_blobs(local_stack.bucket_name, prefix=prefix))
    # The result stays either way (the bucket's lifecycle rule removes it): Covalent's server may
    # die between the executor's return and its own record of the result.
    assert names == (["attempt-0/stderr.log", "attempt-0/stdout.log", "result.pkl"] if keep else ["result.pkl"])
    tasks = sorted(b.name.removeprefix(prefix) for b in storage.list_blobs(local_stack.task_bucket_name, prefix=prefix))
    assert tasks == (["task.pkl"] if keep else []), "the task object is in the task bucket, and only it"


def test_queue_timeout_cancels_a_job_that_cannot_start(covalent_server, local_stack):
    """The local Batch service runs two workers at once: with both busy, a third job waits past its bound."""
    busy = ct.executor.GCPBatchExecutor(time_limit=300, pack_window=0)  # two jobs fill the two local workers
    impatient = ct.executor.GCPBatchExecutor(time_limit=300, queue_timeout=3)

    @ct.electron(executor=busy)
    def hog(i):
        import time as _time

        _time.sleep(120)
        return i

    @ct.electron(executor=impatient)
    def waiter():
        return "started"

    @ct.lattice
    def hogs():
        return [hog(i) for i in range(2)]

    @ct.lattice
    def wait_flow():
        return waiter()

    hogs_id = ct.dispatch(hogs)()
    try:
        deadline = time.monotonic() + 60
        while sorted(j.status.state.name for j in jobs_of_dispatch(local_stack, hogs_id)) != ["RUNNING", "RUNNING"]:
            assert time.monotonic() < deadline, "the two hogs never ran"
            time.sleep(0.3)
        started = time.monotonic()
        waiter_id = ct.dispatch(wait_flow)()
        node = nodes_by_name(wait_for(waiter_id, timeout_s=60))["waiter"]
        assert str(node["status"]) == "FAILED"
        assert "did not start within queue_timeout=3" in node["stderr"]
        assert "the job was cancelled" in node["stderr"]
        assert time.monotonic() - started < 60, "queue_timeout=3 s, not the hogs' 120 s"
        assert [j.status.state.name for j in ended_jobs_of_dispatch(local_stack, waiter_id)] == ["CANCELLED"]
    finally:
        ct.cancel(hogs_id)
        wait_for(hogs_id, timeout_s=60)
    assert active_jobs(local_stack) == []


def test_the_function_is_invoked_once_per_task(covalent_server, local_stack):
    """A storage trigger fires for every object written in its bucket and cannot filter by prefix:
    with outputs beside the tasks, every live-output chunk, log and result invoked the function.
    Task objects and pack manifests have a bucket of their own, so a lone electron that prints for
    a while (a live chunk every 2 s) invokes it once, and a pack of 3 electrons 4 times (its task
    objects and its manifest). (Before: 7 or more invocations for the lone electron.)"""
    import uuid

    from workflow_helpers import bridge_log, wait_for_delivery

    from covalent_gcpbatch_plugin import protocol

    @ct.electron(executor=ct.executor.GCPBatchExecutor(time_limit=120, pack_window=0))
    def talkative():
        import time as _time

        for second in range(5):
            print(f"second {second}", flush=True)
            _time.sleep(1)
        return "said"

    packed = ct.executor.GCPBatchExecutor(time_limit=120)

    @ct.electron(executor=packed)
    def square(i):
        print(i)
        return i * i

    @ct.lattice
    def flow():
        return [talkative(), *(square(i) for i in range(3))]

    dispatch_id = ct.dispatch(flow)()
    result = wait_for(dispatch_id)
    assert str(result.status) == "COMPLETED" and result.result == ["said", 0, 1, 4]
    # Deliveries are in the order of the writes: once a later object's is through, theirs are too.
    sentinel = f"sentinel/{uuid.uuid4().hex}"
    storage = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host)
    storage.bucket(local_stack.task_bucket_name).blob(sentinel).upload_from_string(b"")
    wait_for_delivery(local_stack, sentinel, 200)
    delivered = [line for line in bridge_log(local_stack).read_text().splitlines() if " attempt=" in line]
    jobs = {job.name.rsplit("/", 1)[-1]: job for job in jobs_of_dispatch(local_stack, dispatch_id)}
    (pack_id,) = [job_id for job_id in jobs if protocol.is_pack_id(job_id)]
    (lone_id,) = [job_id for job_id in jobs if job_id != pack_id]
    lone = [line for line in delivered if f" {protocol.TaskObjects(lone_id).prefix}" in line]
    assert len(lone) == 1 and f" {protocol.TaskObjects(lone_id).task} " in lone[0], lone
    prefix = f" {protocol.TASKS_PREFIX}{protocol.make_job_id(dispatch_id, 0, 'x').rsplit('-', 2)[0]}-"
    of_dispatch = [line for line in delivered if prefix in line]
    assert len(of_dispatch) == 1 + 3 + 1, of_dispatch
