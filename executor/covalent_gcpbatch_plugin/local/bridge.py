"""The local Eventarc: GCS notifications on Pub/Sub -> storage CloudEvents POSTed to the function.

A real bucket trigger turns each Cloud Storage notification into a
``google.cloud.storage.object.v1.*`` CloudEvent and POSTs it to the function, retrying until the
function answers 2xx. fake-gcs-server only publishes the notification, and functions-framework only
turns a Pub/Sub push into a ``messagePublished`` event, so this bridge fills the gap: a streaming
pull on the notification subscription, one binary-mode CloudEvent POST per message, ack on 2xx and
nack otherwise (the subscription's retry policy spaces the redeliveries). A stream that ends (the
emulator restarted) is re-opened until the bridge is stopped.

Run: ``python -m covalent_gcpbatch_plugin.local.bridge --subscription projects/P/subscriptions/S
--target http://127.0.0.1:PORT/`` with PUBSUB_EMULATOR_HOST set.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import requests
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from google.cloud.pubsub_v1 import SubscriberClient
from google.cloud.pubsub_v1.subscriber.futures import StreamingPullFuture
from google.cloud.pubsub_v1.subscriber.message import Message

from .. import clients

#: GCS notification ``eventType`` -> Eventarc CloudEvent type.
EVENT_TYPES = {
    "OBJECT_FINALIZE": "google.cloud.storage.object.v1.finalized",
    "OBJECT_DELETE": "google.cloud.storage.object.v1.deleted",
    "OBJECT_ARCHIVE": "google.cloud.storage.object.v1.archived",
    "OBJECT_METADATA_UPDATE": "google.cloud.storage.object.v1.metadataUpdated",
}
#: (connect, read) seconds. The read bound is above the function's own 60 s create-retry budget.
DEFAULT_TIMEOUT = (5.0, 90.0)
#: Messages in flight at once; each holds one callback thread while its POST runs.
MAX_IN_FLIGHT = 8
#: Seconds between a streaming pull's end and the next attempt (the subscription may be missing
#: for a while: the stack recreates it after a Pub/Sub emulator restart).
REOPEN_DELAY_S = 1.0

log = logging.getLogger("covalent_gcpbatch.bridge")


def to_cloud_event(
    message_id: str,
    attributes: Mapping[str, str],
    data: bytes,
    publish_time: datetime | None = None,
) -> CloudEvent | None:
    """The storage CloudEvent Eventarc would deliver for one GCS notification; None if not one.

    ``data`` is the notification payload (JSON_API_V1: the object resource), passed on unchanged.
    """
    event_type = EVENT_TYPES.get(attributes.get("eventType", ""))
    bucket = attributes.get("bucketId", "")
    name = attributes.get("objectId", "")
    if event_type is None or not bucket or not name:
        return None
    try:
        resource = json.loads(data) if data else {}
    except ValueError:
        return None
    event_time = attributes.get("eventTime") or _rfc3339(publish_time or datetime.now(timezone.utc))
    return CloudEvent(
        {
            "id": message_id,
            "type": event_type,
            "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
            "subject": f"objects/{name}",
            "time": event_time,
            "datacontenttype": "application/json",
        },
        resource,
    )


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class Bridge:
    """Delivers each pulled notification to ``target``; ack on 2xx, nack on anything else."""

    def __init__(self, target: str, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        self.target = target
        self.timeout = timeout
        self._http = requests.Session()
        self._http.trust_env = False  # the function is local: no proxy, no netrc credentials

    def deliver(self, message: Message) -> None:
        """Streaming pull callback (runs on the subscriber's thread pool)."""
        event = to_cloud_event(message.message_id, message.attributes, message.data, message.publish_time)
        if event is None:
            log.info("skipping message %s: not a storage notification", message.message_id)
            message.ack()
            return
        name = message.attributes.get("objectId", "")
        attempt = message.delivery_attempt or 1
        started = time.monotonic()
        try:
            headers, body = to_binary(event)
            status = self._http.post(self.target, headers=headers, data=body, timeout=self.timeout).status_code
            outcome = str(status)
        except requests.RequestException as err:
            status, outcome = 0, type(err).__name__
        elapsed_ms = (time.monotonic() - started) * 1000
        if 200 <= status < 300:
            message.ack()
        else:
            message.nack()
        log.info(
            "%s %s attempt=%d -> %s in %.0f ms (%s)",
            event["type"].rsplit(".", 1)[-1],
            name,
            attempt,
            outcome,
            elapsed_ms,
            "acked" if 200 <= status < 300 else "nacked, will be redelivered",
        )


def run(subscription: str, target: str, ready_file: Path | None = None) -> int:
    """Pull and deliver until SIGTERM/SIGINT (exit 0), re-opening the stream whenever it ends.

    A restarted Pub/Sub emulator (``LocalStack.restart``) comes back without the subscription
    until the stack recreates it; the client library reconnects on its own after UNAVAILABLE, but
    ends the stream for good on the NOT_FOUND it may meet in that gap. Eventarc's delivery does
    not stop because Pub/Sub had a bad moment, so neither does the bridge."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    subscriber = clients.subscriber_client()
    subscriber.get_subscription(subscription=subscription)  # fail fast if it does not exist
    bridge = Bridge(target)
    future = _pull(subscriber, subscription, bridge)
    log.info("bridging %s -> %s", subscription, target)
    if ready_file is not None:
        ready_file.write_text("ready\n")

    while not stop.wait(0.5):
        if future.done():
            log.warning("streaming pull ended (%s); re-opening in %.0f s", _ended_by(future), REOPEN_DELAY_S)
            if stop.wait(REOPEN_DELAY_S):
                break
            future = _pull(subscriber, subscription, bridge)
    future.cancel()
    try:
        future.result(timeout=10)
    except Exception:  # noqa: BLE001 - a cancelled stream raises; we are shutting down anyway
        pass
    subscriber.close()
    log.info("bridge stopped")
    return 0


def _pull(subscriber: SubscriberClient, subscription: str, bridge: Bridge) -> StreamingPullFuture:
    from google.cloud.pubsub_v1.types import FlowControl

    return subscriber.subscribe(subscription, bridge.deliver, flow_control=FlowControl(max_messages=MAX_IN_FLIGHT))


def _ended_by(future: StreamingPullFuture) -> str:
    if future.cancelled():
        return "cancelled"
    error = future.exception()
    return f"{type(error).__name__}: {error}" if error is not None else "no error"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscription", required=True, help="projects/<p>/subscriptions/<s>")
    parser.add_argument("--target", required=True, help="the function's URL")
    parser.add_argument("--ready-file", type=Path, help="written once the subscription is verified and pulled")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not clients.pubsub_emulator_host():
        parser.error("PUBSUB_EMULATOR_HOST is not set: the bridge only serves the local emulators")
    return run(args.subscription, args.target, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
