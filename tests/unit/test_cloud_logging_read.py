"""`covalent-gcpbatch logs` once a task's objects are gone: its Batch job's task log read from Cloud
Logging, paged and paced under Logging's read quota (60 requests/min).

There is no Cloud Logging emulator, and google-cloud-logging's GAPIC client has no REST transport
(only gRPC); its handwritten HTTP client can be pointed at a local URL but pages internally, out
of reach of a pacer. So the boundary tested here is gRPC: a real grpc server on 127.0.0.1 serving
google.logging.v2.LoggingServiceV2/ListLogEntries with the API's own request and response messages
(serialized by the client library's types), and the real client talking to it."""

from __future__ import annotations

import io
import time
from concurrent import futures

import grpc
import pytest
from google.cloud import batch_v1
from google.cloud.logging_v2.types import ListLogEntriesRequest, ListLogEntriesResponse, LogEntry
from google.protobuf import struct_pb2

from covalent_gcpbatch_plugin import protocol, watch

PROJECT, UID = "my-project", "cov-8f1c2d3e-0-a1b2-5b1c0e6f-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
LOG = f"projects/{PROJECT}/logs/batch_task_logs"


def text_entry(text: str) -> LogEntry:
    """A task log entry as Batch writes one (textPayload, labels job_uid/task_id)."""
    return LogEntry(log_name=LOG, text_payload=text, labels={"job_uid": UID, "task_id": f"task/{UID}-group0-0/0/0"})


class FakeLogging:
    """google.logging.v2.LoggingServiceV2 ListLogEntries on 127.0.0.1: answers ``pages`` in turn
    (by page token) and records each request and when it came."""

    def __init__(self, pages: list[tuple[list[LogEntry], str]]):
        self.pages = {("" if i == 0 else f"t{i}"): page for i, page in enumerate(pages)}
        self.requests: list[tuple[float, ListLogEntriesRequest]] = []
        handler = grpc.method_handlers_generic_handler("google.logging.v2.LoggingServiceV2", {
            "ListLogEntries": grpc.unary_unary_rpc_method_handler(
                self.list_log_entries, request_deserializer=ListLogEntriesRequest.deserialize,
                response_serializer=ListLogEntriesResponse.serialize)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def list_log_entries(self, request: ListLogEntriesRequest, context) -> ListLogEntriesResponse:
        self.requests.append((time.monotonic(), request))
        entries, next_token = self.pages[request.page_token]
        return ListLogEntriesResponse(entries=entries, next_page_token=next_token)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def three_pages():
    """Two lines, an empty page with a token (Logging returns those), then the last line."""
    fake = FakeLogging([([text_entry("first line"), text_entry("second line\n")], "t1"), ([], "t2"),
                        ([LogEntry(log_name=LOG, json_payload=struct_pb2.Struct(fields={
                            "message": struct_pb2.Value(string_value="third, structured")}))], "")])
    yield fake
    fake.server.stop(None)


def test_reads_every_page_with_the_jobs_filter_paced_under_the_quota(three_pages):
    client = watch.logging_client(three_pages.endpoint)
    lines = list(watch.cloud_logging_lines(PROJECT, UID, client, pacer=watch.Pacer(watch.LOGGING_READ_INTERVAL_S)))
    assert lines == ["first line", "second line\n", "third, structured"]
    assert len(three_pages.requests) == 3, "one request per page"
    for _, request in three_pages.requests:
        assert list(request.resource_names) == [f"projects/{PROJECT}"]
        assert request.filter == f'logName="{LOG}" AND labels.job_uid="{UID}"' == protocol.job_logs_filter(PROJECT, UID)
        assert request.page_size == watch.LOGGING_PAGE_SIZE and request.order_by == "timestamp asc"
    assert [r.page_token for _, r in three_pages.requests] == ["", "t1", "t2"]
    times = [at for at, _ in three_pages.requests]
    assert all(b - a >= watch.LOGGING_READ_INTERVAL_S * 0.95 for a, b in zip(times, times[1:])), times
    assert 60 / watch.LOGGING_READ_INTERVAL_S < 60, "under Logging's 60 requests/min"


def test_stops_after_max_pages_and_says_how_to_read_the_rest():
    fake = FakeLogging([([text_entry(f"line {i}")], f"t{i + 1}") for i in range(5)])
    try:
        lines = list(watch.cloud_logging_lines(PROJECT, UID, watch.logging_client(fake.endpoint),
                                               pacer=watch.Pacer(0.0), page_size=1, max_pages=3))
    finally:
        fake.server.stop(None)
    assert lines[:3] == ["line 0", "line 1", "line 2"] and len(fake.requests) == 3
    assert "more than 3 entries" in lines[3] and "gcloud logging read" in lines[3]


def test_pacer_spaces_calls_by_its_interval():
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = watch.Pacer(1.5, clock=lambda: now[0], sleep=sleep)
    pacer.wait()
    pacer.wait()
    now[0] += 0.5
    pacer.wait()
    assert slept == [1.5, 1.0]


class GoneObjects(watch.Deployment):
    """A deployment whose bucket no longer holds the dispatch's task objects."""

    def bucket(self):
        class Empty:
            def list_blobs(self, **_):
                return []
        return Empty()


def test_logs_prints_the_jobs_cloud_logging_entries_once_its_objects_are_gone(three_pages, monkeypatch):
    deployment = GoneObjects(PROJECT, "us-central1", "bucket", "", "", logging_api_endpoint=three_pages.endpoint)
    monkeypatch.setattr(watch.Deployment, "from_config", classmethod(lambda cls: deployment))
    job = batch_v1.Job(name=f"projects/{PROJECT}/locations/us-central1/jobs/cov-8f1c2d3e-0-a1b2", uid=UID,
                       labels={"covalent-node-id": "0"})
    monkeypatch.setattr(watch, "dispatch_jobs", lambda d, dispatch_id: [job])
    monkeypatch.setattr(watch, "LOGGING_PACER", watch.Pacer(0.0))
    out = io.StringIO()
    assert watch.logs("8f1c2d3e-0000", 0, follow=False, out=out) == 0
    text = out.getvalue()
    assert "== node 0 (Batch job cov-8f1c2d3e-0-a1b2): its objects are gone" in text
    assert text.endswith("first line\nsecond line\nthird, structured\n"), text
    assert "gcloud" not in text
