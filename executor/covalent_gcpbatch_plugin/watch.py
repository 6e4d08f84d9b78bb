"""Watching tasks: ``covalent-gcpbatch logs``, ``jobs`` and ``cost`` (this reads and returns the
data; cli.py parses the command line and draws it, as tables or JSON).

Everything comes from the deployment the Covalent config points at (``[executors.gcpbatch]``, as
the executor reads it): the task objects in its bucket (a task's job id starts
``cov-<dispatch id's first 8>-<node id>-``, protocol.dispatch_prefix) and its Batch jobs (their
``created-by`` and ``covalent-deployment`` labels, the latter naming the deployment's bucket, and
their ``covalent-dispatch-id`` and ``covalent-node-id`` labels, a job's first electron's), and the
electrons' claims, which name the job that ran each (a warm VM runs several). On the local stack and on Google
Cloud alike. ``jobs --cancel`` cancels only what no Covalent server waits for: a job whose dispatch
a server says has ended; one whose dispatch is unknown, or whose server does not answer, only with
``--force``; and it asks first (``--yes`` does not), as ``deploy.sh down`` does.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TextIO

from google.api_core import exceptions
from google.cloud import batch_v1

from . import clients, covalent_config, protocol, usage
from .errors import ConfigError
from .jobs import (CREATED_BY, CREATED_BY_LABEL, DEPLOYMENT_LABEL, DISPATCH_LABEL, NODE_LABEL, deployment_label_value,
                   sanitize_label_value)
from .settings import PLUGIN_DEFAULTS

#: --follow reads the task's objects this often (an upload of the worker's comes every
#: worker.LIVE_INTERVAL_S), and stops after FOLLOW_LIMIT_S without the task ending.
FOLLOW_INTERVAL_S = 1.0
FOLLOW_LIMIT_S = 7 * 24 * 3600.0
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")

#: Reading a task's Cloud Logging entries once its objects are gone (``logs``). Logging's read
#: quota is 60 entries.list requests per minute per project, and a trivial Batch job writes
#: thousands of lines (platform notes; snakemake's googlebatch show-logs.py paces its reads 1.1 s
#: apart for the same quota). So: one request per page of LOGGING_PAGE_SIZE entries, requests at
#: least LOGGING_READ_INTERVAL_S apart in this process (55 a minute: room for a console open
#: beside it), and at most LOGGING_MAX_PAGES pages per task (then the gcloud command for the rest).
LOGGING_READ_INTERVAL_S = 60 / 55
LOGGING_PAGE_SIZE = 1000
LOGGING_MAX_PAGES = 10


class Pacer:
    """At most one call to ``wait`` returns per ``interval_s`` (thread-safe): a client-side limit
    that keeps this process's requests under a per-minute quota."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval_s, self._clock, self._sleep = interval_s, clock, sleep
        self._lock = threading.Lock()
        self._next = float("-inf")

    def wait(self) -> None:
        with self._lock:
            delay = self._next - self._clock()
            if delay > 0:
                self._sleep(delay)
            self._next = max(self._clock(), self._next) + self.interval_s


#: Every Cloud Logging read of this process goes through this one pacer.
LOGGING_PACER = Pacer(LOGGING_READ_INTERVAL_S)


@dataclass(frozen=True)
class Deployment:
    project_id: str
    region: str
    bucket_name: str
    storage_emulator_host: str
    batch_api_endpoint: str
    #: Where the task objects are (the function's trigger bucket), if not in ``bucket_name``.
    task_bucket_name: str = ""
    #: Cloud Logging's gRPC endpoint (host:port, plaintext) instead of Google's: tests only.
    logging_api_endpoint: str = ""

    @classmethod
    def from_config(cls) -> Deployment:
        section = {**PLUGIN_DEFAULTS, **covalent_config.read_executor_section()}
        missing = [k for k in ("project_id", "bucket_name") if not section.get(k)]
        if missing:
            raise ConfigError(f"[executors.gcpbatch] has no {', '.join(missing)}: run covalent-gcpbatch deploy up "
                              "(or covalent deploy up gcpbatch, or covalent-gcpbatch local up) first")
        return cls(section["project_id"], section["region"], section["bucket_name"],
                   section.get("storage_emulator_host") or "", section.get("batch_api_endpoint") or "",
                   section.get("task_bucket_name") or "", section.get("logging_api_endpoint") or "")

    def bucket(self):
        return clients.storage_client(self.project_id, self.storage_emulator_host or None).bucket(self.bucket_name)

    def task_bucket(self):
        return self.bucket().client.bucket(self.task_bucket_name or self.bucket_name)

    def batch(self):
        return clients.batch_client(self.batch_api_endpoint or None)

    @property
    def local(self) -> bool:
        return bool(self.batch_api_endpoint)


