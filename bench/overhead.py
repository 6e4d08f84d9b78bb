"""Per-electron overhead: a trivial electron dispatched through a real Covalent server, one at a
time, on GCPBatchExecutor (local stack, Batch's latency model off) and on Covalent's LocalExecutor,
in the same run.

    python -m bench.overhead OUT.json [--rounds N (make bench's default)] [--timeout-s 300]

A round is one dispatch of a lattice of one electron that returns at once; its overhead is from
just before ``ct.dispatch`` to the node's end as Covalent records it. One warm-up round per
executor is not counted. The figures: ``gcpbatch_p50_s``, ``local_p50_s`` and their samples.
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
    with on_covalent("gcpbatch-bench-overhead-") as (ct, _settings):
        for key, executor in (("gcpbatch", ct.executor.GCPBatchExecutor()), ("local", ct.executor.LocalExecutor())):
            one_round(ct, executor, args.timeout_s)  # warm-up, not counted
            samples[key] = [round(one_round(ct, executor, args.timeout_s), 4) for _ in range(args.rounds)]
            log(f"overhead: {key}: p50 {statistics.median(samples[key]):.3f} s over {args.rounds} rounds")
    results = {"rounds": args.rounds, "gcpbatch_p50_s": round(statistics.median(samples["gcpbatch"]), 4),
               "local_p50_s": round(statistics.median(samples["local"]), 4), "samples_s": samples}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
