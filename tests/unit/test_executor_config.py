"""GCPBatchExecutor construction: the seed's configuration table, precedence and validation."""

import inspect
import json
from pathlib import Path

import pytest
from covalent._shared_files.config import get_config, set_config

from covalent_gcpbatch_plugin import gcpbatch, settings, waiting
from covalent_gcpbatch_plugin.gcpbatch import ConfigError, GCPBatchExecutor

SEED_DEFAULTS = {
    "region": "us-east1",
    "vcpus": 2,
    "memory": 256,
    "retries": 3,
    "time_limit": 300,
    "poll_freq": 5,
    # Not the seed's cache_dir ("/tmp/covalent", shared by every user): a per-user directory
    # (tests/unit/test_local_files.py).
}


@pytest.fixture
def section():
    """The [executors.gcpbatch] section of the (isolated) Covalent config, restored afterwards."""
    try:
        saved = dict(get_config("executors.gcpbatch"))
    except KeyError:
        saved = None
    yield lambda **values: set_config({f"executors.gcpbatch.{k}": v for k, v in values.items()})
    if saved is not None:
        set_config({f"executors.gcpbatch.{k}": v for k, v in saved.items()})


def test_readme_table_is_the_settings_model():
    """One declaration (settings.ExecutorPluginDefaults): the README's table is generated from it
    (`python -m covalent_gcpbatch_plugin.settings`)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = settings.settings_table()
    assert table in readme, "README's configuration table differs from settings.py: regenerate it"
    assert readme.count("| key | default | meaning |") == 1


def test_constructor_defaults_and_docstring_follow_the_model():
    parameters = inspect.signature(GCPBatchExecutor).parameters
    assert [name for name in parameters if name != "kwargs"] == list(settings.POSITIONAL_KEYS + settings.KEYWORD_ONLY_KEYS)
    assert set(settings.POSITIONAL_KEYS + settings.KEYWORD_ONLY_KEYS) == set(settings.SETTING_KEYS)
    assert all(parameters[key].default is None for key in settings.SETTING_KEYS)
    shape = [(p.name, p.kind, p.default) for p in inspect.signature(GCPBatchExecutor.__init__).parameters.values()]
    assert shape == [(p.name, p.kind, p.default) for p in settings.constructor_signature().parameters.values()]
    assert gcpbatch._EXECUTOR_PLUGIN_DEFAULTS == settings.ExecutorPluginDefaults().model_dump(mode="json")
    assert set(gcpbatch._EXECUTOR_PLUGIN_DEFAULTS) == set(settings.SETTING_KEYS)
    for key in settings.SETTING_KEYS:
        assert f"    {key}: {settings.FIELDS[key].description}" in GCPBatchExecutor.__doc__
    assert settings.REQUIRED_KEYS == ("project_id", "bucket_name", "container_image_uri")


def test_the_constructor_declares_every_key_for_type_checkers():
    """IDEs and type checkers read gcpbatch.py's source, not the runtime signature: its header is
    the generated one (regenerate: python -m covalent_gcpbatch_plugin.settings constructor)."""
    source = Path(gcpbatch.__file__).read_text()
    assert settings.constructor_source() in source, "gcpbatch.py's constructor differs from settings.py: regenerate it"
    assert "__signature__" not in source, "the signature is the source's own"


def test_positional_settings_keep_0_15s_order():
    """0.15 code passing settings positionally means the same here (0.15.0's __init__ order)."""
    executor = GCPBatchExecutor("my-bucket", "my-image", "sa@p.iam.gserviceaccount.com", "my-project", "europe-west4",
                                4, 1024, 600, 3, 1, "")
    assert (executor.bucket_name, executor.container_image_uri, executor.service_account_email, executor.project_id,
            executor.region, executor.vcpus, executor.memory, executor.time_limit, executor.poll_freq,
            executor.retries) == ("my-bucket", "my-image", "sa@p.iam.gserviceaccount.com", "my-project",
                                  "europe-west4", 4, 1024, 600, 3, 1)
    with pytest.raises(TypeError, match="multiple values for argument 'bucket_name'"):
        GCPBatchExecutor("b", bucket_name="q")
    with pytest.raises(TypeError, match="positional"):  # newer keys are keyword-only
        GCPBatchExecutor("b", "i", "s", "p", "r", 2, 256, 300, 5, 3, "", "events")


def test_plugin_registration_names():
    assert gcpbatch.EXECUTOR_PLUGIN_NAME == "GCPBatchExecutor"
    assert {**gcpbatch._EXECUTOR_PLUGIN_DEFAULTS, **SEED_DEFAULTS} == gcpbatch._EXECUTOR_PLUGIN_DEFAULTS
    for key in ("project_id", "bucket_name", "container_image_uri", "service_account_email"):
        assert key in gcpbatch._EXECUTOR_PLUGIN_DEFAULTS


def test_seed_defaults_apply_with_an_empty_config(section):
    section(**{key: gcpbatch._EXECUTOR_PLUGIN_DEFAULTS[key] for key in SEED_DEFAULTS})
    executor = GCPBatchExecutor()
    for key, value in SEED_DEFAULTS.items():
        assert getattr(executor, key) == value


def test_constructor_beats_config_and_explicit_zero_or_false_is_kept(section):
    section(retries=5, keep_artifacts=True, project_id="from-config", vcpus=4)
    executor = GCPBatchExecutor(retries=0, keep_artifacts=False, vcpus=1)
    assert executor.retries == 0
    assert executor.keep_artifacts is False
    assert executor.vcpus == 1
    assert executor.project_id == "from-config"


def test_attributes_survive_covalents_json_round_trip():
    executor = GCPBatchExecutor(project_id="p", bucket_name="b", container_image_uri="i")
    attributes = json.loads(json.dumps(executor.to_dict()))
    rebuilt = GCPBatchExecutor().from_dict(attributes)
    assert rebuilt.__dict__ == executor.__dict__


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"vcpus": 0}, "vcpus"),
        ({"memory": -1}, "memory"),
        ({"memory": "lots"}, "memory: Input should be a valid integer (got 'lots')"),
        ({"retries": 11}, "retries: Input should be less than or equal to 10 (got 11)"),
        ({"time_limit": 0}, "time_limit"),
        ({"queue_timeout": 0}, "queue_timeout"),
        ({"keep_artifacts": "yes"}, "keep_artifacts"),
        ({"wait_mode": "sometimes"}, "wait_mode: Input should be 'events' or 'poll'"),
        ({"retries": True}, "retries"),
        ({"memory_retry_factor": 1}, "memory_retry_factor: Value error, must be more than 1"),
        ({"memory_retry_factor": 9}, "memory_retry_factor"),
        ({"spot_fallback": -1}, "spot_fallback"),
        ({"spot_wait_s": -5}, "spot_wait_s"),
    ],
)
def test_invalid_settings_fail_at_construction_naming_the_key(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        GCPBatchExecutor(**kwargs)
    assert fragment in str(info.value)


def test_missing_required_settings_are_named_when_a_task_runs(section):
    section(project_id="", bucket_name="", container_image_uri="")
    executor = GCPBatchExecutor()
    with pytest.raises(ConfigError) as info:
        executor._check_required()
    assert "project_id, bucket_name, container_image_uri" in str(info.value)
    assert "[executors.gcpbatch]" in str(info.value)


def test_wait_plan_bounds_every_phase():
    plan = GCPBatchExecutor(time_limit=60, queue_timeout=30, submit_timeout=10, reconcile_interval=5)._wait_plan()
    assert plan.phase_bound(None) == 10
    assert plan.phase_bound(gcpbatch.JobState.QUEUED) == 30
    assert plan.phase_bound(gcpbatch.JobState.SCHEDULED) == 30
    assert plan.phase_bound(gcpbatch.JobState.RUNNING) == (3 + 1) * (60 + waiting.RUN_GRACE_S), "retries=3 by default"


@pytest.mark.parametrize("retries", [0, 1, 3, 10])
def test_running_bound_leaves_every_retry_its_time_limit(retries):
    """Batch re-runs a preempted task inside the job's RUNNING state without a job-level message:
    a task preempted at 250 s of 300 s that then runs in full must not hit the bound."""
    plan = GCPBatchExecutor(time_limit=300, retries=retries)._wait_plan()
    worst_legitimate_run = (retries + 1) * 300
    assert plan.phase_bound(gcpbatch.JobState.RUNNING) >= worst_legitimate_run + waiting.RUN_GRACE_S


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"provisioning": "cheap"}, "provisioning"),
        ({"accelerator_count": 2}, "accelerator_type and accelerator_count go together"),
        ({"labels": {"Owner": "me"}}, "label 'Owner'"),
        ({"labels": {"goog-billing": "x"}}, "label 'goog-billing' is reserved"),
        ({"labels": {"google-team": "x"}}, "label 'google-team' is reserved"),
        ({"allowed_locations": ["us-east1"]}, "regions/us-east1"),
        ({"boot_disk_size_gb": -5}, "boot_disk_size_gb"),
        ({"machine_type": "N1 Standard"}, "machine_type"),
        ({"no_external_ip": True}, "no_external_ip needs network and subnetwork"),
    ],
)
def test_invalid_job_options_fail_at_construction(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        GCPBatchExecutor(**kwargs)
    assert fragment in str(info.value)


def test_job_options_travel_in_the_spec():
    executor = GCPBatchExecutor(project_id="p", bucket_name="b", container_image_uri="i", provisioning="spot", labels={"team": "ml"})
    spec = executor._job_spec("d1", 0, {"python": "3.11.7", "covalent": "0.240.0"})
    assert spec.options.provisioning == "SPOT" and spec.options.labels == {"team": "ml"}
    assert spec.python_version == "3.11"


def test_a_result_that_could_not_be_stored_is_explained():
    """The worker exits EXIT_UPLOAD_FAILED when it cannot write the outcome: the node's message
    says so (the job's status event, as the local Batch service and Batch write it)."""
    from google.cloud import batch_v1

    from covalent_gcpbatch_plugin import protocol

    job = batch_v1.Job(status=batch_v1.JobStatus(status_events=[batch_v1.StatusEvent(
        description="Task state is updated from RUNNING to FAILED on host with exit code 12.",
        task_execution=batch_v1.TaskExecution(exit_code=protocol.EXIT_UPLOAD_FAILED))]))
    text = waiting.explain_job_failure("cov-x-0-abcd", gcpbatch.JobState.FAILED, job)
    assert "exit code 12: the task ran, but its result could not be stored in the bucket" in text


# -- Coming from 0.15 ------------------------------------------------------------------------------

#: [executors.gcpbatch] as 0.15.0 left it: its defaults (merged by Covalent), the user's values, and
#: what its `covalent deploy` wrote.
SECTION_015 = {**settings.V015_DEFAULTS, "project_id": "my-project", "bucket_name": "my-bucket",
               "container_image_uri": "us-docker.pkg.dev/my-project/covalent/executor:0.15",
               "service_account_email": "sa@my-project.iam.gserviceaccount.com",
               # As 0.15 left it: none of this version's keys (the session's local stack, if up,
               # has written them into the isolated config).
               **{key: "" for key in settings.KEYS_ONLY_THIS_VERSION_WRITES}}


def test_a_0_15_config_is_told_exactly_what_to_change():
    advice = {item.key: item for item in settings.migration_advice({**SECTION_015, "key_path": "/k.json"})}
    assert list(advice) == ["region", "container_image_uri", "cache_dir", "memory", "poll_freq", "key_path"]
    assert [key for key, item in advice.items() if item.must] == ["region", "container_image_uri"]
    assert 'region = "us-east1"' in advice["region"].text
    assert settings.DEPLOY_COMMAND in advice["container_image_uri"].text
    for needed in ("Cloud Function", "trigger", "topic", "worker image"):
        assert needed in advice["container_image_uri"].text
    assert 'cache_dir = ""' in advice["cache_dir"].text
    assert "256" in advice["memory"].text and 'wait_mode = "poll"' in advice["poll_freq"].text


@pytest.mark.parametrize("section", [
    settings.PLUGIN_DEFAULTS,  # a fresh install: Covalent merged this version's defaults
    {**SECTION_015, "region": "us-east1", "task_bucket_name": "p-tasks"},  # deployed by this version since
    {**settings.PLUGIN_DEFAULTS, "pubsub_emulator_host": "127.0.0.1:8085", "cache_dir": "/tmp/covalent"},  # local up
])
def test_other_configs_get_no_advice(section):
    assert settings.migration_advice(section) == []


def test_a_0_15_config_fails_at_construction_with_the_changes(section):
    """Covalent builds the executor from the section (cls(**config)): 0.15's region = "" is refused,
    and the error says what else must change, with the command."""
    section(**SECTION_015)
    with pytest.raises(ConfigError) as info:
        GCPBatchExecutor()
    message = str(info.value)
    assert "region: String should have at least 1 character (got '')" in message
    assert "written for covalent-gcpbatch-plugin 0.15" in message and settings.DEPLOY_COMMAND in message
    assert "python -m covalent_gcpbatch_plugin.settings check" in message


def test_a_0_15_deployment_warns_and_its_task_fails_at_once_saying_why(section):
    """0.15's `covalent deploy` wrote a region: the executor builds, warns, and a task fails before
    its upload (not after submit_timeout, waiting for a job no function creates)."""
    section(**{**SECTION_015, "region": "us-east1"})
    with pytest.warns(settings.Migration015Warning, match="check cache_dir"):
        executor = GCPBatchExecutor()
    with pytest.raises(ConfigError, match="must change container_image_uri: .*covalent deploy up gcpbatch"):
        executor._check_required()


def test_the_check_command_reads_the_covalent_config(section, capsys):
    section(**SECTION_015)
    assert settings.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "must change region" in out and "check memory" in out
    section(**{**SECTION_015, "region": "us-east1", "cache_dir": "", "task_bucket_name": "p-tasks"})
    assert settings.main(["check"]) == 0
    assert "nothing to change" in capsys.readouterr().out


def test_capacity_settings_are_checked_at_construction():
    """Rules across a job option and a task setting (image streaming and the image's region,
    flex-start and time_limit) are the executor's too, not only the function's."""
    with pytest.raises(ConfigError, match="image_streaming needs the image in the job's region"):
        settings.validate({"image_streaming": True, "container_image_uri": "asia-east1-docker.pkg.dev/p/r/worker:1"})
    with pytest.raises(ConfigError, match="at most 7 days"):
        settings.validate({"provisioning": "FLEX_START", "machine_type": "g2-standard-4", "time_limit": 8 * 24 * 3600})
    with pytest.raises(ConfigError, match="not a multiple of 375"):
        settings.validate({"machine_type": "n2-standard-8", "scratch_disk_gb": 500, "scratch_disk_type": "local-ssd"})
    checked = settings.validate({"provisioning": "flex_start", "machine_type": "g2-standard-4", "reservation": "none"})
    assert checked.provisioning == "FLEX_START"
