"""Between the function, the job and the worker: the worker's environment, its exit codes (and
Batch's), and the error record it writes when a task fails."""

from __future__ import annotations

import json
import re

from pydantic import BaseModel, ConfigDict, ValidationError
from typing import Literal

#: The bucket of a task's outputs and markers (results, logs, cancel markers: ``TaskObjects``).
ENV_BUCKET = "GCPBATCH_BUCKET"
#: The bucket its task object or pack manifest was uploaded to, the function's trigger bucket (a
#: bucket of its own, so that outputs do not fire the function); unset: ``ENV_BUCKET``.
ENV_TASK_BUCKET = "GCPBATCH_TASK_BUCKET"
ENV_JOB_ID = "GCPBATCH_JOB_ID"
#: Set instead of ENV_JOB_ID in the tasks of a pack: the worker runs ``members[BATCH_TASK_INDEX]``.
ENV_PACK_ID = "GCPBATCH_PACK_ID"
#: Set by Batch in every task of a job: its index (0 for a job of one task).
ENV_TASK_INDEX = "BATCH_TASK_INDEX"
#: Set by Batch in every task: 0 for the first attempt, then 1, 2... for its retries.
ENV_RETRY_ATTEMPT = "BATCH_TASK_RETRY_ATTEMPT"
#: Set by Batch on the VM of every task: the job's UID (a job id can be reused once the job is
#: deleted; its UID never is). Public Batch task scripts read it as BATCH_JOB_UID.
ENV_JOB_UID = "BATCH_JOB_UID"
#: Set by the local Batch service only (its imitation of mounted buckets: a host process cannot
#: see ``/mnt/...``): JSON ``{mount path: local directory}``; ``volumes.volume_path`` honours it.
ENV_LOCAL_MOUNTS = "GCPBATCH_LOCAL_MOUNTS"
#: Set in a job whose VM is kept warm (protocol/warm.py): the offer subscription it waits on, the
#: notification topic it tells its electrons' states on, its job's max run duration, and how many
#: warm VMs may wait at once.
ENV_WARM_SUBSCRIPTION = "GCPBATCH_WARM_SUBSCRIPTION"
ENV_TOPIC = "GCPBATCH_TOPIC"
ENV_WARM_LIFETIME_S = "GCPBATCH_WARM_LIFETIME_S"
ENV_MAX_WARM_VMS = "GCPBATCH_MAX_WARM_VMS"
#: Environment names a task's ``secrets`` may not take: the worker's own (``worker_environment``,
#: ``pack_environment``) and, by prefix, this plugin's and Batch's predefined variables (BATCH_TASK_INDEX...).
WORKER_ENV_NAMES = (ENV_BUCKET, ENV_TASK_BUCKET, ENV_JOB_ID, ENV_PACK_ID)
RESERVED_ENV_PREFIXES = ("GCPBATCH_", "BATCH_")
#: Object metadata of an outcome (result.pkl, error.json): the UID of the job whose worker wrote
#: it and the attempt. A retried attempt of the same job that finds its job's outcome stored
#: (the VM died after the write, before Batch recorded the attempt) does not run the task again.
OUTCOME_JOB_UID_KEY = "gcpbatch-job-uid"
OUTCOME_ATTEMPT_KEY = "gcpbatch-attempt"


