"""One executor process of the benchmark: drives ``GCPBatchExecutor.run()`` for one wait mode.

    python -m bench.driver CONFIG.json OUT.json

Run by bench/harness.py, one process per mode, so that each mode starts from a fresh process (its
own subscriber, clients and heap: the P4 memory figure is that process's growth). It records
timestamps only; the harness joins them with the Batch service's state-entry times and the
workers' own marks, and computes the figures.

``BenchExecutor`` is the real executor with two changes: the three calls Covalent's server would
answer (job handle, cancel requested, version info) are answered here, and ``time.time()`` marks
are taken around its steps (wall clock, as the Batch service's state-entry times):

* ``run_start`` / ``returned``: entry to ``run()`` and the moment it returns the result;
* ``upload_start`` / ``upload_end``: around ``_upload_task`` (pickle, then upload with the spec);
* ``notified``: the subscriber's callback got the job's terminal notification (events mode);
* ``wait_end``: ``_wait`` returned (terminal state known); ``collect_end``: ``_collect`` returned.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cloudpickle
import covalent

import bench.tasks
from bench import batch_stats, bounds, log
from covalent_gcpbatch_plugin import clients, events
from covalent_gcpbatch_plugin.gcpbatch import GCPBatchExecutor
from covalent_gcpbatch_plugin.local.processes import proc_stat
from covalent_gcpbatch_plugin.protocol import parse_notification

cloudpickle.register_pickle_by_value(bench.tasks)

#: job id -> marks; written from the event loop, worker threads and the subscriber's callback
#: thread (single dict operations, atomic under the GIL).
MARKS: dict[str, dict[str, Any]] = {}
#: A task's error when its phase was cut at its bound (a bounded benchmark's outcome, not a failure).
CUT = "timed out (phase bound)"
#: At most this long (and a tenth of its bound) of a phase goes to stopping its tasks after a cut.
CANCEL_GRACE_S = 30.0
#: No phase runs with less than this (the mode's deadline still caps it).
MIN_PHASE_S = 5.0
VERSIONS = {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "covalent": covalent.__version__}


class BenchExecutor(GCPBatchExecutor):
    """GCPBatchExecutor answering Covalent's proxy calls locally, with timestamps."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Covalent's execute() sets these before run(); print() to None would go to our stdout.
        self._task_stdout = io.StringIO()
        self._task_stderr = io.StringIO()
        self._bench_job = ""
        self._bench_run_start = 0.0

    async def set_job_handle(self, handle: Any) -> None:
        self._bench_job = str(handle)
        MARKS[self._bench_job] = {"run_start": self._bench_run_start}

    async def get_cancel_requested(self) -> bool:
        return False

    async def get_version_info(self) -> dict:
        return dict(VERSIONS)

    def _upload_task(self, objects, spec, workdir, task) -> None:
        marks = MARKS[objects.job_id]
        marks["upload_start"] = time.time()
        super()._upload_task(objects, spec, workdir, task)
        marks["upload_end"] = time.time()

    async def _wait(self, job_id, inbox, **kwargs):
        outcome = await super()._wait(job_id, inbox, **kwargs)
        MARKS[job_id]["wait_end"] = time.time()
        MARKS[job_id]["state"] = outcome.state.value
        return outcome

    def _collect(self, job_id, objects, outcome, workdir, step):
        try:
            return super()._collect(job_id, objects, outcome, workdir, step)
        finally:
            MARKS[job_id]["collect_end"] = time.time()

    async def run(self, function, args, kwargs, task_metadata):
        self._bench_run_start = time.time()
        result = await super().run(function, args, kwargs, task_metadata)
        MARKS[self._bench_job]["returned"] = time.time()  # right where run() returns
        return result


def _instrument_subscriber() -> None:
    """Mark when the subscriber's callback receives a job's terminal notification (and when the
    emulator accepted it: the message's publish_time), then hand the message on unchanged."""
    original = events.JobEvents._on_message

    def _on_message(self, message) -> None:
        received = time.time()
        event = parse_notification(dict(message.attributes), message.data)
        if event is not None and event.state.is_terminal and event.job_id in MARKS:
            marks = MARKS[event.job_id]
            marks.setdefault("notified", received)
            marks.setdefault("published", message.publish_time.timestamp())
        original(self, message)

    events.JobEvents._on_message = _on_message


