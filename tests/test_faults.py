"""Fault injection and bad input, end to end on the local stack (the GitHub issue "Reliability and
security: fault-injection and bad-input suite").

Every scenario asserts the Covalent status, the message the user sees, a time bound, and that the
local Batch service is left with no active job. `make faults` prints one line per scenario
(tests/faults_report.py). Scenarios covered elsewhere are listed in README "## Failure behaviour".
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import time

import cloudpickle
import covalent as ct
import pytest
from conftest import ROOT
from faults_report import record
from workflow_helpers import active_jobs, batch_admin, jobs_of_dispatch, node_results, nodes_by_name, wait_for

from covalent_gcpbatch_plugin import clients, protocol
from covalent_gcpbatch_plugin.gcpbatch import ConfigError, GCPBatchExecutor

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.stack

#: Generous but asserted: other heavy tests share the 2 cores.
SETTLE_S = 60


@pytest.fixture(autouse=True)
def clean_faults(local_stack):
    batch_admin(local_stack, "reset", {})
    yield
    batch_admin(local_stack, "reset", {})


def no_active_job_left(stack, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while active_jobs(stack):
        assert time.monotonic() < deadline, f"jobs left active: {active_jobs(stack)}"
        time.sleep(0.3)


def exit_codes(job) -> list[int]:
    return [e.task_execution.exit_code for e in job.status.status_events if e.task_execution and e.task_execution.exit_code]


def run_flow(flow, *args, timeout_s: float = SETTLE_S):
    started = time.monotonic()
    dispatch_id = ct.dispatch(flow)(*args)
    result = wait_for(dispatch_id, timeout_s=timeout_s + 60)
    elapsed = time.monotonic() - started
    return dispatch_id, result, elapsed


def one_node_flow(executor, body):
    """A lattice around one electron ``task`` running ``body(*args)``."""

    @ct.electron(executor=executor)
    def task(*args):
        return body(*args)

    @ct.lattice
    def flow(*args):
        return task(*args)

    return flow


def bucket(stack):
    return clients.storage_client(stack.project_id, stack.storage_emulator_host).bucket(stack.bucket_name)


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------


def test_worker_killed_mid_run_fails_with_the_exit_code(covalent_server, local_stack, tmp_path):
    pid_file = tmp_path / "worker.pid"

    def body(path):
        import os as _os
        import time as _time

        with open(path, "w") as f:
            f.write(str(_os.getpid()))
        _time.sleep(60)

    flow = one_node_flow(GCPBatchExecutor(time_limit=120, retries=0), body)
    started = time.monotonic()
    dispatch_id = ct.dispatch(flow)(str(pid_file))
    deadline = time.monotonic() + SETTLE_S
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.2)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    result = wait_for(dispatch_id, timeout_s=SETTLE_S)
    elapsed = time.monotonic() - started
    node = nodes_by_name(result)["task"]
    assert str(node["status"]) == "FAILED"
    assert "without a result or error record" in node["stderr"] and "exit code" in node["stderr"]
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    assert len(exit_codes(job)) == 1, "retries=0: the killed attempt is not re-run"
    assert elapsed < SETTLE_S
    no_active_job_left(local_stack)
    record("worker SIGKILLed mid-run", "FAILED + exit code", f"FAILED, exit codes {exit_codes(job)}", elapsed)


def test_worker_exits_nonzero_without_error_record(covalent_server, local_stack):
    def body():
        import os as _os

        _os._exit(3)

    dispatch_id, result, elapsed = run_flow(one_node_flow(GCPBatchExecutor(time_limit=120, retries=0), body))
    node = nodes_by_name(result)["task"]
    assert str(node["status"]) == "FAILED"
    assert "exit code 3" in node["stderr"], node["stderr"]
    assert elapsed < SETTLE_S
    no_active_job_left(local_stack)
    record("worker os._exit(3), no error record", "FAILED 'exit code 3'", "FAILED 'exit code 3'", elapsed)


def test_dropped_terminal_notification_is_settled_by_reconcile(covalent_server, local_stack):
    batch_admin(local_stack, "faults", {"drop_notifications": {"*": ["SUCCEEDED"]}})
    executor = GCPBatchExecutor(time_limit=120, reconcile_interval=2)
    dispatch_id, result, elapsed = run_flow(one_node_flow(executor, lambda x: x + 1), 41)
    assert str(result.status) == "COMPLETED" and result.result == 42
    # Reconcile doubles its interval from 2 s: a lost SUCCEEDED costs at most ~2+4+8+16 s more.
    assert elapsed < SETTLE_S
    no_active_job_left(local_stack)
    record("terminal notification dropped", "COMPLETED via get_job", f"{result.status} ({result.result})", elapsed)


def test_duplicated_notifications_complete_once(covalent_server, local_stack, tmp_path):
    batch_admin(local_stack, "faults", {"duplicate_notifications": True})
    runs = tmp_path / "runs"

    def body(path):
        with open(path, "a") as f:
            f.write("run\n")
        return "once"

    dispatch_id, result, elapsed = run_flow(one_node_flow(GCPBatchExecutor(time_limit=120), body), str(runs))
    assert str(result.status) == "COMPLETED" and result.result == "once"
    assert runs.read_text() == "run\n"
    assert len(jobs_of_dispatch(local_stack, dispatch_id)) == 1
    assert elapsed < SETTLE_S
    no_active_job_left(local_stack)
    record("notifications duplicated", "COMPLETED, 1 job, 1 run", f"{result.status}, 1 job, 1 run", elapsed)


def test_transient_5xx_on_create_is_retried(covalent_server, local_stack):
    batch_admin(local_stack, "faults", {"fail_create": 2, "fail_create_status": 503})
    dispatch_id, result, elapsed = run_flow(one_node_flow(GCPBatchExecutor(time_limit=120), lambda: "created"))
    assert str(result.status) == "COMPLETED" and result.result == "created"
    assert len(jobs_of_dispatch(local_stack, dispatch_id)) == 1
    assert elapsed < SETTLE_S
    no_active_job_left(local_stack)
    record("Batch 503 on create, twice", "COMPLETED after retry", f"{result.status}, 1 job", elapsed)


def test_persistent_5xx_on_create_fails_at_submit_timeout(covalent_server, local_stack):
    batch_admin(local_stack, "faults", {"fail_create": 10_000, "fail_create_status": 503})
    executor = GCPBatchExecutor(time_limit=120, submit_timeout=8)
    try:
        dispatch_id, result, elapsed = run_flow(one_node_flow(executor, lambda: "never"))
    finally:
        batch_admin(local_stack, "reset", {})
    node = nodes_by_name(result)["task"]
    assert str(node["status"]) == "FAILED"
    assert "was created within submit_timeout=8 s" in node["stderr"] and "the job was cancelled" in node["stderr"]
    assert elapsed < 8 + 30
    # The function's retry may still create the job once the fault clears: it sees the marker and cancels it.
    no_active_job_left(local_stack, within_s=90)
    assert all(j.status.state.name == "CANCELLED" for j in jobs_of_dispatch(local_stack, dispatch_id))
    record("Batch 503 on create, persistent", "FAILED at submit_timeout", "FAILED 'submit_timeout=8 s'", elapsed)


def test_cancel_before_the_job_exists(covalent_server, local_stack, tmp_path):
    ran = tmp_path / "ran"
    batch_admin(local_stack, "faults", {"fail_create": 10_000, "fail_create_status": 503})

    def body(path):
        open(path, "w").close()

    flow = one_node_flow(GCPBatchExecutor(time_limit=120, submit_timeout=15), body)
    creates = batch_admin(local_stack, "stats")["calls"]["create"]
    dispatch_id = ct.dispatch(flow)(str(ran))
    try:
        deadline = time.monotonic() + SETTLE_S
        while batch_admin(local_stack, "stats")["calls"]["create"] <= creates:
            assert time.monotonic() < deadline, "the function never tried to create the job"
            time.sleep(0.2)
        started = time.monotonic()
        ct.cancel(dispatch_id)
        time.sleep(1)
    finally:
        batch_admin(local_stack, "reset", {})  # creation now succeeds: the marker must still stop the job
    result = wait_for(dispatch_id, timeout_s=SETTLE_S)
    elapsed = time.monotonic() - started
    node = nodes_by_name(result)["task"]
    assert str(node["status"]) == "CANCELLED", (node["status"], node.get("error"), node.get("stderr"))
    assert str(result.status) == "CANCELLED"
    no_active_job_left(local_stack, within_s=90)
    assert all(j.status.state.name == "CANCELLED" for j in jobs_of_dispatch(local_stack, dispatch_id))
    assert not ran.exists(), "a task cancelled before its job existed must not run"
    assert elapsed < 15 + 30
    record("cancel before the job exists", "not run, no job left", f"{node['status']}, not run", elapsed)


def test_one_failure_among_many_in_flight(covalent_server, local_stack):
    executor = GCPBatchExecutor(time_limit=120)

    @ct.electron(executor=executor)
    def work(i):
        if i == 2:
            raise ValueError("task 2 is broken")
        return i * i

    @ct.lattice
    def flow():
        return [work(i) for i in range(5)]

    dispatch_id, result, elapsed = run_flow(flow, timeout_s=120)
    works = {n["node_id"]: n for n in node_results(result) if n["node_name"] == "work"}
    statuses = sorted(str(n["status"]) for n in works.values())
    assert statuses == ["COMPLETED"] * 4 + ["FAILED"]
    failed = [n for n in works.values() if str(n["status"]) == "FAILED"]
    assert "ValueError: task 2 is broken" in failed[0]["stderr"]
    assert sorted(n["output"].get_deserialized() for n in works.values() if str(n["status"]) == "COMPLETED") == [0, 1, 9, 16]
    assert elapsed < 120
    no_active_job_left(local_stack)
    record("1 of 5 in flight fails", "4 COMPLETED, 1 FAILED", ", ".join(statuses).replace("COMPLETED, " * 4, "4 COMPLETED, "), elapsed)


# ---------------------------------------------------------------------------------------------
# Bad input and security
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, settings, reason",
    [
        ("image not in the allowlist", {"container_image_uri": "docker.io/attacker/miner:latest"}, "is not allowed by this deployment"),
        ("service account from the task", {"service_account_email": "owner@local-project.iam.gserviceaccount.com"}, "jobs of this deployment run as"),
        ("vcpus above the deployment cap", {"vcpus": 100}, "vcpus=100 exceeds this deployment's cap"),
        ("memory above the deployment cap", {"memory": 300 * 1024}, "memory=307200 exceeds this deployment's cap"),
    ],
)
def test_refused_task_fails_within_seconds_with_the_reason(covalent_server, local_stack, name, settings, reason):
    creates = batch_admin(local_stack, "stats")["calls"]["create"]
    dispatch_id, result, elapsed = run_flow(one_node_flow(GCPBatchExecutor(time_limit=120, **settings), lambda: "ran"))
    node = nodes_by_name(result)["task"]
    assert str(node["status"]) == "FAILED"
    assert "the deployment refused the task" in node["stderr"] and reason in node["stderr"], node["stderr"]
    assert jobs_of_dispatch(local_stack, dispatch_id) == []
    assert batch_admin(local_stack, "stats")["calls"]["create"] == creates
    assert elapsed < 30
    no_active_job_left(local_stack)
    record(name, "FAILED (rejected), no job", f"FAILED '{reason[:30]}'", elapsed)


def _spec(**changes) -> protocol.JobSpec:
    import covalent

    versions = {"python": platform.python_version(), "covalent": covalent.__version__}
    spec = GCPBatchExecutor()._job_spec("faults", 0, versions)
    return spec.model_copy(update=changes)


@pytest.mark.parametrize(
    "name, object_name, metadata",
    [
        ("unknown spec field", "task", lambda: {protocol.SPEC_METADATA_KEY: _spec().model_dump_json()[:-1] + ', "command": "rm -rf /"}'}),
        ("wrong spec type", "task", lambda: {protocol.SPEC_METADATA_KEY: _spec().model_dump_json().replace('"node_id":0', '"node_id":"zero"')}),
        ("object outside the prefix", "outside", lambda: _spec().to_metadata()),
        ("not a task object", "result", lambda: _spec().to_metadata()),
    ],
)
def test_untrusted_objects_create_no_job(local_stack, name, object_name, metadata):
    job_id = protocol.make_job_id("faults", 0, protocol.new_attempt_token())
    objects = protocol.TaskObjects(job_id)
    path = {"task": objects.task, "result": objects.result, "outside": f"someone-else/{job_id}/task.pkl"}[object_name]
    creates = batch_admin(local_stack, "stats")["calls"]["create"]
    started = time.monotonic()
    blob = bucket(local_stack).blob(path)
    blob.metadata = metadata()
    blob.upload_from_string(b"not a pickle")
    time.sleep(4)  # the bridge delivers within a second or two
    try:
        assert batch_admin(local_stack, "stats")["calls"]["create"] == creates
        no_active_job_left(local_stack)
    finally:
        blob.delete()
    record(name, "ignored/rejected, no job", "no create call", time.monotonic() - started)


def test_oversized_metadata_is_refused():
    """GCS itself refuses custom metadata over 8 KiB (the fake server answers 500), so an oversized
    object never reaches the function; the function's own check is exercised directly."""
    started = time.monotonic()
    metadata = {protocol.SPEC_METADATA_KEY: _spec().model_dump_json(), "padding": "x" * 9000}
    with pytest.raises(protocol.SpecError, match="over the 8 KiB limit"):
        protocol.JobSpec.from_metadata(metadata)
    record("oversized metadata", "SpecError (8 KiB)", "SpecError", time.monotonic() - started)


