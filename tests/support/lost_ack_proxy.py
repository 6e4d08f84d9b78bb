"""A lost acknowledgement, for real: an HTTP proxy on 127.0.0.1 in front of fake-gcs-server that
forwards each request and relays its answer, except for the first ``drops`` uploads whose body
names a matching object: those it forwards, lets commit, then closes the connection before
relaying the answer (as a load balancer or a VM's network may, after GCS committed the write).

The client sees a broken connection, retries, and meets its own object (412 on generation 0):
the write must count as done. Used as ``STORAGE_EMULATOR_HOST`` by the writer under test only;
everything else keeps talking to fake-gcs-server directly.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field

#: Hop-by-hop headers a proxy does not forward (RFC 9110 7.6.1), and the ones it recomputes.
_NOT_FORWARDED = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer",
                  "content-length", "host"}


@dataclass
class LostAcks:
    """What the proxy drops: the answers to the first ``drops`` uploads naming an object that
    matches ``pattern`` (a regular expression searched in the upload's body, where a multipart
    upload names its object); ``dropped`` lists the object names whose answers were lost."""

    pattern: str
    drops: int = 1
    dropped: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, method: str, path: str, body: bytes) -> str | None:
        if method not in ("POST", "PUT") or not path.startswith("/upload/"):
            return None
        match = re.search(self.pattern.encode(), body)
        if match is None:
            return None
        with self.lock:
            if len(self.dropped) >= self.drops:
                return None
            self.dropped.append(match.group(0).decode(errors="replace"))
            return self.dropped[-1]


class LostAckProxy:
    """``with LostAckProxy(upstream, LostAcks(...)) as proxy:`` ``proxy.url`` is the emulator host to use."""

    def __init__(self, upstream: str, lost: LostAcks) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the lost-ack proxy forwards to loopback only, not {upstream}")
        self.lost = lost
        target = (parsed.hostname, parsed.port)
        lost_acks = lost

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the test asserts on ``lost.dropped``
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED}
                upstream_conn = http.client.HTTPConnection(*target, timeout=60)
                try:
                    upstream_conn.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream_conn.getresponse()
                    payload = answer.read()
                finally:
                    upstream_conn.close()
                if lost_acks.take(self.command, self.path, body) is not None:
                    # Committed upstream; the client never hears of it.
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in _NOT_FORWARDED:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="lost-ack-proxy", daemon=True)

    def __enter__(self) -> "LostAckProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
