"""The local emulation stack: the Eventarc bridge, LocalStack up/down, the CLI and the Covalent config.

Everything here runs the real services (Pub/Sub emulator, fake-gcs-server, the local Batch service,
functions-framework, the bridge) on 127.0.0.1. The function is a stand-in that records each
CloudEvent it receives, so these tests check the delivery path, not the real function's logic.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toml
from cloudevents.conversion import to_binary
from helpers_emulators import EmulatorUnavailable, free_port, pubsub_emulator_launcher, unavailable

from covalent_gcpbatch_plugin import clients
from covalent_gcpbatch_plugin import covalent_config
from covalent_gcpbatch_plugin.local import bridge
from covalent_gcpbatch_plugin.local.covalent_server import CovalentServer
from covalent_gcpbatch_plugin.local.stack import (
    COMPONENTS,
    LocalStack,
    StackError,
    StackSettings,
    find_fake_gcs_server,
    find_pubsub_emulator,
)
from covalent_gcpbatch_plugin.errors import ConfigError
from covalent_gcpbatch_plugin.local.processes import group_members
from covalent_gcpbatch_plugin.settings import DEPLOYMENT_KEYS

#: A notification exactly as fake-gcs-server 1.54.0 published it for an upload with metadata.
FAKE_GCS_ATTRIBUTES = {
    "objectId": "covalent-gcpbatch/cov-abc-0-x1/task.pkl",
    "objectGeneration": "1795281888788145",
    "bucketId": "bkt-local",
    "eventTime": "2026-11-21T17:24:48Z",
    "eventType": "OBJECT_FINALIZE",
    "payloadFormat": "JSON_API_V1",
}
FAKE_GCS_DATA = (
    b'{"kind":"storage#object","id":"bkt-local/covalent-gcpbatch/cov-abc-0-x1/task.pkl#1795281888788145",'
    b'"name":"covalent-gcpbatch/cov-abc-0-x1/task.pkl","bucket":"bkt-local","generation":"1795281888788145",'
    b'"contentType":"text/plain","timeCreated":"2026-11-21T17:24:48.788128Z","updated":"2026-11-21T17:24:48.788134Z",'
    b'"storageClass":"STANDARD","size":"5","md5Hash":"XUFAKrxLKna5cZ2REBfFkg==","crc32c":"mnG7TA==",'
    b'"metadata":{"gcpbatch-spec":"{\\"a\\":1}"}}'
)

#: Records every CloudEvent to events/; fails the first delivery of each fail-once/ object.
RECORDING_FUNCTION = '''
import json, os, uuid
from pathlib import Path

import functions_framework

HERE = Path(__file__).parent


@functions_framework.cloud_event
def on_task_uploaded(event):
    record = {"attributes": dict(event.get_attributes()), "data": event.data}
    (HERE / "events" / f"{uuid.uuid4().hex}.json").write_text(json.dumps(record))
    name = event.data.get("name", "")
    if name.startswith("fail-once/"):
        try:
            os.close(os.open(HERE / "failed" / name.replace("/", "_"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        raise RuntimeError("failing the first delivery on purpose")
'''

EXECUTOR_CONFIG_KEYS = set(DEPLOYMENT_KEYS)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def processes_under(directory: Path) -> list[int]:
    """Live processes whose working directory is in ``directory``: every stack process runs there."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X") and (cwd == str(directory) or cwd.startswith(f"{directory}/")):
            found.append(int(entry.name))
    return found


def require_emulators() -> None:
    try:
        pubsub_emulator_launcher()
        find_pubsub_emulator()
        find_fake_gcs_server()
    except (EmulatorUnavailable, StackError) as err:
        unavailable(str(err))


def recording_function(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "events").mkdir()
    (directory / "failed").mkdir()
    source = directory / "main.py"
    source.write_text(RECORDING_FUNCTION)
    return source


def recorded_events(function_dir: Path, object_name: str) -> list[dict]:
    events = []
    for path in function_dir.glob("events/*.json"):
        try:
            record = json.loads(path.read_text())
        except ValueError:  # being written
            continue
        if record["data"].get("name") == object_name:
            events.append(record)
    return events


# ---------------------------------------------------------------------------------------------
# The bridge's translation (pure)
# ---------------------------------------------------------------------------------------------


