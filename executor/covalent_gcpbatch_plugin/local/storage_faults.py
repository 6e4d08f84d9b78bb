"""Storage faults, for real: an HTTP proxy on 127.0.0.1 in front of fake-gcs-server that forwards
each request and relays its answer, except for the faults armed on it while it runs (each call
replaces what is still armed of its kind, as the Batch service's fault counters do; a count of 0
disarms it):

- ``lose_acks(pattern, count)``: the next ``count`` uploads whose body matches ``pattern`` are
  forwarded and committed, then the connection is closed before the answer is relayed (as a load
  balancer or a VM's network may, after GCS committed the write). The client sees a broken
  connection, retries, and meets its own object (412 on generation 0): the write must count as done.
- ``fail_next(count, status, methods)``: the next ``count`` requests of those methods are answered
  with that error, shaped as the JSON API's errors are, and never reach fake-gcs-server (GCS's
  503 backendError and 429 rateLimitExceeded, which clients must retry).

Used as ``STORAGE_EMULATOR_HOST`` by the client under test only; everything else keeps talking to
fake-gcs-server directly. The tests arm one fault before they run a writer; the fault soak
(bench/) arms them from its own thread at random moments, hence the lock around every rule and
counter.

    with StorageFaultProxy(settings.storage_emulator_host) as proxy:
        proxy.fail_next(2, 429)
        client = clients.storage_client(project, proxy.url)
"""

from __future__ import annotations

import http
import http.client
import http.server
import json
import re
import socket
import sys
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Hop-by-hop headers a proxy does not forward (RFC 9110 7.6.1), and the ones it recomputes.
_NOT_FORWARDED = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer",
                  "content-length", "host"}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
#: The ``reason`` of the JSON API's error for a status (Cloud Storage docs, "HTTP status and error codes for JSON": https://cloud.google.com/storage/docs/json_api/v1/status-codes); any
#: other 5xx is a backendError there too.
REASONS = {400: "invalid", 401: "required", 403: "forbidden", 404: "notFound", 409: "conflict",
           412: "conditionNotMet", 429: "rateLimitExceeded"}
#: Seconds a 429 asks the client to wait (Retry-After); the storage client's own backoff ignores it.
RETRY_AFTER_S = 1
#: Bound on one forwarded request (fake-gcs-server answers in milliseconds) and on an idle client connection.
UPSTREAM_TIMEOUT_S = 60.0
LOOPBACK = ("127.0.0.1", "localhost")


@dataclass
class _LoseAcks:
    """An armed lose_acks: its regular expression and how many answers it still drops."""

    pattern: re.Pattern[bytes]
    left: int


@dataclass
class _FailNext:
    """An armed fail_next: the status it answers, to which methods, how many times more."""

    status: int
    methods: frozenset[str]
    left: int


class _Faults:
    """The armed rules (one of each kind) and what they did; every method takes the lock (the
    soak arms from its own thread while the proxy's handler threads consume)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lose: _LoseAcks | None = None
        self._fail: _FailNext | None = None
        self.lost: list[str] = []
        self.errors: Counter[int] = Counter()
        self.forwarded = 0

    def arm_lose(self, rule: _LoseAcks) -> None:
        with self._lock:
            self._lose = rule

    def arm_fail(self, rule: _FailNext) -> None:
        with self._lock:
            self._fail = rule

    def take_failure(self, method: str) -> int | None:
        """The status to answer this request with instead of forwarding it, if one is armed for it."""
        with self._lock:
            rule = self._fail
            if rule is not None and rule.left > 0 and method in rule.methods:
                rule.left -= 1
                self.errors[rule.status] += 1
                return rule.status
            self.forwarded += 1
            return None

    def take_lost_ack(self, method: str, path: str, body: bytes) -> str | None:
        """The object name (the pattern's match) whose answer is to be lost, if one is armed for
        this upload; only a multipart or resumable upload's body names its object."""
        if method not in ("POST", "PUT") or not path.startswith("/upload/"):
            return None
        with self._lock:
            rule = self._lose
            match = rule.pattern.search(body) if rule is not None and rule.left > 0 else None
            if match is None:
                return None
            rule.left -= 1
            self.lost.append(match.group(0).decode(errors="replace"))
            return self.lost[-1]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "forwarded": self.forwarded,
                "acks_lost": len(self.lost),
                "errors": dict(self.errors),
                "armed": {"lose_acks": self._lose.left if self._lose else 0, "fail_next": self._fail.left if self._fail else 0},
            }

    def lost_objects(self) -> list[str]:
        with self._lock:
            return list(self.lost)


