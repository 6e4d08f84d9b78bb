"""The worker as a process against a real fake-gcs-server: refusal of foreign versions and of
unreadable task objects, each with an error record and the no-retry exit code; an outcome that
cannot be stored; SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import cloudpickle
import covalent
import pytest

from faults_report import record

from covalent_gcpbatch_plugin import clients, protocol
from specs import spec as make_spec

pytestmark = pytest.mark.stack
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tasks defined here run in the worker
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def run_worker(stack, payload: bytes, *, attempt: int = 0, present: dict[str, bytes] | None = None,
               job_id: str | None = None, storage_host: str | None = None,
               **spec_overrides) -> tuple[int, protocol.ErrorRecord | None]:
    """Run the worker on a task object (with the objects ``present`` put beside it first, named
    relative to the task's prefix) as attempt ``attempt`` of its Batch task, talking to GCS at
    ``storage_host`` (the stack's emulator unless given)."""
    job_id = job_id or protocol.make_job_id("feedface", 0, protocol.new_attempt_token())
    objects = protocol.TaskObjects(job_id)
    bucket = clients.storage_client(stack.project_id, stack.storage_emulator_host).bucket(stack.bucket_name)
    blob = bucket.blob(objects.task)
    blob.metadata = make_spec(**{"python_version": PYTHON, "covalent_version": covalent.__version__, **spec_overrides}).to_metadata()
    blob.upload_from_string(payload)
    for name, content in (present or {}).items():
        bucket.blob(objects.prefix + name).upload_from_string(content)
    env = {**os.environ, protocol.ENV_BUCKET: stack.bucket_name, protocol.ENV_JOB_ID: job_id,
           protocol.ENV_RETRY_ATTEMPT: str(attempt), "STORAGE_EMULATOR_HOST": storage_host or stack.storage_emulator_host}
    done = subprocess.run([sys.executable, "-m", "covalent_gcpbatch_plugin.worker"], env=env, capture_output=True, timeout=120)
    error = bucket.get_blob(objects.error)
    return done.returncode, (protocol.loads_error(error.download_as_bytes()) if error else None)


def _shout(text: str) -> str:
    print(text)
    return text.upper()


def test_a_retry_writes_its_own_output_and_replaces_nothing(local_stack):
    """Attempt 0 was preempted after storing its output; attempt 1 stores its own beside it (the
    worker's account can create objects, not replace them). An attempt whose output already
    exists refuses to replace it: exit 12, no retry."""
    bucket = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host).bucket(local_stack.bucket_name)
    job_id = protocol.make_job_id("feedface", 1, protocol.new_attempt_token())
    objects = protocol.TaskObjects(job_id)
    earlier = {objects.stdout(0).removeprefix(objects.prefix): b"attempt 0 output\n",
               objects.stderr(0).removeprefix(objects.prefix): b""}
    code, error = run_worker(local_stack, cloudpickle.dumps((_shout, ["hi"], {})), attempt=1, present=earlier, job_id=job_id)
    assert (code, error) == (0, None)
    assert bucket.blob(objects.stdout(0)).download_as_bytes() == b"attempt 0 output\n", "left as it was"
    assert bucket.blob(objects.stdout(1)).download_as_bytes() == b"hi\n"
    names = [b.name for b in bucket.list_blobs(prefix=objects.prefix)]
    assert objects.last_attempt(names) == 1
    assert cloudpickle.loads(bucket.blob(objects.result).download_as_bytes()) == "HI"

    planted = {objects.stdout(0).removeprefix(objects.prefix): b"someone else's"}
    code, _ = run_worker(local_stack, cloudpickle.dumps((_shout, ["hi"], {})), attempt=0, present=planted)
    assert code == protocol.EXIT_UPLOAD_FAILED


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


def _own_gcs_server(tmp_path, port: int | None = None, root=None):
    """A fake-gcs-server of the test's own, so the test can stop it mid-task: memory backend, or
    with ``root`` a filesystem one that a restart on the same ``port`` finds as it was."""
    from covalent_gcpbatch_plugin.local.processes import free_ports, http_answers
    from covalent_gcpbatch_plugin.local.stack import find_fake_gcs_server

    if port is None:
        (port,) = free_ports(1)
    host = f"http://127.0.0.1:{port}"
    backend = ["-backend", "memory"] if root is None else ["-backend", "filesystem", "-filesystem-root", str(root)]
    with open(tmp_path / "gcs.log", "ab") as log:
        proc = subprocess.Popen([str(find_fake_gcs_server()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                 *backend, "-external-url", host, "-log-level", "warn"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while not http_answers(f"{host}/storage/v1/b", any_status=True):
        assert proc.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
        time.sleep(0.05)
    return proc, host


def _wait_for_file(path: str, limit_s: float = 60) -> int:
    """The task: say it started (``path``.started), wait (bounded) until the test creates ``path``."""
    import os as _os
    import time as _time

    open(path + ".started", "w").close()
    deadline = _time.monotonic() + limit_s
    while not _os.path.exists(path) and _time.monotonic() < deadline:
        _time.sleep(0.05)
    return 1


def _start_worker(host: str, bucket_name: str, tmp_path, payload: bytes, time_limit_s: int = 5):
    import covalent as _covalent

    job_id = protocol.make_job_id("feedface", 2, protocol.new_attempt_token())
    storage = clients.storage_client("p", host)
    bucket = storage.create_bucket(bucket_name)
    blob = bucket.blob(protocol.TaskObjects(job_id).task)
    # A short time limit: the worker retries its writes for as long as the task may run (at least 30 s).
    blob.metadata = make_spec(python_version=PYTHON, covalent_version=_covalent.__version__,
                              time_limit_s=time_limit_s).to_metadata()
    blob.upload_from_string(payload)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, protocol.ENV_BUCKET: bucket_name, protocol.ENV_JOB_ID: job_id, "STORAGE_EMULATOR_HOST": host,
           "TMPDIR": str(scratch)}
    worker = subprocess.Popen([sys.executable, "-m", "covalent_gcpbatch_plugin.worker"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    return worker, scratch


def test_outcome_that_cannot_be_stored_exits_with_the_no_retry_code(tmp_path):
    """The bucket goes away while the task runs: the worker says so and exits EXIT_UPLOAD_FAILED,
    which Batch does not retry (the user's code is not re-run for it)."""
    from helpers_emulators import stop_process_group

    gcs, host = _own_gcs_server(tmp_path)
    go = tmp_path / "go"
    try:
        worker, _ = _start_worker(host, "upload-fails", tmp_path, cloudpickle.dumps((_wait_for_file, [str(go)], {})))
        started = time.monotonic()
        while not (tmp_path / "go.started").exists():  # the task runs: the worker is past its download
            assert worker.poll() is None and time.monotonic() - started < 60, worker.communicate()
            time.sleep(0.05)
    finally:
        stop_process_group(gcs)
    go.touch()
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == protocol.EXIT_UPLOAD_FAILED, err.decode()
    assert protocol.EXIT_UPLOAD_FAILED not in protocol.RETRIED_EXIT_CODES
    assert b"could not be stored" in err
    record("worker: the bucket gone for good", "exit 12 (no retry), said why", f"exit {worker.returncode}",
           time.monotonic() - started)


def test_a_storage_outage_as_the_task_ends_does_not_discard_its_result(tmp_path):
    """GCS is unreachable for 40 s just as a task with a 300 s time limit ends: the worker keeps
    retrying its writes for as long as the task may run, and once GCS is back the result is stored
    and the worker exits 0. (Before: it gave up after 30 s, exit 12, the result discarded.)"""
    from helpers_emulators import stop_process_group

    root = tmp_path / "gcs-data"
    root.mkdir()
    gcs, host = _own_gcs_server(tmp_path, root=root)
    port = int(host.rsplit(":", 1)[1])
    go = tmp_path / "go"
    worker = None
    try:
        worker, _ = _start_worker(host, "outage", tmp_path, cloudpickle.dumps((_wait_for_file, [str(go)], {})),
                                  time_limit_s=300)
        started = time.monotonic()
        while not (tmp_path / "go.started").exists():
            assert worker.poll() is None and time.monotonic() - started < 60, worker.communicate()
            time.sleep(0.05)
        stop_process_group(gcs)
        go.touch()  # the task ends now, with GCS down
        outage_ends = time.monotonic() + 40
        while time.monotonic() < outage_ends:  # the outage itself: 40 s, checking the worker keeps trying
            assert worker.poll() is None, worker.communicate()
            time.sleep(0.5)
        gcs, _ = _own_gcs_server(tmp_path, port=port, root=root)
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err.decode()
        bucket = clients.storage_client("p", host).bucket("outage")
        job_id = next(b.name for b in bucket.list_blobs()).split("/")[1]
        assert cloudpickle.loads(bucket.blob(protocol.TaskObjects(job_id).result).download_as_bytes()) == 1
        record("worker: GCS down 40 s as the task ends", "result stored once GCS is back, exit 0",
               f"exit {worker.returncode}, result stored", time.monotonic() - started)
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        stop_process_group(gcs)


def test_sigterm_stops_the_task_and_removes_the_temporary_directory(tmp_path):
    from helpers_emulators import stop_process_group

    gcs, host = _own_gcs_server(tmp_path)
    try:
        worker, scratch = _start_worker(host, "sigterm", tmp_path, cloudpickle.dumps((_wait_for_file, [str(tmp_path / "never")], {})))
        started = time.monotonic()
        while not (tmp_path / "never.started").exists():
            assert worker.poll() is None and time.monotonic() - started < 60, worker.communicate()
            time.sleep(0.05)
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    finally:
        stop_process_group(gcs)
    assert worker.returncode == 128 + signal.SIGTERM, err.decode()
    assert list(scratch.iterdir()) == [], "the worker's temporary directory (which held the task) is gone"
    assert b"stopped by SIGTERM" in err


def test_the_worker_never_replaces_a_result_it_did_not_write(tmp_path):
    """The executor unpickles result.pkl: a result already in the bucket (another writer, or an
    earlier attempt) is left alone, and the worker exits with the no-retry storage code."""
    from helpers_emulators import stop_process_group

    gcs, host = _own_gcs_server(tmp_path)
    try:
        go = tmp_path / "go"
        worker, _ = _start_worker(host, "planted", tmp_path, cloudpickle.dumps((_wait_for_file, [str(go)], {})))
        planted = clients.storage_client("p", host).bucket("planted")
        job_id = [b.name for b in planted.list_blobs()][0].split("/")[1]
        result = planted.blob(protocol.TaskObjects(job_id).result)
        result.upload_from_string(b"planted by someone else")
        go.touch()  # only now may the task finish
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == protocol.EXIT_UPLOAD_FAILED, err.decode()
        assert b"already exists: refusing to replace" in err
        assert result.download_as_bytes() == b"planted by someone else"
    finally:
        stop_process_group(gcs)


def _print_undecodable_and_return() -> str:
    import os as _os

    name = _os.fsdecode(b"report-\xff.csv")
    print(f"file {name} written")
    return "done"


def _raise_with_undecodable_name():
    import os as _os

    name = _os.fsdecode(b"data-\xfe.bin")
    raise FileNotFoundError(f"no such file: {name}")


def test_any_text_is_storable(local_stack):
    """Output and exception messages holding bytes that are not UTF-8 (os.fsdecode gives lone
    surrogates) are stored with those bytes escaped; the outcome is stored and the exit code is the
    task's. (Before: the stdout upload raised UnicodeEncodeError, exit 12, the result never stored;
    such an exception message made the error record unwritable, exit 1, and Batch re-ran the task.)"""
    bucket = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host).bucket(local_stack.bucket_name)
    job_id = protocol.make_job_id("feedface", 3, protocol.new_attempt_token())
    objects = protocol.TaskObjects(job_id)
    started = time.monotonic()
    code, error = run_worker(local_stack, cloudpickle.dumps((_print_undecodable_and_return, [], {})), job_id=job_id)
    assert (code, error) == (0, None)
    assert cloudpickle.loads(bucket.blob(objects.result).download_as_bytes()) == "done"
    assert bucket.blob(objects.stdout(0)).download_as_bytes() == b"file report-\\udcff.csv written\n"

    code, error = run_worker(local_stack, cloudpickle.dumps((_raise_with_undecodable_name, [], {})))
    assert code == protocol.EXIT_TASK_FAILED
    assert error.type == "FileNotFoundError" and error.message == "no such file: data-\\udcfe.bin"
    record("worker: bytes that are not UTF-8 in output / error", "stored escaped; exit 0 / 10",
           "stored escaped; exit 0 / 10", time.monotonic() - started)


def _write_bytes_and_return() -> str:
    import sys as _sys

    _sys.stdout.buffer.write(b"raw \xff\xfe bytes, a split \xc3")
    _sys.stdout.buffer.write(b"\xa9 character\n")
    _sys.stdout.flush()
    return f"{_sys.stdout.encoding}"


def test_bytes_written_to_stdout_buffer_are_captured(local_stack):
    """A task (or a library it calls) writing bytes to sys.stdout.buffer: the soak found the
    worker's captured stdout had no ``buffer``, so the task failed with AttributeError. Now the bytes
    are captured (what is not UTF-8 stored escaped, a character split across writes joined)."""
    bucket = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host).bucket(local_stack.bucket_name)
    job_id = protocol.make_job_id("feedface", 4, protocol.new_attempt_token())
    objects = protocol.TaskObjects(job_id)
    code, error = run_worker(local_stack, cloudpickle.dumps((_write_bytes_and_return, [], {})), job_id=job_id)
    assert (code, error) == (0, None)
    assert cloudpickle.loads(bucket.blob(objects.result).download_as_bytes()) == "utf-8"
    assert bucket.blob(objects.stdout(0)).download_as_bytes() == "raw \\udcff\\udcfe bytes, a split \u00e9 character\n".encode()


@pytest.mark.parametrize("lost", [protocol.RESULT_OBJECT, protocol.STDOUT_OBJECT])
def test_a_write_whose_acknowledgement_was_lost_is_done(local_stack, lost):
    """The worker's upload commits but its answer never arrives (a proxy closes the connection);
    its retry meets 412 on its own object: same bytes, so the write is done and the task
    SUCCEEDS. (Before: exit 12, "already exists: refusing to replace", about a result in the bucket.)"""
    from covalent_gcpbatch_plugin.local.storage_faults import StorageFaultProxy

    bucket = clients.storage_client(local_stack.project_id, local_stack.storage_emulator_host).bucket(local_stack.bucket_name)
    job_id = protocol.make_job_id("feedface", 4, protocol.new_attempt_token())
    objects = protocol.TaskObjects(job_id)
    started = time.monotonic()
    with StorageFaultProxy(local_stack.storage_emulator_host) as proxy:
        proxy.lose_acks(f"{objects.prefix}[^\"]*{lost}", 1)
        code, error = run_worker(local_stack, cloudpickle.dumps((_shout, ["hi"], {})), job_id=job_id, storage_host=proxy.url)
    assert proxy.lost_objects, "the proxy lost an acknowledgement"
    assert (code, error) == (0, None)
    assert cloudpickle.loads(bucket.blob(objects.result).download_as_bytes()) == "HI"
    assert bucket.blob(objects.stdout(0)).download_as_bytes() == b"hi\n"
    record(f"worker: lost acknowledgement on {lost}", "412 on its own bytes is success, exit 0", f"exit {code}",
           time.monotonic() - started)


def _touch(path: str) -> str:
    open(path, "w").close()
    return "ran"


def test_an_electron_past_its_start_deadline_is_not_run(local_stack, tmp_path):
    """Its Covalent server is gone (nobody waits after submit_timeout + queue_timeout) and its job
    waited for a VM until then: the worker writes a not-run record and exits EXIT_TOO_LATE (no
    retry), and the task never runs."""
    ran = tmp_path / "ran"
    started = time.monotonic()
    code, error = run_worker(local_stack, cloudpickle.dumps((_touch, [str(ran)], {})), start_within_s=0.01)
    assert code == protocol.EXIT_TOO_LATE and protocol.EXIT_TOO_LATE not in protocol.RETRIED_EXIT_CODES
    assert error.phase == "worker" and "start deadline passed" in error.message, error.message
    assert not ran.exists(), "the task never ran"
    record("worker: started past the start deadline", "not run, not-run record, exit 14", f"exit {code}, not run",
           time.monotonic() - started)

    code, error = run_worker(local_stack, cloudpickle.dumps((_touch, [str(ran)], {})), start_within_s=600)
    assert (code, error) == (0, None) and ran.exists(), "within its deadline it runs"
