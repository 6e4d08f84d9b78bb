"""Packing on the local stack: a fan-out of electrons with the same job spec runs as ONE Batch job
with a task per electron, and every electron keeps its own life in Covalent (its result, its error,
its output, its cancel)."""

from __future__ import annotations

import math
import sys
import time

import cloudpickle
import covalent as ct
import pytest
from workflow_helpers import (batch_admin, ended_jobs_of_dispatch, failure_details, jobs_of_dispatch, nodes_by_name,
                              wait_for, wait_until)

from bench.report import TARGETS

from covalent_gcpbatch_plugin import clients, protocol, worker
from covalent_gcpbatch_plugin.local.batch.runner import MUTATING_CALLS

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.stack

FAN_OUT = 24


def pack_jobs(stack, dispatch_id: str) -> list:
    return [job for job in jobs_of_dispatch(stack, dispatch_id) if protocol.is_pack_id(protocol.job_id_of_job_name(job.name))]


def tasks_of(stack, job) -> list:
    batch = clients.batch_client(stack.batch_api_endpoint)
    return list(batch.list_tasks(parent=f"{job.name}/taskGroups/group0"))


def pack_members(stack, job) -> tuple[str, ...]:
    """The electrons' job ids in the pack's manifest, in task order."""
    bucket = clients.storage_client(stack.project_id, stack.storage_emulator_host).bucket(stack.task_bucket_name)
    manifest = bucket.blob(protocol.PackObjects(protocol.job_id_of_job_name(job.name)).manifest)
    return protocol.PackManifest.loads(manifest.download_as_bytes()).members


def task_exit_codes(task) -> list[int]:
    return [protocol.exit_code_of_event(e) for e in task.status.status_events if e.task_execution]


def dispatch_fan_out(stack, executor, size: int, failing: int, timeout_s: float, cancel=None):
    """Dispatch ``size`` electrons that each print their index and return its square, but for
    ``failing``, which raises; ``cancel(dispatch_id)``, if given, cancels some electrons and returns
    their node ids. Check that every electron's outcome and output are its own, and that the
    cancelled ones are CANCELLED. (The dispatch's result, the local Batch service's API calls.)"""

    @ct.electron(executor=executor)
    def square(i):
        print(f"electron {i} says hello")
        if i == failing:
            raise ValueError(f"electron {i} refuses")
        return i * i

    @ct.lattice
    def fan_out():
        return [square(i) for i in range(size)]

    before = batch_admin(stack, "stats")["calls"]
    dispatch_id = ct.dispatch(fan_out)()
    cancelled = cancel(dispatch_id) if cancel else set()
    result = wait_for(dispatch_id, timeout_s=timeout_s)
    after = batch_admin(stack, "stats")["calls"]

    nodes = [n for n in (result.get_node_result(i) for i in result.lattice.transport_graph._graph.nodes)
             if n["node_name"] == "square"]
    assert len(nodes) == size
    completed = {}
    for node in nodes:
        if node["node_id"] in cancelled:
            assert str(node["status"]) == "CANCELLED", (node["node_id"], node["status"])
        elif str(node["status"]) == "COMPLETED":
            completed[math.isqrt(node["output"].get_deserialized())] = node
        else:
            assert str(node["status"]) == "FAILED", failure_details(result)
            assert f"ValueError: electron {failing} refuses" in f"{node['error']}{node['stderr']}"
            assert node["stdout"].strip() == f"electron {failing} says hello"
    assert failing not in completed and len(completed) == size - 1 - len(cancelled), failure_details(result)
    for i, node in completed.items():
        assert node["output"].get_deserialized() == i * i
        assert node["stdout"].strip() == f"electron {i} says hello", "each electron's output is its own"
    return result, {call: after.get(call, 0) - before.get(call, 0) for call in after}


def test_a_fan_out_runs_as_one_job_and_each_electron_keeps_its_own_outcome(covalent_server, local_stack):
    """24 electrons, 4 at once: one create_job for all of them; each its own result and stdout; the
    one that raises fails alone, with its own error."""
    executor = ct.executor.GCPBatchExecutor(time_limit=120, pack_parallelism=4)
    result, calls = dispatch_fan_out(local_stack, executor, FAN_OUT, failing=5, timeout_s=600)

    (job,) = ended_jobs_of_dispatch(local_stack, result.dispatch_id)
    assert protocol.is_pack_id(protocol.job_id_of_job_name(job.name))
    assert job.task_groups[0].task_count == FAN_OUT and job.task_groups[0].parallelism == 4
    assert job.labels["covalent-pack-tasks"] == str(FAN_OUT)
    assert calls["create"] == 1, "one create_job for the whole fan-out"
    assert job.status.state.name == "FAILED", "Batch fails a job with a failed task; its electrons did not"
    states = sorted(t.status.state.name for t in tasks_of(local_stack, job))
    assert states == ["FAILED"] + ["SUCCEEDED"] * (FAN_OUT - 1)


