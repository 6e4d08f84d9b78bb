"""Where things are: the GCS objects of one task, the job id derived from them, and the resource
names of Batch jobs and Pub/Sub topics. Pure; standard library only."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

#: Every object this plugin writes lives under this prefix; the function ignores the rest.
TASKS_PREFIX = "covalent-gcpbatch/"
#: The objects that create jobs, task objects and pack manifests, go to the deployment's task bucket
#: (``task_bucket_name``), the one its storage trigger watches; everything else (results, logs,
#: markers, records) to its bucket (``bucket_name``). A trigger cannot filter by prefix: with one
#: bucket, every output chunk and log would fire the function too.
TASK_OBJECT = "task.pkl"
RESULT_OBJECT = "result.pkl"
ERROR_OBJECT = "error.json"
STDOUT_OBJECT = "stdout.log"
STDERR_OBJECT = "stderr.log"
#: Written by the executor when a task is cancelled: the function must not create (or must cancel) its job.
#: Never deleted by the executor (the bucket's lifecycle rule removes it): the function may still
#: be retrying its create, or Eventarc may redeliver the finalize event, after the task has ended.
CANCEL_OBJECT = "cancelled"
#: Created once (generation 0) by whatever runs the electron (protocol/warm.py): the worker of its
#: own job, or a warm VM. The loser of that race runs nothing. Never deleted by the executor: a late
#: offer must find it (the bucket's lifecycle rule removes it).
CLAIM_OBJECT = "claim.json"
#: The function's record of the offer it made for an electron (the Offer, generation 0): a
#: redelivered upload event finds it and takes no second idle VM. While the offer is live the
#: redelivery publishes the same offer again (the first delivery may have failed before its
#: publishes); past its ``take_by`` unclaimed, it creates the job (the executor may never have heard
#: of the offer). Disposable with the task's other objects.
OFFERED_OBJECT = "offered.json"
#: Written by the executor in the task bucket when a warm VM did not claim its offer in time: the
#: function then creates the electron's job, as for the task object's own upload.
COLD_OBJECT = "cold"
#: Written by the function when it creates no job for a task (refused, or cancelled first): a
#: ``NotCreated`` record, so an executor that polls (no Pub/Sub) learns it too.
NOT_CREATED_OBJECT = "not-created.json"
#: Written once by the function when Batch answers its create with a transient error (429, 5xx):
#: the text of that error, so that a task given up at ``submit_timeout`` says why. The function
#: keeps retrying (its own backoff, then Eventarc's redelivery).
CREATE_DELAYED_OBJECT = "create-delayed.txt"
#: The manifest of a pack (one Batch job whose tasks run several electrons): ``PackManifest`` JSON
#: under the pack's own prefix, with the pack's job spec as metadata. Its upload creates the job.
PACK_OBJECT = "pack.json"
#: stdout.log and stderr.log of attempt N sit under ``attempt-N/``; what the task printed so far,
#: while it runs, under ``attempt-N/live/`` (``stdout-000001.log``, ...: each chunk a new object).
ATTEMPT_DIR = "attempt-"
LIVE_DIR = "live"
STREAMS = ("stdout", "stderr")
_ATTEMPT_OUTPUT = re.compile(rf"{ATTEMPT_DIR}(\d+)/(?:{re.escape(STDOUT_OBJECT)}|{re.escape(STDERR_OBJECT)}|{LIVE_DIR}/.*)")
_LIVE_CHUNK = re.compile(rf"{ATTEMPT_DIR}(\d+)/{LIVE_DIR}/(stdout|stderr)-(\d{{6}})\.log")

JOB_ID_PATTERN = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")


class _Prefix:
    """What every prefix of this plugin (a task's, a pack's) holds besides its own objects: the
    executor's cancel marker and the function's record of a job it did not create."""

    @property
    def prefix(self) -> str:
        return f"{TASKS_PREFIX}{self.job_id}/"

    @property
    def cancelled(self) -> str:
        return self.prefix + CANCEL_OBJECT

    @property
    def not_created(self) -> str:
        return self.prefix + NOT_CREATED_OBJECT

    @property
    def create_delayed(self) -> str:
        return self.prefix + CREATE_DELAYED_OBJECT


@dataclass(frozen=True)
class TaskObjects(_Prefix):
    """Names of the objects of one task: everything sits under ``covalent-gcpbatch/<job id>/``."""

    job_id: str

    @property
    def task(self) -> str:
        return self.prefix + TASK_OBJECT

    @property
    def result(self) -> str:
        return self.prefix + RESULT_OBJECT

    @property
    def error(self) -> str:
        return self.prefix + ERROR_OBJECT

    @property
    def claim(self) -> str:
        return self.prefix + CLAIM_OBJECT

    @property
    def offered(self) -> str:
        return self.prefix + OFFERED_OBJECT

    @property
    def cold(self) -> str:
        return self.prefix + COLD_OBJECT

    def stdout(self, attempt: int) -> str:
        return self._output(attempt, STDOUT_OBJECT)

    def stderr(self, attempt: int) -> str:
        return self._output(attempt, STDERR_OBJECT)

    def _output(self, attempt: int, name: str) -> str:
        # One set per attempt (Batch's BATCH_TASK_RETRY_ATTEMPT): the worker's account may create
        # objects but not replace them, and a retried task must not fail for its first attempt's logs.
        return f"{self.prefix}{ATTEMPT_DIR}{attempt}/{name}"

    def live_chunk(self, attempt: int, stream: str, seq: int) -> str:
        return f"{self.prefix}{ATTEMPT_DIR}{attempt}/{LIVE_DIR}/{stream}-{seq:06d}.log"

    def live_chunks(self, names: Iterable[str], attempt: int, stream: str) -> list[str]:
        """The live chunks of one attempt's stream among ``names``, in order."""
        chunks = []
        for name in names:
            found = _LIVE_CHUNK.fullmatch(name.removeprefix(self.prefix))
            if found and int(found.group(1)) == attempt and found.group(2) == stream:
                chunks.append((int(found.group(3)), name))
        return [name for _, name in sorted(chunks)]

    def last_attempt(self, names: Iterable[str]) -> int | None:
        """The highest attempt with output among ``names`` (a listing of ``prefix``), or None."""
        attempts = [int(m.group(1)) for name in names if (m := _ATTEMPT_OUTPUT.fullmatch(name.removeprefix(self.prefix)))]
        return max(attempts, default=None)

    def fixed(self) -> tuple[str, ...]:
        """The objects of fixed name (the per-attempt outputs aside)."""
        return (self.task, self.result, self.error, self.cancelled, self.not_created)

    def disposable(self, name: str) -> bool:
        """Whether the executor deletes ``name`` (from a listing of ``prefix``) when the task is
        over: everything of the task but the cancel marker and its outcome (result or error
        record) and its claim, which the bucket's lifecycle rule removes. Returning the result hands it to
        Covalent's process, not to its database: a server that dies before recording it would
        otherwise lose a result nobody could fetch again (the soak found one)."""
        return name.startswith(self.prefix) and name not in (self.cancelled, self.claim, self.result, self.error)


