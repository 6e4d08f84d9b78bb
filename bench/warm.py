"""Warm VMs, measured (issue 27): a chain of electrons, each taking the one before's output,
dispatched through a real Covalent server on a local stack whose Batch service runs the realistic
latency model, once with ``keep_warm`` and once without; then, if asked, a fan-out followed by a
dependent fan-out, with the default packing and with ``pack_window = 0``.

    python -m bench.warm OUT.json [--electrons N] [--stage-electrons M] [--task-s 5] [--keep-warm-s 60]
                                  [--time-scale S] [--modes warm,cold,stages_packed,stages_warm]
                                  [--timeout-s 1500] [--deadline T (shared by expected_real_s)]

(N, M, S and the keep_warm default to make bench's: bench/harness.py PARAMETERS.)

Every electron sleeps ``--task-s`` seconds of model time (``task_s * time_scale`` real seconds),
and the warm runs keep each VM ``--keep-warm-s`` model seconds (``keep_warm`` is the worker's own
real seconds: ``keep_warm_real_s``, at least ``KEEP_WARM_FLOOR_S``). What is not scaled: the real
CPU time of Covalent between two electrons, of each worker's start-up and of the pipeline, which
counts 1 / time_scale times over in model seconds.

The figures, per run: ``wall_s`` (dispatch -> the dispatch COMPLETED, model seconds; ``wall_real_s``
the same in real seconds), and once every VM of the run is gone (a warm VM waits ``keep_warm``
after its last electron, and is billed for it) the Batch service's counters (``GET /_admin/stats``,
before and after): ``vm_boots``, ``vm_seconds`` (billed, model seconds, as bench/packing.py),
``jobs`` (create_job calls; ``dispatch_jobs`` the jobs labelled with the dispatch),
``warm_electrons`` (electrons that ran on another electron's warm VM, as their stderr says). The
stage runs add ``stage2_jobs`` (jobs of a second-stage node) and ``stage2_vm_boots`` (VMs started
once the second stage began). A run whose dispatch does not end within its part of the time is
cancelled and named in ``cut``; the file is written after each run.

The warm chain runs first, on the fresh stack and server (what a first dispatch pays is the warm
run's, not the cold one's). Run by bench/harness.py in a process of its own (bench/covalent_runs.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from covalent_gcpbatch_plugin import clients, protocol
from covalent_gcpbatch_plugin.jobs import DISPATCH_LABEL, NODE_LABEL
from covalent_gcpbatch_plugin.local.batch.latency import LatencyModel

from . import batch_admin, batch_stats, log
from .covalent_runs import electron_nodes, on_covalent, wait_dispatch
from .harness import PARAMETERS
from .packing import delta, save

#: (key, keep_warm on, pack_window: None keeps the default), in the order they run.
MODES = (("warm", True, 0.0), ("cold", False, 0.0), ("stages_packed", True, None), ("stages_warm", True, 0.0))
CHAIN, STAGES = ("warm", "cold"), ("stages_packed", "stages_warm")
#: Real seconds each electron costs beyond its model time, whatever the scale: Covalent's hand-over,
#: the pipeline, a worker's start (measured on a 2-core AMD EPYC: 1.6 s per electron of the cold
#: chain, 0.5 s warm; the larger is taken). Only for sharing the phase's time (expected_real_s).
PER_ELECTRON_REAL_S = 1.6
#: Real seconds a warm VM waits at least: the next electron must find it still waiting 5 s
#: (protocol.OFFER_MARGIN_S), and the time from one electron's end to the next one's upload (its
#: executor's notice, Covalent's hand-over) is real time whatever the scale: about 0.5 s on a
#: 2-core AMD EPYC, more when the machine is loaded.
KEEP_WARM_FLOOR_S = 15
#: Marker of an electron that ran on another electron's VM (warm_worker.py's words in its stderr).
WARM_MARK = "runs on the warm VM of Batch job"


def keep_warm_real_s(keep_model_s: float, scale: float) -> int:
    """``keep_warm`` (whole real seconds, as the job option is) for ``keep_model_s`` model seconds."""
    return max(KEEP_WARM_FLOOR_S, math.ceil(keep_model_s * scale))


def expected_real_s(key: str, n: int, task_s: float, scale: float, keep_real: float) -> float:
    """About how long run ``key`` of ``n`` electrons takes in real seconds, its VMs' tail included:
    each run's part of what is left before --deadline is in proportion to it (a cold chain of 10
    boots ten VMs one after another, ~1,000 model seconds; the warm chain one, and waits out its
    keep_warm). Measured at time scale 0.25 on a 2-core AMD EPYC (bench/results/2026-12-07.json,
    tails included): 59, 263, 73 and 75 s against 67, 266, 82 and 62 expected."""
    model = LatencyModel.realistic(scale)
    first = model.create_to_scheduled_s + model.boot_s + task_s  # a lone electron's own job, model seconds
    if key == "warm":
        return scale * (first + (n - 1) * task_s) + n * PER_ELECTRON_REAL_S + keep_real
    if key == "cold":
        return n * (scale * first + PER_ELECTRON_REAL_S)
    if key == "stages_packed":  # a pack per stage, its VMs booting at once
        return 2 * (scale * first + n * PER_ELECTRON_REAL_S)
    if key == "stages_warm":  # n jobs admitted one after another, then the second stage on their VMs
        return scale * (first + n / model.admission_per_s + task_s) + n * PER_ELECTRON_REAL_S + keep_real
    raise ValueError(f"no run {key!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.warm", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--electrons", type=int, default=PARAMETERS["warm_electrons"][0], help="electrons of the chain")
    parser.add_argument("--stage-electrons", type=int, default=PARAMETERS["warm_stage_electrons"][0],
                        help="electrons of each fan-out of the stage runs (0 skips them)")
    parser.add_argument("--task-s", type=float, default=5.0, help="each electron's run time, model seconds")
    parser.add_argument("--keep-warm-s", type=float, default=PARAMETERS["warm_keep_s"][0],
                        help="keep_warm of the warm runs, model seconds")
    parser.add_argument("--time-scale", type=float, default=PARAMETERS["warm_time_scale"][0],
                        help="real seconds per model second")
    parser.add_argument("--max-running", type=int, default=400, help="VMs the local Batch service runs at once")
    parser.add_argument("--modes", default=",".join(k for k, _, _ in MODES), help="which runs, in their order")
    parser.add_argument("--timeout-s", type=float, default=1500.0, help="bound on each run, real seconds")
    parser.add_argument("--deadline", type=float,
                        help="wall-clock time (time.time()) by which every run ends, shared by expected_real_s")
    return parser.parse_args(argv)


def chain_lattice(ct, executor):
    @ct.electron(executor=executor)
    def step(x, seconds):
        import time as _time

        _time.sleep(seconds)
        return x + 1

    @ct.lattice
    def chain(n, seconds):
        x = 0
        for _ in range(n):
            x = step(x, seconds)
        return x

    return chain, ("step",)


def stages_lattice(ct, executor):
    @ct.electron(executor=executor)
    def first_stage(i, seconds):
        import time as _time

        _time.sleep(seconds)
        return i

    @ct.electron(executor=executor)
    def second_stage(x, seconds):
        import time as _time

        _time.sleep(seconds)
        return x + 1

    @ct.lattice
    def stages(n, seconds):
        return [second_stage(first_stage(i, seconds), seconds) for i in range(n)]

    return stages, ("first_stage", "second_stage")


def dispatch_jobs(settings, dispatch_id: str) -> list:
    """The Batch jobs labelled with the dispatch (the job builder's label)."""
    batch = clients.batch_client(settings.batch_api_endpoint)
    jobs = batch.list_jobs(parent=protocol.location_name(settings.project_id, settings.region))
    return [job for job in jobs if job.labels.get(DISPATCH_LABEL) == dispatch_id.lower()]


def settle(endpoint: str, bound_s: float) -> float | None:
    """Seconds until the local Batch service has no job left running (a warm VM waits its
    ``keep_warm`` out, then its job ends and its VM is billed); None if not within ``bound_s``."""
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        if not batch_admin(endpoint, "active")["active"]:
            return round(time.monotonic() - started, 1)
        time.sleep(0.5)
    return None


def run_mode(ct, key: str, executor, args: argparse.Namespace, settings, timeout_s: float, keep_real: int) -> dict:
    stages = key in STAGES
    lattice, names = (stages_lattice if stages else chain_lattice)(ct, executor)
    n = args.stage_electrons if stages else args.electrons
    scale, endpoint = args.time_scale, settings.batch_api_endpoint
    before = batch_stats(endpoint)
    started = time.time()
    dispatch_id = ct.dispatch(lattice)(n, args.task_s * scale)
    # The VMs' tail (keep_warm) is waited for within the run's bound too.
    result = wait_dispatch(ct, dispatch_id, max(1.0, timeout_s - keep_real - 5))
    ended = time.time()
    settled_s = settle(endpoint, max(keep_real + 10.0, min(keep_real + 60.0, started + timeout_s - time.time())))
    after = batch_stats(endpoint)
    nodes = [node for name in names for node in electron_nodes(result, name)]
    figures = delta(before, after, scale, started)
    expected = list(range(1, n + 1)) if stages else n
    figures.update(
        status=str(result.status), electrons=len(nodes),
        completed=sum(str(node["status"]) == "COMPLETED" for node in nodes),
        result_ok=result.result == expected,
        failures=sorted({f"{node['status']}: {(node.get('error') or node.get('stderr') or '')[-300:]}"
                         for node in nodes if str(node["status"]) != "COMPLETED"})[:5],
        wall_s=round((ended - started) / scale, 1), wall_real_s=round(ended - started, 1),
        vm_lifetime_s=round(after["vms"]["lifetime_s"] - before["vms"]["lifetime_s"], 1),
        settled=settled_s is not None, settled_real_s=settled_s,
        warm_electrons=sum(WARM_MARK in (node.get("stderr") or "") for node in nodes),
        keep_warm_real_s=keep_real if key != "cold" else 0, pack_window=dict((k, w) for k, _, w in MODES)[key],
        electron_intervals=sorted(
            [round((node["start_time"].timestamp() - started) / scale, 2), round((node["end_time"].timestamp() - started) / scale, 2)]
            for node in nodes if node["start_time"] and node["end_time"]),
    )
    jobs = dispatch_jobs(settings, dispatch_id)
    figures["dispatch_jobs"] = len(jobs)
    if stages:
        second = [node for node in electron_nodes(result, "second_stage")]
        second_ids = {str(node["node_id"]) for node in second}
        figures["stage2_jobs"] = sum(job.labels.get(NODE_LABEL) in second_ids for job in jobs)
        begun = min((node["start_time"].timestamp() for node in second if node["start_time"]), default=None)
        figures["stage2_vm_boots"] = None if begun is None else sum(
            1 for since, _ in after["vms"].get("intervals", []) if since >= begun)
        figures["stage2_warm_electrons"] = sum(WARM_MARK in (node.get("stderr") or "") for node in second)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_real = keep_warm_real_s(args.keep_warm_s, args.time_scale)
    chosen = [(k, warm, window) for k, warm, window in MODES if k in args.modes.split(",")
              and (args.stage_electrons if k in STAGES else args.electrons)]
    results: dict = {"electrons": args.electrons, "stage_electrons": args.stage_electrons, "task_model_s": args.task_s,
                     "time_scale": args.time_scale, "keep_warm_model_s": args.keep_warm_s, "keep_warm_real_s": keep_real,
                     "runs": [k for k, _, _ in chosen]}
    log(f"warm: local stack with the realistic latency model, time scale {args.time_scale:g}, keep_warm {keep_real} s")
    with on_covalent("gcpbatch-bench-warm-", batch_max_running=args.max_running, batch_latency_model="realistic",
                     batch_time_scale=args.time_scale) as (ct, settings):
        for index, (key, warm, window) in enumerate(chosen):
            timeout_s = args.timeout_s
            if args.deadline is not None:
                expected = {k: expected_real_s(k, args.stage_electrons if k in STAGES else args.electrons, args.task_s,
                                               args.time_scale, keep_real) for k, _, _ in chosen[index:]}
                part = expected[key] / sum(expected.values())
                timeout_s = max(1.0, min(timeout_s, (args.deadline - time.time()) * part))
            kwargs = {"time_limit": 600, "queue_timeout": 7200, "keep_warm": keep_real if warm else 0}
            if window is not None:
                kwargs["pack_window"] = window
            executor = ct.executor.GCPBatchExecutor(**kwargs)
            log(f"warm: {key}: keep_warm {kwargs['keep_warm']} s, pack_window "
                f"{'default' if window is None else window}, bound {timeout_s:.0f} s")
            try:
                results[key] = run_mode(ct, key, executor, args, settings, timeout_s, keep_real)
            except TimeoutError as err:  # its bound: recorded as cut, the next run still goes
                results.setdefault("cut", {})[key] = str(err)
                log(f"warm: {key}: cut: {err}")
                settle(settings.batch_api_endpoint, keep_real + 30.0)  # its VMs must not serve the next run
            else:
                r = results[key]
                log(f"warm: {key}: wall {r['wall_s']} model s ({r['wall_real_s']} real), {r['vm_boots']} VM boots, "
                    f"{r['vm_seconds']} VM-seconds, {r['dispatch_jobs']} jobs, {r['warm_electrons']} warm electrons")
                if not r["settled"]:
                    results.setdefault("cut", {})[key] = "its VMs were still up at its bound: vm_seconds counts part of them"
            save(args.out, results)  # after each run: what it measured survives a stop at the harness's bound
    ok = all(results[k]["status"] == "COMPLETED" and results[k]["result_ok"] for k, _, _ in chosen if k in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
