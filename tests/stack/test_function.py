"""The Cloud Function, in process through functions_framework.create_app(...).test_client(),
against the local stack's real Batch service (REST) and Pub/Sub emulator."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path

import functions_framework
import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from google.api_core import exceptions
from google.cloud import batch_v1

from covalent_gcpbatch_plugin import clients, deployment, protocol
from specs import spec as make_spec
from workflow_helpers import ENDED_JOB_STATES, batch_admin, wait_until

FUNCTION_SOURCE = Path(__file__).resolve().parents[2] / "functions" / "main.py"
pytestmark = pytest.mark.stack
TERMINAL = {batch_v1.JobStatus.State.SUCCEEDED, batch_v1.JobStatus.State.FAILED, batch_v1.JobStatus.State.CANCELLED}


def make_function(stack, monkeypatch, *, task_bucket: str, bucket: str):
    """A fresh app with the stack's deployment settings, as `local up` configures the served one,
    but taking tasks from ``task_bucket`` and keeping outputs and markers in ``bucket``."""
    emulators = {"PUBSUB_EMULATOR_HOST": stack.pubsub_emulator_host, "STORAGE_EMULATOR_HOST": stack.storage_emulator_host}
    buckets = {deployment.env_name("task_bucket"): task_bucket, deployment.env_name("bucket"): bucket}
    for name, value in {**stack.deployment_settings().to_env(), **buckets, **emulators}.items():
        monkeypatch.setenv(name, value)
    sys.modules.pop("main", None)
    app = functions_framework.create_app(target="on_task_uploaded", source=str(FUNCTION_SOURCE), signature_type="cloudevent")
    return app.test_client()


@pytest.fixture
def function(local_stack, monkeypatch, direct_bucket):
    """The function of a deployment of one bucket, ``direct_bucket``: tasks, outputs and markers."""
    return make_function(local_stack, monkeypatch, task_bucket=direct_bucket.name, bucket=direct_bucket.name)


@pytest.fixture
def not_created(local_stack):
    """The function's "no job for this task" messages on the notification topic from now on (a
    pull subscription of the test's own)."""
    subscriber = clients.subscriber_client(local_stack.pubsub_emulator_host)
    path = f"projects/{local_stack.project_id}/subscriptions/test-{uuid.uuid4().hex[:12]}"
    subscriber.create_subscription(name=path, topic=local_stack.topic_path(local_stack.topic))

    def pull() -> list[protocol.JobEvent]:
        response = subscriber.pull(subscription=path, max_messages=50, timeout=10)
        events = [protocol.parse_notification(dict(m.message.attributes), m.message.data) for m in response.received_messages]
        return [e for e in events if e is not None and e.state in (protocol.JobState.REJECTED, protocol.JobState.CANCELLED)]

    yield pull
    subscriber.delete_subscription(subscription=path)
    subscriber.close()


def unwatched_bucket(stack, suffix: str):
    """A bucket the stack's bridge does not watch: objects the in-process function is told about
    are really there, and the served function never sees them too."""
    storage = clients.storage_client(stack.project_id, stack.storage_emulator_host)
    bucket = storage.bucket(f"{stack.bucket_name}-{suffix}")
    if not bucket.exists():
        storage.create_bucket(bucket.name)
    return bucket


@pytest.fixture(scope="module")
def direct_bucket(local_stack):
    return unwatched_bucket(local_stack, "direct")


@pytest.fixture(scope="module")
def direct_data_bucket(local_stack):
    return unwatched_bucket(local_stack, "direct-data")


def spec_for(stack, **overrides) -> protocol.JobSpec:
    values = dict(project_id=stack.project_id, region=stack.region, container_image_uri=stack.container_image_uri)
    return make_spec(**{**values, **overrides})


def finalize_event(bucket: str, name: str, metadata: dict | None, event_type: str = "google.cloud.storage.object.v1.finalized"):
    """Headers and body of a storage CloudEvent in binary mode, as Eventarc delivers it."""
    event = CloudEvent(
        {
            "type": event_type,
            "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
            "subject": f"objects/{name}",
            "id": uuid.uuid4().hex,
        },
        {"bucket": bucket, "name": name, "generation": "1", "metadata": metadata or {}},
    )
    return to_binary(event)


def post(client, bucket, name, metadata, *, payload: bytes | None = b"task", **kwargs):
    """Upload ``name`` (unless ``payload`` is None: an event for an object that is gone), then
    deliver its finalize event to the function."""
    if payload is not None:
        blob = bucket.blob(name)
        blob.metadata = metadata
        blob.upload_from_string(payload)
    headers, body = finalize_event(bucket.name, name, metadata, **kwargs)
    return client.post("/", headers=headers, data=body)


