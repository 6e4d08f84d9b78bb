"""The local Batch service's job engine: state machine, scheduling, process running, retries.

A job's container is emulated by a host process (there is no Docker engine): the worker command
runs in its own session (so its whole process group can be killed), in a fresh directory per
attempt under ``<state dir>/jobs/<job id>/attempt-<n>/``, with stdout and stderr in
``attempt-<n>.log`` beside it. ``LocalBatch`` keeps every job under one lock; the HTTP layer
(``service``) maps requests onto its methods. The decisions are pure functions in ``model``,
the injected failures are ``faults``.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from google.cloud import batch_v1

from ... import protocol
from .faults import Faults
from .latency import Admission, LatencyModel, VmLedger
from .task_io import LocalMounts, TaskSetupError, make_writable, resolve_secrets
from .model import (
    DEFAULT_WORKER_COMMAND,
    EXIT_NOT_STARTED,
    EXIT_PREEMPTED,
    KILL_GRACE_S,
    TERMINAL_STATES,
    ApiError,
    Publish,
    State,
    Verdict,
    attempt_verdict,
    duration,
    exit_code_of,
    project_number,
    runnable_argv,
    task_environment,
    timestamp,
    validate_job,
)

log = logging.getLogger("covalent_gcpbatch_plugin.local.batch")
TaskState = batch_v1.TaskStatus.State
#: What a task still open becomes when its job is cancelled: one never started is UNEXECUTED
#: (Batch's meaning); one that was running ends FAILED, its process killed (an assumption: Batch
#: does not document it).
TASK_STATE_ON_CANCEL = {
    TaskState.PENDING: TaskState.UNEXECUTED,
    TaskState.ASSIGNED: TaskState.UNEXECUTED,
    TaskState.RUNNING: TaskState.FAILED,
}
#: list_tasks answers in pages (the client's pager follows next_page_token), as Batch's API does;
#: Batch does not document its default page size: 100 is an assumption.
LIST_TASKS_PAGE_SIZE = 100

#: The task's compute_resource.memory_mib is enforced as an address-space limit (RLIMIT_AS) on
#: the worker process, plus this allowance for what a real VM does not count against the task
#: (the interpreter, its libraries and thread stacks: a worker's address space is ~320 MiB idle).
MEMORY_ALLOWANCE_MIB = 1024


def limit_memory(pid: int, memory_mib: int) -> None:
    """Cap the worker's address space so a task over its memory budget gets MemoryError instead of
    exhausting the host. Best effort: a process that has already exited is left alone."""
    import resource

    if memory_mib <= 0:
        return
    limit = (memory_mib + MEMORY_ALLOWANCE_MIB) * 1024 * 1024
    try:
        resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
    except (ProcessLookupError, PermissionError, ValueError, OSError) as err:
        log.debug("cannot limit the memory of %s: %s", pid, err)


#: The VM sizes the local service reports when a job names no machine type: Batch then picks one
#: for the task's cpu_milli/memory_mib, "an e2 machine today" (a Batch engineer,
#: https://discuss.google.dev/t/batch-how-to-choose-machine-type/109594); which one is not
#: documented, so the smallest e2-standard that fits stands in for it.
_E2_STANDARD_VCPUS = (2, 4, 8, 16, 32)


def reported_instance(job: batch_v1.Job) -> batch_v1.JobStatus.InstanceStatus:
    """What real Batch reports of the VM it gives ``job`` (status.task_groups[...].instances[0]):
    the job's own machine type and provisioning model, or Batch's pick for the task's resources."""
    policy = job.allocation_policy.instances[0].policy if job.allocation_policy.instances else batch_v1.AllocationPolicy.InstancePolicy()
    group = job.task_groups[0] if job.task_groups else batch_v1.TaskGroup()
    machine = policy.machine_type
    if not machine:
        resources = group.task_spec.compute_resource
        cpus = (resources.cpu_milli or 2000) / 1000  # Batch's default cpuMilli is 2000
        mib = resources.memory_mib or 2000
        vcpus = next((n for n in _E2_STANDARD_VCPUS if n >= cpus and n * 4096 >= mib), _E2_STANDARD_VCPUS[-1])
        machine = f"e2-standard-{vcpus}"
    return batch_v1.JobStatus.InstanceStatus(
        machine_type=machine,
        provisioning_model=policy.provisioning_model or batch_v1.AllocationPolicy.ProvisioningModel.STANDARD,
        task_pack=group.task_count_per_node or 1, boot_disk=policy.boot_disk if "boot_disk" in policy else None)


