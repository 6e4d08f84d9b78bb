"""``covalent-gcpbatch``: the plugin's command line.

    covalent-gcpbatch local up [--state-dir D] [--foreground]
    covalent-gcpbatch local down [--state-dir D]
    covalent-gcpbatch local status [--state-dir D] [--json]
    covalent-gcpbatch logs DISPATCH_ID [NODE_ID] [--follow]
    covalent-gcpbatch jobs [DISPATCH_ID] [--cancel [--force] [--yes]]
    covalent-gcpbatch cost DISPATCH_ID [--prices FILE]

``local up`` starts the local emulation stack (see local/stack.py) and points the Covalent
executor config at it; ``local down`` stops it and takes those config keys out again (restoring
values they replaced). ``up`` of a stack that is already running reuses it. The state directory
defaults to ``$COVALENT_GCPBATCH_LOCAL_DIR`` or ``~/.cache/covalent-gcpbatch/local``.
``logs``, ``jobs`` and ``cost`` watch the tasks of the deployment the Covalent config points at
(watch.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

STATE_DIR_ENV = "COVALENT_GCPBATCH_LOCAL_DIR"
#: Inside the state dir: which config file `up` edited, the keys it wrote and the values they replaced.
CONFIG_RECORD = "covalent-config.json"


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".cache" / "covalent-gcpbatch" / "local")


def _print_err(message: str) -> None:
    print(f"covalent-gcpbatch: {message}", file=sys.stderr)


def local_up(state_dir: Path, foreground: bool) -> int:
    from . import covalent_config
    from .errors import StackError
    from .local.stack import LocalStack

    started = time.monotonic()
    stack = LocalStack(state_dir, progress=lambda message: print(f"  [{time.monotonic() - started:5.1f} s] {message}", flush=True))
    already_running = stack.status()["running"]
    try:
        settings = stack.up()
    except StackError as err:
        _print_err(str(err))
        return 1
    if already_running:
        print(f"The local stack in {stack.state_dir} is already running; reusing it.")
    else:
        print(f"Local stack up in {time.monotonic() - started:.1f} s (state and logs in {stack.state_dir}).")

    values = settings.executor_config()
    try:
        path = _write_config(stack.state_dir, values)
    except Exception as err:
        _print_err(f"could not write the Covalent config ({err}); stopping the stack")
        stack.down()
        return 1
    print(f"Wrote [executors.{covalent_config.SECTION}] in {path}:")
    for key, value in values.items():
        print(f"  {key} = {json.dumps(value)}")
    print(f"Function: {settings.function_url}  Batch API: {settings.batch_api_endpoint}")
    if not foreground:
        print("Stop it with: covalent-gcpbatch local down" + ("" if state_dir == default_state_dir().expanduser().resolve() else f" --state-dir {state_dir}"))
        return 0
    return _run_in_foreground(stack, state_dir)


def _write_config(state_dir: Path, values: dict[str, str]) -> Path:
    from . import covalent_config

    record_file = state_dir / CONFIG_RECORD
    if record_file.exists():  # a reused stack: the record already holds the values to restore
        record = json.loads(record_file.read_text())
        return covalent_config.write_executor_section(values, Path(record["file"]))
    path = covalent_config.config_file()
    previous = covalent_config.read_executor_section(path)
    replaced = {key: previous[key] for key in values if key in previous}
    record_file.write_text(json.dumps({"file": str(path), "keys": list(values), "replaced": replaced}, indent=2) + "\n")
    return covalent_config.write_executor_section(values, path)


def _run_in_foreground(stack, state_dir: Path) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("Running in the foreground; Ctrl-C stops the stack.", flush=True)
    failed: list[str] = []
    while not stop.wait(1.0):
        components = stack.status()["components"]
        failed = [name for name, c in components.items() if not c["alive"]]
        if failed:
            _print_err(f"{', '.join(failed)} stopped (see {stack.logs_dir}); bringing the stack down")
            break
    local_down(state_dir)
    return 1 if failed else 0


def local_down(state_dir: Path) -> int:
    from . import covalent_config
    from .local.stack import LocalStack

    stack = LocalStack(state_dir)
    was_running = bool(stack.status()["components"])
    stack.down()
    record_file = state_dir / CONFIG_RECORD
    if record_file.exists():
        record = json.loads(record_file.read_text())
        path = covalent_config.remove_executor_section_keys(record["keys"], record["replaced"], Path(record["file"]))
        record_file.unlink()
        removed = [k for k in record["keys"] if k not in record["replaced"]]
        print(f"Removed from [executors.{covalent_config.SECTION}] in {path}: {', '.join(removed) or '(nothing)'}")
        if record["replaced"]:
            print(f"Restored: {', '.join(record['replaced'])}")
    print("Local stack stopped." if was_running else f"No local stack was running in {stack.state_dir}.")
    return 0


def local_status(state_dir: Path, as_json: bool) -> int:
    from .local.stack import LocalStack

    status = LocalStack(state_dir).status()
    if as_json:
        print(json.dumps(status, indent=2))
    elif not status["components"]:
        print(f"No local stack in {status['state_dir']}.")
    else:
        print(f"Local stack in {status['state_dir']}: {'running' if status['running'] else 'NOT fully running'}")
        for name, c in status["components"].items():
            print(f"  {name:<9} pid {c['pid']:<8} {'up  ' if c['alive'] else 'DOWN'}  {c['url'] or '-':<26} {c['log']}")
    return 0 if status["running"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covalent-gcpbatch", description="Covalent Google Cloud Batch executor tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="the local emulation stack (no Google account needed)")
    actions = local.add_subparsers(dest="action", required=True)

    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir", type=Path, default=None,
        help=f"where the stack keeps its state and logs (default: ${STATE_DIR_ENV} or ~/.cache/covalent-gcpbatch/local)",
    )
    up = actions.add_parser("up", parents=[state], help="start the stack and point the executor config at it")
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the stack")
    actions.add_parser("down", parents=[state], help="stop the stack and remove its executor config keys")
    status = actions.add_parser("status", parents=[state], help="show the stack's components (exit 0 if all run)")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    logs = commands.add_parser("logs", help="what a dispatch's tasks printed so far (--follow: as they print)")
    logs.add_argument("dispatch_id")
    logs.add_argument("node_id", nargs="?", type=int, default=None)
    logs.add_argument("--follow", "-f", action="store_true", help="stream one task's stdout until it ends")
    jobs = commands.add_parser("jobs", help="this deployment's Batch jobs, with state, node, age and VM time")
    jobs.add_argument("dispatch_id", nargs="?", default=None)
    jobs.add_argument("--cancel", action="store_true",
                      help="cancel the active ones whose dispatch the Covalent server says has ended (left behind); "
                           "lists them and asks first")
    jobs.add_argument("--force", action="store_true",
                      help="with --cancel: also those whose dispatch the server does not know, or when no server "
                           "answers (a server elsewhere may still wait for them)")
    jobs.add_argument("--yes", "-y", action="store_true",
                      help="with --cancel: do not ask (without a terminal to ask on, --cancel needs it)")
    cost = commands.add_parser("cost", help="VM time and an on-demand price estimate of a dispatch's jobs")
    cost.add_argument("dispatch_id")
    cost.add_argument("--prices", default=None, help="JSON file overriding usage.DEFAULT_PRICES (USD per hour)")
    return parser


def watch_command(args: argparse.Namespace) -> int:
    from . import watch
    from .errors import GCPBatchError

    try:
        if args.command == "logs":
            return watch.logs(args.dispatch_id, args.node_id, args.follow)
        if args.command == "jobs":
            if (args.force or args.yes) and not args.cancel:
                _print_err("--force and --yes go with --cancel")
                return 2
            return watch.jobs(args.dispatch_id, args.cancel, force=args.force, yes=args.yes)
        return watch.cost(args.dispatch_id, args.prices)
    except GCPBatchError as err:
        _print_err(str(err))
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "local":
        return watch_command(args)
    state_dir = (args.state_dir or default_state_dir()).expanduser().resolve()
    if args.action == "up":
        return local_up(state_dir, args.foreground)
    if args.action == "down":
        return local_down(state_dir)
    return local_status(state_dir, args.json)


if __name__ == "__main__":
    sys.exit(main())
