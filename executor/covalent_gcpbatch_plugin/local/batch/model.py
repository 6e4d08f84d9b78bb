"""What a job means to the local Batch service: pure, typed translation, no I/O.

* ``validate_job``: which jobs the service accepts (Batch's own rules plus the service's limits);
* ``runnable_argv`` / ``task_environment``: how a runnable becomes a host process;
* ``attempt_verdict``: exit code + ``max_retry_count`` + lifecycle policy -> succeed, retry or fail.

The injected failures of ``POST /_admin/faults`` are ``faults.Faults``.
"""

from __future__ import annotations

import enum
import hashlib
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from google.cloud import batch_v1
from google.protobuf import duration_pb2, timestamp_pb2

from ... import protocol

State = batch_v1.JobStatus.State
TERMINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})
DEFAULT_WORKER_COMMAND = (sys.executable, "-m", "covalent_gcpbatch_plugin.worker")
#: Batch's exit code for a spot preemption (what the ``preempt`` fault records).
EXIT_PREEMPTED = 50001
#: A runnable whose program cannot be started (Docker answers 127 for a missing executable).
EXIT_NOT_STARTED = 127
#: SIGTERM first, SIGKILL this much later (like ``docker stop``).
KILL_GRACE_S = 2.0
MAX_RETRY_COUNT = 10
#: Batch's limit on tasks per task group (../shared/notes/platform.md, "Quotas").
MAX_TASK_COUNT = 100_000
_TOPIC = re.compile(r"^projects/[^/]+/topics/[^/]+$")

Publish = Callable[[str, bytes, dict[str, str]], None]


class ApiError(Exception):
    """An error the HTTP layer answers in Google's JSON error shape."""

    STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED",
              500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> str:
        return self.STATUS.get(self.code, "UNKNOWN")


# ---------------------------------------------------------------------------------------------
# Pure translation
# ---------------------------------------------------------------------------------------------


def project_number(project: str, numbers: Mapping[str, str]) -> str:
    """The project NUMBER Batch writes in notifications: mapped, the project itself if numeric,
    else a stable 12-digit number derived from the id."""
    if project in numbers:
        return numbers[project]
    if project.isdigit():
        return project
    return str(10**11 + int(hashlib.sha256(project.encode()).hexdigest(), 16) % (9 * 10**11))


def validate_job(job_id: str, job: batch_v1.Job) -> str | None:
    """Why this job cannot be created here (a 400 message), or None if it can."""
    if not protocol.JOB_ID_PATTERN.fullmatch(job_id):
        return f"job_id {job_id!r} must match {protocol.JOB_ID_PATTERN.pattern}"
    if not job.task_groups:
        return "job.task_groups must contain one task group"
    if len(job.task_groups) > 1:
        return "only one task group is supported"
    group = job.task_groups[0]
    if not 0 <= group.task_count <= MAX_TASK_COUNT:
        return f"task_groups[0].task_count must be between 1 and {MAX_TASK_COUNT} (Batch's tasks-per-group limit)"
    if group.task_environments:
        # Not used by this plugin (its pack manifest names each task's electron): refused rather
        # than run with the wrong environment.
        return "task_groups[0].task_environments is not supported by the local Batch service"
    if group.parallelism < 0:
        return "task_groups[0].parallelism must be positive"
    spec = group.task_spec
    if not spec.runnables:
        return "task_spec.runnables must contain at least one runnable"
    for i, runnable in enumerate(spec.runnables):
        # Anyone on this machine can reach the service: it runs the worker image's entrypoint and
        # nothing else a request names (no script, no entrypoint override, no background runnable).
        if runnable.background or "barrier" in runnable or not runnable.container.image_uri:
            return f"runnable {i}: the local Batch service runs foreground container runnables (the worker image) only"
        if runnable.container.entrypoint:
            return f"runnable {i}: the local Batch service runs the worker image's own entrypoint; container.entrypoint must be empty"
    problem = volumes_problem(job)
    if problem:
        return problem
    for i, volume in enumerate(spec.volumes):
        if not volume.mount_path.startswith("/") or not ("gcs" in volume or volume.device_name):
            return f"volume {i}: the local Batch service mounts Cloud Storage volumes (gcs) and attached disks at absolute paths only"
    environments = [spec.environment, *(r.environment for r in spec.runnables)]
    for name, version in (item for env in environments for item in env.secret_variables.items()):
        # Batch takes "the path to a secret version" (https://cloud.google.com/batch/docs/create-run-job-secret-manager).
        if not protocol.SECRET_VERSION_NAME.fullmatch(version):
            return f"secret variable {name}: {version!r} must be projects/PROJECT/secrets/SECRET/versions/VERSION"
    if not 0 <= spec.max_retry_count <= MAX_RETRY_COUNT:
        return f"task_spec.max_retry_count must be between 0 and {MAX_RETRY_COUNT}"
    if len(spec.lifecycle_policies) > 1:
        return "only one lifecycle policy is supported"
    for notification in job.notifications:
        if not _TOPIC.fullmatch(notification.pubsub_topic):
            return f"notification pubsub_topic {notification.pubsub_topic!r} must be projects/<project>/topics/<topic>"
    return None