def subscribed(job: batch_v1.Job, kind: batch_v1.JobNotification.Type, state) -> list[str]:
    """The topics of the job's notifications of ``kind`` that want ``state`` (all, or just it)."""
    topics = []
    for notification in job.notifications:
        message = notification.message
        wanted = message.new_job_state if kind == batch_v1.JobNotification.Type.JOB_STATE_CHANGED else message.new_task_state
        if message.type_ == kind and (not wanted or wanted == state):
            topics.append(notification.pubsub_topic)
    return topics


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> None:
    """SIGTERM the process's group now and SIGKILL it ``grace`` seconds later if still running."""
    _signal_group(proc.pid, signal.SIGTERM)

    def _kill() -> None:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)

    timer = threading.Timer(grace, _kill)
    timer.daemon = True
    timer.start()


Key = tuple[str, str, str]  # (project number, region, job id)

#: The calls (keys of ``stats["calls"]``) that change Batch: what "Batch mutations" counts.
MUTATING_CALLS = ("create", "cancel", "delete")


@dataclass
class Operation:
    """A cancel or delete, as Batch answers them: a long-running operation, not done at once."""

    name: str
    target: str
    verb: str
    done: Callable[[], bool]


@dataclass
class TaskRecord:
    """One task of a job: its state (get_task, list_tasks), its names, its running process."""

    index: int
    task: batch_v1.Task
    number_name: str  # .../jobs/<id>/taskGroups/group0/tasks/<index>, with the project NUMBER
    uid: str
    workdir: Path
    proc: subprocess.Popen | None = None
    proc_started: float = 0.0  # time.monotonic() when ``proc`` was set

    @property
    def state(self) -> TaskState:
        return TaskState(self.task.status.state)


@dataclass
class JobRecord:
    job: batch_v1.Job
    job_id: str
    key: Key
    number_name: str  # projects/<number>/locations/<region>/jobs/<id>, as notifications name it
    region: str
    workdir: Path
    stop: str | None = None  # "cancel", "delete" or "shutdown" once requested
    running_since: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    tasks: list[TaskRecord] = field(default_factory=list)
    #: Indices of the tasks no VM has taken yet, in order.
    pending: deque[int] = field(default_factory=deque)
    #: VMs the job may still start (its parallelism, less those started) and VMs alive now.
    vms_wanted: int = 0
    vms_live: int = 0
    #: The latency model's: when the job may leave QUEUED.
    admit_at: float = 0.0
    #: The no_capacity text the job was last held for (its status event was written once).
    held_for: str | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def state(self) -> State:
        return State(self.job.status.state)