def get_job(stack, job_id: str) -> batch_v1.Job:
    return clients.batch_client(stack.batch_api_endpoint).get_job(name=protocol.job_name(stack.project_id, stack.region, job_id))


def ended_job(stack, job_id: str, within_s: float = 90) -> batch_v1.Job:
    """The job once it has ended: Batch finishes a cancel as a long-running operation, later."""
    return wait_until(lambda: (job := get_job(stack, job_id)).status.state.name in ENDED_JOB_STATES and job,
                      within_s, f"job {job_id} ended", step_s=0.2)


def new_job_id() -> str:
    return protocol.make_job_id("f00dbabe", 1, protocol.new_attempt_token())


def test_task_upload_creates_the_batch_job(function, local_stack, direct_bucket):
    job_id = new_job_id()
    response = post(function, direct_bucket, protocol.TaskObjects(job_id).task, spec_for(local_stack).to_metadata())
    assert response.status_code == 200
    job = get_job(local_stack, job_id)
    task = job.task_groups[0].task_spec
    assert task.runnables[0].container.image_uri == local_stack.container_image_uri
    assert dict(task.environment.variables) == protocol.worker_environment(direct_bucket.name, job_id)
    assert job.allocation_policy.service_account.email == local_stack.service_account_email
    assert job.notifications[0].pubsub_topic == local_stack.topic_path(local_stack.topic)


def test_a_deployment_of_two_buckets_takes_tasks_from_its_task_bucket_only(local_stack, monkeypatch, direct_bucket,
                                                                          direct_data_bucket, not_created):
    """Task objects in the trigger bucket, everything else in the other: the job's worker is told
    both; a task object in any other bucket creates nothing; the cancel marker and the function's
    records are in the data bucket."""
    function = make_function(local_stack, monkeypatch, task_bucket=direct_bucket.name, bucket=direct_data_bucket.name)
    job_id = new_job_id()
    assert post(function, direct_bucket, protocol.TaskObjects(job_id).task, spec_for(local_stack).to_metadata()).status_code == 200
    variables = dict(get_job(local_stack, job_id).task_groups[0].task_spec.environment.variables)
    assert variables == protocol.worker_environment(direct_data_bucket.name, job_id, direct_bucket.name)
    assert variables[protocol.ENV_TASK_BUCKET] == direct_bucket.name and variables[protocol.ENV_BUCKET] == direct_data_bucket.name

    elsewhere = new_job_id()
    assert post(function, direct_data_bucket, protocol.TaskObjects(elsewhere).task, spec_for(local_stack).to_metadata()).status_code == 200
    assert batch_admin(local_stack, "stats")["create_attempts"].get(elsewhere) is None, "not from the task bucket"

    cancelled = protocol.TaskObjects(new_job_id())
    direct_data_bucket.blob(cancelled.cancelled).upload_from_string(b"")
    assert post(function, direct_bucket, cancelled.task, spec_for(local_stack).to_metadata()).status_code == 200
    assert batch_admin(local_stack, "stats")["create_attempts"].get(cancelled.job_id) is None
    record = protocol.loads_not_created(direct_data_bucket.blob(cancelled.not_created).download_as_bytes())
    assert record.state is protocol.JobState.CANCELLED
    assert [e.state for e in not_created() if e.job_id == cancelled.job_id] == [protocol.JobState.CANCELLED]


def test_duplicate_event_creates_exactly_one_job(function, local_stack, direct_bucket):
    job_id = new_job_id()
    creates_before = batch_admin(local_stack, "stats")["calls"]["create"]
    for _ in range(2):
        assert post(function, direct_bucket, protocol.TaskObjects(job_id).task, spec_for(local_stack).to_metadata()).status_code == 200
    assert batch_admin(local_stack, "stats")["calls"]["create"] == creates_before + 2
    listed = clients.batch_client(local_stack.batch_api_endpoint).list_jobs(parent=protocol.location_name(local_stack.project_id, local_stack.region))
    assert [j.name for j in listed].count(get_job(local_stack, job_id).name) == 1


@pytest.mark.parametrize(
    "name, event_type",
    [
        ("covalent-gcpbatch/cov-f00dbabe-1-abcd/result.pkl", "google.cloud.storage.object.v1.finalized"),
        ("covalent-gcpbatch/cov-f00dbabe-1-abcd/stdout.log", "google.cloud.storage.object.v1.finalized"),
        ("someone-else/data.csv", "google.cloud.storage.object.v1.finalized"),
        ("covalent-gcpbatch/cov-f00dbabe-1-abcd/task.pkl", "google.cloud.storage.object.v1.deleted"),
    ],
)
def test_other_objects_and_events_are_ignored(function, local_stack, direct_bucket, name, event_type):
    creates_before = batch_admin(local_stack, "stats")["calls"]["create"]
    assert post(function, direct_bucket, name, spec_for(local_stack).to_metadata(), event_type=event_type).status_code == 200
    assert batch_admin(local_stack, "stats")["calls"]["create"] == creates_before