def job_ids_in(names: Iterable[str]) -> list[str]:
    """The job ids of the task objects among ``names`` (a listing of a dispatch's prefix)."""
    ids = {name[len(protocol.TASKS_PREFIX):].split("/", 1)[0] for name in names}
    return sorted(i for i in ids if protocol.JOB_ID_PATTERN.fullmatch(i))


def node_of(job_id: str) -> str:
    node = protocol.node_id_of_job_id(job_id)
    return "?" if node is None else str(node)


class TaskOutput:
    """What one task printed, read from its objects: the final log of its last attempt once
    written, else what its live chunks hold so far."""

    def __init__(self, bucket, job_id: str, stream: str = "stdout") -> None:
        self.bucket, self.objects, self.stream = bucket, protocol.TaskObjects(job_id), stream

    def read(self) -> tuple[str, bool]:
        """(the text so far, whether it is final)."""
        names = [b.name for b in self.bucket.list_blobs(prefix=self.objects.prefix, timeout=30)]
        attempt = self.objects.last_attempt(names)
        if attempt is None:
            return "", False
        final_name = getattr(self.objects, self.stream)(attempt)
        if final_name in names:
            blob = self.bucket.get_blob(final_name, timeout=30)
            if blob is not None:
                return blob.download_as_text(timeout=60), True
        chunks = self.objects.live_chunks(names, attempt, self.stream)
        return "".join(self.bucket.blob(name).download_as_text(timeout=60) for name in chunks), False


def links(deployment: Deployment, job: batch_v1.Job | None, job_id: str) -> str:
    if deployment.local:
        return f"(local stack: the job's container log is under the local Batch service's state directory, jobs/{job_id}/)"
    return f"Console: {protocol.job_console_url(deployment.project_id, deployment.region, job_id)}"


def logging_client(endpoint: str = ""):
    """Cloud Logging's client (Application Default Credentials); ``endpoint``: a plaintext gRPC
    server instead (tests). The GAPIC client, not the handwritten one: its list_log_entries takes
    a page token and returns one page per call, so each request can be paced."""
    from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2Client

    if not endpoint:
        return LoggingServiceV2Client()
    import grpc
    from google.cloud.logging_v2.services.logging_service_v2.transports import LoggingServiceV2GrpcTransport

    return LoggingServiceV2Client(transport=LoggingServiceV2GrpcTransport(channel=grpc.insecure_channel(endpoint)))


def entry_text(entry) -> str:
    """A log entry's line: Batch's task logs are text; a structured one's ``message``."""
    if entry.text_payload:
        return entry.text_payload
    if "json_payload" in entry:
        fields = dict(entry.json_payload)
        return str(fields.get("message", fields))
    return ""


def cloud_logging_lines(project: str, job_uid: str, client, *, pacer: Pacer | None = None,
                        page_size: int = LOGGING_PAGE_SIZE, max_pages: int = LOGGING_MAX_PAGES) -> Iterator[str]:
    """The job's task log lines from Cloud Logging, oldest first: one entries.list request per
    page, paced, at most ``max_pages`` (then a last line saying how to read the rest)."""
    from google.cloud.logging_v2.types import ListLogEntriesRequest

    pacer = pacer or LOGGING_PACER
    token = ""
    for _ in range(max_pages):
        pacer.wait()
        page = client.list_log_entries(request=ListLogEntriesRequest(
            resource_names=[f"projects/{project}"], filter=protocol.job_logs_filter(project, job_uid),
            order_by="timestamp asc", page_size=page_size, page_token=token), timeout=60)
        for entry in page.entries:  # this page only: the pager would fetch the next one unpaced
            yield entry_text(entry)
        token = page.next_page_token
        if not token:
            return
    yield (f"[covalent-gcpbatch: more than {max_pages * page_size} entries; the rest: "
           f"{protocol.job_logs_command(project, job_uid)}]")