def test_fake_gcs_notification_becomes_eventarc_storage_event():
    event = bridge.to_cloud_event("17", FAKE_GCS_ATTRIBUTES, FAKE_GCS_DATA)

    assert event["type"] == "google.cloud.storage.object.v1.finalized"
    assert event["source"] == "//storage.googleapis.com/projects/_/buckets/bkt-local"
    assert event["subject"] == "objects/covalent-gcpbatch/cov-abc-0-x1/task.pkl"
    assert event["id"] == "17"
    assert event["time"] == "2026-11-21T17:24:48Z"
    assert event.data == json.loads(FAKE_GCS_DATA)
    assert event.data["metadata"] == {"gcpbatch-spec": '{"a":1}'}

    headers, body = to_binary(event)
    assert headers["ce-type"] == "google.cloud.storage.object.v1.finalized"
    assert headers["ce-subject"] == "objects/covalent-gcpbatch/cov-abc-0-x1/task.pkl"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == json.loads(FAKE_GCS_DATA)


def test_translation_of_other_messages():
    deleted = bridge.to_cloud_event("1", {**FAKE_GCS_ATTRIBUTES, "eventType": "OBJECT_DELETE"}, FAKE_GCS_DATA)
    assert deleted["type"] == "google.cloud.storage.object.v1.deleted"

    from datetime import datetime, timezone

    no_time = {k: v for k, v in FAKE_GCS_ATTRIBUTES.items() if k != "eventTime"}
    published = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert bridge.to_cloud_event("2", no_time, FAKE_GCS_DATA, published)["time"] == "2026-01-02T03:04:05Z"

    assert bridge.to_cloud_event("3", {"Type": "JOB_STATE_CHANGED"}, b"Job state was updated") is None
    assert bridge.to_cloud_event("4", FAKE_GCS_ATTRIBUTES, b"not json") is None


# ---------------------------------------------------------------------------------------------
# Covalent config section (no server)
# ---------------------------------------------------------------------------------------------


def test_config_section_written_then_removed_with_previous_values_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("COVALENT_CONFIG_DIR", str(tmp_path / "config"))
    path = covalent_config.config_file()
    assert path == tmp_path / "config" / "covalent.conf"
    path.parent.mkdir()
    path.write_text('[sdk]\nlog_level = "warning"\n\n[executors.gcpbatch]\nproject_id = "mine"\nvcpus = 4\n\n[executors.other]\nx = 1\n')

    values = StackSettings(pubsub_emulator_host="127.0.0.1:1", storage_emulator_host="http://127.0.0.1:2").executor_config()
    assert covalent_config.write_executor_section(values) == path
    assert covalent_config.read_executor_section() == {**values, "vcpus": 4}

    covalent_config.remove_executor_section_keys(values, restore={"project_id": "mine"})
    config = toml.load(path)
    assert config["executors"]["gcpbatch"] == {"project_id": "mine", "vcpus": 4}
    assert config["executors"]["other"] == {"x": 1}
    assert config["sdk"] == {"log_level": "warning"}


