"""The contract between the hops: executor -> GCS -> function -> Batch -> worker -> Pub/Sub.

Everything two hops must agree on lives here and nowhere else:

* the GCS object layout of one task (task, result, error record, stdout, stderr under one prefix);
* the job spec the executor attaches to the task object as custom metadata;
* the deterministic Batch job id;
* the environment the function hands the worker;
* parsing of the Pub/Sub messages Batch publishes (and the function's rejections).

This module is imported by the Cloud Function too (``functions/`` holds a symlink to it), so it
depends on nothing but the standard library, pydantic and errors.py.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SpecError

PROTOCOL_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Object layout
# ---------------------------------------------------------------------------------------------

#: Every object this plugin writes lives under this prefix; the function ignores the rest.
TASKS_PREFIX = "covalent-gcpbatch/"
TASK_OBJECT = "task.pkl"
RESULT_OBJECT = "result.pkl"
ERROR_OBJECT = "error.json"
STDOUT_OBJECT = "stdout.log"
STDERR_OBJECT = "stderr.log"
#: Written by the executor when a task is cancelled: the function must not create (or must cancel) its job.
#: Never deleted by the executor (the bucket's lifecycle rule removes it): the function may still
#: be retrying its create, or Eventarc may redeliver the finalize event, after the task has ended.
CANCEL_OBJECT = "cancelled"
#: Written by the function when it creates no job for a task (refused, or cancelled first): a
#: ``NotCreated`` record, so an executor that polls (no Pub/Sub) learns it too.
NOT_CREATED_OBJECT = "not-created.json"

#: The object metadata key that carries the JSON job spec.
SPEC_METADATA_KEY = "gcpbatch-spec"
#: Cloud Storage limits all custom metadata of an object to 8 KiB.
MAX_METADATA_BYTES = 8 * 1024

JOB_ID_PATTERN = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class TaskObjects:
    """Names of the objects of one task: everything sits under ``covalent-gcpbatch/<job id>/``."""

    job_id: str

    @property
    def prefix(self) -> str:
        return f"{TASKS_PREFIX}{self.job_id}/"

    @property
    def task(self) -> str:
        return self.prefix + TASK_OBJECT

    @property
    def result(self) -> str:
        return self.prefix + RESULT_OBJECT

    @property
    def error(self) -> str:
        return self.prefix + ERROR_OBJECT

    @property
    def stdout(self) -> str:
        return self.prefix + STDOUT_OBJECT

    @property
    def stderr(self) -> str:
        return self.prefix + STDERR_OBJECT

    @property
    def cancelled(self) -> str:
        return self.prefix + CANCEL_OBJECT

    @property
    def not_created(self) -> str:
        return self.prefix + NOT_CREATED_OBJECT

    def all(self) -> tuple[str, ...]:
        return (self.task, self.result, self.error, self.stdout, self.stderr, self.cancelled, self.not_created)

    def disposable(self) -> tuple[str, ...]:
        """What the executor deletes when the task is over: everything but the cancel marker."""
        return tuple(name for name in self.all() if name != self.cancelled)


def job_id_of_task_object(object_name: str) -> str | None:
    """The job id if ``object_name`` is a task object (``covalent-gcpbatch/<job id>/task.pkl``).

    Anything else (results, logs, foreign objects, malformed ids) gives None: the function ignores
    those, since results land in the same bucket and fire the same trigger.
    """
    if not object_name.startswith(TASKS_PREFIX):
        return None
    parts = object_name[len(TASKS_PREFIX) :].split("/")
    if len(parts) != 2 or parts[1] != TASK_OBJECT:
        return None
    return parts[0] if JOB_ID_PATTERN.fullmatch(parts[0]) else None


# ---------------------------------------------------------------------------------------------
# Job id
# ---------------------------------------------------------------------------------------------


def new_attempt_token() -> str:
    """A fresh random token: one per ``run()`` call, so a re-run of a node gets a new job."""
    return secrets.token_hex(4)


def make_job_id(dispatch_id: str, node_id: int, attempt: str) -> str:
    """``cov-<first 8 of dispatch id>-<node id>-<attempt>``, valid for Batch's job id pattern.

    Deterministic in its inputs: the function derives the id from the object name, so a duplicate
    finalize event for the same upload maps to the same job, and Batch's ALREADY_EXISTS dedupes it.
    """
    short = re.sub(r"[^a-z0-9]", "", dispatch_id.lower())[:8] or "x"
    token = re.sub(r"[^a-z0-9]", "", attempt.lower())
    if not token:
        raise ValueError("attempt token must contain at least one [a-z0-9] character")
    if node_id < 0:
        raise ValueError(f"node_id must be >= 0, got {node_id}")
    job_id = f"cov-{short}-{node_id}-{token}"
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(f"cannot build a valid Batch job id from {dispatch_id!r}, {node_id}, {attempt!r}")
    return job_id


# ---------------------------------------------------------------------------------------------
# Job spec (object metadata)
# ---------------------------------------------------------------------------------------------


_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_OPTIONAL_RESOURCE_NAME = r"^([a-z0-9][a-z0-9./_-]*)?$"


class JobOptions(BaseModel):
    """Batch job options beyond size and time: where and on what the task runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_type: str = Field(
        default="", max_length=64, pattern=r"^([a-z0-9][a-z0-9-]*)?$",
        description="Compute Engine machine type, e.g. `n2-standard-8`; empty lets Batch choose from `vcpus`/`memory`. "
                    "The deployment may restrict it.")
    provisioning: Literal["STANDARD", "SPOT"] = Field(
        default="STANDARD",
        description="`STANDARD` or `SPOT` (cheaper, preemptible: preemptions are retried up to `retries` times).")
    accelerator_type: str = Field(
        default="", max_length=64, pattern=r"^([a-z0-9][a-z0-9-]*)?$",
        description="GPU type, e.g. `nvidia-tesla-t4`; set together with `accelerator_count`.")
    accelerator_count: int = Field(
        default=0, ge=0, le=16, description="GPUs per task (0 to 16; capped by the deployment, 8 by default).")
    install_gpu_drivers: bool = Field(
        default=True, description="Let Batch install the GPU drivers when GPUs are requested.")
    boot_disk_size_gb: int = Field(
        default=0, ge=0, le=65536, description="Boot disk size; `0` keeps Batch's default.")
    labels: dict[str, str] = Field(
        default_factory=dict, max_length=32,
        description="Job labels (GCP label rules). `covalent-dispatch-id`, `covalent-node-id` and `created-by` are "
                    "added automatically and win.")
    network: str = Field(
        default="", max_length=512, pattern=_OPTIONAL_RESOURCE_NAME,
        description="VPC network, e.g. `global/networks/my-vpc`.")
    subnetwork: str = Field(
        default="", max_length=512, pattern=_OPTIONAL_RESOURCE_NAME,
        description="Subnetwork, e.g. `regions/us-east1/subnetworks/batch`.")
    no_external_ip: bool = Field(
        default=False,
        description="VMs without external IPs (needs Cloud NAT or Private Google Access to pull images and reach GCS).")
    allowed_locations: tuple[str, ...] = Field(
        default=(), max_length=32,
        description="`regions/...` or `zones/...` entries inside the deployment's region; empty means the whole region.")

    @field_validator("provisioning", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("labels")
    @classmethod
    def _label_rules(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
                raise ValueError(
                    f"label {key!r}={value!r} breaks GCP label rules: keys start with a lowercase letter, and keys "
                    "and values use only lowercase letters, digits, '_' and '-' (at most 63 characters)"
                )
        return labels

    @field_validator("allowed_locations")
    @classmethod
    def _locations(cls, locations: tuple[str, ...]) -> tuple[str, ...]:
        for location in locations:
            if not re.fullmatch(r"(regions|zones)/[a-z0-9-]+", location):
                raise ValueError(f"allowed location {location!r} must look like 'regions/us-east1' or 'zones/us-east1-b'")
        return locations

    def model_post_init(self, _context: object) -> None:
        if bool(self.accelerator_type) != bool(self.accelerator_count):
            raise ValueError("accelerator_type and accelerator_count go together: set both (or neither)")


class JobSpec(BaseModel):
    """What the executor asks for; the function validates it and builds the Batch job from it.

    Unknown fields are rejected: the function trusts nothing in an object beyond this schema.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = PROTOCOL_VERSION
    dispatch_id: str = Field(min_length=1, max_length=64)
    node_id: int = Field(ge=0)
    project_id: str = Field(min_length=1, max_length=64)
    region: str = Field(min_length=1, max_length=64)
    container_image_uri: str = Field(min_length=1, max_length=1024)
    service_account_email: str | None = Field(default=None, max_length=256)
    vcpus: float = Field(gt=0, le=416)
    memory_mb: int = Field(gt=0, le=12 * 1024 * 1024)
    time_limit_s: int = Field(gt=0, le=14 * 24 * 3600)
    retries: int = Field(ge=0, le=10)
    python_version: str = Field(pattern=r"^3\.\d+$")
    covalent_version: str = Field(min_length=1, max_length=64)
    options: JobOptions = Field(default_factory=JobOptions)

    @field_validator("dispatch_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("dispatch_id may contain only letters, digits, '.', '_' and '-'")
        return value

    def to_metadata(self) -> dict[str, str]:
        """Custom object metadata carrying this spec; raises SpecError if over GCS's 8 KiB."""
        encoded = self.model_dump_json()
        if len(encoded.encode()) + len(SPEC_METADATA_KEY) > MAX_METADATA_BYTES:
            raise SpecError(f"job spec is {len(encoded)} bytes; object metadata is limited to 8 KiB")
        return {SPEC_METADATA_KEY: encoded}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> JobSpec:
        """Parse and validate the spec from object metadata, or raise SpecError saying why."""
        if not metadata or SPEC_METADATA_KEY not in metadata:
            raise SpecError(f"object has no {SPEC_METADATA_KEY!r} metadata: it was not uploaded by GCPBatchExecutor")
        size = sum(len(k.encode()) + len(str(v).encode()) for k, v in metadata.items())
        if size > MAX_METADATA_BYTES:
            raise SpecError(f"object metadata is {size} bytes, over the 8 KiB limit")
        try:
            return cls.model_validate_json(metadata[SPEC_METADATA_KEY])
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in err.errors()
            )
            raise SpecError(f"invalid job spec: {problems}") from None


# ---------------------------------------------------------------------------------------------
# Worker environment (function -> job -> worker)
# ---------------------------------------------------------------------------------------------

ENV_BUCKET = "GCPBATCH_BUCKET"
ENV_JOB_ID = "GCPBATCH_JOB_ID"


#: Worker exit codes. Batch retries any other non-zero exit (up to ``retries``), so these two, which
#: mean "re-running cannot help", are listed in the job's FAIL_TASK lifecycle policy.
EXIT_TASK_FAILED = 10  # the user's function raised
EXIT_WORKER_ERROR = 11  # the task could not be run: bad pickle, version mismatch, missing object
#: The task ran but its result, error record or output could not be written to the bucket. Not
#: retried: the user's code is never run twice because storing its outcome failed.
EXIT_UPLOAD_FAILED = 12
#: Batch's exit code for a task killed at its max run duration; retrying would only repeat it.
EXIT_MAX_RUN_DURATION = 50005
NO_RETRY_EXIT_CODES = (EXIT_TASK_FAILED, EXIT_WORKER_ERROR, EXIT_UPLOAD_FAILED, EXIT_MAX_RUN_DURATION)
#: Batch's infrastructure exit codes, which ``retries`` is for.
INFRASTRUCTURE_EXIT_CODES = {
    50001: "the VM was preempted (spot)",
    50002: "the VM became unreachable",
    50003: "the VM was rebooted",
    50004: "the VM stopped responding",
    50005: "the task exceeded its max run duration (time_limit)",
    50006: "the VM was recreated",
}
#: What a job's exit code means when the job ended without an error record: Batch's codes, the
#: worker's own, and the usual container ones.
EXIT_CODE_MEANINGS = {
    **INFRASTRUCTURE_EXIT_CODES,
    EXIT_UPLOAD_FAILED: "the task ran, but its result could not be stored in the bucket (see the job's log)",
    127: "the container's command was not found",
    137: "the worker was killed (SIGKILL: out of memory, or stopped)",
    143: "the worker was stopped (SIGTERM)",
}


def worker_environment(bucket: str, job_id: str) -> dict[str, str]:
    """The environment a job's container gets: where its task is and where its outputs go."""
    return {ENV_BUCKET: bucket, ENV_JOB_ID: job_id}


class ErrorRecord(BaseModel):
    """What the worker writes when the task (or the worker itself) fails."""

    model_config = ConfigDict(extra="ignore")

    type: str
    message: str
    traceback: str = ""
    #: "task": the user's function raised; "worker": the worker could not run it.
    phase: Literal["task", "worker"] = "task"


# ---------------------------------------------------------------------------------------------
# Deployment settings (what the function enforces; set by deploy.sh or `local up`)
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Notifications (Batch -> Pub/Sub -> executor)
# ---------------------------------------------------------------------------------------------


class JobState(str, Enum):
    """Batch JobStatus.State names, as Batch writes them in the ``NewJobState`` attribute."""

    STATE_UNSPECIFIED = "STATE_UNSPECIFIED"
    QUEUED = "QUEUED"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    DELETION_IN_PROGRESS = "DELETION_IN_PROGRESS"
    CANCELLATION_IN_PROGRESS = "CANCELLATION_IN_PROGRESS"
    CANCELLED = "CANCELLED"
    #: Not a Batch state: the function refused the task and created no job.
    REJECTED = "REJECTED"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.DELETION_IN_PROGRESS, JobState.REJECTED}

