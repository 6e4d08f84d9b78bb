"""``covalent-gcpbatch``: the plugin's command line (click, with tables drawn by rich, as
Covalent's own CLI).

    covalent-gcpbatch local up [--state-dir D] [--foreground]
    covalent-gcpbatch local down [--state-dir D]
    covalent-gcpbatch local status [--state-dir D] [--json]
    covalent-gcpbatch logs DISPATCH_ID [NODE_ID] [--follow]
    covalent-gcpbatch jobs [DISPATCH_ID] [--cancel [--force] [--yes]] [--json]
    covalent-gcpbatch cost DISPATCH_ID [--prices FILE] [--json]
    covalent-gcpbatch deploy up|status|down|image [--project P] [deploy.sh options...]

``local up`` starts the local emulation stack (see local/stack.py) and points the Covalent
executor config at it; ``local down`` stops it and takes those config keys out again (restoring
values they replaced). ``up`` of a stack that is already running reuses it. The state directory
defaults to ``$COVALENT_GCPBATCH_LOCAL_DIR`` or ``~/.cache/covalent-gcpbatch/local``.
``logs``, ``jobs`` and ``cost`` watch the tasks of the deployment the Covalent config points at
(watch.py returns the data; this module draws it). ``deploy`` runs the deploy.sh the package
carries (assets/source/deploy.sh), so a pip install is enough to deploy.

Errors: a Google auth or API error, or a GCPBatchError, is one line on stderr and exit 1; Ctrl-C
exits 130; neither prints a traceback. ``main(argv)`` returns the exit code (the console script).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

PROG = "covalent-gcpbatch"
DISTRIBUTION = "covalent-gcpbatch-plugin"
STATE_DIR_ENV = "COVALENT_GCPBATCH_LOCAL_DIR"
#: Inside the state dir: which config file `up` edited, the keys it wrote and the values they replaced.
CONFIG_RECORD = "covalent-config.json"
#: The deploy script the package carries (a link to the repository's deploy.sh in a checkout, the
#: file itself in a wheel), with its sources beside it (functions/, worker_image/).
DEPLOY_SH = Path(__file__).resolve().parent / "assets" / "source" / "deploy.sh"
#: Where ``deploy`` takes the project from when --project is not given, in this order (deploy.sh's
#: own variable first; then the variables Google's client libraries and gcloud read).
PROJECT_ENV = ("GCPBATCH_PROJECT", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT")
ADC_LOGIN = "gcloud auth application-default login"
INTERRUPTED = 130


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".cache" / "covalent-gcpbatch" / "local")


def _print_err(message: str) -> None:
    click.echo(f"{PROG}: {message}", err=True)


def _done(code: int) -> None:
    """End the command with this exit code (click ignores a command's return value)."""
    click.get_current_context().exit(code)


# ---------------------------------------------------------------------------------------------
# Errors: one line, no traceback
# ---------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def failure_message(err: Exception) -> str | None:
    """The line to print for an error a user can act on (Google auth and API errors, the plugin's
    own), or None for a bug (left to show its traceback)."""
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions

    from .errors import GCPBatchError

    if isinstance(err, auth_exceptions.DefaultCredentialsError):
        return f"no Google credentials ({_one_line(err)}); run: {ADC_LOGIN}"
    if isinstance(err, auth_exceptions.RefreshError):
        return f"Google credentials were refused ({_one_line(err)}); run: {ADC_LOGIN}"
    if isinstance(err, auth_exceptions.GoogleAuthError):
        return f"Google authentication failed: {_one_line(err)}"
    if isinstance(err, api_exceptions.GoogleAPICallError):
        return f"Google API error: {_one_line(err)}"
    if isinstance(err, api_exceptions.RetryError):
        return f"Google API did not answer in time: {_one_line(err)}"
    if isinstance(err, GCPBatchError):
        return _one_line(err)
    return None


class Group(click.Group):
    """The top-level group: turns what a user can act on into one line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _print_err("interrupted")
            ctx.exit(INTERRUPTED)
        except Exception as err:
            message = failure_message(err)
            if message is None:
                raise
            _print_err(message)
            ctx.exit(1)


def _epilog(*examples: str) -> str:
    """Help's examples, kept as written (click's \\b: no rewrapping)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in examples)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=Group, context_settings=CONTEXT, epilog=_epilog(
    f"{PROG} local up",
    f"{PROG} deploy up --project my-project",
    f"{PROG} jobs --json",
    f"{PROG} --version",
    f"eval \"$(_COVALENT_GCPBATCH_COMPLETE=bash_source {PROG})\"   # shell completion (bash; zsh_source, fish_source)",
))
@click.version_option(package_name=DISTRIBUTION, prog_name=PROG, message="%(prog)s %(version)s")
def app() -> None:
    """Covalent Google Cloud Batch executor tools: the local emulation stack, deploying to a Google
    Cloud project, and watching the tasks of a deployment."""