def test_the_config_is_read_under_covalent_s_own_lock(tmp_path, monkeypatch):
    """Covalent rewrites its config in place (truncate, then write) under ``<file>.lock``. Read
    without the lock, an empty file was seen (`covalent-gcpbatch logs` said the section had no
    project_id while another process's `import covalent` rewrote it): the read waits for the lock,
    and past its bound says which lock held it."""
    monkeypatch.setenv("COVALENT_CONFIG_DIR", str(tmp_path))
    path = covalent_config.config_file()
    section = '[executors.gcpbatch]\nproject_id = "mine"\n'
    path.write_text(section)
    hold = ("import filelock, sys; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
            "open(sys.argv[2], 'w').close(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold, f"{path}.lock", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n", "the writer holds the lock, the file is empty"
        with pytest.raises(ConfigError, match="covalent.conf.lock was held"):
            covalent_config.read_executor_section(timeout_s=0.2)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reading = pool.submit(covalent_config.read_executor_section)
            path.write_text(section)  # the writer finishes
            holder.stdin.close()  # and lets go
            assert reading.result(timeout=30) == {"project_id": "mine"}
    finally:
        holder.kill()
        holder.wait()


def test_config_file_follows_covalent_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("COVALENT_CONFIG_DIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert covalent_config.config_file() == tmp_path / ".config" / "covalent" / "covalent.conf"
    covalent_config.write_executor_section({"project_id": "p"})  # creates the file and its directory
    assert covalent_config.read_executor_section() == {"project_id": "p"}


def test_executor_config_keys_are_executor_settings():
    from covalent_gcpbatch_plugin.gcpbatch import _EXECUTOR_PLUGIN_DEFAULTS

    config = StackSettings().executor_config()
    assert set(config) == EXECUTOR_CONFIG_KEYS
    assert EXECUTOR_CONFIG_KEYS <= set(_EXECUTOR_PLUGIN_DEFAULTS)
    assert config["pubsub_topic"] == StackSettings().topic


@pytest.mark.stack
def test_covalent_server_keeps_our_section(tmp_path):
    root = tmp_path / "covalent"
    server = CovalentServer(root, free_port())
    path = root / "config" / "covalent.conf"
    values = StackSettings(pubsub_emulator_host="127.0.0.1:1", storage_emulator_host="http://127.0.0.1:2").executor_config()
    covalent_config.write_executor_section(values, path)
    server.start()
    try:
        section = covalent_config.read_executor_section(path)
        assert {k: section.get(k) for k in values} == values
        assert toml.load(path)["sdk"]["no_cluster"] == "true"  # the server did rewrite the file
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# LocalStack
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def function_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("function") / "src"
    recording_function(directory)
    return directory


@pytest.fixture(scope="module")
def running(tmp_path_factory, function_dir):
    """(stack, settings) of one stack for the module, taken down at the end."""
    require_emulators()
    stack = LocalStack(tmp_path_factory.mktemp("stack") / "state", function_source=function_dir / "main.py")
    try:
        settings = stack.up()
        yield stack, settings
    finally:
        stack.down()


@pytest.mark.stack
def test_up_brings_every_component_up(running):
    stack, settings = running
    status = stack.status()
    assert status["running"]
    assert list(status["components"]) == list(COMPONENTS)
    assert all(c["alive"] for c in status["components"].values())
    assert LocalStack.load_settings(stack.state_dir) == settings

    storage = clients.storage_client(settings.project_id, settings.storage_emulator_host)
    assert storage.bucket(settings.bucket_name).exists() and storage.bucket(settings.task_bucket_name).exists()
    publisher = clients.publisher_client(settings.pubsub_emulator_host)
    topics = {t.name for t in publisher.list_topics(project=f"projects/{settings.project_id}")}
    assert {settings.topic_path(settings.topic), settings.topic_path(settings.gcs_topic)} <= topics

    config = settings.executor_config()
    assert set(config) == EXECUTOR_CONFIG_KEYS
    assert config["pubsub_emulator_host"] == settings.pubsub_emulator_host
    assert config["batch_api_endpoint"] == settings.batch_api_endpoint
    assert settings.deployment_settings().allowed_images == (settings.container_image_uri,)


@pytest.mark.stack
def test_upload_is_delivered_to_the_function_as_a_storage_cloudevent(running, function_dir):
    _, settings = running
    name = "covalent-gcpbatch/cov-upload-0-a1/task.pkl"
    storage = clients.storage_client(settings.project_id, settings.storage_emulator_host)
    # An output in the other bucket first: a trigger on the task bucket never delivers it.
    output = "covalent-gcpbatch/cov-upload-0-a1/attempt-0/stdout.log"
    storage.bucket(settings.bucket_name).blob(output).upload_from_string(b"printed")
    blob = storage.bucket(settings.task_bucket_name).blob(name)
    blob.metadata = {"gcpbatch-spec": '{"x": 1}'}
    blob.upload_from_string(b"payload")

    [event] = wait_for(lambda: recorded_events(function_dir, name), 20, "the function to receive the upload's event")
    assert recorded_events(function_dir, output) == [], "only the task bucket's objects fire the function"
    attributes, data = event["attributes"], event["data"]
    assert attributes["type"] == "google.cloud.storage.object.v1.finalized"
    assert attributes["source"] == f"//storage.googleapis.com/projects/_/buckets/{settings.task_bucket_name}"
    assert attributes["subject"] == f"objects/{name}"
    assert attributes["id"] and attributes["time"]
    assert data["name"] == name and data["bucket"] == settings.task_bucket_name
    assert data["metadata"] == {"gcpbatch-spec": '{"x": 1}'}
    assert data["size"] == "7"


@pytest.mark.stack
def test_failed_delivery_is_redelivered(running, function_dir):
    stack, settings = running
    name = "fail-once/object.txt"
    bucket = clients.storage_client(settings.project_id, settings.storage_emulator_host).bucket(settings.task_bucket_name)
    bucket.blob(name).upload_from_string(b"x")

    events = wait_for(lambda: len(recorded_events(function_dir, name)) >= 2 and recorded_events(function_dir, name), 30,
                      "the redelivery after the function's 500")
    assert len({e["attributes"]["id"] for e in events}) == 1  # a retry of the same event, as Eventarc retries
    bridge_log = stack.logs_dir / "bridge.log"
    wait_for(lambda: f"{name} attempt=2 -> 200" in bridge_log.read_text(), 5, "the bridge to log the acked redelivery")
    assert f"{name} attempt=1 -> 500" in bridge_log.read_text()


@pytest.mark.stack
def test_up_of_a_running_stack_reuses_it(running):
    stack, settings = running
    pids = {n: c["pid"] for n, c in stack.status()["components"].items()}
    assert LocalStack(stack.state_dir).up() == settings
    assert {n: c["pid"] for n, c in stack.status()["components"].items()} == pids


@pytest.mark.stack
def test_down_leaves_no_process(tmp_path, function_dir):
    require_emulators()
    stack = LocalStack(tmp_path / "state", function_source=function_dir / "main.py")
    stack.up()
    recorded = [c["pid"] for c in stack.status()["components"].values()]
    members = {pid for pgid in recorded for pid in group_members(pgid)}  # e.g. the gunicorn worker
    assert len(recorded) == len(COMPONENTS) and set(recorded) <= members

    stack.down()
    assert not any(group_members(pgid) for pgid in recorded)
    assert not processes_under(stack.state_dir)
    assert not stack.status()["running"] and not stack.status()["components"]
    with pytest.raises(StackError, match="no local stack is running"):
        LocalStack.load_settings(stack.state_dir)
    stack.down()  # idempotent


@pytest.mark.stack
def test_up_failing_half_way_stops_what_it_started(tmp_path):
    require_emulators()
    source = tmp_path / "function" / "main.py"
    source.parent.mkdir()
    source.write_text("def not_the_target(event):\n    pass\n")  # functions-framework exits at start
    stack = LocalStack(tmp_path / "state", function_source=source)

    with pytest.raises(StackError) as failure:
        stack.up()
    assert "function exited" in str(failure.value)
    assert str(stack.logs_dir / "function.log") in str(failure.value)
    assert not processes_under(stack.state_dir)
    assert not stack.status()["components"]


@pytest.mark.stack
def test_bridge_reopens_its_stream_when_its_subscription_comes_back(running, function_dir, tmp_path):
    """The Pub/Sub emulator's NOT_FOUND (a restarted emulator, before the stack recreated the
    subscription) ends a streaming pull for good in the client library: the bridge re-opens it
    and delivers what is published once the subscription is back. (Before: it exited, and no
    task object reached the function again.) Its own topic and bridge, beside the module's."""
    _, settings = running
    topic = settings.topic_path("bridge-reopen")
    subscription = f"projects/{settings.project_id}/subscriptions/bridge-reopen"
    publisher = clients.publisher_client(settings.pubsub_emulator_host)
    subscriber = clients.subscriber_client(settings.pubsub_emulator_host)
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)
    log_path, ready = tmp_path / "bridge.log", tmp_path / "bridge.ready"
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": settings.pubsub_emulator_host, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", bridge.__name__, "--subscription", subscription, "--target", settings.function_url,
             "--ready-file", str(ready)],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(ready.exists, 30, "the bridge to pull")
        subscriber.delete_subscription(subscription=subscription)
        wait_for(lambda: "streaming pull ended (NotFound" in log_path.read_text(), 30, "the stream to end on NOT_FOUND")
        subscriber.create_subscription(name=subscription, topic=topic)
        name = "bridge-reopen/task.pkl"
        data = json.dumps({**json.loads(FAKE_GCS_DATA), "name": name}).encode()
        publisher.publish(topic, data, **{**FAKE_GCS_ATTRIBUTES, "objectId": name}).result(timeout=30)
        wait_for(lambda: recorded_events(function_dir, name), 30, "the delivery through the re-opened stream")
        assert process.poll() is None, log_path.read_text()
    finally:
        process.terminate()
        code = process.wait(30)
        subscriber.delete_subscription(subscription=subscription)
        publisher.delete_topic(topic=topic)
        subscriber.close()
        publisher.transport.close()
    assert code == 0, log_path.read_text()