@pytest.mark.parametrize("kind", ["not a pickle", "truncated pickle"])
def test_bad_task_object_fails_once_without_retry(local_stack, kind):
    job_id = protocol.make_job_id("faults", 1, protocol.new_attempt_token())
    objects = protocol.TaskObjects(job_id)
    payload = b"\x00garbage" if kind == "not a pickle" else cloudpickle.dumps((len, [[1, 2]], {}))[:-7]
    blob = bucket(local_stack).blob(objects.task)
    blob.metadata = _spec(node_id=1, retries=3).to_metadata()
    started = time.monotonic()
    blob.upload_from_string(payload)
    batch = clients.batch_client(local_stack.batch_api_endpoint)
    name = protocol.job_name(local_stack.project_id, local_stack.region, job_id)
    deadline = time.monotonic() + SETTLE_S
    try:
        while True:
            try:
                job = batch.get_job(name=name)
                if job.status.state.name in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    break
            except Exception:  # not created yet
                pass
            assert time.monotonic() < deadline, "the bad task's job never ended"
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        assert job.status.state.name == "FAILED"
        assert exit_codes(job) == [protocol.EXIT_WORKER_ERROR], "FAIL_TASK: a bad task object is not retried"
        error = bucket(local_stack).get_blob(objects.error)
        assert error is not None, "the worker writes an error record"
        detail = protocol.loads_error(error.download_as_bytes())
        assert detail.message, detail
        no_active_job_left(local_stack)
    finally:
        for name in objects.all():
            leftover = bucket(local_stack).get_blob(name)
            if leftover is not None:
                leftover.delete()
    record(kind + " task object", "FAILED exit 11, no retry", f"FAILED {exit_codes(job)}: {detail.type}", elapsed)


