"""The worker as a process against the stack's fake-gcs-server: refusal of foreign versions and
of unreadable task objects, each with an error record and the no-retry exit code."""

from __future__ import annotations

import os
import subprocess
import sys

import cloudpickle
import covalent
import pytest

from covalent_gcpbatch_plugin import clients, protocol
from test_protocol import spec as make_spec

pytestmark = pytest.mark.stack
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def run_worker(stack, payload: bytes, **spec_overrides) -> tuple[int, protocol.ErrorRecord | None]:
    job_id = protocol.make_job_id("feedface", 0, protocol.new_attempt_token())
    objects = protocol.TaskObjects(job_id)
    bucket = clients.storage_client(stack.project_id, stack.storage_emulator_host).bucket(stack.bucket_name)
    blob = bucket.blob(objects.task)
    blob.metadata = make_spec(**{"python_version": PYTHON, "covalent_version": covalent.__version__, **spec_overrides}).to_metadata()
    blob.upload_from_string(payload)
    env = {**os.environ, protocol.ENV_BUCKET: stack.bucket_name, protocol.ENV_JOB_ID: job_id, "STORAGE_EMULATOR_HOST": stack.storage_emulator_host}
    done = subprocess.run([sys.executable, "-m", "covalent_gcpbatch_plugin.worker"], env=env, capture_output=True, timeout=120)
    error = bucket.get_blob(objects.error)
    return done.returncode, (protocol.loads_error(error.download_as_bytes()) if error else None)


def test_version_mismatch_is_refused_naming_both(local_stack):
    code, error = run_worker(local_stack, cloudpickle.dumps((len, [[1]], {})), covalent_version="0.1.0")
    assert code == protocol.EXIT_WORKER_ERROR
    assert error.phase == "worker"
    assert "covalent 0.1.0" in error.message and f"covalent {covalent.__version__}" in error.message
    assert f"Python {PYTHON}" in error.message


def test_unreadable_task_object_fails_clearly(local_stack):
    code, error = run_worker(local_stack, b"this is not a pickle")
    assert code == protocol.EXIT_WORKER_ERROR
    assert "is not a readable task pickle" in error.message


def test_a_plain_task_succeeds(local_stack):
    code, error = run_worker(local_stack, cloudpickle.dumps((sum, [[1, 2, 3]], {})))
    assert (code, error) == (0, None)


def test_importing_covalent_leaves_pubsub_unloaded():
    """`import covalent` loads this plugin in every process, the worker's too; the Pub/Sub
    subscriber must come only with an executor waiting for events (the image has no pubsub)."""
    probe = ("import sys, covalent, covalent_gcpbatch_plugin.gcpbatch, covalent_gcpbatch_plugin.worker; "
             "print(sorted(m for m in sys.modules if 'pubsub' in m or m == 'covalent_gcpbatch_plugin.events'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
