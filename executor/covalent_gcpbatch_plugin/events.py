"""Job state events for the executor: one streaming pull per process, demultiplexed by job id.

Covalent builds a new executor instance for every task, all inside the Covalent server process, so
the subscriber is a per-process singleton (one per topic and endpoint). It owns a subscription of
its own on the notification topic, created on first use and deleted at exit (an expiration policy
removes it should the process die first). Every task registers its job id BEFORE uploading its
task object, so no message about its job can arrive unrouted. Messages for other jobs (other
processes share the topic) are acknowledged and dropped.

Nothing here polls: events are pushed by the streaming pull's callback thread into each waiting
task's asyncio queue on that task's event loop.

The Covalent server's event loop never waits on the network: ``_start_lock`` guards the
subscription's lifecycle (network calls, only ever taken on worker threads); routing by job id is
``waiting.Inboxes``, whose lock guards dictionary operations only (``unregister`` and the message
callback use just that).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass

from google.api_core import exceptions, retry
from google.cloud import pubsub_v1
from google.protobuf import duration_pb2

from . import clients
from .errors import SubscribeError
from .protocol import JobEvent, member_event, parse_electron_event, parse_notification, parse_task_notification, topic_path
from .waiting import Inboxes, PackEvent, RunnerEvent

log = logging.getLogger(__name__)

#: Pub/Sub deletes a subscription unused this long (its minimum is one day).
SUBSCRIPTION_TTL_S = 24 * 3600
#: Seconds before a failed streaming pull is re-opened (the emulator or network went away).
RESTART_DELAY_S = 1.0
#: Bound on creating the subscription (api_core retries UNAVAILABLE within it).
SUBSCRIBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Endpoint:
    project_id: str
    topic: str
    emulator_host: str | None = None

    @property
    def topic_path(self) -> str:
        return topic_path(self.project_id, self.topic)


class JobEvents:
    """The process's subscriber. Use ``job_events(endpoint)``, not the constructor."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        suffix = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}".lower()
        clean = "".join(c if c.isalnum() or c == "-" else "-" for c in suffix)
        self.subscription_path = f"projects/{endpoint.project_id}/subscriptions/covalent-gcpbatch-{clean}"[:255]
        self._start_lock = threading.Lock()
        self._routes = Inboxes()
        #: pack id -> its electrons' ids by task index (their inboxes are in ``_routes``).
        self._packs: dict[str, tuple[str, ...]] = {}
        #: a warm VM's job id -> the electrons it runs or was offered (they hear its job and task events).
        self._runners: dict[str, set[str]] = {}
        self._runner_lock = threading.Lock()
        self._subscriber: pubsub_v1.SubscriberClient | None = None
        self._future = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._future is not None or self._closing:
                return
            if self._subscriber is None:
                self._subscriber = clients.subscriber_client(self.endpoint.emulator_host)
                atexit.register(self.close)
            try:
                self._create_subscription()
                self._open_stream()
            except SubscribeError:
                raise
            except Exception as err:  # noqa: BLE001 - said plainly; the next register tries again
                where = f"the Pub/Sub emulator at {self.endpoint.emulator_host}" if self.endpoint.emulator_host else "Pub/Sub"
                raise SubscribeError(
                    f"cannot subscribe to job notifications on {self.endpoint.topic_path} through {where}: "
                    f"{type(err).__name__}: {err}; check that Pub/Sub is reachable and the topic exists "
                    "(deploy.sh status, or `covalent-gcpbatch local status`)"
                ) from err

    def _create_subscription(self) -> None:
        assert self._subscriber is not None
        try:
            self._subscriber.create_subscription(
                request={
                    "name": self.subscription_path,
                    "topic": self.endpoint.topic_path,
                    "ack_deadline_seconds": 30,
                    "expiration_policy": {"ttl": duration_pb2.Duration(seconds=SUBSCRIPTION_TTL_S)},
                },
                retry=retry.Retry(predicate=retry.if_transient_error, timeout=SUBSCRIBE_TIMEOUT_S),
                timeout=SUBSCRIBE_TIMEOUT_S,
            )
        except exceptions.AlreadyExists:
            pass
        except exceptions.NotFound as err:
            raise SubscribeError(
                f"Pub/Sub topic {self.endpoint.topic_path} does not exist: set pubsub_topic (and project_id) "
                "to the deployment's notification topic (deploy.sh or `covalent-gcpbatch local up` prints it)"
            ) from err

    def _open_stream(self) -> None:
        assert self._subscriber is not None
        future = self._subscriber.subscribe(
            self.subscription_path,
            callback=self._on_message,
            flow_control=pubsub_v1.types.FlowControl(max_messages=1000),
        )
        future.add_done_callback(self._on_stream_end)
        self._future = future

    def _on_stream_end(self, future) -> None:
        if self._closing:
            return
        log.warning("job event stream ended (%r); reopening in %.0f s", future.exception(), RESTART_DELAY_S)
        timer = threading.Timer(RESTART_DELAY_S, self._reopen)
        timer.daemon = True
        timer.start()

    def _reopen(self) -> None:
        with self._start_lock:
            if self._closing:
                return
            try:
                self._create_subscription()  # gone if the emulator restarted; reconcile covers the gap
                self._open_stream()
            except Exception as err:  # noqa: BLE001 - keep trying until closed; waiters are bounded
                log.warning("could not reopen the job event stream: %r", err)
                timer = threading.Timer(RESTART_DELAY_S * 5, self._reopen)
                timer.daemon = True
                timer.start()

    def close(self) -> None:
        with self._start_lock:
            if self._closing:
                return
            self._closing = True
            future, subscriber = self._future, self._subscriber
        if future is not None:
            future.cancel()
        if subscriber is not None:
            if future is not None:  # a subscription exists only once a stream was opened on it
                try:
                    subscriber.delete_subscription(subscription=self.subscription_path, timeout=10)
                except Exception:  # noqa: BLE001 - best effort; the expiration policy removes it anyway
                    pass
            subscriber.close()

    # -- routing -------------------------------------------------------------------------------

    def register(self, job_id: str, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[JobEvent]:
        """Start routing ``job_id``'s events to a new queue on ``loop``. Blocking (may create the
        subscription; raises SubscribeError): call it from a worker thread, before uploading."""
        self._ensure_started()
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._routes.register(job_id, loop, queue)
        return queue

    def unregister(self, job_id: str) -> None:
        """Stop routing ``job_id``; never blocks on the network (safe on an event loop)."""
        self._routes.unregister(job_id)

    def register_pack(self, pack_id: str, members: tuple[str, ...]) -> None:
        """Route pack ``pack_id``'s task events to its electrons (registered already, each by its
        own id), and its job events to all of them. Before the manifest is uploaded."""
        self._packs[pack_id] = tuple(members)

    def unregister_pack(self, pack_id: str) -> None:
        self._packs.pop(pack_id, None)

    def watch_runner(self, runner: str, job_id: str) -> None:
        """Route the events of warm VM ``runner``'s job (and its task's) to electron ``job_id`` as
        RunnerEvents, until ``unwatch_runner``."""
        with self._runner_lock:
            self._runners.setdefault(runner, set()).add(job_id)

    def unwatch_runner(self, runner: str, job_id: str) -> None:
        with self._runner_lock:
            watchers = self._runners.get(runner)
            if watchers is not None:
                watchers.discard(job_id)
                if not watchers:
                    del self._runners[runner]

    def _runner_watchers(self, job_id: str) -> tuple[str, ...]:
        with self._runner_lock:
            return tuple(self._runners.get(job_id, ()))

    def _on_message(self, message) -> None:
        attributes = dict(message.attributes)
        electron = parse_electron_event(attributes, message.data)
        task = None if electron is not None else parse_task_notification(attributes, message.data)
        event = None if electron is not None or task is not None else parse_notification(attributes, message.data)
        message.ack()
        if electron is not None:
            self._routes.put(electron.job_id, electron)
            return
        about = task or event
        for watcher in self._runner_watchers(about.job_id) if about is not None else ():
            self._routes.put(watcher, RunnerEvent(about))
        if task is not None:
            members = self._packs.get(task.job_id, ())
            if task.task_index < len(members):
                member = member_event(members[task.task_index], task.state, task.detail)
                if member is not None:
                    self._routes.put(member.job_id, member)
        elif event is not None:
            # Other processes' jobs: nobody here waits, dropped. A pack's job event goes to each of
            # its electrons, which read it as a hint (their own task decides).
            if not self._routes.put(event.job_id, event):
                for member in self._packs.get(event.job_id, ()):
                    self._routes.put(member, PackEvent(event))


_registry: dict[Endpoint, JobEvents] = {}
_registry_lock = threading.Lock()


def job_events(endpoint: Endpoint) -> JobEvents:
    with _registry_lock:
        events = _registry.get(endpoint)
        if events is None or events._closing:
            events = _registry[endpoint] = JobEvents(endpoint)
        return events
