"""`make soak`: hundreds of electrons through a real Covalent server and GCPBatchExecutor on the
local stack, under faults fired at random moments, then every electron's outcome checked.

    python -m bench.soak [--seed S] [--electrons 300] [--dispatches 20] [--budget-s 1200]
                         [--fault-every-s 4] [--max-running 8] [--out-dir bench/results]

The workload and the fault schedule come from the seed (bench/soak_plan.py, which also judges each
electron). The stack and the server are this run's own (an isolated Covalent home); the executor
reaches GCS through a fault proxy (local/storage_faults.py), the Batch service takes its faults on
``POST /_admin/faults``, the emulators are restarted in place. Each electron logs every start and end
of its code to a run file on this host (the local workers are host processes), which is how "run at
most once per attempt" is checked against Batch's own record of the attempts.

Exit status 0 only if every check passed: no lost result, no wrong outcome, no FAILED node without
an error, no job running at the end, no task object left but cancel markers and kept outcomes, every
dispatch settled within its bound. The table goes to stdout, a JSON to ``<out-dir>/soak-<date>-seed<S>.json``;
a failing electron's history (its node, runs, Batch task events, objects) is printed with the seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from google.cloud import batch_v1

from covalent_gcpbatch_plugin import clients, protocol
from covalent_gcpbatch_plugin.local.batch.model import State
from covalent_gcpbatch_plugin.local.covalent_server import CovalentServer, isolated_env
from covalent_gcpbatch_plugin.local.processes import free_ports, http_answers
from covalent_gcpbatch_plugin.local.stack import LocalStack
from covalent_gcpbatch_plugin.local.storage_faults import StorageFaultProxy

from . import batch_admin, harness, log
from . import soak_plan as plan

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Retries of every soak electron (Batch re-runs an attempt the infrastructure ended, up to this).
RETRIES = 3
#: The executor settings of the soak's electrons: what a user on real Batch might set, shortened
#: where only waiting would differ (reconcile after 5 s of silence instead of 300 s).
EXECUTOR = {"time_limit": 60, "retries": RETRIES, "reconcile_interval": 5.0, "submit_timeout": 60.0,
            "queue_timeout": 300.0, "poll_freq": 1.0}
#: A dispatch must settle within this much per level of its graph, plus a base (the soak's bound:
#: the executor's own worst case, with Batch's VM-boot grace, is far longer).
BOUND_BASE_S, BOUND_PER_LEVEL_S = 240.0, 60.0
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
#: Batch's exit codes that mean the infrastructure ended an attempt (the soak's kills included).
INFRA_EXITS = (*protocol.RETRIED_EXIT_CODES, plan.KILLED)
#: The executor's failure text quotes Batch's events ("... with exit code 137.").
EXIT_CODE_IN_ERROR = re.compile(r"with exit code (\d+)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="the workload's and the faults' seed (default: random, printed)")
    p.add_argument("--electrons", type=int, default=300, help="electrons in all (default 300)")
    p.add_argument("--dispatches", type=int, default=20, help="dispatches, at least (default 20)")
    p.add_argument("--budget-s", type=float, default=1200.0, help="bound on the whole run, stack start included (default 1200)")
    p.add_argument("--spread-s", type=float, default=None, help="dispatch start times spread over this long (default: 0.6 s per electron)")
    p.add_argument("--fault-every-s", type=float, default=4.0, help="mean seconds between faults (default 4)")
    p.add_argument("--max-running", type=int, default=8, help="worker processes the Batch service runs at once (default 8)")
    p.add_argument("--no-server-kill", dest="server_kill", action="store_false",
                   help="do not SIGKILL and restart the Covalent server in the middle of the run")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(10**6)
    if args.spread_s is None:
        args.spread_s = 0.6 * args.electrons
    return args


# -- the electrons' code (pickled by value: the workers have only the worker image's packages) ------


def electron_function(e: plan.Electron, runs_dir: str, expected_input: Any):
    key, kind, sleep_s, value, run_s = e.key, e.kind, e.sleep_s, e.value, plan.OVER_TIME_RUN_S
    uid_env = protocol.ENV_JOB_UID

    def body(*previous):
        import hashlib
        import json as _json
        import os as _os
        import sys as _sys
        import time as _time

        def note(event: str) -> None:
            with open(_os.path.join(runs_dir, key), "a") as f:
                f.write(_json.dumps({"event": event, "t": _time.time(), "job": _os.environ.get(uid_env, ""),
                                     "task": _os.environ.get("BATCH_TASK_INDEX", ""),
                                     "attempt": _os.environ.get("BATCH_TASK_RETRY_ATTEMPT", "")}) + "\n")

        note("start")
        if previous and previous[0] != expected_input:
            note("end")
            return ["wrong input", previous[0]]
        _time.sleep(run_s if kind == "over_time" else sleep_s)
        print(f"electron {key} ran")
        note("end")
        if kind == "raises":
            class SoakError(Exception):
                pass

            raise SoakError(f"planned failure of {key}")
        if kind == "odd":
            size = value[0]
            _sys.stdout.buffer.write(b"odd output \xff\xfe\x00\x1b[31m not UTF-8\n")
            _sys.stdout.flush()
            seed = hashlib.sha256(key.encode()).digest()
            return (seed * (size // len(seed) + 1))[:size]
        return value

    body.__name__ = body.__qualname__ = e.node_name
    return body


def build_lattice(ct, d: plan.Dispatch, runs_dir: Path, executors: dict):
    by_key = {e.key: e for e in d.electrons}
    electrons = {}
    for e in d.electrons:
        previous = by_key[e.depends_on].value if e.depends_on else None
        executor = executors["over_time" if e.kind == plan.OVER_TIME else d.wait_mode]
        electrons[e.key] = ct.electron(electron_function(e, str(runs_dir), previous), executor=executor)

    def flow():
        values = {}
        for e in d.electrons:
            values[e.key] = electrons[e.key](values[e.depends_on]) if e.depends_on else electrons[e.key]()
        return None

    flow.__name__ = flow.__qualname__ = f"soak_{d.name}"
    return ct.lattice(flow)


# -- faults -------------------------------------------------------------------------------------


class Injector:
    """Fires the schedule's faults at their moments (a thread), and records what each did."""

    def __init__(self, stack: LocalStack, endpoint: str, proxy: StorageFaultProxy, faults: list[plan.Fault],
                 started: float) -> None:
        self.stack, self.endpoint, self.proxy, self.faults, self.started = stack, endpoint, proxy, faults, started
        self.fired: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-faults", daemon=True)

    def _run(self) -> None:
        offs: list[tuple[float, str]] = []
        for fault in self.faults:
            while offs and offs[0][0] <= fault.at_s:
                self._switch_off(*offs.pop(0))
            if self.stop.wait(max(0.0, self.started + fault.at_s - time.monotonic())):
                break
            self._fire(fault)
            if fault.lasts_s:
                offs.append((fault.at_s + fault.lasts_s, fault.kind))
                offs.sort()
        for at, kind in offs:
            self.stop.wait(max(0.0, self.started + at - time.monotonic()))
            self._switch_off(at, kind)

    def _fire(self, fault: plan.Fault) -> None:
        at = time.monotonic() - self.started
        try:
            detail = self._apply(fault)
            self.fired.append({"at_s": round(at, 2), "kind": fault.kind, "params": fault.params, "detail": detail})
        except Exception as err:  # noqa: BLE001 - a fault that could not be made is reported, and fails the soak
            self.fired.append({"at_s": round(at, 2), "kind": fault.kind, "params": fault.params,
                               "error": f"{type(err).__name__}: {err}"})

    def _apply(self, fault: plan.Fault) -> Any:
        k, p = fault.kind, fault.params
        if k == "batch_read_errors":
            return self.batch_faults({"fail_get": p["count"], "fail_get_status": p["status"]})
        if k == "batch_create_errors":
            return self.batch_faults({"fail_create": p["count"], "fail_create_status": p["status"]})
        if k == "function_fails_before_create":
            return self.batch_faults({"fail_create": 1, "fail_create_status": 501})
        if k == "create_ack_lost":
            return self.batch_faults({"fail_create_after_commit": 1})
        if k == "notifications_dropped":
            return self.batch_faults({"drop_notifications": {"*": ALL_JOB_STATES}, "drop_task_notifications": {"*": ALL_TASK_STATES}})
        if k == "notifications_duplicated":
            return self.batch_faults({"duplicate_notifications": True})
        if k == "notifications_delayed":
            return self.batch_faults({"delay_notifications_s": 3.0})
        if k == "preemption":
            return self.batch_faults({"preempt": {"*": 1}})
        if k == "preempted_after_outcome":
            return self.batch_faults({"preempt_after_exit": {"*": 1}})
        if k == "worker_killed":
            return self.batch_faults({"kill_running": 1})
        if k == "gcs_lost_ack":
            self.proxy.lose_acks(f"{protocol.TASKS_PREFIX}cov-[a-z0-9-]+/[a-z.-]+", 1)
            return None
        if k == "gcs_errors":
            self.proxy.fail_next(p["count"], p["status"])
            return None
        if k in ("pubsub_restart", "gcs_restart"):
            return {"down_s": round(self.stack.restart(k.split("_")[0]), 2)}
        raise ValueError(f"unknown fault kind {k}")

    def _switch_off(self, at: float, kind: str) -> None:
        off = {"notifications_dropped": {"drop_notifications": {"*": []}, "drop_task_notifications": {"*": []}},
               "notifications_duplicated": {"duplicate_notifications": False},
               "notifications_delayed": {"delay_notifications_s": 0}}[kind]
        self.batch_faults(off)

    def batch_faults(self, body: dict) -> Any:
        return batch_admin(self.endpoint, "faults", body)

    def clear(self) -> None:
        """No fault pending any more (counts not yet used, windows still open)."""
        self.stop.set()
        self.thread.join(60)
        self.batch_faults(NO_FAULTS)
        self.proxy.lose_acks("$^", 0)
        self.proxy.fail_next(0)


