"""Pytest plugin for `make faults`: one line per fault scenario at the end of the run.

tests/stack/test_faults.py records (scenario, expected, observed, seconds to settle) with ``record``;
loaded with ``-p faults_report`` this plugin prints them as a table in the terminal summary.
"""

from __future__ import annotations

RECORDS: list[tuple[str, str, str, float]] = []


def record(name: str, expected: str, observed: str, seconds: float) -> None:
    RECORDS.append((name, expected, observed, seconds))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RECORDS:
        return
    terminalreporter.section("fault scenarios")
    terminalreporter.write_line(f"{'scenario':<40} {'expected':<30} {'observed':<44} settle")
    for name, expected, observed, seconds in RECORDS:
        terminalreporter.write_line(f"{name:<40} {expected:<30} {observed[:44]:<44} {seconds:6.1f} s")