@pytest.mark.parametrize(
    "metadata, reason",
    [
        ({}, "no 'gcpbatch-spec' metadata"),
        ({protocol.SPEC_METADATA_KEY: '{"version": 1}'}, "invalid job spec"),
        ("image", "is not allowed by this deployment"),
        ("account", "jobs of this deployment run as"),
    ],
)
def test_refused_task_creates_nothing_and_publishes_the_reason(function, local_stack, direct_bucket, not_created, metadata, reason):
    if metadata == "image":
        metadata = spec_for(local_stack, container_image_uri="docker.io/attacker/miner:latest").to_metadata()
    elif metadata == "account":
        metadata = spec_for(local_stack, service_account_email="owner@local-project.iam.gserviceaccount.com").to_metadata()
    job_id = new_job_id()
    assert post(function, direct_bucket, protocol.TaskObjects(job_id).task, metadata).status_code == 200
    with pytest.raises(exceptions.NotFound):
        get_job(local_stack, job_id)
    (event,) = [e for e in not_created() if e.job_id == job_id]
    assert event.state is protocol.JobState.REJECTED and reason in event.detail
    record = protocol.loads_not_created(direct_bucket.blob(protocol.TaskObjects(job_id).not_created).download_as_bytes())
    assert record.state is protocol.JobState.REJECTED and reason in record.reason, "an executor that polls reads it here"


def test_transient_batch_errors_are_retried(function, local_stack, direct_bucket):
    batch_admin(local_stack, "faults", {"fail_create": 2, "fail_create_status": 503})
    try:
        job_id = new_job_id()
        assert post(function, direct_bucket, protocol.TaskObjects(job_id).task, spec_for(local_stack).to_metadata()).status_code == 200
        assert get_job(local_stack, job_id).name.endswith(job_id)
    finally:
        batch_admin(local_stack, "reset", {})


def test_cancelled_task_gets_no_job(function, local_stack, direct_bucket, not_created):
    """Cancel before the job exists: the executor's marker object stops the function."""
    job_id = new_job_id()
    objects = protocol.TaskObjects(job_id)
    direct_bucket.blob(objects.cancelled).upload_from_string(b"")
    creates_before = batch_admin(local_stack, "stats")["calls"]["create"]
    assert post(function, direct_bucket, objects.task, spec_for(local_stack).to_metadata()).status_code == 200
    assert batch_admin(local_stack, "stats")["calls"]["create"] == creates_before
    with pytest.raises(exceptions.NotFound):
        get_job(local_stack, job_id)
    (event,) = [e for e in not_created() if e.job_id == job_id]
    assert event.state is protocol.JobState.CANCELLED, "the waiting executor hears at once that no job will come"
    record = protocol.loads_not_created(direct_bucket.blob(objects.not_created).download_as_bytes())
    assert record.state is protocol.JobState.CANCELLED, "and so does one that polls"


def test_task_object_gone_gets_no_job(function, local_stack, direct_bucket):
    """A redelivered event (or a late retry) after the executor removed its task: no job."""
    job_id = new_job_id()
    creates_before = batch_admin(local_stack, "stats")["calls"]["create"]
    response = post(function, direct_bucket, protocol.TaskObjects(job_id).task, spec_for(local_stack).to_metadata(), payload=None)
    assert response.status_code == 200
    assert batch_admin(local_stack, "stats")["calls"]["create"] == creates_before
    with pytest.raises(exceptions.NotFound):
        get_job(local_stack, job_id)


def test_duplicate_event_after_a_cancel_cancels_the_existing_job(function, local_stack, direct_bucket):
    """The first delivery created the job; the task is cancelled; a redelivery hits ALREADY_EXISTS
    and must still honour the marker (the executor's own cancel_job may have raced the create)."""
    import platform

    import cloudpickle
    import covalent

    job_id = new_job_id()
    objects = protocol.TaskObjects(job_id)
    spec = spec_for(local_stack, python_version=".".join(platform.python_version().split(".")[:2]),
                    covalent_version=covalent.__version__, time_limit_s=120)
    task = cloudpickle.dumps((time.sleep, [60], {}))
    assert post(function, direct_bucket, objects.task, spec.to_metadata(), payload=task).status_code == 200
    assert get_job(local_stack, job_id).status.state not in TERMINAL
    direct_bucket.blob(objects.cancelled).upload_from_string(b"")
    headers, body = finalize_event(direct_bucket.name, objects.task, spec.to_metadata())
    assert function.post("/", headers=headers, data=body).status_code == 200
    assert ended_job(local_stack, job_id).status.state == batch_v1.JobStatus.State.CANCELLED


