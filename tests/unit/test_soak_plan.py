"""The soak's plan and judge (bench/soak_plan.py): a seed names one workload and one fault schedule,
and the judge accepts exactly the outcomes an electron may have."""

from __future__ import annotations

import hashlib

import pytest

from bench import soak_plan as plan


def test_a_seed_names_one_plan_and_another_seed_another():
    one = plan.plan_workload(7, 300, 20, 180), plan.plan_faults(7, 200, 4)
    assert one == (plan.plan_workload(7, 300, 20, 180), plan.plan_faults(7, 200, 4))
    assert one != (plan.plan_workload(8, 300, 20, 180), plan.plan_faults(8, 200, 4))


@pytest.mark.parametrize("seed", range(5))
def test_the_workload_has_its_size_and_every_shape(seed):
    dispatches = plan.plan_workload(seed, 300, 20, 180)
    electrons = [e for d in dispatches for e in d.electrons]
    assert len(dispatches) >= 20 and len(electrons) >= 300
    assert len({e.key for e in electrons}) == len(electrons), "keys are unique"
    assert all(0 <= d.start_s <= 180 for d in dispatches)
    assert [d.start_s for d in dispatches] == sorted(d.start_s for d in dispatches)
    kinds = {e.kind for e in electrons}
    assert {plan.VALUE, plan.RAISES, plan.ODD, plan.OVER_TIME, plan.SLOW} <= kinds
    assert {d.wait_mode for d in dispatches} == {"events", "poll"}
    for d in dispatches:
        assert (d.cancel_after_s is not None) == (d.shape == plan.CANCELLED)
        keys = {e.key for e in d.electrons}
        assert all(e.depends_on in keys for e in d.electrons if e.depends_on), "chains stay within their dispatch"


def test_faults_cover_the_catalogue_over_a_long_enough_run():
    faults = plan.plan_faults(3, 3600, 4)
    assert {f.kind for f in faults} == set(plan.FAULT_WEIGHTS)
    assert all(f.lasts_s > 0 for f in faults if f.kind.startswith("notifications_"))
    assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)


def _dispatch(*electrons, cancelled=False):
    return plan.Dispatch(0, plan.CANCELLED if cancelled else plan.FAN_OUT, electrons, "events", 0.0,
                         5.0 if cancelled else None)


VALUE = plan.Electron("k", plan.VALUE, value=42)
RAISES = plan.Electron("r", plan.RAISES)
ODD = plan.Electron("o", plan.ODD, value=(5, hashlib.sha256(b"abcde").hexdigest()))


@pytest.mark.parametrize("electron, seen, wrong", [
    (VALUE, plan.Observed("COMPLETED", 42, runs=1, finished_runs=1), ""),
    (VALUE, plan.Observed("COMPLETED", 41, runs=1, finished_runs=1), "expected 42"),
    (VALUE, plan.Observed("FAILED", error="boom", runs=1), "expected COMPLETED"),
    (VALUE, plan.Observed("FAILED", error="  \n ", runs=1, infra_exits=(137,)), "empty error"),
    (VALUE, plan.Observed("FAILED", error="killed", runs=1, infra_exits=(137,)), ""),
    (VALUE, plan.Observed("FAILED", error="preempted", runs=2, infra_exits=(50001,)), "expected COMPLETED"),
    (VALUE, plan.Observed("COMPLETED", 42, runs=2, finished_runs=2, infra_exits=(50001,)), ""),
    (VALUE, plan.Observed("COMPLETED", 42, runs=2, finished_runs=2), "ran 2 times"),
    (VALUE, plan.Observed("COMPLETED", 42, runs=1, jobs=("a/0", "b/0")), "more than one Batch task"),
    (VALUE, plan.Observed("CANCELLED"), "was not"),
    (RAISES, plan.Observed("FAILED", error="SoakError: planned failure of r", runs=1), ""),
    (RAISES, plan.Observed("FAILED", error="something else", runs=1), "without its own error"),
    (RAISES, plan.Observed("COMPLETED", None, runs=1), "raises"),
    (ODD, plan.Observed("COMPLETED", b"abcde", runs=1), ""),
    (ODD, plan.Observed("COMPLETED", b"abcdf", runs=1), "wrong bytes"),
    (VALUE, plan.Observed(""), "missing"),
])
def test_the_judge(electron, seen, wrong):
    problems = plan.judge(electron, _dispatch(electron), seen, retries=3)
    assert (wrong in "; ".join(problems)) if wrong else problems == []


