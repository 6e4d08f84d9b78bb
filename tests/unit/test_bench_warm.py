"""make bench's warm VMs phase (bench/warm.py, issue 27): its goal checks and figures (pure
arithmetic in bench/report.py), its keep_warm in real seconds, its status, and `--only warm`."""

from __future__ import annotations

import pytest

from bench import report
from bench.harness import parse_args, planned_phases, run_config
from bench.warm import KEEP_WARM_FLOOR_S, MODES, expected_real_s, keep_warm_real_s

WARM = {"wall_s": 170.0, "vm_seconds": 240.0, "vm_boots": 1}
COLD = {"wall_s": 1060.0, "vm_seconds": 1000.0, "vm_boots": 10}


def test_the_issues_goals_boots_1_against_10_wall_at_most_a_quarter_vm_seconds_at_most_the_cold_runs():
    figures = report.warm_chain_figures(WARM, COLD, 10)
    assert figures == {"wall_ratio": 0.16, "vm_seconds_ratio": 0.24, "boots_one_against_each": True,
                       "wall_le_025": True, "vm_seconds_le_cold": True}
    # Exactly at the bounds: met.
    at = report.warm_chain_figures({**WARM, "wall_s": 265.0, "vm_seconds": 1000.0}, COLD, 10)
    assert at["wall_ratio"] == 0.25 and at["wall_le_025"] and at["vm_seconds_le_cold"]


@pytest.mark.parametrize(("warm", "cold", "missed"), [
    ({**WARM, "vm_boots": 2}, COLD, "boots_one_against_each"),        # an electron went cold
    (WARM, {**COLD, "vm_boots": 9}, "boots_one_against_each"),        # the cold run must boot one per electron
    ({**WARM, "wall_s": 266.0}, COLD, "wall_le_025"),
    ({**WARM, "vm_seconds": 1000.1}, COLD, "vm_seconds_le_cold"),     # the idle tail cost more than it saved
])
def test_each_goal_is_missed_on_its_own(warm, cold, missed):
    figures = report.warm_chain_figures(warm, cold, 10)
    assert figures[missed] is False
    assert all(figures[k] for k in ("boots_one_against_each", "wall_le_025", "vm_seconds_le_cold") if k != missed)


def test_a_missing_figure_is_no_verdict_not_a_miss():
    figures = report.warm_chain_figures({"vm_boots": 1}, {"wall_s": 0, "vm_boots": 10}, 10)
    assert figures["wall_ratio"] is None and figures["wall_le_025"] is None
    assert figures["vm_seconds_ratio"] is None and figures["vm_seconds_le_cold"] is None
    assert figures["boots_one_against_each"] is True


def test_the_phases_figures_group_the_chain_and_the_stages_and_the_targets_carry_the_goals():
    raw = {"electrons": 10, "stage_electrons": 4, "time_scale": 0.25, "keep_warm_real_s": 15,
           "runs": ["warm", "cold", "stages_packed", "stages_warm"], "warm": WARM, "cold": COLD,
           "stages_packed": {"stage2_vm_boots": 4}, "stages_warm": {"stage2_vm_boots": 0}}
    figures = report.warm_figures(raw)
    assert figures["chain"]["warm"] is WARM and figures["chain"]["wall_ratio"] == 0.16
    assert figures["stages"] == {"packed": {"stage2_vm_boots": 4}, "warm": {"stage2_vm_boots": 0}}
    assert figures["time_scale"] == 0.25 and "warm" not in figures and "stages_warm" not in figures
    # One chain run only (the other cut): no ratios.
    assert "wall_ratio" not in report.warm_figures({k: v for k, v in raw.items() if k != "cold"})["chain"]
    targets = report.targets({"warm": figures})
    assert (targets["warm_chain_boots_1_against_n"], targets["warm_chain_wall_le_025"],
            targets["warm_chain_vm_seconds_le_cold"]) == (True, True, True)
    assert report.targets({})["warm_chain_wall_le_025"] is None


def test_keep_warm_is_the_model_seconds_scaled_in_whole_real_seconds_never_below_the_floor():
    assert keep_warm_real_s(60, 0.25) == 15
    assert keep_warm_real_s(60, 1.0) == 60
    assert keep_warm_real_s(61, 0.5) == 31  # whole seconds, rounded up: the VM waits at least that long
    assert keep_warm_real_s(60, 0.05) == KEEP_WARM_FLOOR_S  # 3 s could not bridge Covalent's gap