def logs_from_cloud_logging(deployment: Deployment, dispatch_id: str, node_id: int | None, out: TextIO) -> bool:
    """When a dispatch's task objects are gone: its jobs' task logs from Cloud Logging (Batch
    keeps the jobs, and their ``uid`` names their log entries). False if Batch has none of them."""
    found = [j for j in dispatch_jobs(deployment, dispatch_id)
             if node_id is None or j.labels.get(NODE_LABEL) == str(node_id)]
    if not found:
        return False
    client = logging_client(deployment.logging_api_endpoint)
    for job in reversed(found):  # oldest first
        job_id = protocol.job_id_of_job_name(job.name)
        print(f"== node {job.labels.get(NODE_LABEL, '?')} (Batch job {job_id}): its objects are gone; "
              "its task log from Cloud Logging", file=out)
        print(links(deployment, job, job_id), file=out, flush=True)
        for line in cloud_logging_lines(deployment.project_id, job.uid, client):
            print(line, end="" if line.endswith("\n") else "\n", file=out, flush=True)
    return True


def _job(deployment: Deployment, job_id: str) -> batch_v1.Job | None:
    try:
        return deployment.batch().get_job(name=protocol.job_name(deployment.project_id, deployment.region, job_id), timeout=30)
    except exceptions.NotFound:
        return None


def logs(dispatch_id: str, node_id: int | None, follow: bool, out: TextIO = sys.stdout,
         stop: threading.Event | None = None) -> int:
    deployment = Deployment.from_config()
    bucket, prefix = deployment.bucket(), protocol.dispatch_prefix(dispatch_id, node_id)
    names = [b.name for b in bucket.list_blobs(prefix=prefix, timeout=30)]
    if deployment.task_bucket_name and deployment.task_bucket_name != deployment.bucket_name:
        # A task that has printed nothing yet has only its task object, in the trigger bucket.
        names += [b.name for b in deployment.task_bucket().list_blobs(prefix=prefix, timeout=30)]
    job_ids = job_ids_in(names)
    if not job_ids and not deployment.local and logs_from_cloud_logging(deployment, dispatch_id, node_id, out):
        return 0
    if not job_ids:
        print(f"No task objects of dispatch {dispatch_id}{'' if node_id is None else f' node {node_id}'} in "
              f"gs://{deployment.bucket_name}: not started yet, or ended and cleaned up (its output is then in "
              "Covalent's result, and in Cloud Logging).", file=out)
        return 1
    if follow and len(job_ids) > 1:
        print(f"--follow needs one task: dispatch {dispatch_id} has {len(job_ids)} "
              f"(nodes {', '.join(node_of(j) for j in job_ids)}): pass NODE_ID", file=out)
        return 2
    runners = runners_of(job_ids, {job_id: read_claim(bucket, job_id) for job_id in claimed_job_ids(names)})
    for job_id in job_ids:
        runner = runners.get(job_id, job_id)
        print(heading(job_id, runner), file=out)
        print(links(deployment, _job(deployment, runner), runner), file=out, flush=True)
        if follow:
            return _follow(deployment, bucket, job_id, out, stop or threading.Event(), runner)
        for stream in protocol.STREAMS:
            text, final = TaskOutput(bucket, job_id, stream).read()
            if text:
                print(f"-- {stream}{'' if final else ' (so far)'}", file=out)
                print(text, end="" if text.endswith("\n") else "\n", file=out, flush=True)
    return 0


def heading(job_id: str, runner: str) -> str:
    """The line ``logs`` prints above a task's output: its node and the Batch job that ran it (a
    warm VM's, for an electron that ran on another electron's job: its output is still its own)."""
    if runner == job_id:
        return f"== node {node_of(job_id)} (Batch job {job_id})"
    return (f"== node {node_of(job_id)} (ran on the warm VM of Batch job {runner}; "
            f"its own objects: {protocol.TaskObjects(job_id).prefix})")


