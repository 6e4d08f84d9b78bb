"""`make soak` in miniature, so that it cannot rot: the same code (bench/soak.py on its own stack
and Covalent server), about 60 electrons in 6 dispatches under faults fired every 3 s on average,
one fixed seed. Every check of the full soak applies: nothing lost, no wrong outcome, no job left
running, nothing left in the buckets but cancel markers and kept outcomes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_emulators

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
SEED = 20261203
BUDGET_S = 480


def test_short_soak_under_random_faults_loses_nothing(tmp_path):
    require_emulators()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVALENT_")}  # the soak isolates its own
    argv = [sys.executable, "-m", "bench.soak", "--seed", str(SEED), "--electrons", "60", "--dispatches", "6",
            "--spread-s", "40", "--fault-every-s", "3", "--budget-s", str(BUDGET_S), "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=BUDGET_S + 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"stdout:\n{out[-4000:]}\nstderr:\n{err[-8000:]}"
    (path,) = tmp_path.glob("soak-*.json")
    report = json.loads(path.read_text())
    assert report["passed"] and report["seed"] == SEED
    assert report["electrons"] >= 60 and report["dispatches"] >= 6
    assert report["lost_results"] == report["wrong_outcomes"] == 0
    assert report["orphan_jobs"] == [] and report["fault_errors"] == []
    assert sum(report["faults"].values()) >= 5, report["faults"]
    assert "lost results (must be 0)" in out
