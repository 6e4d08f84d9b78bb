"""attempts.py: what an attempt's end means for its electron, as a table (like test_waiting.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from covalent_gcpbatch_plugin.attempts import (
    EXIT_KILLED,
    EXIT_PREEMPTED,
    SETTLE,
    AttemptEnd,
    NextAttempt,
    Policy,
    Terms,
    decide,
    runs_of,
)
from covalent_gcpbatch_plugin.protocol import JobState, cap_exceeded

OFF = Policy(retries=3)
SPOT_2 = Policy(retries=3, spot_fallback=2, spot_wait_s=600)
MEMORY_2 = Policy(retries=3, memory_retry_factor=2)
BOTH = Policy(retries=3, spot_fallback=2, memory_retry_factor=1.5)
SPOT = Terms("SPOT", 1024, 1)
STANDARD = Terms("STANDARD", 1024, 3)

FAILED = JobState.FAILED
PREEMPTED_TWICE = AttemptEnd(FAILED, exit_codes=(EXIT_PREEMPTED, EXIT_PREEMPTED))
KILLED = AttemptEnd(FAILED, exit_codes=(EXIT_KILLED,))
MEMORY_ERROR = AttemptEnd(FAILED, error_type="MemoryError")
NO_SPOT_VM = AttemptEnd(FAILED, gave_up="did not start within 600 s", queued=True)
#: The function's words for it (deployment.py through protocol.cap_exceeded).
OVER_CAP = AttemptEnd(JobState.REJECTED, memory_mb=2048, refusal=cap_exceeded("memory", 2048, 1536))


@pytest.mark.parametrize(
    ("end", "terms", "history", "policy", "expected"),
    [
        # Without either feature every end is the electron's (today's behaviour).
        (PREEMPTED_TWICE, SPOT, (), OFF, SETTLE),
        (KILLED, STANDARD, (), OFF, SETTLE),
        (NO_SPOT_VM, SPOT, (), OFF, SETTLE),
        # Success, cancel, refusal, a result stored: settled whatever the policy.
        (AttemptEnd(JobState.SUCCEEDED), SPOT, (), BOTH, SETTLE),
        (AttemptEnd(JobState.CANCELLED, exit_codes=(EXIT_PREEMPTED,) * 2), SPOT, (), BOTH, SETTLE),
        (AttemptEnd(JobState.REJECTED), SPOT, (), BOTH, SETTLE),
        (AttemptEnd(FAILED, cancelled=True, exit_codes=(EXIT_KILLED,)), STANDARD, (), MEMORY_2, SETTLE),
        (AttemptEnd(FAILED, has_result=True, exit_codes=(EXIT_KILLED,)), STANDARD, (), MEMORY_2, SETTLE),
        # The task's own exception is never a reason to run it again.
        (AttemptEnd(FAILED, error_type="ValueError"), STANDARD, (), BOTH, SETTLE),
        # Spot fallback: N preemptions, or no Spot VM within spot_wait_s.
        (PREEMPTED_TWICE, SPOT, (), SPOT_2, NextAttempt(Terms("STANDARD", 1024, 1), "preempted")),
        (NO_SPOT_VM, SPOT, (), SPOT_2, NextAttempt(Terms("STANDARD", 1024, 2), "no Spot VM")),
        (AttemptEnd(FAILED, exit_codes=(EXIT_PREEMPTED,)), SPOT, (), SPOT_2, SETTLE),  # fewer than N
        (AttemptEnd(FAILED, exit_codes=(EXIT_PREEMPTED, 1)), SPOT, (), SPOT_2, SETTLE),  # ended on its own code
        (PREEMPTED_TWICE, STANDARD, (), SPOT_2, SETTLE),  # a standard attempt has nothing to fall back to
        # Given up while running (over time_limit): not a capacity problem.
        (AttemptEnd(FAILED, gave_up="still running"), SPOT, (), SPOT_2, SETTLE),
        # Out of memory: 137 without an outcome, or the task's own MemoryError.
        (KILLED, STANDARD, (), MEMORY_2, NextAttempt(Terms("STANDARD", 2048, 2), "out of memory")),
        (MEMORY_ERROR, STANDARD, (), MEMORY_2, NextAttempt(Terms("STANDARD", 2048, 2), "out of memory")),
        (MEMORY_ERROR, Terms("STANDARD", 1000, 3), (), BOTH, NextAttempt(Terms("STANDARD", 1500, 2), "out of memory")),
        # A SPOT attempt with more memory still falls back after N preemptions of its own.
        (KILLED, SPOT, (), BOTH, NextAttempt(Terms("SPOT", 1536, 1), "out of memory")),
        # Every run spends retries: 4 runs at retries=3, then the end is the electron's.
        (KILLED, STANDARD, (KILLED, KILLED), MEMORY_2, NextAttempt(Terms("STANDARD", 2048, 0), "out of memory")),
        (KILLED, STANDARD, (KILLED, KILLED, KILLED), MEMORY_2, SETTLE),
        (PREEMPTED_TWICE, SPOT, (PREEMPTED_TWICE,), SPOT_2, SETTLE),
        (KILLED, STANDARD, (PREEMPTED_TWICE, KILLED), Policy(retries=3, memory_retry_factor=2), SETTLE),
        # More memory up to the deployment's cap: a retry refused for it runs with the cap itself,
        # if that is still more than the attempt that ran out had.
        (OVER_CAP, Terms("STANDARD", 2048, 2), (replace(KILLED, memory_mb=1024),), MEMORY_2,
         NextAttempt(Terms("STANDARD", 1536, 2), "the next attempt has the cap, 1536 MiB")),
        (OVER_CAP, Terms("STANDARD", 2048, 2), (replace(KILLED, memory_mb=1536),), MEMORY_2, SETTLE),  # no more to give
        (OVER_CAP, STANDARD, (), MEMORY_2, SETTLE),  # a first attempt over the cap: the user's setting
        (AttemptEnd(JobState.REJECTED, refusal="container image 'x' is not allowed"), Terms("STANDARD", 2048, 2),
         (replace(KILLED, memory_mb=1024),), MEMORY_2, SETTLE),
    ],
)
def test_what_an_attempts_end_means(end, terms, history, policy, expected):
    decision = decide(end, terms, history, policy)
    if expected is SETTLE:
        assert decision == SETTLE
    else:
        assert isinstance(decision, NextAttempt)
        assert decision.terms == expected.terms
        assert expected.why in decision.why


@pytest.mark.parametrize(
    ("codes", "runs"),
    [((), 1), ((EXIT_PREEMPTED,), 1), ((EXIT_PREEMPTED, EXIT_PREEMPTED), 2), ((EXIT_PREEMPTED, 137), 2),
     ((50002, 50004, 1), 3), ((50005,), 1)],
)
def test_runs_are_counted_from_batchs_exit_codes(codes, runs):
    """Each infrastructure exit code Batch retried left a run; a last code of the task's own is one more."""
    assert runs_of(AttemptEnd(JobState.FAILED, exit_codes=codes)) == runs