def _reads(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {method: after[method] - before[method] for method in ("get", "list", "create", "cancel", "delete")}


def cpu_seconds(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, own + reaped children) of each named process group, and of
    this process. The local Batch service reaps its workers, so its figure includes theirs."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = {name: 0 for name in groups}
    by_group = {pgid: name for name, pgid in groups.items()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = proc_stat(int(entry.name))
        name = by_group.get(int(fields[2])) if fields else None
        if name is not None:
            totals[name] += sum(int(f) for f in fields[11:15])
    out = {name: ticks / tick for name, ticks in totals.items()}
    t = os.times()
    out["executor"] = t.user + t.system
    return out


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """Samples this process's resident set every ``interval`` seconds while running."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), _rss_mb()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), _rss_mb()))


class Driver:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.mode = config["mode"]
        self.executor_kwargs = dict(config["executor"])
        self.batch_endpoint = config["batch_api_endpoint"]
        self.deadline = float(config["deadline"])  # wall clock: the harness's hard bound
        self.tasks: list[dict] = []  # one record per run() call

    def _bounded(self, want_s: float) -> float:
        return max(1.0, min(want_s, self.deadline - time.time()))

    async def _one(self, phase: str, dispatch_id: str, node_id: int, function, args: tuple, expect, **overrides):
        executor = BenchExecutor(**{**self.executor_kwargs, **overrides})
        record = {"phase": phase, "node_id": node_id, "job_id": "", "ok": False, "error": ""}
        self.tasks.append(record)
        try:
            result = await executor.run(function, list(args), {}, {"dispatch_id": dispatch_id, "node_id": node_id,
                                                                    "results_dir": tempfile.gettempdir()})
            record["ok"] = bool(expect(result))
            if not record["ok"]:
                record["error"] = "wrong result"
        except asyncio.CancelledError:
            record["error"] = CUT
            raise
        except Exception as err:  # noqa: BLE001 - a failed task is a result of the benchmark
            record["error"] = f"{type(err).__name__}: {err}"[:500]
        finally:
            record["job_id"] = executor._bench_job
        return record

    def _dispatch_id(self, phase: str) -> str:
        return f"b{self.mode[0]}{phase}{uuid.uuid4().hex}"

    async def _phase(self, phase: str, count: int, concurrency: int, timeout_s: float, sleep_step_s: float = 0.0) -> dict:
        """``count`` add_one tasks, at most ``concurrency`` in flight; Batch call counts around it.
        Task i sleeps ``(i % 10) * sleep_step_s`` seconds. Bounded by ``timeout_s`` in all: at
        ``timeout_s`` less a grace the tasks still running are cancelled (each stops its job), and
        the phase waits at most that grace for them, so that the next phase starts on time."""
        dispatch_id = self._dispatch_id(phase)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int):
            async with gate:
                args = (i, (i % 10) * sleep_step_s)
                return await self._one(phase, dispatch_id, i, bench.tasks.add_one, args, lambda r, i=i: r == i + 1)

        entered, bound_s = time.time(), self._bounded(timeout_s)
        grace_s = min(CANCEL_GRACE_S, bound_s / 10)
        calls_before = (await asyncio.to_thread(batch_stats, self.batch_endpoint))["calls"]
        cpu_before = cpu_seconds(self.config["process_groups"])
        started = time.time()
        jobs = [asyncio.ensure_future(one(i)) for i in range(count)]
        # The counters' reads after the tasks take about as long as those before them.
        _, pending = await asyncio.wait(jobs, timeout=max(0.5, bound_s - grace_s - 2 * (started - entered)))
        timed_out = bool(pending)
        if pending:
            for job in pending:
                job.cancel()
            await asyncio.wait(pending, timeout=grace_s)  # the rest stop their jobs in the background
        ended = time.time()
        cpu_after = cpu_seconds(self.config["process_groups"])
        calls_after = (await asyncio.to_thread(batch_stats, self.batch_endpoint))["calls"]
        records = [r for r in self.tasks if r["phase"] == phase]
        for i in range(len(records), count):  # never started: the gate held them until the cut
            records.append({"phase": phase, "node_id": i, "job_id": "", "ok": False, "error": CUT})
        return {
            "tasks": count,
            "concurrency": concurrency,
            "completed": sum(r["ok"] for r in records),
            "errors": sorted({r["error"] for r in records if r["error"]})[:5],
            "timed_out": timed_out,
            "started": started,
            "ended": ended,
            "batch_calls": _reads(calls_before, calls_after),
            "cpu_s": {name: round(cpu_after[name] - cpu_before[name], 2) for name in cpu_after},
        }

    def _subscriber_streams(self) -> int:
        return sum(1 for e in events._registry.values() if e._future is not None and not e._future.done())

    async def _scale(self, count: int, timeout_s: float) -> dict:
        gc.collect()
        rss_before = _rss_mb()
        threads_before = threading.active_count()
        with RssSampler() as sampler:
            peak_threads = [threads_before]

            async def watch_threads():
                while True:
                    peak_threads.append(threading.active_count())
                    await asyncio.sleep(0.5)

            watcher = asyncio.ensure_future(watch_threads())
            try:
                summary = await self._phase("p4", count, count, timeout_s)
            finally:
                watcher.cancel()
        gc.collect()
        rss_peak = max(mb for _, mb in sampler.samples)
        summary.update(
            rss_before_mb=rss_before,
            rss_peak_mb=rss_peak,
            rss_after_mb=_rss_mb(),
            rss_growth_mb=rss_peak - rss_before,
            threads_before=threads_before,
            threads_peak=max(peak_threads),
            subscriber_streams=self._subscriber_streams() if self.mode == "events" else 0,
            rss_samples=[(round(t, 3), round(mb, 1)) for t, mb in sampler.samples[:: max(1, len(sampler.samples) // 400)]],
        )
        return summary

    async def _payload(self, mib: int, rounds: int, timeout_s: float) -> dict:
        """``rounds`` echo tasks with a ``mib`` MiB argument (and result), each followed by the same
        four transfers done with google-cloud-storage alone on the same emulator. One raw round
        trip first, not counted: the emulator's first large object is much slower than the next
        (measured 8.8 s against 2.6-4.7 s for 256 MiB), and neither side should pay for it."""
        payload = os.urandom(mib * 1024 * 1024)
        summary: dict[str, Any] = {"mib": mib, "rounds": []}
        dispatch_id = self._dispatch_id("p5")
        # memory: the worker holds the argument and the result (the local service caps the
        # worker's address space at memory + 1 GiB).
        memory = max(256, 4 * mib + 512)
        ends = time.time() + self._bounded(timeout_s)
        with tempfile.TemporaryDirectory(prefix="gcpbatch-bench-raw-") as tmp:
            source = Path(tmp) / "up.bin"
            source.write_bytes(payload)
            summary["raw_warmup"] = await asyncio.to_thread(self._raw_round_trip, source)
            for i in range(rounds):
                if ends - time.time() < 1.0:
                    summary["rounds"].append({"completed": False, "job_id": "", "error": CUT})
                    break
                try:
                    record = await asyncio.wait_for(
                        self._one("p5", dispatch_id, i, bench.tasks.echo, (payload,), lambda r: r == payload,
                                  memory=memory),
                        max(1.0, ends - time.time()),
                    )
                except asyncio.TimeoutError:
                    summary["rounds"].append({"completed": False, "job_id": "", "error": CUT})
                    break
                raw = await asyncio.to_thread(self._raw_round_trip, source)
                summary["rounds"].append({"completed": record["ok"], "job_id": record["job_id"],
                                          "error": record["error"], "raw": raw})
        summary["completed"] = len(summary["rounds"]) == rounds and all(r["completed"] for r in summary["rounds"])
        return summary

    def _raw_round_trip(self, source: Path) -> dict[str, float]:
        """The round trip's four transfers with the client alone, in the same order and with the
        same objects stored as the task's: upload A, download A, upload B (A still stored),
        download B. Seconds per leg. (The emulator keeps objects in memory as it receives them,
        and slows down as it holds more, so the order matters for a fair comparison.)"""
        s = self.executor_kwargs
        bucket = clients.storage_client(s["project_id"], s["storage_emulator_host"]).bucket(s["bucket_name"])
        names = [f"bench-raw/{uuid.uuid4().hex}/{leg}" for leg in ("argument", "result")]
        target = source.with_suffix(".down")
        legs: dict[str, float] = {}
        try:
            for name in names:
                t0 = time.time()
                bucket.blob(name).upload_from_filename(source, content_type="application/octet-stream")
                t1 = time.time()
                bucket.blob(name).download_to_filename(target)
                t2 = time.time()
                if target.stat().st_size != source.stat().st_size:
                    raise RuntimeError(f"raw download of {name} returned {target.stat().st_size} bytes, "
                                       f"uploaded {source.stat().st_size}")
                target.unlink()
                legs[f"{name.rsplit('/', 1)[1]} upload_s"] = t1 - t0
                legs[f"{name.rsplit('/', 1)[1]} download_s"] = t2 - t1
        finally:
            for name in names:
                blob = bucket.blob(name)
                if blob.exists():
                    blob.delete()
        return legs

    async def main(self, save) -> dict:
        """Every phase, each in its own bound; ``save(out)`` after each one, so that a failed or
        stopped process still leaves what it measured. The bounds: ``phase_fractions`` of the
        time from ``launched`` to the deadline (bounds.py; the fractions are harness.MODE_PHASES),
        so that P4 cannot eat P5's time. A failed phase is recorded, not fatal; a phase cut at its
        bound is recorded as cut."""
        _instrument_subscriber()
        c = self.config
        out: dict[str, Any] = {"mode": self.mode, "versions": VERSIONS, "pid": os.getpid(), "failures": {}, "phases": {}}
        phases = {"warmup": lambda b: self._phase("warmup", c["warmup"], min(c["warmup"], 8), b)}
        if c["p1_tasks"] > 0:
            phases["p1"] = lambda b: self._phase("p1", c["p1_tasks"], c["p1_concurrency"], b, c["p1_sleep_step_s"])
        if c["p4_tasks"] > 0:
            phases["p4"] = lambda b: self._scale(c["p4_tasks"], b)
        if c["p5_mib"] > 0:
            phases["p5"] = lambda b: self._payload(c["p5_mib"], c["p5_rounds"], b)
        shares = bounds.shares(self.deadline - float(c["launched"]), c["phase_fractions"], phases)
        for name, phase in phases.items():
            left = self.deadline - time.time()
            bound_s = min(max(bounds.bound(name, shares, left), MIN_PHASE_S), left)
            started = time.time()
            record: dict[str, Any] = {"share_s": round(shares[name], 1), "bound_s": round(max(0.0, bound_s), 1)}
            out["phases"][name] = record
            if bound_s < MIN_PHASE_S:
                record.update(status="skipped", used_s=0.0, reason=f"the mode's bound is spent ({left:.0f} s left)")
                log(f"[{self.mode}] {name}: skipped, the mode's bound is spent")
                save(out)
                continue
            try:
                out[name] = await phase(bound_s)
            except Exception as err:  # noqa: BLE001 - recorded; the other phases still run
                out["failures"][name] = f"{type(err).__name__}: {err}"
                record.update(status="failed", reason=out["failures"][name][:300])
                log(f"[{self.mode}] {name} failed: {err!r}")
            else:
                summary = out[name]
                record.update(phase_status(summary))
                if "tasks" in summary:
                    log(f"[{self.mode}] {name}: {summary['completed']}/{summary['tasks']} tasks in "
                        f"{summary['ended'] - summary['started']:.0f} s ({record['status']}, bound {bound_s:.0f} s)")
                else:
                    log(f"[{self.mode}] {name}: {'ok' if summary.get('completed') else summary.get('errors')} "
                        f"({record['status']}, bound {bound_s:.0f} s)")
            record["used_s"] = round(time.time() - started, 1)
            out["tasks"] = self.tasks
            out["marks"] = MARKS
            save(out)
        return out


def phase_status(summary: dict) -> dict[str, str]:
    """A phase's status from its summary: ``ran`` (every task right), ``cut`` (stopped at its
    bound; every task that ended before was right) or ``failed`` (a task failed or was wrong)."""
    if "tasks" in summary:
        errors = [e for e in summary["errors"] if e != CUT]
        cut = summary["timed_out"]
    else:  # P5
        errors = sorted({r["error"] for r in summary["rounds"] if r["error"] and r["error"] != CUT})
        cut = any(r["error"] == CUT for r in summary["rounds"])
    if errors:
        return {"status": "failed", "reason": "; ".join(errors)[:300]}
    if cut:
        return {"status": "cut", "reason": "stopped at its bound"}
    if "tasks" in summary and summary["completed"] != summary["tasks"]:
        return {"status": "failed", "reason": f"{summary['completed']}/{summary['tasks']} completed"}
    if "rounds" in summary and not summary["completed"]:
        return {"status": "failed", "reason": "a round did not complete"}
    return {"status": "ran", "reason": ""}


def main(argv: list[str]) -> int:
    config_path, out_path = argv
    config = json.loads(Path(config_path).read_text())

    def save(result: dict) -> None:
        tmp = Path(out_path).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(out_path)

    result = asyncio.run(Driver(config).main(save))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