def test_a_cancelled_dispatch_may_end_each_electron_cancelled_or_done():
    slow = plan.Electron("s", plan.SLOW, value=7)
    d = _dispatch(slow, cancelled=True)
    assert plan.judge(slow, d, plan.Observed("CANCELLED", runs=1), retries=3) == []
    assert plan.judge(slow, d, plan.Observed("COMPLETED", 7, runs=1), retries=3) == []
    assert plan.judge(slow, d, plan.Observed("NEW_OBJECT"), retries=3) == []
    assert plan.judge(slow, d, plan.Observed("NEW_OBJECT", runs=1), retries=3) != []


def test_a_result_is_lost_when_the_code_returned_and_nothing_explains_its_absence():
    assert plan.lost_result(VALUE, plan.Observed("FAILED", error="x", runs=1, finished_runs=1))
    assert not plan.lost_result(VALUE, plan.Observed("FAILED", error="x", runs=1, finished_runs=1, infra_exits=(137,)))
    assert not plan.lost_result(VALUE, plan.Observed("COMPLETED", 42, runs=1, finished_runs=1))
    assert not plan.lost_result(RAISES, plan.Observed("FAILED", error="x", runs=1, finished_runs=1))


def test_an_electron_whose_server_died_may_end_anyhow_but_keeps_its_result_and_runs_no_more():
    d = _dispatch(VALUE)
    assert plan.judge(VALUE, d, plan.Observed("RUNNING", runs=1, interrupted=True), retries=3) == []
    assert plan.judge(VALUE, d, plan.Observed("COMPLETED", 41, runs=1, interrupted=True), retries=3) != []
    assert plan.judge(VALUE, d, plan.Observed("RUNNING", runs=2, interrupted=True), retries=3) != []
    late = plan.Observed("RUNNING", runs=1, interrupted=True, late_runs=1)
    assert "after its jobs were cancelled" in "; ".join(plan.judge(VALUE, d, late, retries=3))
    done = dict(status="RUNNING", runs=1, finished_runs=1, interrupted=True)
    assert plan.lost_result(VALUE, plan.Observed(**done))
    assert not plan.lost_result(VALUE, plan.Observed(**done, result_kept=True))


def test_the_server_is_killed_once_in_the_middle_third():
    at = plan.plan_server_kill(5, 300)
    assert 100 <= at <= 200 and at == plan.plan_server_kill(5, 300)


def test_a_dependent_of_a_failed_electron_is_not_run():
    after = plan.Electron("b", plan.VALUE, value=1, depends_on="a")
    d = _dispatch(plan.Electron("a", plan.RAISES), after)
    assert plan.judge(after, d, plan.Observed("", upstream_done=False), retries=3) == []
    assert plan.judge(after, d, plan.Observed("NEW_OBJECT", runs=1, upstream_done=False), retries=3) != []
    assert plan.judge(after, d, plan.Observed("", upstream_done=True), retries=3) != []


def test_a_trigger_event_lost_in_an_emulator_restart_is_explained_only_by_the_submit_bound():
    failed = dict(status="FAILED", error=f"no Batch job cov-x {plan.SUBMIT_TIMEOUT_WORDS}=60 s of the upload")
    assert plan.judge(VALUE, _dispatch(VALUE), plan.Observed(**failed, submitted_across_restart=True), retries=3) == []
    assert plan.judge(VALUE, _dispatch(VALUE), plan.Observed(**failed), retries=3) != []
    other = plan.Observed("FAILED", error="something else", submitted_across_restart=True)
    assert plan.judge(VALUE, _dispatch(VALUE), other, retries=3) != []


def test_the_reliability_page_lists_every_fault_kind_once():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    table = page.split("## Soak: many faults at once", 1)[1].split("\n\n")[2]
    listed = [line.split("`")[1] for line in table.splitlines()[2:]]
    assert listed == list(plan.FAULT_WEIGHTS)
