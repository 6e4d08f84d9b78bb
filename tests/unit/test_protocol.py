"""The shared contract: object layout, job id, job spec, notification parsing."""

import json
from pathlib import Path

import pytest

from covalent_gcpbatch_plugin import protocol as p
from covalent_gcpbatch_plugin.deployment import DeploymentSettings
from covalent_gcpbatch_plugin.errors import FunctionNotConfigured
from specs import deployment, spec


def test_job_id_is_valid_deterministic_and_new_per_attempt():
    dispatch = "8F1C2D3E-aaaa-bbbb-cccc-1234567890ab"
    first = p.make_job_id(dispatch, 12, "a1b2c3d4")
    assert first == "cov-8f1c2d3e-12-a1b2c3d4"
    assert p.JOB_ID_PATTERN.fullmatch(first)
    assert p.make_job_id(dispatch, 12, "a1b2c3d4") == first
    assert p.make_job_id(dispatch, 12, p.new_attempt_token()) != first
    assert len(p.make_job_id("x" * 64, 10**9, "f" * 8)) <= 63


@pytest.mark.parametrize("bad", [("d", -1, "ab"), ("d", 1, "")])
def test_job_id_rejects_impossible_inputs(bad):
    with pytest.raises(ValueError):
        p.make_job_id(*bad)


def test_layout_round_trips_the_job_id():
    objects = p.TaskObjects("cov-8f1c2d3e-3-a1b2c3d4")
    assert objects.task == "covalent-gcpbatch/cov-8f1c2d3e-3-a1b2c3d4/task.pkl"
    outputs = [objects.stdout(0), objects.stderr(0), objects.stdout(2), objects.stderr(1)]
    everything = [*objects.fixed(), *outputs]
    assert len(set(everything)) == 9 and all(o.startswith(objects.prefix) for o in everything)
    kept = [o for o in everything if not objects.disposable(o)]
    assert kept == [objects.result, objects.error, objects.cancelled], "the marker and the outcome outlive the task"
    assert not objects.disposable("covalent-gcpbatch/cov-8f1c2d3e-3-a1b2c3d4x/task.pkl"), "another task's"
    assert objects.last_attempt(everything) == 2 and objects.last_attempt(objects.fixed()) is None
    assert p.job_id_of_task_object(objects.stdout(0)) is None, "outputs never start a job"
    assert p.job_id_of_task_object(objects.task) == objects.job_id
    assert p.node_id_of_job_id(objects.job_id) == 3 and p.node_id_of_job_id("job-abc") is None
    name = p.job_name("proj", "us-east1", objects.job_id)
    assert name == "projects/proj/locations/us-east1/jobs/cov-8f1c2d3e-3-a1b2c3d4"
    assert p.job_id_of_job_name(name) == objects.job_id


@pytest.mark.parametrize(
    "name",
    [
        "covalent-gcpbatch/cov-8f1c2d3e-3-a1b2c3d4/result.pkl",
        "covalent-gcpbatch/cov-8f1c2d3e-3-a1b2c3d4/stdout.log",
        "other/cov-8f1c2d3e-3-a1b2c3d4/task.pkl",
        "covalent-gcpbatch/Bad_ID/task.pkl",
        "covalent-gcpbatch/a/b/task.pkl",
        "covalent-gcpbatch/task.pkl",
    ],
)
def test_non_task_objects_are_not_task_objects(name):
    assert p.job_id_of_task_object(name) is None


def test_spec_round_trips_through_metadata():
    original = spec()
    metadata = original.to_metadata()
    assert set(metadata) == {p.SPEC_METADATA_KEY}
    assert p.JobSpec.from_metadata(metadata) == original


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        (None, "no 'gcpbatch-spec' metadata"),
        ({"other": "x"}, "no 'gcpbatch-spec' metadata"),
        ({p.SPEC_METADATA_KEY: "not json"}, "invalid job spec"),
        ({p.SPEC_METADATA_KEY: json.dumps({**json.loads(spec().model_dump_json()), "extra": 1})}, "extra"),
        ({p.SPEC_METADATA_KEY: json.dumps({**json.loads(spec().model_dump_json()), "vcpus": "many"})}, "vcpus"),
        ({p.SPEC_METADATA_KEY: json.dumps({**json.loads(spec().model_dump_json()), "retries": 11})}, "retries"),
        ({p.SPEC_METADATA_KEY: spec().model_dump_json(), "pad": "x" * 9000}, "8 KiB"),
    ],
)
def test_bad_metadata_is_refused_with_the_reason(metadata, fragment):
    with pytest.raises(p.SpecError, match=None) as info:
        p.JobSpec.from_metadata(metadata)
    assert fragment in str(info.value)