def test_task_cancelled_while_its_job_is_created_gets_it_cancelled(function, local_stack, direct_bucket):
    """The marker appears after the function's first check, while create_job is being retried
    (four 503s, api_core backoff): the check after creating finds it and cancels the new job."""
    job_id = new_job_id()
    objects = protocol.TaskObjects(job_id)
    creates_before = batch_admin(local_stack, "stats")["calls"]["create"]
    batch_admin(local_stack, "faults", {"fail_create": 4, "fail_create_status": 503})
    marked = threading.Event()

    def cancel_after_the_first_create_attempt():
        deadline = time.monotonic() + 30
        while not batch_admin(local_stack, "stats")["create_attempts"].get(job_id) and time.monotonic() < deadline:
            time.sleep(0.02)
        direct_bucket.blob(objects.cancelled).upload_from_string(b"")
        marked.set()

    canceller = threading.Thread(target=cancel_after_the_first_create_attempt, daemon=True)
    canceller.start()
    try:
        assert post(function, direct_bucket, objects.task, spec_for(local_stack).to_metadata()).status_code == 200
        canceller.join(timeout=35)
        assert marked.is_set()
        assert batch_admin(local_stack, "stats")["calls"]["create"] == creates_before + 5
        assert ended_job(local_stack, job_id).status.state == batch_v1.JobStatus.State.CANCELLED
    finally:
        batch_admin(local_stack, "reset", {})


def test_job_options_reach_batch(function, local_stack, direct_bucket):
    job_id = new_job_id()
    options = protocol.JobOptions(machine_type="e2-standard-4", provisioning="SPOT", labels={"team": "ml"}, allowed_locations=("zones/us-east1-c",))
    assert post(function, direct_bucket, protocol.TaskObjects(job_id).task, spec_for(local_stack, options=options).to_metadata()).status_code == 200
    job = get_job(local_stack, job_id)
    (instances,) = job.allocation_policy.instances
    assert instances.policy.machine_type == "e2-standard-4"
    assert instances.policy.provisioning_model == batch_v1.AllocationPolicy.ProvisioningModel.SPOT
    assert job.labels["team"] == "ml"
    assert list(job.allocation_policy.location.allowed_locations) == ["zones/us-east1-c"]