@pytest.mark.parametrize(
    "settings, key",
    [({"retries": -1}, "retries"), ({"vcpus": "lots"}, "vcpus"), ({"wait_mode": "guess"}, "wait_mode"), ({"time_limit": 0}, "time_limit"),
     ({"provisioning": "FREE"}, "provisioning")],
)
def test_invalid_configuration_fails_at_construction_naming_the_key(settings, key):
    started = time.monotonic()
    with pytest.raises(ConfigError, match=key):
        GCPBatchExecutor(**settings)
    record(f"invalid config {key}", "ConfigError naming key", "ConfigError", time.monotonic() - started)


def test_preempted_then_succeeds(covalent_server, local_stack):
    batch_admin(local_stack, "faults", {"preempt": {"*": 1}})
    dispatch_id, result, elapsed = run_flow(one_node_flow(GCPBatchExecutor(time_limit=120, retries=2), lambda: 42))
    assert str(result.status) == "COMPLETED" and result.result == 42
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    assert exit_codes(job) == [50001]
    assert elapsed < SETTLE_S
    no_active_job_left(local_stack)
    record("preempted (50001) then success", "COMPLETED after 1 retry", f"{result.status}, exit codes {exit_codes(job)}", elapsed)


def test_time_limit_exceeded(covalent_server, local_stack):
    def body():
        import time as _time

        _time.sleep(60)

    dispatch_id, result, elapsed = run_flow(one_node_flow(GCPBatchExecutor(time_limit=2, retries=3), body))
    node = nodes_by_name(result)["task"]
    assert str(node["status"]) == "FAILED"
    assert "exit code 50005" in node["stderr"] and "time_limit" in node["stderr"]
    (job,) = jobs_of_dispatch(local_stack, dispatch_id)
    assert exit_codes(job) == [50005]
    assert elapsed < 2 + 30
    no_active_job_left(local_stack)
    record("time limit exceeded", "FAILED 'exit code 50005'", f"FAILED, exit codes {exit_codes(job)}", elapsed)