def use_env(monkeypatch, env: dict[str, str]) -> None:
    """Exactly ``env`` among the GCPBATCH_* variables of this process."""
    import os

    for name in [n for n in os.environ if n.startswith("GCPBATCH_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_deployment_settings_round_trip_through_env(monkeypatch):
    settings = deployment(batch_api_endpoint="http://127.0.0.1:1", allowed_machine_types=("n2-standard-4", "e2-small"))
    env = settings.to_env()
    assert env["GCPBATCH_PROJECT"] == "my-project" and env["GCPBATCH_ALLOWED_MACHINE_TYPES"] == "n2-standard-4,e2-small"
    use_env(monkeypatch, env)
    assert DeploymentSettings.from_env() == settings


def test_deployment_settings_name_missing_env(monkeypatch):
    use_env(monkeypatch, {"GCPBATCH_PROJECT": "x", "GCPBATCH_REGION": "r"})
    with pytest.raises(FunctionNotConfigured, match="GCPBATCH_TOPIC: Field required"):
        DeploymentSettings.from_env()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"container_image_uri": "evil/image"}, "not allowed"),
        ({"vcpus": 16}, "vcpus=16 exceeds"),
        ({"region": "europe-west1"}, "region"),
        ({"service_account_email": "owner@my-project.iam.gserviceaccount.com"}, "run as"),
    ],
)
def test_deployment_refuses_what_it_does_not_allow(overrides, fragment):
    with pytest.raises(p.SpecError) as info:
        deployment().check(spec(**overrides))
    assert fragment in str(info.value)


def test_deployment_accepts_a_conforming_spec():
    deployment().check(spec(service_account_email="runner@my-project.iam.gserviceaccount.com"))


@pytest.mark.parametrize(
    "uri, allowed",
    [
        ("us-east1-docker.pkg.dev/my-project/cgb/worker:py3.11-covalent0.240.0-0123", True),
        ("us-east1-docker.pkg.dev/my-project/cgb/worker-gpu:py3.11-covalent0.240.0-4567", True),
        ("us-east1-docker.pkg.dev/my-project/cgb/cgb-submit:latest", False),  # the function's own image
        ("us-east1-docker.pkg.dev/my-project/other/worker:1", False),
        ("docker.io/attacker/us-east1-docker.pkg.dev/my-project/cgb/worker:1", False),
        ("us-docker.pkg.dev/my-project/covalent/worker:1", True),  # an exact entry beside the pattern
        ("us-docker.pkg.dev/my-project/covalent/worker:10", False),
    ],
)
def test_image_allowlist_takes_exact_uris_and_prefix_patterns(uri, allowed):
    settings = deployment(allowed_images=("us-east1-docker.pkg.dev/my-project/cgb/worker*",
                                          "us-docker.pkg.dev/my-project/covalent/worker:1"))
    assert settings.image_allowed(uri) is allowed
    if allowed:
        settings.check(spec(container_image_uri=uri))
    else:
        with pytest.raises(p.SpecError, match="is not allowed by this deployment"):
            settings.check(spec(container_image_uri=uri))


REAL = json.loads((Path(__file__).resolve().parents[1] / "support" / "fixtures" / "batch_messages.json").read_text())


def test_parses_a_real_job_message_without_type():
    """Batch's job-level message has no Type attribute and names the project by NUMBER."""
    real = REAL["job_message"]
    event = p.parse_notification(real["attributes"], real["data"].encode())
    assert event == p.JobEvent("cov-8f1c2d3e-3-a1b2c3d4", p.JobState.SUCCEEDED, real["data"])
    assert p.parse_notification({**real["attributes"], "Type": p.JOB_STATE_CHANGED}, real["data"].encode()) == event


def test_the_local_batch_service_publishes_the_real_shape():
    real = REAL["job_message"]
    data, attributes = p.job_state_message(real["attributes"]["JobName"], real["attributes"]["JobUID"], "us-central1",
                                           "RUNNING", "SUCCEEDED", "2023-08-24T16:21:14-07:00")
    assert (attributes, data.decode()) == (real["attributes"], real["data"])
    task = REAL["task_message"]
    data, attributes = p.task_state_message(task["attributes"]["TaskName"], task["attributes"]["JobUID"],
                                            task["attributes"]["TaskUID"], "us-central1", "PENDING", "SUCCEEDED",
                                            "2023-08-24T16:21:14-07:00")
    assert (attributes, data.decode()) == (task["attributes"], task["data"])


