"""Warm VMs end to end through Covalent on the local stack: a chain's electrons run on the VM of
its first electron's job, each with its own result, error, isolation, time limit and cancel; a
warm VM killed mid-electron costs that electron one more attempt, never its result. The contract
is protocol/warm.py; the routing is tests/stack/test_function.py's."""

from __future__ import annotations

import sys

import cloudpickle
import covalent as ct
import pytest
from workflow_helpers import (
    batch_admin,
    failure_details,
    jobs_of_dispatch,
    no_active_job_left,
    node_results,
    nodes_by_name,
    run_flow,
    wait_for,
    wait_until,
)

from covalent_gcpbatch_plugin import clients, protocol
from covalent_gcpbatch_plugin.gcpbatch import GCPBatchExecutor
from covalent_gcpbatch_plugin.jobs import NODE_LABEL
from covalent_gcpbatch_plugin.local.batch.runner import MEMORY_ALLOWANCE_MIB

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.stack

#: A bound for a machine three times slower than ours (speed is bench/'s to measure).
SETTLE_S = 120
#: Long enough to bridge Covalent's own gap between two electrons of a chain on a slow machine.
KEEP_WARM_S = 30


@pytest.fixture(autouse=True)
def clean_faults(local_stack):
    # Alone on the local Batch service: earlier tests' warm VMs (test_function's wait up to a
    # minute) hold its VMs, and these tests count jobs and kill the running worker.
    no_active_job_left(local_stack, within_s=protocol.MAX_KEEP_WARM_S)
    batch_admin(local_stack, "reset", {})
    yield
    batch_admin(local_stack, "reset", {})


def warm_executor(**options) -> GCPBatchExecutor:
    return GCPBatchExecutor(**{"keep_warm": KEEP_WARM_S, "pack_window": 0, "time_limit": 60, "retries": 1, **options})


def claimed(stack, node_id: int, dispatch_id: str) -> list[str]:
    """The claims of a node's attempts (one per attempt that something ran)."""
    storage = clients.storage_client(stack.project_id, stack.storage_emulator_host)
    prefix = protocol.dispatch_prefix(dispatch_id, node_id)
    return [blob.name for blob in storage.list_blobs(stack.bucket_name, prefix=prefix) if blob.name.endswith("/claim.json")]


def test_a_chain_runs_on_one_warm_vm_each_electron_in_a_fresh_process(covalent_server, local_stack):
    """Three electrons, each taking the one before's result: one Batch job (one VM boot) runs
    them all. What one electron leaves in its environment, its directory or its modules, the next
    does not see; each has its own result."""
    executor = warm_executor()

    @ct.electron(executor=executor)
    def leave_traces() -> int:
        import os as _os
        import types as _types

        _os.environ["LEFT_BY_FIRST"] = "1"
        open("left-by-first.txt", "w").write("x")
        sys.modules["left_by_first"] = _types.ModuleType("left_by_first")
        return _os.getpid()

    @ct.electron(executor=executor)
    def look(first_pid: int) -> dict:
        import os as _os

        return {"env": "LEFT_BY_FIRST" in _os.environ, "file": _os.path.exists("left-by-first.txt"),
                "module": "left_by_first" in sys.modules, "same_process": _os.getpid() == first_pid,
                "pid": _os.getpid()}

    @ct.electron(executor=executor)
    def last(seen: dict) -> dict:
        return seen

    @ct.lattice
    def chain():
        return last(look(leave_traces()))

    dispatch_id, result, _ = run_flow(chain, timeout_s=SETTLE_S)
    nodes = nodes_by_name(result)
    assert str(result.status) == "COMPLETED", {name: node["stderr"] for name, node in nodes.items()}
    assert {k: v for k, v in result.result.items() if k != "pid"} == {
        "env": False, "file": False, "module": False, "same_process": False}
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    first = protocol.job_id_of_job_name(job.name)
    for name in ("look", "last"):
        assert f"runs on the warm VM of Batch job {first}" in nodes[name]["stderr"], nodes[name]["stderr"]
    no_active_job_left(local_stack, within_s=KEEP_WARM_S + SETTLE_S)  # the VM exits when none comes
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    assert job.status.state.name == "SUCCEEDED"