def test_function_fails_once_and_the_event_is_redelivered(covalent_server, local_stack):
    """A non-retryable create error (403) makes the function answer 500: the bridge nacks, Pub/Sub
    redelivers the finalize event, and the second delivery creates the job."""
    batch_admin(local_stack, "faults", {"fail_create": 1, "fail_create_status": 403})
    creates = batch_admin(local_stack, "stats")["calls"]["create"]
    dispatch_id, result, elapsed = run_flow(one_node_flow(GCPBatchExecutor(time_limit=120), lambda: "redelivered"))
    assert str(result.status) == "COMPLETED" and result.result == "redelivered"
    assert len(jobs_of_dispatch(local_stack, dispatch_id)) == 1
    assert batch_admin(local_stack, "stats")["calls"]["create"] >= creates + 2
    assert elapsed < SETTLE_S
    no_active_job_left(local_stack)
    record("function fails once (500, redelivered)", "COMPLETED, 1 job", f"{result.status}, 1 job", elapsed)



def test_result_over_the_memory_budget_fails_clearly(covalent_server, local_stack):
    """The local Batch service enforces compute_resource.memory_mib (plus an allowance for the
    interpreter, local/batch_runner.py MEMORY_ALLOWANCE_MIB) as RLIMIT_AS on the worker."""

    def body():
        return bytearray(3 * 1024**3)  # 3 GiB result, far over memory=64 (+1024 MiB allowance)

    dispatch_id, result, elapsed = run_flow(one_node_flow(GCPBatchExecutor(time_limit=120, memory=64, retries=0), body))
    node = nodes_by_name(result)["task"]
    assert str(node["status"]) == "FAILED"
    assert "MemoryError" in node["stderr"], node["stderr"]
    assert elapsed < SETTLE_S
    no_active_job_left(local_stack)
    record("result over the memory budget", "FAILED 'MemoryError'", "FAILED 'MemoryError'", elapsed)


