"""The Cloud Function as it is deployed: a fresh virtualenv with only functions/requirements.txt,
and a copy of functions/ with its links replaced by their content (what gcloud uploads).

Slow (a fresh ``pip install`` of the function's requirements), part of ``make test``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

PROBE = textwrap.dedent('''
    import importlib.util, json, sys
    from cloudevents.conversion import to_binary
    from cloudevents.http import CloudEvent
    import functions_framework

    assert importlib.util.find_spec("covalent") is None, "the function's environment has no Covalent"
    client = functions_framework.create_app(target="on_task_uploaded", source="main.py",
                                            signature_type="cloudevent").test_client()
    answers = {}
    for kind, name in (("google.cloud.storage.object.v1.finalized", "someone-else/data.csv"),
                       ("google.cloud.storage.object.v1.finalized", "covalent-gcpbatch/cov-a-0-abcd/result.pkl"),
                       ("google.cloud.storage.object.v1.deleted", "covalent-gcpbatch/cov-a-0-abcd/task.pkl")):
        event = CloudEvent({"type": kind, "source": "//storage.googleapis.com/projects/_/buckets/b",
                            "subject": "objects/" + name, "id": "1"}, {"bucket": "b", "name": name, "generation": "1"})
        headers, body = to_binary(event)
        answers[kind.rsplit(".", 1)[1] + " " + name] = client.post("/", headers=headers, data=body).status_code
    import covalent_gcpbatch_plugin
    print(json.dumps({"answers": answers, "package": covalent_gcpbatch_plugin.__file__}))
''')


@pytest.fixture(scope="module")
def function_env(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("function")
    venv_dir = scratch / "venv"
    venv.EnvBuilder(with_pip=True).create(venv_dir)
    python = venv_dir / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-r",
                           str(REPO / "functions" / "requirements.txt")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"pip install -r functions/requirements.txt:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    source = scratch / "source"
    shutil.copytree(REPO / "functions", source, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    return python, source


def test_the_deployed_function_handles_events_with_only_its_requirements(function_env):
    import json

    python, source = function_env
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "GCPBATCH_PROJECT": "p", "GCPBATCH_REGION": "us-east1",
           "GCPBATCH_TOPIC": "jobs", "HOME": str(source)}
    done = subprocess.run([str(python), "-c", PROBE], cwd=source, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["package"].startswith(str(source)), "the uploaded copy, not an installed package"
    assert set(report["answers"].values()) == {200}, report["answers"]
    assert sys.prefix not in report["package"]
