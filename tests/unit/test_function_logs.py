"""The Cloud Function's logs are structured JSON lines (one per record, on stdout) that Cloud
Logging turns into entries with a severity, the job id and a label to filter on."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import functions_framework
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from covalent_gcpbatch_plugin import deployment, protocol

FUNCTION_SOURCE = Path(__file__).resolve().parents[2] / "functions" / "main.py"
JOB_ID = protocol.make_job_id("f00dbabe", 1, "abcd")


def app(monkeypatch):
    for name, value in {"GCPBATCH_PROJECT": "p", "GCPBATCH_REGION": "r", "GCPBATCH_TOPIC": "topic",
                        deployment.env_name("task_bucket"): "the-task-bucket"}.items():
        monkeypatch.setenv(name, value)
    sys.modules.pop("main", None)
    return functions_framework.create_app(target="on_task_uploaded", source=str(FUNCTION_SOURCE),
                                          signature_type="cloudevent").test_client()


def deliver(client, bucket: str, name: str, event_type: str = "google.cloud.storage.object.v1.finalized"):
    event = CloudEvent({"type": event_type, "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
                        "subject": f"objects/{name}", "id": uuid.uuid4().hex}, {"bucket": bucket, "name": name})
    headers, body = to_binary(event)
    return client.post("/", headers=headers, data=body)


def function_lines(text: str) -> list[dict]:
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [e for e in entries if e.get("logger") == "covalent_gcpbatch.function"]


def test_function_logs_are_json_with_severity_and_job_id(monkeypatch, capsys):
    client = app(monkeypatch)
    task = protocol.TaskObjects(JOB_ID).task
    assert deliver(client, "someone-elses-bucket", task).status_code == 200
    assert deliver(client, "the-task-bucket", task, "google.cloud.storage.object.v1.deleted").status_code == 200
    warning, info = function_lines(capsys.readouterr().out)
    assert warning["severity"] == "WARNING" and warning["job_id"] == JOB_ID
    assert warning["message"] == f"ignoring gs://someone-elses-bucket/{task}: not this deployment's task bucket"
    assert warning["logging.googleapis.com/labels"] == {"job_id": JOB_ID}
    assert info["severity"] == "INFO" and info["job_id"] == JOB_ID and "ignoring event type" in info["message"]


def test_every_log_call_of_the_function_names_its_job():
    """Each ``log.<level>(...)`` call in main.py passes extra={"job_id": ...}."""
    import ast

    tree = ast.parse(FUNCTION_SOURCE.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "log"]
    assert len(calls) >= 10
    for call in calls:
        extra = next((k.value for k in call.keywords if k.arg == "extra"), None)
        assert isinstance(extra, ast.Dict) and any(getattr(k, "value", None) == "job_id" for k in extra.keys), ast.unparse(call)
