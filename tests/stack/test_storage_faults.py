"""The storage fault proxy (local/storage_faults.py) between google-cloud-storage and the session's
fake-gcs-server: the faults it injects are the ones the client's default retry and the executor's
create-once rule (clients.create_object) must absorb, as GCS would present them."""

from __future__ import annotations

import json
import secrets
import threading
import urllib.error
import urllib.request

import pytest
from google.api_core import exceptions

from covalent_gcpbatch_plugin import clients
from covalent_gcpbatch_plugin.local.storage_faults import StorageFaultProxy

pytestmark = pytest.mark.stack

#: Straight to the proxy on 127.0.0.1, whatever http_proxy says.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def unique(name: str) -> str:
    return f"storage-faults/{secrets.token_hex(4)}/{name}"


def buckets(local_stack, proxy: StorageFaultProxy):
    """(through the proxy, straight to fake-gcs-server) for the stack's bucket (not the task bucket:
    no finalize event reaches the function).

    The proxied one is read with get_bucket, before any fault is armed: google-cloud-storage 3.x
    reads a bucket's metadata once per client, on a background thread of its own at the first
    object call (its errors swallowed), and that read would take an armed fault meant for the call
    under test. get_bucket fills that cache synchronously."""
    through = clients.storage_client(local_stack.project_id, proxy.url).get_bucket(local_stack.bucket_name)
    direct = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host).bucket(local_stack.bucket_name)
    return through, direct


def proxy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "process_request_thread" in t.name or t.name == "storage-fault-proxy"]


def test_429s_are_retried_by_the_clients_default_retry(local_stack):
    name = unique("rate-limited.txt")
    with StorageFaultProxy(local_stack.storage_emulator_host) as proxy:
        through, direct = buckets(local_stack, proxy)
        proxy.fail_next(2, 429)
        through.blob(name).upload_from_string(b"after two 429s")
        stats = proxy.stats()
    assert stats["errors"] == {429: 2} and stats["armed"] == {"lose_acks": 0, "fail_next": 0}, stats
    assert direct.blob(name).download_as_bytes() == b"after two 429s"
    assert proxy_threads() == [], "closing the proxy ended the client's keep-alive connections and joined their threads"


def test_a_503_on_get_only_is_retried_by_a_download(local_stack):
    name = unique("backend-error.txt")
    with StorageFaultProxy(local_stack.storage_emulator_host) as proxy:
        through, _ = buckets(local_stack, proxy)
        blob = through.blob(name)
        proxy.fail_next(1, 503, methods=("GET",))
        blob.upload_from_string(b"downloaded on the retry")  # a POST: not failed
        blob.metadata = {"touched": "yes"}
        blob.patch()  # a PATCH: not failed
        assert proxy.stats()["errors"] == {}
        assert blob.download_as_bytes() == b"downloaded on the retry"
        assert proxy.stats()["errors"] == {503: 1}


def test_an_injected_error_is_shaped_as_the_json_apis(local_stack):
    """What google-cloud-storage parses: the JSON API's error object, and Retry-After on a 429."""
    with StorageFaultProxy(local_stack.storage_emulator_host) as proxy:
        proxy.fail_next(1, 429, methods=("get",))
        with pytest.raises(urllib.error.HTTPError) as answer:
            _direct.open(f"{proxy.url}/storage/v1/b/{local_stack.bucket_name}", timeout=10)
        assert answer.value.code == 429 and answer.value.headers["Retry-After"] == "1"
        error = json.loads(answer.value.read())["error"]
        assert error["code"] == 429
        assert error["errors"] == [{"message": error["message"], "domain": "global", "reason": "rateLimitExceeded"}]

        through, _ = buckets(local_stack, proxy)
        proxy.fail_next(1, 503)
        with pytest.raises(exceptions.ServiceUnavailable) as failure:
            through.get_blob(unique("never-read.txt"), retry=None)
        assert failure.value.errors[0]["reason"] == "backendError"
        assert proxy.stats()["errors"] == {429: 1, 503: 1}


def test_a_lost_acknowledgement_turns_a_generation_0_retry_into_412_on_our_bytes(local_stack):
    """The upload commits, its answer is lost, the default retry meets our own object:
    PreconditionFailed from the client, which clients.create_object (the executor's and the
    worker's writes) counts as done because the stored MD5 is ours."""
    name, again = unique("lost-ack.pkl"), unique("lost-ack-again.pkl")
    with StorageFaultProxy(local_stack.storage_emulator_host) as proxy:
        through, direct = buckets(local_stack, proxy)
        proxy.lose_acks(name, 1)
        with pytest.raises(exceptions.PreconditionFailed):
            through.blob(name).upload_from_string(b"our bytes", if_generation_match=0)
        assert direct.blob(name).download_as_bytes() == b"our bytes"
        assert proxy.lost_objects == [name] and proxy.stats()["acks_lost"] == 1

        proxy.lose_acks(again, 1)
        clients.create_object(through, again, b"ours again", content_type="application/octet-stream",
                              retry=clients.transient_retry(30))
        assert direct.blob(again).download_as_bytes() == b"ours again"
        assert proxy.lost_objects == [name, again]