def test_parses_a_real_task_message():
    real = REAL["task_message"]
    assert p.parse_task_notification(real["attributes"], real["data"].encode()) == p.TaskEvent(
        "cov-8f1c2d3e-3-a1b2c3d4", 5, "SUCCEEDED", real["data"])
    assert p.parse_notification(real["attributes"], real["data"].encode()) is None, "not a job-level state"
    assert p.parse_task_notification(REAL["job_message"]["attributes"], b"") is None


def test_exit_code_comes_from_task_execution_or_the_event_text():
    from google.cloud import batch_v1

    assert p.exit_code_of_event(batch_v1.StatusEvent(description=REAL["job_failed_event"])) == 127
    with_execution = batch_v1.StatusEvent(description="x", task_execution=batch_v1.TaskExecution(exit_code=50001))
    assert p.exit_code_of_event(with_execution) == 50001
    assert p.exit_code_of_event(batch_v1.StatusEvent(description="Job state is set from QUEUED to SCHEDULED")) == 0


def test_ignores_task_level_and_foreign_messages():
    assert p.parse_notification({"Type": "TASK_STATE_CHANGED", "JobName": "projects/1/locations/r/jobs/x", "NewTaskState": "RUNNING"}, b"") is None
    assert p.parse_notification({"eventType": "OBJECT_FINALIZE"}, b"{}") is None
    assert p.parse_notification({"Type": p.JOB_STATE_CHANGED, "JobName": "projects/1/locations/r/jobs/x", "NewJobState": "BOGUS"}, b"") is None


def test_parses_rejections():
    rejected = p.NotCreated(state=p.JobState.REJECTED, reason="image not allowed")
    data, attributes = p.not_created_message("cov-8f1c2d3e-3-a1b2c3d4", rejected)
    event = p.parse_notification(attributes, data)
    assert event == p.JobEvent("cov-8f1c2d3e-3-a1b2c3d4", p.JobState.REJECTED, "image not allowed")
    assert event.state.is_terminal


def test_parses_not_created_cancelled_and_its_record():
    record = p.NotCreated(state=p.JobState.CANCELLED, reason="cancelled before its job was created")
    data, attributes = p.not_created_message("cov-8f1c2d3e-3-a1b2c3d4", record)
    event = p.parse_notification(attributes, data)
    assert event == p.JobEvent("cov-8f1c2d3e-3-a1b2c3d4", p.JobState.CANCELLED, "cancelled before its job was created")
    assert p.loads_not_created(p.dumps_not_created(record)) == record
    assert p.loads_not_created(b"garbage").state is p.JobState.REJECTED, "an unreadable record still ends the wait"


@pytest.mark.parametrize(
    "options, fragment",
    [
        (p.JobOptions(accelerator_type="nvidia-tesla-a100", accelerator_count=16), "accelerator_count=16 exceeds"),
        (p.JobOptions(machine_type="m3-megamem-128"), "machine_type 'm3-megamem-128' is not allowed"),
        (p.JobOptions(allowed_locations=("zones/europe-west1-b",)), "outside this deployment's region"),
    ],
)
def test_deployment_caps_job_options(options, fragment):
    settings = deployment(allowed_machine_types=("n1-standard-4",))
    with pytest.raises(p.SpecError) as info:
        settings.check(spec(options=options))
    assert fragment in str(info.value)


def test_a_job_state_newer_than_the_client_is_news_of_no_meaning():
    """proto-plus hands a state value it does not know over as an int: the executor reads it as
    STATE_UNSPECIFIED (it neither ends nor moves a wait) instead of failing on ``.name``."""
    import warnings

    from google.cloud import batch_v1

    from covalent_gcpbatch_plugin.protocol import JobState, state_name

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # proto-plus warns of the unknown value
        job = batch_v1.Job(status=batch_v1.JobStatus(state=42))
        assert JobState.of(job.status.state) is JobState.STATE_UNSPECIFIED
        assert state_name(job.status.state) == "UNKNOWN(42)"
    assert JobState.of(batch_v1.JobStatus.State.RUNNING) is JobState.RUNNING


def test_the_worker_is_told_where_its_task_is_when_it_is_not_beside_its_outputs():
    from covalent_gcpbatch_plugin import protocol as p

    assert p.worker_environment("out", "cov-a-0-x") == {p.ENV_BUCKET: "out", p.ENV_JOB_ID: "cov-a-0-x"}
    assert p.worker_environment("out", "cov-a-0-x", "out") == {p.ENV_BUCKET: "out", p.ENV_JOB_ID: "cov-a-0-x"}
    assert p.worker_environment("out", "cov-a-0-x", "tasks") == {
        p.ENV_BUCKET: "out", p.ENV_TASK_BUCKET: "tasks", p.ENV_JOB_ID: "cov-a-0-x"}
    assert p.pack_environment("out", "cov-a-pack-q", "tasks") == {
        p.ENV_BUCKET: "out", p.ENV_TASK_BUCKET: "tasks", p.ENV_PACK_ID: "cov-a-pack-q"}