class DirectExecutor(GCPBatchExecutor):
    """The executor without a Covalent server: what the server would answer, answered locally."""

    async def set_job_handle(self, handle):
        self.handle = handle

    async def get_cancel_requested(self):
        return False

    async def get_version_info(self):
        import covalent

        return {"python": platform.python_version(), "covalent": covalent.__version__}


def test_pubsub_emulator_restart_while_tasks_wait(local_stack, tmp_path):
    """On a stack of its own: restart its Pub/Sub emulator (same port, topics and subscriptions
    lost) while tasks run. The subscriber re-opens and recreates its subscription (events.py
    _on_stream_end/_reopen); notifications lost in the gap are settled by reconcile."""
    import asyncio
    import io

    from covalent_gcpbatch_plugin.local.stack import LocalStack, find_pubsub_emulator, stop_component

    from covalent_gcpbatch_plugin.events import Endpoint, job_events

    stack = LocalStack(tmp_path / "stack")
    settings = stack.up()
    subscriber = job_events(Endpoint(settings.project_id, settings.topic, settings.pubsub_emulator_host))
    try:
        config = {**settings.executor_config(), "time_limit": 120, "reconcile_interval": 2, "cache_dir": str(tmp_path / "cache")}

        def body(i):
            import time as _time

            _time.sleep(8)
            return i * 10

        async def one(i):
            executor = DirectExecutor(**config)
            executor._task_stdout, executor._task_stderr = io.StringIO(), io.StringIO()
            return await executor.run(body, [i], {}, {"dispatch_id": "restart-fault", "node_id": i})

        async def scenario():
            tasks = [asyncio.create_task(one(i)) for i in range(2)]
            deadline = time.monotonic() + SETTLE_S
            while batch_admin(settings, "active")["active"] == [] or any(
                    j.status.state.name != "RUNNING" for j in clients.batch_client(settings.batch_api_endpoint).list_jobs(
                        parent=f"projects/{settings.project_id}/locations/{settings.region}")) or len(
                    batch_admin(settings, "active")["active"]) < 2:
                assert time.monotonic() < deadline, "the tasks never ran"
                await asyncio.sleep(0.3)
            stream_before = subscriber._future
            (record,) = [r for r in stack._records if r.name == "pubsub"]
            await asyncio.to_thread(stop_component, record, child=stack._children.get("pubsub"))
            stack._records.remove(record)
            port = settings.pubsub_emulator_host.rsplit(":", 1)[1]
            from covalent_gcpbatch_plugin.local.processes import http_answers

            await asyncio.to_thread(
                stack._start, "pubsub", [str(find_pubsub_emulator()), "--host=127.0.0.1", f"--port={port}"], dict(os.environ),
                lambda: http_answers(f"http://{settings.pubsub_emulator_host}/", body=b"Ok"), f"http://{settings.pubsub_emulator_host}")
            await asyncio.to_thread(stack._create_topics, settings)
            restarted = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks), SETTLE_S)
            assert subscriber._future is not stream_before, "the subscriber re-opened its stream"
            return results, time.monotonic() - restarted

        results, elapsed = asyncio.run(scenario())
        assert results == [0, 10]
        assert elapsed < SETTLE_S
        assert batch_admin(settings, "active")["active"] == []
        record("Pub/Sub emulator restarted mid-wait", "both COMPLETED (reconcile)", f"results {results}", elapsed)
    finally:
        subscriber.close()
        stack.down()


