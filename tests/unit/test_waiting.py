"""The waiting decisions (waiting.py), with made-up times and events: no sleeps, no emulators."""

from __future__ import annotations

import pytest
from google.cloud import batch_v1

from covalent_gcpbatch_plugin.local.batch.faults import CAPACITY_EVENTS
from covalent_gcpbatch_plugin.protocol import JobEvent, JobState
from covalent_gcpbatch_plugin.waiting import (
    CAPACITY_READ_S,
    GIVE_UP,
    GPU_DRIVERS_S,
    RUN_GRACE_S,
    JobWait,
    Outcome,
    WaitPlan,
    capacity_events,
    explain_job_failure,
    give_up_reason,
    never_placeable,
)

PLAN = WaitPlan(submit_timeout=10, queue_timeout=30, run_timeout=100, reconcile_interval=5)


def event(state: JobState) -> JobEvent:
    return JobEvent("cov-x-0-abcd", state, "test")


def test_each_phase_has_its_bound():
    wait = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    assert wait.observe(None, 9.9) is None
    assert wait.observe(None, 10) == GIVE_UP, "not created within submit_timeout"
    wait = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    assert wait.observe(event(JobState.QUEUED), 5) is None
    assert wait.observe(None, 34.9) is None and wait.observe(None, 35) == GIVE_UP, "queue_timeout from QUEUED"
    wait = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    wait.observe(event(JobState.RUNNING), 5)
    assert wait.observe(None, 104.9) is None and wait.observe(None, 105) == GIVE_UP, "run bound from RUNNING"


def test_a_late_queued_does_not_move_the_wait_back():
    wait = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    wait.observe(event(JobState.RUNNING), 1)
    assert wait.observe(event(JobState.QUEUED), 2) is None
    assert wait.state is JobState.RUNNING and wait.phase_end == 101


def test_the_first_terminal_state_settles():
    wait = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    assert wait.observe(event(JobState.SUCCEEDED), 3) == Outcome(JobState.SUCCEEDED, "test")
    assert wait.observe(JobEvent("j", JobState.REJECTED, "not allowed"), 3) == Outcome(JobState.REJECTED, "not allowed")


def test_silence_doubles_the_read_interval_until_news_arrive():
    wait = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    wait.observe(event(JobState.RUNNING), 0)
    timeouts = []
    for _ in range(4):
        timeouts.append(wait.timeout(0))
        wait.silence()
    assert timeouts == [5, 10, 20, 40]
    wait.observe(event(JobState.RUNNING), 0)
    assert wait.timeout(0) == 80, "a repeated state is no news"
    wait = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    wait.observe(event(JobState.QUEUED), 0)
    wait.silence()
    wait.observe(event(JobState.RUNNING), 0)
    assert wait.timeout(0) == 5, "the job moved: reads go back to their first interval"
    assert wait.timeout(99) == 1, "never past the phase's bound"


def test_messages_that_do_not_move_the_job_cannot_stretch_its_bound():
    """RUNNING and STATE_UNSPECIFIED alternating (anyone whose job may publish on the topic can send
    them): the run bound still ends 100 s after the first RUNNING, and the reads do not come back
    to their first interval."""
    wait = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    wait.observe(event(JobState.RUNNING), 5)
    wait.silence()
    for now, state in zip(range(20, 105, 20), [JobState.STATE_UNSPECIFIED, JobState.RUNNING] * 3):
        assert wait.observe(event(state), now) is None
    assert wait.timeout(100) == 5 and wait.quiet == 10, "no reset of the backoff"
    assert wait.observe(event(JobState.STATE_UNSPECIFIED), 105) == GIVE_UP
    assert wait.state is JobState.RUNNING


def test_a_phase_bound_runs_from_its_first_entry():
    wait = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    wait.observe(event(JobState.QUEUED), 1)
    wait.observe(event(JobState.CANCELLATION_IN_PROGRESS), 20)
    wait.observe(event(JobState.QUEUED), 25)
    assert wait.phase_end == 31 and wait.observe(None, 31) == GIVE_UP


def test_polling_reads_at_a_fixed_interval():
    wait = JobWait(PLAN, listening=False, poll_interval=2, now=0)
    for _ in range(3):
        wait.silence()
        assert wait.timeout(0) == 2


def test_a_cancel_settles_a_job_not_seen_yet_and_waits_for_one_seen():
    unseen = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    assert unseen.cancel_requested() == Outcome(JobState.CANCELLED, "cancelled before its Batch job was seen")
    seen = JobWait(PLAN, listening=True, poll_interval=1, now=0)
    seen.observe(event(JobState.RUNNING), 1)
    assert seen.cancel_requested() is None and seen.cancel_sent
    assert seen.observe(event(JobState.CANCELLED), 2) == Outcome(JobState.CANCELLED, "test")


