"""Google client construction, shared by every hop.

Each factory takes an optional endpoint. Empty means Google's service with Application Default
Credentials. A value points the real client library at an emulator (the local stack), with
anonymous credentials and, for Pub/Sub, an insecure gRPC channel, exactly as the libraries do
themselves for PUBSUB_EMULATOR_HOST / STORAGE_EMULATOR_HOST. The function and the worker take the
endpoints from those standard variables; the executor, which runs inside the Covalent server,
takes them from its configuration.
"""

from __future__ import annotations

import os

from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials


def pubsub_emulator_host(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("PUBSUB_EMULATOR_HOST") or None


def storage_emulator_host(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("STORAGE_EMULATOR_HOST") or None


def _insecure_channel(host: str):
    import grpc

    return grpc.insecure_channel(host)


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
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=host),
    )


def batch_client(api_endpoint: str | None = None):
    """The Batch client; with an endpoint (the local Batch service), REST + anonymous credentials."""
    from google.cloud import batch_v1

    if not api_endpoint:
        return batch_v1.BatchServiceClient()
    return batch_v1.BatchServiceClient(
        transport="rest",
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=api_endpoint),
    )