def error_body(status: int) -> bytes:
    """A JSON API error as GCS shapes it, which google-cloud-storage turns into its exception."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:  # a status Python has no name for, e.g. 599
        phrase = "Error"
    message = f"{phrase} (injected by StorageFaultProxy)"
    reason = REASONS.get(status, "backendError")
    error = {"code": status, "message": message, "errors": [{"message": message, "domain": "global", "reason": reason}]}
    return json.dumps({"error": error}).encode()


class StorageFaultProxy:
    """``with StorageFaultProxy(upstream) as proxy:`` ``proxy.url`` is the emulator host to give
    the client under test; arm faults with ``lose_acks`` and ``fail_next`` at any moment."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or parsed.hostname not in LOOPBACK or parsed.port is None:
            raise ValueError(f"the storage fault proxy forwards to http://127.0.0.1:PORT only, not {upstream!r}")
        self.upstream = upstream
        self._faults = _Faults()
        self._server = _Server(("127.0.0.1", 0), _handler((parsed.hostname, parsed.port), self._faults))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="storage-fault-proxy", daemon=True)

    # -- faults -----------------------------------------------------------------------------

    def lose_acks(self, pattern: str, count: int = 1) -> None:
        """Lose the answers of the next ``count`` committed uploads whose body matches the regular
        expression ``pattern`` (searched in the body, where an upload names its object). Only a
        2xx answer is lost: an upload fake-gcs-server refused committed nothing. Replaces the
        lose_acks still armed; ``count`` 0 disarms."""
        _check_count(count)
        self._faults.arm_lose(_LoseAcks(re.compile(pattern.encode()), count))

    def fail_next(self, count: int, status: int = 503, methods: Iterable[str] = METHODS) -> None:
        """Answer the next ``count`` requests of ``methods`` with ``status`` (4xx or 5xx) and the
        JSON API's error body, without forwarding them; a 429 carries Retry-After. Replaces the
        fail_next still armed; ``count`` 0 disarms."""
        _check_count(count)
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error (400-599), got {status}")
        chosen = frozenset(m.upper() for m in methods)
        if not chosen or not chosen <= set(METHODS):
            raise ValueError(f"methods must be some of {', '.join(METHODS)}, got {sorted(chosen)}")
        self._faults.arm_fail(_FailNext(status, chosen, count))

    def stats(self) -> dict[str, Any]:
        """``forwarded`` requests, ``acks_lost``, ``errors`` answered by status, and what is still ``armed``."""
        return self._faults.stats()

    @property
    def lost_objects(self) -> list[str]:
        """The object names (the patterns' matches) whose acknowledgements were lost, in order."""
        return self._faults.lost_objects()

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> StorageFaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, end the clients' idle keep-alive connections, join every thread."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(10)
        self._server.close_connections()
        self._server.server_close()  # joins the handler threads (block_on_close)


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")


class _Server(http.server.ThreadingHTTPServer):
    """Handler threads are joined on close; the connections they serve are tracked, because an
    idle keep-alive connection (the storage client pools them) would hold its thread for good."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, *args: Any) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(*args)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-request (its timeout, a retry, the connection this proxy
        shut to lose an answer) is no error of the proxy's: quiet. Anything else is printed."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._connections_lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed by the client
                    pass


def _handler(target: tuple[str, int], faults: _Faults) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = UPSTREAM_TIMEOUT_S

        def log_message(self, *args: Any) -> None:  # quiet: callers read stats() and lost_objects
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status = faults.take_failure(self.command)
            if status is not None:
                headers = [("Content-Type", "application/json; charset=UTF-8")]
                if status == 429:
                    headers.append(("Retry-After", str(RETRY_AFTER_S)))
                self._answer(status, error_body(status), headers)
                return
            try:
                answer, payload = self._forward(body)
            except OSError:
                # fake-gcs-server down (restarted): GCS's front end answers 503 while its backend
                # is away, and the clients retry it. The request may have committed first.
                self._answer(503, error_body(503), [("Content-Type", "application/json; charset=UTF-8")])
                return
            if 200 <= answer.status < 300 and faults.take_lost_ack(self.command, self.path, body) is not None:
                # Committed upstream; the client never hears of it.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in _NOT_FORWARDED]
            self._answer(answer.status, payload, headers, answer.reason)

        def _forward(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED}
            upstream = http.client.HTTPConnection(*target, timeout=UPSTREAM_TIMEOUT_S)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                return answer, answer.read()
            finally:
                upstream.close()

        def _answer(self, status: int, payload: bytes, headers: list[tuple[str, str]], reason: str | None = None) -> None:
            self.send_response(status, reason)
            for key, value in headers:  # a list: a header may repeat
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    return Handler
