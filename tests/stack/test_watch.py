"""Watching a task while it runs: `covalent-gcpbatch logs --follow`, `jobs`, `cost`, on the local
stack, through a real Covalent dispatch and the real worker's live output."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import covalent as ct
import pytest
from workflow_helpers import batch_admin, ended_jobs_of_dispatch, jobs_of_dispatch, wait_for

from covalent_gcpbatch_plugin import protocol
from covalent_gcpbatch_plugin.gcpbatch import GCPBatchExecutor
from covalent_gcpbatch_plugin.worker import Tee

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.stack
CLI = str(Path(sys.executable).with_name("covalent-gcpbatch"))
TICKS = 10


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


def test_output_jobs_and_cost_while_a_task_runs(covalent_server, local_stack):
    executor = GCPBatchExecutor(time_limit=120, keep_artifacts=True)

    @ct.electron(executor=executor)
    def ticker():
        import time as _time

        for i in range(TICKS):
            print(f"tick {i}", flush=True)
            _time.sleep(1)
        return "done"

    @ct.lattice
    def flow():
        return ticker()

    dispatch_id = ct.dispatch(flow)()
    deadline = time.monotonic() + 60
    while not jobs_of_dispatch(local_stack, dispatch_id):
        assert time.monotonic() < deadline, "no Batch job for the dispatch"
        time.sleep(0.2)
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    job_id = protocol.job_id_of_job_name(job.name)

    follow = subprocess.Popen([CLI, "logs", dispatch_id, "0", "--follow"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    first_tick = threading.Event()
    state_at_first_tick: list[str] = []

    def read() -> None:
        for line in follow.stdout:
            lines.append(line)
            if line.startswith("tick ") and not first_tick.is_set():
                state_at_first_tick.append(batch_admin(local_stack, "stats")["jobs"][job_id].keys().__repr__())
                first_tick.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert first_tick.wait(60), f"no output while the task ran: {lines} {follow.stderr.read() if follow.poll() is not None else ''}"
        assert "SUCCEEDED" not in state_at_first_tick[0], "the first line arrived before the task ended"
        listed = cli("jobs", dispatch_id)
        assert listed.returncode == 0, listed.stderr
        (row,) = [line for line in listed.stdout.splitlines() if line.startswith(job_id)]
        assert "RUNNING" in row and " 0 " in f" {row.split()[3]} "
        assert follow.wait(90) == 0, follow.stderr.read()
    finally:
        if follow.poll() is None:
            follow.kill()
    reader.join(10)
    assert [line.strip() for line in lines if line.startswith("tick ")] == [f"tick {i}" for i in range(TICKS)]
    assert lines[0].startswith(f"== node 0 (Batch job {job_id})")

    result = wait_for(dispatch_id)
    assert str(result.status) == "COMPLETED" and result.result == "done"

    # cost: the VM-seconds of the job's status events, against the service's own clock
    report = cli("cost", dispatch_id)
    assert report.returncode == 0, report.stderr
    vm = float(re.search(rf"job {job_id} SUCCEEDED: VM ([0-9.]+) s \(billed (\d+) s\)", report.stdout).group(1))
    times = batch_admin(local_stack, "stats")["jobs"][job_id]
    measured = times["SUCCEEDED"] - times["SCHEDULED"]
    assert measured >= TICKS and abs(vm - measured) <= 0.1 * measured, (vm, measured)
    assert "billed 60 s" in report.stdout, "a VM is billed at least a minute"
    assert "on demand" in report.stdout


def test_logs_without_follow_and_of_an_unknown_dispatch(local_stack):
    unknown = cli("logs", "00000000-no-such-dispatch")
    assert unknown.returncode == 1 and "No task objects" in unknown.stdout
    nothing = cli("cost", "00000000-no-such-dispatch")
    assert nothing.returncode == 1 and "No Batch job" in nothing.stdout


def test_output_keeps_its_tail_when_a_task_prints_too_much():
    class Sink:
        def write(self, text):
            return len(text)

        def flush(self):
            pass

    tee = Tee(Sink(), limit=100)
    for i in range(50):
        tee.write(f"line {i:03d}\n")  # 9 characters each: 450 in all
    text = tee.getvalue()
    assert text.startswith("[covalent-gcpbatch: the first ") and "characters of this output were cut]" in text
    assert text.endswith("line 049\n") and len(text.split("]\n", 1)[1]) <= 100
    since, position = tee.since(441)
    assert (since, position) == ("line 049\n", 450)


def test_jobs_cancel_spares_what_a_running_dispatch_waits_for(covalent_server, local_stack, tmp_path):
    """`jobs --cancel` is for jobs a dead Covalent server left behind: one a live dispatch still
    waits for is kept; the same job, once no server runs its dispatch, is cancelled."""
    import io

    from covalent_gcpbatch_plugin import watch

    started = tmp_path / "started"

    @ct.electron(executor=GCPBatchExecutor(time_limit=120))
    def waits(path):
        import time as _time

        open(path, "w").close()
        _time.sleep(60)

    @ct.lattice
    def flow(path):
        return waits(path)

    dispatch_id = ct.dispatch(flow)(str(started))
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.2)
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    job_id = protocol.job_id_of_job_name(job.name)

    kept = cli("jobs", dispatch_id, "--cancel")
    assert kept.returncode == 0 and f"kept {job_id}: Covalent still runs dispatch" in kept.stdout, kept.stdout + kept.stderr

    out = io.StringIO()
    assert watch.jobs(dispatch_id, cancel=True, out=out, is_running=lambda dispatch: False) == 0  # as if the server died
    assert f"cancelled {job_id}" in out.getvalue()
    result = wait_for(dispatch_id, timeout_s=60)
    assert str(result.status) in ("CANCELLED", "FAILED")
    assert ended_jobs_of_dispatch(local_stack, dispatch_id)[0].status.state.name == "CANCELLED"


def test_jobs_asks_batch_for_this_deployments_jobs_of_the_dispatch(local_stack):
    """`jobs` sends its labels as the ListJobs filter (one request, no paging through the region's
    jobs) and keeps what Batch returns: a job another tool created with the same dispatch label,
    or one of another dispatch, never reaches it (the local service applies the filter as Batch
    does)."""
    import io
    import uuid

    from google.cloud import batch_v1

    from covalent_gcpbatch_plugin import clients, watch

    batch = clients.batch_client(local_stack.batch_api_endpoint)
    parent = protocol.location_name(local_stack.project_id, local_stack.region)
    dispatch = f"filter-{uuid.uuid4().hex[:8]}"
    container = batch_v1.Runnable.Container(image_uri="local/worker:dev")

    def create(labels: dict[str, str]) -> str:
        job = batch_v1.Job(task_groups=[batch_v1.TaskGroup(task_spec=batch_v1.TaskSpec(
            runnables=[batch_v1.Runnable(container=container)]))], labels=labels)
        return batch.create_job(parent=parent, job_id=f"{dispatch}-{len(labels)}-{uuid.uuid4().hex[:6]}", job=job).name

    mine = create({"created-by": "covalent-gcpbatch", "covalent-dispatch-id": dispatch, "covalent-node-id": "0"})
    other_tool = create({"created-by": "someone-else", "covalent-dispatch-id": dispatch})
    other_dispatch = create({"created-by": "covalent-gcpbatch", "covalent-dispatch-id": f"{dispatch}-x",
                             "covalent-node-id": "0", "x": "y"})
    try:
        sent = f'labels."created-by" = "covalent-gcpbatch" AND labels."covalent-dispatch-id" = "{dispatch}"'
        before = batch_admin(local_stack, "stats")
        out = io.StringIO()
        assert watch.jobs(dispatch, cancel=False, out=out) == 0
        assert [row.split()[0] for row in out.getvalue().splitlines()[1:]] == [mine.rsplit("/", 1)[-1]], out.getvalue()
        after = batch_admin(local_stack, "stats")
        assert after["calls"]["list"] == before["calls"]["list"] + 1
        assert after["list_filters"].get(sent, 0) == before["list_filters"].get(sent, 0) + 1, after["list_filters"]
        assert {mine, other_tool, other_dispatch} <= {j.name for j in batch.list_jobs(parent=parent)}
    finally:
        for name in (mine, other_tool, other_dispatch):
            batch.delete_job(name=name).result(timeout=30)
