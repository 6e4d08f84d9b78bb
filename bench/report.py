"""The benchmark's figures, table and plot, from the recorded timestamps (no clocks read here).

Inputs: each executor process's marks (bench/driver.py), the local Batch service's
``GET /_admin/stats`` (call counters, per-job state-entry times) and the workers' marks
(bench/timed_worker.py). All are ``time.time()`` of one machine, so differences across processes
are meaningful (to the clock's resolution, well under a millisecond).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from . import bounds

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
#: Keys every mode's object has (tests/stack/test_bench_smoke.py checks them).
REQUIRED_KEYS = ("p1_p50_s", "p1_p90_s", "p1_max_s", "p2_reads_per_task", "p3_p50_s",
                 "p4_tasks", "p4_completed", "p4_rss_growth_mb", "p5_ratio")
TARGETS = {
    "p1_event_p50_s": 0.100,
    "p1_poll_over_event": 20.0,
    "p2_event_reads_per_task": 1.0,
    "p3_p50_s": 0.150,
    "p4_rss_growth_mb": 150.0,
    "p5_ratio": 0.85,  # issue 15 (was 0.70): medians over the payload rounds of one run
    # Packing (issue 15): packed against one job per electron, same fan-out, Batch's latency modelled.
    "packing_wall_ratio": 0.35,
    "packing_vm_seconds_ratio": 0.25,
    "packing_mutations_per_electron": 0.05,
    "overhead_gcpbatch_p50_s": 0.3,
    "worker_overhead_s": 0.3,
    # Warm VMs (issue 27): a chain with keep_warm against keep_warm = 0, Batch's latency modelled.
    # Boots: one for the whole chain against one per electron; VM-seconds: no more than the cold run's.
    "warm_chain_wall_ratio": 0.25,
    "warm_chain_vm_seconds_ratio": 1.0,
    # Model off, one trivial electron at a time on the VM the one before left waiting (bench/overhead.py):
    # through Covalent (default settings, pack_window included), and the warm worker's own claim -> result.
    "overhead_gcpbatch_warm_p50_s": 0.3,
    "warm_worker_overhead_s": 0.05,
}
#: Worker phases, in order (timed_worker.py marks; the Batch service's RUNNING and terminal times).
WORKER_PHASES = ("spawn", "imports", "client", "download", "call", "upload", "exit")


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _terminal(times: dict[str, float]) -> float | None:
    for state in TERMINAL:
        if state in times:
            return times[state]
    return None


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


class ModeData:
    def __init__(self, driver: dict, stats: dict, timings: dict[str, dict]) -> None:
        self.driver = driver
        self.jobs = stats["jobs"]
        self.marks = driver["marks"]
        self.timings = timings

    def ok_jobs(self, phase: str) -> list[str]:
        return [t["job_id"] for t in self.driver["tasks"]
                if t["phase"] == phase and t["ok"] and t["job_id"] in self.marks and t["job_id"] in self.jobs]

    def series(self, phase: str, start: str, end: str) -> list[float]:
        """end - start over the phase's completed tasks; a name is an executor mark, a Batch state
        (upper case), ``TERMINAL``, or ``w:<mark>`` for the worker's marks."""
        values = []
        for job in self.ok_jobs(phase):
            a, b = self._at(job, start), self._at(job, end)
            if a is not None and b is not None:
                values.append(b - a)
        return values

    def _at(self, job: str, name: str) -> float | None:
        if name == "TERMINAL":
            return _terminal(self.jobs.get(job, {}))
        if name.isupper():
            return self.jobs.get(job, {}).get(name)
        if name.startswith("w:"):
            return self.timings.get(job, {}).get(name[2:])
        return self.marks.get(job, {}).get(name)


#: Each worker phase as (from, to) in ModeData.series names.
WORKER_SPANS = {
    "spawn": ("RUNNING", "w:start"),
    "imports": ("w:start", "w:imported"),
    "client": ("w:imported", "w:download_start"),
    "download": ("w:download_start", "w:download_end"),
    "call": ("w:call_start", "w:call_end"),
    "upload": ("w:call_end", "w:end"),
    "exit": ("w:end", "TERMINAL"),
}
#: A task's whole path, in order (medians of these add up to about the median task).
TIMELINE = {
    "register": ("run_start", "upload_start"),
    "upload task": ("upload_start", "upload_end"),
    "bridge + function": ("upload_end", "QUEUED"),
    "queued": ("QUEUED", "RUNNING"),
    **{f"worker {k}": v for k, v in WORKER_SPANS.items()},
    "notice": ("TERMINAL", "wait_end"),
    "collect": ("wait_end", "collect_end"),
    "clean up": ("collect_end", "returned"),
}


