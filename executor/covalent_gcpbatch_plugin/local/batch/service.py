"""A local stand-in for Google Cloud Batch, speaking its REST API to the real ``google-cloud-batch``
client (``clients.batch_client("http://127.0.0.1:P")``).

    python -m covalent_gcpbatch_plugin.local.batch.service --host 127.0.0.1 --port P --state-dir DIR \\
        [--project-number-map local-project=123456789012] [--max-running 2] \\
        [--worker-command "python -m covalent_gcpbatch_plugin.worker"] [--secrets-dir DIR]

Batch API (``/v1``): create, get, list, cancel and delete jobs; get and list a job's task (its
state and, per attempt, its ``task_execution`` exit code). Cancel and delete answer with a
long-running operation that is not done yet (``GET /v1/<operation name>`` follows it). camelCase
JSON, enums as integers when the client asks (``$alt=json;enum-encoding=int``), errors as
``{"error": {code, message, status}}``. Job and task state changes are published to each job's
JOB_STATE_CHANGED and TASK_STATE_CHANGED notification topics through the real Pub/Sub publisher
(only when PUBSUB_EMULATOR_HOST is set: a local service never publishes to Google).

Admin API (``/_admin``): ``GET stats`` (call counters, per-job state-entry wall-clock times,
notification counters, workers killed by ``kill_running``, requests by the SHA-256 of the bearer
token they carried), ``GET active`` (ids of jobs not yet terminal), ``POST faults`` (see
``faults.Faults``; ``kill_running`` is an action, done when posted), ``POST reset``. The service is
ready once ``GET /_admin/stats`` answers 200.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from google.cloud import batch_v1
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2, json_format

from .model import ApiError, State, parse_worker_command
from .latency import LatencyModel
from .runner import LocalBatch, Operation

log = logging.getLogger("covalent_gcpbatch_plugin.local.batch")

Action = Literal["create", "get", "list", "cancel", "delete", "operation", "get_task", "list_tasks", "stats", "active",
                 "faults", "reset"]

# ---------------------------------------------------------------------------------------------
# Pure translation: request -> action, results -> JSON
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    action: Action
    project: str = ""
    region: str = ""
    job_id: str = ""
    operation: str = ""  # the operation's name, for "operation"
    group: str = ""  # the task group, for "get_task" and "list_tasks"
    task: str = ""  # the task index, for "get_task"


_ADMIN: dict[tuple[str, str], Action] = {
    ("GET", "/_admin/stats"): "stats",
    ("GET", "/_admin/active"): "active",
    ("POST", "/_admin/faults"): "faults",
    ("POST", "/_admin/reset"): "reset",
}
_JOBS = re.compile(
    r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/jobs(?:/(?P<job>[^/:]+)(?P<cancel>:cancel)?)?$"
)


_TASKS = re.compile(
    r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/jobs/(?P<job>[^/:]+)/taskGroups/(?P<group>[^/]+)"
    r"/tasks(?:/(?P<task>[^/]+))?$"
)
_OPERATION = re.compile(r"^/v1/(?P<name>projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/operations/[^/:]+)$")


def route(method: str, path: str) -> Route | None:
    """The action a request asks for, or None if the service has no such method."""
    if (method, path) in _ADMIN:
        return Route(_ADMIN[(method, path)])
    operation = _OPERATION.fullmatch(unquote(path))
    if operation and method == "GET":
        return Route("operation", operation["project"], operation["region"], operation=operation["name"])
    tasks = _TASKS.fullmatch(unquote(path))
    if tasks:
        if method != "GET":
            return None
        action = "get_task" if tasks["task"] is not None else "list_tasks"
        return Route(action, tasks["project"], tasks["region"], tasks["job"], group=tasks["group"], task=tasks["task"] or "")
    match = _JOBS.fullmatch(unquote(path))
    if not match:
        return None
    project, region, job_id = match["project"], match["region"], match["job"]
    if job_id is None:
        action = {"POST": "create", "GET": "list"}.get(method)
    elif match["cancel"]:
        action = "cancel" if method == "POST" else None
    else:
        action = {"GET": "get", "DELETE": "delete"}.get(method)
    return Route(action, project, region, job_id or "") if action else None


#: The ListJobs filter terms the service understands, as watch.label_filter and dsub send them.
_LABEL_TERM = re.compile(r'labels\."(?P<key>[^"]+)"\s*=\s*"(?P<value>[^"]*)"')
_STATE_TERM = re.compile(r'status\.state\s*=\s*"?(?P<state>[A-Z_]+)"?')


@dataclass(frozen=True)
class ListFilter:
    """An AND of ``labels."KEY" = "VALUE"`` and ``status.state="STATE"`` terms (none: every job)."""

    labels: tuple[tuple[str, str], ...] = ()
    state: State | None = None


def list_filter(expression: str) -> ListFilter:
    """Parse a ListJobs filter; anything beyond the terms above is refused (400), not ignored."""
    labels: list[tuple[str, str]] = []
    states: set[State] = set()
    for term in filter(None, (t.strip() for t in re.split(r"\s+AND\s+", expression.strip()))):
        if label := _LABEL_TERM.fullmatch(term):
            labels.append((label["key"], label["value"]))
        elif state := _STATE_TERM.fullmatch(term):
            try:
                states.add(State[state["state"]])
            except KeyError:
                raise ApiError(400, f"unknown job state in filter term {term!r}") from None
        else:
            raise ApiError(400, f"unsupported filter term {term!r} in {expression!r}: only an AND of "
                                'labels."<KEY>" = "<VALUE>" and status.state="<STATE>" is supported locally')
    if len(states) > 1:
        raise ApiError(400, f"filter {expression!r} asks for more than one job state at once")
    return ListFilter(tuple(labels), next(iter(states), None))


def message_json(message, *, enums_as_ints: bool) -> str:
    """A proto-plus message as Google's REST API writes it: camelCase, defaults omitted."""
    return type(message).to_json(message, use_integers_for_enums=enums_as_ints, indent=None,
                                 always_print_fields_with_no_presence=False)


