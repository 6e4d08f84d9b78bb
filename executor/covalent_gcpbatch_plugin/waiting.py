"""How one task waits for its Batch job: the decisions, without I/O and without a clock of its own.

The executor (gcpbatch.py) does the I/O: it listens for the next event for ``JobWait.timeout(now)``
seconds, reads the job when told to, asks Covalent about cancels, cancels jobs. Everything it
decides on, which bound applies, when a read is due, when to settle, when to give up and what to
say then, is here, so it is unit-tested with made-up times and events (tests/unit/test_waiting.py).

The phases and their bounds (``WaitPlan``):

* not yet seen (upload -> function -> job created): ``submit_timeout``;
* QUEUED/SCHEDULED (waiting for a VM; not counted against time_limit): ``queue_timeout``;
* RUNNING: ``(retries + 1) * (time_limit + attempt grace)``: Batch re-runs a preempted task inside
  the job's RUNNING state with no job-level message, so every attempt gets its full time, plus a
  grace that fits a new VM (``RUN_GRACE_S``: boot, image pull, the worker's uploads and the
  notification; ``GPU_DRIVERS_S`` more with GPUs).

An electron of a pack waits for its pack's job, then for its own task: with fewer VMs than tasks
(``pack_parallelism``) its task waits its turn. So its QUEUED bound restarts, once, when its pack
starts making progress (the pack's job RUNNING), and then also counts the waves of tasks ahead of
it (``WaitPlan.pack_wait``).

Within a phase, silence longer than ``reconcile_interval`` triggers one ``get_job``, the interval
doubling each time, so a long quiet job costs O(log(time_limit)) reads, not a poll. When a
phase's bound passes and Batch confirms the job is still not done, the job is cancelled and the
task fails with ``give_up_reason``.

Bounds cannot be stretched: anyone whose job may publish on the topic can send messages, and
Batch itself repeats and reorders them. A phase's bound runs from the first time the wait entered
it, and only a message that moves the job forward (QUEUED -> SCHEDULED -> RUNNING) changes the
phase or resets the read interval; duplicates, late or unknown states (STATE_UNSPECIFIED, ...)
change neither.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass
from typing import Any

from .protocol import EXIT_CODE_MEANINGS, JobEvent, JobState, TaskEvent, exit_code_of_event

#: A retried attempt runs on a new VM. Public figures: SCHEDULED -> RUNNING 68-127 s (Nextflow
#: #4225, Cromwell's logs, Google's sample), an image pull 1-2.5 min (Nextflow PR #6836); after the
#: attempt the worker uploads its outcome and Batch publishes (a minute at most).
NEW_VM_S = 130
IMAGE_PULL_S = 150
OUTCOME_S = 60
#: Every attempt's allowance beyond time_limit (read at plan time: tests may shorten it).
RUN_GRACE_S = NEW_VM_S + IMAGE_PULL_S + OUTCOME_S
#: GPU VMs install their drivers before the task starts: "a few minutes" (dsub's provider docs).
GPU_DRIVERS_S = 300
#: While a job waits for a VM (QUEUED/SCHEDULED), its reads come this soon at the latest (then
#: doubling): Batch publishes no message for what keeps it there (quota, stockout), only status
#: events that a read sees, and a user waiting on a queue should hear of them within a minute.
CAPACITY_READ_S = 60
#: ``JobWait.observe`` says this when the phase's bound has passed.
GIVE_UP = "give up"


@dataclass(frozen=True)
class WaitPlan:
    """How long each phase of a job may take (seconds)."""

    submit_timeout: float
    queue_timeout: float
    run_timeout: float
    reconcile_interval: float
    #: An electron of a pack: how long, once the pack runs, the tasks ahead of its own may take.
    packed: bool = False
    pack_wait: float = 0.0
    #: Batch's retries of the job (its attempts in RUNNING: ``retries + 1``).
    retries: int = 0

    @classmethod
    def for_task(cls, *, submit_timeout: float, queue_timeout: float, time_limit: float, retries: int,
                 reconcile_interval: float, gpus: bool = False, pack_index: int | None = None,
                 pack_parallelism: int = 0) -> WaitPlan:
        """``pack_index``: the electron's task index in its pack (None: a job of its own);
        ``pack_parallelism``: the pack's tasks running at once (0: all)."""
        attempt = time_limit + RUN_GRACE_S + (GPU_DRIVERS_S if gpus else 0)
        run_timeout = float((retries + 1) * attempt)
        waves_ahead = 0 if pack_index is None or pack_parallelism <= 0 else pack_index // pack_parallelism
        return cls(
            submit_timeout=float(submit_timeout),
            queue_timeout=float(queue_timeout),
            run_timeout=run_timeout,
            reconcile_interval=float(reconcile_interval),
            packed=pack_index is not None,
            pack_wait=waves_ahead * run_timeout,
            retries=retries,
        )

    def phase_bound(self, state: JobState | None) -> float:
        if state is None:
            return self.submit_timeout
        if state is JobState.RUNNING:
            return self.run_timeout
        return self.queue_timeout


