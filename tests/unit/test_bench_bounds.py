"""make bench's phase bounds (bench/bounds.py with the shares declared in bench/harness.py): every
phase gets its own share of --budget-s, and a slow earlier phase cannot take a later one's."""

from __future__ import annotations

import pytest

from bench import bounds
from bench.harness import MODE_PHASES, PHASES

ALL = list(PHASES)


def test_the_declared_shares_leave_a_reserve_and_fill_the_default_budget_in_order():
    assert 0.9 <= sum(PHASES.values()) < 1 and 0.9 <= sum(MODE_PHASES.values()) < 1
    assert ALL == ["setup", "event", "poll", "packing", "overhead", "warm"]
    assert list(MODE_PHASES) == ["warmup", "p1", "p4", "p5"]
    shares = bounds.shares(3375, PHASES, ALL)
    assert shares == pytest.approx({name: 3375 * f for name, f in PHASES.items()})
    assert sum(shares.values()) == pytest.approx(3375 * sum(PHASES.values()))
    # The warm phase came with seconds of its own: the earlier phases kept theirs of the 2700 s
    # budget before it (setup 135, each mode 594, packing 1080, overhead 189, the reserve 108).
    assert shares == pytest.approx({"setup": 135, "event": 594, "poll": 594, "packing": 1080, "overhead": 189, "warm": 675})
    assert 3375 * (1 - sum(PHASES.values())) == pytest.approx(108)


def test_phases_that_do_not_run_give_their_share_to_those_that_do_and_the_reserve_stays():
    shares = bounds.shares(1000, PHASES, ["setup", "event", "overhead"])
    assert list(shares) == ["setup", "event", "overhead"]
    assert sum(shares.values()) == pytest.approx(1000 * sum(PHASES.values()))
    assert shares["event"] / shares["overhead"] == pytest.approx(PHASES["event"] / PHASES["overhead"])
    with pytest.raises(ValueError, match="p9"):
        bounds.shares(1000, PHASES, ["p9"])


def test_a_phase_gets_its_share_however_slow_the_phases_before_it_were():
    shares = bounds.shares(3375, PHASES, ALL)
    total = sum(shares.values())
    # On schedule: each phase's bound is its share.
    elapsed = 0.0
    for name in ALL:
        assert bounds.bound(name, shares, total - elapsed) == pytest.approx(shares[name])
        elapsed += shares[name]
    # Every earlier phase ran to its bound and then some (setup overran by 300 s): later phases
    # still get their whole share, never less.
    left = total - shares["setup"] - 300
    for name in ALL[1:]:
        assert bounds.bound(name, shares, left) == pytest.approx(shares[name])
        left -= shares[name]
    # Time past the budget already: still the share (the run is bounded by the sum of the bounds).
    assert bounds.bound("warm", shares, -50) == pytest.approx(shares["warm"])


def test_time_an_earlier_phase_left_over_goes_to_the_next_without_touching_later_shares():
    shares = bounds.shares(3375, PHASES, ALL)
    total = sum(shares.values())
    # Setup and event took 10 s each: poll may use everything the later phases' shares do not need.
    left = total - 20
    poll = bounds.bound("poll", shares, left)
    assert poll == pytest.approx(left - shares["packing"] - shares["overhead"] - shares["warm"])
    assert poll > shares["poll"]
    assert bounds.bound("packing", shares, left - poll) == pytest.approx(shares["packing"])


def test_inside_a_mode_p4_cannot_take_p5s_share():
    mode_bound = 675.0
    shares = bounds.shares(mode_bound, MODE_PHASES, ["warmup", "p1", "p4", "p5"])
    # P1 ran slow, to its bound; the warm-up too: P4 still gets its share, then P5 its own.
    left = sum(shares.values()) - shares["warmup"] - shares["p1"] - 40
    p4 = bounds.bound("p4", shares, left)
    assert p4 == pytest.approx(shares["p4"])
    assert bounds.bound("p5", shares, left - p4) == pytest.approx(shares["p5"]) == pytest.approx(mode_bound * MODE_PHASES["p5"])


@pytest.mark.parametrize(("statuses", "outcome"), [
    (["ran", "ran"], "complete"),
    (["ran", "skipped"], "complete"),
    (["ran", "cut", "skipped"], "cut"),
    (["cut", "failed"], "failed"),
    ([], "complete"),
])
def test_a_cut_is_an_outcome_only_a_failure_is_an_error(statuses, outcome):
    assert bounds.outcome(statuses) == outcome


def test_a_process_stopped_at_its_bound_is_cut_and_a_crash_or_a_wrong_result_is_a_failure():
    from bench.report import child_status, mode_status

    stopped, clean, crashed = {"stopped": True, "exit": None}, {"stopped": False, "exit": 0}, {"stopped": False, "exit": 1}
    ran = {"status": "ran", "reason": ""}
    driver = {"failures": {}, "phases": {"warmup": ran, "p1": ran}}
    assert mode_status(driver, clean) == ("ran", "")
    assert mode_status(driver, stopped)[0] == "cut"
    assert mode_status(None, stopped)[0] == "cut"
    assert mode_status(None, crashed)[0] == "failed"
    cut_p4 = {"failures": {}, "phases": {"p1": ran, "p4": {"status": "cut", "reason": "stopped at its bound"}}}
    assert mode_status(cut_p4, crashed) == ("cut", "p4 cut")
    wrong = {"failures": {}, "phases": {"p1": {"status": "failed", "reason": "wrong result"}, "p4": ran}}
    assert mode_status(wrong, crashed) == ("failed", "p1: wrong result")
    assert mode_status({"failures": {"p5": "OSError: disk"}, "phases": {}}, crashed)[0] == "failed"

    both = {"unpacked": {"status": "COMPLETED"}, "packed": {"status": "COMPLETED"}}
    assert child_status("packing", both, clean) == ("ran", "")
    assert child_status("packing", {"unpacked": {"status": "COMPLETED"}}, stopped)[0] == "cut"
    assert child_status("packing", {"unpacked": {"status": "COMPLETED"}, "cut": {"packed": "did not end"}}, clean) == \
        ("cut", "packed: did not end")
    assert child_status("packing", {"unpacked": {"status": "FAILED", "failures": ["x"]}}, crashed)[0] == "failed"
    assert child_status("overhead", None, crashed)[0] == "failed"
    assert child_status("overhead", None, stopped)[0] == "cut"


def test_the_docs_state_the_default_bounds_as_declared():
    from pathlib import Path

    from bench.harness import PARAMETERS

    budget = PARAMETERS["budget_s"][0]
    stated = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in bounds.shares(budget, PHASES, ALL).items())
    text = " ".join((Path(__file__).resolve().parents[2] / "docs" / "performance.md").read_text().split())
    assert f"Of the default {budget:.0f} s: {stated}" in text
