"""Google client construction, shared by every hop.

Each factory takes an optional endpoint. Empty means Google's service with Application Default
Credentials. A value points the real client library at an emulator (the local stack), with
anonymous credentials and, for Pub/Sub, an insecure gRPC channel, exactly as the libraries do
themselves for PUBSUB_EMULATOR_HOST / STORAGE_EMULATOR_HOST. The function and the worker take the
endpoints from those standard variables; the executor, which runs inside the Covalent server,
takes them from its configuration.

With an emulator endpoint only, ``$COVALENT_GCPBATCH_LOCAL_TOKEN`` (``LOCAL_TOKEN_ENV``) gives the
clients a bearer token instead of anonymous credentials: the emulators ignore it, and the tests
set a unique one to prove that no credential the clients carry ends up in a log, an error, an
object or a message. Without an emulator endpoint the variable is never read.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import requests
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials

#: What a Google API call may answer when trying again may succeed: 429, 500, 502, 503, 504, a
#: deadline, a connection that broke. Every read, and every write that cannot apply twice, retries
#: these with backoff within its bound (``transient_retry``); any other error is Google's answer.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    api_exceptions.TooManyRequests,
    api_exceptions.InternalServerError,
    api_exceptions.BadGateway,
    api_exceptions.ServiceUnavailable,
    api_exceptions.GatewayTimeout,
    api_exceptions.DeadlineExceeded,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.Timeout,
    auth_exceptions.TransportError,
    ConnectionError,
)
#: The same errors as HTTP statuses, for what google-cloud-storage's uploads raise: its media
#: layer's InvalidResponse (the status on its ``response``), converted to api_core's error only
#: after the retry has given up. Plus 408, which storage's own DEFAULT_RETRY retries too.
TRANSIENT_STATUS = frozenset({int(e.code) for e in TRANSIENT_ERRORS if isinstance(getattr(e, "code", None), int)} | {408})


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    from google.cloud.storage.exceptions import InvalidResponse

    return isinstance(exc, InvalidResponse) and getattr(exc.response, "status_code", None) in TRANSIENT_STATUS


def transient_retry(timeout_s: float, on_error=None) -> api_retry.Retry:
    """Retry transient errors (``TRANSIENT_ERRORS``) with exponential backoff for ``timeout_s`` in
    all; ``on_error(exc)`` is called with each one that is retried."""
    return api_retry.Retry(predicate=is_transient, initial=0.5, maximum=8.0, multiplier=2.0, timeout=timeout_s,
                           on_error=on_error)


def _md5_b64(payload: bytes | Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    if isinstance(payload, Path):
        with payload.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    else:
        digest.update(payload)
    return base64.b64encode(digest.digest()).decode()


def create_object(bucket, name: str, payload: bytes | Path, *, content_type: str, retry,
                  metadata: dict[str, str] | None = None, timeout: float = 60) -> None:
    """Write ``name`` once (generation 0: never replacing anything), retrying transient errors.

    A write may commit and lose its answer; its retry then meets 412. That is success when the
    stored object holds exactly these bytes (its MD5, which GCS computes on every upload, equals
    ours): the earlier request was ours. Any other 412 is another writer's object and raises
    PreconditionFailed."""
    blob = bucket.blob(name)
    if metadata is not None:
        blob.metadata = metadata
    try:
        if isinstance(payload, Path):
            blob.upload_from_filename(payload, content_type=content_type, if_generation_match=0, retry=retry, timeout=timeout)
        else:
            blob.upload_from_string(payload, content_type=content_type, if_generation_match=0, retry=retry, timeout=timeout)
    except api_exceptions.PreconditionFailed:
        stored = bucket.get_blob(name, retry=retry, timeout=timeout)
        if stored is None or stored.md5_hash != _md5_b64(payload) or (metadata is not None and stored.metadata != metadata):
            raise


def pubsub_emulator_host(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("PUBSUB_EMULATOR_HOST") or None


def storage_emulator_host(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("STORAGE_EMULATOR_HOST") or None


#: On the local stack only: the bearer token the clients send (see the module's docstring).
LOCAL_TOKEN_ENV = "COVALENT_GCPBATCH_LOCAL_TOKEN"


def _emulator_credentials():
    """For an emulator: a bearer token of ``LOCAL_TOKEN_ENV`` if set (never refreshed), else anonymous."""
    token = os.environ.get(LOCAL_TOKEN_ENV)
    if not token:
        return AnonymousCredentials()
    from google.oauth2.credentials import Credentials

    return Credentials(token=token)


def _insecure_channel(host: str):
    """The emulator's plaintext channel; with ``LOCAL_TOKEN_ENV`` set, every call carries the
    token as its ``authorization`` metadata (gRPC's local credentials: plaintext, loopback only)."""
    import grpc

    token = os.environ.get(LOCAL_TOKEN_ENV)
    if not token:
        return grpc.insecure_channel(host)
    local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    return grpc.secure_channel(host, grpc.composite_channel_credentials(local, grpc.access_token_call_credentials(token)))


def publisher_client(emulator_host: str | None = None):
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    host = pubsub_emulator_host(emulator_host)
    if not host:
        return pubsub_v1.PublisherClient()
    return pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=_insecure_channel(host)))


def subscriber_client(emulator_host: str | None = None):
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    host = pubsub_emulator_host(emulator_host)
    if not host:
        return pubsub_v1.SubscriberClient()
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=_insecure_channel(host)))


def storage_client(project: str | None, emulator_host: str | None = None):
    from google.cloud import storage

    host = storage_emulator_host(emulator_host)
    if not host:
        return storage.Client(project=project)
    return storage.Client(
        project=project or "local",
        credentials=_emulator_credentials(),
        client_options=ClientOptions(api_endpoint=host),
    )


def batch_client(api_endpoint: str | None = None):
    """The Batch client; with an endpoint (the local Batch service), REST + anonymous credentials
    (or the local token, ``LOCAL_TOKEN_ENV``)."""
    from google.cloud import batch_v1

    if not api_endpoint:
        return batch_v1.BatchServiceClient()
    return batch_v1.BatchServiceClient(
        transport="rest",
        credentials=_emulator_credentials(),
        client_options=ClientOptions(api_endpoint=api_endpoint),
    )