@dataclass(frozen=True)
class PackObjects(_Prefix):
    """Names of the objects of one pack: ``covalent-gcpbatch/<pack id>/``. Its electrons keep
    their own ``TaskObjects`` (each member's id is its own prefix)."""

    job_id: str  # the pack's id, which is its Batch job's id

    @property
    def manifest(self) -> str:
        return self.prefix + PACK_OBJECT


def objects_of(job_id: str) -> TaskObjects | PackObjects:
    """The objects of a Batch job this plugin made: a pack's or a task's."""
    return PackObjects(job_id) if is_pack_id(job_id) else TaskObjects(job_id)


def _id_of(object_name: str, leaf: str) -> str | None:
    if not object_name.startswith(TASKS_PREFIX):
        return None
    parts = object_name[len(TASKS_PREFIX) :].split("/")
    if len(parts) != 2 or parts[1] != leaf:
        return None
    return parts[0] if JOB_ID_PATTERN.fullmatch(parts[0]) else None


def pack_id_of_pack_object(object_name: str) -> str | None:
    """The pack id if ``object_name`` is a pack manifest (``covalent-gcpbatch/<pack id>/pack.json``)."""
    pack_id = _id_of(object_name, PACK_OBJECT)
    return pack_id if pack_id is not None and _PACK_ID.fullmatch(pack_id) else None


def job_id_of_task_object(object_name: str) -> str | None:
    """The job id if ``object_name`` is a task object (``covalent-gcpbatch/<job id>/task.pkl``).

    Anything else (results, logs, foreign objects, malformed ids) gives None: the function ignores
    those, since results land in the same bucket and fire the same trigger.
    """
    return _id_of(object_name, TASK_OBJECT)


def job_id_of_cold_object(object_name: str) -> str | None:
    """The job id if ``object_name`` is an executor's request for the electron's own job after an
    untaken warm offer (``covalent-gcpbatch/<job id>/cold``)."""
    return _id_of(object_name, COLD_OBJECT)


# Job id