def test_a_warm_run_that_failed_or_returned_a_wrong_result_fails_the_phase():
    clean, stopped = {"stopped": False, "exit": 0}, {"stopped": True, "exit": None}
    good = {"status": "COMPLETED", "result_ok": True}
    assert report.child_status("warm", {"runs": ["warm", "cold"], "warm": good, "cold": good}, clean) == ("ran", "")
    wrong = report.child_status("warm", {"runs": ["warm", "cold"], "warm": good,
                                         "cold": {"status": "COMPLETED", "result_ok": False}}, clean)
    assert wrong[0] == "failed" and "cold" in wrong[1] and "wrong" in wrong[1]
    # Stopped at its bound after the warm chain: what it measured is kept, the phase is cut.
    assert report.child_status("warm", {"runs": ["warm", "cold"], "warm": good}, stopped)[0] == "cut"
    assert report.child_status("warm", {"runs": ["warm"], "warm": good, "cut": {"warm": "its VMs were still up"}},
                               clean)[0] == "cut"


def test_only_warm_runs_the_warm_phase_alone_without_the_first_stack():
    running, skipped = planned_phases(parse_args(["--only", "warm"]))
    assert running == ["warm"]
    assert set(skipped) == {"setup", "event", "poll", "packing", "overhead"}
    running, _ = planned_phases(parse_args(["--only", "event,warm"]))
    assert running == ["setup", "event", "warm"]
    running, skipped = planned_phases(parse_args(["--warm-electrons", "0", "--warm-stage-electrons", "0"]))
    assert "warm" not in running and "0" in skipped["warm"]
    assert planned_phases(parse_args([]))[0] == ["setup", "event", "poll", "packing", "overhead", "warm"]
    with pytest.raises(SystemExit):
        parse_args(["--only", "wram"])


def test_a_run_of_only_the_warm_phase_is_complete_when_its_runs_are():
    args = parse_args(["--only", "warm", "--warm-stage-electrons", "0"])
    good = {"status": "COMPLETED", "result_ok": True, "wall_s": 1.0, "vm_seconds": 1.0, "vm_boots": 1}
    warm = {"electrons": 10, "stage_electrons": 0, "runs": ["warm", "cold"], "warm": good, "cold": {**good, "vm_boots": 10}}
    machine = {"cpu_model": "AMD EPYC", "cores": 2}
    results = report.analyse({}, {"jobs": {}, "calls": {}}, {}, config=run_config(args), machine=machine,
                             started=0, ended=1, warm=warm, phases={"warm": {"status": "ran", "reason": ""}})
    assert results["complete"] and results["outcome"] == "complete"
    assert results["warm"]["chain"]["boots_one_against_each"] and results["phases"]["warm"]["cpu_model"] == "AMD EPYC"
    failed = {**warm, "cold": {**good, "status": "FAILED"}}
    assert not report.analyse({}, {"jobs": {}, "calls": {}}, {}, config=run_config(args), machine=machine,
                              started=0, ended=1, warm=failed, phases={})["complete"]


def test_each_run_expects_its_boots_and_its_tail_so_the_cold_chain_gets_the_largest_part():
    # A chain of 10 at time scale 0.25, keep_warm 15 s: one boot and the tail against ten boots.
    warm, cold = expected_real_s("warm", 10, 5, 0.25, 15), expected_real_s("cold", 10, 5, 0.25, 15)
    assert warm == pytest.approx(0.25 * (100 + 45) + 16 + 15)
    assert cold == pytest.approx(10 * (0.25 * 100 + 1.6))
    assert 3.5 < cold / warm < 4.5
    # The two fan-outs: two packs one after another; or ten jobs admitted 2 s apart, then their VMs.
    assert expected_real_s("stages_packed", 10, 5, 0.25, 15) == pytest.approx(2 * (25 + 16))
    assert expected_real_s("stages_warm", 10, 5, 0.25, 15) == pytest.approx(0.25 * (100 + 20 + 5) + 16 + 15)
    # The smoke run's two-electron chain at 0.05: the warm run's part covers its 15 s tail.
    smoke = {k: expected_real_s(k, 2, 5, 0.05, 15) for k in ("warm", "cold")}
    assert smoke["warm"] / sum(smoke.values()) > 0.6
    assert {key for key, _, _ in MODES} == {"warm", "cold", "stages_packed", "stages_warm"}
    with pytest.raises(ValueError):
        expected_real_s("tepid", 1, 5, 1, 0)