@dataclass(frozen=True)
class Outcome:
    """How the wait ended: the job's terminal state, or the bound it gave up at."""

    state: JobState
    detail: str = ""
    gave_up: str = ""
    #: Where the wait gave up: the job's last state seen (None: never seen).
    phase: JobState | None = None
    #: The warm VM that ran the electron was lost before the electron's outcome was stored (its
    #: job's task failed or ended): an infrastructure failure Batch does not retry for it.
    lost_runner: str = ""


@dataclass(frozen=True)
class RunnerEvent:
    """A state change of the job of the warm VM running the electron (or offered it), routed to
    the electron: its VM was lost if the job's task failed or the job ended."""

    event: JobEvent | TaskEvent


#: After an offer's take_by, this long for the claim's RUNNING message before the job is asked for.
OFFER_GRACE_S = 2.0


@dataclass
class WarmWatch:
    """Who runs a warm-eligible electron, as the messages about it say: the VM it was offered to
    (and until when), and the runner that claimed it. A runner other than the electron's own job
    makes that job's events meaningless for it (its worker lost the claim and idles)."""

    offered_to: str = ""
    runner: str = ""
    #: Loop time at which an offer not yet claimed is given up for the electron's own job.
    cold_at: float | None = None
    cold_sent: bool = False
    #: The runner lost while it held the electron (its job's task failed or its job ended).
    lost: str = ""

    def offered(self, runner: str, take_by: float, *, wall: float, now: float) -> None:
        if self.runner or self.cold_sent:
            return
        self.offered_to = runner
        self.cold_at = now + max(0.0, take_by - wall) + OFFER_GRACE_S

    def claimed(self, runner: str) -> None:
        self.runner, self.cold_at = runner, None

    def cold_due(self, now: float) -> bool:
        return self.cold_at is not None and not self.runner and now >= self.cold_at

    def timeout(self, now: float, wait_timeout: float) -> float:
        if self.cold_at is None or self.runner:
            return wait_timeout
        return max(0.0, min(wait_timeout, self.cold_at - now))

    def sent_cold(self) -> None:
        self.cold_sent, self.cold_at = True, None

    def elsewhere(self, job_id: str) -> bool:
        """Whether the electron runs on another job's VM than its own ``job_id``."""
        return bool(self.runner) and self.runner != job_id


@dataclass(frozen=True)
class CancelRequested:
    """Put in a waiting task's inbox by ``cancel()`` (the marker is written, Batch asked)."""

    job_id: str


@dataclass(frozen=True)
class PackEvent:
    """A job-level event of the pack an electron runs in: a hint (the job exists, or has ended),
    not the electron's own outcome, which is its task's."""

    event: JobEvent