@pytest.mark.stack
def test_restart_of_gcs_keeps_its_objects_and_its_finalize_events(tmp_path):
    """On a stack of its own: fake-gcs-server restarted (filesystem backend) still has the task
    bucket's objects, its new uploads still reach the function, and the state file names the new
    process, which ``down`` stops. Only the emulators can be restarted."""
    require_emulators()
    function_dir = tmp_path / "function"
    stack = LocalStack(tmp_path / "state", function_source=recording_function(function_dir))
    with pytest.raises(ValueError, match="pubsub and gcs"):
        stack.restart("bogus")
    new_pid = None
    try:
        settings = stack.up()
        bucket = clients.storage_client(settings.project_id, settings.storage_emulator_host).bucket(settings.task_bucket_name)
        bucket.blob("before-restart.txt").upload_from_string(b"kept")
        wait_for(lambda: recorded_events(function_dir, "before-restart.txt"), 20, "the first upload's event")
        before = stack.status()["components"]["gcs"]

        down_s = stack.restart("gcs")

        after = LocalStack(stack.state_dir).status()  # as the state file says
        assert after["running"] and list(after["components"]) == list(COMPONENTS)
        restarted = after["components"]["gcs"]
        new_pid = restarted["pid"]
        assert new_pid != before["pid"] and not group_members(before["pid"])
        assert restarted["url"] == before["url"] == settings.storage_emulator_host
        assert 0 < down_s < 30
        assert "gcs restarted by LocalStack.restart" in (stack.logs_dir / "gcs.log").read_text()
        assert bucket.blob("before-restart.txt").download_as_bytes() == b"kept"
        bucket.blob("after-restart.txt").upload_from_string(b"new")
        [event] = wait_for(lambda: recorded_events(function_dir, "after-restart.txt"), 20, "the new upload's event")
        assert event["attributes"]["type"] == "google.cloud.storage.object.v1.finalized"
        with pytest.raises(ValueError, match="not 'batch'"):
            stack.restart("batch")
    finally:
        stack.down()
    assert new_pid is not None and not group_members(new_pid), "down stopped the restarted process"
    assert not processes_under(stack.state_dir)


