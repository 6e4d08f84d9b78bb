"""An electron's life as a sequence of attempts: what one attempt's end means. Pure, no I/O.

An attempt is one Batch job (or one task of a pack) with its own job id and objects. Batch itself
re-runs a task inside its job after an infrastructure failure (``retries``: preemption, VM loss);
some ends call for a new job on other terms instead, which only the executor can make:

* **spot fallback** (``spot_fallback = N``): a SPOT attempt whose job ended preempted N times, or
  whose queue wait passed ``spot_wait_s`` without a VM, is followed by a STANDARD one;
* **a lost warm VM**: an electron running on another job's warm VM (protocol/warm.py) whose VM
  was lost before the electron's outcome was stored runs again as a new attempt;
* **out of memory, then more memory** (``memory_retry_factor``): an attempt that ended out of
  memory (exit code 137, or the task's own MemoryError) is followed by one with ``memory`` times
  the factor.

Every new attempt, like every Batch retry, spends the electron's ``retries``: an electron runs at
most ``retries + 1`` times in all, so its bounds, its cost and its cancel span a known number of
jobs. Anything else settles the electron with the attempt's own outcome (result, error record,
cancel, refusal, the wait's give-up), which the executor then reads (gcpbatch.py ``_collect``).

The executor does the I/O (gcpbatch.py: the wait, the reads of the outcome and of the job's status
events); tests/unit/test_attempt_rules.py checks the decisions as a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .protocol import RETRIED_EXIT_CODES, JobState, exceeded_cap

#: Batch's exit code of a task whose Spot VM was preempted (../shared/notes/platform.md).
EXIT_PREEMPTED = 50001
#: A container killed by SIGKILL: on Batch the kernel's OOM killer is the usual cause (a task over
#: its memory_mib); Batch reports it as the task's exit code (128 + 9).
EXIT_KILLED = 137
#: The worker's error record of a task that ran out of memory inside Python.
MEMORY_ERROR = "MemoryError"


@dataclass(frozen=True)
class Terms:
    """What an attempt runs with: the parts of the job spec that may change between attempts."""

    provisioning: str
    memory_mb: int
    #: Batch's retries of this attempt's job (its task's max_retry_count).
    retries: int


@dataclass(frozen=True)
class Policy:
    """The electron's settings that decide on new attempts (settings.py: ``retries``,
    ``spot_fallback``, ``spot_wait_s``, ``memory_retry_factor``)."""

    retries: int
    spot_fallback: int = 0
    spot_wait_s: float = 0.0
    memory_retry_factor: float = 0.0

    def first(self, provisioning: str, memory_mb: int) -> Terms:
        """The first attempt's terms. A SPOT attempt that may fall back is let Batch retry at most
        ``spot_fallback - 1`` preemptions itself, so its job ends at the N-th and the next
        attempt can run on a standard VM."""
        retries = self.retries
        if provisioning == "SPOT" and self.spot_fallback:
            retries = min(retries, self.spot_fallback - 1)
        return Terms(provisioning, memory_mb, retries)

    def queue_bound(self, terms: Terms, queue_timeout: float) -> float:
        """How long the attempt may wait for a VM: a SPOT one that may fall back waits
        ``spot_wait_s`` at most, then makes way for a standard one."""
        if self.falls_back(terms) and self.spot_wait_s:
            return min(queue_timeout, self.spot_wait_s)
        return queue_timeout

    def falls_back(self, terms: Terms) -> bool:
        return terms.provisioning == "SPOT" and self.spot_fallback > 0


@dataclass(frozen=True)
class AttemptEnd:
    """What the executor saw of one attempt's end."""

    state: JobState
    #: The wait gave up at a bound (this is why); ``queued``: the job never got a VM.
    gave_up: str = ""
    queued: bool = False
    cancelled: bool = False
    has_result: bool = False
    #: The type of the worker's error record (the task's own exception), if it stored one.
    error_type: str | None = None
    #: The exit codes of the attempt's runs, in order, from Batch's status events.
    exit_codes: tuple[int, ...] = ()
    #: The warm VM running the electron was lost before its outcome was stored (waiting.Outcome.lost_runner).
    lost_runner: str = ""
    #: The memory the attempt asked for, and the function's refusal of it (REJECTED), if any.
    memory_mb: int = 0
    refusal: str = ""


