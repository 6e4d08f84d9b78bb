"""How one task waits for its Batch job: the decisions, without I/O and without a clock of its own.

The executor (gcpbatch.py) does the I/O: it listens for the next event for ``JobWait.timeout(now)``
seconds, reads the job when told to, asks Covalent about cancels, cancels jobs. Everything it
decides on, which bound applies, when a read is due, when to settle, when to give up and what to
say then, is here, so it is unit-tested with made-up times and events (tests/unit/test_waiting.py).

The phases and their bounds (``WaitPlan``):

* not yet seen (upload -> function -> job created): ``submit_timeout``;
* QUEUED/SCHEDULED (waiting for a VM; not counted against time_limit): ``queue_timeout``;
* RUNNING: ``(retries + 1) * (time_limit + RUN_GRACE_S)``: Batch re-runs a preempted task inside
  the job's RUNNING state with no job-level message, so every attempt gets its full time, plus a
  grace for a new VM, the worker's uploads and the notification.

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
import threading
from dataclasses import dataclass
from typing import Any

from .protocol import EXIT_CODE_MEANINGS, JobEvent, JobState, exit_code_of_event

#: After max run duration, the worker still uploads and Batch still publishes: allow for that.
RUN_GRACE_S = 120
#: ``JobWait.observe`` says this when the phase's bound has passed.
GIVE_UP = "give up"


@dataclass(frozen=True)
class WaitPlan:
    """How long each phase of a job may take (seconds)."""

    submit_timeout: float
    queue_timeout: float
    run_timeout: float
    reconcile_interval: float

    @classmethod
    def for_task(cls, *, submit_timeout: float, queue_timeout: float, time_limit: float, retries: int,
                 reconcile_interval: float) -> WaitPlan:
        return cls(
            submit_timeout=float(submit_timeout),
            queue_timeout=float(queue_timeout),
            run_timeout=float((retries + 1) * (time_limit + RUN_GRACE_S)),
            reconcile_interval=float(reconcile_interval),
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

    def observe(self, event: JobEvent | None, now: float) -> Outcome | str | None:
        """After an event or a read (None: no such job yet): an Outcome to settle with, GIVE_UP
        when the phase's bound has passed, or None to go on waiting."""
        if event is not None and event.state.is_terminal:
            return Outcome(event.state, event.detail)
        if event is not None and progressed(self.state, event.state):
            self.state = event.state
            self.phase_end = self.entered.setdefault(event.state, now) + self.plan.phase_bound(event.state)
            if self.listening:  # the job moved: reads go back to their first interval
                self.quiet = self.plan.reconcile_interval
            return None
        if now >= self.phase_end:
            return GIVE_UP
        return None


def give_up_reason(job_id: str, state: JobState | None, plan: WaitPlan, *, time_limit: int, retries: int) -> str:
    """Why the executor stopped waiting (it then cancels the job)."""
    if state is None:
        return (
            f"no Batch job {job_id} was created within submit_timeout={plan.submit_timeout:g} s of the upload: "
            "check the Cloud Function's logs and its storage trigger on the bucket"
        )
    if state is JobState.RUNNING:
        return (
            f"job {job_id} was still running {plan.run_timeout:g} s after it started: time_limit={time_limit} s "
            f"plus {RUN_GRACE_S} s for each of its {retries + 1} attempts (retries={retries})"
        )
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