@pytest.mark.parametrize("retries", [0, 3])
def test_the_running_bound_gives_every_attempt_its_time(retries):
    plan = WaitPlan.for_task(submit_timeout=1, queue_timeout=1, time_limit=300, retries=retries, reconcile_interval=1)
    assert plan.run_timeout == (retries + 1) * (300 + RUN_GRACE_S)
    reason = give_up_reason("j", JobState.RUNNING, plan, time_limit=300, retries=retries)
    assert f"each of its {retries + 1} attempts" in reason and f"{plan.run_timeout:g} s" in reason


def test_a_retried_attempt_on_a_new_vm_fits_the_running_bound():
    """Preempted at the end of its time limit, the task's retry waits for a new VM (up to 127 s to
    RUNNING in public logs), pulls its image again (up to 2.5 min) and runs in full: it must end
    inside the bound. (The 120 s grace of before gave 840 s for this 936 s run.)"""
    plan = WaitPlan.for_task(submit_timeout=1, queue_timeout=1, time_limit=300, retries=1, reconcile_interval=1)
    first_attempt = 150 + 299  # its image pull, then preempted 1 s before its time limit
    retry = 127 + 150 + 300 + 60  # a new VM, the pull again, the whole time limit, the outcome's upload
    assert first_attempt + retry < plan.run_timeout
    reason = give_up_reason("j", JobState.RUNNING, plan, time_limit=300, retries=1)
    assert f"plus {RUN_GRACE_S} s (a new VM, its image pull" in reason


def test_gpu_tasks_get_time_for_their_drivers():
    cpu = WaitPlan.for_task(submit_timeout=1, queue_timeout=1, time_limit=60, retries=2, reconcile_interval=1)
    gpu = WaitPlan.for_task(submit_timeout=1, queue_timeout=1, time_limit=60, retries=2, reconcile_interval=1, gpus=True)
    assert gpu.run_timeout - cpu.run_timeout == 3 * GPU_DRIVERS_S


def test_a_packed_electrons_queue_bound_restarts_once_its_pack_runs_and_counts_the_tasks_ahead():
    """Task 10 of a pack running 5 at a time waits for two waves of its siblings: its queue bound
    is not spent while they run. It restarts when the pack's job first runs, once."""
    plan = WaitPlan.for_task(submit_timeout=10, queue_timeout=30, time_limit=100, retries=0, reconcile_interval=5,
                             pack_index=10, pack_parallelism=5)
    assert plan.packed and plan.pack_wait == 2 * plan.run_timeout
    wait = JobWait(plan, listening=True, poll_interval=1, now=0)
    wait.observe(event(JobState.QUEUED), 1)
    assert wait.awaits_pack() and wait.phase_end == 31
    wait.pack_progressing(20)
    assert not wait.awaits_pack() and wait.phase_end == 20 + plan.pack_wait + 30
    wait.pack_progressing(500)
    assert wait.phase_end == 20 + plan.pack_wait + 30, "only the first progress counts"
    wait.observe(event(JobState.SCHEDULED), 600)
    assert wait.phase_end == 20 + plan.pack_wait + 30, "its task assigned: the pack's bound still holds"
    assert wait.observe(None, 20 + plan.pack_wait + 30) == GIVE_UP
    reason = give_up_reason("j", JobState.SCHEDULED, plan, time_limit=100, retries=0, pack_progress=True)
    assert f"plus {plan.pack_wait:g} s for the tasks ahead of it in its pack" in reason
    lone = WaitPlan.for_task(submit_timeout=10, queue_timeout=30, time_limit=100, retries=0, reconcile_interval=5)
    alone = JobWait(lone, listening=True, poll_interval=1, now=0)
    alone.observe(event(JobState.QUEUED), 1)
    alone.pack_progressing(20)
    assert not alone.awaits_pack() and alone.phase_end == 31, "a job of its own has no pack to wait for"
    first_wave = WaitPlan.for_task(submit_timeout=10, queue_timeout=30, time_limit=100, retries=0,
                                   reconcile_interval=5, pack_index=4, pack_parallelism=5)
    assert first_wave.pack_wait == 0 and WaitPlan.for_task(
        submit_timeout=10, queue_timeout=30, time_limit=100, retries=0, reconcile_interval=5,
        pack_index=900, pack_parallelism=0).pack_wait == 0, "all at once: nothing ahead"


def test_give_up_reasons_name_the_bound():
    assert "submit_timeout=10 s" in give_up_reason("j", None, PLAN, time_limit=1, retries=0)
    assert "queue_timeout=30 s (state SCHEDULED)" in give_up_reason("j", JobState.SCHEDULED, PLAN, time_limit=1, retries=0)


