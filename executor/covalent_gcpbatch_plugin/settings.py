"""GCPBatchExecutor's settings: every key, its default, its check and its meaning, declared once.

``ExecutorPluginDefaults`` is the one declaration. Everything else is derived from it:

* the Covalent plugin defaults (``PLUGIN_DEFAULTS``, merged into ``[executors.gcpbatch]``);
* the executor's constructor signature and the "Parameters" part of its docstring;
* validation, with the key's name in the error (``validate``);
* the keys a deployment writes into the Covalent config (``DEPLOYMENT_KEYS``: deploy.sh and
  ``covalent-gcpbatch local up``) and the keys a task cannot run without (``REQUIRED_KEYS``);
* the README's configuration table (``settings_table``; a test keeps the README equal to it).

The Batch job options (machine type, GPUs, network...) are ``protocol.JobOptions``, the contract
the Cloud Function validates again: this model inherits them rather than restating them.
Covalent's ``covalent deploy`` reads the same model (pydantic v1 names ``.dict()``/``.schema()``,
which v2 still answers).

Adding a key: declare it here (with its description), then use it.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .packing import MAX_WAIT_S
from .protocol import MAX_PARALLELISM, JobOptions

#: json_schema_extra marks: a task cannot run without the key; a deployment writes the key.
REQUIRED = {"required_to_run": True, "deployment": True}
DEPLOYMENT = {"deployment": True}


class _TaskSettings(BaseModel):
    """Where the task runs, how big it is, and how the executor waits for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project_id: str = Field("", json_schema_extra=REQUIRED, description="Google Cloud project the Batch jobs run in.")
    region: str = Field(
        "us-east1", min_length=1, json_schema_extra=DEPLOYMENT,
        description="Region for the Batch jobs (must be the deployment's region).")
    bucket_name: str = Field(
        "", json_schema_extra=REQUIRED,
        description="Bucket for result, error and output objects, and for task objects unless `task_bucket_name` is set.")
    container_image_uri: str = Field(
        "", json_schema_extra=REQUIRED,
        description="Worker image (`worker_image/`); must be on the deployment's allowlist.")
    service_account_email: str = Field(
        "", json_schema_extra=DEPLOYMENT,
        description="Account the jobs run as. The deployment's account is always used; a different value here is "
                    "refused with an error.")
    vcpus: float = Field(
        2, gt=0, strict=True, description="vCPUs for the task (fractions allowed; capped by the deployment).")
    memory: int = Field(256, ge=1, strict=True, description="Memory in MiB for the task (capped by the deployment).")
    retries: int = Field(
        3, ge=0, le=10, strict=True,
        description="Times Batch re-runs a task after an infrastructure failure (preemption, VM loss). A task that "
                    "raises is never re-run. `0` disables retries. At most 10.")
    time_limit: int = Field(
        300, ge=1, strict=True,
        description="Seconds the task may run; Batch kills it after that (its max run duration). Time spent waiting "
                    "for a VM does not count.")
    poll_freq: float = Field(
        5, gt=0, strict=True,
        description="Seconds between `get_job` calls in `wait_mode = \"poll\"`. Kept for compatibility with the old "
                    "polling plugin; the default event-driven wait does not use it.")
    wait_mode: Literal["events", "poll"] = Field(
        "events",
        description="`events`: wait on Pub/Sub notifications (one streaming pull per process). `poll`: call `get_job` "
                    "every `poll_freq` seconds, for deployments without Pub/Sub, and the baseline the benchmarks "
                    "compare against.")
    cache_dir: str = Field(
        "",
        description="Local directory for the task and result pickles while they are in transit; emptied after each "
                    "task. Empty: per user, `$XDG_CACHE_HOME/covalent-gcpbatch/tasks` (else "
                    "`~/.cache/covalent-gcpbatch/tasks`) of the user the Covalent server runs as, created `0700`. A "
                    "directory that is a symbolic link, another user's, or writable by its group or others is refused "
                    "(the task fails, saying so).")
    pubsub_topic: str = Field(
        "covalent-gcpbatch-jobs", json_schema_extra=DEPLOYMENT,
        description="Topic id the jobs' state changes (and the function's rejections) are published to.")
    submit_timeout: float = Field(
        120, ge=1, strict=True,
        description="Seconds from upload until the job must exist; then one `get_job` settles it, or the task fails.")
    queue_timeout: float = Field(
        3600, ge=1, strict=True,
        description="Seconds a job may wait for a VM (QUEUED/SCHEDULED); then it is cancelled and the task fails.")
    reconcile_interval: float = Field(
        300, ge=0.1, strict=True,
        description="Seconds of silence after which one `get_job` checks a job (a notification may have been lost); "
                    "doubles each time.")
    pack_window: float = Field(
        0.5, ge=0, le=10, strict=True,
        description="Packing: electrons whose job specs are equal (but for the node) and whose `run()` calls come "
                    "while a fan-out is being handed over run as ONE Batch job, one task each (one admission, VMs reused "
                    "task after task). A lone electron waits this many seconds for company, no longer; once a second "
                    "came, the pack follows the hand-over's pace (README \"Packing\") and closes "
                    f"{MAX_WAIT_S:g} s after its first electron at the latest. `0` turns packing off.")
    pack_parallelism: int = Field(
        0, ge=0, le=MAX_PARALLELISM, strict=True,
        description="Tasks of one pack running at once, one VM each (Batch's `parallelism`); `0` runs them all at once. "
                    "Lower means fewer VM boots and VM-seconds, but the pack's electrons queue for its VMs.")
    keep_artifacts: bool = Field(
        False, strict=True,
        description="Keep the task's objects in the bucket after the result is read (for debugging).")