class LocalBatch:
    """Jobs, their state machine and their processes. Every method is thread-safe."""

    def __init__(self, state_dir: Path, *, publish: Publish, worker_command: Sequence[str] = DEFAULT_WORKER_COMMAND,
                 max_running: int = 2, project_numbers: Mapping[str, str] | None = None,
                 base_env: Mapping[str, str] | None = None, model: LatencyModel | None = None,
                 secrets_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir)
        #: Secret Manager's stand-in (task_io): the values of the jobs' secret_variables.
        self.secrets_dir = Path(secrets_dir) if secrets_dir else None
        self.publish = publish
        self.worker_command = tuple(worker_command)
        self.max_running = max(1, max_running)
        self.project_numbers = dict(project_numbers or {})
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.hostname = socket.gethostname()
        self.lock = threading.RLock()
        self.jobs: dict[Key, JobRecord] = {}
        self.queue: deque[Key] = deque()
        self.running = 0
        self.closing = False
        self.calls: Counter[str] = Counter()  # by API method; MUTATING_CALLS are the writes
        #: create_job calls per job id, failed ones included: what a test waits on to know the
        #: function reached Batch for ITS task (the global counter moves with other tests' retries).
        self.create_attempts: Counter[str] = Counter()
        self.notices: Counter[str] = Counter()
        self.killed = 0  # worker processes killed by the kill_running action
        self.random = random.Random()  # the delays of delay_notifications_s
        self.state_times: dict[str, dict[str, float]] = {}
        self.faults = Faults()
        self.operations: dict[str, Operation] = {}
        self.model = model or LatencyModel()
        self.admission = Admission(self.model)
        self.vms = VmLedger(self.model)

    # -- API ------------------------------------------------------------------------------

    def key(self, project: str, region: str, job_id: str) -> Key:
        return (project_number(project, self.project_numbers), region, job_id)

    def create(self, project: str, region: str, job_id: str, job: batch_v1.Job) -> batch_v1.Job:
        with self.lock:
            self.calls["create"] += 1
            self.create_attempts[job_id] += 1
            failure = self.faults.take_fail_create()
            if failure is not None:
                raise ApiError(failure, "injected create_job failure (fault fail_create)")
            problem = validate_job(job_id, job)
            if problem:
                raise ApiError(400, problem)
            key = self.key(project, region, job_id)
            name = protocol.job_name(project, region, job_id)
            if key in self.jobs:
                raise ApiError(409, f"Resource '{name}' already exists")
            now = time.time()
            job = batch_v1.Job(job)
            job.name = name
            job.uid = f"j-{uuid.uuid4()}"
            job.create_time = job.update_time = timestamp(now)
            job.status = batch_v1.JobStatus()
            group = job.task_groups[0]
            group.name = f"{name}/taskGroups/group0"
            group.task_count = max(1, group.task_count)
            # Batch's default parallelism: min(task_count, its parallel-tasks-per-job limit).
            group.parallelism = min(group.parallelism or group.task_count, group.task_count, protocol.MAX_PARALLELISM)
            workdir = self.state_dir / "jobs" / job_id
            shutil.rmtree(workdir, ignore_errors=True)  # a deleted job of the same id
            workdir.mkdir(parents=True)
            record = JobRecord(job=job, job_id=job_id, key=key, region=region, workdir=workdir,
                               number_name=protocol.job_name(key[0], region, job_id))
            # No tasks yet: Batch creates them once it schedules the job (_create_tasks).
            self.jobs[key] = record
            self.state_times[job_id] = {}
            self._enter(record, State.QUEUED, at=now)
            created = batch_v1.Job(record.job)  # Batch answers a create with the QUEUED job
            record.admit_at = self.admission.admit_at(now)
            self.queue.append(key)
            if record.admit_at > now:
                timer = threading.Timer(record.admit_at - now, self._dispatch_when_due)
                timer.daemon = True
                timer.start()
            self._dispatch()
            failure = self.faults.take_fail_create_after_commit()
            if failure is not None:
                raise ApiError(failure, "injected create_job failure after the job was created "
                                        "(fault fail_create_after_commit)")
            return created

    def get(self, project: str, region: str, job_id: str) -> batch_v1.Job:
        with self.lock:
            self.calls["get"] += 1
            failure = self.faults.take_fail_get()
            if failure is not None:
                raise ApiError(failure, "injected get_job failure (fault fail_get)")
            return self._snapshot(self._find(project, region, job_id))

    def list(self, project: str, region: str, state_filter: State | None = None,
             labels: Mapping[str, str] | None = None) -> list[batch_v1.Job]:
        """The region's jobs in ``state_filter`` that carry all ``labels``, filtered here as Batch
        filters them server-side."""
        with self.lock:
            self.calls["list"] += 1
            number = project_number(project, self.project_numbers)
            return [self._snapshot(r) for (p, reg, _), r in self.jobs.items()
                    if p == number and reg == region and (state_filter is None or r.state == state_filter)
                    and all(r.job.labels.get(k) == v for k, v in (labels or {}).items())]

    def cancel(self, project: str, region: str, job_id: str) -> Operation:
        """Start cancelling the job; the operation is done once it is CANCELLED (or was terminal)."""
        with self.lock:
            self.calls["cancel"] += 1
            record = self._find(project, region, job_id)
            if record.state == State.QUEUED:
                self.queue.remove(self.key(project, region, job_id))
                self._enter(record, State.CANCELLATION_IN_PROGRESS)
                self._enter(record, State.CANCELLED)
            elif record.state not in TERMINAL_STATES and record.stop is None:
                self._stop(record, "cancel", State.CANCELLATION_IN_PROGRESS)
            return self._operation(record, "cancel", lambda: record.state in TERMINAL_STATES)

    def delete(self, project: str, region: str, job_id: str) -> Operation:
        """Start deleting the job (killing its task); the operation is done once it is gone."""
        with self.lock:
            self.calls["delete"] += 1
            key = self.key(project, region, job_id)
            record = self._find(project, region, job_id)
            if record.state == State.QUEUED or record.state in TERMINAL_STATES:
                if key in self.queue:
                    self.queue.remove(key)
                self._enter(record, State.DELETION_IN_PROGRESS)
                del self.jobs[key]
            elif record.stop != "delete":
                self._stop(record, "delete", State.DELETION_IN_PROGRESS)
            return self._operation(record, "delete", lambda: self.jobs.get(key) is not record)

    def _operation(self, record: JobRecord, verb: str, done: Callable[[], bool]) -> Operation:
        parent = record.job.name.split("/jobs/")[0]
        operation = Operation(name=f"{parent}/operations/operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}",
                              target=record.job.name, verb=verb, done=done)
        self.operations[operation.name] = operation
        return operation

    def operation(self, name: str) -> Operation:
        with self.lock:
            operation = self.operations.get(name)
            if operation is None:
                raise ApiError(404, f"Operation {name} not found")
            return operation

    def get_task(self, project: str, region: str, job_id: str, group: str, index: str) -> batch_v1.Task:
        with self.lock:
            self.calls["get_task"] += 1
            failure = self.faults.take_fail_get()
            if failure is not None:
                raise ApiError(failure, "injected get_task failure (fault fail_get)")
            record = self._find(project, region, job_id)
            if group != "group0" or not index.isdigit() or int(index) >= len(record.tasks):
                # Batch's words for a task not (yet) created (Nextflow #5422's log).
                raise ApiError(404, f'Resource "{record.number_name}/taskGroups/{group}/tasks/{index}" was not found')
            return batch_v1.Task(record.tasks[int(index)].task)

    def list_tasks(self, project: str, region: str, job_id: str, group: str, page_size: int = 0,
                   page_token: str = "") -> tuple[list[batch_v1.Task], str]:
        """One page of the group's tasks and the next page's token ("" after the last)."""
        with self.lock:
            self.calls["list_tasks"] += 1
            record = self._find(project, region, job_id)
            if group not in ("group0", "-"):
                raise ApiError(404, f"Task group {record.job.name}/taskGroups/{group} not found")
            if page_token and not page_token.isdigit():
                raise ApiError(400, f"invalid page token {page_token!r}")
            start = int(page_token or 0)
            size = page_size if page_size > 0 else LIST_TASKS_PAGE_SIZE
            tasks = [batch_v1.Task(t.task) for t in record.tasks[start:start + size]]
            following = start + size
            return tasks, str(following) if following < len(record.tasks) else ""

    def active(self) -> list[str]:
        with self.lock:
            return [r.job_id for r in self.jobs.values() if r.state not in TERMINAL_STATES]

    def stats(self) -> dict:
        with self.lock:
            return {
                "calls": {m: self.calls[m] for m in ("create", "get", "list", "cancel", "delete", "get_task", "list_tasks")},
                "create_attempts": dict(self.create_attempts),
                "jobs": {job_id: dict(times) for job_id, times in self.state_times.items()},
                "notifications": dict(self.notices),
                "killed": self.killed,
                "running": self.running,
                "queued": len(self.queue),
                "vms": self.vms.to_json(),
                "model": self.model.to_json(),
                "faults": self.faults.to_json(),
            }

    def set_faults(self, body: Mapping) -> None:
        with self.lock:
            updated = copy.deepcopy(self.faults)
            updated.update(body)  # raises on a malformed body, leaving the faults as they were
            kill = updated.take_kill_running()
            self.faults = updated
            self._kill_running(kill)
            self._dispatch()  # capacity may have come back (no_capacity lifted)

    def _kill_running(self, count: int) -> None:
        """SIGKILL the process groups of the ``count`` most recently started workers, as the OOM
        killer or a crash would (lock held): each attempt ends with exit code 137."""
        running = [t for r in self.jobs.values() if r.stop is None for t in r.tasks
                   if t.proc is not None and t.proc.returncode is None]
        running.sort(key=lambda t: t.proc_started, reverse=True)
        for task in running[:count]:
            _signal_group(task.proc.pid, signal.SIGKILL)
            self.killed += 1

    def reset(self) -> None:
        """Clear faults and counters; state times are kept for jobs that still exist."""
        with self.lock:
            self.faults = Faults()
            self.calls.clear()
            self.create_attempts.clear()
            self.notices.clear()
            self.killed = 0
            live = {r.job_id for r in self.jobs.values()}
            self.state_times = {k: v for k, v in self.state_times.items() if k in live}
            self._dispatch()  # jobs held by no_capacity get their VMs

    def shutdown(self, timeout: float = 5.0) -> None:
        """Kill every running job's process group (jobs keep their state) and start nothing more."""
        with self.lock:
            self.closing = True
            records = [r for r in self.jobs.values() if r.state not in TERMINAL_STATES and r.state != State.QUEUED]
            for record in records:
                record.stop = record.stop or "shutdown"
                record.stopping.set()
                for task in record.tasks:
                    if task.proc is not None:
                        _signal_group(task.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        for record in records:
            record.finished.wait(max(0.0, deadline - time.monotonic()))

    # -- state machine (call with the lock held) -------------------------------------------

    def _find(self, project: str, region: str, job_id: str) -> JobRecord:
        record = self.jobs.get(self.key(project, region, job_id))
        if record is None:
            raise ApiError(404, f"Job {protocol.job_name(project, region, job_id)} not found")
        return record

    def _snapshot(self, record: JobRecord) -> batch_v1.Job:
        job = batch_v1.Job(record.job)
        if record.running_since is not None and record.state not in TERMINAL_STATES:
            job.status.run_duration = duration(time.time() - record.running_since)
        return job

    def _enter(self, record: JobRecord, state: State, *, at: float | None = None, because: str = "") -> None:
        """Move the job to ``state``: a job-level status event (no task_execution, as Batch writes
        them; ``because`` is appended to its text) and the notifications. Its tasks move on their
        own (``_task_enter``), but a cancelled job's open tasks end with it."""
        now = time.time() if at is None else at
        status = record.job.status
        previous = State(status.state)
        status.state = state
        status.status_events.append(batch_v1.StatusEvent(
            type_="STATUS_CHANGED", event_time=timestamp(now),
            description=f"Job state is set from {previous.name} to {state.name} for job {record.job.name}.{because}"))
        record.job.update_time = timestamp(now)
        if state == State.RUNNING:
            record.running_since = now
        if state in TERMINAL_STATES and record.running_since is not None:
            status.run_duration = duration(now - record.running_since)
        if state == State.CANCELLED:
            for task in record.tasks:
                if task.state in TASK_STATE_ON_CANCEL:
                    self._task_enter(record, task, TASK_STATE_ON_CANCEL[task.state], now)
        if state == State.SCHEDULED:
            # Batch reports the VMs it allocates as typed fields, status.taskGroups.<id>.instances[]
            # (machineType, provisioningModel, taskPack, bootDisk: batch_v1 JobStatus.InstanceStatus;
            # the REST schema in googleapis' Batch v1 discovery document, InstanceStatus).
            status.task_groups = {"group0": batch_v1.JobStatus.TaskGroupStatus(instances=[reported_instance(record.job)])}
        if state in TERMINAL_STATES:
            counts = Counter(task.state.name for task in record.tasks)
            instances = list(status.task_groups["group0"].instances) if "group0" in status.task_groups else []
            status.task_groups = {"group0": batch_v1.JobStatus.TaskGroupStatus(counts=dict(counts), instances=instances)}
        self.state_times.setdefault(record.job_id, {})[state.name] = now
        self._notify(record, previous, state, now)

    def _task_enter(self, record: JobRecord, task: TaskRecord, state: TaskState, now: float,
                    execution: batch_v1.TaskExecution | None = None, description: str = "") -> None:
        """The task's own state (get_task) and its TASK_STATE_CHANGED notifications."""
        status = task.task.status
        previous = TaskState(status.state)
        status.state = state
        status.status_events.append(batch_v1.StatusEvent(
            type_="STATUS_CHANGED", event_time=timestamp(now), task_state=state, task_execution=execution,
            description=description or f"Task state is updated from {previous.name} to {state.name}."))
        self._notify_task(record, task, previous, state, now)

    def _notify_task(self, record: JobRecord, task: TaskRecord, previous: TaskState, state: TaskState, now: float) -> None:
        stamp = datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds")
        data, attributes = protocol.task_state_message(task.number_name, record.job.uid, task.uid, record.region,
                                                       previous.name, state.name, stamp)
        for topic in subscribed(record.job, batch_v1.JobNotification.Type.TASK_STATE_CHANGED, state):
            if self.faults.drops_task(record.job_id, state.name):
                self.notices["dropped"] += 1
                continue
            self._publish(topic, data, attributes)

    def _notify(self, record: JobRecord, previous: State, state: State, now: float) -> None:
        stamp = datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds")
        data, attributes = protocol.job_state_message(record.number_name, record.job.uid, record.region,
                                                      previous.name, state.name, stamp)
        for topic in subscribed(record.job, batch_v1.JobNotification.Type.JOB_STATE_CHANGED, state):
            if self.faults.drops(record.job_id, state.name):
                self.notices["dropped"] += 1
                continue
            for _ in range(2 if self.faults.duplicate_notifications else 1):
                self._publish(topic, data, attributes)

    def _publish(self, topic: str, data: bytes, attributes: dict[str, str]) -> None:
        """Publish now, or later by a random delay while delay_notifications_s is on (lock held)."""
        most = self.faults.delay_notifications_s
        if most <= 0:
            self.publish(topic, data, attributes)
            return
        self.notices["delayed"] += 1
        timer = threading.Timer(self.random.uniform(0, most), self._publish_late, args=(topic, data, attributes))
        timer.daemon = True
        timer.start()

    def _publish_late(self, topic: str, data: bytes, attributes: dict[str, str]) -> None:
        # Under the lock: shutdown sets closing under it before the service stops its publisher.
        with self.lock:
            if self.closing:
                self.notices["delayed_unsent"] += 1
                return
            try:
                self.publish(topic, data, attributes)
            except Exception as err:  # a timer thread: a traceback would only be noise
                log.warning("publishing a delayed notification to %s failed: %s", topic, err)

    def _task_text(self, record: JobRecord, exit_code: int, task_state: batch_v1.TaskStatus.State, note: str = "") -> str:
        """A task event's text as Batch words it (the VM's zone and instance in place of ours)."""
        return (f"Task state is updated from RUNNING to {task_state.name} on zones/{record.region}-local/instances/"
                f"{self.hostname} with exit code {exit_code}{note}.")

    def _task_event(self, record: JobRecord, task: TaskRecord, exit_code: int, task_state: batch_v1.TaskStatus.State,
                    note: str, *, retried: bool = False) -> None:
        """An attempt's end: among the job's events as text only, and in the task's own status
        (get_task) with its task_execution, where Batch keeps the exit code."""
        now, text = time.time(), self._task_text(record, exit_code, task_state, note)
        record.job.status.status_events.append(batch_v1.StatusEvent(
            type_="STATUS_CHANGED", event_time=timestamp(now), task_state=task_state, description=text))
        execution = batch_v1.TaskExecution(exit_code=exit_code)
        if retried:  # the task runs again: it stays RUNNING, the failed attempt is one of its events
            task.task.status.status_events.append(batch_v1.StatusEvent(
                type_="STATUS_CHANGED", event_time=timestamp(now), task_state=task_state, task_execution=execution,
                description=text))
            if self.faults.notify_retried_attempts:
                self.notices["retried_attempt"] += 1
                self._notify_task(record, task, TaskState.RUNNING, task_state, now)
        else:
            self._task_enter(record, task, task_state, now, execution, text)

    def _failed_because(self, record: JobRecord, index: int, exit_code: int) -> str:
        """The job-level FAILED event's tail, as real Batch writes it (see tests/support/fixtures)."""
        task = self._task_text(record, exit_code, batch_v1.TaskStatus.State.FAILED)
        return (f" Job failed due to task failure. Specifically, task with index {index} failed due to the following "
                f'task event: "{task}"')

    def _stop(self, record: JobRecord, reason: str, state: State) -> None:
        record.stop = reason
        record.stopping.set()
        self._enter(record, state)
        for task in record.tasks:
            if task.proc is not None:
                terminate(task.proc)
        if record.vms_live == 0:  # no VM to end it (scheduled, its tasks or a VM not there yet)
            self._finish(record)

    def _dispatch_when_due(self) -> None:
        with self.lock:
            self._dispatch()

    def _dispatch(self) -> None:
        """Start VMs while the host has room: first the further VMs of jobs already scheduled (up
        to their parallelism), then the next admitted job's first VM."""
        for record in list(self.jobs.values()):
            while (not self.closing and self.running < self.max_running and record.vms_wanted > 0
                   and record.stop is None and record.pending and not self._held(record)):
                self._start_vm(record)
        while not self.closing and self.queue and self.running < self.max_running:
            record = self.jobs.get(self.queue[0])
            if record is None or record.state != State.QUEUED:
                self.queue.popleft()
                continue
            if record.admit_at > time.time():
                break  # admitted in creation order: its timer dispatches it
            self.queue.popleft()
            record.vms_wanted = record.job.task_groups[0].parallelism
            self._enter(record, State.SCHEDULED)
            reason = self.faults.take_fail_scheduling(record.job_id)
            if reason is not None:
                self._fail_unscheduled(record, reason)
                continue
            delay = self.faults.take_tasks_after(record.job_id)
            if delay is None:
                self._create_tasks(record)
            else:
                timer = threading.Timer(delay, self._create_tasks_when_due, args=(record,))
                timer.daemon = True
                timer.start()
            while self.running < self.max_running and record.vms_wanted > 0 and record.pending and not self._held(record):
                self._start_vm(record)

    def _held(self, record: JobRecord) -> bool:
        """Whether the job can have no VM now (the no_capacity fault; lock held). The first time,
        Batch's OPERATIONAL_INFO status event says why; the job stays SCHEDULED, its tasks PENDING,
        until it is cancelled or the capacity comes (the fault is lifted: set_faults dispatches)."""
        policy = record.job.allocation_policy.instances[0].policy if record.job.allocation_policy.instances else None
        model = policy.provisioning_model.name if policy is not None and policy.provisioning_model else "STANDARD"
        reason = self.faults.capacity_problem(record.job_id, model)
        if reason is None:
            record.held_for = None
            return False
        if record.held_for != reason:
            record.held_for = reason
            record.job.status.status_events.append(batch_v1.StatusEvent(
                type_="OPERATIONAL_INFO", event_time=timestamp(time.time()), description=reason))
        return True

    def _create_tasks(self, record: JobRecord) -> None:
        """The job's tasks, PENDING (lock held). Batch creates them only once it schedules the job,
        and may take minutes more: before that get_task answers NOT_FOUND (Nextflow PR #5567,
        "initially the job might not have any tasks"; #5422); a job may even fail without ever
        having had tasks (#5550, ``_fail_unscheduled``)."""
        group = record.job.task_groups[0]
        for index in range(group.task_count):
            record.tasks.append(TaskRecord(
                index=index,
                task=batch_v1.Task(name=protocol.task_name(record.job.name, index),
                                   status=batch_v1.TaskStatus(state=TaskState.PENDING)),
                number_name=protocol.task_name(record.number_name, index),
                uid=f"{record.job.uid}-group0-{index}",
                # Task 0 keeps the job's directory (as before arrays); task i has task-<i>/.
                workdir=record.workdir if index == 0 else record.workdir / f"task-{index}",
            ))
        record.pending.extend(range(group.task_count))

    def _create_tasks_when_due(self, record: JobRecord) -> None:
        with self.lock:
            if record.stop is None and not self.closing and record.state == State.SCHEDULED and not record.tasks:
                self._create_tasks(record)
                self._dispatch()

    def _fail_unscheduled(self, record: JobRecord, reason: str) -> None:
        """No VM can be had for the job (lock held): SCHEDULED -> FAILED with ``reason`` in its
        status event, before any task was created, as Batch ends a job whose instance templates no
        zone supports (Nextflow #5550)."""
        record.vms_wanted = 0
        self._enter(record, State.FAILED, because=f" {reason}")
        record.finished.set()

    def _start_vm(self, record: JobRecord) -> None:
        """A new VM for the job, which takes its next pending task at once (ASSIGNED) and boots."""
        record.vms_wanted -= 1
        record.vms_live += 1
        self.running += 1
        self.vms.boot()
        first = self._take(record)
        threading.Thread(target=self._vm, args=(record, first), name=f"vm-{record.job_id}-{record.vms_live}",
                         daemon=True).start()

    def _take(self, record: JobRecord) -> TaskRecord | None:
        """The job's next pending task, now ASSIGNED to the calling VM (lock held)."""
        if not record.pending or record.stop is not None or self.closing:
            return None
        task = record.tasks[record.pending.popleft()]
        self._task_enter(record, task, TaskState.ASSIGNED, time.time())
        return task

    # -- running (one thread per VM) --------------------------------------------------------

    def _vm(self, record: JobRecord, task: TaskRecord | None) -> None:
        """A VM of the job: boot once, then run the job's pending tasks one after another (Batch
        reuses a job's VMs for its next tasks), until none is left or the job is stopped."""
        with self.lock:
            spec = batch_v1.TaskSpec(record.job.task_groups[0].task_spec)  # a copy: the job changes under the lock
        since = time.time()
        try:
            streaming = any(r.container.enable_image_streaming for r in spec.runnables)
            if record.stopping.wait(self.model.real(self.model.boot_seconds(image_streaming=streaming))):
                return  # stopped while its VM booted (finally: the state and the VM's bill)
            while task is not None:
                try:
                    self._run_task(record, task, spec)
                except Exception as err:  # a bug here must not leave the task RUNNING forever
                    log.exception("job %s task %s: runner failed", record.job_id, task.index)
                    with self.lock:
                        if record.stop is None and task.state not in (TaskState.SUCCEEDED, TaskState.FAILED):
                            self._task_event(record, task, EXIT_NOT_STARTED, TaskState.FAILED, f": {err}")
                with self.lock:
                    task = self._take(record)
        finally:
            with self.lock:
                self.vms.release(since, time.time())
                self.running -= 1
                record.vms_live -= 1
                if record.vms_live == 0 and (record.stop is not None or self.closing or not record.pending):
                    self._finish(record)
                self._dispatch()

    def _finish(self, record: JobRecord) -> None:
        """The job's last VM is gone: the job's terminal state from its tasks' (lock held)."""
        if record.stop == "cancel":
            self._enter(record, State.CANCELLED)
        elif record.stop == "delete":
            self.jobs.pop(record.key, None)
        elif record.stop is None and not self.closing:
            failed = [t for t in record.tasks if t.state != TaskState.SUCCEEDED]
            if not failed:
                self._enter(record, State.SUCCEEDED)
            else:
                first = failed[0]
                events = first.task.status.status_events
                code = events[-1].task_execution.exit_code if events and events[-1].task_execution else EXIT_NOT_STARTED
                self._enter(record, State.FAILED, because=self._failed_because(record, first.index, code))
        record.finished.set()

    def _run_task(self, record: JobRecord, task: TaskRecord, spec: batch_v1.TaskSpec) -> None:
        """One task, attempt after attempt, until it succeeds, fails for good or the job stops."""
        retries = 0
        while True:
            outcome = self._attempt(record, task, spec, retries)
            if outcome is None:
                return
            exit_code, why = outcome
            verdict = attempt_verdict(exit_code, retries, spec)
            with self.lock:
                if record.stop is not None:
                    return
                if verdict is Verdict.RETRY:
                    note = f"{why}; retrying (retry {retries + 1} of {spec.max_retry_count})"
                    self._task_event(record, task, exit_code, TaskState.FAILED, note, retried=True)
                else:
                    ok = verdict is Verdict.SUCCEEDED
                    self._task_event(record, task, exit_code, TaskState.SUCCEEDED if ok else TaskState.FAILED, why)
                    return
            retries += 1

    def _attempt(self, record: JobRecord, task: TaskRecord, spec: batch_v1.TaskSpec,
                 retries: int) -> tuple[int, str] | None:
        """Run the task's runnables once: (exit code, note for the status event), or None if the
        job was stopped (cancel, delete, shutdown)."""
        workdir = task.workdir / f"attempt-{retries}"
        workdir.mkdir(parents=True, exist_ok=True)
        with self.lock:
            if record.stop is not None or self.closing:
                return None
            if task.state != TaskState.RUNNING:
                self._task_enter(record, task, TaskState.RUNNING, time.time())
            if record.state == State.SCHEDULED:
                self._enter(record, State.RUNNING)
            preempt = self.faults.take_preempt(record.job_id)
            preempt_after = self.faults.take_preempt_after(record.job_id)
            preempt_after_exit = self.faults.take_preempt_after_exit(record.job_id)
        limit = spec.max_run_duration.total_seconds() if spec.max_run_duration else 0.0
        deadline = time.monotonic() + limit if limit > 0 else None
        count = len(record.tasks)
        log_path = task.workdir / f"attempt-{retries}.log"
        # What Batch does on the VM before the container starts: read the secrets, mount the
        # buckets (task_io); a secret or bucket it cannot have fails the attempt, named in its log.
        emulator = self.base_env.get("STORAGE_EMULATOR_HOST", "")
        try:
            secret_env = resolve_secrets(spec.environment.secret_variables, self.secrets_dir)
            mounts = LocalMounts.prepare(spec.volumes, workdir / ".mounts", emulator)
        except TaskSetupError as err:
            log_path.write_text(f"the task's VM could not be set up: {err}\n")
            return EXIT_NOT_STARTED, f": {err}"
        try:
            return self._run_runnables(record, task, spec, retries, workdir, log_path, deadline, count,
                                       {**secret_env, **mounts.environment()},
                                       preempt, preempt_after, preempt_after_exit, limit)
        finally:
            self._write_back(mounts, emulator, log_path)

    def _write_back(self, mounts: LocalMounts, emulator: str, log_path: Path) -> None:
        """What the task wrote into its read-write mounts, written back (gcsfuse writes on close):
        noted in the attempt's log, as are failures (the task's outcome stands)."""
        try:
            changed = mounts.write_back(emulator)
        except Exception as err:  # noqa: BLE001 - the emulator may be down: say so, go on
            changed = [f"writing back the task's mounts failed: {type(err).__name__}: {err}"]
        finally:
            for mount in mounts.mounts:
                make_writable(mount.local)
        if changed:
            with open(log_path, "a") as out:
                out.write("".join(f"local Batch service: mount write-back: {line}\n" for line in changed))

    def _run_runnables(self, record: JobRecord, task: TaskRecord, spec: batch_v1.TaskSpec, retries: int,
                       workdir: Path, log_path: Path, deadline: float | None, count: int, setup_env: dict[str, str],
                       preempt: bool, preempt_after: float | None, preempt_after_exit: bool,
                       limit: float) -> tuple[int, str] | None:
        with open(log_path, "wb") as out:
            for runnable in spec.runnables:
                argv = runnable_argv(runnable, self.worker_command)
                site_packages = workdir / ".task-site-packages"
                site_packages.mkdir(exist_ok=True)  # before start: Python skips a PYTHONPATH entry missing then
                env = task_environment(self.base_env, spec, runnable, retries, site_packages, home=workdir,
                                       index=task.index, count=count, job_uid=record.job.uid)
                try:
                    env.update(setup_env, **resolve_secrets(runnable.environment.secret_variables, self.secrets_dir))
                except TaskSetupError as err:
                    out.write(f"the task's VM could not be set up: {err}\n".encode())
                    return EXIT_NOT_STARTED, f": {err}"
                try:
                    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                except OSError as err:
                    out.write(f"cannot start {argv!r}: {err}\n".encode())
                    return EXIT_NOT_STARTED, f": cannot start {argv[0]!r}: {err.strerror}"
                limit_memory(proc.pid, spec.compute_resource.memory_mib if spec.compute_resource else 0)
                with self.lock:
                    task.proc, task.proc_started = proc, time.monotonic()
                    if record.stop is not None:
                        terminate(proc)
                try:
                    if preempt:
                        _signal_group(proc.pid, signal.SIGKILL)
                        proc.wait()
                        return EXIT_PREEMPTED, ": the VM was preempted (injected fault)"
                    preempt_at = None if preempt_after is None else time.monotonic() + preempt_after
                    ends = [t for t in (deadline, preempt_at) if t is not None]
                    try:
                        returncode = proc.wait(max(0.0, min(ends) - time.monotonic()) if ends else None)
                    except subprocess.TimeoutExpired:
                        if preempt_at is not None and (deadline is None or preempt_at < deadline):
                            _signal_group(proc.pid, signal.SIGKILL)  # a reclaimed VM gives no grace
                            proc.wait()
                            return EXIT_PREEMPTED, f": the VM was preempted after {preempt_after:g}s (injected fault)"
                        terminate(proc)
                        proc.wait()
                        return (protocol.EXIT_MAX_RUN_DURATION,
                                f": the task exceeded its max run duration of {limit:g}s and was killed")
                finally:
                    _signal_group(proc.pid, signal.SIGKILL)  # what a container's exit does to stragglers
                    with self.lock:
                        task.proc = None
                if record.stop is not None:
                    return None
                exit_code = exit_code_of(returncode)
                if preempt_after_exit:
                    # The VM went after the worker's last write, before Batch recorded the attempt.
                    return EXIT_PREEMPTED, ": the VM was preempted as its task ended (injected fault)"
                if exit_code != 0 and not runnable.ignore_exit_status:
                    return exit_code, ""
        return 0, ""
