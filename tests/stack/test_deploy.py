"""deploy.sh, without a cloud.

1. With a recording ``gcloud`` (tests/support/fake_gcloud.py) first on PATH: ``up``, a second ``up``,
   ``status``, ``down`` without and with ``--yes``; the recorded calls and the fake's state show
   what was created, with which settings, and which roles went to which account where.
2. With the real gcloud pointed at the local stack's emulators: the steps that have an emulator
   (the Pub/Sub topic, the bucket) run for real, and the Python clients check the result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from importlib.metadata import version
from pathlib import Path

import pytest

from gcloud_recorder import MUTATING, Recorder, check, find, flag_values, verb_of

from covalent_gcpbatch_plugin.deployment import CAP_FIELDS, DeploymentSettings, cap_flag, caps_table
from covalent_gcpbatch_plugin.protocol import TASKS_PREFIX

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy.sh"
ON_CI = os.environ.get("CI", "").lower() == "true"

PROJECT, REGION, PREFIX = "my-project-42", "europe-west4", "cgb-test"
BUCKET = f"{PREFIX}-{PROJECT}"
TASK_BUCKET = f"{PREFIX}-tasks-{PROJECT}"
TOPIC = f"{PREFIX}-jobs"
# Warm VMs' offers (protocol/warm.py): the function's defaults, which deploy.sh creates.
WARM_TOPIC, WARM_SUBSCRIPTION = f"{TOPIC}-warm", f"{TOPIC}-warm-offers"
REPOSITORY = PREFIX
FUNCTION = f"{PREFIX}-submit"
RUNNER = f"{PREFIX}-runner@{PROJECT}.iam.gserviceaccount.com"
FN = f"{PREFIX}-fn@{PROJECT}.iam.gserviceaccount.com"
BUILDER = f"{PREFIX}-build@{PROJECT}.iam.gserviceaccount.com"
STAGING = f"{PREFIX}-build-{PROJECT}"
GCS_AGENT = "service-424242424242@gs-project-accounts.iam.gserviceaccount.com"
PUBSUB_AGENT = "service-424242424242@gcp-sa-pubsub.iam.gserviceaccount.com"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
COVALENT_VERSION = version("covalent")
ARGS = ["--project", PROJECT, "--region", REGION, "--prefix", PREFIX, "--python", sys.executable]
@pytest.fixture
def recorder(tmp_path) -> Recorder:
    return Recorder(tmp_path)


def test_up_up_status_down_with_a_recording_gcloud(recorder, monkeypatch):
    # A config left by `covalent-gcpbatch local up` must not keep sending tasks to an emulator.
    recorder.config_dir.mkdir()
    (recorder.config_dir / "covalent.conf").write_text(
        '[executors.gcpbatch]\npubsub_emulator_host = "127.0.0.1:8085"\nvcpus = 4\n'
    )

    first = check(recorder.deploy("up", *ARGS))
    calls_first = recorder.calls()
    second = check(recorder.deploy("up", *ARGS))
    calls_second = recorder.calls()[len(calls_first) :]

    # -- every resource created exactly once (over both runs) --------------------------------------
    all_calls = calls_first + calls_second
    creations = {
        "bucket": find(all_calls, "storage", "buckets", "create"),
        "repository": find(all_calls, "artifacts", "repositories", "create"),
        "topic": find(all_calls, "pubsub", "topics", "create"),
        "subscription": find(all_calls, "pubsub", "subscriptions", "create"),
        "accounts": find(all_calls, "iam", "service-accounts", "create"),
        "image build": find(all_calls, "builds", "submit"),
        "function": find(all_calls, "functions", "deploy"),
        "apis": find(all_calls, "services", "enable"),
    }
    assert {name: len(calls) for name, calls in creations.items()} == {
        "bucket": 3, "repository": 1, "topic": 2, "subscription": 1, "accounts": 3, "image build": 1, "function": 1,
        "apis": 1,
    }  # fmt: skip
    assert [c["argv"][3] for c in creations["accounts"]] == [f"{PREFIX}-runner", f"{PREFIX}-fn", f"{PREFIX}-build"]
    assert [c["argv"][3] for c in creations["topic"]] == [TOPIC, WARM_TOPIC]
    # One pull subscription all warm VMs share; an offer is worthless after seconds (OFFER_TAKE_S):
    # the shortest retention and ack deadline Pub/Sub allows, and it never expires while unused.
    (subscription,) = creations["subscription"]
    assert subscription["argv"][3] == WARM_SUBSCRIPTION
    assert [flag_values(subscription, flag) for flag in
            ("--topic", "--ack-deadline", "--message-retention-duration", "--expiration-period")] == [
        [WARM_TOPIC], ["10"], ["10m"], ["never"]]  # fmt: skip
    assert not [a for a in subscription["argv"] if a.startswith("--push-endpoint")], "a pull subscription"
    assert set(creations["apis"][0]["argv"][2:-1]) == {
        f"{api}.googleapis.com"
        for api in ("batch", "compute", "storage", "pubsub", "cloudfunctions", "run", "eventarc", "cloudbuild",
                    "artifactregistry", "logging", "iam")
    }  # fmt: skip
    # Every call names the project explicitly (never the user's gcloud default).
    for call in all_calls:
        assert f"--project={PROJECT}" in call["argv"] or call["argv"][:1] == ["projects"], call["argv"]

    # -- the second up changes nothing ---------------------------------------------------------------
    assert [c["argv"] for c in calls_second if verb_of(c) in MUTATING] == []
    assert "+ gcloud" not in second.stdout
    # Every change is echoed before it runs.
    assert first.stdout.count("+ gcloud") == len([c for c in calls_first if verb_of(c) in MUTATING]) == 36

    # -- the bucket: region, uniform access, no public access, task objects expire ------------------
    bucket_create, task_bucket_create, staging_create = creations["bucket"]
    # Outputs in one bucket, task objects in the trigger's own: results and logs fire nothing.
    assert [bucket_create["argv"][3], task_bucket_create["argv"][3]] == [f"gs://{BUCKET}", f"gs://{TASK_BUCKET}"]
    for create in (bucket_create, task_bucket_create):
        assert f"--location={REGION}" in create["argv"]
        assert "--uniform-bucket-level-access" in create["argv"]
        assert "--public-access-prevention" in create["argv"]
        lifecycle = json.loads(create["files"]["--lifecycle-file"])
        assert lifecycle == {"rule": [{"action": {"type": "Delete"}, "condition": {"age": 7, "matchesPrefix": [TASKS_PREFIX]}}]}
    # Cloud Build's sources go to a staging bucket of the deployment's own, kept one day.
    assert staging_create["argv"][3] == f"gs://{STAGING}"
    assert {"--uniform-bucket-level-access", "--public-access-prevention", f"--location={REGION}"} <= set(staging_create["argv"])
    assert json.loads(staging_create["files"]["--lifecycle-file"]) == {"rule": [{"action": {"type": "Delete"}, "condition": {"age": 1}}]}

    # -- the repository and the image, built for this environment's versions -------------------------
    repo_create = creations["repository"][0]
    assert repo_create["argv"][3] == REPOSITORY
    assert "--repository-format=docker" in repo_create["argv"] and f"--location={REGION}" in repo_create["argv"]
    build = creations["image build"][0]
    # The build context is exactly what the Dockerfile copies, the user's extra requirements empty.
    context = build["context"]
    assert {"worker_image/Dockerfile", "worker_image/requirements.txt", "worker_image/extra-requirements.txt",
            "pyproject.toml", "README.md", "functions/main.py", "executor/covalent_gcpbatch_plugin/worker.py"} <= set(context)
    assert not [name for name in context if name.startswith(("tests/", "bench/", ".git/", "deploy.sh", "examples/"))]
    assert context["worker_image/extra-requirements.txt"] == (REPO / "worker_image" / "extra-requirements.txt").read_text()
    # Run as the build account, regionally, sources staged in the deployment's bucket, logs in Logging.
    assert flag_values(build, "--service-account") == [f"projects/{PROJECT}/serviceAccounts/{BUILDER}"]
    assert flag_values(build, "--gcs-source-staging-dir") == [f"gs://{STAGING}/source"]
    assert flag_values(build, "--region") == [REGION]
    config = json.loads(build["files"]["--config"])
    assert config["options"] == {"logging": "CLOUD_LOGGING_ONLY"}
    (step,) = config["steps"]
    image = config["images"][0]
    assert image.startswith(f"{REGION}-docker.pkg.dev/{PROJECT}/{REPOSITORY}/worker:py{PYTHON_VERSION}-covalent{COVALENT_VERSION}-")
    assert step["name"] == "gcr.io/cloud-builders/docker"
    assert step["args"] == [
        "build", "-f", "worker_image/Dockerfile",
        "--build-arg", f"PYTHON_VERSION={PYTHON_VERSION}", "--build-arg", f"COVALENT_VERSION={COVALENT_VERSION}",
        "-t", image, ".",
    ]  # fmt: skip

    # -- the function: trigger, entry point, identity, ingress, settings -----------------------------
    deploy = creations["function"][0]
    argv = deploy["argv"]
    assert argv[:3] == ["functions", "deploy", FUNCTION]
    assert "--gen2" in argv and f"--region={REGION}" in argv
    assert flag_values(deploy, "--trigger-event-filters") == [
        "type=google.cloud.storage.object.v1.finalized",
        f"bucket={TASK_BUCKET}",
    ]
    assert flag_values(deploy, "--entry-point") == ["on_task_uploaded"]
    assert flag_values(deploy, "--source") == [str(REPO / "functions")]
    assert flag_values(deploy, "--runtime")[0].startswith("python3")
    assert flag_values(deploy, "--service-account") == [FN]
    assert flag_values(deploy, "--trigger-service-account") == [FN]
    assert flag_values(deploy, "--build-service-account") == [f"projects/{PROJECT}/serviceAccounts/{BUILDER}"]
    assert flag_values(deploy, "--docker-repository") == [f"projects/{PROJECT}/locations/{REGION}/repositories/{REPOSITORY}"]
    assert flag_values(deploy, "--stage-bucket") == [STAGING]
    assert flag_values(deploy, "--ingress-settings") == ["internal-only"]
    assert "--no-allow-unauthenticated" in argv and "--allow-unauthenticated" not in argv
    assert "--retry" in argv, "the function answers 500 on transient errors and relies on redelivery"
    env = {key: json.loads(value) for key, _, value in
           (line.partition(": ") for line in deploy["files"]["--env-vars-file"].splitlines())}  # fmt: skip
    # Sized for a 1,000-electron burst (deploy.sh's FUNCTION_* and docs/deploy.md): 20 instances x 50
    # concurrent requests, 1 vCPU (concurrency > 1 needs it), as many threads as requests.
    assert [flag_values(deploy, flag) for flag in ("--cpu", "--memory", "--concurrency", "--max-instances")] == [
        ["1"], ["512Mi"], ["50"], ["20"]]  # fmt: skip
    assert env.pop("THREADS") == "50", "functions-framework serves THREADS requests at once (default 4 per CPU)"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = DeploymentSettings.from_env()
    for name in env:
        monkeypatch.delenv(name)
    assert (settings.project_id, settings.region, settings.topic) == (PROJECT, REGION, TOPIC)
    assert settings.job_service_account == RUNNER
    assert settings.allowed_images == (f"{REGION}-docker.pkg.dev/{PROJECT}/{REPOSITORY}/worker*",)
    assert settings.image_allowed(image), "every worker image of the deployment's repository"
    assert not settings.image_allowed(f"{REGION}-docker.pkg.dev/{PROJECT}/{REPOSITORY}/{FUNCTION}:latest")
    assert settings.batch_api_endpoint is None
    assert (settings.task_bucket, settings.bucket) == (TASK_BUCKET, BUCKET)
    # The function offers on the topic and names the subscription deploy.sh made (its defaults).
    assert settings.warm_topic_path == f"projects/{PROJECT}/topics/{WARM_TOPIC}"
    assert settings.warm_subscription_path == f"projects/{PROJECT}/subscriptions/{WARM_SUBSCRIPTION}"

    # -- roles: each to the right account, at the right level ----------------------------------------
    runner, fn, builder = f"serviceAccount:{RUNNER}", f"serviceAccount:{FN}", f"serviceAccount:{BUILDER}"
    ours = {runner, fn, builder}
    project_roles = {(r, m) for r, m in recorder.bindings(f"projects/{PROJECT}") if m in ours}
    assert project_roles == {
        ("roles/batch.agentReporter", runner),
        ("roles/logging.logWriter", runner),
        ("roles/batch.jobsEditor", fn),
        ("roles/eventarc.eventReceiver", fn),
        ("roles/logging.logWriter", builder),
    }, "nothing else project-wide: storage, Pub/Sub and the registry are granted on the resources"
    # The function's build reads its source from Cloud Functions' own copy, in a bucket that does not
    # exist before the first deploy: objects of that bucket only, by a condition on their names.
    assert recorder.conditional_bindings(f"projects/{PROJECT}") == {(
        "roles/storage.objectViewer", builder,
        f'resource.name.startsWith("projects/_/buckets/gcf-v2-sources-424242424242-{REGION}/")',
    )}  # fmt: skip
    assert ("roles/pubsub.publisher", f"serviceAccount:{GCS_AGENT}") in recorder.bindings(f"projects/{PROJECT}")
    assert recorder.bindings(f"storage buckets/gs://{BUCKET}") == {
        ("roles/storage.objectViewer", runner),
        ("roles/storage.objectCreator", runner),
        ("roles/storage.objectViewer", fn),
        ("roles/storage.objectCreator", fn),
    }, "create and read only: nobody but the dispatching user replaces or deletes an object"
    assert recorder.bindings(f"storage buckets/gs://{TASK_BUCKET}") == {
        ("roles/storage.objectViewer", runner),
        ("roles/storage.objectViewer", fn),
    }, "read only: only the dispatching user writes task objects"
    assert recorder.bindings(f"storage buckets/gs://{STAGING}") == {("roles/storage.objectAdmin", builder)}
    assert recorder.bindings(f"pubsub topics/{TOPIC}") == {("roles/pubsub.publisher", runner), ("roles/pubsub.publisher", fn)}
    assert recorder.bindings(f"pubsub topics/{WARM_TOPIC}") == {("roles/pubsub.publisher", fn)}
    assert recorder.bindings(f"pubsub subscriptions/{WARM_SUBSCRIPTION}") == {("roles/pubsub.subscriber", runner)}
    assert recorder.bindings(f"artifacts repositories/{REPOSITORY}@{REGION}") == {
        ("roles/artifactregistry.reader", runner),
        ("roles/artifactregistry.writer", builder),
    }
    assert recorder.bindings(f"iam service-accounts/{RUNNER}") == {("roles/iam.serviceAccountUser", fn)}
    # Only the Pub/Sub agent, to authenticate the trigger's pushes as the function's account.
    assert recorder.bindings(f"iam service-accounts/{FN}") == {
        ("roles/iam.serviceAccountTokenCreator", f"serviceAccount:{PUBSUB_AGENT}")}
    assert recorder.bindings(f"iam service-accounts/{BUILDER}") == set(), "nobody may act as the build account"
    assert recorder.bindings(f"run services/{FUNCTION}@{REGION}") == {("roles/run.invoker", fn)}

    # -- the Covalent config: everything the executor needs, emulators cleared, other keys kept ------
    section = recorder.config_section()
    assert section == {
        "project_id": PROJECT,
        "region": REGION,
        "bucket_name": BUCKET,
        "task_bucket_name": TASK_BUCKET,
        "container_image_uri": image,
        "service_account_email": RUNNER,
        "pubsub_topic": TOPIC,
        "pubsub_emulator_host": "",
        "storage_emulator_host": "",
        "batch_api_endpoint": "",
        "vcpus": 4,
    }
    assert f'service_account_email = "{RUNNER}"' in first.stdout, "up prints the section it wrote"

    # -- status ---------------------------------------------------------------------------------------
    status_start = len(recorder.calls())
    status = check(recorder.deploy("status", *ARGS))
    assert "MISSING" not in status.stdout
    assert status.stdout.count("present") == 12 + 23, "12 resources, 23 role grants"
    assert [c["argv"] for c in recorder.calls()[status_start:] if verb_of(c) in MUTATING] == []

    # -- down: refuses without --yes when nobody can be asked ----------------------------------------
    before = len(recorder.calls())
    refused = recorder.deploy("down", *ARGS)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert recorder.calls()[before:] == []

    # -- down --yes removes what up made ---------------------------------------------------------------
    down_start = len(recorder.calls())
    check(recorder.deploy("down", *ARGS, "--yes"))
    down_calls = recorder.calls()[down_start:]
    assert recorder.state["resources"] == {}, "every resource up created is gone"
    remaining = {(r, m) for r, m in recorder.bindings(f"projects/{PROJECT}")}
    assert remaining == {("roles/pubsub.publisher", f"serviceAccount:{GCS_AGENT}")}, "project roles of our accounts removed"
    assert recorder.conditional_bindings(f"projects/{PROJECT}") == set()
    deleted = [c["argv"][:4] for c in down_calls if verb_of(c) in ("delete", "rm")]
    assert deleted == [
        ["functions", "delete", FUNCTION, f"--region={REGION}"],
        ["iam", "service-accounts", "delete", FN],
        ["iam", "service-accounts", "delete", RUNNER],
        ["iam", "service-accounts", "delete", BUILDER],
        ["pubsub", "subscriptions", "delete", WARM_SUBSCRIPTION],
        ["pubsub", "topics", "delete", WARM_TOPIC],
        ["pubsub", "topics", "delete", TOPIC],
        ["artifacts", "repositories", "delete", REPOSITORY],
        ["storage", "rm", "--recursive", f"gs://{BUCKET}"],
        ["storage", "rm", "--recursive", f"gs://{TASK_BUCKET}"],
        ["storage", "rm", "--recursive", f"gs://{STAGING}"],
    ]
    assert recorder.config_section() == {"vcpus": 4}, "down takes out the keys up wrote, and only those"

    status_after = recorder.deploy("status", *ARGS)
    assert status_after.returncode == 1 and status_after.stdout.count("MISSING") == 12

    # A second down has nothing left to delete and still succeeds.
    again_start = len(recorder.calls())
    check(recorder.deploy("down", *ARGS, "--yes"))
    assert [c["argv"] for c in recorder.calls()[again_start:] if verb_of(c) in MUTATING] == []


def test_a_changed_setting_redeploys_only_the_function(recorder):
    check(recorder.deploy("up", *ARGS))
    assert "(up to date)" in check(recorder.deploy("status", *ARGS)).stdout
    assert "OUT OF DATE" in check(recorder.deploy("status", *ARGS, "--max-vcpus", "8")).stdout
    start = len(recorder.calls())
    check(recorder.deploy("up", *ARGS, "--max-vcpus", "8"))
    changed = [c for c in recorder.calls()[start:] if verb_of(c) in MUTATING]
    assert [c["argv"][:3] for c in changed] == [["functions", "deploy", FUNCTION]]
    env_file = changed[0]["files"]["--env-vars-file"]
    assert 'GCPBATCH_MAX_VCPUS: "8.0"' in env_file or 'GCPBATCH_MAX_VCPUS: "8"' in env_file


def test_mount_buckets_and_secrets_are_granted_to_the_runner_alone_and_only_those(recorder):
    """Issue 26, items 3 and 5: the allowlists reach the function, and the jobs' account gets a role
    on each listed bucket (objectViewer read-only, objectUser read-write) and on each listed secret
    (secretAccessor, in the secret's own project), nothing project-wide; down takes those grants
    away and leaves the user's buckets and secrets."""
    secret = "projects/vault-project-1/secrets/api-key"
    recorder.state_file.write_text(json.dumps({"resources": {
        "storage buckets/gs://shared-data": {"name": "gs://shared-data"},
        "storage buckets/gs://results-rw": {"name": "gs://results-rw"},
        f"secrets/{secret}": {"name": secret},
    }}))
    flags = ["--allowed-mount-buckets", "shared-data", "--allowed-writable-mount-buckets", "results-rw",
             "--allowed-secrets", secret]
    check(recorder.deploy("up", *ARGS, *flags))
    runner = f"serviceAccount:{RUNNER}"
    assert recorder.bindings("storage buckets/gs://shared-data") == {("roles/storage.objectViewer", runner)}
    assert recorder.bindings("storage buckets/gs://results-rw") == {("roles/storage.objectUser", runner)}
    assert recorder.bindings(f"secrets/{secret}") == {("roles/secretmanager.secretAccessor", runner)}
    (grant,) = find(recorder.calls(), "secrets", "add-iam-policy-binding")
    assert grant["argv"][2] == secret and "--project=vault-project-1" in grant["argv"]
    project_roles = {r for r, m in recorder.bindings(f"projects/{PROJECT}") if m == runner}
    assert project_roles == {"roles/batch.agentReporter", "roles/logging.logWriter"}, "no project-wide storage or secret role"
    (deploy,) = find(recorder.calls(), "functions", "deploy")
    env = deploy["files"]["--env-vars-file"]
    assert 'GCPBATCH_ALLOWED_MOUNT_BUCKETS: "shared-data"' in env
    assert 'GCPBATCH_ALLOWED_WRITABLE_MOUNT_BUCKETS: "results-rw"' in env
    assert f'GCPBATCH_ALLOWED_SECRETS: "{secret}"' in env
    assert "MISSING" not in check(recorder.deploy("status", *ARGS, *flags)).stdout

    check(recorder.deploy("down", *ARGS, *flags, "--yes"))
    for resource in ("storage buckets/gs://shared-data", "storage buckets/gs://results-rw", f"secrets/{secret}"):
        assert resource in recorder.state["resources"], "the user's bucket or secret stays"
        assert recorder.bindings(resource) == set(), f"the runner's grant on {resource} is gone"


def test_warm_vms_pubsub_roles_are_on_the_warm_topic_and_subscription_only(recorder):
    """Issue 27: the jobs' account (a warm VM) pulls offers from the one warm subscription, and the
    function publishes them to the warm topic: each role granted on that resource alone, never
    project-wide, and nobody else holds a role there. The warm caps reach the function."""
    flags = ["--max-keep-warm-s", "120", "--max-warm-vms", "3", "--warm-lifetime-s", "7200"]
    check(recorder.deploy("up", *ARGS, *flags))
    runner, fn = f"serviceAccount:{RUNNER}", f"serviceAccount:{FN}"
    policies = recorder.state["policies"]
    granted = {(resource, role, member) for resource in policies for role, member in recorder.bindings(resource)}
    assert {(res, m) for res, role, m in granted if role == "roles/pubsub.subscriber"} == {
        (f"pubsub subscriptions/{WARM_SUBSCRIPTION}", runner)}, "subscriber: the runner, on the warm subscription only"
    assert {(res, m) for res, role, m in granted if role == "roles/pubsub.publisher" and m == fn} == {
        (f"pubsub topics/{TOPIC}", fn), (f"pubsub topics/{WARM_TOPIC}", fn)}  # fmt: skip
    assert recorder.bindings(f"pubsub topics/{WARM_TOPIC}") == {("roles/pubsub.publisher", fn)}, \
        "the runner publishes electron states on the notification topic, never offers"
    assert recorder.bindings(f"pubsub subscriptions/{WARM_SUBSCRIPTION}") == {("roles/pubsub.subscriber", runner)}, \
        "the function only publishes offers"
    (grant,) = find(recorder.calls(), "pubsub", "subscriptions", "add-iam-policy-binding")
    assert grant["argv"][3] == WARM_SUBSCRIPTION and f"--project={PROJECT}" in grant["argv"]
    assert not [r for r, m in recorder.bindings(f"projects/{PROJECT}") if r.startswith("roles/pubsub.") and m in (runner, fn)]
    (deploy,) = find(recorder.calls(), "functions", "deploy")
    env = deploy["files"]["--env-vars-file"]
    for line in ('GCPBATCH_MAX_KEEP_WARM_S: "120"', 'GCPBATCH_MAX_WARM_VMS: "3"', 'GCPBATCH_WARM_LIFETIME_S: "7200"'):
        assert line in env

    status = check(recorder.deploy("status", *ARGS, *flags)).stdout
    assert f"present  roles/pubsub.subscriber -> {RUNNER} on subscription {WARM_SUBSCRIPTION}" in status
    assert f"present  roles/pubsub.publisher -> {FN} on topic {WARM_TOPIC}" in status
    # A subscription left behind by a deleted topic would outlive it: down deletes it first.
    check(recorder.deploy("down", *ARGS, *flags, "--yes"))
    deleted = [c["argv"][:4] for c in recorder.calls() if verb_of(c) == "delete" and c["argv"][0] == "pubsub"]
    assert deleted == [["pubsub", "subscriptions", "delete", WARM_SUBSCRIPTION],
                       ["pubsub", "topics", "delete", WARM_TOPIC], ["pubsub", "topics", "delete", TOPIC]]
    assert not [k for k in recorder.state["policies"] if k.startswith("pubsub ")]


@pytest.mark.parametrize("flags, message", [
    (["--allowed-secrets", "projects/p1/secrets/*"], "is not a secret's full name"),
    (["--allowed-mount-buckets", "gs://shared-data"], "is not a bucket name"),
])
def test_bad_allowlists_are_refused_before_any_change(recorder, flags, message):
    result = recorder.deploy("up", *ARGS, *flags)
    assert result.returncode != 0 and message in result.stdout + result.stderr
    assert [c["argv"] for c in recorder.calls() if verb_of(c) in MUTATING] == []


def test_a_missing_mount_bucket_is_named(recorder):
    result = recorder.deploy("up", *ARGS, "--allowed-mount-buckets", "no-such-bucket")
    assert result.returncode != 0
    assert "bucket gs://no-such-bucket (--allowed-mount-buckets or --allowed-writable-mount-buckets) does not exist" in result.stderr


# gcloud's own texts for a grant that has not propagated yet (docs/deploy.md "What it creates", README "Troubleshooting").
EVENTARC_AGENT_NOT_READY = (
    "ERROR: (gcloud.functions.deploy) INVALID_ARGUMENT: Validation failed for trigger projects/{p}/locations/{r}/"
    "triggers/{f}-000000: Invalid resource state for \"\": Permission denied while using the Eventarc Service Agent. "
    "If you recently started to use Eventarc, it may take a few minutes before all necessary permissions are "
    "propagated to the Service Agent. Otherwise, verify that it has Eventarc Service Agent role."
).format(p=PROJECT, r=REGION, f=FUNCTION)
SOURCE_COPY_DENIED = (
    "ERROR: (gcloud.functions.deploy) OperationError: code=3, message=Build failed: failed to Fetch: failed to "
    f"download archive gs://gcf-v2-sources-424242424242-{REGION}/{FUNCTION}/function-source.zip: Access to bucket "
    f"gcf-v2-sources-424242424242-{REGION} denied. You must grant Storage Object Viewer permission to {BUILDER}."
)


def test_up_outlasts_permissions_that_have_not_propagated(recorder):
    """A fresh project's first up: grants used seconds after they are made fail the function's
    deploy and the image build for a while (terraform-provider-google #25294, #20571); up retries
    exactly those failures, with backoff, and succeeds."""
    recorder.env["COVALENT_GCPBATCH_DEPLOY_RETRY_BASE_S"] = "1"
    recorder.fail_next("functions deploy", 1, stderr=EVENTARC_AGENT_NOT_READY)
    recorder.fail_next("functions deploy", 1, stderr=SOURCE_COPY_DENIED)
    recorder.fail_next("builds submit", 1, stderr=(
        "ERROR: (gcloud.builds.submit) INVALID_ARGUMENT: could not resolve source: googleapi: Error 403: "
        f"{BUILDER} does not have storage.objects.get access to the Google Cloud Storage object. "
        "Permission 'storage.objects.get' denied on resource (or it may not exist)., forbidden"))
    recorder.fail_next("builds submit", 1, build_failure="FETCH_SOURCE_FAILED")
    result = check(recorder.deploy("up", *ARGS))
    calls = recorder.calls()
    assert len(find(calls, "builds", "submit")) == 3 and len(find(calls, "functions", "deploy")) == 3
    # A failed build is asked why it failed; the one refused at creation has no build to ask about.
    assert [c["argv"][:3] for c in find(calls, "builds", "describe")] == [["builds", "describe", "0000feed-0000-4000-8000-000000000000"]]
    # 1 s then 2 s for each (the base is 10 s unless a test lowers it).
    assert result.stdout.count("retrying in 1 s") == 2 and result.stdout.count("retrying in 2 s") == 2
    assert "necessary permissions are propagated" in result.stderr, "gcloud's own message is shown"
    assert recorder.config_section()["container_image_uri"] in [
        r["name"] for k, r in recorder.state["resources"].items() if k.startswith("artifacts docker images/")]
    assert f"functions/{FUNCTION}@{REGION}" in recorder.state["resources"]


@pytest.mark.parametrize("words, failure", [
    ("functions deploy", {"stderr": "ERROR: (gcloud.functions.deploy) ResponseError: status=[429], code=[Ok], message=["
                                    "Quota exceeded for quota metric 'Write requests' and limit 'Write requests per minute'"
                                    " of service 'cloudfunctions.googleapis.com']"}),
    ("builds submit", {"build_failure": "USER_BUILD_STEP"}),
])  # fmt: skip
def test_any_other_deploy_failure_fails_at_once(recorder, words, failure):
    """Only propagation is waited for: any other error ends up at once, with gcloud's message."""
    recorder.fail_next(words, 1, **failure)
    result = recorder.deploy("up", *ARGS)
    assert result.returncode != 0
    assert len(find(recorder.calls(), *words.split())) == 1, "not retried"
    assert "retrying" not in result.stdout
    assert failure.get("stderr", "USER_BUILD_STEP")[:40] in result.stderr or 'completed with status "FAILURE"' in result.stderr


def test_propagation_retries_are_bounded(recorder):
    """Permissions that never come: up gives up after 12 attempts (550 s of waiting at the default base)."""
    recorder.env["COVALENT_GCPBATCH_DEPLOY_RETRY_BASE_S"] = "0"
    recorder.fail_next("functions deploy", 100, stderr=EVENTARC_AGENT_NOT_READY)
    result = recorder.deploy("up", *ARGS)
    assert result.returncode != 0 and "still failing after 12 attempts" in result.stderr
    assert len(find(recorder.calls(), "functions", "deploy")) == 12


def test_image_builds_a_worker_image_with_the_users_packages(recorder, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("scikit-learn==1.5.2\nnumpy<3\n")
    refused = recorder.deploy("image", *ARGS, "--name", "ml", "--requirements", str(requirements))
    assert refused.returncode != 0 and "run ./deploy.sh up first" in refused.stderr

    check(recorder.deploy("up", *ARGS))
    start = len(recorder.calls())
    built = check(recorder.deploy("image", *ARGS, "--name", "ml", "--requirements", str(requirements)))
    changed = [c for c in recorder.calls()[start:] if verb_of(c) in MUTATING]
    assert [c["argv"][:2] for c in changed] == [["builds", "submit"]], "only the build: the function already allows it"
    (build,) = changed
    assert build["context"]["worker_image/extra-requirements.txt"] == requirements.read_text()
    assert flag_values(build, "--service-account") == [f"projects/{PROJECT}/serviceAccounts/{BUILDER}"]
    image = json.loads(build["files"]["--config"])["images"][0]
    assert image.startswith(f"{REGION}-docker.pkg.dev/{PROJECT}/{REPOSITORY}/worker-ml:py{PYTHON_VERSION}-covalent{COVALENT_VERSION}-")
    assert f'container_image_uri=\"{image}\"' in built.stdout
    deployed = next(c for c in reversed(recorder.calls()) if c["argv"][:2] == ["functions", "deploy"])
    allowed = [line for line in deployed["files"]["--env-vars-file"].splitlines() if line.startswith("GCPBATCH_ALLOWED_IMAGES")]
    assert DeploymentSettings(project_id=PROJECT, region=REGION, topic=TOPIC,
                              allowed_images=json.loads(allowed[0].partition(": ")[2]).split(",")).image_allowed(image)

    # The same requirements again: the image exists, nothing is built. Others: a new image.
    again = len(recorder.calls())
    check(recorder.deploy("image", *ARGS, "--name", "ml", "--requirements", str(requirements)))
    assert [c for c in recorder.calls()[again:] if verb_of(c) in MUTATING] == []
    requirements.write_text("scikit-learn==1.6.0\n")
    check(recorder.deploy("image", *ARGS, "--name", "ml", "--requirements", str(requirements)))
    rebuilt = [c for c in recorder.calls()[again:] if verb_of(c) in MUTATING]
    assert len(rebuilt) == 1 and json.loads(rebuilt[0]["files"]["--config"])["images"][0] != image


@pytest.mark.parametrize(
    "extra, message",
    [([], "--name"), (["--name", "ML"], "--name"), (["--name", "ml"], "--requirements"),
     (["--name", "ml", "--requirements", "/nonexistent/requirements.txt"], "is not a file")],
)
def test_image_refuses_bad_arguments_before_any_call(recorder, extra, message):
    result = recorder.deploy("image", *ARGS, *extra)
    assert result.returncode != 0 and message in result.stderr
    assert recorder.calls() == []


def test_down_leaves_a_config_that_points_elsewhere(recorder):
    recorder.config_dir.mkdir()
    conf = recorder.config_dir / "covalent.conf"
    conf.write_text('[executors.gcpbatch]\nbucket_name = "covalent-gcpbatch-local"\nproject_id = "local-project"\n')
    check(recorder.deploy("down", *ARGS, "--yes", "--only", "config"))
    assert recorder.config_section() == {"bucket_name": "covalent-gcpbatch-local", "project_id": "local-project"}


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Usage"),
        (["up", "--region", REGION], "no project"),
        (["up", "--project", "Bad_Project"], "not a project id"),
        (["up", "--project", PROJECT, "--prefix", "this-prefix-is-far-too-long"], "prefix"),
        (["up", "--project", PROJECT, "--only", "bucket,everything"], "unknown step 'everything'"),
        (["up", "--project", PROJECT, "--retention-days", "0"], "--retention-days"),
        (["sideways", "--project", PROJECT], "unknown command"),
    ],
)
def test_bad_arguments_are_refused_before_any_call(recorder, args, message):
    result = recorder.deploy(*args)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert recorder.calls() == []