class ExecutorPluginDefaults(JobOptions, _TaskSettings):
    """Every GCPBatchExecutor setting (fields in README order: the task's, the job options', the
    emulator endpoints')."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_bucket_name: str = Field(
        "", json_schema_extra=DEPLOYMENT,
        description="Bucket the task objects are uploaded to: the function's trigger bucket, holding nothing else, so "
                    "that results and logs do not fire the function (`deploy.sh` creates it). Empty: `bucket_name`.")
    pubsub_emulator_host: str = Field(
        "", json_schema_extra=DEPLOYMENT, description="`host:port` of a Pub/Sub emulator (local stack only).")
    storage_emulator_host: str = Field(
        "", json_schema_extra=DEPLOYMENT, description="URL of a GCS emulator (local stack only).")
    batch_api_endpoint: str = Field(
        "", json_schema_extra=DEPLOYMENT, description="URL of a Batch API endpoint (the local Batch service).")


FIELDS = ExecutorPluginDefaults.model_fields
#: Every key, in declaration order.
SETTING_KEYS: tuple[str, ...] = tuple(FIELDS)
REQUIRED_KEYS = tuple(k for k, f in FIELDS.items() if (f.json_schema_extra or {}).get("required_to_run"))
DEPLOYMENT_KEYS = tuple(k for k, f in FIELDS.items() if (f.json_schema_extra or {}).get("deployment"))
#: Executor keys that are Batch job options (protocol.JobOptions fields of the same names).
JOB_OPTION_KEYS = tuple(JobOptions.model_fields)
#: The defaults as Covalent's config holds them (TOML: lists, not tuples).
PLUGIN_DEFAULTS: dict[str, Any] = ExecutorPluginDefaults().model_dump(mode="json")


def validate(values: dict[str, Any]) -> ExecutorPluginDefaults:
    """The settings, checked; ConfigError names every offending key and what is accepted."""
    try:
        return ExecutorPluginDefaults(**values)
    except ValidationError as err:
        problems = "; ".join(_problem(e) for e in err.errors())
        raise ConfigError(f"invalid GCPBatchExecutor setting: {problems}") from None


def _problem(error: dict) -> str:
    if not error["loc"]:  # a rule across keys (accelerator_type with accelerator_count)
        return error["msg"]
    return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']} (got {error['input']!r})"


def job_options(values: dict[str, Any]) -> JobOptions:
    """The job options among ``values`` (an executor's attributes)."""
    return JobOptions(**{key: values[key] for key in JOB_OPTION_KEYS})


def check_required(values: dict[str, Any]) -> None:
    missing = [key for key in REQUIRED_KEYS if not values.get(key)]
    if missing:
        raise ConfigError(
            f"GCPBatchExecutor needs {', '.join(missing)}: pass them to GCPBatchExecutor(...) or set them in the "
            "[executors.gcpbatch] section of the Covalent config (deploy.sh or `covalent-gcpbatch local up` writes it)"
        )


def constructor_signature() -> inspect.Signature:
    """``GCPBatchExecutor(self, <every key>=None, ..., **kwargs)``: None means "from the config"."""
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [
        inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Optional[FIELDS[key].annotation])
        for key in SETTING_KEYS
    ]
    parameters.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(parameters)


def _default_text(key: str) -> str:
    if (FIELDS[key].json_schema_extra or {}).get("required_to_run"):
        return "(required)"
    value = PLUGIN_DEFAULTS[key]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '""' if value == "" else value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "[]" if value == [] else "{}" if value == {} else str(value)


def parameters_doc(indent: str = "    ") -> str:
    """The "Parameters" section of the executor's docstring, from the model."""
    lines = ["Parameters (each also settable in [executors.gcpbatch]; None means \"from the config\"):"]
    for key in SETTING_KEYS:
        lines.append(f"{indent}{key}: {FIELDS[key].description} Default: {_default_text(key)}.")
    return "\n".join(lines)


def settings_table() -> str:
    """The README's configuration table."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{_default_text(key)}` | {FIELDS[key].description} |".replace("`(required)`", "(required)")
             for key in SETTING_KEYS]
    return "\n".join(rows)


if __name__ == "__main__":  # python -m covalent_gcpbatch_plugin.settings > the README's table
    print(settings_table())