def test_a_spot_attempt_that_may_fall_back_leaves_the_nth_preemption_to_the_executor():
    assert SPOT_2.first("SPOT", 512) == Terms("SPOT", 512, 1)
    assert Policy(retries=0, spot_fallback=3).first("SPOT", 512) == Terms("SPOT", 512, 0)
    assert SPOT_2.first("STANDARD", 512) == Terms("STANDARD", 512, 3)
    assert OFF.first("SPOT", 512) == Terms("SPOT", 512, 3)


def test_a_spot_attempt_that_may_fall_back_waits_spot_wait_s_for_a_vm():
    assert SPOT_2.queue_bound(Terms("SPOT", 512, 1), 3600) == 600
    assert SPOT_2.queue_bound(Terms("STANDARD", 512, 1), 3600) == 3600
    assert Policy(retries=3, spot_fallback=2).queue_bound(Terms("SPOT", 512, 1), 3600) == 3600
    assert OFF.queue_bound(Terms("SPOT", 512, 1), 3600) == 3600


def test_the_functions_cap_refusal_is_read_back_by_the_rule():
    """The two sides of one message: deployment.py refuses with cap_exceeded's words, attempts.py
    reads the cap from them (exceeded_cap)."""
    from specs import deployment, spec

    from covalent_gcpbatch_plugin.errors import SpecError
    from covalent_gcpbatch_plugin.protocol import exceeded_cap

    with pytest.raises(SpecError) as info:
        deployment(max_memory_mb=1536).check(spec(memory_mb=4096))
    assert exceeded_cap(str(info.value), "memory") == 1536
    assert exceeded_cap(str(info.value), "vcpus") is None