def _follow(deployment: Deployment, bucket, job_id: str, out: TextIO, stop: threading.Event,
            runner: str | None = None) -> int:
    """Print stdout as it arrives until the task's final log is written or the job that runs it
    (``runner``: a warm VM's, if not its own) has ended."""
    runner = runner or job_id
    output = TaskOutput(bucket, job_id, "stdout")
    shown, deadline = 0, time.monotonic() + FOLLOW_LIMIT_S
    while True:
        text, final = output.read()
        if len(text) > shown:
            out.write(text[shown:])
            out.flush()
            shown = len(text)
        if final:
            return 0
        job = _job(deployment, runner)
        state = usage.state_name(job.status.state) if job else "gone"
        if job is None or state in TERMINAL:
            text, _ = output.read()  # what came between the two reads
            out.write(text[shown:])
            print(f"-- job {runner}: {state}", file=out, flush=True)
            return 0
        if stop.wait(FOLLOW_INTERVAL_S) or time.monotonic() > deadline:
            return 0


def label_filter(labels: dict[str, str]) -> str:
    """A ListJobs filter matching jobs that carry all ``labels``, in the form dsub sends to Batch
    (google_utils.label_filter: ``labels."key" = "value"``; keys with '-' need the quotes)."""
    return " AND ".join(f'labels."{key}" = "{value}"' for key, value in labels.items())


def deployment_labels(deployment: Deployment) -> dict[str, str]:
    """The labels every job of this deployment carries (jobs.job_labels): the plugin's, and its
    bucket's; another deployment in the project (another prefix, bucket, Covalent server) has another."""
    return {CREATED_BY_LABEL: CREATED_BY, DEPLOYMENT_LABEL: deployment_label_value(deployment.bucket_name)}


def dispatch_jobs(deployment: Deployment, dispatch_id: str | None) -> list[batch_v1.Job]:
    """This deployment's jobs (labels created-by and covalent-deployment), of one dispatch if
    given, newest first. Batch filters them: a region keeps every job for 60 days, so listing them
    all would page through other users' and other deployments' jobs too."""
    parent = protocol.location_name(deployment.project_id, deployment.region)
    labels = deployment_labels(deployment)
    if dispatch_id is not None:
        labels[DISPATCH_LABEL] = sanitize_label_value(dispatch_id)
    request = batch_v1.ListJobsRequest(parent=parent, filter=label_filter(labels))
    jobs = list(deployment.batch().list_jobs(request=request, timeout=60))
    return sorted(jobs, key=lambda j: j.create_time, reverse=True)


def _age(job: batch_v1.Job) -> str:
    seconds = (datetime.now(timezone.utc) - job.create_time).total_seconds()
    return f"{seconds / 3600:.1f} h" if seconds > 5400 else f"{seconds / 60:.1f} min" if seconds > 90 else f"{seconds:.0f} s"


#: What the Covalent server says of a job's dispatch (``dispatch_status``): it still runs it (its
#: executor waits for the job), it has ended it, it does not know it, or no server answered.
RUNS, ENDED, UNKNOWN, UNREACHABLE = "runs", "ended", "unknown", "unreachable"
#: Covalent's dispatch statuses once no executor of it waits for a job; any other (RUNNING,
#: NEW_OBJECT, PENDING_REUSE, ... and statuses newer than this list) counts as running.
ENDED_STATUSES = ("COMPLETED", "FAILED", "CANCELLED", "POSTPROCESSING_FAILED")


def dispatch_status(dispatch_id: str, dispatcher_addr: str | None = None) -> tuple[str, str]:
    """(RUNS, ENDED, UNKNOWN or UNREACHABLE; what the server said) for a dispatch, from the
    Covalent server the config points at (``dispatcher_addr``: another)."""
    import covalent as ct
    from covalent._shared_files import logger
    from covalent._shared_files.exceptions import MissingLatticeRecordError

    level = logger.app_log.level
    logger.app_log.setLevel(logging.ERROR)  # its warning of an unknown dispatch: said below, in context
    try:
        status = str(ct.get_result(dispatch_id, dispatcher_addr=dispatcher_addr, status_only=True)["status"])
    except MissingLatticeRecordError:
        return UNKNOWN, "the Covalent server does not know this dispatch (another server's, or its database was reset)"
    except Exception as err:  # noqa: BLE001 - no answer: the server may be down, or elsewhere
        return UNREACHABLE, f"no Covalent server answered ({type(err).__name__})"
    finally:
        logger.app_log.setLevel(level)
    return (ENDED if status in ENDED_STATUSES else RUNS), status


def ask_on_terminal(prompt: str) -> str | None:
    """The user's answer on the terminal; None without one (stdin not a TTY, or closed)."""
    if not sys.stdin or not sys.stdin.isatty():
        return None
    try:
        return input(prompt)
    except EOFError:
        return None


