"""Per-electron overhead: a trivial electron dispatched through a real Covalent server, one at a
time, on GCPBatchExecutor (local stack, Batch's latency model off) and on Covalent's LocalExecutor,
in the same run.

    python -m bench.overhead OUT.json [--rounds N (make bench's default)] [--timeout-s 300]

A round is one dispatch of a lattice of one electron that returns at once; its overhead is from
just before ``ct.dispatch`` to the node's end as Covalent records it. One warm-up round per
executor is not counted. The figures: ``gcpbatch_p50_s``, ``local_p50_s`` and their samples; an
executor whose dispatch reaches its bound is named in ``cut`` (its rounds so far are kept).
GCPBatchExecutor runs with its defaults, ``pack_window`` included (a lone electron waits that long
for company before it is submitted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from . import log
from .covalent_runs import electron_nodes, on_covalent, wait_dispatch
from .harness import PARAMETERS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=PARAMETERS["overhead_rounds"][0])
    parser.add_argument("--timeout-s", type=float, default=300.0, help="bound on each dispatch, seconds")
    parser.add_argument("--deadline", type=float, help="wall-clock time (time.time()) by which every dispatch ends")
    return parser.parse_args(argv)


def one_round(ct, executor, timeout_s: float) -> float:
    @ct.electron(executor=executor)
    def trivial():
        return 1

    @ct.lattice
    def one():
        return trivial()

    started = time.time()
    result = wait_dispatch(ct, ct.dispatch(one)(), timeout_s, step_s=0.1)
    (node,) = electron_nodes(result, "trivial")
    if str(node["status"]) != "COMPLETED":
        raise RuntimeError(f"the trivial electron ended {node['status']}: {node.get('error') or node.get('stderr')}")
    return node["end_time"].timestamp() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    samples: dict[str, list[float]] = {}
    results: dict = {"rounds": args.rounds, "samples_s": samples}
    with on_covalent("gcpbatch-bench-overhead-") as (ct, _settings):
        executors = (("gcpbatch", ct.executor.GCPBatchExecutor()), ("local", ct.executor.LocalExecutor()))
        for index, (key, executor) in enumerate(executors):
            samples[key] = []
            # Each executor's rounds in their own part of what is left: one cannot starve the other.
            ends = None if args.deadline is None else time.time() + (args.deadline - time.time()) / (len(executors) - index)
            try:
                one_round(ct, executor, _left(args.timeout_s, ends))  # warm-up, not counted
                for _ in range(args.rounds):
                    samples[key].append(round(one_round(ct, executor, _left(args.timeout_s, ends)), 4))
                    save(args.out, results)
            except TimeoutError as err:  # its bound: what it measured is kept, the next executor still runs
                results.setdefault("cut", {})[key] = str(err)
                log(f"overhead: {key}: cut after {len(samples[key])} rounds: {err}")
            if samples[key]:
                results[f"{key}_p50_s"] = round(statistics.median(samples[key]), 4)
                log(f"overhead: {key}: p50 {results[f'{key}_p50_s']:.3f} s over {len(samples[key])} rounds")
            save(args.out, results)
    return 0


def _left(timeout_s: float, ends: float | None) -> float:
    """One dispatch's bound: ``timeout_s``, and no later than ``ends`` (wall clock)."""
    if ends is None:
        return timeout_s
    return max(1.0, min(timeout_s, ends - time.time()))


def save(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
