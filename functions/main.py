"""Cloud Function: a task object was uploaded -> create its Batch job.

Triggered by Eventarc on ``google.cloud.storage.object.v1.finalized`` for the task bucket (the
local stack's bridge plays Eventarc). It trusts nothing in the object beyond what the deployment
allows: the spec is validated and checked against the deployment's settings, and the job runs as
the deployment's service account. A refused task creates nothing; a rejection message on the
notification topic tells the waiting executor why, at once.

A pack (several electrons in one Batch job, one task each) is created from its manifest
(``pack.json``), uploaded after its electrons' task objects; those name their pack in their
metadata and create nothing themselves.

A lone electron whose spec keeps VMs warm (``keep_warm``) is first routed to a warm VM
(protocol/warm.py): the function takes a live idle record of the same warm key (``taken``, at
generation 0) and publishes an offer to that VM, creating no job; with none to take, it creates the
job as for any task. An offer nobody claims in time is followed by the executor's ``cold`` object,
whose finalize creates the electron's job (never routed again).

Batch's answer to the create is told as it is. Transient errors (429, 5xx: ``clients.TRANSIENT_ERRORS``)
are retried, the first one recorded beside the task (``create-delayed.txt``: a task given up at
``submit_timeout`` names it), then propagate: the function answers 500 and Eventarc redelivers. A
refusal (400, 403, 404: an invalid job, a missing network or permission) is final: recorded at once
as not created (REJECTED, Batch's own message), so the task fails in seconds. "Already exists"
means a duplicate event for the same upload: success.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import functions_framework
from cloudevents.http.event import CloudEvent
from google.api_core import exceptions

from covalent_gcpbatch_plugin import clients, deployment, jobs, protocol

FINALIZED = "google.cloud.storage.object.v1.finalized"

#: Batch create (and cancel): how long transient errors are retried, a bound that keeps us inside
#: Eventarc's deadline (the event is redelivered after it).
CREATE_RETRY_S = 60.0
CREATE_RETRY = clients.transient_retry(CREATE_RETRY_S)
CREATE_TIMEOUT_S = 30.0
#: Batch's answers to a create that no retry changes: the job is invalid (400), a permission or
#: API is missing (403), the location, network or image does not exist (404).
REFUSALS = (exceptions.BadRequest, exceptions.Forbidden, exceptions.NotFound)
#: A manifest names at most protocol.MAX_PACK_TASKS ids of under 64 characters: anything larger is not one.
MAX_MANIFEST_BYTES = 128 * 1024
#: Storage reads and gen-0 writes of the warm routing (claim, idle records, offers): each call's
#: transient errors retried this long, then they propagate (500: Eventarc redelivers).
WARM_RETRY_S = 20.0
WARM_RETRY = clients.transient_retry(WARM_RETRY_S)
WARM_TIMEOUT_S = 30.0
#: An idle record's body is an IdleVM's JSON, a few hundred bytes; anything larger is not one.
MAX_IDLE_BYTES = 4096



class CloudLoggingFormatter(logging.Formatter):
    """One JSON object per line, as Cloud Run functions turn stdout/stderr lines into structured
    Cloud Logging entries: ``severity`` sets the entry's severity, ``message`` its summary line,
    ``logging.googleapis.com/labels`` its labels, and every other key lands in ``jsonPayload``
    (https://cloud.google.com/logging/docs/structured-logging). So a user filters one task's
    lines with ``labels.job_id="cov-..."`` (or ``jsonPayload.job_id``) and errors with
    ``severity>=WARNING``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        job_id = getattr(record, "job_id", None)
        entry = {"severity": record.levelname if record.levelno in SEVERITIES else "DEFAULT", "message": message,
                 "job_id": job_id, "logger": record.name}
        if job_id:
            entry["logging.googleapis.com/labels"] = {"job_id": job_id}
        return json.dumps(entry, default=str)


#: Python's level names that are Cloud Logging LogSeverity names as they are.
SEVERITIES = {logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL}


def structured_logger(name: str) -> logging.Logger:
    """The function's logger: JSON lines on stdout (its own handler, once however often this
    module is imported; not the root logger's, which the framework and tests may own)."""
    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if isinstance(h.formatter, CloudLoggingFormatter)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(CloudLoggingFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


log = structured_logger("covalent_gcpbatch.function")


@functools.cache
def settings() -> deployment.DeploymentSettings:
    return deployment.DeploymentSettings.from_env()


@functools.cache
def batch():
    return clients.batch_client(settings().batch_api_endpoint)


@functools.cache
def publisher():
    return clients.publisher_client()


@functools.cache
def storage():
    return clients.storage_client(settings().project_id)


@dataclass(frozen=True)
class Buckets:
    """Where a job's objects are: its task object or pack manifest (``tasks``, the trigger's
    bucket) and everything else: outputs, cancel markers, records (``data``)."""

    tasks: str
    data: str


def object_job_id(name: str) -> str | None:
    """The job id an object's name carries (a task object's or a pack manifest's), for the logs."""
    return protocol.job_id_of_task_object(name) or protocol.pack_id_of_pack_object(name)


def buckets_of_event(bucket: str) -> Buckets | None:
    """The buckets of an event from ``bucket``; None if the deployment does not take tasks from it."""
    if settings().task_bucket and bucket != settings().task_bucket:
        return None
    return Buckets(tasks=bucket, data=settings().bucket or bucket)


def trigger_present(buckets: Buckets, name: str) -> bool:
    return storage().bucket(buckets.tasks).blob(name).exists(timeout=30)


def cancel_marked(bucket: str, objects) -> bool:
    return storage().bucket(bucket).blob(objects.cancelled).exists(timeout=30)


def not_created(bucket: str, job_id: str, state: protocol.JobState, reason: str) -> None:
    """Tell the waiting executor at once that no job will come: a record beside the task (read by
    an executor that polls) and a message on the notification topic (read by one that listens)."""
    record = protocol.NotCreated(state=state, reason=reason)
    blob = storage().bucket(bucket).blob(protocol.objects_of(job_id).not_created)
    try:
        blob.upload_from_string(protocol.dumps_not_created(record), content_type="application/json",
                                if_generation_match=0, timeout=30)
    except exceptions.PreconditionFailed:
        pass  # a redelivered event: recorded the first time
    data, attributes = protocol.not_created_message(job_id, record)
    publisher().publish(settings().topic_path, data, **attributes).result(timeout=30)
    log.warning("not creating job %s (%s): %s", job_id, state.value, reason, extra={"job_id": job_id})


def record_create_delay(bucket: str, objects, err: BaseException) -> None:
    """The first transient answer to this job's create, beside the task (best effort, once)."""
    log.warning("create of job %s delayed: %s: %s", objects.job_id, type(err).__name__, err, extra={"job_id": objects.job_id})
    try:
        storage().bucket(bucket).blob(objects.create_delayed).upload_from_string(
            f"{type(err).__name__}: {err}"[:4000], content_type="text/plain; charset=utf-8", if_generation_match=0, timeout=30)
    except Exception as failure:  # noqa: BLE001 - a diagnostic only; the create goes on
        log.info("create delay of job %s not recorded: %r", objects.job_id, failure, extra={"job_id": objects.job_id})


def cancel_job_if_any(job_id: str) -> bool:
    """Cancel the task's job; False if it has none."""
    name = protocol.job_name(settings().project_id, settings().region, job_id)
    try:
        batch().cancel_job(name=name, retry=CREATE_RETRY, timeout=CREATE_TIMEOUT_S)
    except exceptions.NotFound:
        return False
    except exceptions.FailedPrecondition as err:  # already over
        log.info("cancel of job %s: %s", job_id, err.message, extra={"job_id": job_id})
        return True
    log.info("cancelled job %s: its task was cancelled", job_id, extra={"job_id": job_id})
    return True


@functions_framework.cloud_event
def on_task_uploaded(event: CloudEvent) -> None:
    if event["type"] != FINALIZED:
        name = str((event.data if isinstance(event.data, dict) else {}).get("name", ""))
        log.info("ignoring event type %s", event["type"], extra={"job_id": object_job_id(name)})
        return
    obj = event.data if isinstance(event.data, dict) else {}
    name, bucket = str(obj.get("name", "")), str(obj.get("bucket", ""))
    buckets = buckets_of_event(bucket)
    if buckets is None:
        log.warning("ignoring gs://%s/%s: not this deployment's task bucket", bucket, name,
                    extra={"job_id": object_job_id(name)})
        return
    pack_id = protocol.pack_id_of_pack_object(name)
    if pack_id is not None:
        on_pack_uploaded(obj, buckets, pack_id)
        return
    cold_id = protocol.job_id_of_cold_object(name)
    if cold_id is not None:
        on_cold_requested(buckets, cold_id)
        return
    job_id = protocol.job_id_of_task_object(name)
    if job_id is None:
        return  # foreign objects (and, in a deployment of one bucket, results and logs)
    if protocol.PACK_METADATA_KEY in (obj.get("metadata") or {}):
        return  # an electron of a pack: the pack's manifest creates its job

    spec = checked_spec(buckets, job_id, obj.get("metadata"))
    if spec is None:
        return
    objects = protocol.TaskObjects(job_id)
    route = (lambda: route_to_warm_vm(buckets, objects, spec)) if jobs.keeps_warm(spec, settings()) else None
    create_unless_cancelled(buckets, name, objects, lambda: build_electron_job(buckets, job_id, spec), route=route)


def checked_spec(buckets: Buckets, job_id: str, metadata) -> protocol.JobSpec | None:
    """The task's spec, validated and within the deployment's caps; None (and the task told it is
    REJECTED, why) if it is not."""
    try:
        spec = protocol.JobSpec.from_metadata(metadata)
        settings().check(spec)
    except protocol.SpecError as err:
        not_created(buckets.data, job_id, protocol.JobState.REJECTED, str(err))
        return None
    return spec


def build_electron_job(buckets: Buckets, job_id: str, spec: protocol.JobSpec):
    return jobs.build_job(spec, bucket=buckets.data, task_bucket=buckets.tasks, job_id=job_id, settings=settings())


def on_cold_requested(buckets: Buckets, job_id: str) -> None:
    """The executor's ``cold`` object: the electron's warm offer was not claimed in time, so create
    its own job. Nothing in the cold object is trusted (its body is not read): the spec is the task
    object's, checked as for its upload, and a claim already made (a runner has it) means no job."""
    objects = protocol.TaskObjects(job_id)
    task = storage().bucket(buckets.tasks).get_blob(objects.task, retry=WARM_RETRY, timeout=WARM_TIMEOUT_S)
    if task is None:
        log.info("not creating job %s: its task gs://%s/%s is gone", job_id, buckets.tasks, objects.task,
                 extra={"job_id": job_id})
        return
    if protocol.PACK_METADATA_KEY in (task.metadata or {}):
        log.warning("ignoring cold request of job %s: a pack's electron (its pack's job runs it)", job_id,
                    extra={"job_id": job_id})
        return
    spec = checked_spec(buckets, job_id, task.metadata)
    if spec is None:
        return
    if claimed(buckets, objects):
        log.info("not creating job %s: its electron was claimed already", job_id, extra={"job_id": job_id})
        return
    create_unless_cancelled(buckets, objects.task, objects, lambda: build_electron_job(buckets, job_id, spec))


def claimed(buckets: Buckets, objects: protocol.TaskObjects) -> bool:
    """Whether a runner (a warm VM, or the electron's own job) has claimed the electron."""
    return storage().bucket(buckets.data).blob(objects.claim).exists(retry=WARM_RETRY, timeout=WARM_TIMEOUT_S)


def route_to_warm_vm(buckets: Buckets, objects: protocol.TaskObjects, spec: protocol.JobSpec) -> bool:
    """Offer the electron to a warm VM instead of creating its job; True if that settles it (a
    runner has it, or it was offered), False if it needs its job."""
    job_id = objects.job_id
    if claimed(buckets, objects):
        log.info("not routing job %s: its electron was claimed already (duplicate event)", job_id, extra={"job_id": job_id})
        return True
    now = time.time()
    recorded, earlier = earlier_offer(buckets, objects, spec)
    if recorded:
        if earlier is None or earlier.take_by <= now:
            log.info("job %s was offered before and not claimed by the offer's take_by: creating its job", job_id,
                     extra={"job_id": job_id})
            return False
        log.info("job %s was offered to warm VM %s already (duplicate event): publishing that offer again", job_id,
                 earlier.runner, extra={"job_id": job_id})
        publish_offer(earlier)
        return True
    offer = take_idle_vm(buckets, objects, spec, now)
    if offer is None:
        return False
    try:
        clients.create_object(storage().bucket(buckets.data), objects.offered, offer.dumps(),
                              content_type="application/json", retry=WARM_RETRY, timeout=WARM_TIMEOUT_S)
    except exceptions.PreconditionFailed:
        # A concurrent delivery of the same upload offered it first: its offer stands (the VM this
        # one took waits on, unoffered, until its record's end).
        log.info("job %s was offered by a concurrent delivery; warm VM %s left idle", job_id, offer.runner,
                 extra={"job_id": job_id})
        return True
    publish_offer(offer)
    return True


def earlier_offer(buckets: Buckets, objects: protocol.TaskObjects,
                  spec: protocol.JobSpec) -> tuple[bool, protocol.Offer | None]:
    """Whether an earlier delivery of this upload recorded an offer (``offered.json``), and that
    offer if it is one of this electron and spec (None for anything else: never offered on its word,
    so the job is created)."""
    blob = storage().bucket(buckets.data).blob(objects.offered)
    try:
        payload = blob.download_as_bytes(retry=WARM_RETRY, timeout=WARM_TIMEOUT_S)
    except exceptions.NotFound:
        return False, None
    offer = protocol.Offer.loads(payload[:MAX_IDLE_BYTES])
    if offer is None or offer.job_id != objects.job_id or offer.key != protocol.warm_key(spec):
        log.warning("gs://%s/%s is not an offer of job %s", buckets.data, blob.name, objects.job_id,
                    extra={"job_id": objects.job_id})
        return True, None
    return True, offer


def idle_candidates(buckets: Buckets, key: str, now: float) -> Iterator[str]:
    """Names of the live, untaken idle records of warm key ``key``, soonest to stop waiting first:
    the listing starts at ``protocol.live_from(now)`` (names sort by that time), so it holds only
    records still waiting, with their ``taken`` marks right after them."""
    names = [blob.name for blob in storage().bucket(buckets.data).list_blobs(
        prefix=protocol.WARM_PREFIX, start_offset=protocol.live_from(now), max_results=protocol.MAX_WARM_LISTING,
        retry=WARM_RETRY, timeout=WARM_TIMEOUT_S)]
    yield from protocol.waiting_of_key(names, key)


def read_idle(buckets: Buckets, name: str, job_id: str) -> protocol.IdleVM | None:
    """The idle record ``name`` (None if it is gone, or is not an IdleVM of that very name), read
    to offer it job ``job_id``."""
    try:
        payload = storage().bucket(buckets.data).blob(name).download_as_bytes(retry=WARM_RETRY, timeout=WARM_TIMEOUT_S)
    except exceptions.NotFound:
        return None
    try:
        idle = protocol.IdleVM.model_validate_json(payload[:MAX_IDLE_BYTES])
    except ValueError:
        idle = None
    if idle is None or idle.name != name:
        log.warning("ignoring gs://%s/%s: not an idle record", buckets.data, name, extra={"job_id": job_id})
        return None
    return idle


def take_idle_vm(buckets: Buckets, objects: protocol.TaskObjects, spec: protocol.JobSpec,
                 now: float) -> protocol.Offer | None:
    """Take one live idle record that may run ``spec``'s electron: create its ``taken`` mark (the
    Offer) at generation 0, so exactly one upload gets each idle period; None if none was taken.
    At most ``max_warm_vms`` records are tried: no more VMs wait at once."""
    key = protocol.warm_key(spec)
    for tried, name in enumerate(idle_candidates(buckets, key, now)):
        if tried >= settings().max_warm_vms:
            break
        idle = read_idle(buckets, name, objects.job_id)
        if idle is None or not idle.takes(spec, now):
            continue
        offer = protocol.Offer(job_id=objects.job_id, key=key, runner=idle.runner, seq=idle.seq,
                               take_by=idle.take_by(now))
        try:
            clients.create_object(storage().bucket(buckets.data), idle.taken, offer.dumps(),
                                  content_type="application/json", retry=WARM_RETRY, timeout=WARM_TIMEOUT_S)
        except exceptions.PreconditionFailed:
            continue  # another upload took this idle period: try the next
        return offer
    return None


def publish_offer(offer: protocol.Offer) -> None:
    """The offer to its VM (warm topic), and its QUEUED state to the waiting executor (notification
    topic), which writes ``cold`` if the VM has not claimed it by ``take_by``."""
    data, attributes = offer.message()
    publisher().publish(settings().warm_topic_path, data, **attributes).result(timeout=30)
    data, attributes = protocol.electron_state_message(offer.job_id, offer.runner, protocol.JobState.QUEUED,
                                                       f"offered to warm VM {offer.runner}", take_by=offer.take_by)
    publisher().publish(settings().topic_path, data, **attributes).result(timeout=30)
    log.info("offered job %s to warm VM %s (seq %d) until %.3f", offer.job_id, offer.runner, offer.seq, offer.take_by,
             extra={"job_id": offer.job_id})


def on_pack_uploaded(obj: dict, buckets: Buckets, pack_id: str) -> None:
    """A pack's manifest: validate its spec (per task) and its member list, check the pack as a
    whole (``max_parallel_vcpus``), then create its one job."""
    name = str(obj.get("name", ""))
    try:
        spec = protocol.JobSpec.from_metadata(obj.get("metadata"))
        settings().check(spec)
        manifest = read_manifest(buckets.tasks, name, obj)
        if manifest is not None:
            settings().check_pack(spec, manifest)  # the pack as a whole: its tasks at once x their vCPUs
    except protocol.SpecError as err:
        not_created(buckets.data, pack_id, protocol.JobState.REJECTED, str(err))
        return
    if manifest is None:
        log.info("not creating pack %s: gs://%s/%s is gone", pack_id, buckets.tasks, name, extra={"job_id": pack_id})
        return
    create_unless_cancelled(
        buckets, name, protocol.PackObjects(pack_id),
        lambda: jobs.build_job(spec, bucket=buckets.data, task_bucket=buckets.tasks, job_id=pack_id,
                               settings=settings(), pack=manifest))


def read_manifest(bucket: str, name: str, obj: dict) -> protocol.PackManifest | None:
    """The pack's manifest (None if it is gone); SpecError if it is not one."""
    size = int(obj.get("size") or 0)
    if size > MAX_MANIFEST_BYTES:
        raise protocol.SpecError(f"pack manifest is {size} bytes, over {MAX_MANIFEST_BYTES}")
    try:
        payload = storage().bucket(bucket).blob(name).download_as_bytes(timeout=30)
    except exceptions.NotFound:
        return None
    return protocol.PackManifest.loads(payload[:MAX_MANIFEST_BYTES + 1])


def create_unless_cancelled(buckets: Buckets, name: str, objects, build,
                            route: Callable[[], bool] | None = None) -> None:
    """Create the job of ``objects`` (a task's or a pack's: ``objects.job_id``) unless it was
    cancelled or its trigger object ``name`` is gone; afterwards, cancel it if the cancel came while
    it was being created. ``route`` (a warm electron's) runs after those checks, so a cancelled
    electron is never offered: True means it settled the task and no job is created."""
    job_id = objects.job_id
    if cancel_marked(buckets.data, objects):
        # A redelivered event may find the job created by an earlier delivery: cancel it.
        if not cancel_job_if_any(job_id):
            not_created(buckets.data, job_id, protocol.JobState.CANCELLED,
                        "the task was cancelled before its Batch job was created")
        return
    if not trigger_present(buckets, name):
        # A redelivered event (or a retry) after the executor gave up and removed the task: a
        # job now would run without its task.
        log.info("not creating job %s: gs://%s/%s is gone", job_id, buckets.tasks, name, extra={"job_id": job_id})
        return
    if route is not None and route():
        return
    delayed: list[BaseException] = []

    def first_delay(err: BaseException) -> None:
        if not delayed:
            delayed.append(err)
            record_create_delay(buckets.data, objects, err)

    try:
        batch().create_job(
            parent=jobs.job_parent(settings()),
            job_id=job_id,
            job=build(),
            retry=clients.transient_retry(CREATE_RETRY_S, on_error=first_delay),
            timeout=CREATE_TIMEOUT_S,
        )
        log.info("created job %s for gs://%s/%s", job_id, buckets.tasks, name, extra={"job_id": job_id})
    except exceptions.Conflict:  # ALREADY_EXISTS: gRPC raises AlreadyExists, REST its base, Conflict
        log.info("job %s already exists (duplicate event for gs://%s/%s)", job_id, buckets.tasks, name,
                 extra={"job_id": job_id})
    except REFUSALS as err:
        not_created(buckets.data, job_id, protocol.JobState.REJECTED,
                    f"Batch refused to create the job: {err.code} {err.message}")
        return
    except exceptions.RetryError as err:
        if not delayed:  # given up before any retry was made: record it all the same
            first_delay(err.cause or err)
        raise
    # The cancel may have come while the job was being created (or before a duplicate event):
    # the marker outlives the task, so whichever delivery sees it cancels the job.
    if cancel_marked(buckets.data, objects):
        cancel_job_if_any(job_id)