# ---------------------------------------------------------------------------------------------
# Rendering (rich)
# ---------------------------------------------------------------------------------------------


def _console():
    from rich.console import Console

    stream = sys.stdout
    terminal = stream.isatty()
    # Not a terminal (a pipe, a file, a test): rows never wrap, so each job stays on one line.
    return Console(file=stream, width=None if terminal else 1000, highlight=False, soft_wrap=not terminal)


def _table(*columns: tuple[str, str]):
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for title, justify in columns:
        table.add_column(title, justify=justify, no_wrap=True)
    return table


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def electrons_cell(row: dict) -> str:
    """The nodes of the dispatch that ran on a job (``3, 5, 7``), and how many of other dispatches."""
    nodes = ", ".join(row.get("nodes") or []) or "-"
    others = row.get("other_dispatches")
    return nodes + (f" +{others} of other dispatches" if others else "")


def show_jobs(rows: list[dict]) -> None:
    electrons = any(row.get("nodes") is not None for row in rows)  # of a dispatch: who ran on each job
    table = _table(("JOB", "left"), ("STATE", "left"), ("DISPATCH", "left"), ("NODE", "right"), ("AGE", "right"),
                   ("VM", "right"), *([("ELECTRONS", "left")] if electrons else []))  # fmt: skip
    for row in rows:
        table.add_row(row["job"], row["state"], row["dispatch_id"], row["node_id"], row["age"], f"{row['vm_s']:.0f}s",
                      *([electrons_cell(row)] if electrons else []))  # fmt: skip
    _console().print(table)


def show_cost(report: dict) -> None:
    gpus = any(row["gpus"] for row in report["jobs"])
    columns = [("JOB", "left"), ("STATE", "left"), ("MACHINE", "left"), ("VM", "right"), ("BILLED", "right"),
               ("vCPU-h", "right"), ("GiB-h", "right"), *([("GPU-h", "right")] if gpus else []), ("USD", "right"),
               ("ELECTRONS", "left")]
    table = _table(*columns)
    for row in report["jobs"]:
        machine = " ".join(filter(None, (row["machine_family"], f"{row['vcpus']:g} vCPU {row['memory_gib']:g} GiB",
                                         f"{row['gpus']}x {row['gpu_type']}" if row["gpus"] else "")))
        table.add_row(row["job"], row["state"], machine, f"{row['vm_s']:.1f}s", f"{row['billed_s']:.0f}s",
                      f"{row['vcpu_hours']:.4f}", f"{row['memory_gib_hours']:.4f}",
                      *([f"{row['gpu_hours']:.4f}"] if gpus else []), f"${row['usd']:.4f}", electrons_cell(row))  # fmt: skip
    console = _console()
    console.print(table)
    console.print(f"dispatch {report['dispatch_id']}: {len(report['jobs'])} job(s), VM-seconds {report['vm_s']:.1f} "
                  f"(billed {report['billed_s']:.0f}), about ${report['usd']:.4f} on demand ({report['note']})")


# ---------------------------------------------------------------------------------------------
# local
# ---------------------------------------------------------------------------------------------


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
        print(f"Stop it with: {PROG} local down" + ("" if state_dir == default_state_dir().expanduser().resolve() else f" --state-dir {state_dir}"))
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
        _print_json(status)
    elif not status["components"]:
        print(f"No local stack in {status['state_dir']}.")
    else:
        print(f"Local stack in {status['state_dir']}: {'running' if status['running'] else 'NOT fully running'}")
        table = _table(("COMPONENT", "left"), ("PID", "right"), ("STATE", "left"), ("URL", "left"), ("LOG", "left"))
        for name, c in status["components"].items():
            table.add_row(name, str(c["pid"]), "up" if c["alive"] else "DOWN", c["url"] or "-", str(c["log"]))
        _console().print(table)
    return 0 if status["running"] else 1