def test_the_deployed_function_imports_without_covalent(tmp_path):
    """What gcloud uploads: functions/ with its links replaced by their content. It must import
    with only its requirements.txt (no Covalent, no executor package beside it)."""
    import ast
    import shutil
    import subprocess

    linked_dirs = [p for p in FUNCTION_SOURCE.parent.rglob("*") if p.is_symlink() and p.is_dir()]
    assert linked_dirs == [], "gcloud's upload follows file links only: link files, not directories"
    source = tmp_path / "function"
    shutil.copytree(FUNCTION_SOURCE.parent, source, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    assert not any(path.is_symlink() for path in source.rglob("*"))
    probe = (
        "import sys; sys.modules['covalent'] = None; sys.path.insert(0, '.'); import main, covalent_gcpbatch_plugin as p; "
        "print(p.__file__); print(sorted(m for m in sys.modules if m.startswith('covalent_gcpbatch_plugin.')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=source, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "GCPBATCH_PROJECT": "p", "GCPBATCH_REGION": "r", "GCPBATCH_TOPIC": "topic"})
    assert done.returncode == 0, done.stderr
    where, modules = done.stdout.splitlines()
    assert where.startswith(str(source)), "the uploaded copy is what is imported"
    assert set(ast.literal_eval(modules)) <= {f"covalent_gcpbatch_plugin.{m}" for m in ("clients", "deployment", "errors", "jobs", "protocol",
                                                                                    "protocol.layout", "protocol.spec", "protocol.outcome",
                                                                                    "protocol.messages", "protocol.warm", "machine_types")}


def new_pack(stack, bucket, size: int = 3) -> tuple[str, list[str], protocol.PackManifest]:
    """Task objects of ``size`` electrons of one pack (each naming it), and its manifest (not uploaded)."""
    pack_id = protocol.make_pack_id("f00dbabe", protocol.new_attempt_token())
    members = [protocol.make_job_id("f00dbabe", node, protocol.new_attempt_token()) for node in range(size)]
    for member in members:
        blob = bucket.blob(protocol.TaskObjects(member).task)
        blob.metadata = spec_for(stack).to_metadata() | {protocol.PACK_METADATA_KEY: pack_id}
        blob.upload_from_string(b"task")
    return pack_id, members, protocol.PackManifest(members=tuple(members), parallelism=2)


def test_a_pack_manifest_creates_one_job_with_a_task_per_electron(function, local_stack, direct_bucket):
    pack_id, members, manifest = new_pack(local_stack, direct_bucket)
    creates_before = batch_admin(local_stack, "stats")["calls"]["create"]
    for member in members:  # the electrons' own uploads create nothing
        metadata = spec_for(local_stack).to_metadata() | {protocol.PACK_METADATA_KEY: pack_id}
        headers, body = finalize_event(direct_bucket.name, protocol.TaskObjects(member).task, metadata)
        assert function.post("/", headers=headers, data=body).status_code == 200
    assert batch_admin(local_stack, "stats")["calls"]["create"] == creates_before
    response = post(function, direct_bucket, protocol.PackObjects(pack_id).manifest, spec_for(local_stack).to_metadata(),
                    payload=manifest.dumps())
    assert response.status_code == 200
    job = get_job(local_stack, pack_id)
    (group,) = job.task_groups
    assert group.task_count == 3 and group.parallelism == 2
    assert dict(group.task_spec.environment.variables) == protocol.pack_environment(direct_bucket.name, pack_id)
    kinds = {n.message.type_.name for n in job.notifications}
    assert kinds == {"JOB_STATE_CHANGED", "TASK_STATE_CHANGED"}, "each electron ends with its own task"
    assert job.labels["covalent-pack-tasks"] == "3"
    assert batch_admin(local_stack, "stats")["calls"]["create"] == creates_before + 1


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"not json", "invalid pack manifest"),
        (b'{"members": ["cov-f00dbabe-1-aa"]}', "at least 2 items"),
        (b'{"members": ["cov-f00dbabe-1-aa", "cov-f00dbabe-1-aa"]}', "members must be distinct"),
        (b'{"members": ["cov-f00dbabe-1-aa", "../../etc"]}', "is not an electron's job id"),
        (b'{"members": ["cov-f00dbabe-1-aa", "cov-f00dbabe-2-bb"], "command": "sh"}', "Extra inputs are not permitted"),
    ],
)
def test_a_bad_pack_manifest_creates_nothing_and_publishes_the_reason(function, local_stack, direct_bucket, not_created,
                                                                     payload, reason):
    pack_id = protocol.make_pack_id("f00dbabe", protocol.new_attempt_token())
    response = post(function, direct_bucket, protocol.PackObjects(pack_id).manifest, spec_for(local_stack).to_metadata(),
                    payload=payload)
    assert response.status_code == 200
    with pytest.raises(exceptions.NotFound):
        get_job(local_stack, pack_id)
    (event,) = [e for e in not_created() if e.job_id == pack_id]
    assert event.state is protocol.JobState.REJECTED and reason in event.detail, event.detail
    record = protocol.loads_not_created(direct_bucket.blob(protocol.PackObjects(pack_id).not_created).download_as_bytes())
    assert reason in record.reason


def test_a_cancelled_pack_gets_no_job(function, local_stack, direct_bucket, not_created):
    pack_id, _, manifest = new_pack(local_stack, direct_bucket, size=2)
    direct_bucket.blob(protocol.PackObjects(pack_id).cancelled).upload_from_string(b"")
    post(function, direct_bucket, protocol.PackObjects(pack_id).manifest, spec_for(local_stack).to_metadata(),
         payload=manifest.dumps())
    with pytest.raises(exceptions.NotFound):
        get_job(local_stack, pack_id)
    (event,) = [e for e in not_created() if e.job_id == pack_id]
    assert event.state is protocol.JobState.CANCELLED


def test_a_pack_over_max_parallel_vcpus_creates_no_job_and_publishes_the_reason(local_stack, monkeypatch, direct_bucket,
                                                                                 not_created):
    """Each task is within the per-task caps; the pack as a whole is not: 2 tasks at once x 2 vCPUs
    over a deployment's --max-parallel-vcpus 3 (issue 23, item 1)."""
    function = make_function(local_stack, monkeypatch, task_bucket=direct_bucket.name, bucket=direct_bucket.name)
    monkeypatch.setenv(deployment.env_name("max_parallel_vcpus"), "3")  # read at the first event
    pack_id, _, manifest = new_pack(local_stack, direct_bucket)  # 3 electrons of 2 vCPUs, parallelism 2
    creates_before = batch_admin(local_stack, "stats")["calls"]["create"]
    response = post(function, direct_bucket, protocol.PackObjects(pack_id).manifest, spec_for(local_stack).to_metadata(),
                    payload=manifest.dumps())
    assert response.status_code == 200
    with pytest.raises(exceptions.NotFound):
        get_job(local_stack, pack_id)
    assert batch_admin(local_stack, "stats")["calls"]["create"] == creates_before
    reason = "the pack runs 2 tasks of 2 vCPUs at once, 4 vCPUs, over this deployment's cap of 3 (--max-parallel-vcpus)"
    (event,) = [e for e in not_created() if e.job_id == pack_id]
    assert event.state is protocol.JobState.REJECTED and reason in event.detail, event.detail
    record = protocol.loads_not_created(direct_bucket.blob(protocol.PackObjects(pack_id).not_created).download_as_bytes())
    assert record.state is protocol.JobState.REJECTED and "set pack_parallelism to at most 1" in record.reason