def test_out_of_order_notifications_settle_on_the_first_terminal_state():
    """QUEUED after RUNNING does not move the wait back, RUNNING after SUCCEEDED is never read:
    the first terminal state settles the task, without a get_job."""
    import asyncio

    from covalent_gcpbatch_plugin.protocol import JobEvent, JobState

    executor = DirectExecutor(reconcile_interval=30, submit_timeout=30)
    executor._reconcile = lambda job_id: pytest.fail("no reconcile needed: the notifications arrived")
    order = [JobState.SCHEDULED, JobState.RUNNING, JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED,
             JobState.RUNNING, JobState.SUCCEEDED]

    async def scenario():
        inbox: asyncio.Queue = asyncio.Queue()
        for state in order:
            inbox.put_nowait(JobEvent("job-x", state, "test"))
        outcome = await asyncio.wait_for(executor._wait("job-x", inbox), 10)
        return outcome, inbox.qsize()

    started = time.monotonic()
    outcome, left = asyncio.run(scenario())
    assert outcome.state is JobState.SUCCEEDED and not outcome.gave_up
    assert left == 2, "the events after the first SUCCEEDED are not consumed"
    record("out-of-order notifications", "SUCCEEDED once", f"{outcome.state.value}",
           time.monotonic() - started)


def test_no_credentials_in_logs(covalent_server, local_stack):
    """Run last: after every scenario above, nothing secret-looking is in any log."""
    logs = list((ROOT / "stack" / "logs").glob("*.log")) + list((ROOT / "covalent").rglob("*.log"))
    assert logs, "no logs found"
    needles = ("Bearer ", "private_key", "access_token", "refresh_token", "client_secret", "Authorization:")
    found = [(p.name, n) for p in logs for n in needles if n.lower() in p.read_text(errors="replace").lower()]
    assert found == []
    record("credentials in logs", "none", f"none in {len(logs)} logs", 0.0)