def _state_dir(value: Path | None) -> Path:
    return (value or default_state_dir()).expanduser().resolve()


state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
    help=f"Where the stack keeps its state and logs (default: ${STATE_DIR_ENV} or ~/.cache/covalent-gcpbatch/local).",
)


@app.group(context_settings=CONTEXT, epilog=_epilog(f"{PROG} local up", f"{PROG} local status", f"{PROG} local down"))
def local() -> None:
    """The local emulation stack: Pub/Sub and GCS emulators, the Cloud Function, a local Batch
    service (no Google account needed)."""


@local.command("up", context_settings=CONTEXT, epilog=_epilog(
    f"{PROG} local up", f"{PROG} local up --state-dir /tmp/cgb-stack", f"{PROG} local up --foreground"))
@state_dir_option
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C stops the stack.")
def local_up_command(state_dir: Path | None, foreground: bool) -> None:
    """Start the stack (or reuse a running one) and point the executor config at it."""
    _done(local_up(_state_dir(state_dir), foreground))


@local.command("down", context_settings=CONTEXT, epilog=_epilog(f"{PROG} local down", f"{PROG} local down --state-dir /tmp/cgb-stack"))
@state_dir_option
def local_down_command(state_dir: Path | None) -> None:
    """Stop the stack and remove its executor config keys (restoring values they replaced)."""
    _done(local_down(_state_dir(state_dir)))


@local.command("status", context_settings=CONTEXT, epilog=_epilog(
    f"{PROG} local status", f"{PROG} local status --json", f"{PROG} local status --state-dir /tmp/cgb-stack"))
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def local_status_command(state_dir: Path | None, as_json: bool) -> None:
    """Show the stack's components (exit 0 if all of them run, else 1)."""
    _done(local_status(_state_dir(state_dir), as_json))


# ---------------------------------------------------------------------------------------------
# logs, jobs, cost
# ---------------------------------------------------------------------------------------------


@app.command(context_settings=CONTEXT, epilog=_epilog(
    f"{PROG} logs 5f1c0d2e-8a7b-4c3d-9e0f-123456789abc          # every task of the dispatch",
    f"{PROG} logs 5f1c0d2e-8a7b-4c3d-9e0f-123456789abc 3        # NODE_ID 3 only",
    f"{PROG} logs 5f1c0d2e-8a7b-4c3d-9e0f-123456789abc 3 --follow"))
@click.argument("dispatch_id")
@click.argument("node_id", type=int, required=False)
@click.option("--follow", "-f", is_flag=True, help="Stream one task's stdout until it ends (needs NODE_ID if the dispatch has several tasks).")
def logs(dispatch_id: str, node_id: int | None, follow: bool) -> None:
    """What a dispatch's tasks printed so far (DISPATCH_ID, and NODE_ID for one task)."""
    from . import watch

    _done(watch.logs(dispatch_id, node_id, follow, out=sys.stdout))


@app.command(context_settings=CONTEXT, epilog=_epilog(
    f"{PROG} jobs                                          # every job of this deployment",
    f"{PROG} jobs 5f1c0d2e-8a7b-4c3d-9e0f-123456789abc     # DISPATCH_ID's jobs",
    f"{PROG} jobs --json",
    f"{PROG} jobs --cancel                                 # jobs left behind; asks first",
    f"{PROG} jobs 5f1c0d2e-8a7b-4c3d-9e0f-123456789abc --cancel --force --yes"))
@click.argument("dispatch_id", required=False)
@click.option("--cancel", is_flag=True, help="Cancel the active ones whose dispatch the Covalent server says has ended "
              "(left behind); lists them and asks first.")
@click.option("--force", is_flag=True, help="With --cancel: also those whose dispatch the server does not know, or when "
              "no server answers (a server elsewhere may still wait for them).")