def analyse_mode(data: ModeData) -> dict[str, Any]:
    d = data.driver
    out: dict[str, Any] = {"wait_mode": d["mode"], "failures": d.get("failures", {})}
    p1_phase = d.get("p1") or {"tasks": None, "completed": 0, "concurrency": None, "batch_calls": None}

    # P1: Batch's terminal state entry -> run() returned.
    p1 = data.series("p1", "TERMINAL", "returned")
    out.update(p1_p50_s=_r(pct(p1, 50)), p1_p90_s=_r(pct(p1, 90)), p1_max_s=_r(max(p1) if p1 else None),
               p1_tasks=p1_phase["tasks"], p1_completed=p1_phase["completed"], p1_concurrency=p1_phase["concurrency"],
               p1_samples_s=[_r(v) for v in sorted(p1)])
    breakdown = {
        "terminal -> executor knows (wait returned)": data.series("p1", "TERMINAL", "wait_end"),
        "result + stdout/stderr read (collect)": data.series("p1", "wait_end", "collect_end"),
        "task objects deleted (clean up)": data.series("p1", "collect_end", "returned"),
    }
    if d["mode"] == "events":
        breakdown = {
            "terminal -> published (Batch -> Pub/Sub)": data.series("p1", "TERMINAL", "published"),
            "published -> subscriber callback": data.series("p1", "published", "notified"),
            "callback -> wait returned": data.series("p1", "notified", "wait_end"),
            **breakdown,
        }
    out["p1_breakdown_p50_s"] = {k: _r(_median(v)) for k, v in breakdown.items()}

    # P2: Batch reads (get_job + list_jobs) per task during P1, counted by the Batch service.
    calls = p1_phase["batch_calls"]
    out["p2_reads_per_task"] = _r((calls["get"] + calls["list"]) / max(1, p1_phase["tasks"]), 3) if calls else None
    out["p2_batch_calls"] = calls
    out["p1_cpu_s_per_task"] = _per_task(p1_phase)

    # P3: upload finished (executor) -> job created (Batch's QUEUED entry).
    p3 = data.series("p1", "upload_end", "QUEUED")
    out.update(p3_p50_s=_r(pct(p3, 50)), p3_p90_s=_r(pct(p3, 90)), p3_max_s=_r(max(p3) if p3 else None),
               p3_samples_s=[_r(v) for v in sorted(p3)])

    # P4: scale.
    p4 = d.get("p4")
    if p4:
        wall = p4["ended"] - p4["started"]
        last = max((data.marks[j]["returned"] for j in data.ok_jobs("p4")), default=p4["started"])
        p4_notice = data.series("p4", "TERMINAL", "returned")
        returned = sorted(data.marks[j]["returned"] - p4["started"] for j in data.ok_jobs("p4"))
        out.update(
            p4_tasks=p4["tasks"], p4_completed=p4["completed"], p4_timed_out=p4["timed_out"], p4_errors=p4["errors"],
            p4_wall_s=_r(wall, 2), p4_tasks_per_s=_r(p4["completed"] / max(1e-9, last - p4["started"]), 3),
            p4_rss_before_mb=_r(p4["rss_before_mb"], 1), p4_rss_peak_mb=_r(p4["rss_peak_mb"], 1),
            p4_rss_after_mb=_r(p4["rss_after_mb"], 1), p4_rss_growth_mb=_r(p4["rss_growth_mb"], 1),
            p4_threads_peak=p4["threads_peak"], p4_subscriber_streams=p4["subscriber_streams"],
            p4_reads_per_task=_r((p4["batch_calls"]["get"] + p4["batch_calls"]["list"]) / max(1, p4["tasks"]), 3),
            p4_batch_calls=p4["batch_calls"],
            p4_cpu_s_per_task=_per_task(p4),
            p4_p1_p50_s=_r(pct(p4_notice, 50)), p4_p1_p90_s=_r(pct(p4_notice, 90)),
            p4_p1_max_s=_r(max(p4_notice) if p4_notice else None),
            p4_p3_p50_s=_r(pct(data.series("p4", "upload_end", "QUEUED"), 50)),
            p4_all_uploaded_s=_r(max((data.marks[j]["upload_end"] for j in data.ok_jobs("p4")), default=p4["started"])
                                 - p4["started"], 2),
            p4_returned_s=[_r(v, 2) for v in returned],
            p4_rss_samples=[(round(t - p4["started"], 2), mb) for t, mb in p4["rss_samples"]],
        )
    else:
        out.update(p4_tasks=None, p4_completed=0, p4_rss_growth_mb=None)

    # P5: payload round trips against raw transfers of the same bytes, medians over the rounds.
    p5 = d.get("p5")
    out["p5_ratio"] = None
    if p5:
        out.update(p5_mib=p5["mib"], p5_rounds=len(p5["rounds"]), p5_completed=p5["completed"],
                   p5_errors=sorted({r["error"] for r in p5["rounds"] if r["error"]}))
        rounds = [p5_round(data, r) for r in p5["rounds"] if r["completed"] and r["job_id"] in data.marks]
        if rounds:
            def med(key: str) -> float | None:
                values = [r[key] for r in rounds if r[key] is not None]
                return _median(values) if values else None

            raw, total, legs = med("raw_s"), med("total_s"), med("legs_s")
            raw_up = _median([r["raw_legs"]["argument upload_s"] for r in rounds])
            raw_down = _median([r["raw_legs"]["argument download_s"] for r in rounds])
            out.update(
                p5_ratio=_r(raw / total, 3),
                p5_transfer_ratio=_r(raw / legs, 3) if legs else None,
                p5_round_trip_s=_r(total, 3),
                p5_raw_round_trip_s=_r(raw, 3),
                p5_raw_upload_mib_s=_r(p5["mib"] / raw_up, 1),
                p5_raw_download_mib_s=_r(p5["mib"] / raw_down, 1),
                p5_pipeline_mib_s=_r(2 * p5["mib"] / total, 1),
                p5_legs_p50_s={name: _r(_median([r["legs"][name] for r in rounds if r["legs"][name] is not None]), 3)
                               for name in P5_LEGS},
                p5_raw_legs_p50_s={name: _r(_median([r["raw_legs"][name] for r in rounds]), 3)
                                   for name in rounds[0]["raw_legs"]},
                p5_rounds_s=[{k: (_r(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("legs", "raw_legs")}
                             for r in rounds],
            )

    # Where a task's time goes (P1 tasks, medians).
    out["timeline_p50_s"] = {name: _r(_median(data.series("p1", a, b))) for name, (a, b) in TIMELINE.items()}
    out["worker_p50_s"] = {name: _r(_median(data.series("p1", *WORKER_SPANS[name]))) for name in WORKER_PHASES}
    out["worker_total_p50_s"] = _r(_median(data.series("p1", "RUNNING", "TERMINAL")))
    overhead = []
    for job in data.ok_jobs("p1"):
        running, terminal, call_start, call_end = (data._at(job, n) for n in ("RUNNING", "TERMINAL", "w:call_start", "w:call_end"))
        if None not in (running, terminal, call_start, call_end):
            overhead.append((terminal - running) - (call_end - call_start))
    out["worker_overhead_p50_s"] = _r(_median(overhead))
    out["task_total_p50_s"] = _r(_median(data.series("p1", "run_start", "returned")))
    out["worker_timed"] = sum(1 for j in data.ok_jobs("p1") if j in data.timings)
    return out


#: The four transfers of a P5 round trip, as (from, to) in ModeData.series names.
P5_LEGS = {
    "executor upload (pickle + upload)": ("upload_start", "upload_end"),
    "worker download (download + unpickle)": ("w:download_start", "w:download_end"),
    "worker upload (pickle + upload)": ("w:call_end", "w:end"),
    "executor download (download + unpickle)": ("wait_end", "collect_end"),
}


def p5_round(data: ModeData, record: dict) -> dict[str, Any]:
    """One P5 round trip: run() time, its four transfer legs and the raw round trip after it."""
    job = record["job_id"]
    legs = {name: _diff(data._at(job, a), data._at(job, b)) for name, (a, b) in P5_LEGS.items()}
    return {
        "job_id": job,
        "total_s": data._at(job, "returned") - data._at(job, "run_start"),
        "legs": legs,
        "legs_s": sum(legs.values()) if None not in legs.values() else None,
        "raw_s": sum(record["raw"].values()),
        "raw_legs": record["raw"],
    }


def _per_task(phase: dict) -> dict[str, float] | None:
    """CPU seconds per task of each component during a phase ("batch" includes its workers)."""
    cpu = phase.get("cpu_s")
    if not cpu:
        return None
    return {name: round(seconds / max(1, phase["tasks"]), 4) for name, seconds in cpu.items()}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def packing_figures(packing: dict | None) -> dict[str, Any] | None:
    """The packing comparison (bench/packing.py) with its ratios; timelines kept for the plot."""
    if not packing or "packed" not in packing or "unpacked" not in packing:
        return packing
    packed, unpacked = packing["packed"], packing["unpacked"]

    def ratio(key: str) -> float | None:
        return round(packed[key] / unpacked[key], 3) if unpacked.get(key) else None

    return {**packing, "wall_ratio": ratio("wall_s"), "vm_seconds_ratio": ratio("vm_seconds"),
            "mutations_per_electron": round(packed["batch_mutations"] / max(1, packing["tasks"]), 4)}


def warm_chain_figures(warm: dict, cold: dict, electrons: int) -> dict[str, Any]:
    """The warm chain against the cold one: ratios (warm / cold) and the issue's goals, each None
    when a figure is missing (a run cut or failed): boots 1 against one per electron, wall time
    at most 0.25 of the cold run's, VM-seconds at most the cold run's."""
    def ratio(key: str) -> float | None:  # unrounded: the goals are checked on it, the figure is rounded
        a, b = warm.get(key), cold.get(key)
        return None if a is None or not b else a / b

    wall, vm_seconds = ratio("wall_s"), ratio("vm_seconds")
    boots = warm.get("vm_boots"), cold.get("vm_boots")
    return {
        "wall_ratio": _r(wall, 3), "vm_seconds_ratio": _r(vm_seconds, 3),
        "boots_one_against_each": None if None in boots else boots == (1, electrons),
        "wall_le_025": None if wall is None else wall <= TARGETS["warm_chain_wall_ratio"],
        "vm_seconds_le_cold": None if vm_seconds is None else vm_seconds <= TARGETS["warm_chain_vm_seconds_ratio"],
    }


def warm_figures(warm: dict | None) -> dict[str, Any] | None:
    """bench/warm.py's runs as ``chain`` (warm, cold, their ratios and goals) and ``stages``
    (packed with the defaults, and with pack_window 0), with the runs' common settings."""
    if not warm:
        return warm
    common = {k: v for k, v in warm.items() if k not in ("warm", "cold", "stages_packed", "stages_warm")}
    out: dict[str, Any] = dict(common)
    if "warm" in warm or "cold" in warm:
        chain = {k: warm[k] for k in ("warm", "cold") if k in warm}
        if len(chain) == 2:
            chain.update(warm_chain_figures(chain["warm"], chain["cold"], warm["electrons"]))
        out["chain"] = chain
    if "stages_packed" in warm or "stages_warm" in warm:
        out["stages"] = {short: warm[k] for short, k in (("packed", "stages_packed"), ("warm", "stages_warm")) if k in warm}
    return out


# ---------------------------------------------------------------------------------------------
# What ran: each phase's status
# ---------------------------------------------------------------------------------------------

#: A phase's status: it ran to its end; it reached its bound and was stopped (what it measured is
#: kept); it did not run (why is said); it failed (a crash, a task that failed or was wrong).
STATUSES = ("ran", "cut", "skipped", "failed")


def mode_status(driver: dict | None, ended: dict) -> tuple[str, str]:
    """(status, reason) of one executor process (bench/driver.py) from what it recorded and how it
    ended (``stopped``: it reached its bound and was stopped; ``exit``: its exit code)."""
    if driver is None:
        if ended["stopped"]:
            return "cut", "stopped at its bound before it recorded a phase"
        return "failed", f"exit {ended['exit']}, nothing recorded"
    sub = driver.get("phases", {})
    failed = {name: r.get("reason", "") for name, r in sub.items() if r.get("status") == "failed"}
    failed.update({name: why for name, why in driver.get("failures", {}).items() if name not in failed})
    if failed:
        return "failed", "; ".join(f"{name}: {why}" for name, why in failed.items())[:500]
    short = ", ".join(f"{name} {r['status']}" for name, r in sub.items() if r.get("status") in ("cut", "skipped"))
    if ended["stopped"]:
        return "cut", "stopped at its bound" + (f" ({short})" if short else "")
    if short:
        return "cut", short
    return "ran", ""


def child_status(name: str, data: dict | None, ended: dict) -> tuple[str, str]:
    """(status, reason) of the packing, overhead or warm process from what it wrote and how it ended."""
    cut = (data or {}).get("cut") or {}
    if name == "packing" and data:
        bad = [k for k in ("unpacked", "packed") if k in data and data[k].get("status") != "COMPLETED"]
        if bad:
            return "failed", "; ".join(f"{k}: {data[k]['status']} {data[k].get('failures')}" for k in bad)[:500]
    if name == "warm" and data:
        bad = [k for k in data.get("runs", ()) if k in data
               and (data[k].get("status") != "COMPLETED" or not data[k].get("result_ok"))]
        if bad:
            return "failed", "; ".join(f"{k}: {data[k]['status']}, result {'right' if data[k].get('result_ok') else 'wrong'} "
                                       f"{data[k].get('failures')}" for k in bad)[:500]
    if ended["stopped"]:
        return "cut", "stopped at its bound" + (f" ({', '.join(cut)} cut)" if cut else "")
    if ended["exit"] != 0:
        return "failed", f"exit {ended['exit']}"
    if data is None:
        return "failed", "it wrote no results"
    if cut:
        return "cut", "; ".join(f"{k}: {why}" for k, why in cut.items())[:500]
    return "ran", ""


def analyse(drivers: dict[str, dict | None], stats: dict, timings: dict[str, dict], *, config: dict,
            machine: dict, started: float, ended: float, packing: dict | None = None,
            overhead: dict | None = None, warm: dict | None = None,
            phases: dict[str, dict] | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine, "config": config, "started": started,
                               "duration_s": round(ended - started, 1)}
    # Per phase: status (STATUSES), reason, its share and bound, the time it used; the machine's CPU
    # beside it, as beside every figure.
    results["phases"] = {name: {**record, "cpu_model": machine["cpu_model"]} for name, record in (phases or {}).items()}
    results["outcome"] = bounds.outcome(r["status"] for r in results["phases"].values())
    def why(name: str, default: str) -> str:
        record = results["phases"].get(name) or {}
        return f"{record['status']}: {record.get('reason') or ''}".strip(": ") if record else default

    if config.get("overhead_rounds"):
        results["overhead"] = overhead or {"error": why("overhead", "the overhead comparison failed or overran")}
    if config.get("packing_electrons"):
        results["packing"] = packing_figures(packing) or {"error": why("packing", "the packing comparison failed or overran")}
    if config.get("warm_electrons") or config.get("warm_stage_electrons"):
        results["warm"] = warm_figures(warm) or {"error": why("warm", "the warm VMs' runs failed or overran")}
    for key, driver in drivers.items():
        if driver is None:
            results[key] = {**{k: None for k in REQUIRED_KEYS}, "error": why(key, "the executor process failed or overran")}
        else:
            results[key] = analyse_mode(ModeData(driver, stats, timings))
    results["batch_calls_total"] = stats["calls"]
    #: The worker's fixed cost per task (RUNNING -> terminal, less the task's own call), event mode, p50.
    results["worker_overhead_s"] = (results.get("event") or {}).get("worker_overhead_p50_s")
    results["notes"] = [
        f"The local Batch service runs at most {config['batch_max_running']} workers at once on this "
        f"{machine['cores']}-core machine, each a Python process (~1.5 CPU-s of start-up and imports): "
        "P4's tasks per second measure the local workers' CPU, not the pipeline or Cloud Batch.",
        "P4 polling runs the same count as events mode." if config["p4_tasks"]["event"] == config["p4_tasks"]["poll"]
        else f"P4 polling runs {config['p4_tasks']['poll']} tasks (events mode: {config['p4_tasks']['event']}) to keep "
             "the run within its time budget.",
        f"P5 ratio: time of the round trip's four transfers done with google-cloud-storage alone (upload, download, "
        "upload, download of the same bytes on the same emulator, right after each round trip) / the task's run() "
        "time, medians "
        f"over {config['payload_rounds']} round trips after one raw warm-up round trip; p5_transfer_ratio counts the "
        "four transfer legs only (the executor's and the worker's pickling included).",
    ]
    results["targets"] = targets(results)
    def complete(key: str) -> bool:
        r = results.get(key) or {}
        return (drivers.get(key) is not None and not r.get("failures") and r.get("p1_completed") == r.get("p1_tasks")
                and (not config["p4_tasks"][key] or r.get("p4_completed") == r.get("p4_tasks"))
                and (not config["payload_mib"] or bool(r.get("p5_completed"))))

    packed_ok = (not config.get("packing_electrons")
                 or all((results["packing"].get(k) or {}).get("status") == "COMPLETED" for k in ("packed", "unpacked")))
    warm_ok = "warm" not in results or (bool(warm) and all(
        (warm.get(k) or {}).get("status") == "COMPLETED" and warm[k].get("result_ok") for k in warm.get("runs", ())))
    only = [name for name in (config.get("only") or "").split(",") if name]
    wanted = {key for key in config["modes"].split(",") if key and (not only or key in only)}
    if only:  # a phase left out by --only is not missing from the run
        packed_ok = packed_ok or "packing" not in only
        warm_ok = warm_ok or "warm" not in only
    results["complete"] = (set(drivers) == wanted and all(complete(key) for key in drivers)
                           and packed_ok and warm_ok)
    return results


def targets(results: dict) -> dict[str, Any]:
    e, p = results.get("event", {}), results.get("poll", {})
    ratio = (p["p1_p50_s"] / e["p1_p50_s"]) if e.get("p1_p50_s") and p.get("p1_p50_s") else None
    chain = (results.get("warm") or {}).get("chain") or {}

    def le(value, bound):
        return None if value is None else value <= bound

    return {
        "p1_event_p50_le_100ms": le(e.get("p1_p50_s"), TARGETS["p1_event_p50_s"]),
        "p1_poll_over_event_p50": _r(ratio, 1),
        "p1_event_20x_below_poll": None if ratio is None else ratio >= TARGETS["p1_poll_over_event"],
        "p2_event_le_1_read_per_task": le(e.get("p2_reads_per_task"), TARGETS["p2_event_reads_per_task"]),
        "p3_event_p50_le_150ms": le(e.get("p3_p50_s"), TARGETS["p3_p50_s"]),
        "p4_event_all_complete": None if not e.get("p4_tasks") else e.get("p4_completed") == e.get("p4_tasks"),
        "p4_event_rss_growth_le_150mb": le(e.get("p4_rss_growth_mb"), TARGETS["p4_rss_growth_mb"]),
        "p5_event_ratio_ge_85pct": None if e.get("p5_ratio") is None else e["p5_ratio"] >= TARGETS["p5_ratio"],
        "overhead_gcpbatch_p50_le_03s": le((results.get("overhead") or {}).get("gcpbatch_p50_s"),
                                           TARGETS["overhead_gcpbatch_p50_s"]),
        "worker_overhead_le_03s": le(results.get("worker_overhead_s"), TARGETS["worker_overhead_s"]),
        "overhead_gcpbatch_warm_p50_le_03s": le((results.get("overhead") or {}).get("gcpbatch_warm_p50_s"),
                                                TARGETS["overhead_gcpbatch_warm_p50_s"]),
        "warm_worker_overhead_le_005s": le((results.get("overhead") or {}).get("warm_worker_overhead_p50_s"),
                                           TARGETS["warm_worker_overhead_s"]),
        "packing_wall_le_035": le((results.get("packing") or {}).get("wall_ratio"), TARGETS["packing_wall_ratio"]),
        "packing_vm_seconds_le_025": le((results.get("packing") or {}).get("vm_seconds_ratio"),
                                        TARGETS["packing_vm_seconds_ratio"]),
        "packing_mutations_per_electron_le_005": le((results.get("packing") or {}).get("mutations_per_electron"),
                                                    TARGETS["packing_mutations_per_electron"]),
        "warm_chain_boots_1_against_n": chain.get("boots_one_against_each"),
        "warm_chain_wall_le_025": chain.get("wall_le_025"),
        "warm_chain_vm_seconds_le_cold": chain.get("vm_seconds_le_cold"),
    }


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def _ms(value) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"


def _num(value, fmt: str = "{:g}") -> str:
    return "-" if value is None else fmt.format(value)


def _yes(flag) -> str:
    return {True: "met", False: "MISSED", None: "-"}[flag]


def _cpu(figures: dict, *names: str) -> str:
    cpu = figures.get("p4_cpu_s_per_task")
    if not cpu:
        return "-"
    return f"{sum(cpu.get(n, 0) for n in names) * 1000:.0f} ms"


def table(results: dict) -> str:
    e, p, t, c = results.get("event", {}), results.get("poll", {}), results["targets"], results["config"]
    poll_label = f"poll ({c['poll_freq_s']:g} s)"
    rows = [
        ("P1 notice latency p50", _ms(e.get("p1_p50_s")), _ms(p.get("p1_p50_s")),
         f"<= 100 ms, >= 20x below poll ({_num(t['p1_poll_over_event_p50'])}x)",
         _yes(t["p1_event_p50_le_100ms"] and t["p1_event_20x_below_poll"]
              if None not in (t["p1_event_p50_le_100ms"], t["p1_event_20x_below_poll"]) else None)),
        ("P1 notice latency p90", _ms(e.get("p1_p90_s")), _ms(p.get("p1_p90_s")), "", ""),
        ("P1 notice latency max", _ms(e.get("p1_max_s")), _ms(p.get("p1_max_s")), "", ""),
        ("P2 Batch reads per task (get + list)", _num(e.get("p2_reads_per_task")), _num(p.get("p2_reads_per_task")),
         "<= 1", _yes(t["p2_event_le_1_read_per_task"])),
        ("P3 upload -> job created p50", _ms(e.get("p3_p50_s")), _ms(p.get("p3_p50_s")), "<= 150 ms",
         _yes(t["p3_event_p50_le_150ms"])),
        ("P3 upload -> job created p90", _ms(e.get("p3_p90_s")), _ms(p.get("p3_p90_s")), "", ""),
        ("P4 tasks completed / in flight", f"{_num(e.get('p4_completed'))} / {_num(e.get('p4_tasks'))}",
         f"{_num(p.get('p4_completed'))} / {_num(p.get('p4_tasks'))}", "all", _yes(t["p4_event_all_complete"])),
        ("P4 executor RSS growth", _num(e.get("p4_rss_growth_mb"), "{:.0f} MB"), _num(p.get("p4_rss_growth_mb"), "{:.0f} MB"),
         "<= 150 MB", _yes(t["p4_event_rss_growth_le_150mb"])),
        ("P4 tasks per second", _num(e.get("p4_tasks_per_s"), "{:.2f}"), _num(p.get("p4_tasks_per_s"), "{:.2f}"),
         f"(bounded by {c['batch_max_running']} local workers)", ""),
        ("P4 Batch reads per task", _num(e.get("p4_reads_per_task")), _num(p.get("p4_reads_per_task")), "", ""),
        ("P4 CPU per task: executor", _cpu(e, "executor"), _cpu(p, "executor"), "", ""),
        ("P4 CPU per task: Batch service + worker", _cpu(e, "batch"), _cpu(p, "batch"), "", ""),
        ("P4 CPU per task: Pub/Sub, GCS, function, bridge", _cpu(e, "pubsub", "gcs", "function", "bridge"),
         _cpu(p, "pubsub", "gcs", "function", "bridge"), "", ""),
        ("P4 notice latency p50 / p90 under load", f"{_ms(e.get('p4_p1_p50_s'))} / {_ms(e.get('p4_p1_p90_s'))}",
         f"{_ms(p.get('p4_p1_p50_s'))} / {_ms(p.get('p4_p1_p90_s'))}", "", ""),
        (f"P5 {c['payload_mib']} MiB round trip / raw", _num(e.get("p5_ratio"), "{:.0%}"), _num(p.get("p5_ratio"), "{:.0%}"),
         f">= {TARGETS['p5_ratio']:.0%}", _yes(t["p5_event_ratio_ge_85pct"])),
        ("P5 round trip (run() start -> return) / raw",
         f"{_num(e.get('p5_round_trip_s'), '{:.1f} s')} / {_num(e.get('p5_raw_round_trip_s'), '{:.1f} s')}",
         f"{_num(p.get('p5_round_trip_s'), '{:.1f} s')} / {_num(p.get('p5_raw_round_trip_s'), '{:.1f} s')}", "", ""),
        ("P5 transfer legs only / raw", _num(e.get("p5_transfer_ratio"), "{:.0%}"), _num(p.get("p5_transfer_ratio"), "{:.0%}"),
         "", ""),
        ("task total (run() start -> return) p50", _ms(e.get("task_total_p50_s")), _ms(p.get("task_total_p50_s")), "", ""),
    ]
    cpu = results["machine"]["cpu_model"]
    lines = [f"Event against polling on {cpu}:", "",
             f"| figure | event | {poll_label} | target (event) | |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    worker = ["", f"Worker phases per task on {cpu} (P1 tasks, p50; `call` is the task itself, which sleeps in P1):", "",
              "| worker phase | event | poll |", "|---|---|---|"]
    for name in WORKER_PHASES:
        worker.append(f"| {name} | {_ms((e.get('worker_p50_s') or {}).get(name))} | {_ms((p.get('worker_p50_s') or {}).get(name))} |")
    worker.append(f"| total (RUNNING -> terminal) | {_ms(e.get('worker_total_p50_s'))} | {_ms(p.get('worker_total_p50_s'))} |")
    worker.append(f"| overhead (total - call) | {_ms(e.get('worker_overhead_p50_s'))} | {_ms(p.get('worker_overhead_p50_s'))} |")
    modes_ran = "event" in results or "poll" in results
    if not modes_ran:  # --only left the modes out: their tables would be all dashes
        lines, worker = [], []
    overhead, t = results.get("overhead") or {}, results["targets"]
    if overhead.get("gcpbatch_p50_s") is not None and overhead.get("local_p50_s") is not None:
        worker += ["", f"Per-electron overhead through Covalent on {cpu} (a trivial electron, dispatch -> node end, p50 of "
                   f"{overhead['rounds']}): GCPBatchExecutor {_ms(overhead['gcpbatch_p50_s'])} (target <= 300 ms: "
                   f"{_yes(t['overhead_gcpbatch_p50_le_03s'])}), LocalExecutor {_ms(overhead['local_p50_s'])}; the worker's "
                   f"fixed cost per task {_ms(results.get('worker_overhead_s'))} (target <= 300 ms: "
                   f"{_yes(t['worker_overhead_le_03s'])})."]
        if overhead.get("warm_rounds"):
            worker += ["", f"On a warm VM (keep_warm {overhead['keep_warm_s']} s, {overhead['warm_rounds']} rounds on the VM the "
                       f"round before left waiting): GCPBatchExecutor {_ms(overhead.get('gcpbatch_warm_p50_s'))} (target <= "
                       f"300 ms: {_yes(t['overhead_gcpbatch_warm_p50_le_03s'])}), with pack_window 0 "
                       f"{_ms(overhead.get('gcpbatch_warm_unpacked_p50_s'))}; the warm worker's fixed cost per electron "
                       f"(claim -> result stored) {_ms(overhead.get('warm_worker_overhead_p50_s'))} (target <= 50 ms: "
                       f"{_yes(t['warm_worker_overhead_le_005s'])})."]
    elif overhead:
        worker += ["", f"Overhead on {cpu}: {overhead.get('error') or (results.get('phases') or {}).get('overhead', {}).get('reason') or 'incomplete'}"
                   + "".join(f"; {k} p50 {_ms(overhead.get(f'{k}_p50_s'))} over {len(v)} rounds"
                             for k, v in (overhead.get("samples_s") or {}).items() if v)]
    packing = results.get("packing") or {}
    if packing.get("packed") and packing.get("unpacked"):
        pk, up, t = packing["packed"], packing["unpacked"], results["targets"]
        worker += ["", f"Packing on {cpu}: {packing['tasks']} electrons of {packing['task_model_s']:g} s (model time), Batch's latency "
                   f"modelled at time scale {packing['time_scale']:g}, through a Covalent server; packed with "
                   f"pack_parallelism {packing['pack_parallelism']}:", "",
                   "| figure | packed | one job each | ratio | target | |", "|---|---|---|---|---|---|",
                   f"| wall time (model s) | {pk['wall_s']:g} | {up['wall_s']:g} | {_num(packing['wall_ratio'])} | <= 0.35 | "
                   f"{_yes(t['packing_wall_le_035'])} |",
                   f"| VM-seconds billed | {pk['vm_seconds']:g} | {up['vm_seconds']:g} | {_num(packing['vm_seconds_ratio'])} | "
                   f"<= 0.25 | {_yes(t['packing_vm_seconds_le_025'])} |",
                   f"| VM boots | {pk['vm_boots']} | {up['vm_boots']} | | | |",
                   f"| Batch jobs | {pk['jobs']} | {up['jobs']} | | | |",
                   f"| Batch mutations per electron | {_num(packing['mutations_per_electron'])} | "
                   f"{_num(round(up['batch_mutations'] / max(1, packing['tasks']), 4))} | | <= 0.05 | "
                   f"{_yes(t['packing_mutations_per_electron_le_005'])} |",
                   f"| Batch reads per electron | {_num(round(pk['batch_reads'] / max(1, packing['tasks']), 3))} | "
                   f"{_num(round(up['batch_reads'] / max(1, packing['tasks']), 3))} | | | |"]
    elif packing:
        worker += ["", f"Packing on {cpu}: {packing.get('error') or (results.get('phases') or {}).get('packing', {}).get('reason') or 'incomplete'}"]
    worker += warm_table(results)
    worker += phase_table(results)
    m = results["machine"]
    footer = ["", f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, {m['os']}."]
    if modes_ran:
        footer += [f"P1-P3: {c['tasks']} tasks per mode, {c['concurrency']} in flight; P4: {c['p4_tasks']['event']} (event) / "
                   f"{c['p4_tasks']['poll']} (poll) in flight from one process; local Batch service --max-running "
                   f"{c['batch_max_running']}; run took {results['duration_s']:.0f} s.", *[f"Note: {n}" for n in results["notes"]]]
    else:
        footer.append(f"Run took {results['duration_s']:.0f} s.")
    return "\n".join(lines + worker + footer)


def _pair(a, b) -> str:
    return f"{_num(a)} / {_num(b)}"


def warm_table(results: dict) -> list[str]:
    """The warm VMs' chain and stages (bench/warm.py), model seconds, with the scale and the CPU."""
    warm = results.get("warm") or {}
    cpu, t = results["machine"]["cpu_model"], results["targets"]
    if not warm or "error" in warm:
        return ["", f"Warm VMs on {cpu}: {warm.get('error') or 'not run'}"] if warm else []
    scale = (f"Batch's latency modelled at time scale {warm['time_scale']:g} (model seconds; Covalent's and the workers' "
             f"real CPU time count 1 / {warm['time_scale']:g} times over), through a Covalent server, keep_warm "
             f"{warm['keep_warm_real_s']} s real ({warm['keep_warm_real_s'] / warm['time_scale']:g} model s)")
    lines: list[str] = []
    chain = warm.get("chain") or {}
    if chain.get("warm") and chain.get("cold"):
        w, c = chain["warm"], chain["cold"]
        lines += ["", f"Warm VMs on {cpu}: a chain of {warm['electrons']} electrons of {warm['task_model_s']:g} s, each taking "
                  f"the one before's output, pack_window 0; {scale}:", "",
                  "| figure | keep_warm | keep_warm = 0 | ratio | goal | |", "|---|---|---|---|---|---|",
                  f"| wall time, dispatch -> COMPLETED (model s) | {w['wall_s']:g} | {c['wall_s']:g} | {_num(chain['wall_ratio'])} | "
                  f"<= 0.25 | {_yes(t['warm_chain_wall_le_025'])} |",
                  f"| wall time (real s) | {w['wall_real_s']:g} | {c['wall_real_s']:g} | | | |",
                  f"| VM boots | {w['vm_boots']} | {c['vm_boots']} | | 1 against {warm['electrons']} | "
                  f"{_yes(t['warm_chain_boots_1_against_n'])} |",
                  f"| VM-seconds billed (model s) | {w['vm_seconds']:g} | {c['vm_seconds']:g} | {_num(chain['vm_seconds_ratio'])} | "
                  f"<= 1 | {_yes(t['warm_chain_vm_seconds_le_cold'])} |",
                  f"| Batch jobs of the dispatch | {w['dispatch_jobs']} | {c['dispatch_jobs']} | | | |",
                  f"| electrons run on a warm VM | {w['warm_electrons']} | {c['warm_electrons']} | | | |"]
    elif chain:
        lines += ["", f"Warm VMs' chain on {cpu}: " + ", ".join(
            f"{k} wall {r['wall_s']:g} model s, {r['vm_boots']} boots, {r['vm_seconds']:g} VM-s" for k, r in chain.items())
            + f"; {'; '.join(f'{k}: {why}' for k, why in (warm.get('cut') or {}).items()) or 'incomplete'}"]
    stages = warm.get("stages") or {}
    if stages:
        keys = [k for k in ("packed", "warm") if k in stages]
        label = {"packed": "default packing", "warm": "pack_window 0"}
        lines += ["", f"Warm VMs on {cpu}: a fan-out of {warm['stage_electrons']} electrons of {warm['task_model_s']:g} s, then "
                  f"a fan-out of {warm['stage_electrons']} each taking one of their outputs; {scale}:", "",
                  "| figure | " + " | ".join(label[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
        rows = [("wall time, dispatch -> COMPLETED (model s)", lambda r: _num(r["wall_s"])),
                ("VM boots: all / stage 2's", lambda r: _pair(r["vm_boots"], r.get("stage2_vm_boots"))),
                ("Batch jobs: all / stage 2's", lambda r: _pair(r["dispatch_jobs"], r.get("stage2_jobs"))),
                ("stage-2 electrons run on a warm VM", lambda r: _num(r.get("stage2_warm_electrons"))),
                ("VM-seconds billed (model s)", lambda r: _num(r["vm_seconds"]))]
        lines += [f"| {name} | " + " | ".join(cell(stages[k]) for k in keys) + " |" for name, cell in rows]
    return lines


def phase_table(results: dict) -> list[str]:
    """What ran: each phase's status, bound and time used, the mode's own phases indented."""
    phases = results.get("phases") or {}
    if not phases:
        return []
    lines = ["", f"What ran on {results['machine']['cpu_model']} (budget {results['config']['budget_s']:g} s; "
             f"outcome: {results['outcome']}):", "", "| phase | status | bound | used | note |", "|---|---|---|---|---|"]

    def row(name: str, r: dict) -> str:
        bound = f"{r['bound_s']:.0f} s" if r.get("bound_s") is not None else "-"
        used = f"{r['used_s']:.0f} s" if r.get("used_s") is not None else "-"
        return f"| {name} | {r['status']} | {bound} | {used} | {r.get('reason') or ''} |"

    for name, record in phases.items():
        lines.append(row(name, record))
        lines += [row(f"{name} {sub}", r) for sub, r in (record.get("phases") or {}).items()]
    return lines


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    packing, m = results.get("packing") or {}, results["machine"]
    packing_path = None
    if packing.get("packed") and packing.get("unpacked"):
        packing_path = plot_packing({**packing, "cpu_model": m["cpu_model"]}, path.with_name(path.stem + "-packing.png"), plt)
    if "event" not in results and "poll" not in results:  # no mode ran (--only): no figure of theirs
        return packing_path
    e, p, c = results.get("event", {}), results.get("poll", {}), results["config"]
    labels = {"event": "event", "poll": f"poll ({c['poll_freq_s']:g} s)"}
    colours = {"event": "tab:blue", "poll": "tab:orange"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    def cdf(ax, key, title, target=None):
        for mode, data in (("event", e), ("poll", p)):
            values = data.get(key) or []
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=labels[mode], color=colours[mode])
        if target:
            ax.axvline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target * 1000:.0f} ms")
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log)")
        ax.set_ylabel("fraction of tasks")
        ax.set_title(title)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)

    cdf(axes[0][0], "p1_samples_s", "P1: Batch terminal state -> run() returned", TARGETS["p1_event_p50_s"])
    cdf(axes[0][1], "p3_samples_s", "P3: upload finished -> job created", TARGETS["p3_p50_s"])

    ax = axes[1][0]
    for mode, data in (("event", e), ("poll", p)):
        done = data.get("p4_returned_s") or []
        if done:
            ax.step(done, range(1, len(done) + 1), where="post", color=colours[mode],
                    label=f"{labels[mode]}: {len(done)} tasks")
    ax2 = ax.twinx()
    for mode, data in (("event", e), ("poll", p)):
        samples = data.get("p4_rss_samples") or []
        if samples:
            ax2.plot([s[0] for s in samples], [s[1] for s in samples], color=colours[mode], linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since the tasks were started")
    ax.set_ylabel("tasks returned (solid)")
    ax2.set_ylabel("executor RSS, MB (dotted)")
    ax.set_title(f"P4: tasks in flight from one process (--max-running {c['batch_max_running']})")
    if ax.get_legend_handles_labels()[0]:  # P4 may have been skipped (--p4-tasks 0)
        ax.legend(loc="upper left")
    ax.grid(True, alpha=0.3)

    ax = axes[1][1]
    names = list((e.get("timeline_p50_s") or p.get("timeline_p50_s") or {}).keys())
    for row, (mode, data) in enumerate((("event", e), ("poll", p))):
        left = 0.0
        spans = data.get("timeline_p50_s") or {}
        for i, name in enumerate(names):
            width = max(0.0, spans.get(name) or 0.0)
            ax.barh(row, width, left=left, color=plt.cm.tab20(i % 20), edgecolor="white",
                    label=name if row == 0 else None)
            left += width
    ax.set_yticks([0, 1], [labels["event"], labels["poll"]])
    ax.set_ylim(-0.5, 2.4)  # room for the legend above the bars
    ax.set_xlabel("seconds (medians of P1 tasks, stacked)")
    ax.set_title("Where a task's time goes")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    m = results["machine"]
    fig.suptitle(f"covalent-gcpbatch-plugin on the local stack: {m['cpu_model']}, {m['cores']} cores, "
                 f"Python {m['python']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def running(intervals: list[list[float]], end: float, step: float) -> tuple[list[float], list[int]]:
    """How many of ``intervals`` are open at each ``step`` from 0 to ``end``."""
    xs = [i * step for i in range(int(end / step) + 2)]
    return xs, [sum(1 for a, b in intervals if a <= x < b) for x in xs]


def plot_packing(packing: dict, path: Path, plt) -> Path:
    """Electrons running and VMs alive over time, packed against one job each (model seconds)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    end = max(packing[k]["wall_s"] for k in ("packed", "unpacked"))
    for ax, key in zip(axes, ("unpacked", "packed")):
        data = packing[key]
        for name, intervals, colour in (("electrons in run()", data["electron_intervals"], "tab:blue"),
                                        ("VMs alive", data["vm_intervals"], "tab:red")):
            xs, ys = running(intervals, end, max(1.0, end / 400))
            ax.step(xs, ys, where="post", color=colour, label=name)
        ax.set_title(f"{key}: wall {data['wall_s']:g} s, {data['vm_boots']} VM boots, {data['vm_seconds']:g} VM-s")
        ax.set_xlabel("model seconds since the dispatch")
        ax.legend()
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Packing on {packing['cpu_model']}: {packing['tasks']} electrons of {packing['task_model_s']:g} s, Batch latency modelled "
                 f"(time scale {packing['time_scale']:g}), pack_parallelism {packing['pack_parallelism']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