#: ``Type`` attribute of Batch's job-level state change messages.
JOB_STATE_CHANGED = "JOB_STATE_CHANGED"
#: ``Type`` attribute of the function's messages for a task it created no job for.
TASK_REJECTED = "COVALENT_GCPBATCH_TASK_REJECTED"
TASK_NOT_CREATED = "COVALENT_GCPBATCH_TASK_NOT_CREATED"


@dataclass(frozen=True)
class JobEvent:
    """One message from the notification topic, reduced to what a waiting executor needs."""

    job_id: str
    state: JobState
    detail: str = ""


def location_name(project: str, region: str) -> str:
    """The Batch parent of a region's jobs (create_job, list_jobs)."""
    return f"projects/{project}/locations/{region}"


def job_name(project: str, region: str, job_id: str) -> str:
    """The Batch resource name of job ``job_id`` (get_job, cancel_job)."""
    return f"{location_name(project, region)}/jobs/{job_id}"


def topic_path(project: str, topic: str) -> str:
    """A Pub/Sub topic's resource name."""
    return f"projects/{project}/topics/{topic}"


def job_id_of_job_name(job_name: str) -> str:
    """``projects/<number>/locations/<region>/jobs/<id>`` -> ``<id>``."""
    return job_name.rsplit("/", 1)[-1]


