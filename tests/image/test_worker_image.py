"""The worker image's contents, without Docker: what worker_image/Dockerfile installs, installed into
a fresh virtualenv, runs real Covalent tasks from the local stack's bucket.

The package list is not repeated here: the Dockerfile is parsed and replayed by
``covalent_gcpbatch_plugin.local.worker_env`` (the same code that builds the local stack's worker
environment), and the worker is started with the final stage's ENTRYPOINT. Docker itself
(the slim base, the user, the copy between stages) is checked statically.

Slow (a fresh ``pip install`` of Covalent, a minute or two on a cold cache), but part of
``make test``: it is the only check that the image's pinned requirements still run a task.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path

import cloudpickle
import pytest

from covalent_gcpbatch_plugin import clients
from covalent_gcpbatch_plugin.local import worker_env as worker_env_module
from covalent_gcpbatch_plugin.local.worker_env import parse_dockerfile
from covalent_gcpbatch_plugin.protocol import EXIT_TASK_FAILED, JobSpec, TaskObjects, loads_error

# Task functions defined here are pickled by value, as they would be from a user's script.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "worker_image" / "Dockerfile"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
COVALENT_VERSION = version("covalent")
BUILD_ARGS = {"PYTHON_VERSION": PYTHON_VERSION, "COVALENT_VERSION": COVALENT_VERSION}

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(1500)]


# ---------------------------------------------------------------------------------------------------
# The Dockerfile
# ---------------------------------------------------------------------------------------------------


def test_dockerfile_has_what_the_issue_asks_for():
    stages = parse_dockerfile(DOCKERFILE)
    build, final = stages[0], stages[-1]
    assert len(stages) == 2 and build.name == "build"
    for stage in stages:
        assert stage.base == "python:${PYTHON_VERSION}-slim", "the official slim base at the dispatching Python"
    # Both versions come from the build (deploy.sh passes the dispatching environment's).
    assert "ARG PYTHON_VERSION" in DOCKERFILE.read_text() and "COVALENT_VERSION" in build.all("ARG")
    assert any('"covalent==${COVALENT_VERSION}"' in run for run in build.all("RUN"))
    # Pinned worker requirements.
    requirements = [
        line.strip() for line in (REPO / "worker_image" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    assert requirements and all(re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==[A-Za-z0-9_.+-]+", r) for r in requirements), requirements
    # Final stage: the venv from the build stage, a non-root user, no build tools, the worker.
    assert any(c.startswith("--from=build") and c.endswith("/opt/venv /opt/venv") for c in final.all("COPY"))
    (user,) = final.all("USER")
    assert user not in ("root", "0")
    assert all(re.fullmatch(r"useradd .*", run) for run in final.all("RUN")), "the final stage installs nothing"
    assert json.loads(final.all("ENTRYPOINT")[0]) == ["python", "-m", "covalent_gcpbatch_plugin.worker"]


# ---------------------------------------------------------------------------------------------------
# The image's Python environment, built from the Dockerfile's instructions
# ---------------------------------------------------------------------------------------------------


@dataclass
class WorkerEnv:
    python: Path
    entrypoint: list[str]
    env: dict[str, str]
    home: Path


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory) -> WorkerEnv:
    """Built fresh (not from the local stack's cache): this test is the check that the pins install."""
    final = parse_dockerfile(DOCKERFILE)[-1]
    scratch = tmp_path_factory.mktemp("worker-image")
    venv_dir = scratch / "venv"
    python = venv_dir / "bin" / "python"
    installs = worker_env_module.build(venv_dir, values=BUILD_ARGS)
    assert installs == 3, "the build stage installs the requirements with covalent, this package, the user's packages"

    env = {}
    for argument in final.all("ENV"):
        for pair in shlex.split(argument):
            key, _, value = pair.partition("=")
            env[key] = value
    home = scratch / "home"  # WORKDIR /home/worker
    home.mkdir()
    env.update(PATH=f"{venv_dir / 'bin'}:/usr/bin:/bin", HOME=str(home), COVALENT_CONFIG_DIR=str(home / ".config" / "covalent"))
    entrypoint = json.loads(final.all("ENTRYPOINT")[0])
    assert entrypoint[0] == "python"
    return WorkerEnv(python=python, entrypoint=[str(python), *entrypoint[1:]], env=env, home=home)


def test_worker_env_uses_its_own_copy_of_everything(worker_env):
    probe = "import covalent, covalent_gcpbatch_plugin.worker as w, sys; print(covalent.__version__, w.__file__, sys.prefix)"
    result = subprocess.run([str(worker_env.python), "-c", probe], env=worker_env.env, cwd=worker_env.home,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    covalent_version, worker_file, prefix = result.stdout.split()
    assert covalent_version == COVALENT_VERSION
    assert Path(worker_file).is_relative_to(prefix), "the worker comes from the installed package, not the checkout"


# ---------------------------------------------------------------------------------------------------
# Real tasks through the worker, objects in the local stack's bucket
# ---------------------------------------------------------------------------------------------------


def add_and_report(a, b, *, scale):
    import platform

    with open("deps_bash_marker.txt") as marker:  # written by the DepsBash hook before the task
        hook = marker.read().strip()
    print(f"adding {a} and {b} on Python {platform.python_version()}")
    return {"sum": (a + b) * scale, "hook": hook}


def explode(x):
    raise ValueError(f"refusing {x}")


def covalent_task(fn, *args, **kwargs):
    """(function, args, kwargs) exactly as Covalent hands them to an executor's run()."""
    import covalent as ct
    from covalent._workflow.transport import TransportableObject
    from covalent.executor.utils.wrappers import wrapper_fn

    call_before = [ct.DepsBash(["echo from-deps-bash > deps_bash_marker.txt"]).apply()]
    function = partial(wrapper_fn, TransportableObject(fn), call_before, [])
    return function, [TransportableObject(a) for a in args], {k: TransportableObject(v) for k, v in kwargs.items()}


#: Not the stack's bucket: a task object there would also start a job on the local Batch service
#: (fake-gcs-server publishes events for that bucket only).
BUCKET = "covalent-gcpbatch-image-test"


@pytest.fixture(scope="module")
def bucket(local_stack):
    storage = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host)
    created = storage.create_bucket(BUCKET)
    yield created
    created.delete(force=True)


def upload(stack, job_id: str, task) -> None:
    spec = JobSpec(
        dispatch_id="worker-image-test",
        node_id=0,
        project_id=stack.project_id,
        region=stack.region,
        container_image_uri="local/worker-image-test",
        vcpus=1,
        memory_mb=256,
        time_limit_s=60,
        retries=0,
        python_version=PYTHON_VERSION,
        covalent_version=COVALENT_VERSION,
    )
    blob = clients.storage_client(stack.project_id, stack.storage_emulator_host).bucket(BUCKET).blob(TaskObjects(job_id).task)
    blob.metadata = spec.to_metadata()
    blob.upload_from_string(cloudpickle.dumps(task), content_type="application/octet-stream")


def run_worker(worker_env: WorkerEnv, stack, job_id: str) -> subprocess.CompletedProcess:
    env = {**worker_env.env, "GCPBATCH_BUCKET": BUCKET, "GCPBATCH_JOB_ID": job_id,
           "STORAGE_EMULATOR_HOST": stack.storage_emulator_host}  # fmt: skip
    return subprocess.run(worker_env.entrypoint, env=env, cwd=worker_env.home, capture_output=True, text=True, timeout=180)


def read(stack, name: str) -> bytes | None:
    blob = clients.storage_client(stack.project_id, stack.storage_emulator_host).bucket(BUCKET).get_blob(name)
    return None if blob is None else blob.download_as_bytes()


def test_worker_env_runs_a_covalent_task_from_the_bucket(worker_env, local_stack, bucket):
    from covalent._workflow.transport import TransportableObject

    job_id = "cov-imagetst-0-a1b2c3"
    upload(local_stack, job_id, covalent_task(add_and_report, 20, 1, scale=2))
    result = run_worker(worker_env, local_stack, job_id)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    objects = TaskObjects(job_id)
    payload = read(local_stack, objects.result)
    assert payload is not None, result.stderr
    output = cloudpickle.loads(payload)
    assert isinstance(output, TransportableObject)
    assert output.get_deserialized() == {"sum": 42, "hook": "from-deps-bash"}
    assert read(local_stack, objects.stdout(0)).decode() == f"adding 20 and 1 on Python {sys.version.split()[0]}\n"
    assert read(local_stack, objects.error) is None


def test_worker_env_reports_a_raising_task(worker_env, local_stack, bucket):
    job_id = "cov-imagetst-1-d4e5f6"
    upload(local_stack, job_id, covalent_task(explode, 7))
    result = run_worker(worker_env, local_stack, job_id)
    assert result.returncode == EXIT_TASK_FAILED, f"{result.stdout}\n{result.stderr}"
    record = loads_error(read(local_stack, TaskObjects(job_id).error))
    assert (record.type, record.message, record.phase) == ("ValueError", "refusing 7", "task")
    assert "Traceback (most recent call last)" in record.traceback
    assert read(local_stack, TaskObjects(job_id).result) is None