# -- Warm VMs (protocol/warm.py) ------------------------------------------------------------------


@pytest.fixture
def warm_offers(local_stack):
    """The offers published to the warm topic from now on, through a subscription of the test's
    own: the shared one is the warm VMs', and a test pulling from it would take their offers (and,
    on the emulator, a pull that times out leaves a request that swallows the next one)."""
    settings = local_stack.deployment_settings()
    subscriber = clients.subscriber_client(local_stack.pubsub_emulator_host)
    path = f"projects/{local_stack.project_id}/subscriptions/test-warm-{uuid.uuid4().hex[:12]}"
    subscriber.create_subscription(name=path, topic=settings.warm_topic_path)

    def pull(job_id: str, count: int = 1, within_s: float = 5.0) -> list[protocol.Offer]:
        """The offers of ``job_id`` pulled until ``count`` came or ``within_s`` passed."""
        offers, deadline = [], time.monotonic() + within_s
        while len(offers) < count and time.monotonic() < deadline:
            try:
                response = subscriber.pull(subscription=path, max_messages=50,
                                           timeout=max(0.5, deadline - time.monotonic()))
            except exceptions.DeadlineExceeded:
                break
            if not response.received_messages:
                time.sleep(0.1)
                continue
            subscriber.acknowledge(subscription=path,
                                   ack_ids=[m.ack_id for m in response.received_messages])
            parsed = [protocol.parse_offer(dict(m.message.attributes), m.message.data) for m in response.received_messages]
            offers += [o for o in parsed if o is not None and o.job_id == job_id]
        return offers

    yield pull
    subscriber.delete_subscription(subscription=path)
    subscriber.close()


@pytest.fixture
def electron_states(local_stack):
    """ELECTRON_STATE messages on the notification topic from now on (a subscription of the test's own)."""
    subscriber = clients.subscriber_client(local_stack.pubsub_emulator_host)
    path = f"projects/{local_stack.project_id}/subscriptions/test-{uuid.uuid4().hex[:12]}"
    subscriber.create_subscription(name=path, topic=local_stack.topic_path(local_stack.topic))

    def pull(job_id: str) -> list[protocol.ElectronEvent]:
        response = subscriber.pull(subscription=path, max_messages=50, timeout=10)
        if response.received_messages:
            subscriber.acknowledge(subscription=path, ack_ids=[m.ack_id for m in response.received_messages])
        events = [protocol.parse_electron_event(dict(m.message.attributes), m.message.data) for m in response.received_messages]
        return [e for e in events if e is not None and e.job_id == job_id]

    yield pull
    subscriber.delete_subscription(subscription=path)
    subscriber.close()


def warm_spec(stack, **overrides) -> protocol.JobSpec:
    """A keep_warm spec of a warm key of its own (a label unique to the test): idle records other
    tests left in the module's bucket never match it."""
    options = protocol.JobOptions(keep_warm=60, labels={"warm": uuid.uuid4().hex[:12]})
    return spec_for(stack, **{"options": options, **overrides})


def write_idle(bucket, spec: protocol.JobSpec, *, until_s: float = 60, ends_s: float = 3600, seq: int = 0,
               key: str | None = None) -> protocol.IdleVM:
    """An idle record, as a warm worker writes it: waiting ``until_s`` more, its job ending in ``ends_s``."""
    now = time.time()
    idle = protocol.IdleVM(key=key or protocol.warm_key(spec), runner=new_job_id(), seq=seq, until=now + until_s,
                           ends=now + ends_s)
    bucket.blob(idle.name).upload_from_string(idle.model_dump_json(), content_type="application/json")
    return idle


def taken_offer(bucket, idle: protocol.IdleVM) -> protocol.Offer | None:
    blob = bucket.blob(idle.taken)
    return protocol.Offer.loads(blob.download_as_bytes()) if blob.exists() else None


def assert_no_job(stack, job_id: str) -> None:
    with pytest.raises(exceptions.NotFound):
        get_job(stack, job_id)


