"""Live smoke test: the SVM workflow (examples/svm.py) on a real deployment made by ``deploy.sh up``.

Deploys nothing. Skipped unless ``GCPBATCH_LIVE_PROJECT`` is set (so it is skipped under CI, which
has no Google Cloud project):

    ./deploy.sh up --project P --region R
    pip install -e '.[test]'
    GCPBATCH_LIVE_PROJECT=P python -m pytest tests/live -ra   # GCPBATCH_LIVE_PREFIX if up had --prefix

It reads the deployment's ``[executors.gcpbatch]`` section from ``GCPBATCH_LIVE_CONFIG`` (default:
``~/.config/covalent/covalent.conf``, where deploy.sh writes it), starts its own isolated Covalent
server configured with it, and dispatches the workflow, with Application Default Credentials.

Before dispatching it subscribes to the deployment's topic itself, and afterwards writes every
notification it received (attributes, data, publish time) to
``GCPBATCH_LIVE_RECORD`` (default: ``tests/live/recorded/notifications-<UTC time>.json``), so the
protocol's message parsing can be checked against what Google really sends. It asserts only what
the protocol relies on (Type, JobName, NewJobState); the rest is recorded as observations.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from covalent_gcpbatch_plugin import clients
from covalent_gcpbatch_plugin import covalent_config
from covalent_gcpbatch_plugin.local.covalent_server import CovalentServer
from covalent_gcpbatch_plugin.local.processes import free_ports
from covalent_gcpbatch_plugin.protocol import JOB_STATE_CHANGED, JobState, parse_notification

LIVE_PROJECT = os.environ.get("GCPBATCH_LIVE_PROJECT", "")
LIVE_PREFIX = os.environ.get("GCPBATCH_LIVE_PREFIX", "covalent-gcpbatch")
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "svm.py"
WORKFLOW_TIMEOUT_S = 3600
#: After the workflow, keep pulling until this long passes without a message.
DRAIN_IDLE_S = 60
REQUIRED = ("project_id", "region", "bucket_name", "container_image_uri", "service_account_email", "pubsub_topic")

pytestmark = [
    pytest.mark.live,
    pytest.mark.timeout(WORKFLOW_TIMEOUT_S + 600),
    pytest.mark.skipif(not LIVE_PROJECT, reason="GCPBATCH_LIVE_PROJECT is not set: the live test needs a deployed project"),
]


def deployment() -> dict:
    path = Path(os.environ.get("GCPBATCH_LIVE_CONFIG") or Path.home() / ".config" / "covalent" / "covalent.conf")
    section = covalent_config.read_executor_section(path)
    missing = [key for key in REQUIRED if not section.get(key)]
    if missing:
        pytest.fail(f"{path} has no deployment ({', '.join(missing)} missing): run ./deploy.sh up --project {LIVE_PROJECT}")
    if section["project_id"] != LIVE_PROJECT:
        pytest.fail(f"{path} points at project {section['project_id']!r}, not GCPBATCH_LIVE_PROJECT={LIVE_PROJECT!r}")
    emulated = [key for key in ("pubsub_emulator_host", "storage_emulator_host", "batch_api_endpoint") if section.get(key)]
    if emulated:
        pytest.fail(f"{path} still points at emulators ({', '.join(emulated)}): run ./deploy.sh up again")
    return {key: section[key] for key in REQUIRED} | {key: "" for key in ("pubsub_emulator_host", "storage_emulator_host", "batch_api_endpoint")}


def record_path() -> Path:
    if os.environ.get("GCPBATCH_LIVE_RECORD"):
        return Path(os.environ["GCPBATCH_LIVE_RECORD"])
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(__file__).with_name("recorded") / f"notifications-{stamp}.json"


def drain(subscriber, subscription: str, idle_s: float) -> list[dict]:
    """Every message on the subscription until ``idle_s`` passes without one (acked as read)."""
    messages, last = [], time.monotonic()
    while time.monotonic() - last < idle_s:
        response = subscriber.pull(subscription=subscription, max_messages=100, timeout=30)
        if not response.received_messages:
            time.sleep(2)
            continue
        last = time.monotonic()
        for received in response.received_messages:
            m = received.message
            messages.append({
                "message_id": m.message_id,
                "publish_time": m.publish_time.isoformat(),
                "attributes": dict(m.attributes),
                "data": m.data.decode("utf-8", "replace"),
            })  # fmt: skip
        subscriber.acknowledge(subscription=subscription, ack_ids=[r.ack_id for r in response.received_messages])
    return messages


def test_svm_workflow_on_the_live_deployment(tmp_path):
    for name in ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST"):
        if os.environ.get(name):
            pytest.fail(f"{name} is set: the live test must talk to Google, not an emulator")
    config = deployment()
    project, topic = config["project_id"], config["pubsub_topic"]

    subscriber = clients.subscriber_client()
    subscription = f"projects/{project}/subscriptions/covalent-gcpbatch-live-smoke-{secrets.token_hex(4)}"
    subscriber.create_subscription(
        request={
            "name": subscription,
            "topic": f"projects/{project}/topics/{topic}",
            "ack_deadline_seconds": 60,
            "expiration_policy": {"ttl": {"seconds": 24 * 3600}},
        }
    )
    (port,) = free_ports(1)
    server = CovalentServer(tmp_path / "covalent", port)
    env = server.env()
    covalent_config.write_executor_section(config, Path(env["COVALENT_CONFIG_DIR"]) / "covalent.conf")
    record = record_path()
    try:
        server.start()
        started = time.monotonic()
        completed = subprocess.run([sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True,
                                   timeout=WORKFLOW_TIMEOUT_S)  # fmt: skip
        elapsed = time.monotonic() - started
        messages = drain(subscriber, subscription, DRAIN_IDLE_S)
    finally:
        server.stop()
        subscriber.delete_subscription(subscription=subscription, timeout=30)

    found = re.search(r"dispatch (\S+): (\S+)", completed.stdout)
    dispatch_id = found.group(1) if found else ""
    short = re.sub(r"[^a-z0-9]", "", dispatch_id.lower())[:8]
    ours = [m for m in messages if m["attributes"].get("JobName", "").rsplit("/", 1)[-1].startswith(f"cov-{short}-")]
    job_names = sorted({m["attributes"]["JobName"] for m in ours})
    observations = {
        "job_name_has_project_number": all(re.fullmatch(r"projects/\d+/locations/[a-z0-9-]+/jobs/[a-z0-9-]+", n) for n in job_names),
        "attribute_keys": sorted({key for m in ours for key in m["attributes"]}),
        "region_attribute_matches": all(m["attributes"].get("Region") == config["region"] for m in ours),
        "states_seen": {n.rsplit("/", 1)[-1]: [m["attributes"].get("NewJobState") for m in ours if m["attributes"]["JobName"] == n]
                        for n in job_names},
    }  # fmt: skip
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({
        "recorded_at": datetime.now(timezone.utc).isoformat(),
        "project": project, "region": config["region"], "topic": topic, "image": config["container_image_uri"],
        "dispatch_id": dispatch_id, "workflow_seconds": round(elapsed, 1), "workflow_exit_code": completed.returncode,
        "observations": observations,
        "messages": messages,
    }, indent=2) + "\n")  # fmt: skip
    print(f"recorded {len(messages)} notifications to {record}")

    assert completed.returncode == 0, f"the SVM workflow failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    assert "SVM score:" in completed.stdout
    # What the protocol relies on, checked against the real service.
    assert ours, f"no notification for dispatch {dispatch_id} arrived on {topic} (recorded in {record})"
    for message in ours:
        if message["attributes"].get("Type", JOB_STATE_CHANGED) != JOB_STATE_CHANGED:
            continue  # task-level messages; real job-level ones have no Type
        event = parse_notification(message["attributes"], message["data"].encode())
        assert event is not None, f"parse_notification refused a real Batch message: {message}"
        assert event.job_id == message["attributes"]["JobName"].rsplit("/", 1)[-1]
    terminal = {n.rsplit("/", 1)[-1] for n in job_names for m in ours
                if m["attributes"]["JobName"] == n and m["attributes"].get("NewJobState") == JobState.SUCCEEDED.value}  # fmt: skip
    assert len(terminal) >= 3, f"expected a SUCCEEDED notification for each of the 3 electrons' jobs: {observations['states_seen']}"


def test_deploy_status_finds_every_resource_and_grant():
    """The deployment as deploy.sh made it: the build account and its staging bucket, the runner's
    create-only access, the Pub/Sub agent's token grant, ... all present (status exits 1 otherwise)."""
    config = deployment()
    done = subprocess.run([str(REPO / "deploy.sh"), "status", "--project", LIVE_PROJECT, "--region", config["region"],
                           "--prefix", LIVE_PREFIX, "--python", sys.executable],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    assert "MISSING" not in done.stdout
    assert f"roles/storage.objectCreator -> {LIVE_PREFIX}-runner@" in done.stdout
    assert "roles/storage.objectUser" not in done.stdout
    assert "roles/iam.serviceAccountTokenCreator -> service-" in done.stdout


FAILING_FLOW = """
import covalent as ct

@ct.electron(executor=ct.executor.GCPBatchExecutor(time_limit=300, retries=0))
def exits_three():
    import os
    os._exit(3)

@ct.lattice
def flow():
    return exits_three()

dispatch_id = ct.dispatch(flow)()
result = ct.get_result(dispatch_id, wait=True)
node = result.get_all_node_results()[0]
print("STATUS", result.status)
print("STDERR", node["stderr"])
"""


def test_an_exit_code_is_explained_from_real_batch_events(tmp_path):
    """A worker that dies with exit 3 leaves no error record: the executor's explanation must find
    the code where real Batch puts it (job-level event text, the task's own status)."""
    config = deployment()
    (port,) = free_ports(1)
    server = CovalentServer(tmp_path / "covalent", port)
    env = server.env()
    covalent_config.write_executor_section(config, Path(env["COVALENT_CONFIG_DIR"]) / "covalent.conf")
    script = tmp_path / "failing_flow.py"
    script.write_text(FAILING_FLOW)
    try:
        server.start()
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=WORKFLOW_TIMEOUT_S)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STATUS FAILED" in done.stdout
    assert "exit code 3" in done.stdout, done.stdout[-3000:]
