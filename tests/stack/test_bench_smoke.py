"""`make bench` in miniature, so that the benchmark harness does not rot: the same code path
(bench/harness.py on its own local stack, one executor process per mode), a few tasks per mode,
poll_freq 0.5 s, P4 with 4 tasks, P5 with 1 MiB, and the packing comparison with 6 electrons through
a Covalent server (Batch's latency modelled 20x faster), the per-electron overhead through Covalent
(two trivial electrons per executor), and warm VMs (a chain of two electrons with keep_warm and
without, the model 20x faster: about 50 s of the run). Checks the results' shape, not the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_emulators

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
MODE_KEYS = ("p1_p50_s", "p1_p90_s", "p1_max_s", "p2_reads_per_task", "p3_p50_s",
             "p4_tasks", "p4_completed", "p4_rss_growth_mb", "p5_ratio")
MACHINE_KEYS = ("cpu_model", "cores", "memory_gib", "python", "os")
PHASE_KEYS = ("status", "reason", "share_s", "bound_s", "used_s", "cpu_model")


def test_bench_smoke_run_writes_every_figure(tmp_path):
    require_emulators()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=450, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    (path,) = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    for key in MACHINE_KEYS:
        assert results["machine"][key], key
    for mode in ("event", "poll"):
        figures = results[mode]
        missing = [key for key in MODE_KEYS if key not in figures]
        assert not missing, f"{mode}: missing {missing}"
        assert None not in [figures[key] for key in MODE_KEYS], f"{mode}: {({k: figures[k] for k in MODE_KEYS})}"
        assert figures["p1_completed"] == figures["p1_tasks"] == 3
        assert figures["p4_completed"] == figures["p4_tasks"] == 4
        assert figures["p5_completed"]
        assert 0 < figures["p1_p50_s"] <= figures["p1_p90_s"] <= figures["p1_max_s"] < 30
        assert 0 < figures["p3_p50_s"] < 30
        assert figures["worker_timed"] == 3, "the timing wrapper did not record every worker"
    # Events mode reads Batch once per task (confirming its SUCCEEDED); polling reads every poll_freq.
    assert results["event"]["p2_reads_per_task"] == 1
    assert results["poll"]["p2_reads_per_task"] >= 1
    assert results["event"]["p4_subscriber_streams"] == 1
    assert set(results["targets"]) >= {"p1_event_p50_le_100ms", "p3_event_p50_le_150ms", "p5_event_ratio_ge_85pct"}
    assert "| P1 notice latency p50 |" in proc.stdout
    packing = results["packing"]
    assert packing["packed"]["status"] == packing["unpacked"]["status"] == "COMPLETED", packing
    assert packing["unpacked"]["jobs"] == 6 and packing["packed"]["jobs"] == 1, "six electrons, one pack"
    assert packing["packed"]["vm_boots"] == 2, "pack_parallelism 2: two VMs, each reused"
    assert packing["mutations_per_electron"] == round(1 / 6, 4)
    assert "| wall time (model s) |" in proc.stdout
    overhead = results["overhead"]
    assert len(overhead["samples_s"]["gcpbatch"]) == len(overhead["samples_s"]["local"]) == 2
    assert 0 < overhead["local_p50_s"] and 0 < overhead["gcpbatch_p50_s"], overhead
    assert results["worker_overhead_s"] > 0 and "worker_overhead_le_03s" in results["targets"]
    assert "Per-electron overhead through Covalent" in proc.stdout
    # Both warm executors' rounds each ran on the VM the round before left, or are named as cold.
    warm_rounds = [len(overhead["samples_s"][key]) for key in ("gcpbatch_warm", "gcpbatch_warm_unpacked")]
    assert sum(warm_rounds) + len(overhead["cold_rounds"]) == 4 and overhead["warm_rounds"] == sum(warm_rounds), overhead
    assert len(overhead["warm_worker_samples_s"]) == overhead["warm_rounds"], "every warm round has its claim and result"
    if overhead["warm_rounds"]:
        assert 0 < overhead["warm_worker_overhead_p50_s"], overhead
        assert "On a warm VM (keep_warm" in proc.stdout
    assert {"overhead_gcpbatch_warm_p50_le_03s", "warm_worker_overhead_le_005s"} <= set(results["targets"])
    warm = results["warm"]
    chain = warm["chain"]
    for key in ("warm", "cold"):
        run = chain[key]
        assert run["status"] == "COMPLETED" and run["result_ok"] and run["settled"], (key, run)
        assert set(run) >= {"wall_s", "wall_real_s", "vm_boots", "vm_seconds", "dispatch_jobs", "warm_electrons"}, run
    assert chain["cold"]["vm_boots"] == chain["cold"]["dispatch_jobs"] == 2 and chain["cold"]["warm_electrons"] == 0
    # The second electron runs on the first one's VM (one boot), unless the machine was too slow for it.
    assert chain["warm"]["vm_boots"] + chain["warm"]["warm_electrons"] == 2, chain["warm"]
    assert chain["wall_ratio"] is not None and chain["vm_seconds_ratio"] is not None
    assert {"warm_chain_boots_1_against_n", "warm_chain_wall_le_025", "warm_chain_vm_seconds_le_cold"} <= set(results["targets"])
    assert f"Warm VMs on {results['machine']['cpu_model']}: a chain of 2 electrons" in proc.stdout
    assert f"time scale {warm['time_scale']:g}" in proc.stdout
    # What ran: every phase has its record, with its bound, the time it used and the machine's CPU.
    phases = results["phases"]
    assert list(phases) == ["setup", "event", "poll", "packing", "overhead", "warm"]
    for name, record in phases.items():
        assert record["status"] == "ran", (name, record)
        assert set(record) >= set(PHASE_KEYS), (name, record)
        assert 0 < record["used_s"] <= record["bound_s"] + 20, (name, record)
        assert record["cpu_model"] == results["machine"]["cpu_model"]
    for mode in ("event", "poll"):
        assert list(phases[mode]["phases"]) == ["warmup", "p1", "p4", "p5"]
        assert all(r["status"] == "ran" and r["bound_s"] > 0 for r in phases[mode]["phases"].values())
    assert results["outcome"] == "complete" and results["complete"]
    assert f"What ran on {results['machine']['cpu_model']}" in proc.stdout
    assert f"Event against polling on {results['machine']['cpu_model']}" in proc.stdout
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 2 and sum(name.endswith("-packing.png") for name in pngs) == 1, pngs
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG")