def test_with_packing_on_a_fan_out_takes_the_waiting_vm_and_packs_the_rest(covalent_server, local_stack):
    """Packing on: of two electrons that reach run() together once a warm VM of their spec
    waits, one skips the pack window and runs on that VM; the other, with no VM left for it, packs
    as usual, alone: when its window closes it runs on the VM if that waits again, else on a job of
    its own. Neither is held in a pack the waiting VM could not run (before: one pack of both)."""
    executor = warm_executor(pack_window=2.0)

    @ct.electron(executor=executor)
    def first() -> int:
        return 1

    @ct.electron(executor=executor)
    def then(x: int, i: int) -> int:
        return x + i

    @ct.lattice
    def fan_out():
        x = first()
        return [then(x, 1), then(x, 2)]

    dispatch_id, result, _ = run_flow(fan_out, timeout_s=SETTLE_S)
    assert str(result.status) == "COMPLETED" and result.result == [2, 3], failure_details(result)
    first_job = [j for j in jobs_of_dispatch(local_stack, dispatch_id)
                 if j.labels.get(NODE_LABEL) == str(nodes_by_name(result)["first"]["node_id"])]
    runner = protocol.job_id_of_job_name(first_job[0].name)
    thens = [n for n in node_results(result) if n["node_name"] == "then"]
    on_vm = [n for n in thens if f"runs on the warm VM of Batch job {runner}" in (n["stderr"] or "")]
    assert on_vm, [n["stderr"] for n in thens]
    jobs = [protocol.job_id_of_job_name(j.name) for j in jobs_of_dispatch(local_stack, dispatch_id)]
    assert not any(protocol.is_pack_id(j) for j in jobs), jobs
    assert len(jobs) == 1 + len(thens) - len(on_vm), "each electron on the VM or on a job of its own"
    no_active_job_left(local_stack, within_s=KEEP_WARM_S + SETTLE_S)


def test_with_packing_on_each_electron_of_a_chain_goes_to_the_waiting_vm_at_once(covalent_server, local_stack):
    """Packing on with a long window: each electron of a chain after the first finds the VM the
    one before left waiting and is uploaded at once, not after the window (the VM the one before
    went for is free again once that one was routed). Its task object is created well within the
    window of its start (a margin of seconds, not a speed figure: that is bench/overhead.py's). The
    upload is what the executor decides; the claim may come a keep_warm later when the Pub/Sub
    emulator swallows the offer's message (the VM then reads its taken record as its wait ends)."""
    window = 10.0  # the most pack_window may be
    executor = warm_executor(pack_window=window, keep_artifacts=True)  # the task objects stay

    @ct.electron(executor=executor)
    def step(x: int) -> int:
        return x + 1

    @ct.lattice
    def chain():
        return step(step(step(0)))

    dispatch_id, result, _ = run_flow(chain, timeout_s=SETTLE_S)
    assert str(result.status) == "COMPLETED" and result.result == 3, failure_details(result)
    storage = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host)
    later = sorted((n for n in node_results(result) if n["node_name"] == "step"), key=lambda n: n["start_time"])[1:]
    for node in later:
        assert "runs on the warm VM of Batch job" in (node["stderr"] or ""), node["stderr"]
        (task,) = [blob for blob in storage.list_blobs(local_stack.task_bucket_name,
                                                       prefix=protocol.dispatch_prefix(dispatch_id, node["node_id"]))
                   if blob.name.endswith("/" + protocol.TASK_OBJECT)]
        started = node["start_time"].replace(tzinfo=task.time_created.tzinfo)
        assert (task.time_created - started).total_seconds() < window / 2, (node["node_id"], task.time_created, started)
    no_active_job_left(local_stack, within_s=KEEP_WARM_S + SETTLE_S)