def new_attempt_token() -> str:
    """A fresh random token: one per ``run()`` call, so a re-run of a node gets a new job."""
    return secrets.token_hex(4)


def _dispatch_short(dispatch_id: str) -> str:
    return re.sub(r"[^a-z0-9]", "", dispatch_id.lower())[:8] or "x"


def make_job_id(dispatch_id: str, node_id: int, attempt: str) -> str:
    """``cov-<first 8 of dispatch id>-<node id>-<attempt>``, valid for Batch's job id pattern.

    Deterministic in its inputs: the function derives the id from the object name, so a duplicate
    finalize event for the same upload maps to the same job, and Batch's ALREADY_EXISTS dedupes it.
    """
    short = _dispatch_short(dispatch_id)
    token = re.sub(r"[^a-z0-9]", "", attempt.lower())
    if not token:
        raise ValueError("attempt token must contain at least one [a-z0-9] character")
    if node_id < 0:
        raise ValueError(f"node_id must be >= 0, got {node_id}")
    job_id = f"cov-{short}-{node_id}-{token}"
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(f"cannot build a valid Batch job id from {dispatch_id!r}, {node_id}, {attempt!r}")
    return job_id


_PACK_ID = re.compile(r"cov-[a-z0-9]+-pack-[a-z0-9]+")


def make_pack_id(dispatch_id: str, token: str) -> str:
    """``cov-<first 8 of dispatch id>-pack-<token>``: the Batch job id of a pack of the dispatch's
    electrons (no node id: it runs several; ``node_id_of_job_id`` gives None for it)."""
    job_id = f"cov-{_dispatch_short(dispatch_id)}-pack-{re.sub(r'[^a-z0-9]', '', token.lower())}"
    if not _PACK_ID.fullmatch(job_id) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(f"cannot build a valid pack id from {dispatch_id!r}, {token!r}")
    return job_id


def is_pack_id(job_id: str) -> bool:
    return bool(_PACK_ID.fullmatch(job_id))


def task_name(job_name: str, index: int) -> str:
    """The Batch resource name of task ``index`` of a job (get_task): one task group, ``group0``."""
    return f"{job_name}/taskGroups/group0/tasks/{index}"


# Resource names


_JOB_ID_PARTS = re.compile(r"cov-[a-z0-9]+-(\d+)-[a-z0-9]+")


def node_id_of_job_id(job_id: str) -> int | None:
    """The node id in a job id made by ``make_job_id`` (None for any other id)."""
    found = _JOB_ID_PARTS.fullmatch(job_id)
    return int(found.group(1)) if found else None


def location_name(project: str, region: str) -> str:
    """The Batch parent of a region's jobs (create_job, list_jobs)."""
    return f"projects/{project}/locations/{region}"


def job_name(project: str, region: str, job_id: str) -> str:
    """The Batch resource name of job ``job_id`` (get_job, cancel_job)."""
    return f"{location_name(project, region)}/jobs/{job_id}"


def topic_path(project: str, topic: str) -> str:
    """A Pub/Sub topic's resource name."""
    return f"projects/{project}/topics/{topic}"


def job_console_url(project: str, region: str, job_id: str) -> str:
    """The job's page in the Google Cloud console (its logs are a tab there)."""
    return f"https://console.cloud.google.com/batch/jobsDetail/regions/{region}/jobs/{job_id}/details?project={project}"


def job_logs_filter(project: str, job_uid: str) -> str:
    """The Cloud Logging filter of the job's task logs: Batch writes its runnables' stdout/stderr
    to the ``batch_task_logs`` log, labelled with the job's uid (Batch's "Analyze a job using
    logs" page and its Python sample: ``logger("batch_task_logs")``, ``labels.job_uid=<uid>``)."""
    return f'logName="projects/{project}/logs/batch_task_logs" AND labels.job_uid="{job_uid}"'


def job_logs_command(project: str, job_uid: str) -> str:
    """The gcloud command that reads the job's task logs from Cloud Logging."""
    return (f"gcloud logging read '{job_logs_filter(project, job_uid)}' "
            f"--project {project} --format 'value(textPayload)' --order asc")


def dispatch_prefix(dispatch_id: str, node_id: int | None = None) -> str:
    """The object prefix of a dispatch's tasks (or one node's): job ids start ``cov-<dispatch 8>-<node>-``."""
    return f"{TASKS_PREFIX}cov-{_dispatch_short(dispatch_id)}-" + ("" if node_id is None else f"{node_id}-")


def job_id_of_job_name(job_name: str) -> str:
    """``projects/<number>/locations/<region>/jobs/<id>`` -> ``<id>``."""
    return job_name.rsplit("/", 1)[-1]