@pytest.mark.parametrize("upstream", ["http://example.com:4443", "https://127.0.0.1:4443", "http://127.0.0.1"])
def test_only_a_loopback_http_upstream_is_proxied(upstream):
    with pytest.raises(ValueError, match="127.0.0.1"):
        StorageFaultProxy(upstream)


def test_a_new_arming_replaces_the_pending_one_and_0_disarms(local_stack):
    """As the Batch service's fault counters: the soak sets a count, and clears with 0."""
    name = unique("replaced.txt")
    with StorageFaultProxy(local_stack.storage_emulator_host) as proxy:
        through, _ = buckets(local_stack, proxy)
        proxy.fail_next(5, 503)
        proxy.fail_next(1, 429, methods=("GET",))
        assert proxy.stats()["armed"]["fail_next"] == 1
        through.blob(name).upload_from_string(b"replaced", retry=None)  # a POST: the 503s are gone
        assert through.blob(name).download_as_bytes() == b"replaced"  # one 429, retried
        assert proxy.stats()["errors"] == {429: 1}

        proxy.lose_acks("replaced", 3)
        proxy.lose_acks("$^", 0)
        proxy.fail_next(2, 503)
        proxy.fail_next(0)
        assert proxy.stats()["armed"] == {"lose_acks": 0, "fail_next": 0}
        through.blob(name).upload_from_string(b"unharmed", retry=None)
        assert through.blob(name).download_as_bytes(retry=None) == b"unharmed"
        assert proxy.stats()["errors"] == {429: 1} and proxy.stats()["acks_lost"] == 0


@pytest.mark.parametrize("arguments", [{"count": -1}, {"count": 1, "status": 200}, {"count": 1, "methods": ("HEAD",)}])
def test_fail_next_refuses_what_it_cannot_inject(arguments):
    proxy = StorageFaultProxy("http://127.0.0.1:1")
    try:
        with pytest.raises(ValueError):
            proxy.fail_next(**arguments)
    finally:
        proxy.close()


def test_an_upstream_that_is_down_is_a_503_not_a_reset():
    """fake-gcs-server restarted (the soak does): the proxy answers 503 as GCS's front end would,
    which the clients retry. Before, its handler raised ConnectionRefusedError and dropped the
    connection, with a traceback in the soak's output."""
    from covalent_gcpbatch_plugin.local.processes import free_ports

    (port,) = free_ports(1)  # nothing listens there
    with StorageFaultProxy(f"http://127.0.0.1:{port}") as proxy:
        with pytest.raises(urllib.error.HTTPError) as answer:
            _direct.open(f"{proxy.url}/storage/v1/b/any", timeout=10)
        assert answer.value.code == 503
        assert json.loads(answer.value.read())["error"]["errors"][0]["reason"] == "backendError"


@pytest.mark.parametrize("payload", ["bytes", "file"])
def test_create_object_retries_a_429_or_503_on_its_upload(local_stack, tmp_path, payload):
    """The soak found a pack of 20 electrons failed for one 503 on the executor's upload: the
    transient-error predicate knew api_core's errors only, and google-cloud-storage's uploads raise
    its media layer's InvalidResponse, so clients.transient_retry never retried an upload (the
    worker's stores included). A 429 then a 503 are now retried; a 403 still is not."""
    from covalent_gcpbatch_plugin import clients

    data = secrets.token_bytes(1024)
    source = data if payload == "bytes" else tmp_path / "task.pkl"
    if payload == "file":
        source.write_bytes(data)
    with StorageFaultProxy(local_stack.storage_emulator_host) as proxy:
        through, direct = buckets(local_stack, proxy)
        name = unique("created-once.pkl")
        proxy.fail_next(1, 429, methods=("POST",))
        clients.create_object(through, name, source, content_type="application/octet-stream", retry=clients.transient_retry(30))
        proxy.fail_next(1, 503, methods=("POST",))
        other = unique("created-once-too.pkl")
        clients.create_object(through, other, source, content_type="application/octet-stream", retry=clients.transient_retry(30))
        assert direct.blob(name).download_as_bytes() == direct.blob(other).download_as_bytes() == data
        assert proxy.stats()["errors"] == {429: 1, 503: 1}
        proxy.fail_next(1, 403, methods=("POST",))
        with pytest.raises(exceptions.Forbidden):
            clients.create_object(through, unique("refused.pkl"), source, content_type="application/octet-stream",
                                  retry=clients.transient_retry(30))
