"""Messages on the notification topic: Batch's job state changes and the function's "no job for
this task" messages, parsed into what a waiting executor needs (``parse_notification``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .layout import JOB_ID_PATTERN, job_id_of_job_name


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

    @classmethod
    def of(cls, state: object) -> JobState:
        """The JobState of a ``batch_v1`` job state; STATE_UNSPECIFIED for one newer than the
        installed client (news of no meaning: it neither ends nor moves a wait)."""
        try:
            return cls(state_name(state))
        except ValueError:
            return cls.STATE_UNSPECIFIED


def state_name(state: object) -> str:
    """A job or task state's name, also for a value newer than the installed client: proto-plus
    hands those over as a plain int, which has no ``.name``."""
    name = getattr(state, "name", None)
    return name if isinstance(name, str) else f"UNKNOWN({int(state)})"


_TERMINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.DELETION_IN_PROGRESS, JobState.REJECTED}

#: ``Type`` attribute of Batch's job-level state change messages.
JOB_STATE_CHANGED = "JOB_STATE_CHANGED"
#: ``Type`` attribute of the function's messages for a task it created no job for.
TASK_REJECTED = "COVALENT_GCPBATCH_TASK_REJECTED"
TASK_NOT_CREATED = "COVALENT_GCPBATCH_TASK_NOT_CREATED"
#: ``Type`` attribute of Batch's task-level state change messages (job-level ones have none).
TASK_STATE_CHANGED = "TASK_STATE_CHANGED"


@dataclass(frozen=True)
class JobEvent:
    """One message from the notification topic, reduced to what a waiting executor needs."""

    job_id: str
    state: JobState
    detail: str = ""


def parse_notification(attributes: Mapping[str, str], data: bytes) -> JobEvent | None:
    """A JobEvent for a job-level state change or a "no job" message; None for anything else.

    A real job message (tests/support/fixtures/batch_messages.json, with its source) carries
    ``JobName`` (with the project NUMBER, so jobs are matched by their id alone), ``JobUID``,
    ``NewJobState`` and ``Region``, and no ``Type``; ``Type=JOB_STATE_CHANGED`` is accepted too.
    Task-level messages are ``parse_task_notification``'s.
    """
    kind = attributes.get("Type")
    if kind in (TASK_REJECTED, TASK_NOT_CREATED):
        job_id = attributes.get("JobId", "")
        if not JOB_ID_PATTERN.fullmatch(job_id):
            return None
        state = JobState.REJECTED if kind == TASK_REJECTED else JobState.CANCELLED
        return JobEvent(job_id, state, data.decode("utf-8", "replace"))
    if kind not in (None, "", JOB_STATE_CHANGED):
        return None
    job_name = attributes.get("JobName", "")
    try:
        state = JobState(attributes.get("NewJobState", ""))
    except ValueError:
        return None
    if not job_name or state is JobState.REJECTED:
        return None
    return JobEvent(job_id_of_job_name(job_name), state, data.decode("utf-8", "replace"))


@dataclass(frozen=True)
class TaskEvent:
    """A task-level state change: task ``task_index`` of job ``job_id`` entered ``state``."""

    job_id: str
    task_index: int
    state: str
    detail: str = ""


_TASK_NAME = re.compile(r"projects/[^/]+/locations/[^/]+/jobs/([^/]+)/taskGroups/[^/]+/tasks/(\d+)")


def parse_task_notification(attributes: Mapping[str, str], data: bytes) -> TaskEvent | None:
    """A TaskEvent for Batch's ``Type=TASK_STATE_CHANGED`` message (``TaskName`` ends
    ``/jobs/<id>/taskGroups/group0/tasks/<index>``, ``NewTaskState``); None for anything else."""
    if attributes.get("Type") != TASK_STATE_CHANGED:
        return None
    match = _TASK_NAME.fullmatch(attributes.get("TaskName", ""))
    state = attributes.get("NewTaskState", "")
    if match is None or not state:
        return None
    return TaskEvent(match.group(1), int(match.group(2)), state, data.decode("utf-8", "replace"))


#: An electron of a pack lives as its Batch task does: the task's state, read as the job state a
#: lone electron's job would be in (UNEXECUTED: its job was cancelled before the task started).
JOB_STATE_OF_TASK_STATE = {
    "PENDING": JobState.QUEUED,
    "ASSIGNED": JobState.SCHEDULED,
    "RUNNING": JobState.RUNNING,
    "SUCCEEDED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
    "UNEXECUTED": JobState.CANCELLED,
}


def member_event(member_id: str, task_state: str, detail: str = "") -> JobEvent | None:
    """The JobEvent of a pack's electron whose task entered ``task_state`` (None: a state of no
    meaning here, STATE_UNSPECIFIED)."""
    state = JOB_STATE_OF_TASK_STATE.get(task_state)
    return None if state is None else JobEvent(member_id, state, detail)


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


def dumps_not_created(record: NotCreated) -> bytes:
    return record.model_dump_json().encode()


def loads_not_created(payload: bytes) -> NotCreated:
    """The record, or a REJECTED one quoting what could not be read (never lose the reason)."""
    try:
        return NotCreated.model_validate_json(payload)
    except ValidationError:
        return NotCreated(state=JobState.REJECTED, reason=payload[:2000].decode("utf-8", "replace"))


def job_state_message(job_name: str, job_uid: str, region: str, previous: str, current: str,
                      timestamp: str) -> tuple[bytes, dict[str, str]]:
    """(data, attributes) of a Batch job state change message, as Batch publishes it (no ``Type``;
    see tests/support/fixtures/batch_messages.json for the real one and its source).

    Used by the local Batch service; kept here so its format and the parser above cannot drift.
    """
    data = (f"Job state was updated: jobName={job_name}, jobUID={job_uid}, previousState={previous}, "
            f"currentState={current}, timestamp={timestamp}")
    attributes = {
        "JobName": job_name,
        "JobUID": job_uid,
        "NewJobState": current,
        "Region": region,
    }
    return data.encode(), attributes


def task_state_message(task_name: str, job_uid: str, task_uid: str, region: str, previous: str, current: str,
                       timestamp: str) -> tuple[bytes, dict[str, str]]:
    """(data, attributes) of a Batch task state change message (``Type=TASK_STATE_CHANGED``), as
    Batch publishes it (tests/support/fixtures/batch_messages.json, "task_message")."""
    data = f"Task state was updated: taskUID={task_uid}, previousState={previous}, currentState={current}, timestamp={timestamp}"
    attributes = {
        "Type": TASK_STATE_CHANGED,
        "JobUID": job_uid,
        "NewTaskState": current,
        "TaskName": task_name,
        "TaskUID": task_uid,
        "Region": region,
    }
    return data.encode(), attributes
