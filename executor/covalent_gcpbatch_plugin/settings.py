"""GCPBatchExecutor's settings: every key, its default, its check and its meaning, declared once.

``ExecutorPluginDefaults`` is the one declaration. Everything else is derived from it:

* the Covalent plugin defaults (``PLUGIN_DEFAULTS``, merged into ``[executors.gcpbatch]``);
* the executor's constructor signature (``constructor_source``: written out in gcpbatch.py, so that
  IDEs and type checkers see every key; a test keeps it equal) and the "Parameters" part of its docstring;
* validation, with the key's name in the error (``validate``), and what a configuration written for
  covalent-gcpbatch-plugin 0.15 must change (``migration_advice``, ``python -m
  covalent_gcpbatch_plugin.settings check``);
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
import sys
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .packing import MAX_WAIT_S
from .protocol import MAX_PARALLELISM, JobOptions, job_problem

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
    spot_fallback: int = Field(
        0, ge=0, le=10, strict=True,
        description="With `provisioning = \"SPOT\"`: after this many preemptions of one attempt, or after "
                    "`spot_wait_s` without a Spot VM, the electron's next attempt runs as a new STANDARD job (its "
                    "own job id, logs and cost; each attempt spends `retries`). `0`: off, Batch retries preemptions "
                    "on Spot VMs only.")
    spot_wait_s: float = Field(
        0, ge=0, strict=True,
        description="With `spot_fallback`: seconds a Spot attempt may wait for a VM before the next attempt runs on "
                    "a standard VM. `0`: `queue_timeout`.")
    memory_retry_factor: float = Field(
        0, ge=0, le=8, strict=True,
        description="An attempt that ends out of memory (exit code 137, or the task's own `MemoryError`) is run "
                    "again with `memory` times this factor, e.g. `2`, up to the deployment's memory cap (each attempt "
                    "spends `retries`; the node's log says so). `0`: off, an out-of-memory end fails the electron.")
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
                    "came, the pack follows the hand-over's pace (docs/design.md \"Packing\") and closes "
                    f"{MAX_WAIT_S:g} s after its first electron at the latest. `0` turns packing off.")
    pack_parallelism: int = Field(
        0, ge=0, le=MAX_PARALLELISM, strict=True,
        description="Tasks of one pack running at once, one VM each (Batch's `parallelism`); `0` runs them all at once. "
                    "Lower means fewer VM boots and VM-seconds, but the pack's electrons queue for its VMs.")
    keep_artifacts: bool = Field(
        False, strict=True,
        description="Keep all of the task's objects in the bucket after the result is read (for debugging). Its "
                    "result or error record is kept either way, until the bucket's lifecycle rule removes it.")


    @field_validator("memory_retry_factor")
    @classmethod
    def _a_growth(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("must be more than 1 (each retry asks for more memory), or 0 to turn memory retries off")
        return value

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

    def model_post_init(self, context: object) -> None:
        super().model_post_init(context)  # JobOptions' own rules
        # The rules between job options and the task's image, region and time limit, as the function checks them.
        problem = job_problem(self, image_uri=self.container_image_uri, region=self.region, time_limit_s=self.time_limit)
        if problem:
            raise ValueError(problem)


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
    """The settings, checked; ConfigError names every offending key and what is accepted, and, for a
    configuration written for 0.15, what to change. Advice that is not an error is a warning."""
    advice = migration_advice(values)
    try:
        checked = ExecutorPluginDefaults(**values)
    except ValidationError as err:
        problems = "; ".join(_problem(e) for e in err.errors())
        raise ConfigError(f"invalid GCPBatchExecutor setting: {problems}{_advice_suffix(advice)}") from None
    if advice:
        warnings.warn(Migration015Warning(advice_text(advice)), stacklevel=3)
    return checked


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
    # A task of a 0.15 deployment would wait submit_timeout for a job nobody creates: say so now.
    musts = [item for item in migration_advice(values) if item.must]
    if musts:
        raise ConfigError(f"GCPBatchExecutor cannot run this task{_advice_suffix(musts)}")


# -- The constructor -------------------------------------------------------------------------------

#: The settings that may be passed positionally: covalent-gcpbatch-plugin 0.15.0's constructor
#: order (AgnostiqHQ/covalent-gcpbatch-plugin, v0.15.0, gcpbatch.py), so that 0.15 code passing them
#: positionally keeps its meaning. Every other key is keyword-only.
POSITIONAL_KEYS: tuple[str, ...] = (
    "bucket_name", "container_image_uri", "service_account_email", "project_id", "region", "vcpus", "memory",
    "time_limit", "poll_freq", "retries", "cache_dir",
)
KEYWORD_ONLY_KEYS: tuple[str, ...] = tuple(key for key in SETTING_KEYS if key not in POSITIONAL_KEYS)


def _annotation_text(key: str) -> str:
    """The parameter's type as a type checker should see it (what the check accepts, or None)."""
    annotation = FIELDS[key].annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        text = f"Literal[{', '.join(repr(a).replace(chr(39), chr(34)) for a in args)}]"
    elif origin is tuple:  # allowed_locations: a TOML list or a tuple
        text = f"list[{args[0].__name__}] | tuple[{args[0].__name__}, ...]"
    elif origin is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        # gcs_volumes: each value its model's shorthand (a string) or its fields as a dict
        text = f"dict[{args[0].__name__}, str | dict[str, Any]]"
    elif origin is dict:
        text = f"dict[{args[0].__name__}, {args[1].__name__}]"
    else:
        text = annotation.__name__
    return f"{text} | None"