#: Worker exit codes. None is ever retried: Batch retries only ``RETRIED_EXIT_CODES``.
EXIT_TASK_FAILED = 10  # the user's function raised
EXIT_WORKER_ERROR = 11  # the task could not be run: bad pickle, version mismatch, missing object
#: The task ran but its result, error record or output could not be written to the bucket. Not
#: retried: the user's code is never run twice because storing its outcome failed.
EXIT_UPLOAD_FAILED = 12
#: An electron of a pack was cancelled (its marker object): skipped before it started, or stopped.
#: Its siblings go on; never retried.
EXIT_CANCELLED = 13
#: The electron's start deadline (``JobSpec.start_within_s``) had passed when its worker started:
#: nobody waits for it any more, so it was not run (a not-run error record says so).
EXIT_TOO_LATE = 14
#: Batch's exit code for a task killed at its max run duration; retrying would only repeat it.
EXIT_MAX_RUN_DURATION = 50005
#: Batch's infrastructure exit codes, which ``retries`` is for.
INFRASTRUCTURE_EXIT_CODES = {
    50001: "the VM was preempted (spot)",
    50002: "the VM became unreachable",
    50003: "the VM was rebooted",
    50004: "the VM stopped responding",
    50005: "the task exceeded its max run duration (time_limit)",
    50006: "the VM was recreated",
}
#: What Batch retries (up to ``retries``): the infrastructure failures a new attempt can get past
#: (Cromwell's GcpBatchExitCode lists the same transient codes), never 50005 (the time limit
#: again). The job's one lifecycle policy is RETRY_TASK on these, which "retries failed tasks if we
#: notice any exit code match and fails tasks if no match is found" (batch_v1.LifecyclePolicy):
#: the user's code is never re-run for its own failure, 137 (out of memory) or 1 included.
RETRIED_EXIT_CODES = tuple(code for code in INFRASTRUCTURE_EXIT_CODES if code != EXIT_MAX_RUN_DURATION)
#: What a job's exit code means when the job ended without an error record: Batch's codes, the
#: worker's own, and the usual container ones.
EXIT_CODE_MEANINGS = {
    **INFRASTRUCTURE_EXIT_CODES,
    EXIT_UPLOAD_FAILED: "the task ran, but its result could not be stored in the bucket (see the job's log)",
    EXIT_CANCELLED: "the electron was cancelled (its pack's other tasks went on)",
    EXIT_TOO_LATE: "the electron's start deadline (submit_timeout + queue_timeout) had passed: not run",
    127: "the container's command was not found",
    137: "the worker was killed (SIGKILL: most often out of memory: raise `memory`; not retried)",
    143: "the worker was stopped (SIGTERM)",
}


#: How Batch writes an exit code into a status event's text (job-level events have no
#: task_execution: "... task with index 0 failed due to the following task event: "Task state is
#: updated from RUNNING to FAILED on zones/.../instances/... with exit code 127."").
_EXIT_CODE_IN_TEXT = re.compile(r"with exit code (-?\d+)")


def exit_code_of_event(event) -> int:
    """A ``batch_v1.StatusEvent``'s exit code: ``task_execution.exit_code`` where Batch gives one
    (task-level events), else the last "with exit code N" in its description; 0 if neither."""
    if event.task_execution and event.task_execution.exit_code:
        return event.task_execution.exit_code
    codes = _EXIT_CODE_IN_TEXT.findall(event.description or "")
    return int(codes[-1]) if codes else 0


def _buckets(bucket: str, task_bucket: str | None) -> dict[str, str]:
    return {ENV_BUCKET: bucket} | ({ENV_TASK_BUCKET: task_bucket} if task_bucket and task_bucket != bucket else {})


def worker_environment(bucket: str, job_id: str, task_bucket: str | None = None) -> dict[str, str]:
    """The environment a job's container gets: where its task is (``task_bucket``, default
    ``bucket``) and where its outputs go (``bucket``)."""
    return _buckets(bucket, task_bucket) | {ENV_JOB_ID: job_id}


def warm_environment(subscription_path: str, topic_path: str, lifetime_s: int, max_vms: int) -> dict[str, str]:
    """What a job whose VM is kept warm adds to ``worker_environment``."""
    return {ENV_WARM_SUBSCRIPTION: subscription_path, ENV_TOPIC: topic_path, ENV_WARM_LIFETIME_S: str(lifetime_s),
            ENV_MAX_WARM_VMS: str(max_vms)}


def pack_environment(bucket: str, pack_id: str, task_bucket: str | None = None) -> dict[str, str]:
    """The environment of a pack's tasks: each finds its electron in the pack's manifest by its
    BATCH_TASK_INDEX."""
    return _buckets(bucket, task_bucket) | {ENV_PACK_ID: pack_id}


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


def dumps_error(record: ErrorRecord) -> bytes:
    return record.model_dump_json(indent=1).encode()


def loads_error(payload: bytes) -> ErrorRecord:
    try:
        return ErrorRecord.model_validate(json.loads(payload))
    except (ValueError, ValidationError):
        return ErrorRecord(type="UnreadableErrorRecord", message=payload[:2000].decode("utf-8", "replace"), phase="worker")