def test_environment_fallbacks(recorder):
    recorder.env.update(GCPBATCH_PROJECT=PROJECT, GCPBATCH_REGION=REGION, GCPBATCH_PREFIX=PREFIX, GCPBATCH_PYTHON=sys.executable)
    check(recorder.deploy("up", "--only", "topic"))
    assert [c["argv"][:4] for c in recorder.calls() if verb_of(c) == "create"] == [
        ["pubsub", "topics", "create", TOPIC], ["pubsub", "topics", "create", WARM_TOPIC],
        ["pubsub", "subscriptions", "create", WARM_SUBSCRIPTION]]  # fmt: skip


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if ON_CI:
            pytest.fail("CI=true and shellcheck is not installed (.ci/run installs it)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, str(DEPLOY)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------------------------------------
# The real gcloud against the local stack's emulators
# ---------------------------------------------------------------------------------------------------


def _requests(stderr: str) -> list[tuple[str, str, str]]:
    """(method, uri, body) of each request in gcloud's --log-http output."""
    requests = []
    for block in stderr.split("==== request start ====")[1:]:
        head, _, rest = block.partition("== body start ==")
        body = rest.partition("== body end ==")[0].strip()
        fields = dict(line.split(": ", 1) for line in head.splitlines() if line.startswith(("uri: ", "method: ")))
        requests.append((fields.get("method", ""), fields.get("uri", ""), body))
    return requests


@pytest.mark.stack
def test_topic_and_bucket_steps_run_for_real_against_the_emulators(local_stack, tmp_path):
    """Pub/Sub (emulator) and Cloud Storage (fake-gcs-server) are the two services of the deployment
    that have an emulator; the real gcloud creates the topic and the bucket there."""
    from covalent_gcpbatch_plugin import clients

    gcloud = shutil.which("gcloud")
    if gcloud is None:
        if ON_CI:
            pytest.fail("CI=true and the gcloud CLI is not installed")
        pytest.skip("the gcloud CLI is not installed")
    project, prefix = local_stack.project_id, "covdeploy"
    bucket, staging, topic = f"{prefix}-{project}", f"{prefix}-build-{project}", f"{prefix}-jobs"
    task_bucket = f"{prefix}-tasks-{project}"
    (tmp_path / "gcloud-config").mkdir()
    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),
        "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
        "CLOUDSDK_CORE_PROJECT": project,
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB": f"http://{local_stack.pubsub_emulator_host}/",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": f"{local_stack.storage_emulator_host}/storage/v1/",
        # gcloud prints each request with its body: the check that it sent what deploy.sh meant.
        "CLOUDSDK_CORE_LOG_HTTP": "true",
        "COVALENT_CONFIG_DIR": str(tmp_path / "covalent"),
    }
    args = ["--project", project, "--region", local_stack.region, "--prefix", prefix, "--python", sys.executable]

    def deploy(*extra: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(DEPLOY), *extra, *args], env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=180)  # fmt: skip
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
        return result

    storage = clients.storage_client(project, local_stack.storage_emulator_host)
    publisher = clients.publisher_client(local_stack.pubsub_emulator_host)
    subscriber = clients.subscriber_client(local_stack.pubsub_emulator_host)
    topic_path = f"projects/{project}/topics/{topic}"
    warm_topic_path = f"projects/{project}/topics/{topic}-warm"
    warm_subscription_path = f"projects/{project}/subscriptions/{topic}-warm-offers"
    try:
        first = deploy("up", "--only", "bucket,topic")
        assert storage.lookup_bucket(bucket) is not None
        assert publisher.get_topic(topic=topic_path).name == topic_path
        sent = _requests(first.stderr)
        inserted = {json.loads(r[2])["name"]: json.loads(r[2]) for r in sent if r[0] == "POST" and "/storage/v1/b?" in r[1]}
        assert set(inserted) == {bucket, task_bucket, staging}, "the two buckets and Cloud Build's staging bucket"
        body = inserted[bucket]
        assert body["name"] == bucket and body["location"] == local_stack.region
        assert body["iamConfiguration"] == {"publicAccessPrevention": "enforced", "uniformBucketLevelAccess": {"enabled": True}}
        assert body["lifecycle"] == {"rule": [{"action": {"type": "Delete"}, "condition": {"age": 7, "matchesPrefix": [TASKS_PREFIX]}}]}
        assert [r[0] for r in sent if r[1].split("?")[0].endswith(f"/topics/{topic}")][-1] == "PUT", "the topic was created"
        # The warm VMs' offers: their topic and the one pull subscription they share.
        assert publisher.get_topic(topic=warm_topic_path).name == warm_topic_path
        offers = subscriber.get_subscription(subscription=warm_subscription_path)
        assert (offers.topic, offers.ack_deadline_seconds) == (warm_topic_path, 10)
        (created,) = [json.loads(r[2]) for r in sent if r[0] == "PUT" and "/subscriptions/" in r[1]]
        assert {k: created[k] for k in ("ackDeadlineSeconds", "messageRetentionDuration", "expirationPolicy")} == {
            "ackDeadlineSeconds": 10, "messageRetentionDuration": "600s", "expirationPolicy": {}}, \
            "an empty expiration policy: it never expires"

        # Second up: found, nothing created. (fake-gcs-server keeps neither the lifecycle nor the
        # iamConfiguration of a bucket, so deploy.sh re-applies them with a PATCH each time here.)
        second = deploy("up", "--only", "bucket,topic")
        resent = _requests(second.stderr)
        assert not [r for r in resent if r[0] == "POST" and "/storage/v1/b?" in r[1]]
        assert not [r for r in resent if r[0] == "PUT"]
        patches = [json.loads(r[2]) for r in resent if r[0] == "PATCH"]
        assert all(p["lifecycle"] == body["lifecycle"] for p in patches)

        # Down (topic only: fake-gcs-server cannot serve `gcloud storage rm -r`, see the report).
        deploy("down", "--yes", "--only", "topic")
        topics = [t.name for t in publisher.list_topics(project=f"projects/{project}")]
        assert topic_path not in topics and warm_topic_path not in topics
        assert warm_subscription_path not in [s.name for s in subscriber.list_subscriptions(project=f"projects/{project}")]
    finally:
        for name in (bucket, task_bucket, staging):
            with_bucket = storage.lookup_bucket(name)
            if with_bucket is not None:
                with_bucket.delete(force=True)
        for delete in (partial(subscriber.delete_subscription, subscription=warm_subscription_path),
                       partial(publisher.delete_topic, topic=warm_topic_path), partial(publisher.delete_topic, topic=topic_path)):
            try:
                delete()
            except Exception:  # noqa: BLE001 - already deleted by down
                pass