def constructor_source(indent: str = "    ") -> str:
    """``GCPBatchExecutor.__init__``'s header as gcpbatch.py spells it (a test keeps them equal):
    0.15's positional keys, then every other key keyword-only, each ``None`` ("from the config")."""
    lines = [f"{indent}def __init__(", f"{indent * 2}self,"]
    lines += [f"{indent * 2}{key}: {_annotation_text(key)} = None," for key in POSITIONAL_KEYS]
    lines.append(f"{indent * 2}*,")
    lines += [f"{indent * 2}{key}: {_annotation_text(key)} = None," for key in KEYWORD_ONLY_KEYS]
    lines += [f"{indent * 2}**kwargs: Any,", f"{indent}) -> None:"]
    return "\n".join(lines)


def constructor_signature() -> inspect.Signature:
    """What ``inspect.signature(GCPBatchExecutor)`` shows (annotations aside)."""
    kinds = {inspect.Parameter.POSITIONAL_OR_KEYWORD: POSITIONAL_KEYS, inspect.Parameter.KEYWORD_ONLY: KEYWORD_ONLY_KEYS}
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(key, kind, default=None) for kind, keys in kinds.items() for key in keys]
    parameters.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(parameters)


# -- Coming from 0.15 ------------------------------------------------------------------------------

#: What covalent-gcpbatch-plugin 0.15.0 declared as its defaults (its ExecutorPluginDefaults), which
#: Covalent wrote into [executors.gcpbatch] when 0.15 was installed; they stay there after an upgrade.
V015_DEFAULTS: dict[str, Any] = {
    "bucket_name": "", "container_image_uri": "", "service_account_email": "", "project_id": "", "region": "",
    "vcpus": 2, "memory": 512, "time_limit": 300, "poll_freq": 5, "retries": 3, "cache_dir": "/tmp/covalent",
}
#: Keys of 0.15's `covalent deploy` output that this version does not read (passed on, ignored).
V015_ONLY_KEYS = ("key_path", "covalent_package_version")
#: The one command that creates what the event-driven design needs (and rewrites the section).
DEPLOY_COMMAND = "covalent deploy up gcpbatch --project_id=<your project> --region=<region>"


#: Keys that only this version's deployments (deploy.sh, `covalent-gcpbatch local up`) write.
KEYS_ONLY_THIS_VERSION_WRITES = ("task_bucket_name", "pubsub_emulator_host", "storage_emulator_host", "batch_api_endpoint")


class Migration015Warning(UserWarning):
    """The configuration still holds 0.15 values that this version reads differently."""


@dataclass(frozen=True)
class Advice:
    """One change a 0.15 configuration needs: ``must`` if the executor refuses it (or cannot run)."""

    key: str
    must: bool
    text: str