# -- Who ran each electron: its claim (warm VMs, protocol/warm.py) -----------------------------
#
# A warm VM's job carries the labels of its first electron only: the electrons it ran after that
# have no job of their own, and their claim (TaskObjects.claim, kept with the outcome) is the one
# record of where they ran. An electron with no claim (not warm: a job of its own, a pack's task)
# ran on its own job, if it ran.


def claimed_job_ids(names: Iterable[str]) -> list[str]:
    """The job ids among ``names`` (a listing of task prefixes) whose claim is listed."""
    listed = set(names)
    return [job_id for job_id in job_ids_in(listed) if protocol.TaskObjects(job_id).claim in listed]


def runners_of(job_ids: Iterable[str], claims: Mapping[str, protocol.Claim | None]) -> dict[str, str]:
    """Electron job id -> the Batch job that ran it: its claim's runner, else its own job. Ids
    that are no electron's (a pack's) are left out."""
    return {job_id: claim.runner if (claim := claims.get(job_id)) is not None else job_id
            for job_id in job_ids if protocol.node_id_of_job_id(job_id) is not None}


def nodes_by_runner(runners: Mapping[str, str]) -> dict[str, list[str]]:
    """Runner job id -> the nodes (of the electrons in ``runners``) that ran on it, in node order."""
    ran: dict[str, set[int]] = {}
    for job_id, runner in runners.items():
        ran.setdefault(runner, set()).add(protocol.node_id_of_job_id(job_id) or 0)
    return {runner: [str(node) for node in sorted(nodes)] for runner, nodes in ran.items()}


def nodes_on(job: batch_v1.Job, runners: Mapping[str, str]) -> list[str]:
    """The nodes of ``runners``' dispatch that ran on ``job``. A job that is no electron's own and
    no claim's runner (a pack, or a job whose objects are gone): its node label, as before."""
    job_id = protocol.job_id_of_job_name(job.name)
    ran = nodes_by_runner(runners).get(job_id)
    if ran is not None:
        return ran
    if job_id in runners:  # its own electron's claim names another runner: it ran none of them
        return []
    node = job.labels.get(NODE_LABEL, "")
    return [node] if node else []


def warm_runners(claims: Mapping[str, protocol.Claim | None]) -> set[str]:
    """The jobs that claims name: kept warm, they may have run other electrons, of any dispatch
    (a job that ran only its own electron and then waited is one too)."""
    return {claim.runner for claim in claims.values() if claim is not None}


def foreign_candidates(runner: str, dispatch_id: str, offers: Iterable[protocol.Offer]) -> list[str]:
    """The electrons of other dispatches than ``dispatch_id`` that may have run on ``runner``'s
    VM: its job's own, and those offered to it (its idle records' ``taken`` bodies)."""
    own = protocol.dispatch_prefix(dispatch_id)
    ids = {runner} | {offer.job_id for offer in offers if offer.runner == runner}
    return sorted(i for i in ids if not protocol.TaskObjects(i).prefix.startswith(own))


def ran_on(runner: str, candidates: Iterable[str], claims: Mapping[str, protocol.Claim | None]) -> list[str]:
    """Those of ``candidates`` whose claim names ``runner`` (an offer not claimed in time ran elsewhere)."""
    return [i for i in candidates if (claim := claims.get(i)) is not None and claim.runner == runner]


def idle_window(job: batch_v1.Job) -> tuple[str, str | None]:
    """(start_offset, end_offset) of a listing that holds every idle record of ``job``'s VM: their
    names start with the time the VM stops waiting, which falls between the job's creation and its
    end plus the longest wait (no end while it has not ended)."""
    start = protocol.idle_offset(job.create_time.timestamp())
    if usage.state_name(job.status.state) not in TERMINAL or "update_time" not in job:
        return start, None
    ended = max(job.update_time.timestamp(), job.create_time.timestamp()) + protocol.MAX_KEEP_WARM_S
    return start, protocol.idle_offset(ended)


