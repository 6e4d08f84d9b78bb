"""The executor's Batch calls: reads of a job or of a pack's task, cancels, and what a read says.

One hop's I/O beside the object store (task_objects.py). Every read retries transient errors for
a bounded time (``retry``; ``within``: what is left of a wait's phase, so that its bound holds).
What a job's state means for an electron is decided on here only as far as a read must (a pack's
task not found yet, a job over without the task); what the electron's attempt then comes to is
attempts.py's decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from covalent._shared_files import logger
from google.api_core import exceptions

from . import packing, usage
from .protocol import JobEvent, JobState, job_name, member_event, state_name, task_name
from .task_objects import RetryFor, TaskStore
from .waiting import QueuedJob, capacity_events, explain_job_failure

app_log = logger.app_log


@dataclass(frozen=True)
class BatchJobs:
    """Batch as the executor of one deployment sees it: its project and region, the packs of this
    process (which electron's job is a pack's task), and the function's records in ``store``."""

    client: Any  # batch_v1.BatchServiceClient
    project_id: str
    region: str
    packs: packing.PackRegistry
    store: TaskStore
    retry: RetryFor
    #: The shortest retry a read made while waiting gets (the rest of a phase may be shorter).
    min_retry_s: float = 10.0

    def name(self, job_id: str) -> str:
        return job_name(self.project_id, self.region, job_id)

    def get_job(self, job_id: str, within: float | None = None):
        """One get_job of a job of this executor's (a task's or a pack's), transient errors retried."""
        return self.client.get_job(name=self.name(job_id), timeout=30, retry=self.retry(within))

    def get_task(self, placement: packing.Placement, within: float | None = None):
        return self.client.get_task(name=task_name(self.name(placement.pack_id), placement.index), timeout=30,
                                    retry=self.retry(within))

    def cancel(self, job_id: str) -> None:
        """Cancel the job of ``job_id``; an electron's task in a pack is left to its worker, which
        honours the marker (Batch cannot cancel one task), and the pack's job goes on."""
        if self.packs.placement(job_id).packed:
            return
        try:
            # A cancel applies once however often it is sent: transient errors are retried too.
            self.client.cancel_job(name=self.name(job_id), timeout=30, retry=self.retry())
        except exceptions.NotFound:
            app_log.debug(f"gcpbatch: cancel of {job_id}: no such job (yet); the marker stops its creation")
        except exceptions.FailedPrecondition as err:
            app_log.debug(f"gcpbatch: cancel of {job_id}: {err.message} (already over)")

    # -- what a read says -------------------------------------------------------------------------

    def reconcile(self, job_id: str, *, log_usage: bool = False, within: float | None = None) -> JobEvent | None:
        """One read of the job's state: a notification is overdue, or a terminal one is to be
        confirmed. None if the job does not exist. An electron of a pack reads its own task."""
        placement = self.packs.placement(job_id)
        if placement.packed:
            return self._reconcile_member(job_id, placement, within)
        try:
            job = self.get_job(job_id, within)
        except exceptions.NotFound:
            return self.store.not_created(job_id, within)
        state = JobState.of(job.status.state)
        if log_usage and state is JobState.SUCCEEDED:
            log_usage_of(job)
        app_log.debug(f"gcpbatch: reconciled {job_id}: {state.value}")
        if state in (JobState.QUEUED, JobState.SCHEDULED):
            return QueuedJob(job_id, state, "reconciled by get_job", capacity=capacity_events(job))
        return JobEvent(job_id, state, "reconciled by get_job")

    def _reconcile_member(self, job_id: str, placement: packing.Placement, within: float | None) -> JobEvent | None:
        """One get_task of the electron's task in its pack (None: the pack's job does not exist yet).
        Batch creates a job's tasks after the job, sometimes minutes after, and a job may end
        without ever having had them: a task not found is read from its pack's job."""
        try:
            task = self.get_task(placement, within)
        except exceptions.NotFound:
            return self._member_without_task(job_id, placement, within)
        event = member_event(job_id, state_name(task.status.state), "reconciled by get_task")
        app_log.debug(f"gcpbatch: reconciled {job_id} (task {placement.index} of {placement.pack_id}): "
                      f"{event.state.value if event else state_name(task.status.state)}")
        return event

    def _member_without_task(self, job_id: str, placement: packing.Placement, within: float | None) -> JobEvent | None:
        """The electron's task does not exist (yet): its pack's job says what that means. No job:
        not created (yet, or refused); a job still going: queued; a job over: the electron's end
        too (a job that ended without creating the task never ran it)."""
        try:
            job = self.get_job(placement.pack_id, within)
        except exceptions.NotFound:
            refused = self.store.not_created(placement.pack_id, within)
            return None if refused is None else JobEvent(job_id, refused.state, refused.detail)
        state = JobState.of(job.status.state)
        if not state.is_terminal:
            return QueuedJob(job_id, JobState.QUEUED, f"its pack's job {placement.pack_id} is {state.value}; its task is not "
                             "created yet", capacity=capacity_events(job))
        ended = JobState.FAILED if state is JobState.SUCCEEDED else state  # a job cannot succeed without it
        return JobEvent(job_id, ended, f"its pack's job {placement.pack_id} ended {state.value} without creating its task")

    def pack_running(self, job_id: str) -> bool:
        """Whether the electron's pack's job runs (some of its tasks do): read once, before an
        electron queued in it gives up."""
        pack_id = self.packs.placement(job_id).pack_id
        if pack_id is None:
            return False
        try:
            job = self.get_job(pack_id, self.min_retry_s)
        except exceptions.GoogleAPICallError as err:
            app_log.warning(f"gcpbatch: reading pack {pack_id} before giving up on {job_id}: {err.message}")
            return False
        return JobState.of(job.status.state) is JobState.RUNNING

    def why_unexecuted(self, placement: packing.Placement) -> str | None:
        """Why an electron's task in a pack never ran: None if the pack's job was cancelled, else
        the job's state and status events."""
        job = self.get_job(placement.pack_id)
        state = JobState.of(job.status.state)
        if state in (JobState.CANCELLED, JobState.CANCELLATION_IN_PROGRESS):
            return None
        log_usage_of(job)
        return f"task {placement.index} of Batch job {placement.pack_id} never ran: " + explain_job_failure(placement.pack_id, state, job)

    def run_exit_codes(self, job_id: str) -> tuple[int, ...]:
        """The exit codes of the runs of the electron's task, in order: its task's own status
        events, where Batch puts each run's ``task_execution`` (Nextflow PR #6498 reads them
        there). A job-level event repeats a run's code in its text, so the job's are not counted.
        () if the task does not exist (the job ended before creating it)."""
        placement = self.packs.placement(job_id)
        if not placement.packed:
            placement = packing.Placement(job_id, 0)  # a job of its own: its one task, index 0
        try:
            task = self.get_task(placement)
        except exceptions.NotFound:
            return ()
        return tuple(event.task_execution.exit_code for event in task.status.status_events if event.task_execution.exit_code)

    def ended_without_outcome(self, job_id: str, state: JobState) -> str:
        """Why a job (or a pack's task) ended without an error record (killed, preempted, out of
        memory, image pull...): Batch's status events, each exit code with its meaning."""
        placement = self.packs.placement(job_id)
        if placement.packed:
            try:
                task = self.get_task(placement)
            except exceptions.NotFound:  # the job ended without creating it (no VM to be had...)
                return self.why_unexecuted(placement) or f"task {placement.index} of Batch job {placement.pack_id} was cancelled"
            except exceptions.GoogleAPICallError as err:
                return (f"Batch task {task_name(self.name(placement.pack_id), placement.index)} ended {state.value} "
                        f"without a result or error record ({err.message})")
            return explain_job_failure(f"{placement.pack_id} task {placement.index}", state, task)
        try:
            job = self.get_job(job_id)
        except exceptions.GoogleAPICallError as err:
            return f"Batch job {job_id} ended {state.value} without a result or error record ({err.message})"
        log_usage_of(job)
        return explain_job_failure(job_id, state, job)


def usage_line(job) -> str:
    """The job's VM time and estimate (usage.py) as one line; "" when Batch's job says too little."""
    try:
        return usage.summary(usage.usage_of(job))
    except Exception as err:  # noqa: BLE001 - a report, never the task's outcome
        app_log.debug(f"gcpbatch: no usage for {job.name}: {err!r}")
        return ""


def log_usage_of(job) -> None:
    """The job's VM time and an on-demand estimate (usage.py), once, when it has ended."""
    line = usage_line(job)
    if line:
        app_log.info(f"gcpbatch: {line}")