class Inboxes:
    """The inboxes (asyncio queues) of the tasks of this process that wait on a job, by job id.

    Items are put from any thread (the Pub/Sub callback, Covalent's cancel() on another executor
    instance) onto the waiting task's own event loop. Thread-safe; never blocks on I/O, so it is
    safe to call on the Covalent server's event loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inboxes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    def register(self, job_id: str, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue) -> None:
        with self._lock:
            self._inboxes[job_id] = (loop, inbox)

    def unregister(self, job_id: str) -> None:
        with self._lock:
            self._inboxes.pop(job_id, None)

    def put(self, job_id: str, item: Any) -> bool:
        """Hand ``item`` to the task waiting on ``job_id``; False if none does."""
        with self._lock:
            waiter = self._inboxes.get(job_id)
        if waiter is None:
            return False
        loop, inbox = waiter
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # that loop has closed: nobody waits any more
            self.unregister(job_id)
            return False
        return True


_ORDER = [JobState.QUEUED, JobState.SCHEDULED, JobState.RUNNING]


def progressed(old: JobState | None, new: JobState) -> bool:
    """Whether ``new`` moves a job in ``old`` forward: out-of-order duplicates (QUEUED after
    RUNNING), repeats and states outside the job's way to RUNNING never do."""
    if new not in _ORDER:
        return False
    return old is None or _ORDER.index(new) > _ORDER.index(old)


class JobWait:
    """The state of one task's wait. ``listening``: events are pushed (Pub/Sub) and a read is due
    only after ``reconcile_interval`` of silence (doubling); otherwise the job is read every
    ``poll_interval`` seconds."""

    def __init__(self, plan: WaitPlan, *, listening: bool, poll_interval: float, now: float) -> None:
        self.plan = plan
        self.listening = listening
        self.state: JobState | None = None
        #: When the wait first entered each phase (None: not seen yet); a bound runs from there.
        self.entered: dict[JobState | None, float] = {None: now}
        self.phase_end = now + plan.phase_bound(None)
        self.quiet = plan.reconcile_interval if listening else float(poll_interval)
        self.cancel_sent = False
        #: When the electron's pack was first seen making progress (None: not yet, or not packed).
        self.pack_progress: float | None = None

    def left(self, now: float) -> float:
        """What is left of the current phase's bound."""
        return max(0.0, self.phase_end - now)

    def timeout(self, now: float) -> float:
        """How long to listen for the next event before reading the job."""
        return max(0.0, min(self.quiet, self.phase_end - now))

    def silence(self) -> None:
        """Nothing came within ``timeout``: the executor reads the job once."""
        if self.listening:
            self.quiet *= 2  # each overdue read waits twice as long for the next

    def cancel_requested(self) -> Outcome | None:
        """``cancel()`` has marked the task and asked Batch. A job not seen yet is settled now (the
        marker stops its creation, or makes the function cancel it); a seen one reports CANCELLED."""
        self.cancel_sent = True
        if self.state is None:
            return Outcome(JobState.CANCELLED, "cancelled before its Batch job was seen")
        return None

    def awaits_pack(self) -> bool:
        """An electron of a pack, queued, whose pack was not yet seen making progress: before
        giving up on its queue bound, the executor asks whether the pack's job runs."""
        return self.plan.packed and self.pack_progress is None and self.state in (JobState.QUEUED, JobState.SCHEDULED)

    def pack_progressing(self, now: float) -> None:
        """The electron's pack runs (its job is RUNNING). A queued electron's bound restarts from
        here, once, counting the tasks ahead of it too; later news changes nothing."""
        if not self.plan.packed or self.pack_progress is not None:
            return
        self.pack_progress = now
        if self.state in (None, JobState.QUEUED, JobState.SCHEDULED):
            self.state = self.state or JobState.QUEUED
            self.entered.setdefault(self.state, now)
            self.phase_end = now + self.plan.pack_wait + self.plan.queue_timeout

    def observe(self, event: JobEvent | None, now: float) -> Outcome | str | None:
        """After an event or a read (None: no such job yet): an Outcome to settle with, GIVE_UP
        when the phase's bound has passed, or None to go on waiting."""
        if event is not None and event.state.is_terminal:
            return Outcome(event.state, event.detail)
        if event is not None and progressed(self.state, event.state):
            self.state = event.state
            self.phase_end = self.entered.setdefault(event.state, now) + self.plan.phase_bound(event.state)
            if self.pack_progress is not None and event.state is not JobState.RUNNING:
                self.phase_end = max(self.phase_end, self.pack_progress + self.plan.pack_wait + self.plan.queue_timeout)
            if self.listening:  # the job moved: reads go back to their first interval
                self.quiet = self.plan.reconcile_interval
                if event.state in (JobState.QUEUED, JobState.SCHEDULED):
                    self.quiet = min(self.quiet, CAPACITY_READ_S)
            return None
        if now >= self.phase_end:
            return GIVE_UP
        return None