def test_an_electron_killed_on_a_warm_vm_runs_again_with_more_memory(covalent_server, local_stack, tmp_path):
    """memory_retry_factor on a warm VM: the electron's process is SIGKILLed there (what the
    kernel's OOM killer does), the VM's error record calls it out of memory as a job's exit 137
    is, and the next attempt runs on a job of its own with twice the memory, and returns."""
    runs = tmp_path / "runs"
    executor = warm_executor(memory=256, memory_retry_factor=2, retries=2)

    @ct.electron(executor=executor)
    def first() -> int:
        return 1

    @ct.electron(executor=executor)
    def greedy(x: int, path: str) -> int:
        import os as _os
        import resource as _resource
        import signal as _signal

        with open(path, "a") as f:
            f.write("ran\n")
        if open(path).read().count("ran") == 1:
            _os.kill(_os.getpid(), _signal.SIGKILL)
        return _resource.getrlimit(_resource.RLIMIT_AS)[0]

    @ct.lattice
    def flow(path: str):
        return greedy(first(), path)

    dispatch_id, result, _ = run_flow(flow, str(runs), timeout_s=SETTLE_S)
    stderr = nodes_by_name(result)["greedy"]["stderr"] or ""
    assert str(result.status) == "COMPLETED", failure_details(result)
    assert result.result == (512 + MEMORY_ALLOWANCE_MIB) * 1024 * 1024
    assert "runs on the warm VM of Batch job" in stderr and "out of memory with memory=256 MiB" in stderr, stderr
    assert runs.read_text() == "ran\nran\n"
    memories = sorted(j.task_groups[0].task_spec.compute_resource.memory_mib for j in jobs_of_dispatch(local_stack, dispatch_id))
    assert memories == [256, 512], "first's VM (which ran greedy's first attempt), then greedy's own job"
    no_active_job_left(local_stack, within_s=KEEP_WARM_S + SETTLE_S)


def test_a_cancelled_warm_electron_stops_alone(covalent_server, local_stack):
    """Cancelling the workflow while its second electron runs on the first's warm VM: that
    electron ends CANCELLED (its marker; Batch cannot cancel one electron of a VM), and the VM's
    job is not cancelled for it."""
    executor = warm_executor()

    @ct.electron(executor=executor)
    def first() -> int:
        return 1

    @ct.electron(executor=executor)
    def sleeps(x: int) -> int:
        import time as _time

        _time.sleep(120)
        return x

    @ct.lattice
    def flow():
        return sleeps(first())

    dispatch_id = ct.dispatch(flow)()
    wait_until(lambda: claimed(local_stack, 1, dispatch_id), SETTLE_S, "the second electron claimed")
    ct.cancel(dispatch_id)
    result = wait_for(dispatch_id, timeout_s=SETTLE_S)
    nodes = nodes_by_name(result)
    assert str(nodes["sleeps"]["status"]) == "CANCELLED", nodes["sleeps"]["stderr"]
    vm = [job for job in jobs_of_dispatch(local_stack, dispatch_id)
          if protocol.node_id_of_job_id(protocol.job_id_of_job_name(job.name)) == 0]
    assert [job.status.state.name for job in vm] != ["CANCELLED"], "the first electron's VM is not cancelled for the second"
    no_active_job_left(local_stack, within_s=KEEP_WARM_S + SETTLE_S)


def test_a_warm_vm_killed_mid_electron_runs_the_electron_again(covalent_server, local_stack, tmp_path):
    """The warm VM dies (SIGKILL of its worker) while it runs the chain's second electron, whose
    outcome is not stored yet: the electron's executor hears the VM's task fail and runs the
    electron again as a new attempt (it spends `retries`); the first electron's result stands."""
    runs = tmp_path / "runs"
    executor = warm_executor(retries=1)

    @ct.electron(executor=executor)
    def first() -> int:
        return 20

    @ct.electron(executor=executor)
    def slow(x: int, path: str) -> int:
        import time as _time

        with open(path, "a") as f:
            f.write("ran\n")
        if open(path).read().count("ran") == 1:
            _time.sleep(120)
        return x + 1

    @ct.lattice
    def flow(path: str):
        return slow(first(), path)

    dispatch_id = ct.dispatch(flow)(str(runs))
    wait_until(lambda: runs.exists(), SETTLE_S, "the second electron running on the warm VM")
    batch_admin(local_stack, "faults", {"kill_running": 1})
    result = wait_for(dispatch_id, timeout_s=SETTLE_S)
    nodes = nodes_by_name(result)
    assert str(result.status) == "COMPLETED" and result.result == 21, nodes["slow"]["stderr"]
    assert runs.read_text() == "ran\nran\n"
    assert "was lost while it ran the electron" in nodes["slow"]["stderr"], nodes["slow"]["stderr"]
    assert len(claimed(local_stack, 1, dispatch_id)) == 2, "two attempts, each claimed once"
    no_active_job_left(local_stack, within_s=KEEP_WARM_S + SETTLE_S)