@dataclass(frozen=True)
class Settle:
    """The attempt's own outcome is the electron's."""


@dataclass(frozen=True)
class NextAttempt:
    """Run the electron again as a new job on ``terms``; ``why`` goes to the node's log."""

    terms: Terms
    why: str


Decision = Settle | NextAttempt
SETTLE = Settle()


def runs_of(end: AttemptEnd) -> int:
    """How many times the attempt's task ran: each Batch retry left an infrastructure exit code; a
    refused attempt never ran."""
    if end.state is JobState.REJECTED:
        return 0
    retried = sum(1 for code in end.exit_codes if code in RETRIED_EXIT_CODES)
    return max(1, retried + (0 if end.exit_codes and end.exit_codes[-1] in RETRIED_EXIT_CODES else 1))


def out_of_memory(end: AttemptEnd) -> bool:
    if end.error_type == MEMORY_ERROR:
        return True
    return end.error_type is None and not end.has_result and bool(end.exit_codes) and end.exit_codes[-1] == EXIT_KILLED


def decide(end: AttemptEnd, terms: Terms, history: Sequence[AttemptEnd], policy: Policy) -> Decision:
    """What the attempt's end means for the electron. ``history``: the attempts before this one."""
    if end.state is JobState.REJECTED:
        return _up_to_the_cap(end, terms, history, policy)
    if end.has_result or end.cancelled or end.state in (JobState.SUCCEEDED, JobState.CANCELLED):
        return SETTLE
    used = sum(runs_of(past) for past in history) + runs_of(end)  # runs so far, this attempt's included
    left = policy.retries + 1 - used  # runs still allowed
    if left <= 0:
        return SETTLE
    if end.lost_runner and not end.gave_up:
        # Batch retries a lost VM's task for the job's own electron only; one it was lent is the executor's to retry.
        return NextAttempt(replace(terms, retries=min(terms.retries, left - 1)),
                           f"the warm VM of Batch job {end.lost_runner} was lost while it ran the electron: it runs again "
                           f"(retries={policy.retries})")
    if policy.falls_back(terms):
        standard = replace(terms, provisioning="STANDARD", retries=left - 1)
        if end.gave_up and end.queued:
            return NextAttempt(standard, f"no Spot VM within spot_wait_s={policy.spot_wait_s:g} s (or one Batch said it "
                                         "cannot place): the next attempt runs on a standard VM")
        preempted = sum(1 for code in end.exit_codes if code == EXIT_PREEMPTED)
        if not end.gave_up and end.exit_codes and end.exit_codes[-1] == EXIT_PREEMPTED and preempted >= policy.spot_fallback:
            return NextAttempt(standard, f"preempted {preempted} time(s) (spot_fallback={policy.spot_fallback}): the next "
                                         "attempt runs on a standard VM")
    if policy.memory_retry_factor and not end.gave_up and out_of_memory(end):
        memory = math.ceil(terms.memory_mb * policy.memory_retry_factor)
        retries = min(left - 1, policy.first(terms.provisioning, memory).retries)
        return NextAttempt(replace(terms, memory_mb=memory, retries=retries),
                           f"out of memory with memory={terms.memory_mb} MiB: the next attempt has {memory} MiB "
                           f"(memory_retry_factor={policy.memory_retry_factor:g})")
    return SETTLE


def _up_to_the_cap(end: AttemptEnd, terms: Terms, history: Sequence[AttemptEnd], policy: Policy) -> Decision:
    """A memory retry the deployment refused for its memory cap runs with the cap itself, when the
    cap is still more than the attempt that ran out had: "more memory, up to the deployment's cap".
    Any other refusal is the electron's end."""
    cap = exceeded_cap(end.refusal, "memory")
    if not (policy.memory_retry_factor and history and out_of_memory(history[-1]) and cap is not None):
        return SETTLE
    memory = int(cap)
    if not history[-1].memory_mb < memory < terms.memory_mb:
        return SETTLE
    return NextAttempt(replace(terms, memory_mb=memory),
                       f"memory={terms.memory_mb} MiB is over the deployment's cap: the next attempt has the cap, {memory} MiB")


def describe(terms: Terms) -> str:
    return f"{terms.provisioning}, {terms.memory_mb} MiB"
