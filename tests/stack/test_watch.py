"""Watching a task while it runs: `covalent-gcpbatch logs --follow`, `jobs`, `cost`, on the local
stack, through a real Covalent dispatch and the real worker's live output."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cloudpickle
import covalent as ct
import pytest
from workflow_helpers import batch_admin, ended_jobs_of_dispatch, jobs_of_dispatch, wait_for, wait_until

from covalent_gcpbatch_plugin import clients, protocol
from covalent_gcpbatch_plugin.gcpbatch import GCPBatchExecutor
from covalent_gcpbatch_plugin.worker import Tee

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.stack
CLI = str(Path(sys.executable).with_name("covalent-gcpbatch"))
TICKS = 10


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command, without a terminal (it never waits for an answer)."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env)


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
        listed = cli("jobs", dispatch_id, "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = [row for row in json.loads(listed.stdout) if row["job"] == job_id]
        assert row["state"] == "RUNNING" and row["node_id"] == "0" and row["dispatch_id"] == dispatch_id
        table = cli("jobs", dispatch_id)  # the same, drawn: one line per job
        (line,) = [line for line in table.stdout.splitlines() if line.startswith(job_id)]
        assert line.split()[1:4] == ["RUNNING", dispatch_id, "0"], table.stdout
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
    report = cli("cost", dispatch_id, "--json")
    assert report.returncode == 0, report.stderr
    (used,) = json.loads(report.stdout)["jobs"]
    assert used["job"] == job_id and used["state"] == "SUCCEEDED"
    # Batch's typed fields, as the local service fills them: run_duration, and the VM it gave (the
    # job names no machine type: Batch's pick for the task's resources, an e2)
    assert used["time_source"] == "run_duration" and used["machine_source"] == "instances", used
    assert used["machine_type"].startswith("e2-standard-") and used["provisioning_model"] == "STANDARD", used
    vm = used["vm_s"]
    times = batch_admin(local_stack, "stats")["jobs"][job_id]
    measured = times["SUCCEEDED"] - times["SCHEDULED"]
    assert measured >= TICKS and abs(vm - measured) <= 0.1 * measured, (vm, measured)
    assert used["billed_s"] == 60, "a VM is billed at least a minute"
    drawn = cli("cost", dispatch_id)
    assert drawn.returncode == 0 and job_id in drawn.stdout and "(billed 60), about $" in drawn.stdout, drawn.stdout
    assert "on demand" in drawn.stdout


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
    """`jobs --cancel` is for jobs left behind: one a live dispatch still waits for is kept (even
    with --force --yes); the same job, once the server says its dispatch has ended, is cancelled."""
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

    kept = cli("jobs", dispatch_id, "--cancel", "--force", "--yes")
    assert kept.returncode == 0 and f"kept {job_id}: Covalent still runs dispatch" in kept.stdout, kept.stdout + kept.stderr
    assert "cancelled" not in kept.stdout.replace("nothing cancelled", "")

    out = io.StringIO()
    ended = lambda dispatch: (watch.ENDED, "COMPLETED")  # noqa: E731 - as if the server had ended it
    assert watch.jobs(dispatch_id, cancel=True, out=out, status_of=ended, yes=True) == 0
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

    mine = create({"created-by": "covalent-gcpbatch", "covalent-dispatch-id": dispatch, "covalent-node-id": "0",
                   "covalent-deployment": local_stack.bucket_name})
    other_tool = create({"created-by": "someone-else", "covalent-dispatch-id": dispatch})
    other_dispatch = create({"created-by": "covalent-gcpbatch", "covalent-dispatch-id": f"{dispatch}-x",
                             "covalent-node-id": "0", "x": "y"})
    try:
        sent = (f'labels."created-by" = "covalent-gcpbatch" AND labels."covalent-deployment" = "{local_stack.bucket_name}" '
                f'AND labels."covalent-dispatch-id" = "{dispatch}"')
        before = batch_admin(local_stack, "stats")
        rows: list[dict] = []
        assert watch.jobs(dispatch, cancel=False, out=io.StringIO(), show=rows.extend) == 0
        assert [row["job"] for row in rows] == [mine.rsplit("/", 1)[-1]], rows
        after = batch_admin(local_stack, "stats")
        assert after["calls"]["list"] == before["calls"]["list"] + 1
        assert after["list_filters"].get(sent, 0) == before["list_filters"].get(sent, 0) + 1, after["list_filters"]
        assert {mine, other_tool, other_dispatch} <= {j.name for j in batch.list_jobs(parent=parent)}
    finally:
        for name in (mine, other_tool, other_dispatch):
            batch.delete_job(name=name).result(timeout=30)


# -- `jobs --cancel`: this deployment's orphans only, kept when in doubt, asked first --------------


@contextlib.contextmanager
def held_jobs(stack, *labels: dict[str, str]):
    """Active jobs with these labels, created as another tool (or another deployment's function)
    would: they stay QUEUED or SCHEDULED (their tasks come only after 600 s: the tasks_after_s
    fault), and are deleted afterwards. Yields their names."""
    from google.api_core import exceptions
    from google.cloud import batch_v1

    batch = clients.batch_client(stack.batch_api_endpoint)
    parent = protocol.location_name(stack.project_id, stack.region)
    ids = [f"held-{uuid.uuid4().hex[:12]}" for _ in labels]
    batch_admin(stack, "faults", {"tasks_after_s": {job_id: 600 for job_id in ids}})
    container = batch_v1.Runnable.Container(image_uri="local/worker:dev")
    names: list[str] = []
    try:
        for job_id, job_labels in zip(ids, labels):
            job = batch_v1.Job(task_groups=[batch_v1.TaskGroup(task_spec=batch_v1.TaskSpec(
                runnables=[batch_v1.Runnable(container=container)]))], labels=job_labels)
            names.append(batch.create_job(parent=parent, job_id=job_id, job=job).name)
        yield names
    finally:
        for name in names:
            try:
                batch.delete_job(name=name).result(timeout=60)
            except exceptions.NotFound:
                pass


def job_state(stack, name: str) -> str:
    return clients.batch_client(stack.batch_api_endpoint).get_job(name=name).status.state.name


def short(name: str) -> str:
    return protocol.job_id_of_job_name(name)


def this_deployments(stack, dispatch: str, bucket: str | None = None) -> dict[str, str]:
    """The labels the function gives a job of ``bucket``'s deployment (default: the stack's)."""
    from covalent_gcpbatch_plugin import jobs

    return {jobs.CREATED_BY_LABEL: jobs.CREATED_BY, jobs.DEPLOYMENT_LABEL: jobs.deployment_label_value(bucket or stack.bucket_name),
            "covalent-dispatch-id": dispatch, "covalent-node-id": "0"}


def assert_cancelled(stack, name: str) -> None:
    wait_until(lambda: job_state(stack, name) == "CANCELLED", 60, f"{short(name)} to be cancelled")


def test_jobs_lists_and_cancels_only_this_deployments_jobs(covalent_server, local_stack):
    """Another deployment in the same project (another prefix and bucket, maybe another Covalent
    server) labels its jobs with its own bucket: `jobs` neither lists nor cancels them, not even
    with --cancel --force --yes, though they carry created-by=covalent-gcpbatch and the same dispatch."""
    dispatch = str(uuid.uuid4())
    with held_jobs(local_stack, this_deployments(local_stack, dispatch),
                   this_deployments(local_stack, dispatch, bucket="another-deployments-bucket")) as (mine, theirs):
        listed = cli("jobs", dispatch, "--json")
        assert listed.returncode == 0, listed.stderr
        assert [row["job"] for row in json.loads(listed.stdout)] == [short(mine)], listed.stdout
        everything = cli("jobs")
        assert short(mine) in everything.stdout and short(theirs) not in everything.stdout, everything.stdout

        cancelled = cli("jobs", dispatch, "--cancel", "--force", "--yes")
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        assert f"cancelled {short(mine)}" in cancelled.stdout and short(theirs) not in cancelled.stdout, cancelled.stdout
        assert_cancelled(local_stack, mine)
        assert job_state(local_stack, theirs) in ("QUEUED", "SCHEDULED"), "another deployment's job runs on"


def with_covalent_at(tmp_path, port: int) -> dict[str, str]:
    """An environment whose Covalent config is the session's but for the server's port."""
    import os

    from covalent_gcpbatch_plugin import covalent_config

    text = covalent_config.config_file().read_text()
    section = text.index("[dispatcher]")
    end = text.find("\n[", section + 1)
    end = len(text) if end < 0 else end
    moved = text[:section] + re.sub(r"(?m)^port = \d+$", f"port = {port}", text[section:end], count=1) + text[end:]
    assert moved != text
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "covalent.conf").write_text(moved)
    return {**os.environ, "COVALENT_CONFIG_DIR": str(tmp_path / "config"), "COVALENT_SVC_PORT": str(port)}


def test_jobs_cancel_keeps_unknown_and_unreachable_dispatches_unless_forced(covalent_server, local_stack, tmp_path):
    """A dispatch the Covalent server does not know (another server's), or no server answering
    (down for a restart, or elsewhere), is no proof that nobody waits for the job: kept, unless
    --force (then listed and cancelled with --yes)."""
    from covalent_gcpbatch_plugin.local.processes import free_ports

    (port,) = free_ports(1)
    nobody_answers = with_covalent_at(tmp_path, port)
    unknown, unreachable = str(uuid.uuid4()), str(uuid.uuid4())
    with held_jobs(local_stack, this_deployments(local_stack, unknown), this_deployments(local_stack, unreachable)) as (a, b):
        kept = cli("jobs", unknown, "--cancel")
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert f"kept {short(a)}: dispatch {unknown}: the Covalent server does not know this dispatch" in kept.stdout, kept.stdout
        assert "--force cancels it anyway" in kept.stdout and f"cancelled {short(a)}" not in kept.stdout

        kept = cli("jobs", unreachable, "--cancel", env=nobody_answers)
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert f"kept {short(b)}: dispatch {unreachable}: no Covalent server answered" in kept.stdout, kept.stdout
        assert f"cancelled {short(b)}" not in kept.stdout
        assert {job_state(local_stack, a), job_state(local_stack, b)} <= {"QUEUED", "SCHEDULED"}

        forced = cli("jobs", unknown, "--cancel", "--force", "--yes")
        assert forced.returncode == 0 and f"cancelled {short(a)}" in forced.stdout, forced.stdout + forced.stderr
        assert f"  {short(a)}  dispatch {unknown}: the Covalent server does not know this dispatch" in forced.stdout
        forced = cli("jobs", unreachable, "--cancel", "--force", "--yes", env=nobody_answers)
        assert forced.returncode == 0 and f"cancelled {short(b)}" in forced.stdout, forced.stdout + forced.stderr
        assert_cancelled(local_stack, a)
        assert_cancelled(local_stack, b)


def test_jobs_cancel_lists_what_it_will_cancel_and_asks_first(covalent_server, local_stack):
    """As `deploy.sh down` does: the jobs it would cancel (here one whose dispatch the server says
    has ended) are listed, then it asks on the terminal (y/N); "n" cancels nothing; without a
    terminal and without --yes it cancels nothing and says how to proceed; "y" cancels."""
    import os
    import pty

    @ct.electron(executor="local")
    def nothing():
        return 0

    @ct.lattice
    def over():
        return nothing()

    dispatch = ct.dispatch(over)()
    assert str(wait_for(dispatch, timeout_s=60).status) == "COMPLETED"
    with held_jobs(local_stack, this_deployments(local_stack, dispatch)) as (job,):
        listed = f"  {short(job)}  dispatch {dispatch}: COMPLETED"
        no_terminal = cli("jobs", dispatch, "--cancel")
        assert no_terminal.returncode == 1, no_terminal.stdout + no_terminal.stderr
        assert "Will cancel 1 job(s)" in no_terminal.stdout and listed in no_terminal.stdout, no_terminal.stdout
        assert "no terminal to ask on; pass --yes" in no_terminal.stdout, no_terminal.stdout
        assert job_state(local_stack, job) in ("QUEUED", "SCHEDULED")

        def answering(answer: bytes) -> subprocess.CompletedProcess:
            terminal, its_end = pty.openpty()
            try:
                process = subprocess.Popen([CLI, "jobs", dispatch, "--cancel"], stdin=its_end,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                os.close(its_end)
                os.write(terminal, answer)
                stdout, stderr = process.communicate(timeout=120)
            finally:
                os.close(terminal)
            return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

        declined = answering(b"n\n")
        assert declined.returncode == 1, declined.stdout + declined.stderr
        assert listed in declined.stdout and "Cancel these 1 job(s)? [y/N]" in declined.stdout, declined.stdout
        assert "not confirmed: nothing was cancelled" in declined.stdout, declined.stdout
        assert job_state(local_stack, job) in ("QUEUED", "SCHEDULED")

        confirmed = answering(b"y\n")
        assert confirmed.returncode == 0 and f"cancelled {short(job)}" in confirmed.stdout, confirmed.stdout + confirmed.stderr
        assert_cancelled(local_stack, job)
