"""Issue 26, items 3 and 5, end to end on the local stack, through Covalent: buckets mounted in the
task (``gcs_volumes``) and Secret Manager secrets in its environment (``secrets``).

The local Batch service imitates what Batch does on the VM (local/batch/task_io.py): it copies each
mounted folder from the GCS emulator into the attempt's directory (``volume_path`` finds it there;
read-only copies are never written back, read-write ones are), and reads each secret version from
its secret store, Secret Manager's stand-in, into the worker's environment alone.
"""

from __future__ import annotations

import hashlib
import os
import secrets as token_source
import uuid
from pathlib import Path

import covalent as ct
from workflow_helpers import nodes_by_name, wait_for

from covalent_gcpbatch_plugin import clients
from covalent_gcpbatch_plugin.gcpbatch import GCPBatchExecutor


def run_one(executor, body):
    @ct.electron(executor=executor)
    def task():
        return body()

    @ct.lattice
    def flow():
        return task()

    result = wait_for(ct.dispatch(flow)(), timeout_s=240)
    return nodes_by_name(result)["task"]


def test_a_task_reads_a_read_only_mount_and_writes_a_writable_one(covalent_server, local_stack):
    storage = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host)
    bucket = storage.bucket(local_stack.mount_bucket_name)
    run = uuid.uuid4().hex[:12]
    bucket.blob(f"inputs/{run}/a.txt").upload_from_string("alpha")
    bucket.blob(f"inputs/{run}/deeper/b.txt").upload_from_string("beta")
    bucket.blob(f"outputs/{run}/old.txt").upload_from_string("to be removed")
    data, out = f"gs://{local_stack.mount_bucket_name}/inputs/{run}", f"gs://{local_stack.mount_bucket_name}/outputs/{run}"

    def body():
        import os as _os

        from covalent_gcpbatch_plugin import volume_path

        read = [open(volume_path(f"/mnt/data/{name}")).read() for name in ("a.txt", "deeper/b.txt")]
        try:  # refused for any user but root; never written back for anyone
            with open(volume_path("/mnt/data/sneaky.txt"), "w") as f:
                f.write("should not reach the bucket")
            refused = False
        except PermissionError:
            refused = True
        with open(volume_path("/mnt/out/result.txt"), "w") as f:
            f.write("+".join(read))
        _os.remove(volume_path("/mnt/out/old.txt"))
        return read, refused, volume_path("/mnt/data/a.txt") != "/mnt/data/a.txt"

    executor = GCPBatchExecutor(time_limit=120, pack_window=0,
                                gcs_volumes={"/mnt/data": data, "/mnt/out": {"uri": out, "read_only": False}})
    node = run_one(executor, body)
    assert str(node["status"]) == "COMPLETED", (node["error"], node["stderr"])
    read, refused, mapped = node["output"].get_deserialized()
    assert read == ["alpha", "beta"] and mapped, "the local stack's copies, found by volume_path"
    assert refused or os.geteuid() == 0, "a read-only mount's copy is read-only"
    assert bucket.blob(f"outputs/{run}/result.txt").download_as_text() == "alpha+beta", "written back"
    assert not bucket.blob(f"outputs/{run}/old.txt").exists(), "a removed file's object is deleted"
    assert sorted(b.name for b in storage.list_blobs(bucket, prefix=f"inputs/{run}/")) == [
        f"inputs/{run}/a.txt", f"inputs/{run}/deeper/b.txt"], "nothing written to the read-only mount reached it"


def test_a_bucket_off_the_allowlist_is_refused_naming_the_flag(covalent_server, local_stack):
    executor = GCPBatchExecutor(time_limit=60, pack_window=0, gcs_volumes={"/mnt/data": "gs://someone-elses-bucket"})
    node = run_one(executor, lambda: 1)
    assert str(node["status"]) == "FAILED"
    assert "--allowed-mount-buckets someone-elses-bucket" in node["stderr"], node["stderr"]


def test_a_secret_reaches_the_task_environment_and_nothing_else(covalent_server, local_stack):
    """The raw value is in no GCS object or its metadata, no Pub/Sub message of the stack's topics,
    no log or file of the stack or of the Covalent server: only in the worker's environment."""

    value = f"s3cr3t-{token_source.token_hex(16)}"
    store = local_stack.secret_store / local_stack.allowed_secret / "versions"
    store.mkdir(parents=True, exist_ok=True)
    version = max([int(p.name) for p in store.iterdir() if p.name.isdigit()], default=0) + 1
    (store / str(version)).write_text(value)

    subscriber = clients.subscriber_client(local_stack.pubsub_emulator_host)
    subscriptions = []
    for topic in (local_stack.topic, local_stack.gcs_topic):
        name = f"projects/{local_stack.project_id}/subscriptions/secret-watch-{topic}-{uuid.uuid4().hex[:8]}"
        subscriber.create_subscription(name=name, topic=local_stack.topic_path(topic))
        subscriptions.append(name)

    def body():
        import hashlib as _hashlib
        import os as _os

        secret = _os.environ["API_TOKEN"]
        return _hashlib.sha256(secret.encode()).hexdigest(), len(secret)

    executor = GCPBatchExecutor(time_limit=120, pack_window=0, keep_artifacts=True,
                                secrets={"API_TOKEN": f"{local_stack.allowed_secret}/versions/latest"})
    node = run_one(executor, body)
    assert str(node["status"]) == "COMPLETED", (node["error"], node["stderr"])
    assert node["output"].get_deserialized() == (hashlib.sha256(value.encode()).hexdigest(), len(value))

    raw = value.encode()
    # Every object of every bucket, and its metadata (keep_artifacts: the task's objects too).
    storage = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host)
    objects = 0
    for bucket in storage.list_buckets():
        for blob in storage.list_blobs(bucket):
            objects += 1
            assert raw not in blob.download_as_bytes(), f"gs://{bucket.name}/{blob.name}"
            assert value not in repr(blob.metadata or {}), f"metadata of gs://{bucket.name}/{blob.name}"
    assert objects > 0
    # Every message on the job topic and the GCS notification topic since before the dispatch.
    seen = 0
    for name in subscriptions:
        while True:
            response = subscriber.pull(subscription=name, max_messages=500, timeout=10, return_immediately=True)
            if not response.received_messages:
                break
            for received in response.received_messages:
                seen += 1
                assert raw not in received.message.data and value not in repr(dict(received.message.attributes))
            subscriber.acknowledge(subscription=name, ack_ids=[r.ack_id for r in response.received_messages])
        subscriber.delete_subscription(subscription=name)
    assert seen > 0
    # Every file of the test session's tree (the stack's logs, the jobs' attempt logs and work
    # directories, the emulators' data, the Covalent server's logs and database) but the store.
    root = Path(local_stack.state_dir).parent
    for path in root.rglob("*"):
        if path.is_file() and not path.is_relative_to(local_stack.secret_store) and not path.is_symlink():
            try:
                assert raw not in path.read_bytes(), f"the secret's value is in {path}"
            except (PermissionError, FileNotFoundError):
                continue