def test_missing_pubsub_emulator_names_the_debian_package(tmp_path, monkeypatch):
    from covalent_gcpbatch_plugin.local import stack

    monkeypatch.setattr(stack, "DEFAULT_SDK_ROOT", tmp_path / "no-sdk")
    monkeypatch.setattr(stack.shutil, "which", lambda name: None)
    with pytest.raises(StackError, match="google-cloud-cli-pubsub-emulator"):
        LocalStack(tmp_path / "state").up()
    assert not (tmp_path / "state" / "stack.json").exists()


def test_up_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StackError, match="not a local stack state directory"):
        LocalStack(tmp_path).up()
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# The CLI, as a user runs it
# ---------------------------------------------------------------------------------------------


@pytest.mark.stack
def test_cli_up_status_down_round_trip(tmp_path):
    require_emulators()
    cli = str(Path(sys.executable).with_name("covalent-gcpbatch"))
    config = tmp_path / "config" / "covalent.conf"
    config.parent.mkdir()
    config.write_text('[executors.gcpbatch]\nproject_id = "mine"\nvcpus = 4\n')
    state = tmp_path / "state"
    env = {**os.environ, "COVALENT_CONFIG_DIR": str(config.parent), "HOME": str(tmp_path / "home")}
    env.pop("COVALENT_GCPBATCH_LOCAL_DIR", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([cli, "local", *args, "--state-dir", str(state)], env=env, capture_output=True, text=True, timeout=120)

    up = run("up")
    try:
        assert up.returncode == 0, up.stderr
        section = toml.load(config)["executors"]["gcpbatch"]
        assert EXECUTOR_CONFIG_KEYS <= set(section) and section["vcpus"] == 4
        for key in EXECUTOR_CONFIG_KEYS:
            assert f"{key} = {json.dumps(section[key])}" in up.stdout  # printed as written
        assert section["project_id"] == "local-project"
        # progress, step by step, with the elapsed time
        steps = [line.split("] ", 1)[1].split(" ready in ")[0] for line in up.stdout.splitlines() if " ready in " in line]
        assert steps == ["workers' environment", *COMPONENTS], up.stdout

        status = run("status", "--json")
        assert status.returncode == 0, status.stderr
        components = json.loads(status.stdout)["components"]
        assert all(c["alive"] for c in components.values()) and len(components) == len(COMPONENTS)
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    assert toml.load(config)["executors"]["gcpbatch"] == {"project_id": "mine", "vcpus": 4}
    assert not any(group_members(c["pid"]) for c in components.values())
    assert not processes_under(state)
    assert run("status").returncode == 1