VOLUME_REFUSALS = [
    ({"/etc/data": "gs://my-data"}, "inside /etc, a directory of the container's own: mount under /mnt"),
    ({"/mnt/a": "gs://my-data", "/mnt/a/b": "gs://other"}, "are nested"),
    # Sorted, '/mnt/a-b' falls between them: every pair is compared, not neighbours only.
    ({"/mnt/a": "gs://my-data", "/mnt/a-b": "gs://third", "/mnt/a/c": "gs://other"}, "are nested"),
    ({"mnt/data": "gs://my-data"}, "must be an absolute path"),
    ({"/mnt/../etc": "gs://my-data"}, "must be an absolute path"),
    ({"/mnt/data": "s3://my-data"}, "is not a gs://BUCKET or gs://BUCKET/FOLDER address"),
    ({"/mnt/data": "gs://my-data/../x"}, "is not a gs://BUCKET"),
    ({"/mnt/data": {"uri": "gs://my-data", "mount_options": ["--key-file=/k.json"]}}, "is not allowed"),
    ({"/mnt/data": {"uri": "gs://my-data", "mount_options": ["-o rw"]}}, "must be one gcsfuse flag"),
    ({"/mnt/data": {"uri": "gs://my-data", "writable": True}}, "Extra inputs are not permitted"),
]


@pytest.mark.parametrize("volumes, fragment", VOLUME_REFUSALS)
def test_bad_gcs_volumes_are_refused_naming_the_problem(volumes, fragment):
    with pytest.raises(ValueError, match=None) as info:
        p.JobOptions(gcs_volumes=volumes)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("secrets, fragment", [
    ({"GCPBATCH_BUCKET": "projects/p1/secrets/s/versions/1"}, "is reserved"),
    ({"BATCH_TASK_INDEX": "projects/p1/secrets/s/versions/1"}, "is reserved"),
    ({"MY-KEY": "projects/p1/secrets/s/versions/1"}, "must be letters, digits and '_'"),
    ({"KEY": "projects/p1/secrets/s"}, "must name a secret version"),
    ({"KEY": "projects/p1/secrets/s/versions/0"}, "must name a secret version"),
    ({"KEY": "s/versions/1"}, "must name a secret version"),
])
def test_bad_secrets_are_refused_naming_the_problem(secrets, fragment):
    with pytest.raises(ValueError) as info:
        p.JobOptions(secrets=secrets)
    assert fragment in str(info.value), str(info.value)


def test_every_worker_variable_is_reserved_from_secrets():
    """No secret can replace what the worker reads (worker_environment, pack_environment)."""
    names = set(p.worker_environment("b", "j", "t")) | set(p.pack_environment("b", "j", "t"))
    assert names <= set(p.WORKER_ENV_NAMES)
    for name in names:
        with pytest.raises(ValueError, match="is reserved"):
            p.JobOptions(secrets={name: "projects/p1/secrets/s/versions/1"})


def test_a_volume_shorthand_is_read_only_and_the_spec_stays_small():
    options = p.JobOptions(gcs_volumes={f"/mnt/d{i}": f"gs://bucket-{i}/some/folder" for i in range(8)},
                           secrets={f"KEY_{i}": f"projects/my-project/secrets/secret-{i}/versions/latest" for i in range(16)})
    assert all(v.read_only and v.mount_options == () for v in options.gcs_volumes.values())
    metadata = spec(options=options).to_metadata()  # the most a task may ask for fits in the 8 KiB
    assert p.JobSpec.from_metadata(metadata).options == options


def test_a_bucket_mounted_over_the_scratch_disk_is_refused():
    with pytest.raises(ValueError, match="overlaps the scratch disk's '/mnt/disks/scratch'"):
        p.JobOptions(scratch_disk_gb=100, gcs_volumes={"/mnt/disks/scratch/in": "gs://my-data"})
    with pytest.raises(ValueError, match="overlaps the scratch disk"):
        p.JobOptions(scratch_disk_gb=100, gcs_volumes={"/mnt/disks": "gs://my-data"})
    assert p.JobOptions(scratch_disk_gb=100, gcs_volumes={"/mnt/disks/scratch2": "gs://my-data"})