@dataclass(frozen=True)
class DispatchRuns:
    """A dispatch's jobs (its labelled ones and every VM that ran one of its electrons, each once,
    newest first), which job ran each electron, and the electrons of other dispatches each warm
    VM ran (read for the jobs this dispatch's claims name only)."""

    jobs: list[batch_v1.Job]
    runners: dict[str, str]
    others: dict[str, list[str]]

    def nodes(self, job: batch_v1.Job) -> list[str]:
        return nodes_on(job, self.runners)

    def other_count(self, job: batch_v1.Job) -> int | None:
        """How many electrons of other dispatches ran on the job's VM (None: not read, not warm)."""
        found = self.others.get(protocol.job_id_of_job_name(job.name))
        return None if found is None else len(found)


def read_claim(bucket, job_id: str) -> protocol.Claim | None:
    """An electron's claim, read as the executor reads it (TaskObjectStore.load_claim)."""
    blob = bucket.get_blob(protocol.TaskObjects(job_id).claim, timeout=30)
    return None if blob is None else protocol.Claim.loads(blob.download_as_bytes(timeout=30))


def electron_runners(bucket, dispatch_id: str) -> tuple[dict[str, str], set[str]]:
    """Each electron of the dispatch whose objects are in the bucket -> the job that ran it; and
    the jobs its claims name (warm_runners)."""
    names = [b.name for b in bucket.list_blobs(prefix=protocol.dispatch_prefix(dispatch_id), timeout=30)]
    claims = {job_id: read_claim(bucket, job_id) for job_id in claimed_job_ids(names)}
    return runners_of(job_ids_in(names), claims), warm_runners(claims)


def offers_to(bucket, job: batch_v1.Job) -> list[protocol.Offer]:
    """The offers made to ``job``'s VM: the bodies of its idle records' ``taken`` marks."""
    runner = protocol.job_id_of_job_name(job.name)
    start, end = idle_window(job)
    names = [b.name for b in bucket.list_blobs(prefix=protocol.WARM_PREFIX, start_offset=start, end_offset=end, timeout=60)]
    offers = []
    for name in protocol.taken_of(names, runner):
        blob = bucket.get_blob(name, timeout=30)
        offer = None if blob is None else protocol.Offer.loads(blob.download_as_bytes(timeout=30))
        if offer is not None:
            offers.append(offer)
    return offers


def running_electron(runner: str, offers: Iterable[protocol.Offer], claims: Mapping[str, protocol.Claim | None],
                     ended: Iterable[str]) -> str | None:
    """The electron ``runner``'s warm VM runs now, if any: one offered to it whose claim is its
    own and whose outcome is not stored (``ended``: those whose result, error record or cancel
    marker is). Its own first electron is its job's labelled one, which its dispatch's status covers."""
    done = set(ended)
    held = [o.job_id for o in sorted(offers, key=lambda o: o.seq)
            if (claim := claims.get(o.job_id)) is not None and claim.runner == runner and o.job_id not in done]
    return held[-1] if held else None


def electron_on_vm(bucket, job: batch_v1.Job) -> str | None:
    """running_electron of ``job``'s VM, read from the bucket (nothing for a job never kept warm:
    it has no idle record)."""
    runner = protocol.job_id_of_job_name(job.name)
    offers = [o for o in offers_to(bucket, job) if o.runner == runner]
    claims = {o.job_id: read_claim(bucket, o.job_id) for o in offers}
    def has_outcome(objects: protocol.TaskObjects) -> bool:
        return any(bucket.get_blob(name, timeout=30) is not None for name in (objects.result, objects.error, objects.cancelled))

    ended = [o.job_id for o in offers if has_outcome(protocol.TaskObjects(o.job_id))]
    return running_electron(runner, offers, claims, ended)


def dispatch_runs(deployment: Deployment, dispatch_id: str) -> DispatchRuns:
    """The dispatch's labelled jobs, plus the warm VMs its electrons ran on (their claims) that
    carry another dispatch's labels, fetched by id; for each warm VM, the electrons of other
    dispatches it ran."""
    bucket = deployment.bucket()
    found = dispatch_jobs(deployment, dispatch_id)
    runners, warm = electron_runners(bucket, dispatch_id)
    listed = {protocol.job_id_of_job_name(j.name) for j in found}
    extra = [job for runner in sorted(warm - listed) if (job := _job(deployment, runner)) is not None]
    if extra:  # dispatch_jobs' are newest first already
        found = sorted(found + extra, key=lambda j: j.create_time, reverse=True)
    others = {}
    for job in found:
        runner = protocol.job_id_of_job_name(job.name)
        if runner in warm:
            candidates = foreign_candidates(runner, dispatch_id, offers_to(bucket, job))
            others[runner] = ran_on(runner, candidates, {i: read_claim(bucket, i) for i in candidates})
    return DispatchRuns(found, runners, others)