def written_by_015(section: Mapping[str, Any]) -> bool:
    """0.15 wrote this section: values only 0.15 writes (its region and cache_dir defaults, its
    deploy keys), and nothing this version's deployments write (``task_bucket_name``, emulators)."""
    ours = any(section.get(key) for key in KEYS_ONLY_THIS_VERSION_WRITES)
    theirs = (section.get("region") == V015_DEFAULTS["region"] or section.get("cache_dir") == V015_DEFAULTS["cache_dir"]
              or any(key in section for key in V015_ONLY_KEYS))
    return theirs and not ours


def migration_advice(section: Mapping[str, Any]) -> list[Advice]:
    """What a configuration written for 0.15 (``section``: the [executors.gcpbatch] values, or the
    executor's) must or should change, each with the exact line to write; empty for any other."""
    if not written_by_015(section):
        return []
    advice = []
    if section.get("region") == "":
        advice.append(Advice("region", True, 'region = "" (0.15\'s default) is refused: set your deployment\'s region, '
                                             'e.g. region = "us-east1" (`covalent deploy up gcpbatch` writes it)'))
    advice.append(Advice(
        "container_image_uri", True,
        "0.15's deployment lacks what this version needs: the Cloud Function that creates the Batch jobs, its storage "
        "trigger (with a task bucket of its own), the Pub/Sub topic the jobs report to, and a worker image built for "
        f"this version (0.15's image cannot run its tasks). Create them with `{DEPLOY_COMMAND}`, which rewrites "
        "[executors.gcpbatch] (project_id, region, bucket_name, task_bucket_name, container_image_uri, "
        "service_account_email, pubsub_topic), then `covalent restart`"))
    if section.get("cache_dir") == V015_DEFAULTS["cache_dir"]:
        advice.append(Advice("cache_dir", False,
                             'cache_dir = "/tmp/covalent" (0.15\'s default) is shared by every user of the machine; '
                             'write cache_dir = "" for a private per-user directory (one that is not private to you is '
                             "refused when a task runs)"))
    if section.get("memory") == V015_DEFAULTS["memory"]:
        advice.append(Advice("memory", False,
                             f"memory = 512 is 0.15's default (its documentation said 256); this version's default is "
                             f"{PLUGIN_DEFAULTS['memory']} MiB: keep 512 if your tasks need it, or delete the line"))
    if section.get("poll_freq") is not None and section.get("wait_mode", "events") == "events":
        advice.append(Advice("poll_freq", False,
                             'poll_freq is not used by the default event-driven wait (wait_mode = "events"); it applies '
                             'only with wait_mode = "poll". Delete it, or keep it for polling'))
    for key in V015_ONLY_KEYS:
        if key in section:
            advice.append(Advice(key, False, f"{key} is a 0.15 key this version ignores: delete it"))
    return advice


def advice_text(advice: list[Advice]) -> str:
    lines = ["[executors.gcpbatch] was written for covalent-gcpbatch-plugin 0.15 (docs/migrating.md):"]
    lines += [f"- {'must change' if item.must else 'check'} {item.key}: {item.text}" for item in advice]
    return "\n".join(lines)


def _advice_suffix(advice: list[Advice]) -> str:
    musts = [item for item in advice if item.must]
    if not musts:
        return ""
    return (f". {advice_text(musts)}\n(`python -m covalent_gcpbatch_plugin.settings check` lists every change, "
            "the optional ones too)")


def check_config(section: Mapping[str, Any] | None = None) -> list[Advice]:
    """The advice for the Covalent config's [executors.gcpbatch] section (or ``section``)."""
    if section is None:
        from covalent._shared_files.config import get_config

        try:
            section = get_config("executors.gcpbatch")
        except KeyError:
            section = {}
    return migration_advice(section)


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


def main(argv: list[str]) -> int:
    """``python -m covalent_gcpbatch_plugin.settings [table|constructor|check]``: the README's table
    (default), gcpbatch.py's constructor header, or the 0.15 check of the Covalent config (exit 1
    when something must change)."""
    command = argv[0] if argv else "table"
    if command == "table":
        print(settings_table())
    elif command == "constructor":
        print(constructor_source())
    elif command == "check":
        advice = check_config()
        print(advice_text(advice) if advice else "[executors.gcpbatch]: nothing to change for this version")
        return 1 if any(item.must for item in advice) else 0
    else:
        print(main.__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m covalent_gcpbatch_plugin.settings > the README's table
    sys.exit(main(sys.argv[1:]))