def test_a_secret_off_the_allowlist_is_refused_naming_the_flag(covalent_server, local_stack):
    other = f"projects/{local_stack.project_id}/secrets/not-allowed/versions/1"
    executor = GCPBatchExecutor(time_limit=60, pack_window=0, secrets={"API_TOKEN": other})
    node = run_one(executor, lambda: 1)
    assert str(node["status"]) == "FAILED"
    assert f"--allowed-secrets projects/{local_stack.project_id}/secrets/not-allowed" in node["stderr"], node["stderr"]


def test_file_transfers_work_on_the_worker_as_its_own_account(covalent_server, local_stack, tmp_path):
    """Covalent's own GCloud strategy needs a key file and fails on the worker without one (the
    deployment makes none); GCloudDefaultCredentials is it with the worker's own credentials: a
    file comes down before the task and one goes up after it."""
    from covalent_gcpbatch_plugin.transfers import GCloudDefaultCredentials

    storage = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host)
    bucket = storage.bucket(local_stack.mount_bucket_name)
    run = uuid.uuid4().hex[:12]
    bucket.blob(f"transfers/{run}/in.txt").upload_from_string("hello from the bucket")
    local_in, local_out = tmp_path / "in.txt", tmp_path / "out.txt"
    strategy = GCloudDefaultCredentials(project_id=local_stack.project_id)
    files = [ct.fs.TransferFromRemote(f"gs://{local_stack.mount_bucket_name}/transfers/{run}/in.txt", str(local_in),
                                      strategy=strategy),
             ct.fs.TransferToRemote(f"gs://{local_stack.mount_bucket_name}/transfers/{run}/out.txt", str(local_out),
                                    strategy=strategy)]

    @ct.electron(executor=GCPBatchExecutor(time_limit=120, pack_window=0), files=files)
    def task(files=[]):  # noqa: B006 - Covalent's own convention for file transfers
        text = open(files[0][1]).read()
        with open(files[1][0], "w") as f:
            f.write(text.upper())
        return text

    @ct.lattice
    def flow():
        return task()

    node = nodes_by_name(wait_for(ct.dispatch(flow)(), timeout_s=240))["task"]
    assert str(node["status"]) == "COMPLETED", (node["error"], node["stderr"])
    assert node["output"].get_deserialized() == "hello from the bucket"
    assert bucket.blob(f"transfers/{run}/out.txt").download_as_text() == "HELLO FROM THE BUCKET"

    # Covalent's own strategy, without a key file, fails on the worker before any request.
    @ct.electron(executor=GCPBatchExecutor(time_limit=120, pack_window=0),
                 files=[ct.fs.TransferFromRemote(f"gs://{local_stack.mount_bucket_name}/transfers/{run}/in.txt",
                                                 str(tmp_path / "again.txt"), strategy=ct.fs_strategies.GCloud())])
    def plain(files=[]):  # noqa: B006
        return 1

    @ct.lattice
    def plain_flow():
        return plain()

    node = nodes_by_name(wait_for(ct.dispatch(plain_flow)(), timeout_s=240))["plain"]
    assert str(node["status"]) == "FAILED"
    assert "'NoneType' object has no attribute 'keys'" in str(node["error"]) + str(node["stderr"]), (node["error"], node["stderr"])


def test_the_scratch_disk_is_a_fresh_writable_directory_of_the_task(covalent_server, local_stack):
    """scratch_disk_gb: Batch attaches a new disk at /mnt/disks/scratch; the local service gives the
    attempt an empty directory of its own there (volume_path), never written anywhere after."""

    def body():
        import os as _os

        from covalent_gcpbatch_plugin import volume_path

        scratch = volume_path("/mnt/disks/scratch")
        before = _os.listdir(scratch)
        with open(_os.path.join(scratch, "big.bin"), "wb") as f:
            f.write(b"x" * 1024)
        return before, _os.path.getsize(_os.path.join(scratch, "big.bin")), scratch != "/mnt/disks/scratch"

    node = run_one(GCPBatchExecutor(time_limit=120, pack_window=0, scratch_disk_gb=10), body)
    assert str(node["status"]) == "COMPLETED", (node["error"], node["stderr"])
    assert node["output"].get_deserialized() == ([], 1024, True)
    assert not Path("/mnt/disks/scratch").exists(), "nothing of the host's was written"