def parse_notification(attributes: Mapping[str, str], data: bytes) -> JobEvent | None:
    """A JobEvent for a job-level state change or a rejection; None for anything else.

    Batch's job messages carry ``Type``, ``JobName`` (with the project NUMBER), ``JobUID``,
    ``NewJobState`` and ``Region``; task-level messages (``TASK_STATE_CHANGED``) are ignored.
    """
    kind = attributes.get("Type")
    if kind in (TASK_REJECTED, TASK_NOT_CREATED):
        job_id = attributes.get("JobId", "")
        if not JOB_ID_PATTERN.fullmatch(job_id):
            return None
        state = JobState.REJECTED if kind == TASK_REJECTED else JobState.CANCELLED
        return JobEvent(job_id, state, data.decode("utf-8", "replace"))
    if kind != JOB_STATE_CHANGED:
        return None
    job_name = attributes.get("JobName", "")
    try:
        state = JobState(attributes.get("NewJobState", ""))
    except ValueError:
        return None
    if not job_name or state is JobState.REJECTED:
        return None
    return JobEvent(job_id_of_job_name(job_name), state, data.decode("utf-8", "replace"))


class NotCreated(BaseModel):
    """Why the function created no job for a task: refused by the deployment, or cancelled first.

    Published on the notification topic (``not_created_message``) and written beside the task
    (``TaskObjects.not_created``), so both waiting modes learn it without waiting for a bound.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    state: Literal[JobState.REJECTED, JobState.CANCELLED]
    reason: str

    def event(self, job_id: str) -> JobEvent:
        return JobEvent(job_id, self.state, self.reason)


def not_created_message(job_id: str, record: NotCreated) -> tuple[bytes, dict[str, str]]:
    """(data, attributes) of the message the function publishes when it creates no job."""
    kind = TASK_REJECTED if record.state is JobState.REJECTED else TASK_NOT_CREATED
    return record.reason.encode(), {"Type": kind, "JobId": job_id}


def rejection_message(job_id: str, reason: str) -> tuple[bytes, dict[str, str]]:
    """(data, attributes) of the message the function publishes when it refuses a task."""
    return not_created_message(job_id, NotCreated(state=JobState.REJECTED, reason=reason))


def dumps_not_created(record: NotCreated) -> bytes:
    return record.model_dump_json().encode()


def loads_not_created(payload: bytes) -> NotCreated:
    """The record, or a REJECTED one quoting what could not be read (never lose the reason)."""
    try:
        return NotCreated.model_validate_json(payload)
    except ValidationError:
        return NotCreated(state=JobState.REJECTED, reason=payload[:2000].decode("utf-8", "replace"))


def job_state_message(job_name: str, job_uid: str, region: str, previous: str, current: str) -> tuple[bytes, dict[str, str]]:
    """(data, attributes) of a Batch job state change message, as Batch publishes it.

    Used by the local Batch service; kept here so its format and the parser above cannot drift.
    """
    data = f"Job state was updated: jobName={job_name}, previousState={previous}, currentState={current}"
    attributes = {
        "Type": JOB_STATE_CHANGED,
        "JobName": job_name,
        "JobUID": job_uid,
        "NewJobState": current,
        "Region": region,
    }
    return data.encode(), attributes


def dumps_error(record: ErrorRecord) -> bytes:
    return record.model_dump_json(indent=1).encode()


def loads_error(payload: bytes) -> ErrorRecord:
    try:
        return ErrorRecord.model_validate(json.loads(payload))
    except (ValueError, ValidationError):
        return ErrorRecord(type="UnreadableErrorRecord", message=payload[:2000].decode("utf-8", "replace"), phase="worker")