def job_rows(found: Iterable[batch_v1.Job], runs: DispatchRuns | None = None) -> list[dict]:
    """What ``jobs`` lists of each job (the CLI draws it as a table, or prints it as JSON). With a
    dispatch's ``runs``: ``nodes``, the nodes of that dispatch that ran on the job (a warm VM runs
    several), and ``other_dispatches``, how many electrons of other dispatches it ran (None if
    not read: no claim of the dispatch names it, it was not kept warm); both None without ``runs``. The
    ``dispatch_id`` and ``node_id`` are the job's labels: its first electron's."""
    now = datetime.now(timezone.utc)
    return [{"job": job.name.rsplit("/", 1)[-1], "state": usage.state_name(job.status.state),
             "dispatch_id": job.labels.get(DISPATCH_LABEL, ""), "node_id": job.labels.get(NODE_LABEL, ""),
             "age_s": round((now - job.create_time).total_seconds(), 1), "age": _age(job),
             "vm_s": round(usage.vm_seconds(job), 1),
             "nodes": None if runs is None else runs.nodes(job),
             "other_dispatches": None if runs is None else runs.other_count(job)} for job in found]  # fmt: skip


def jobs(dispatch_id: str | None, cancel: bool, out: TextIO = sys.stdout,
         status_of: Callable[[str], tuple[str, str]] = dispatch_status, *, force: bool = False, yes: bool = False,
         ask: Callable[[str], str | None] = ask_on_terminal, show: Callable[[list[dict]], object] | None = None) -> int:
    """List this deployment's jobs (``show`` gets their job_rows): of a dispatch, its labelled
    jobs and the warm VMs its electrons ran on (dispatch_runs); with ``cancel``, cancel the active
    labelled ones no Covalent server waits for (cancel_orphans)."""
    deployment = Deployment.from_config()
    if dispatch_id is None:
        found, runs = dispatch_jobs(deployment, None), None
    else:
        runs = dispatch_runs(deployment, dispatch_id)
        found = runs.jobs
    if show is not None:
        show(job_rows(found, runs))
    if not cancel:
        return 0
    if dispatch_id is not None:  # another dispatch's warm VM: not this one's to cancel
        found = [j for j in found if j.labels.get(DISPATCH_LABEL) == sanitize_label_value(dispatch_id)]
    return cancel_orphans(deployment, found, out, status_of, force=force, yes=yes, ask=ask)


def cancel_orphans(deployment: Deployment, found: list[batch_v1.Job], out: TextIO = sys.stdout,
                   status_of: Callable[[str], tuple[str, str]] = dispatch_status, *, force: bool = False,
                   yes: bool = False, ask: Callable[[str], str | None] = ask_on_terminal) -> int:
    """Cancel the active jobs of ``found`` no Covalent server waits for (a server that says their
    dispatch ended; with ``force`` also those of a dispatch it does not know, or when it does not
    answer), after asking (``ask``; ``yes``: without asking). 1 if it was asked to cancel and did
    not (not confirmed, or nobody to ask)."""
    active = [j for j in found
              if usage.state_name(j.status.state) not in (*TERMINAL, "CANCELLATION_IN_PROGRESS", "DELETION_IN_PROGRESS")]
    if not active:
        print("nothing to cancel: no job of these is active", file=out)
        return 0
    statuses: dict[str, tuple[str, str]] = {}
    chosen: list[tuple[batch_v1.Job, str]] = []
    for job in active:
        name, dispatch = job.name.rsplit("/", 1)[-1], job.labels.get(DISPATCH_LABEL, "")
        verdict, said = statuses.setdefault(dispatch, status_of(dispatch) if dispatch else (UNKNOWN, "the job has no dispatch label"))
        if verdict == RUNS:
            print(f"kept {name}: Covalent still runs dispatch {dispatch} (cancel it there: ct.cancel)", file=out)
        elif (running := electron_on_vm(deployment.bucket(), job)) is not None:
            # A warm VM outlives its first electron's dispatch: cancelling it would stop another's.
            print(f"kept {name}: its warm VM runs electron {running} (of a dispatch its labels do not name); "
                  "it exits by itself keep_warm seconds after its last electron", file=out)
        elif verdict in (UNKNOWN, UNREACHABLE) and not force:
            print(f"kept {name}: dispatch {dispatch}: {said}, so a server may still wait for it "
                  "(--force cancels it anyway)", file=out)
        else:
            chosen.append((job, f"dispatch {dispatch}: {said}" + (" (--force)" if verdict != ENDED else "")))
    if not chosen:
        print("nothing cancelled", file=out)
        return 0
    print(f"Will cancel {len(chosen)} job(s) of deployment {deployment.bucket_name} ({deployment.project_id}, "
          f"{deployment.region}):", file=out)
    for job, why in chosen:
        print(f"  {job.name.rsplit('/', 1)[-1]}  {why}", file=out)
    if not yes:
        out.flush()
        answer = ask(f"Cancel these {len(chosen)} job(s)? [y/N] ")
        if answer is None:
            print("not cancelled: there is no terminal to ask on; pass --yes to cancel them", file=out)
            return 1
        if answer.strip().lower() not in ("y", "yes"):
            print("not confirmed: nothing was cancelled", file=out)
            return 1
    batch = deployment.batch()
    for job, _ in chosen:
        batch.cancel_job(name=job.name, timeout=30)
        print(f"cancelled {job.name.rsplit('/', 1)[-1]}", file=out)
    return 0