def volumes_problem(job: batch_v1.Job) -> str | None:
    """A task volume naming a disk device the VMs do not get: a Volume.device_name "should align
    with a device_name specified by job.allocation_policy.instances[0].policy.disks[i].device_name"
    (batch_v1 Volume). Refusing it with 400 is the service's assumption of what Batch answers.

    A disk volume is an empty directory of the attempt's, which ``volume_path`` maps its mount path
    to (task_io.LocalMounts), as for a mounted bucket."""
    instances = job.allocation_policy.instances
    devices = {disk.device_name for disk in instances[0].policy.disks} if instances else set()
    for volume in job.task_groups[0].task_spec.volumes:
        if volume.device_name and volume.device_name not in devices:
            return (f"task_spec volume at {volume.mount_path!r} names device {volume.device_name!r}, which no "
                    "allocation_policy.instances[0].policy.disks entry has")
    return None


def parse_worker_command(command: str | Sequence[str] | None) -> tuple[str, ...]:
    """The worker argv; a leading bare ``python``/``python3`` means this service's interpreter."""
    if not command:
        return DEFAULT_WORKER_COMMAND
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return tuple(argv)


def runnable_argv(runnable: batch_v1.Runnable, worker_command: Sequence[str]) -> list[str]:
    """How a (validated) container runnable runs on the host: the worker command, standing in for
    the worker image's entrypoint, followed by ``container.commands`` as its arguments."""
    return [*worker_command, *runnable.container.commands]


#: Host variables no worker sees: they locate the dispatching user's Covalent config and
#: directories, which a worker's ``import covalent`` would rewrite; on Batch a worker can only
#: rewrite its own container's.
HOST_ONLY_PREFIXES = ("COVALENT_", "XDG_")


def task_environment(base: Mapping[str, str], spec: batch_v1.TaskSpec, runnable: batch_v1.Runnable,
                     retry_attempt: int, site_packages: Path, *, home: Path, index: int = 0,
                     count: int = 1, job_uid: str = "") -> dict[str, str]:
    """The service's environment (less HOST_ONLY_PREFIXES), Batch's predefined variables, the
    task's, then the runnable's.

    Every attempt runs in a fresh container on Batch: its own home, and what a task pip-installs
    (ct.DepsPip) is gone for the next one. Here ``home`` is the attempt's own directory, the image's
    environment is shared, so pip installs into the attempt's own ``site_packages`` (PIP_TARGET),
    which is on the attempt's PYTHONPATH. Pip keeps the host's download cache: only faster.
    """
    host = {name: value for name, value in base.items() if not name.startswith(HOST_ONLY_PREFIXES)}
    return {
        **host,
        "HOME": str(home),
        "PIP_CACHE_DIR": base.get("PIP_CACHE_DIR") or str(_host_cache(base) / "pip"),
        "PIP_TARGET": str(site_packages),
        "PYTHONPATH": str(site_packages),
        "BATCH_TASK_INDEX": str(index),
        "BATCH_TASK_COUNT": str(count),
        "BATCH_TASK_RETRY_ATTEMPT": str(retry_attempt),
        protocol.ENV_JOB_UID: job_uid,
        **spec.environment.variables,
        **runnable.environment.variables,
    }


def _host_cache(base: Mapping[str, str]) -> Path:
    """The host's cache directory, as pip finds it (XDG_CACHE_HOME, else ~/.cache)."""
    if base.get("XDG_CACHE_HOME"):
        return Path(base["XDG_CACHE_HOME"])
    return Path(base.get("HOME") or Path.home()) / ".cache"


class Verdict(enum.Enum):
    SUCCEEDED = "succeeded"
    RETRY = "retry"
    FAILED = "failed"


def attempt_verdict(exit_code: int, retries_done: int, spec: batch_v1.TaskSpec) -> Verdict:
    """Batch's retry rule: exit 0 succeeds; a FAIL_TASK policy fails its listed codes at once (and
    retries the rest); a RETRY_TASK policy retries only its listed codes; retries are bounded by
    ``max_retry_count``."""
    if exit_code == 0:
        return Verdict.SUCCEEDED
    for policy in spec.lifecycle_policies[:1]:
        listed = exit_code in set(policy.action_condition.exit_codes)
        action = batch_v1.LifecyclePolicy.Action
        if (policy.action == action.FAIL_TASK and listed) or (policy.action == action.RETRY_TASK and not listed):
            return Verdict.FAILED
    return Verdict.RETRY if retries_done < spec.max_retry_count else Verdict.FAILED


def exit_code_of(returncode: int) -> int:
    """A process's exit code as a container runtime reports it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def timestamp(at: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(at * 1e9))
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d
