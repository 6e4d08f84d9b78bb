"""The local Batch service's injected failures (``POST /_admin/faults``): what the fault tests
switch on to make the imitation fail the way real Batch and real VMs do."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from google.cloud import batch_v1

from .model import State

T = TypeVar("T")

#: The OPERATIONAL_INFO texts real Batch writes for a job it cannot place, to use with
#: ``no_capacity``. Quota: Nextflow printed it as "Batch job cannot be run: VM in Managed Instance
#: Group meets error: Batch Error: code - CODE_GCE_QUOTA_EXCEEDED, description - error count is 4,
#: latest message example: Instance '...' creation failed: Quota 'N2_CPUS' exceeded.  Limit: 24.0
#: in region us-central1" (a user's log, amnahsiddiqa/cloud_nfcore_pipelines; the check is
#: Nextflow PR #3066). Stockout: Compute Engine's ZONE_RESOURCE_POOL_EXHAUSTED message ("A
#: e2-standard-2 VM instance is currently unavailable in the europe-west4-a zone...",
#: GoogleCloudPlatform/ai-on-gke #849) under Batch's CODE_GCE_ZONE_RESOURCE_POOL_EXHAUSTED.
CAPACITY_EVENTS = {
    "quota": ("VM in Managed Instance Group meets error: Batch Error: code - CODE_GCE_QUOTA_EXCEEDED, description - "
              "error count is 4, latest message example: Instance 'job-group0-0-abcd' creation failed: Quota "
              "'{quota}' exceeded.  Limit: {limit} in region {region}"),
    "stockout": ("VM in Managed Instance Group meets error: Batch Error: code - CODE_GCE_ZONE_RESOURCE_POOL_EXHAUSTED, "
                 "description - error count is 3, latest message example: A {machine} VM instance is currently "
                 "unavailable in the {zone} zone. Alternatively, you can try your request again with a different VM "
                 "hardware configuration or at a later time."),
}

@dataclass
class Faults:
    """Injected failures; keys of the per-job maps are job ids or ``*`` (any job)."""

    preempt: dict[str, int] = field(default_factory=dict)
    #: One-shot: the next attempt of the job is preempted this many seconds after it starts (a
    #: spot VM reclaimed late in the task), so a retry has to run the task again in full.
    preempt_after_s: dict[str, float] = field(default_factory=dict)
    #: Attempts whose VM is preempted right after their worker's process ended (its outcome
    #: stored, the attempt not recorded): Batch retries, and the next attempt finds the outcome.
    preempt_after_exit: dict[str, int] = field(default_factory=dict)
    #: One-shot: the job fails when it is scheduled, with this text in its status event (as real
    #: Batch words it: "No zone supports all of the provided instance templates", Nextflow #5550),
    #: none of its tasks started.
    fail_scheduling: dict[str, str] = field(default_factory=dict)
    #: Standing: jobs of a provisioning model (``SPOT``, ``STANDARD``...) or job id (or ``*``) get
    #: no VM while set: they stay SCHEDULED with this text as an OPERATIONAL_INFO status event, as
    #: Batch keeps a job it cannot place (quota, stockout) and says why (see CAPACITY_EVENTS).
    no_capacity: dict[str, str] = field(default_factory=dict)
    #: One-shot: the job's tasks are created this many seconds after it is SCHEDULED (not at
    #: once): until then get_task answers NOT_FOUND, as Batch's may for minutes (Nextflow #5422).
    tasks_after_s: dict[str, float] = field(default_factory=dict)
    #: A retried attempt's end is published as a FAILED task message (the task then runs again).
    #: Whether Batch publishes those is not documented: tests make the executor right either way.
    notify_retried_attempts: bool = False
    fail_create: int = 0
    fail_create_status: int = 503
    #: create_job calls that commit the job (it is QUEUED and runs) and then answer
    #: ``fail_create_after_commit_status``: a lost acknowledgement, a retry meets 409 ALREADY_EXISTS.
    fail_create_after_commit: int = 0
    fail_create_after_commit_status: int = 503
    #: Reads (get_job and get_task, which share Batch's read quota) that fail with
    #: ``fail_get_status``: a reconcile or confirmation read that errors (429: the quota).
    fail_get: int = 0
    fail_get_status: int = 403
    drop_notifications: dict[str, set[str]] = field(default_factory=dict)
    #: Task-level messages not published: job id (or ``*``) -> task states, for every task of the job.
    drop_task_notifications: dict[str, set[str]] = field(default_factory=dict)
    duplicate_notifications: bool = False
    #: While > 0, each notification is published after its own delay drawn uniformly from
    #: [0, this many seconds]: late and out of order, as Pub/Sub may deliver them.
    delay_notifications_s: float = 0.0
    #: An action, not a standing fault: SIGKILL this many running workers now (``LocalBatch``
    #: takes it as soon as it is posted, so it reads 0 afterwards).
    kill_running: int = 0

    def update(self, body: Mapping) -> None:
        """Apply ``POST /_admin/faults``; raises ValueError on a malformed body."""
        known = {"preempt", "preempt_after_s", "preempt_after_exit", "fail_scheduling", "no_capacity", "tasks_after_s",
                 "notify_retried_attempts", "fail_create", "fail_create_status", "fail_get", "fail_get_status",
                 "fail_create_after_commit", "fail_create_after_commit_status", "drop_notifications",
                 "drop_task_notifications", "duplicate_notifications", "delay_notifications_s", "kill_running"}
        unknown = set(body) - known
        if unknown:
            raise ValueError(f"unknown faults: {', '.join(sorted(unknown))}")
        for job, count in dict(body.get("preempt", {})).items():
            self.preempt[str(job)] = int(count)
        for job, reason in dict(body.get("fail_scheduling", {})).items():
            self.fail_scheduling[str(job)] = str(reason)
        if "no_capacity" in body:  # the whole map: {} gives every held job its VMs
            self.no_capacity = {str(key): str(text) for key, text in dict(body["no_capacity"]).items()}
        for job, count in dict(body.get("preempt_after_exit", {})).items():
            self.preempt_after_exit[str(job)] = int(count)
        for name in ("preempt_after_s", "tasks_after_s"):
            for job, seconds in dict(body.get(name, {})).items():
                if float(seconds) < 0:
                    raise ValueError(f"{name} values are seconds >= 0")
                getattr(self, name)[str(job)] = float(seconds)
        for kind in ("create", "create_after_commit", "get"):
            if f"fail_{kind}" in body:
                setattr(self, f"fail_{kind}", int(body[f"fail_{kind}"]))
            if f"fail_{kind}_status" in body:
                status = int(body[f"fail_{kind}_status"])
                if not 400 <= status <= 599:
                    raise ValueError(f"fail_{kind}_status must be an HTTP error status")
                setattr(self, f"fail_{kind}_status", status)
        for job, states in dict(body.get("drop_notifications", {})).items():
            self.drop_notifications[str(job)] = {State[s].name for s in states}
        for job, states in dict(body.get("drop_task_notifications", {})).items():
            self.drop_task_notifications[str(job)] = {batch_v1.TaskStatus.State[s].name for s in states}
        for name in ("duplicate_notifications", "notify_retried_attempts"):
            if name in body:
                setattr(self, name, bool(body[name]))
        if "delay_notifications_s" in body:
            delay = float(body["delay_notifications_s"])
            if not (math.isfinite(delay) and delay >= 0):
                raise ValueError("delay_notifications_s is seconds >= 0")
            self.delay_notifications_s = delay
        if "kill_running" in body:
            count = int(body["kill_running"])
            if count < 0:
                raise ValueError("kill_running is a count >= 0")
            self.kill_running = count

    def take_preempt(self, job_id: str) -> bool:
        return _take_count(self.preempt, job_id)

    def take_preempt_after_exit(self, job_id: str) -> bool:
        return _take_count(self.preempt_after_exit, job_id)

    def take_fail_scheduling(self, job_id: str) -> str | None:
        return _take_once(self.fail_scheduling, job_id)

    def capacity_problem(self, job_id: str, provisioning: str) -> str | None:
        """Why the job gets no VM now (None: it may have one)."""
        for key in (job_id, provisioning, "*"):
            if key in self.no_capacity:
                return self.no_capacity[key]
        return None

    def take_preempt_after(self, job_id: str) -> float | None:
        return _take_once(self.preempt_after_s, job_id)

    def take_tasks_after(self, job_id: str) -> float | None:
        return _take_once(self.tasks_after_s, job_id)

    def take_fail_create(self) -> int | None:
        if self.fail_create > 0:
            self.fail_create -= 1
            return self.fail_create_status
        return None

    def take_fail_create_after_commit(self) -> int | None:
        if self.fail_create_after_commit > 0:
            self.fail_create_after_commit -= 1
            return self.fail_create_after_commit_status
        return None

    def take_kill_running(self) -> int:
        count, self.kill_running = self.kill_running, 0
        return count

    def take_fail_get(self) -> int | None:
        if self.fail_get > 0:
            self.fail_get -= 1
            return self.fail_get_status
        return None

    def drops(self, job_id: str, state: str) -> bool:
        return any(state in self.drop_notifications.get(key, ()) for key in (job_id, "*"))

    def drops_task(self, job_id: str, state: str) -> bool:
        return any(state in self.drop_task_notifications.get(key, ()) for key in (job_id, "*"))

    def to_json(self) -> dict:
        return {"preempt": self.preempt, "preempt_after_s": self.preempt_after_s,
                "preempt_after_exit": self.preempt_after_exit, "fail_scheduling": self.fail_scheduling,
                "no_capacity": self.no_capacity,
                "tasks_after_s": self.tasks_after_s, "notify_retried_attempts": self.notify_retried_attempts,
                "fail_create": self.fail_create, "fail_create_status": self.fail_create_status,
                "fail_create_after_commit": self.fail_create_after_commit,
                "fail_create_after_commit_status": self.fail_create_after_commit_status,
                "fail_get": self.fail_get, "fail_get_status": self.fail_get_status,
                "drop_notifications": {k: sorted(v) for k, v in self.drop_notifications.items()},
                "drop_task_notifications": {k: sorted(v) for k, v in self.drop_task_notifications.items()},
                "duplicate_notifications": self.duplicate_notifications,
                "delay_notifications_s": self.delay_notifications_s, "kill_running": self.kill_running}


def _take_count(counts: dict[str, int], job_id: str) -> bool:
    """One use of a counted fault for the job (its own entry first, then ``*``)."""
    for key in (job_id, "*"):
        if counts.get(key, 0) > 0:
            counts[key] -= 1
            return True
    return False


def _take_once(values: dict[str, T], job_id: str) -> T | None:
    """A one-shot fault's value for the job (its own entry first, then ``*``), removed as it is used."""
    for key in (job_id, "*"):
        if key in values:
            return values.pop(key)
    return None