def test_failure_explanation_gives_each_exit_code_its_meaning():
    job = batch_v1.Job(status=batch_v1.JobStatus(status_events=[
        batch_v1.StatusEvent(description="Job state is set from QUEUED to SCHEDULED."),
        batch_v1.StatusEvent(description="Task failed.", task_execution=batch_v1.TaskExecution(exit_code=50001)),
    ]))
    text = explain_job_failure("j", JobState.FAILED, job)
    assert text.startswith("Batch job j ended FAILED without a result or error record: Job state is set")
    assert "[exit code 50001: the VM was preempted (spot)]" in text
    assert "no status events" in explain_job_failure("j", JobState.FAILED, batch_v1.Job())


def test_inboxes_deliver_on_the_waiting_loop_and_forget_closed_ones():
    import asyncio

    from covalent_gcpbatch_plugin.waiting import Inboxes

    inboxes = Inboxes()
    assert inboxes.put("nobody", "x") is False

    async def deliver():
        inbox: asyncio.Queue = asyncio.Queue()
        inboxes.register("job", asyncio.get_running_loop(), inbox)
        assert inboxes.put("job", "hello") is True
        return await asyncio.wait_for(inbox.get(), 5)

    assert asyncio.run(deliver()) == "hello"
    closed = asyncio.new_event_loop()
    closed.close()
    inboxes.register("gone", closed, asyncio.Queue())
    assert inboxes.put("gone", "x") is False
    assert inboxes.put("gone", "x") is False, "a closed loop's inbox is forgotten"


def test_docs_state_the_wait_bounds_as_declared():
    from pathlib import Path

    from covalent_gcpbatch_plugin import waiting

    page = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()  # linked from the README
    assert f"`(retries + 1) × (time_limit + {waiting.RUN_GRACE_S} s)`" in page
    assert (f"new VM: {waiting.NEW_VM_S} s to boot, {waiting.IMAGE_PULL_S} s to pull the image, {waiting.OUTCOME_S} s "
            "for the worker's uploads and the\nnotification") in page
    assert f"{waiting.GPU_DRIVERS_S} s more with GPUs" in page
    assert page.count(f"{waiting.RUN_GRACE_S} s") >= 2, "the bounds paragraph and the failure section"


def test_a_job_waiting_for_a_vm_is_read_within_a_minute_then_less_often():
    """Batch publishes nothing for what keeps a job QUEUED or SCHEDULED (quota, stockout): reads
    come within CAPACITY_READ_S while it waits, doubling; a running job's at reconcile_interval."""
    plan = WaitPlan(submit_timeout=10, queue_timeout=3600, run_timeout=7200, reconcile_interval=300)
    wait = JobWait(plan, listening=True, poll_interval=1, now=0)
    assert wait.timeout(0) == 10, "before the job exists: submit_timeout's end"
    wait.observe(event(JobState.QUEUED), 1)
    assert wait.timeout(1) == CAPACITY_READ_S
    wait.silence()
    assert wait.timeout(1) == 2 * CAPACITY_READ_S
    wait.observe(event(JobState.RUNNING), 200)
    assert wait.timeout(200) == 300


@pytest.mark.parametrize(
    ("quota", "limit", "vcpus", "gpus", "never"),
    [
        ("GPUS_ALL_REGIONS", "0.0", 2, 1, True),  # a limit of 0 is never raised by waiting
        ("N2_CPUS", "24.0", 32, 0, True),  # one VM needs more than the whole quota
        ("N2_CPUS", "24.0", 8, 0, False),  # others' VMs hold it: it may free up
        ("NVIDIA_T4_GPUS", "1.0", 4, 2, True),
        ("NVIDIA_T4_GPUS", "4.0", 4, 2, False),
        ("IN_USE_ADDRESSES", "8.0", 64, 0, False),
    ],
)
def test_a_quota_that_can_never_hold_one_vm_is_never_placeable(quota, limit, vcpus, gpus, never):
    text = CAPACITY_EVENTS["quota"].format(quota=quota, limit=limit, region="us-east1")
    assert never_placeable(text, vcpus=vcpus, gpus=gpus) is never


def test_stockouts_wait_and_non_retryable_errors_do_not():
    stockout = CAPACITY_EVENTS["stockout"].format(machine="a2-highgpu-1g", zone="us-east1-b")
    assert not never_placeable(stockout, vcpus=12, gpus=1)
    # Nextflow #5550's event, as Batch wrote it.
    assert never_placeable("Job gets non-retryable information Batch Error: code - CODE_GCE_INVALID_FIELD_VALUE, "
                           "description - Invalid value for field 'operation': ''. No zone supports all of the "
                           "provided instance templates.", vcpus=2, gpus=0)


def test_capacity_events_are_batchs_operational_info_events_oldest_first():
    job = batch_v1.Job(status=batch_v1.JobStatus(status_events=[
        batch_v1.StatusEvent(type_="STATUS_CHANGED", description="Job state is set from QUEUED to SCHEDULED for job x."),
        batch_v1.StatusEvent(type_="OPERATIONAL_INFO", description="first"),
        batch_v1.StatusEvent(type_="OPERATIONAL_INFO", description="second"),
    ]))
    assert capacity_events(job) == ("first", "second")