def test_a_warm_upload_is_offered_to_an_idle_vm_of_its_key(function, local_stack, direct_bucket, warm_offers,
                                                           electron_states):
    spec = warm_spec(local_stack)
    idle = write_idle(direct_bucket, spec)
    job_id = new_job_id()
    before = time.time()
    assert post(function, direct_bucket, protocol.TaskObjects(job_id).task, spec.to_metadata()).status_code == 200
    assert_no_job(local_stack, job_id)
    offer = taken_offer(direct_bucket, idle)
    assert offer is not None and (offer.job_id, offer.key, offer.runner, offer.seq) == (job_id, idle.key, idle.runner, 0)
    assert idle.take_by(before) <= offer.take_by <= idle.take_by(time.time())
    assert warm_offers(job_id) == [offer], "the offer is published to the warm topic, the VMs' shared subscription's"
    (state,) = electron_states(job_id)
    assert state.state is protocol.JobState.QUEUED and state.runner == idle.runner
    assert state.take_by == pytest.approx(offer.take_by, abs=0.001) and idle.runner in state.detail


def test_a_redelivered_warm_upload_takes_no_second_vm(function, local_stack, direct_bucket, warm_offers):
    """Eventarc redelivers: the function's record of its offer stops a second take (the claim
    would decide, but a second VM would wait for nothing); the same offer is published again."""
    spec = warm_spec(local_stack)
    idles = [write_idle(direct_bucket, spec, seq=seq) for seq in range(2)]
    job_id = new_job_id()
    for _ in range(2):
        assert post(function, direct_bucket, protocol.TaskObjects(job_id).task, spec.to_metadata()).status_code == 200
    taken = [offer for idle in idles if (offer := taken_offer(direct_bucket, idle)) is not None]
    assert len(taken) == 1
    assert warm_offers(job_id, count=2) == taken * 2
    assert_no_job(local_stack, job_id)


def test_a_claimed_electron_is_not_routed_again(function, local_stack, direct_bucket, warm_offers):
    spec = warm_spec(local_stack)
    idle = write_idle(direct_bucket, spec)
    objects = protocol.TaskObjects(new_job_id())
    direct_bucket.blob(objects.claim).upload_from_string(protocol.Claim(runner=new_job_id()).dumps())
    assert post(function, direct_bucket, objects.task, spec.to_metadata()).status_code == 200
    assert taken_offer(direct_bucket, idle) is None and warm_offers(objects.job_id, within_s=1) == []
    assert_no_job(local_stack, objects.job_id)


def test_a_stale_unclaimed_offer_gets_its_job_on_redelivery(function, local_stack, direct_bucket):
    """A redelivery after the offer's take_by, nobody having claimed it: the executor may never
    have heard of the offer, so the function creates the job itself."""
    spec = warm_spec(local_stack)
    objects = protocol.TaskObjects(new_job_id())
    stale = protocol.Offer(job_id=objects.job_id, key=protocol.warm_key(spec), runner=new_job_id(), seq=0,
                           take_by=time.time() - 1)
    direct_bucket.blob(objects.prefix + "offered.json").upload_from_string(stale.dumps())
    idle = write_idle(direct_bucket, spec)
    assert post(function, direct_bucket, objects.task, spec.to_metadata()).status_code == 200
    assert get_job(local_stack, objects.job_id).name.endswith(objects.job_id)
    assert taken_offer(direct_bucket, idle) is None


@pytest.mark.parametrize("idle_kind", ["other key", "expired", "stops waiting too soon", "ends too soon", "taken"])
def test_a_warm_upload_without_a_vm_to_take_gets_its_job(function, local_stack, direct_bucket, warm_offers, idle_kind):
    spec = warm_spec(local_stack)
    if idle_kind == "other key":
        idle = write_idle(direct_bucket, spec, key=protocol.warm_key(warm_spec(local_stack)))
    elif idle_kind == "expired":
        idle = write_idle(direct_bucket, spec, until_s=-1)
    elif idle_kind == "stops waiting too soon":
        idle = write_idle(direct_bucket, spec, until_s=protocol.OFFER_MARGIN_S / 2)
    elif idle_kind == "ends too soon":  # the VM's job ends before the electron's time limit would
        idle = write_idle(direct_bucket, spec, ends_s=spec.time_limit_s)
    else:
        idle = write_idle(direct_bucket, spec)
        direct_bucket.blob(idle.taken).upload_from_string(b"{}")
    job_id = new_job_id()
    assert post(function, direct_bucket, protocol.TaskObjects(job_id).task, spec.to_metadata()).status_code == 200
    job = get_job(local_stack, job_id)
    variables = dict(job.task_groups[0].task_spec.environment.variables)
    assert variables[protocol.ENV_WARM_SUBSCRIPTION] == local_stack.deployment_settings().warm_subscription_path
    if idle_kind != "taken":
        assert taken_offer(direct_bucket, idle) is None
    assert warm_offers(job_id, within_s=1) == []


