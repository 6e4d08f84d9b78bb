"""Cloud Function: a task object was uploaded -> create its Batch job.

Triggered by Eventarc on ``google.cloud.storage.object.v1.finalized`` for the task bucket (the
local stack's bridge plays Eventarc). It trusts nothing in the object beyond what the deployment
allows: the spec is validated and checked against the deployment's settings, and the job runs as
the deployment's service account. A refused task creates nothing; a rejection message on the
notification topic tells the waiting executor why, at once.

Errors that a retry can fix (Batch unavailable) propagate: the function answers 500 and Eventarc
redelivers. "Already exists" means a duplicate event for the same upload: success.
"""

from __future__ import annotations

import functools
import logging

import functions_framework
from cloudevents.http.event import CloudEvent
from google.api_core import exceptions, retry

from covalent_gcpbatch_plugin import clients, jobs, protocol

FINALIZED = "google.cloud.storage.object.v1.finalized"

#: Batch create: retry what is transient, within a bound that keeps us inside Eventarc's deadline.
CREATE_RETRY = retry.Retry(
    predicate=retry.if_exception_type(
        exceptions.ServiceUnavailable,
        exceptions.InternalServerError,
        exceptions.TooManyRequests,
        exceptions.DeadlineExceeded,
        exceptions.BadGateway,
        exceptions.GatewayTimeout,
    ),
    initial=0.5,
    maximum=8.0,
    multiplier=2.0,
    timeout=60.0,
)
CREATE_TIMEOUT_S = 30.0

log = logging.getLogger("covalent_gcpbatch.function")
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@functools.cache
def settings() -> protocol.DeploymentSettings:
    return protocol.DeploymentSettings.from_env()


@functools.cache
def batch():
    return clients.batch_client(settings().batch_api_endpoint)


@functools.cache
def publisher():
    return clients.publisher_client()


@functools.cache
def storage():
    return clients.storage_client(settings().project_id)


def cancelled(bucket: str, objects: protocol.TaskObjects) -> bool:
    return storage().bucket(bucket).blob(objects.cancelled).exists(timeout=30)


def reject(job_id: str, reason: str) -> None:
    data, attributes = protocol.rejection_message(job_id, reason)
    publisher().publish(settings().topic_path, data, **attributes).result(timeout=30)
    log.warning("rejected %s: %s", job_id, reason)


@functions_framework.cloud_event
def on_task_uploaded(event: CloudEvent) -> None:
    if event["type"] != FINALIZED:
        log.info("ignoring event type %s", event["type"])
        return
    obj = event.data if isinstance(event.data, dict) else {}
    name, bucket = str(obj.get("name", "")), str(obj.get("bucket", ""))
    job_id = protocol.job_id_of_task_object(name)
    if job_id is None:
        return  # results, logs and foreign objects land in the same bucket

    try:
        spec = protocol.JobSpec.from_metadata(obj.get("metadata"))
        settings().check(spec)
    except protocol.SpecError as err:
        reject(job_id, str(err))
        return

    objects = protocol.TaskObjects(job_id)
    if cancelled(bucket, objects):
        log.info("not creating job %s: the task was cancelled before its job existed", job_id)
        return
    job = jobs.build_job(spec, bucket=bucket, job_id=job_id, settings=settings())
    try:
        batch().create_job(
            parent=jobs.job_parent(settings()),
            job_id=job_id,
            job=job,
            retry=CREATE_RETRY,
            timeout=CREATE_TIMEOUT_S,
        )
    except exceptions.Conflict:  # ALREADY_EXISTS: gRPC raises AlreadyExists, REST its base, Conflict
        log.info("job %s already exists (duplicate event for gs://%s/%s)", job_id, bucket, name)
        return
    log.info("created job %s for gs://%s/%s", job_id, bucket, name)
    if cancelled(bucket, objects):  # cancelled while we were creating it
        batch().cancel_job(name=protocol.job_name(settings().project_id, settings().region, job_id), retry=CREATE_RETRY, timeout=CREATE_TIMEOUT_S)
        log.info("cancelled job %s: the task was cancelled while its job was being created", job_id)