def cost_report(dispatch_id: str, prices_file: str | None) -> dict:
    """VM time and an on-demand estimate of a dispatch's jobs, its labelled ones and the warm VMs
    its electrons ran on, each once (the CLI draws it as a table, or prints it as JSON); ``jobs`` is empty when Batch has none of the dispatch. ``price_table``
    (and ``note``, which the table's last line prints) names the prices' date and source."""
    deployment = Deployment.from_config()
    prices = usage.load_prices(prices_file)
    table = usage.price_table_of(prices_file)
    runs = dispatch_runs(deployment, dispatch_id)
    return cost_of_runs(deployment, dispatch_id, runs, prices, table)


def cost_of_runs(deployment: Deployment, dispatch_id: str, runs: DispatchRuns, prices: dict, table: dict) -> dict:
    """cost_report's translation (pure): one row per VM (Batch job) of ``runs``, each once, with
    the nodes of the dispatch that ran on it; a warm VM that also ran other dispatches' electrons
    is counted whole (``shared_vms``, and the note says so)."""
    rows = []
    for job in runs.jobs:
        used = usage.usage_of(job)
        h = used.hours()
        rows.append({"job": used.job_id, "state": used.state, "machine_family": used.machine_family,
                     "machine_type": used.machine_type, "machine_source": used.machine_source,
                     "provisioning_model": used.provisioning_model,
                     "vcpus": used.vcpus, "memory_gib": used.memory_gib, "gpus": used.gpus, "gpu_type": used.gpu_type,
                     "vm_s": round(used.vm_seconds, 1), "time_source": used.time_source, "billed_s": round(used.billed_seconds),
                     "vcpu_hours": round(h["vcpu_hours"], 6), "memory_gib_hours": round(h["memory_gib_hours"], 6),
                     "gpu_hours": round(h.get("gpu_hours", 0.0), 6), "usd": round(usage.estimate(used, prices), 6),
                     "summary": usage.summary(used, prices),
                     "nodes": runs.nodes(job), "other_dispatches": runs.other_count(job)})  # fmt: skip
    shared = [r["job"] for r in rows if r["other_dispatches"]]
    return {"dispatch_id": dispatch_id, "project_id": deployment.project_id, "region": deployment.region,
            "jobs": rows, "vm_s": round(sum(r["vm_s"] for r in rows), 1), "billed_s": sum(r["billed_s"] for r in rows),
            "usd": round(sum(r["usd"] for r in rows), 6), "price_table": table, "vms": len(rows), "shared_vms": shared,
            "note": (f"estimate: list prices as of {table['as_of']} ({table['source']}); no discounts, disks or network; "
                     "VM time is Batch's run duration (boot and image pull before RUNNING not included)"
                     + (f"; {len(shared)} warm VM(s) also ran electrons of other dispatches and are counted whole"
                        if shared else ""))}  # fmt: skip
