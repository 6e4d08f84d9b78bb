"""Packing, measured: one fan-out dispatched through a real Covalent server twice on a local stack
whose Batch service runs the realistic latency model, once packed and once with one job per
electron (``pack_window = 0``).

    python -m bench.packing OUT.json [--electrons N] [--task-s 5] [--time-scale S]
                                     [--parallelism P] [--timeout-s 1500]

(N, S and P default to make bench's: bench/harness.py PARAMETERS.)

Every electron sleeps ``--task-s`` seconds of model time (``task_s * time_scale`` real seconds).
The figures, per mode: ``wall_s`` (dispatch -> the dispatch COMPLETED, in model seconds), and from
the Batch service's own counters (``GET /_admin/stats``, before and after): ``vm_boots``,
``vm_seconds`` (billed, model seconds), ``jobs`` (create_job calls) and ``batch_mutations``
(create, cancel and delete calls). ``timeline`` holds each electron's start and end as Covalent
recorded them, and the service's VM intervals, in model seconds from the dispatch, for the plot.
A mode whose dispatch does not end within ``--timeout-s`` is cancelled and named in ``cut``; the
file is written after each mode.

Run by bench/harness.py in a process of its own (Covalent reads where its config lives when it is
first imported: this process points it at a temporary directory before importing it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from covalent_gcpbatch_plugin.local.batch.runner import MUTATING_CALLS

from . import batch_stats, log
from .covalent_runs import electron_nodes, on_covalent, wait_dispatch
from .harness import PARAMETERS

MODES = (("unpacked", 0.0), ("packed", None))  # (key, pack_window: None keeps the default)
#: Each mode's part of what is left before --deadline when it starts: one job per electron takes
#: about twice the packed run's time (528 s against 265 s at 200 electrons, docs/performance.md).
WEIGHTS = {"unpacked": 2.0, "packed": 1.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.packing", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--electrons", type=int, default=PARAMETERS["packing_electrons"][0])
    parser.add_argument("--task-s", type=float, default=5.0, help="each electron's run time, model seconds")
    parser.add_argument("--time-scale", type=float, default=PARAMETERS["packing_time_scale"][0],
                        help="real seconds per model second")
    parser.add_argument("--parallelism", type=int, default=PARAMETERS["packing_parallelism"][0],
                        help="pack_parallelism of the packed run")
    parser.add_argument("--max-running", type=int, default=400, help="VMs the local Batch service runs at once")
    parser.add_argument("--modes", default="unpacked,packed", help="which runs, in order (default unpacked,packed)")
    parser.add_argument("--timeout-s", type=float, default=1500.0, help="bound on each mode's dispatch, real seconds")
    parser.add_argument("--deadline", type=float,
                        help="wall-clock time (time.time()) by which every dispatch ends, shared by WEIGHTS")
    return parser.parse_args(argv)


def delta(before: dict, after: dict, scale: float, dispatched_at: float) -> dict:
    calls = {k: after["calls"][k] - before["calls"][k] for k in after["calls"]}
    vms_b, vms_a = before["vms"], after["vms"]
    intervals = [[round((s - dispatched_at) / scale, 2), round((e - dispatched_at) / scale, 2)]
                 for s, e in vms_a.get("intervals", []) if s >= dispatched_at]
    return {
        "vm_boots": vms_a["boots"] - vms_b["boots"],
        "vm_seconds": round(vms_a["billed_s"] - vms_b["billed_s"], 1),
        "jobs": calls["create"],
        "batch_mutations": sum(calls[k] for k in MUTATING_CALLS),
        "batch_reads": calls["get"] + calls["list"] + calls["get_task"] + calls["list_tasks"],
        "vm_intervals": intervals,
    }


def run_mode(ct, executor, electrons: int, sleep_s: float, endpoint: str, scale: float, timeout_s: float) -> dict:
    @ct.electron(executor=executor)
    def electron(i, seconds):
        import time as _time

        _time.sleep(seconds)
        return i

    @ct.lattice
    def fan_out(n, seconds):
        return [electron(i, seconds) for i in range(n)]

    before = batch_stats(endpoint)
    started = time.time()
    result = wait_dispatch(ct, ct.dispatch(fan_out)(electrons, sleep_s), timeout_s)
    ended = time.time()
    after = batch_stats(endpoint)
    nodes = electron_nodes(result, "electron")
    figures = delta(before, after, scale, started)
    figures["status"] = str(result.status)
    figures["completed"] = sum(str(n["status"]) == "COMPLETED" for n in nodes)
    figures["failures"] = sorted({f"{n['status']}: {(n.get('error') or n.get('stderr') or '')[-300:]}"
                                  for n in nodes if str(n["status"]) != "COMPLETED"})[:5]
    figures["wall_s"] = round((ended - started) / scale, 1)
    figures["electron_intervals"] = sorted(
        [round((n["start_time"].timestamp() - started) / scale, 2), round((n["end_time"].timestamp() - started) / scale, 2)]
        for n in nodes if n["start_time"] and n["end_time"])
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict = {"tasks": args.electrons, "task_model_s": args.task_s, "time_scale": args.time_scale,
                     "pack_parallelism": args.parallelism}
    log(f"packing: local stack with the realistic latency model, time scale {args.time_scale:g}")
    with on_covalent("gcpbatch-bench-packing-", batch_max_running=args.max_running, batch_latency_model="realistic",
                     batch_time_scale=args.time_scale) as (ct, settings):
        chosen = [(k, w) for k, w in MODES if k in args.modes.split(",")]
        for index, (key, window) in enumerate(chosen):
            timeout_s = args.timeout_s
            if args.deadline is not None:
                part = WEIGHTS[key] / sum(WEIGHTS[k] for k, _ in chosen[index:])
                timeout_s = max(1.0, min(timeout_s, (args.deadline - time.time()) * part))
            kwargs = {"time_limit": 600, "queue_timeout": 7200, "pack_parallelism": args.parallelism}
            if window is not None:
                kwargs["pack_window"] = window
            executor = ct.executor.GCPBatchExecutor(**kwargs)
            log(f"packing: {key}: {args.electrons} electrons of {args.task_s:g} model seconds")
            try:
                results[key] = run_mode(ct, executor, args.electrons, args.task_s * args.time_scale,
                                        settings.batch_api_endpoint, args.time_scale, timeout_s)
            except TimeoutError as err:  # its bound: recorded as cut, the next mode still runs
                results.setdefault("cut", {})[key] = str(err)
                log(f"packing: {key}: cut: {err}")
            else:
                log(f"packing: {key}: wall {results[key]['wall_s']} model s, {results[key]['vm_boots']} VM boots, "
                    f"{results[key]['vm_seconds']} VM-seconds, {results[key]['jobs']} jobs")
            save(args.out, results)  # after each mode: what it measured survives a stop at the harness's bound
    return 0 if all(results.get(key, {}).get("status") == "COMPLETED" or key in results.get("cut", {})
                    for key in args.modes.split(",")) else 1


def save(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