def give_up_reason(job_id: str, state: JobState | None, plan: WaitPlan, *, time_limit: int, retries: int,
                   pack_progress: bool = False, task_bucket: str = "") -> str:
    """Why the executor stopped waiting (it then cancels the job); ``task_bucket``: where the task
    object went."""
    if state is None:
        return (
            f"no Batch job {job_id} was created within submit_timeout={plan.submit_timeout:g} s of the upload: "
            f"check the Cloud Function's logs and that its storage trigger watches the task bucket"
            + (f" gs://{task_bucket} (task_bucket_name)" if task_bucket else "")
        )
    if state is JobState.RUNNING:
        grace = plan.run_timeout / (retries + 1) - time_limit
        return (
            f"job {job_id} was still running {plan.run_timeout:g} s after it started: time_limit={time_limit} s "
            f"plus {grace:g} s (a new VM, its image pull and the outcome's upload) for each of its {retries + 1} "
            f"attempts (retries={retries})"
        )
    if pack_progress:
        return (f"job {job_id} did not start within queue_timeout={plan.queue_timeout:g} s plus {plan.pack_wait:g} s "
                f"for the tasks ahead of it in its pack, counted from when the pack started running (state {state.value})")
    return f"job {job_id} did not start within queue_timeout={plan.queue_timeout:g} s (state {state.value})"


def explain_job_failure(job_id: str, state: JobState, job: Any) -> str:
    """Why a job ended without an error record: its status events, each exit code with its
    meaning (EXIT_CODE_MEANINGS). ``job`` is a ``batch_v1.Job``."""
    lines = []
    for event in job.status.status_events:
        code = exit_code_of_event(event)
        meaning = EXIT_CODE_MEANINGS.get(code, "")
        lines.append(f"{event.description}" + (f" [exit code {code}{': ' + meaning if meaning else ''}]" if code else ""))
    events = "; ".join(lines) or "no status events"
    return f"Batch job {job_id} ended {state.value} without a result or error record: {events}"


@dataclass(frozen=True)
class QueuedJob(JobEvent):
    """A read of a job waiting for a VM, with what Batch said about placing it: the text of its
    OPERATIONAL_INFO status events (quota, stockout, impossible requests), oldest first."""

    capacity: tuple[str, ...] = ()


#: Batch's status event type for what it meets placing a job's VMs; the texts name Compute
#: Engine's error codes (CODE_GCE_QUOTA_EXCEEDED, CODE_GCE_ZONE_RESOURCE_POOL_EXHAUSTED: Nextflow
#: PR #3066; local/batch/faults.py CAPACITY_EVENTS has real examples).
OPERATIONAL_INFO = "OPERATIONAL_INFO"
_QUOTA = re.compile(r"Quota '([A-Z0-9_]+)' exceeded\.\s+Limit: ([0-9.]+)")


def capacity_events(job: Any) -> tuple[str, ...]:
    """The texts of a ``batch_v1.Job``'s events about placing its VMs, oldest first."""
    return tuple(event.description for event in job.status.status_events
                 if event.type_ == OPERATIONAL_INFO or "Batch Error: code - " in (event.description or ""))


def never_placeable(text: str, *, vcpus: float, gpus: int) -> bool:
    """Whether Batch's event says the job can never get its VM: an error Batch calls
    non-retryable, or a quota whose limit is below what one VM of the job needs (a limit of 0, or
    fewer CPUs or GPUs than the task asks for) and which no waiting raises."""
    if "non-retryable" in text:
        return True
    quota = _QUOTA.search(text)
    if quota is None:
        return False
    name, limit = quota.group(1), float(quota.group(2))
    if limit == 0:
        return True
    if name.endswith("GPUS"):
        return gpus > limit
    return name.endswith("CPUS") and vcpus > limit
