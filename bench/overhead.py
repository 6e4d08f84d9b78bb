"""Per-electron overhead: a trivial electron dispatched through a real Covalent server, one at a
time, on GCPBatchExecutor (local stack, Batch's latency model off), on GCPBatchExecutor with
``keep_warm`` (each round's electron on the VM the round before left waiting: issue 27), the
same with ``pack_window = 0``, and on Covalent's LocalExecutor, in the same run.

    python -m bench.overhead OUT.json [--rounds N (make bench's default)] [--timeout-s 300]

A round is one dispatch of a lattice of one electron that returns at once; its overhead is from
just before ``ct.dispatch`` to the node's end as Covalent records it. One warm-up round per
executor is not counted. The figures: ``gcpbatch_p50_s``, ``gcpbatch_warm_p50_s``,
``gcpbatch_warm_unpacked_p50_s``, ``local_p50_s`` and their samples; an executor whose dispatch reaches its bound is named in ``cut`` (its rounds so
far are kept). GCPBatchExecutor runs with its defaults, ``pack_window`` included (a lone electron
waits that long for company before it is submitted); the warm ones with ``keep_warm`` too.

The warm rounds also give the warm worker's fixed cost per electron, ``warm_worker_overhead_p50_s``:
from its claim of the electron (``claim.json`` created) to the electron's result stored
(``result.pkl`` created), both times as the storage emulator records them: the offer read, the
claim, the fresh child, the task's download and unpickling, the call (a trivial one), the result's
pickling and upload. Only rounds that ran on the warm VM count (``warm_rounds`` of ``rounds``: the
electron's stderr names the VM, bench/warm.py WARM_MARK); a round that booted a VM of its own is
listed in ``cold_rounds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from covalent_gcpbatch_plugin import clients, protocol

from . import log
from .covalent_runs import electron_nodes, on_covalent, wait_dispatch
from .harness import PARAMETERS
from .warm import WARM_MARK

#: keep_warm of the warm executor, real seconds (the model is off): the next round's upload comes
#: a Covalent hand-over after the last one's end, about a second on a 2-core AMD EPYC; the margin
#: covers a loaded machine. The VM is stopped with the stack when the phase ends.
KEEP_WARM_S = 30
#: The executors whose rounds run on a warm VM: with the default ``pack_window`` (a lone electron
#: waits that long for company first, as every electron of a chain does) and without packing.
WARM_KEYS = ("gcpbatch_warm", "gcpbatch_warm_unpacked")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=PARAMETERS["overhead_rounds"][0])
    parser.add_argument("--timeout-s", type=float, default=300.0, help="bound on each dispatch, seconds")
    parser.add_argument("--deadline", type=float, help="wall-clock time (time.time()) by which every dispatch ends")
    return parser.parse_args(argv)


def one_round(ct, executor, timeout_s: float) -> tuple[float, str, dict]:
    """(overhead in seconds, the dispatch id, the electron's node as Covalent records it)."""
    @ct.electron(executor=executor)
    def trivial():
        return 1

    @ct.lattice
    def one():
        return trivial()

    started = time.time()
    dispatch_id = ct.dispatch(one)()
    result = wait_dispatch(ct, dispatch_id, timeout_s, step_s=0.1)
    (node,) = electron_nodes(result, "trivial")
    if str(node["status"]) != "COMPLETED":
        raise RuntimeError(f"the trivial electron ended {node['status']}: {node.get('error') or node.get('stderr')}")
    return node["end_time"].timestamp() - started, dispatch_id, node


def warm_worker_overhead_s(bucket, dispatch_id: str, node_id: int) -> float | None:
    """Claim created -> result created for the electron's objects; None if either is missing
    (a keep_warm electron always has both: its runner claims it before it runs it)."""
    blobs = {Path(blob.name).name: blob for blob in bucket.list_blobs(prefix=protocol.dispatch_prefix(dispatch_id, node_id))}
    claim, result = blobs.get(protocol.CLAIM_OBJECT), blobs.get(protocol.RESULT_OBJECT)
    if claim is None or result is None:
        return None
    return (result.time_created - claim.time_created).total_seconds()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    samples: dict[str, list[float]] = {}
    results: dict = {"rounds": args.rounds, "samples_s": samples}
    warm_worker: list[float] = []
    results.update(keep_warm_s=KEEP_WARM_S, warm_worker_samples_s=warm_worker, cold_rounds=[])
    with on_covalent("gcpbatch-bench-overhead-") as (ct, settings):
        bucket = clients.storage_client(settings.project_id, settings.storage_emulator_host).bucket(settings.bucket_name)
        executors = (("gcpbatch", ct.executor.GCPBatchExecutor()),
                     ("gcpbatch_warm", ct.executor.GCPBatchExecutor(keep_warm=KEEP_WARM_S)),
                     ("gcpbatch_warm_unpacked", ct.executor.GCPBatchExecutor(keep_warm=KEEP_WARM_S, pack_window=0)),
                     ("local", ct.executor.LocalExecutor()))
        for index, (key, executor) in enumerate(executors):
            samples[key] = []
            # Each executor's rounds in their own part of what is left: one cannot starve the other.
            ends = None if args.deadline is None else time.time() + (args.deadline - time.time()) / (len(executors) - index)
            try:
                one_round(ct, executor, _left(args.timeout_s, ends))  # warm-up, not counted
                for number in range(args.rounds):
                    overhead, dispatch_id, node = one_round(ct, executor, _left(args.timeout_s, ends))
                    if key not in WARM_KEYS:
                        samples[key].append(round(overhead, 4))
                    elif WARM_MARK not in (node.get("stderr") or ""):
                        results["cold_rounds"].append(f"{key} {number}")  # booted a VM of its own: not a warm figure
                        log(f"overhead: {key} round {number} did not run on the warm VM")
                    else:
                        samples[key].append(round(overhead, 4))
                        worker_s = warm_worker_overhead_s(bucket, dispatch_id, node["node_id"])
                        if worker_s is not None:
                            warm_worker.append(round(worker_s, 4))
                    save(args.out, results)
            except TimeoutError as err:  # its bound: what it measured is kept, the next executor still runs
                results.setdefault("cut", {})[key] = str(err)
                log(f"overhead: {key}: cut after {len(samples[key])} rounds: {err}")
            if samples[key]:
                results[f"{key}_p50_s"] = round(statistics.median(samples[key]), 4)
                log(f"overhead: {key}: p50 {results[f'{key}_p50_s']:.3f} s over {len(samples[key])} rounds")
            save(args.out, results)
        results["warm_rounds"] = sum(len(samples.get(key, [])) for key in WARM_KEYS)
        if warm_worker:
            results["warm_worker_overhead_p50_s"] = round(statistics.median(warm_worker), 4)
            log(f"overhead: warm worker: claim -> result p50 {results['warm_worker_overhead_p50_s']:.3f} s")
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