def operation_json(operation: Operation, response) -> str:
    """A long-running operation as Batch answers cancel and delete: not done when first returned
    (the client's ``.result()`` polls ``GET /v1/<operation name>``), its response once done."""
    op = operations_pb2.Operation(name=operation.name, done=operation.done())
    metadata = batch_v1.OperationMetadata(target=operation.target, verb=operation.verb, api_version="v1")
    op.metadata.Pack(batch_v1.OperationMetadata.pb(metadata))
    if op.done:
        op.response.Pack(response)
    return json_format.MessageToJson(op, indent=None)


#: What a finished operation of each verb answers.
OPERATION_RESPONSES = {"cancel": lambda: batch_v1.CancelJobResponse.pb(batch_v1.CancelJobResponse()),
                       "delete": empty_pb2.Empty}


def error_json(err: ApiError) -> str:
    return json.dumps({"error": {"code": err.code, "message": err.message, "status": err.status}})


# ---------------------------------------------------------------------------------------------
# Notifications (I/O: the real Pub/Sub publisher)
# ---------------------------------------------------------------------------------------------


class Notifier:
    """Publishes Batch's notifications with the real publisher; counts outcomes for the stats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._publisher = None
        self.counts: Counter[str] = Counter()

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def connect(self):
        """The publisher, created on first use (``main`` calls this at start-up when
        PUBSUB_EMULATOR_HOST is set, so the first job does not pay for it)."""
        with self._lock:
            if self._publisher is None:
                from ... import clients

                self._publisher = clients.publisher_client()
            return self._publisher

    def publish(self, topic: str, data: bytes, attributes: dict[str, str]) -> None:
        if not os.environ.get("PUBSUB_EMULATOR_HOST"):
            log.warning("PUBSUB_EMULATOR_HOST is not set: not publishing %s to %s", attributes.get("NewJobState"), topic)
            self._count("skipped")
            return
        future = self.connect().publish(topic, data, **attributes)

        def _done(f) -> None:
            err = f.exception()
            if err is not None:
                log.warning("publishing to %s failed: %s", topic, err)
            self._count("failed" if err is not None else "published")

        future.add_done_callback(_done)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def close(self) -> None:
        with self._lock:
            publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.stop()  # flushes what is pending


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


class BatchApp:
    """Routes a parsed request to ``LocalBatch`` and renders the answer: (status, JSON text)."""

    def __init__(self, batch: LocalBatch, notifier: Notifier) -> None:
        self.batch = batch
        self.notifier = notifier
        self.list_filters: Counter[str] = Counter()  # the filters ListJobs was called with (stats)
        #: Batch API requests by the bearer token they carried, as its SHA-256 digest ("none": no token):
        #: which credentials the clients send, never the tokens themselves (stats).
        self.bearer_tokens: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle(self, method: str, target: str, body: bytes) -> tuple[int, str]:
        url = urlsplit(target)
        where = route(method, url.path)
        if where is None:
            raise ApiError(404, f"no method {method} {url.path} in the local Batch service")
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        ints = "enum-encoding=int" in query.get("$alt", "")
        b, a = self.batch, where.action
        if a == "create":
            try:
                job = batch_v1.Job.from_json(body or b"{}", ignore_unknown_fields=True)
            except Exception as err:
                raise ApiError(400, f"invalid job: {err}") from None
            job_id = query.get("jobId") or f"job-{uuid.uuid4().hex[:20]}"
            return 200, message_json(b.create(where.project, where.region, job_id, job), enums_as_ints=ints)
        if a == "get":
            return 200, message_json(b.get(where.project, where.region, where.job_id), enums_as_ints=ints)
        if a == "list":
            with self._lock:
                self.list_filters[query.get("filter", "")] += 1
            wanted = list_filter(query.get("filter", ""))
            jobs = b.list(where.project, where.region, wanted.state, labels=dict(wanted.labels))
            return 200, message_json(batch_v1.ListJobsResponse(jobs=jobs), enums_as_ints=ints)
        if a in ("cancel", "delete"):
            started = b.cancel if a == "cancel" else b.delete
            operation = started(where.project, where.region, where.job_id)
            return 200, operation_json(operation, OPERATION_RESPONSES[a]())
        if a == "get_task":
            task = b.get_task(where.project, where.region, where.job_id, where.group, where.task)
            return 200, message_json(task, enums_as_ints=ints)
        if a == "list_tasks":
            size = query.get("pageSize", "0")
            tasks, following = b.list_tasks(where.project, where.region, where.job_id, where.group,
                                            page_size=int(size) if size.isdigit() else 0,
                                            page_token=query.get("pageToken", ""))
            return 200, message_json(batch_v1.ListTasksResponse(tasks=tasks, next_page_token=following),
                                     enums_as_ints=ints)
        if a == "operation":
            operation = b.operation(where.operation)
            return 200, operation_json(operation, OPERATION_RESPONSES[operation.verb]())
        if a == "stats":
            stats = b.stats()
            stats["notifications"] = {**self.notifier.stats(), **stats["notifications"]}
            with self._lock:
                stats["list_filters"] = dict(self.list_filters)
                stats["bearer_tokens"] = dict(self.bearer_tokens)
            return 200, json.dumps(stats)
        if a == "active":
            return 200, json.dumps({"active": b.active()})
        if a == "faults":
            try:
                faults = json.loads(body or b"{}")
                if not isinstance(faults, Mapping):
                    raise ValueError("the body must be a JSON object")
                b.set_faults(faults)
            except (ValueError, TypeError, KeyError) as err:
                raise ApiError(400, f"invalid faults: {err}") from None
            return 200, json.dumps(b.stats()["faults"])
        b.reset()  # "reset"
        return 200, "{}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: BatchHTTPServer

    def _serve(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        bearer = hashlib.sha256(token.encode()).hexdigest() if scheme.lower() == "bearer" and token else "none"
        if not self.path.startswith("/_admin/"):
            with self.server.app._lock:
                self.server.app.bearer_tokens[bearer] += 1
        try:
            self._check_host()
            status, text = self.server.app.handle(method, self.path, body)
        except ApiError as err:
            status, text = err.code, error_json(err)
        except Exception as err:  # answer 500 like Google does, keep serving
            log.exception("%s %s failed", method, self.path)
            status, text = 500, error_json(ApiError(500, f"internal error: {err}"))
        payload = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _check_host(self) -> None:
        """Answer only requests addressed to this loopback address: a web page that rebinds a name
        to 127.0.0.1 sends its own Host, and must not reach the service (DNS rebinding)."""
        port = self.server.server_address[1]
        allowed = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
        host = self.headers.get("Host", "")
        if host not in allowed:
            raise ApiError(403, f"Host {host!r} is not this service's loopback address ({', '.join(sorted(allowed))})")

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)


class BatchHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 resets connections under a burst of requests

    def __init__(self, address: tuple[str, int], app: BatchApp) -> None:
        super().__init__(address, _Handler)
        self.app = app


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_number_map(entries: list[str]) -> dict[str, str]:
    """``["a=123,b=456", "c=789"]`` -> ``{"a": "123", "b": "456", "c": "789"}``."""
    numbers: dict[str, str] = {}
    for entry in entries:
        for pair in filter(None, (p.strip() for p in entry.split(","))):
            project, _, number = pair.partition("=")
            if not project or not number.isdigit():
                raise argparse.ArgumentTypeError(f"--project-number-map expects PROJECT=NUMBER, got {pair!r}")
            numbers[project] = number
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covalent_gcpbatch_plugin.local.batch.service",
                                     description="A local Google Cloud Batch service (REST) running jobs as host processes.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--state-dir", type=Path, required=True, help="job working directories and logs go here")
    parser.add_argument("--project-number-map", action="append", default=[], metavar="PROJECT=NUMBER",
                        help="project number used in notifications' JobName (repeatable, or comma-separated)")
    parser.add_argument("--max-running", type=int, default=2, help="VMs (worker processes) at once, across jobs; jobs without one stay QUEUED")
    parser.add_argument("--worker-command", default=None,
                        help="what a container runnable runs (default: this python -m covalent_gcpbatch_plugin.worker)")
    parser.add_argument("--latency-model", choices=("off", "realistic"), default="off",
                        help="realistic: admission, VM boot and billing as real Batch (local/batch/latency.py)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="real seconds per model second (0.05 runs a 90 s VM boot in 4.5 s)")
    parser.add_argument("--secrets-dir", type=Path, default=None,
                        help="Secret Manager's stand-in: the value of projects/P/secrets/S/versions/V is the file of "
                             "that path below this directory (local/batch/task_io.py)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s batch-service: %(message)s")
    try:
        numbers = parse_number_map(args.project_number_map)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))

    notifier = Notifier()
    if os.environ.get("PUBSUB_EMULATOR_HOST"):
        notifier.connect()
    if args.time_scale <= 0:
        parser.error("--time-scale must be positive")
    model = LatencyModel.realistic(args.time_scale) if args.latency_model == "realistic" else LatencyModel(time_scale=args.time_scale)
    batch = LocalBatch(args.state_dir.resolve(), publish=notifier.publish, max_running=args.max_running,
                       worker_command=parse_worker_command(args.worker_command), project_numbers=numbers, model=model,
                       secrets_dir=args.secrets_dir.resolve() if args.secrets_dir else None)
    server = BatchHTTPServer((args.host, args.port), BatchApp(batch, notifier))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    print(f"local Batch service listening on http://{host}:{port}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        log.info("shutting down: killing running jobs")
        batch.shutdown()
        server.shutdown()
        server.server_close()
        notifier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