def test_a_warm_electron_keeps_its_own_error_time_limit_and_cancel(covalent_server, local_stack):
    """On a warm VM: an electron that raises fails with its own error; one over its time limit is
    stopped (just it: the VM waits again and takes the next); the VM's job is never cancelled for
    its electrons."""
    executor = warm_executor(time_limit=10)

    @ct.electron(executor=executor)
    def first() -> int:
        return 1

    @ct.electron(executor=executor)
    def too_long(x: int) -> int:
        import time as _time

        _time.sleep(120)
        return x

    @ct.electron(executor=executor)
    def raises(x: int) -> int:
        raise ValueError(f"bad input {x}")

    @ct.lattice
    def flow():
        one = first()
        return too_long(one), raises(one)

    dispatch_id = ct.dispatch(flow)()
    result = wait_for(dispatch_id, timeout_s=SETTLE_S)
    nodes = nodes_by_name(result)
    assert str(nodes["first"]["status"]) == "COMPLETED"
    assert str(nodes["raises"]["status"]) == "FAILED" and "bad input 1" in nodes["raises"]["stderr"], nodes["raises"]
    assert str(nodes["too_long"]["status"]) == "FAILED"
    assert "longer than its time_limit of 10 s" in nodes["too_long"]["stderr"], nodes["too_long"]["stderr"]
    jobs = jobs_of_dispatch(local_stack, dispatch_id)
    assert any("warm VM" in node["stderr"] for node in (nodes["too_long"], nodes["raises"])), "one of them ran warm"
    assert 2 <= len(jobs), "two electrons at once, one warm VM: the other electron had a job of its own"
    no_active_job_left(local_stack, within_s=KEEP_WARM_S + SETTLE_S)
    assert {job.status.state.name for job in jobs_of_dispatch(local_stack, dispatch_id)} == {"SUCCEEDED"}

def idle_records_of(stack, runner: str) -> list[str]:
    storage = clients.storage_client(stack.project_id, stack.storage_emulator_host)
    return [blob.name for blob in storage.list_blobs(stack.bucket_name, prefix=protocol.WARM_PREFIX)
            if (protocol.idle_of_name(blob.name) or ("", "", 0))[1] == runner]


def test_an_offer_to_a_warm_vm_that_died_idle_gets_the_electrons_own_job(covalent_server, local_stack, tmp_path):
    """The warm VM dies while it waits (its idle record still live): the next electron is offered
    to it, nobody claims it, and at the offer's take_by its executor asks for the electron's own
    job (the cold object), which runs it. Bounded by seconds, not by submit_timeout."""
    gate_file = tmp_path / "go"
    executor = warm_executor()

    @ct.electron(executor=executor)
    def first() -> int:
        return 1

    @ct.electron(executor="local")
    def gate(x: int, path: str) -> int:
        import os as _os
        import time as _time

        deadline = _time.monotonic() + 120
        while not _os.path.exists(path) and _time.monotonic() < deadline:
            _time.sleep(0.1)
        return x

    @ct.electron(executor=executor)
    def second(x: int) -> int:
        return x + 1

    @ct.lattice
    def flow(path: str):
        return second(gate(first(), path))

    dispatch_id = ct.dispatch(flow)(str(gate_file))
    wait_until(lambda: len(jobs_of_dispatch(local_stack, dispatch_id)) == 1, SETTLE_S, "the first electron's job")
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    runner = protocol.job_id_of_job_name(job.name)
    wait_until(lambda: idle_records_of(local_stack, runner), SETTLE_S, "the first electron's VM waiting")
    batch_admin(local_stack, "faults", {"kill_running": 1})
    wait_until(lambda: jobs_of_dispatch(local_stack, dispatch_id)[0].status.state.name == "FAILED", SETTLE_S,
               "the warm VM dead")
    gate_file.write_text("go")
    result = wait_for(dispatch_id, timeout_s=SETTLE_S)
    nodes = nodes_by_name(result)
    assert str(result.status) == "COMPLETED" and result.result == 2, {n: (v["stderr"], v.get("error")) for n, v in nodes.items()}
    assert "warm VM" not in (nodes["second"]["stderr"] or "")
    assert len(jobs_of_dispatch(local_stack, dispatch_id)) == 2, "the second electron's own job"
    no_active_job_left(local_stack, within_s=KEEP_WARM_S + SETTLE_S)