LARGE_FAN_OUT = 200


@pytest.mark.timeout(900)
def test_a_fan_out_of_200_electrons_runs_packed_with_each_electron_its_own_outcome(covalent_server, local_stack):
    """The issue's scale: 200 electrons, 20 tasks at once. However Covalent paces the hand-over, the
    fan-out costs at most 0.05 Batch mutations per electron; every electron gets its own result and
    output, the one that raises fails alone, and the one cancelled before its task starts (the
    pack's last) is CANCELLED alone: its task is skipped by the worker (exit EXIT_CANCELLED)."""
    executor = ct.executor.GCPBatchExecutor(time_limit=300, pack_parallelism=20)
    skipped = {}

    def cancel_the_last_task(dispatch_id: str) -> set[int]:
        job = wait_until(lambda: pack_jobs(local_stack, dispatch_id), 300, "a pack's job was created")[0]
        members = pack_members(local_stack, job)
        node = protocol.node_id_of_job_id(members[-1])
        ct.cancel(dispatch_id, task_ids=[node])
        skipped.update(job=job, index=len(members) - 1)
        return {node}

    result, calls = dispatch_fan_out(local_stack, executor, LARGE_FAN_OUT, failing=137, timeout_s=780,
                                     cancel=cancel_the_last_task)
    batch = clients.batch_client(local_stack.batch_api_endpoint)
    task = wait_until(lambda: (t := batch.get_task(name=protocol.task_name(skipped["job"].name, skipped["index"])))
                      .status.state.name in ("FAILED", "SUCCEEDED", "UNEXECUTED") and t, 60,
                      "the cancelled electron's task ended")
    # Its code never ran: its worker skipped it (the marker), or the job's cancel, once no electron
    # of the pack was waited for any more, came first (never started, or stopped while starting).
    assert task.status.state.name != "SUCCEEDED"
    assert set(task_exit_codes(task)) <= {protocol.EXIT_CANCELLED, worker.EXIT_TERMINATED}, task_exit_codes(task)

    jobs = pack_jobs(local_stack, result.dispatch_id)
    assert jobs and len(jobs) == len(jobs_of_dispatch(local_stack, result.dispatch_id)), "every job of the fan-out is a pack"
    assert sum(job.task_groups[0].task_count for job in jobs) == LARGE_FAN_OUT
    mutations = sum(calls.get(call, 0) for call in MUTATING_CALLS)
    assert mutations / LARGE_FAN_OUT <= TARGETS["packing_mutations_per_electron"], \
        f"{mutations} Batch mutations for {LARGE_FAN_OUT} electrons"


def test_executors_that_differ_beyond_the_spec_pack_apart(covalent_server, local_stack):
    """Same job spec, but two executors with their own pack_parallelism: each gets its own pack, run
    at its own parallelism (one pack would run them all at the first executor's)."""
    two = ct.executor.GCPBatchExecutor(time_limit=120, pack_parallelism=2)
    three = ct.executor.GCPBatchExecutor(time_limit=120, pack_parallelism=3)

    @ct.electron(executor=two)
    def up(i):
        return i

    @ct.electron(executor=three)
    def down(i):
        return -i

    @ct.lattice
    def both():
        return [up(i) for i in range(3)] + [down(i) for i in range(3)]

    dispatch_id = ct.dispatch(both)()
    result = wait_for(dispatch_id, timeout_s=300)
    assert str(result.status) == "COMPLETED" and result.result == [0, 1, 2, 0, -1, -2], failure_details(result)
    shapes = sorted((job.task_groups[0].task_count, job.task_groups[0].parallelism) for job in pack_jobs(local_stack, dispatch_id))
    assert shapes == [(3, 2), (3, 3)]


def test_an_electron_waiting_its_turn_in_a_busy_pack_is_not_failed_by_its_queue_bound(covalent_server, local_stack):
    """Four electrons of 8 s on one VM (pack_parallelism=1): the last one's task waits about 30 s
    for its siblings while the pack runs. Its queue bound (queue_timeout=15 s) restarts when its
    pack starts running and counts the tasks ahead of it, so it completes. (Before: it gave up
    15 s after the pack's job was created and FAILED while its pack was busy.)"""
    executor = ct.executor.GCPBatchExecutor(time_limit=120, pack_parallelism=1, queue_timeout=15)

    @ct.electron(executor=executor)
    def slow(i):
        import time as _time

        _time.sleep(8)
        return i

    @ct.lattice
    def in_turn():
        return [slow(i) for i in range(4)]

    dispatch_id = ct.dispatch(in_turn)()
    result = wait_for(dispatch_id, timeout_s=300)
    assert str(result.status) == "COMPLETED" and result.result == [0, 1, 2, 3], failure_details(result)
    (job,) = pack_jobs(local_stack, dispatch_id)
    assert (job.task_groups[0].task_count, job.task_groups[0].parallelism) == (4, 1)