@click.option("--yes", "-y", is_flag=True, help="With --cancel: do not ask (without a terminal to ask on, --cancel needs it).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: a JSON list of the jobs (not with --cancel).")
def jobs(dispatch_id: str | None, cancel: bool, force: bool, yes: bool, as_json: bool) -> None:
    """This deployment's Batch jobs (of DISPATCH_ID if given, with the electrons that ran on each), with state, node, age and VM time."""
    from . import watch

    if (force or yes) and not cancel:
        raise click.UsageError("--force and --yes go with --cancel")
    if as_json and cancel:
        raise click.UsageError("--json lists the jobs; it does not go with --cancel")
    show = _print_json if as_json else show_jobs
    _done(watch.jobs(dispatch_id, cancel, out=sys.stdout, force=force, yes=yes, show=show))


@app.command(context_settings=CONTEXT, epilog=_epilog(
    f"{PROG} cost 5f1c0d2e-8a7b-4c3d-9e0f-123456789abc",
    f"{PROG} cost 5f1c0d2e-8a7b-4c3d-9e0f-123456789abc --json",
    f"{PROG} cost 5f1c0d2e-8a7b-4c3d-9e0f-123456789abc --prices my-prices.json"))
@click.argument("dispatch_id")
@click.option("--prices", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="JSON file overriding usage.DEFAULT_PRICES (USD per hour).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: the jobs, their usage and the totals.")
def cost(dispatch_id: str, prices: str | None, as_json: bool) -> None:
    """VM time and an on-demand price estimate of DISPATCH_ID's jobs, each VM once with the electrons it ran (exit 1 if it has none)."""
    from . import watch

    report = watch.cost_report(dispatch_id, prices)
    if as_json:
        _print_json(report)
    elif not report["jobs"]:
        click.echo(f"No Batch job of dispatch {dispatch_id} in {report['project_id']} ({report['region']}).")
    else:
        show_cost(report)
    _done(0 if report["jobs"] else 1)


# ---------------------------------------------------------------------------------------------
# deploy: the packaged deploy.sh
# ---------------------------------------------------------------------------------------------