def test_jobs_cost_and_logs_show_a_chains_electrons_on_its_one_warm_vm(covalent_server, local_stack):
    """`jobs`, `cost` and `logs` of a chain that ran on one warm VM: the one job lists every node
    that ran on it, its VM is counted once, and each electron's output is its own, headed with
    the VM it ran on (the electrons after the first have no job of their own: their claims say where)."""
    import io

    from click.testing import CliRunner

    from covalent_gcpbatch_plugin import cli, watch

    executor = warm_executor(keep_artifacts=True)  # their output stays in their objects

    @ct.electron(executor=executor)
    def first() -> int:
        print("printed by the first", flush=True)
        return 1

    @ct.electron(executor=executor)
    def then(x: int) -> int:
        print(f"printed by the electron of {x}", flush=True)
        return x + 1

    @ct.lattice
    def chain():
        return then(then(first()))

    dispatch_id, result, _ = run_flow(chain, timeout_s=SETTLE_S)
    assert str(result.status) == "COMPLETED" and result.result == 3, failure_details(result)
    electrons = sorted(node["node_id"] for node in node_results(result) if node["node_name"] in ("first", "then"))
    assert len(electrons) == 3, node_results(result)
    no_active_job_left(local_stack, within_s=KEEP_WARM_S + SETTLE_S)  # the VM's whole life, ended
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    vm = protocol.job_id_of_job_name(job.name)

    rows: list[dict] = []
    assert watch.jobs(dispatch_id, cancel=False, out=io.StringIO(), show=rows.extend) == 0
    assert [(row["job"], row["nodes"], row["other_dispatches"]) for row in rows] == [
        (vm, [str(n) for n in electrons], 0)], rows

    report = watch.cost_report(dispatch_id, None)
    (used,) = report["jobs"]
    assert used["job"] == vm and used["nodes"] == [str(n) for n in electrons] and report["vms"] == 1
    assert report["vm_s"] == used["vm_s"] and report["usd"] == used["usd"] and report["shared_vms"] == []
    ran = batch_admin(local_stack, "stats")["jobs"][vm]
    assert abs(used["vm_s"] - (ran["SUCCEEDED"] - ran["SCHEDULED"])) <= 0.1 * used["vm_s"], (used, ran)

    out = io.StringIO()
    assert watch.logs(dispatch_id, None, follow=False, out=out) == 0
    text = out.getvalue()
    own, *warm = electrons
    assert f"== node {own} (Batch job {vm})\n" in text, text
    for node in warm:
        assert f"== node {node} (ran on the warm VM of Batch job {vm}; its own objects: " in text, text
    sections = text.split("== node ")[1:]
    assert [s.count("printed by") for s in sections] == [1] * len(electrons), text
    assert "printed by the electron of 2" in sections[-1], "each electron's own output under its own heading"

    for args in (("jobs", dispatch_id), ("cost", dispatch_id)):
        drawn = CliRunner().invoke(cli.app, list(args))
        assert drawn.exit_code == 0, drawn.output
        print(drawn.stdout)  # the report's example (pytest -s)
        (line,) = [line for line in drawn.stdout.splitlines() if line.startswith(vm)]
        assert line.rstrip().endswith(", ".join(str(n) for n in electrons)), drawn.stdout