def test_cancelling_one_electron_cancels_only_it(covalent_server, local_stack, tmp_path):
    """Three electrons in a pack, one task at a time: the running one cancelled is stopped within
    10 s, the one not yet started never runs; the third completes."""
    executor = ct.executor.GCPBatchExecutor(time_limit=120, pack_parallelism=1)
    ran = tmp_path / "ran"
    ran.mkdir()

    @ct.electron(executor=executor)
    def slow(i, seconds, ran_dir):
        import pathlib
        import time as _time

        (pathlib.Path(ran_dir) / str(i)).touch()
        _time.sleep(seconds)
        return i

    @ct.lattice
    def three(ran_dir):
        return [slow(0, 60, ran_dir), slow(1, 2, ran_dir), slow(2, 60, ran_dir)]

    three.build_graph(str(ran))
    graph = three.transport_graph._graph
    slow_nodes = sorted(n for n, data in graph.nodes(data=True) if data["name"] == "slow")
    dispatch_id = ct.dispatch(three)(str(ran))

    (job,) = wait_until(lambda: pack_jobs(local_stack, dispatch_id), 120, "the pack's job was created")
    tasks = wait_until(lambda: [t for t in tasks_of(local_stack, job) if t.status.state.name == "RUNNING"], 120,
                       "a task of the pack started")
    running_index = int(tasks[0].name.rsplit("/", 1)[1])
    members = pack_members(local_stack, job)
    node_of_member = {m: protocol.node_id_of_job_id(m) for m in members}
    running_node = node_of_member[members[running_index]]
    # The electron sleeping 60 s that is not running yet (parallelism 1): it must be skipped.
    waiting_node = next(node_of_member[m] for i, m in enumerate(members)
                        if i != running_index and node_of_member[m] in (slow_nodes[0], slow_nodes[2]))
    waiting_index = members.index(next(m for m in members if node_of_member[m] == waiting_node))

    started = time.monotonic()
    ct.cancel(dispatch_id, task_ids=[running_node, waiting_node])
    batch = clients.batch_client(local_stack.batch_api_endpoint)
    stopped = wait_until(
        lambda: (t := batch.get_task(name=protocol.task_name(job.name, running_index))).status.state.name
        in ("FAILED", "SUCCEEDED") and t, 30, "the cancelled running task ended")
    assert time.monotonic() - started <= 10 + 1, "a running electron stops within 10 s of its cancel"
    assert task_exit_codes(stopped) == [protocol.EXIT_CANCELLED]

    result = wait_for(dispatch_id, timeout_s=300)
    statuses = {n: str(result.get_node_result(n)["status"]) for n in slow_nodes}
    other = next(n for n in slow_nodes if n not in (running_node, waiting_node))
    assert statuses[running_node] == "CANCELLED" and statuses[waiting_node] == "CANCELLED", statuses
    assert statuses[other] == "COMPLETED", (statuses, failure_details(result))
    # Skipped by its worker (the marker: exit EXIT_CANCELLED), or by the job's cancel once no
    # electron of the pack was waited for any more: its code never ran.
    wait_until(lambda: batch.get_task(name=protocol.task_name(job.name, waiting_index))
               .status.state.name in ("FAILED", "UNEXECUTED"), 60, "the waiting electron's task ended")
    started_code = {p.name for p in ran.iterdir()}
    assert str(slow_nodes.index(waiting_node)) not in started_code, "the waiting electron never ran"
    assert str(slow_nodes.index(other)) in started_code
    final = wait_until(lambda: (j := batch.get_job(name=job.name)).status.state.name in ("CANCELLED", "SUCCEEDED", "FAILED")
                       and j, 60, "the pack's job ended")
    assert final.status.state.name != "RUNNING"