def default_project() -> tuple[str, str] | None:
    """(project, where it came from) when --project is not given: PROJECT_ENV, then gcloud's
    configured project (``gcloud config get-value project``); None if none is set."""
    for name in PROJECT_ENV:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip(), name
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    try:
        done = subprocess.run([gcloud, "config", "get-value", "project"], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = done.stdout.strip().splitlines()[-1].strip() if done.returncode == 0 and done.stdout.strip() else ""
    return (value, "gcloud config get-value project") if value and value != "(unset)" else None


def _given(args: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in args)


def deploy_argv(action: str, project: str | None, args: list[str]) -> list[str]:
    """deploy.sh's command line: the action, --project (given, or default_project()), the rest as given."""
    if project is None and not any(a in ("-h", "--help") for a in args):
        found = default_project()
        if found is None:
            raise click.UsageError("no project: pass --project P, set GOOGLE_CLOUD_PROJECT, or run gcloud config set project P")
        project, source = found
        _print_err(f"project {project} (from {source}; --project to choose another)")
    return [action, *(["--project", project] if project is not None else []), *args]


def check_application_default_credentials() -> bool:
    """Whether this machine has Application Default Credentials, which the Covalent server (the
    executor runs inside it) authenticates with; if not, say the one command that makes them."""
    import google.auth
    from google.auth import exceptions as auth_exceptions

    try:
        credentials, adc_project = google.auth.default()
    except auth_exceptions.DefaultCredentialsError:
        _print_err("the deployment is ready, but this machine has no Application Default Credentials, which the "
                   "Covalent server uses to reach Google Cloud; create them with:")
        click.echo(f"  {ADC_LOGIN}", err=True)
        return False
    click.echo(f"Application Default Credentials found ({type(credentials).__module__.rsplit('.', 1)[-1]}"
               f"{f', project {adc_project}' if adc_project else ''}): the Covalent server on this machine can use them.")
    return True


def run_deploy(action: str, project: str | None, args: list[str]) -> int:
    """Run the packaged deploy.sh; ``up`` then checks the Application Default Credentials (a
    missing one is reported, not a failure: the deployment itself is complete, and the Covalent
    server may run on another machine, with its own credentials)."""
    bash = shutil.which("bash")
    if bash is None:
        raise click.ClickException("deploy needs bash (deploy.sh is a bash script)")
    if not DEPLOY_SH.is_file():
        raise click.ClickException(f"{DEPLOY_SH} not found: this installation does not carry deploy.sh")
    argv = deploy_argv(action, project, args)
    env = dict(os.environ)
    if not _given(args, "--python") and not env.get("GCPBATCH_PYTHON"):
        env["GCPBATCH_PYTHON"] = sys.executable  # the environment the plugin (and Covalent) is installed in
    code = subprocess.run([bash, str(DEPLOY_SH), *argv], env=env).returncode
    if code == 0 and action == "up" and not any(a in ("-h", "--help") for a in args):
        check_application_default_credentials()
    return code


def _deploy_sh_usage() -> str:
    try:
        done = subprocess.run(["bash", str(DEPLOY_SH), "--help"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = done.stdout if done.returncode == 0 else ""
    return text.split("\nOptions", 1)[1].split("\n", 1)[1] if "\nOptions" in text else text


class DeployCommand(click.Command):
    """A deploy action: its help ends with deploy.sh's own options, which it passes through."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        usage = _deploy_sh_usage()
        if usage:
            formatter.write("\ndeploy.sh's options, passed through (environment fallbacks in parentheses):\n")
            formatter.write(usage if usage.endswith("\n") else usage + "\n")


@app.group(context_settings=CONTEXT, epilog=_epilog(
    f"{PROG} deploy up --project my-project",
    f"{PROG} deploy status",
    f"{PROG} deploy image --name ml --requirements requirements.txt",
    f"{PROG} deploy down --yes"))
def deploy() -> None:
    """Deploy to a Google Cloud project (the packaged deploy.sh: gcloud only, no checkout,
    terraform or docker). --project defaults to $GCPBATCH_PROJECT, $GOOGLE_CLOUD_PROJECT,
    $CLOUDSDK_CORE_PROJECT, then `gcloud config get-value project`."""


DEPLOY_ACTIONS = {
    "up": ("Create (or complete) the deployment and write [executors.gcpbatch] in the Covalent config; "
           "then check this machine's Application Default Credentials.",
           ["--project my-project", "--project my-project --region europe-west4 --prefix team-a",
            "--only function,config"]),
    "status": ("Show which of the deployment's resources and roles exist.",
               ["--project my-project", "--region europe-west4 --prefix team-a"]),
    "down": ("Delete what up created (asks first; --yes to skip; without a terminal it needs --yes).",
             ["--project my-project", "--project my-project --yes"]),
    "image": ("Build a worker image with your packages into the deployment's repository (tasks use it with "
              "container_image_uri).",
              ["--project my-project --name ml --requirements requirements.txt"]),
}


def _deploy_command(action: str) -> None:
    summary, examples = DEPLOY_ACTIONS[action]

    @deploy.command(action, cls=DeployCommand, help=summary,
                    context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True},
                    epilog=_epilog(*(f"{PROG} deploy {action} {example}" for example in examples)))
    @click.option("--project", metavar="P", default=None,
                  help=f"Google Cloud project id (default: ${', $'.join(PROJECT_ENV)}, or gcloud's configured project).")
    @click.argument("deploy_sh_options", nargs=-1, type=click.UNPROCESSED, metavar="[DEPLOY.SH OPTIONS]...")
    def command(project: str | None, deploy_sh_options: tuple[str, ...]) -> None:
        _done(run_deploy(action, project, list(deploy_sh_options)))


for _action in DEPLOY_ACTIONS:
    _deploy_command(_action)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The console script: runs the command and returns its exit code (2: a usage error; 1: an
    error printed as one line; 130: interrupted)."""
    try:
        result = app.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.Abort as err:  # Ctrl-C outside a command (click turns it into Abort), or EOF at a prompt
        if isinstance(err.__cause__, KeyboardInterrupt):
            _print_err("interrupted")
            return INTERRUPTED
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