def test_deploy_writes_exactly_the_deployment_keys():
    """deploy.sh's pairs name the keys a deployment writes (to the Covalent config, or to the
    file `covalent deploy up` reads); settings.DEPLOYMENT_KEYS is
    what `down` removes and what `covalent-gcpbatch local up` writes."""
    import re

    from covalent_gcpbatch_plugin.settings import DEPLOYMENT_KEYS

    script = (REPO / "deploy.sh").read_text()
    pairs = script[script.index("local pairs=(") + len("local pairs=("):].split(")\n")[0]
    assert set(re.findall(r"([a-z_]+)=", pairs)) == set(DEPLOYMENT_KEYS)
    assert 'helper config-set "${pairs[@]}"' in script and 'helper conf-file "$COVALENT_CONF" "${pairs[@]}"' in script


def test_caps_are_declared_once():
    """deployment.CAP_FIELDS are deploy.sh's flags (usage and parser) and the caps table of docs/deploy.md."""
    script = (REPO / "deploy.sh").read_text()
    for name in CAP_FIELDS:
        assert f"  {cap_flag(name)}) " in script, f"deploy.sh does not parse {cap_flag(name)}"
        assert f"{cap_flag(name)} " in script.split("EOF")[1], f"deploy.sh --help does not list {cap_flag(name)}"
    assert caps_table() in (REPO / "docs" / "deploy.md").read_text(), \
        "docs/deploy.md's caps table differs from deployment.py: regenerate it"