def test_cancelling_every_electron_cancels_the_job(covalent_server, local_stack):
    executor = ct.executor.GCPBatchExecutor(time_limit=120, pack_parallelism=1)

    @ct.electron(executor=executor)
    def sleepy(i):
        import time as _time

        _time.sleep(60)
        return i

    @ct.lattice
    def four():
        return [sleepy(i) for i in range(4)]

    dispatch_id = ct.dispatch(four)()
    (job,) = wait_until(lambda: pack_jobs(local_stack, dispatch_id), 120, "the pack's job was created")
    wait_until(lambda: any(t.status.state.name == "RUNNING" for t in tasks_of(local_stack, job)), 120, "a task started")
    ct.cancel(dispatch_id)
    result = wait_for(dispatch_id, timeout_s=120)
    assert str(result.status) == "CANCELLED"
    statuses = {str(n["status"]) for n in nodes_by_name(result).values() if n["node_name"] == "sleepy"}
    assert statuses <= {"CANCELLED"}, statuses
    batch = clients.batch_client(local_stack.batch_api_endpoint)
    final = wait_until(lambda: (j := batch.get_job(name=job.name)).status.state.name == "CANCELLED" and j, 60,
                       "the pack's job was cancelled")
    assert final.status.state.name == "CANCELLED"


def test_an_electron_whose_task_stopped_for_its_cancel_marker_ends_cancelled(local_stack, tmp_path):
    """The soak found electrons of a cancelled dispatch ending FAILED ("exit code 13: the electron
    was cancelled"): their workers honoured the cancel marker before cancel()'s wake-up reached
    the waits (its thread hop queued behind others), so the task's FAILED message came first. A
    task that ends without an outcome while its marker is there was cancelled: CANCELLED, however
    the news arrived. Here the marker alone is written, the wake-up never comes."""
    import asyncio
    import io

    from covalent._shared_files.exceptions import TaskCancelledError
    from direct_executor import DirectExecutor

    config = {**local_stack.executor_config(), "time_limit": 120, "cache_dir": str(tmp_path / "cache"),
              "pack_window": 2.0, "pack_parallelism": 2, "reconcile_interval": 5}
    storage = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host)
    dispatch_id = f"marker-{time.time_ns()}"

    def body(i):
        import time as _time

        _time.sleep(30 if i else 3)
        return i

    async def one(i):
        executor = DirectExecutor(**config)
        executor._task_stdout, executor._task_stderr = io.StringIO(), io.StringIO()
        return await executor.run(body, [i], {}, {"dispatch_id": dispatch_id, "node_id": i})

    async def scenario():
        runs = [asyncio.create_task(one(i)) for i in range(2)]
        prefix = protocol.dispatch_prefix(dispatch_id, 1)
        task_object = await asyncio.to_thread(wait_until, lambda: list(storage.list_blobs(local_stack.task_bucket_name, prefix=prefix)),
                                              60, "electron 1's task was uploaded")
        job_id = protocol.job_id_of_task_object(task_object[0].name)
        await asyncio.sleep(4)  # its worker is running the 30 s body by now
        storage.bucket(local_stack.bucket_name).blob(protocol.TaskObjects(job_id).cancelled).upload_from_string(b"")
        return await asyncio.gather(*runs, return_exceptions=True)

    first, second = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert first == 0
    assert isinstance(second, TaskCancelledError), repr(second)


def test_a_pack_whose_create_was_delayed_leaves_no_object(local_stack, tmp_path):
    """The soak found a pack's create-delayed.txt (the function's record of a transient create
    error) left in the bucket after its electrons completed: a task's records go with its prefix,
    a pack's manifest alone was removed."""
    import asyncio
    import io

    from direct_executor import DirectExecutor

    config = {**local_stack.executor_config(), "time_limit": 120, "cache_dir": str(tmp_path / "cache"),
              "pack_window": 2.0, "reconcile_interval": 5}
    storage = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host)
    dispatch_id = f"delayed-{time.time_ns()}"

    async def one(i):
        executor = DirectExecutor(**config)
        executor._task_stdout, executor._task_stderr = io.StringIO(), io.StringIO()
        return await executor.run(lambda x: x * 2, [i], {}, {"dispatch_id": dispatch_id, "node_id": i})

    async def scenario():
        return await asyncio.gather(*(one(i) for i in range(2)))

    batch_admin(local_stack, "faults", {"fail_create": 1, "fail_create_status": 503})
    try:
        assert asyncio.run(asyncio.wait_for(scenario(), 120)) == [0, 2]
    finally:
        batch_admin(local_stack, "faults", {"fail_create": 0})
    assert batch_admin(local_stack, "stats")["faults"]["fail_create"] == 0, "the pack's create met the 503"
    left = [b.name for bucket in (local_stack.bucket_name, local_stack.task_bucket_name)
            for b in storage.list_blobs(bucket, prefix=protocol.dispatch_prefix(dispatch_id))]
    assert [name for name in left if not name.endswith("/" + protocol.RESULT_OBJECT)] == []