#: Every job and task state Batch may publish (what a drop_notifications window drops).
ALL_JOB_STATES = [state.name for state in State]
ALL_TASK_STATES = [state.name for state in batch_v1.TaskStatus.State]
NO_FAULTS = {"fail_get": 0, "fail_create": 0, "fail_create_after_commit": 0, "preempt": {"*": 0},
             "preempt_after_exit": {"*": 0}, "drop_notifications": {"*": []}, "drop_task_notifications": {"*": []},
             "duplicate_notifications": False, "delay_notifications_s": 0}


# -- the run ------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="gcpbatch-soak-"))
        self.runs_dir = self.root / "runs"
        self.runs_dir.mkdir()
        self.deadline = time.monotonic() + args.budget_s
        self.dispatches = plan.plan_workload(args.seed, args.electrons, args.dispatches, args.spread_s)
        horizon = max(d.start_s for d in self.dispatches) + 20.0
        self.faults = plan.plan_faults(args.seed, horizon, args.fault_every_s)
        self.server_kill_s = plan.plan_server_kill(args.seed, horizon) if args.server_kill else None
        self.dispatched: dict[str, dict] = {}  # dispatch name -> id, times, status
        self.server: CovalentServer | None = None
        self.server_up = threading.Event()
        self.server_up.set()
        self.restart: dict = {}  # when the server was killed, how long it was away, what was in flight
        self.interrupted: set[str] = set()  # dispatches in flight when the server was killed
        self.started = 0.0

    def run(self) -> dict:
        (port,) = free_ports(1)
        os.environ.update(isolated_env(self.root / "covalent", port))
        os.environ.pop("COVALENT_SERVER_IFACE_ANY", None)
        stack = LocalStack(self.root / "stack", batch_max_running=self.args.max_running)
        server = self.server = CovalentServer(self.root / "covalent", port)
        try:
            settings = stack.up()
            from covalent_gcpbatch_plugin import covalent_config

            covalent_config.write_executor_section(settings.executor_config())
            server.start()
            with StorageFaultProxy(settings.storage_emulator_host) as proxy:
                return self._soak(stack, settings, proxy)
        finally:
            server.stop()
            stack.down()
            shutil.rmtree(self.root, ignore_errors=True)

    def _soak(self, stack: LocalStack, settings, proxy: StorageFaultProxy) -> dict:
        import covalent as ct

        executors = {mode: ct.executor.GCPBatchExecutor(**EXECUTOR, wait_mode=mode, storage_emulator_host=proxy.url)
                     for mode in ("events", "poll")}
        executors["over_time"] = ct.executor.GCPBatchExecutor(
            **{**EXECUTOR, "time_limit": plan.OVER_TIME_LIMIT_S}, storage_emulator_host=proxy.url)
        lattices = {d.name: build_lattice(ct, d, self.runs_dir, executors) for d in self.dispatches}
        log(f"soak: seed {self.args.seed}: {sum(len(d.electrons) for d in self.dispatches)} electrons in "
            f"{len(self.dispatches)} dispatches over {self.args.spread_s:g} s, {len(self.faults)} faults planned")
        started = self.started = time.monotonic()
        self.started_wall = time.time()
        injector = Injector(stack, settings.batch_api_endpoint, proxy, self.faults, started)
        injector.thread.start()
        timers = []
        if self.server_kill_s is not None:
            timers.append(threading.Timer(self.server_kill_s, self._kill_and_restart_server))
            timers[-1].daemon = True
            timers[-1].start()
        dispatching = threading.Event()  # set once every dispatch is made
        watcher = threading.Thread(target=self._await_all, args=(ct, started, dispatching), name="soak-watch", daemon=True)
        watcher.start()
        try:
            for d in self.dispatches:
                if self._sleep_until(started + d.start_s):
                    break
                dispatch_id = self._dispatch(ct, lattices[d.name])
                if dispatch_id is None:
                    break
                self.dispatched[d.name] = {"id": dispatch_id, "at": time.monotonic() - started}
                if d.cancel_after_s is not None:
                    timer = threading.Timer(d.cancel_after_s, self._cancel, (ct, d.name, started))
                    timer.daemon = True
                    timer.start()
                    timers.append(timer)
            dispatching.set()
            watcher.join(max(0.0, self.deadline - time.monotonic()))
        finally:
            dispatching.set()
            for timer in timers:
                timer.cancel()
            injector.clear()
        faults_over = max([f["at_s"] for f in injector.fired], default=0.0)
        self.restart["cancelled_at_end"] = self._cancel_left_behind()
        orphans = self._wait_no_active(settings.batch_api_endpoint)
        self.restart["quiet_after"] = time.time()  # no job active: no electron's code may start after this
        return self._check(ct, settings, injector, orphans, faults_over)

    def _dispatch(self, ct, lattice) -> str | None:
        """ct.dispatch once the server is up (it may be restarting); None past the budget."""
        while time.monotonic() < self.deadline:
            self.server_up.wait(max(0.0, self.deadline - time.monotonic()))
            try:
                return ct.dispatch(lattice)()
            except Exception as err:  # noqa: BLE001 - the server went away under the call: again once it is back
                log(f"soak: dispatch failed ({type(err).__name__}); again once the server answers")
                time.sleep(1.0)
        return None

    def _kill_and_restart_server(self) -> None:
        """SIGKILL the Covalent server (its whole process group, as a crash or an OOM kill of the
        machine's server would), then start it again. What was in flight is not waited for any more:
        its executors died with the server; ``covalent-gcpbatch jobs --cancel`` finds their jobs."""
        self.server_up.clear()
        killed = time.monotonic()
        try:
            os.killpg(self.server.pgid, signal.SIGKILL)
            self.interrupted = {name for name, info in list(self.dispatched.items()) if "status" not in info}
            # What its user does next: `covalent stop` (it clears the dead server's pid file, which
            # `covalent start` would otherwise take for a running server), then `covalent start`.
            self.server.stop()
            self.server.start()
            url = f"http://127.0.0.1:{self.server.port}/"
            answers = time.monotonic() + 60
            while not http_answers(url, any_status=True):
                if time.monotonic() > answers:
                    raise RuntimeError(f"covalent start returned, but nothing answers at {url}")
                time.sleep(0.5)
            self.restart.update(at_s=round(killed - self.started, 2), away_s=round(time.monotonic() - killed, 2),
                                in_flight=sorted(self.interrupted))
            self.restart["cancelled_at_restart"] = self._cancel_left_behind()
            log(f"soak: Covalent server SIGKILLed and back in {self.restart['away_s']:g} s; "
                f"{len(self.interrupted)} dispatches were in flight")
        except Exception as err:  # noqa: BLE001 - reported, and the soak fails
            self.restart.update(at_s=round(killed - self.started, 2), error=f"{type(err).__name__}: {err}")
            log(f"soak: the Covalent server could not be restarted: {self.restart['error']}")
        finally:
            self.server_up.set()

    def _cancel_left_behind(self) -> dict:
        """What a user does after the server died: cancel the jobs of the dispatches it left
        (``covalent-gcpbatch jobs DISPATCH --cancel --force --yes``: the restarted server still
        shows them RUNNING); done right after the restart, and again at the end for anything
        created since."""
        cli = str(Path(sys.executable).with_name("covalent-gcpbatch"))
        done = {}
        for name in sorted(self.interrupted):
            proc = subprocess.run([cli, "jobs", self.dispatched[name]["id"], "--cancel", "--force", "--yes"],
                                  capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
            done[name] = {"exit": proc.returncode, "output": (proc.stdout + proc.stderr)[-2000:]}
        return done

    def _sleep_until(self, moment: float) -> bool:
        """Sleep until ``moment``; True if the budget ends first."""
        time.sleep(max(0.0, min(moment, self.deadline) - time.monotonic()))
        return time.monotonic() >= self.deadline

    def _cancel(self, ct, name: str, started: float) -> None:
        self.dispatched[name]["cancelled_at"] = time.monotonic() - started
        try:
            ct.cancel(self.dispatched[name]["id"])
        except Exception as err:  # noqa: BLE001 - recorded: the check then finds what the dispatch did
            self.dispatched[name]["cancel_error"] = repr(err)

    def _await_all(self, ct, started: float, dispatching: threading.Event) -> None:
        """Watch Covalent's status of each dispatch (status only: cheap), from the first dispatch
        on, until every dispatch is made and terminal or the budget (less the time kept for the
        check) is spent; what is left is cancelled. The dispatches the server's kill left in flight
        are not waited for."""
        check_reserve = 120.0

        def pending() -> list[str]:
            return sorted(n for n, info in list(self.dispatched.items()) if "status" not in info and n not in self.interrupted)

        while (pending() or not dispatching.is_set()) and time.monotonic() < self.deadline - check_reserve:
            self.server_up.wait()
            for name in pending():
                try:
                    answer = ct.get_result(self.dispatched[name]["id"], wait=False, status_only=True)
                except Exception:  # noqa: BLE001 - the server is restarting: asked again next round
                    break
                status = _status_text(answer.get("status") if isinstance(answer, dict) else getattr(answer, "status", ""))
                if status in TERMINAL and name not in self.interrupted:
                    self.dispatched[name].update(status=status, ended=time.monotonic() - started)
            time.sleep(1.0)
        self.server_up.wait()  # a restart under way ends first
        for name in pending():
            self.dispatched[name]["status"] = "UNSETTLED"
            ct.cancel(self.dispatched[name]["id"])
        for name in self.interrupted:
            self.dispatched[name]["status"] = "INTERRUPTED"

    def _wait_no_active(self, endpoint: str, within_s: float = 90.0) -> list[str]:
        """Jobs still active ``within_s`` after the last dispatch settled (orphans)."""
        end = time.monotonic() + within_s
        while True:
            active = batch_admin(endpoint, "active")["active"]
            if not active or time.monotonic() > end:
                return active
            time.sleep(1.0)

    # -- the check ---------------------------------------------------------------------------

    def _check(self, ct, settings, injector: Injector, orphans: list[str], faults_over: float) -> dict:
        batch = clients.batch_client(settings.batch_api_endpoint)
        storage = clients.storage_client(settings.project_id, settings.storage_emulator_host)
        parent = protocol.location_name(settings.project_id, settings.region)
        jobs_by_uid = {job.uid: job for job in batch.list_jobs(parent=parent)}
        electrons, problems, histories = [], [], []
        settle, unbounded = [], []
        for d in self.dispatches:
            info = self.dispatched.get(d.name)
            if info is None:
                problems.append(f"{d.name}: not dispatched within the budget")
                continue
            result = ct.get_result(info["id"], wait=False)
            nodes = {}
            for node_id in result.lattice.transport_graph._graph.nodes:
                node = result.get_node_result(node_id)
                nodes[node["node_name"]] = (node_id, node)
            interrupted = d.name in self.interrupted
            if not interrupted:
                depth = max(sum(1 for _ in _chain_of(d, e)) for e in d.electrons)
                bound = BOUND_BASE_S + BOUND_PER_LEVEL_S * depth
                took = info.get("ended", float("inf")) - info["at"]
                settle.append(info.get("ended", float("inf")) - max(info["at"], _last_fault_before(injector.fired, info.get("ended"))))
                if took > bound:
                    unbounded.append(f"{d.name} ({info['id']}): settled {info.get('status')} after {took:.0f} s, bound {bound:.0f} s")
            kept = self._kept_results(storage, settings, info["id"]) if interrupted else set()
            for e in d.electrons:
                node_id, node = nodes.get(e.node_name, (None, {}))
                upstream = nodes.get(f"e_{e.depends_on}", (None, {}))[1] if e.depends_on else {"status": "COMPLETED"}
                seen = self._observe(e, node, jobs_by_uid, batch, interrupted=interrupted, result_kept=node_id in kept,
                                     upstream_done=_status_text(upstream.get("status")) == "COMPLETED",
                                     across_restart=self._submitted_across_restart(node, injector.fired))
                wrong = plan.judge(e, d, seen, retries=RETRIES)
                lost = plan.lost_result(e, seen)
                electrons.append({"key": e.key, "kind": e.kind, "status": seen.status, "runs": seen.runs,
                                  "infra_exits": list(seen.infra_exits), "wrong": wrong, "lost": lost})
                if wrong or lost:
                    problems.append(f"{d.name} {e.key} ({e.kind}): {'; '.join(wrong) or 'result lost'}")
                    histories.append(self._history(e, d, info["id"], node_id, node, seen, storage, settings))
        leftovers = self._leftovers(storage, settings, [self.dispatched[n]["id"] for n in self.interrupted])
        fault_errors = [f for f in injector.fired if "error" in f]
        return {
            "seed": self.args.seed,
            "electrons": len(electrons),
            "dispatches": len(self.dispatches),
            "faults": dict(Counter(f["kind"] for f in injector.fired if "error" not in f)),
            "fault_errors": fault_errors,
            "outcomes": dict(Counter(e["status"] or "missing" for e in electrons)),
            "by_kind": {k: dict(Counter(e["status"] for e in electrons if e["kind"] == k)) for k in sorted({e["kind"] for e in electrons})},
            "lost_results": sum(e["lost"] for e in electrons),
            "wrong_outcomes": sum(bool(e["wrong"]) for e in electrons),
            "orphan_jobs": orphans,
            "leftover_objects": leftovers,
            "unbounded_dispatches": unbounded,
            "dispatch_status": dict(Counter(i.get("status", "not dispatched") for i in self.dispatched.values())),
            "settle_after_last_fault_s": _percentiles(settle),
            "last_fault_s": faults_over,
            "problems": problems,
            "histories": histories,
            "storage_proxy": injector.proxy.stats(),
            "server_restart": {k: v for k, v in self.restart.items() if k != "quiet_after"},
            "timeline": {"faults": injector.fired,
                         "dispatches": {n: {k: v for k, v in i.items()} for n, i in sorted(self.dispatched.items())}},
        }

    def _kept_results(self, storage, settings, dispatch_id: str) -> set[int]:
        """Node ids of the dispatch whose result object is in the bucket."""
        prefix = protocol.dispatch_prefix(dispatch_id)
        nodes = set()
        for blob in storage.list_blobs(settings.bucket_name, prefix=prefix):
            if blob.name.endswith("/" + protocol.RESULT_OBJECT):
                node = blob.name[len(prefix):].split("-", 1)[0]
                if node.isdigit():
                    nodes.add(int(node))
        return nodes

    def _submitted_across_restart(self, node: dict, fired: list[dict]) -> bool:
        """Whether an emulator restart overlapped the node's submission (from its start until
        submit_timeout later), when the finalize event of its upload may have been lost."""
        start = node.get("start_time")
        if start is None:
            return False
        begun = start.timestamp() - self.started_wall
        return any(f["kind"] in ("pubsub_restart", "gcs_restart") and "error" not in f
                   and f["at_s"] <= begun + EXECUTOR["submit_timeout"] and f["at_s"] + f["detail"]["down_s"] >= begun - 2
                   for f in fired)

    def _observe(self, e: plan.Electron, node: dict, jobs_by_uid: dict, batch, *, interrupted: bool,
                 result_kept: bool, upstream_done: bool, across_restart: bool) -> plan.Observed:
        runs = _read_runs(self.runs_dir / e.key)
        tasks = sorted({(r["job"], r["task"]) for r in runs})
        infra: list[int] = []
        for uid, index in tasks:
            job = jobs_by_uid.get(uid)
            if job is None:
                continue
            try:
                task = batch.get_task(name=f"{job.name}/taskGroups/group0/tasks/{index}")
            except Exception:  # noqa: BLE001 - a task Batch no longer has: no attempts to count
                continue
            infra += [ev.task_execution.exit_code for ev in task.status.status_events
                      if ev.task_execution and ev.task_execution.exit_code in INFRA_EXITS]
        error = f"{node.get('error') or ''}\n{node.get('stderr') or ''}"
        if not tasks:  # its code never started (killed while the worker started): Batch's exit code, as the executor reports it
            infra += [int(code) for code in EXIT_CODE_IN_ERROR.findall(error) if int(code) in INFRA_EXITS]
        output = None
        if _status_text(node.get("status")) == "COMPLETED" and node.get("output") is not None:
            output = node["output"].get_deserialized()
        return plan.Observed(
            status=_status_text(node.get("status")), output=output,
            error=error,
            runs=sum(r["event"] == "start" for r in runs), finished_runs=sum(r["event"] == "end" for r in runs),
            jobs=tuple(f"{u}/{i}" for u, i in tasks), infra_exits=tuple(infra), interrupted=interrupted,
            late_runs=sum(r["event"] == "start" and r["t"] > self.restart["quiet_after"] for r in runs),
            result_kept=result_kept, upstream_done=upstream_done, submitted_across_restart=across_restart)

    def _history(self, e, d, dispatch_id, node_id, node, seen, storage, settings) -> dict:
        prefix = protocol.dispatch_prefix(dispatch_id, node_id) if node_id is not None else None
        objects = sorted(b.name for bucket in (settings.bucket_name, settings.task_bucket_name)
                         for b in storage.list_blobs(bucket, prefix=prefix)) if prefix else []
        return {"seed": self.args.seed, "dispatch": d.name, "dispatch_id": dispatch_id, "electron": e.key, "kind": e.kind,
                "node_id": node_id, "status": seen.status, "error": seen.error[-2000:],
                "runs": _read_runs(self.runs_dir / e.key), "infra_exits": list(seen.infra_exits), "objects": objects}

    def _leftovers(self, storage, settings, interrupted: list[str]) -> dict:
        """Objects left in the buckets, by task prefix: cancel markers and a cancelled pack's
        manifest (kept by design, the bucket's lifecycle rule removes them), kept outcomes (a result
        or error record Covalent was not handed, with the rest of its prefix), the objects of
        dispatches whose server was killed (nobody is left to clean them up: kept, as a result must
        be), and anything else (a leak)."""
        orphaned = tuple(protocol.dispatch_prefix(dispatch_id) for dispatch_id in interrupted)
        prefixes: dict[str, list[str]] = {}
        for bucket in {settings.bucket_name, settings.task_bucket_name}:
            for blob in storage.list_blobs(bucket, prefix=protocol.TASKS_PREFIX):
                job_dir = blob.name[len(protocol.TASKS_PREFIX):].split("/", 1)[0]
                prefixes.setdefault(protocol.TASKS_PREFIX + job_dir, []).append(blob.name)
        left, other = Counter(), []
        for prefix, names in prefixes.items():
            tails = {n.removeprefix(prefix + "/") for n in names}
            if orphaned and (prefix + "-").startswith(orphaned):
                left["of_interrupted_dispatches"] += 1
            elif tails == {protocol.CANCEL_OBJECT}:
                left["cancel_markers"] += 1
            elif {protocol.CANCEL_OBJECT, protocol.PACK_OBJECT} <= tails:
                left["cancelled_pack_manifests"] += 1  # kept for the workers it may still start (gcpbatch._pack_over)
            elif tails & {protocol.RESULT_OBJECT, protocol.ERROR_OBJECT}:
                left["kept_outcomes"] += 1
            else:
                left["other"] += 1
                other += sorted(names)
        return {**dict(left), "other_names": other[:20]}


def _status_text(status: Any) -> str:
    """Covalent's status as its name ("COMPLETED"): a node's is a StatusEnum, whose str() is
    "StatusEnum.COMPLETED"; a dispatch's a Status, whose str() is the name."""
    return str(status or "").rsplit(".", 1)[-1]


def _chain_of(d: plan.Dispatch, e: plan.Electron):
    by_key = {x.key: x for x in d.electrons}
    while e is not None:
        yield e
        e = by_key.get(e.depends_on) if e.depends_on else None


def _last_fault_before(fired: list[dict], moment: float | None) -> float:
    return max([f["at_s"] for f in fired if moment is None or f["at_s"] <= moment], default=0.0)


def _read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _percentiles(values: list[float]) -> dict:
    finite = sorted(v for v in values if v != float("inf"))
    if not finite:
        return {}
    p99 = finite[min(len(finite) - 1, round(0.99 * (len(finite) - 1)))]
    return {"p50": round(statistics.median(finite), 1), "p99": round(p99, 1), "max": round(finite[-1], 1)}


def verdict(report: dict) -> list[str]:
    """The checks that failed (empty: the soak passed)."""
    failed = []
    for key in ("lost_results", "wrong_outcomes"):
        if report[key]:
            failed.append(f"{key}: {report[key]}")
    for key in ("orphan_jobs", "unbounded_dispatches", "fault_errors"):
        if report[key]:
            failed.append(f"{key}: {report[key]}")
    if report["leftover_objects"].get("other"):
        failed.append(f"objects left behind: {report['leftover_objects']['other_names']}")
    restart = report["server_restart"]
    if "error" in restart:
        failed.append(f"the Covalent server could not be restarted: {restart['error']}")
    failed += [f"jobs --cancel for {name} exited {c['exit']}: {c['output'][-300:]}"
               for when in ("cancelled_at_restart", "cancelled_at_end")
               for name, c in restart.get(when, {}).items() if c["exit"] != 0]
    if any(p.endswith("not dispatched within the budget") for p in report["problems"]):
        failed.append("dispatches not made within the budget")
    return failed


def machine() -> dict:
    """Where it ran (bench/harness.py's record, as make bench keeps it) and the commit."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {**harness.machine(), "commit": commit}


def print_table(report: dict, out=sys.stdout) -> None:
    print(f"soak seed {report['seed']}: {report['electrons']} electrons, {report['dispatches']} dispatches, "
          f"{report['wall_s']:.0f} s on {report['machine']['cpu_model']} ({report['machine']['cores']} cores), "
          f"commit {report['machine']['commit']}", file=out)
    print("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(report["faults"].items())), file=out)
    print("electrons by outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(report["outcomes"].items())), file=out)
    print(f"{'check':<34}{'found':>8}", file=out)
    rows = [("lost results (must be 0)", report["lost_results"]), ("wrong outcomes (must be 0)", report["wrong_outcomes"]),
            ("orphan jobs (must be 0)", len(report["orphan_jobs"])),
            ("objects left but markers/kept (0)", report["leftover_objects"].get("other", 0)),
            ("dispatches over their bound (0)", len(report["unbounded_dispatches"])),
            ("faults that could not be made (0)", len(report["fault_errors"]))]
    for name, found in rows:
        print(f"{name:<34}{found:>8}", file=out)
    r = report["server_restart"]
    if "at_s" in r:
        print(f"Covalent server SIGKILLed at {r['at_s']} s, back after {r.get('away_s')} s; {len(r.get('in_flight', []))} "
              f"dispatches in flight not waited for, their jobs cancelled with `covalent-gcpbatch jobs ID --cancel`", file=out)
    s = report["settle_after_last_fault_s"]
    if s:
        print(f"settle after the last fault: p50 {s['p50']} s, p99 {s['p99']} s, max {s['max']} s", file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log(f"soak: seed {args.seed} (replay: python -m bench.soak --seed {args.seed} --electrons {args.electrons} "
        f"--dispatches {args.dispatches})")
    started = time.monotonic()
    report = Soak(args).run()
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["machine"] = machine()
    report["parameters"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    failed = verdict(report)
    report["passed"] = not failed
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"soak-{datetime.date.today().isoformat()}-seed{args.seed}.json"
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_table(report)
    if failed:
        print(f"\nSOAK FAILED (seed {args.seed}): " + "; ".join(failed), file=sys.stderr)
        for problem in report["problems"]:
            print(f"  {problem}", file=sys.stderr)
        for history in report["histories"]:
            print(json.dumps(history, default=str), file=sys.stderr)
    log(f"soak: results in {out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