def test_two_warm_uploads_and_one_idle_vm_one_offer_and_one_job(function, local_stack, direct_bucket, warm_offers):
    spec = warm_spec(local_stack)
    idle = write_idle(direct_bucket, spec)
    first, second = new_job_id(), new_job_id()
    for job_id in (first, second):
        assert post(function, direct_bucket, protocol.TaskObjects(job_id).task, spec.to_metadata()).status_code == 200
    assert taken_offer(direct_bucket, idle).job_id == first
    assert_no_job(local_stack, first)
    assert get_job(local_stack, second).name.endswith(second)
    assert [o.runner for o in warm_offers(first)] == [idle.runner]


def upload_task(bucket, objects: protocol.TaskObjects, spec: protocol.JobSpec) -> None:
    """The task object, as the executor uploaded it (its own event delivered or not: the cold path reads it)."""
    blob = bucket.blob(objects.task)
    blob.metadata = spec.to_metadata()
    blob.upload_from_string(b"task")


def test_a_cold_object_creates_the_electrons_job(function, local_stack, direct_bucket):
    """An untaken offer: the executor's cold object; its job is created with the task's own spec
    (never routed again, though an idle VM waits), the cold object's body and metadata ignored."""
    spec = warm_spec(local_stack)
    idle = write_idle(direct_bucket, spec)
    objects = protocol.TaskObjects(new_job_id())
    upload_task(direct_bucket, objects, spec)
    forged = spec_for(local_stack, container_image_uri="docker.io/attacker/miner:latest").to_metadata()
    assert post(function, direct_bucket, objects.cold, forged, payload=b"anything").status_code == 200
    job = get_job(local_stack, objects.job_id)
    assert job.task_groups[0].task_spec.runnables[0].container.image_uri == local_stack.container_image_uri
    assert taken_offer(direct_bucket, idle) is None


def test_a_cold_object_of_a_claimed_electron_creates_nothing(function, local_stack, direct_bucket):
    spec = warm_spec(local_stack)
    objects = protocol.TaskObjects(new_job_id())
    upload_task(direct_bucket, objects, spec)
    direct_bucket.blob(objects.claim).upload_from_string(protocol.Claim(runner=new_job_id()).dumps())
    creates_before = batch_admin(local_stack, "stats")["calls"]["create"]
    assert post(function, direct_bucket, objects.cold, None, payload=b"").status_code == 200
    assert batch_admin(local_stack, "stats")["calls"]["create"] == creates_before
    assert_no_job(local_stack, objects.job_id)


def test_a_cold_object_of_a_cancelled_electron_creates_nothing(function, local_stack, direct_bucket, not_created):
    spec = warm_spec(local_stack)
    objects = protocol.TaskObjects(new_job_id())
    upload_task(direct_bucket, objects, spec)
    direct_bucket.blob(objects.cancelled).upload_from_string(b"")
    assert post(function, direct_bucket, objects.cold, None, payload=b"").status_code == 200
    assert_no_job(local_stack, objects.job_id)
    (event,) = [e for e in not_created() if e.job_id == objects.job_id]
    assert event.state is protocol.JobState.CANCELLED


def test_a_cold_object_of_a_task_gone_creates_nothing(function, local_stack, direct_bucket):
    objects = protocol.TaskObjects(new_job_id())
    assert post(function, direct_bucket, objects.cold, None, payload=b"").status_code == 200
    assert_no_job(local_stack, objects.job_id)


def test_a_cancelled_warm_upload_is_never_offered(function, local_stack, direct_bucket, not_created, warm_offers):
    spec = warm_spec(local_stack)
    idle = write_idle(direct_bucket, spec)
    objects = protocol.TaskObjects(new_job_id())
    direct_bucket.blob(objects.cancelled).upload_from_string(b"")
    assert post(function, direct_bucket, objects.task, spec.to_metadata()).status_code == 200
    assert taken_offer(direct_bucket, idle) is None and warm_offers(objects.job_id, within_s=1) == []
    (event,) = [e for e in not_created() if e.job_id == objects.job_id]
    assert event.state is protocol.JobState.CANCELLED


def test_keep_warm_over_the_deployments_cap_is_rejected(local_stack, monkeypatch, direct_bucket, not_created):
    function = make_function(local_stack, monkeypatch, task_bucket=direct_bucket.name, bucket=direct_bucket.name)
    monkeypatch.setenv(deployment.env_name("max_keep_warm_s"), "30")  # read at the first event
    job_id = new_job_id()
    assert post(function, direct_bucket, protocol.TaskObjects(job_id).task, warm_spec(local_stack).to_metadata()).status_code == 200
    assert_no_job(local_stack, job_id)
    (event,) = [e for e in not_created() if e.job_id == job_id]
    assert event.state is protocol.JobState.REJECTED and "keep_warm" in event.detail, event.detail
