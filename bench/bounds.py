"""Each phase's time bound, from the budget (pure arithmetic: no clocks read here).

A phase's *share* is its fraction of the budget (the fractions are declared once, in
bench/harness.py ``PHASES`` and ``MODE_PHASES``), rescaled over the phases that will run. When a
phase starts, its *bound* is its share, or more if the phases before it left time over; never
less. So an earlier phase that runs slow on a slow CPU (and is cut at its own bound) cannot
starve a later one, and the whole run stays within the sum of the bounds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def shares(budget_s: float, fractions: Mapping[str, float], running: Iterable[str]) -> dict[str, float]:
    """Seconds for each phase in ``running`` (in their declared order): its fraction of
    ``budget_s``, the fractions of the phases that will not run given to those that will in
    proportion. What the declared fractions leave over (1 - their sum) stays a reserve."""
    running = set(running)
    unknown = running - set(fractions)
    if unknown:
        raise ValueError(f"phases without a declared share: {sorted(unknown)}")
    chosen = {name: f for name, f in fractions.items() if name in running}
    total = sum(chosen.values())
    if not chosen or total <= 0:
        return {name: 0.0 for name in chosen}
    usable = budget_s * sum(fractions.values())  # the reserve is kept whatever runs
    return {name: usable * f / total for name, f in chosen.items()}


def bound(name: str, phase_shares: Mapping[str, float], left_s: float) -> float:
    """``name``'s bound when it starts with ``left_s`` seconds of its whole (shares') time left:
    its share, or what is left once every later phase's share is kept, if that is more."""
    names = list(phase_shares)
    later = sum(phase_shares[n] for n in names[names.index(name) + 1:])
    return max(phase_shares[name], left_s - later)


def outcome(statuses: Iterable[str]) -> str:
    """The run's outcome from its phases' statuses: ``failed`` if any failed, ``cut`` if any was
    cut at its bound (a bounded benchmark's result, not an error), else ``complete``."""
    statuses = set(statuses)
    if "failed" in statuses:
        return "failed"
    return "cut" if "cut" in statuses else "complete"
