"""The worker: what the container runs for one Batch task.

Downloads ``task.pkl`` (Covalent's wrapped callable, so DepsPip/DepsBash/call_before hooks run
here), runs it, and writes back to GCS, all before exiting so the job's terminal state implies its
objects exist:

* attempt-<N>/live/stdout-<seq>.log, ...: what the task printed so far, every LIVE_INTERVAL_S
  while it runs (``covalent-gcpbatch logs --follow`` reads them);
* result.pkl on success, exit 0;
* error.json (type, message, traceback) on failure, exit EXIT_TASK_FAILED if the task raised and
  EXIT_WORKER_ERROR if it could not be run at all (any exception of the worker's own included);
  Batch retries neither (only ``RETRIED_EXIT_CODES``, its infrastructure failures);
* then attempt-<N>/stdout.log, attempt-<N>/stderr.log: the task's output (its last OUTPUT_LIMIT
  characters, whatever bytes it printed, the ones that are not UTF-8 escaped), one pair per
  attempt (also echoed to the container's own streams, which Batch sends to Cloud Logging);
* every object only if none of its name exists (it never replaces anything), retrying transient
  errors for as long as the task may still run (its time limit), a lost acknowledgement included;
* if the outcome cannot be written, exit EXIT_UPLOAD_FAILED (not retried either: the user's code
  is never re-run because its outcome could not be stored), saying why on the container's stderr;
  output that cannot be written once the outcome is stored is only reported there.

On SIGTERM (cancel, preemption, max run duration) the worker stops the task, removes its
temporary directory and exits 143, as a process killed by SIGTERM would.

In a pack (GCPBATCH_PACK_ID instead of GCPBATCH_JOB_ID) the worker runs the electron its
BATCH_TASK_INDEX names in the pack's manifest. Batch cannot cancel one task of a job, so the
worker honours the electron's cancel marker itself: present at the start, the electron is skipped;
seen while it runs (checked every CANCEL_CHECK_S), it is stopped; either way exit EXIT_CANCELLED.

A lone electron's job whose VM is kept warm (GCPBATCH_WARM_SUBSCRIPTION set) is warm_worker.py's:
this electron, then the next ones offered to the VM, each in a fresh child.

Run as ``python -m covalent_gcpbatch_plugin.worker`` with GCPBATCH_BUCKET and GCPBATCH_JOB_ID (or
GCPBATCH_PACK_ID) set.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import io
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import TextIO

import cloudpickle
from google.api_core.exceptions import PreconditionFailed

from . import clients
from .errors import SpecError, WorkerError
from .protocol import (
    ENV_BUCKET,
    ENV_TASK_BUCKET,
    ENV_JOB_ID,
    ENV_JOB_UID,
    ENV_PACK_ID,
    ENV_RETRY_ATTEMPT,
    ENV_TASK_INDEX,
    ENV_WARM_SUBSCRIPTION,
    EXIT_CANCELLED,
    EXIT_TASK_FAILED,
    EXIT_TOO_LATE,
    EXIT_UPLOAD_FAILED,
    EXIT_WORKER_ERROR,
    ErrorRecord,
    OUTCOME_ATTEMPT_KEY,
    OUTCOME_JOB_UID_KEY,
    PACK_METADATA_KEY,
    JobSpec,
    PackManifest,
    PackObjects,
    TaskObjects,
    dumps_error,
    loads_error,
)


#: Each write of the task's outcome retries transient errors for as long as the task may still run
#: (Batch stops it at its time limit), and at least this long; past it the worker gives up with
#: EXIT_UPLOAD_FAILED rather than hang the VM.
STORE_TIMEOUT_S = 30.0


class StoreBudget:
    """How long the outcome's writes may retry: until the task's time limit (from its spec, once
    read), counted from the worker's start, and at least ``STORE_TIMEOUT_S``."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.time_limit_s = 0.0

    def retry(self):
        remaining = self.started + self.time_limit_s - time.monotonic()
        return clients.transient_retry(max(STORE_TIMEOUT_S, remaining))


def storable(text: str) -> bytes:
    """Text as UTF-8, whatever it holds: lone surrogates (bytes that were not UTF-8, as
    ``os.fsdecode`` gives them) are written escaped (``\\udcff``), never refused."""
    return text.encode("utf-8", errors="backslashreplace")


def _clean(text: str) -> str:
    return storable(text).decode("utf-8")

#: What a process killed by SIGTERM exits with (128 + 15); Batch records it as the exit code.
EXIT_TERMINATED = 128 + signal.SIGTERM


#: How often an electron of a pack checks its cancel marker while it runs (a cancel stops it
#: within this plus the SIGTERM's unwinding: well inside 10 s).
CANCEL_CHECK_S = 3.0


class TooLate(Exception):
    """The electron's start deadline passed before its worker started: it is not run."""


class ElectronCancelled(Exception):
    """In a pack: the electron was cancelled (its marker exists) before its task could be loaded;
    the executor may already have removed its objects. Nothing is written."""


class Terminated(BaseException):
    """SIGTERM arrived: unwind (so temporary files go) instead of reporting a task failure."""


def _raise_terminated(signum: int, _frame) -> None:
    raise Terminated(signum)


#: What the worker keeps of each stream: the last OUTPUT_LIMIT characters (what was cut is said).
OUTPUT_LIMIT = 8 * 1024 * 1024
#: While the task runs, what it printed is uploaded every LIVE_INTERVAL_S seconds as a new object
#: (the worker's account cannot replace one), until LIVE_LIMIT characters per stream; after that
#: only the final log (its tail) is written.
LIVE_INTERVAL_S = 2.0
LIVE_LIMIT = 1024 * 1024
LIVE_TIMEOUT_S = 10.0


class Tee(io.TextIOBase):
    """Captures what the task prints (its last ``limit`` characters) while passing it through to
    the container's stream. Thread-safe: the live uploader reads while the task writes."""

    def __init__(self, passthrough: TextIO, limit: int = OUTPUT_LIMIT) -> None:
        self.passthrough = passthrough
        self.limit = limit
        self._parts: collections.deque[str] = collections.deque()
        self._kept = 0
        self.written = 0  # characters ever written
        self._lock = threading.Lock()
        self._buffer: TeeBytes | None = None

    def write(self, text: str) -> int:
        with self._lock:
            self._parts.append(text)
            self._kept += len(text)
            self.written += len(text)
            while self._kept - len(self._parts[0]) >= self.limit:
                self._kept -= len(self._parts.popleft())
        self.passthrough.write(text)
        return len(text)

    def flush(self) -> None:
        self.passthrough.flush()

    @property
    def encoding(self) -> str:
        return "utf-8"

    @property
    def errors(self) -> str:
        return "surrogateescape"

    @property
    def buffer(self) -> "TeeBytes":
        """What ``sys.stdout.buffer`` is to a task: bytes written there are captured too."""
        if self._buffer is None:
            self._buffer = TeeBytes(self)
        return self._buffer

    def since(self, position: int) -> tuple[str, int]:
        """(what was written after ``position`` and is still kept, the new position)."""
        with self._lock:
            kept = "".join(self._parts)
            first = self.written - len(kept)
            return kept[max(0, position - first):], self.written

    def getvalue(self) -> str:
        with self._lock:
            kept = "".join(self._parts)
            cut = self.written - len(kept)
        if cut <= 0:
            return kept
        tail = kept[-self.limit :]
        return f"[covalent-gcpbatch: the first {self.written - len(tail)} characters of this output were cut]\n{tail}"


class TeeBytes(io.BufferedIOBase):
    """A Tee's binary side (``sys.stdout.buffer``): tasks and libraries write bytes there. They are
    decoded as UTF-8, what is not UTF-8 kept as lone surrogates (stored escaped, as ``storable``
    does), a character split across two writes joined again."""

    def __init__(self, tee: Tee) -> None:
        super().__init__()
        self.tee = tee
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self.tee.write(self._decoder.decode(data))
        return len(data)

    def flush(self) -> None:
        self.tee.flush()


class LiveOutput(threading.Thread):
    """Uploads what the task prints while it runs (``TaskObjects.live_chunk``), every
    ``interval`` seconds, each chunk a new object, at most ``limit`` characters per stream. Best
    effort: a failed upload stops it (the final log is still written), the task never waits on it."""

    def __init__(self, bucket, objects: TaskObjects, attempt: int, streams: dict[str, Tee],
                 interval: float = LIVE_INTERVAL_S, limit: int = LIVE_LIMIT) -> None:
        super().__init__(name="live-output", daemon=True)
        self.bucket, self.objects, self.attempt, self.streams = bucket, objects, attempt, streams
        self.interval, self.limit = interval, limit
        self.done = threading.Event()
        self.uploaded = {name: 0 for name in streams}
        self._positions = {name: 0 for name in streams}
        self._seq = {name: 0 for name in streams}

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.upload_new()
            except Exception as err:  # noqa: BLE001 - live output is a convenience, never the task's failure
                print(f"covalent-gcpbatch worker: live output stopped: {type(err).__name__}: {err}", file=sys.__stderr__)
                return

    def upload_new(self) -> None:
        for name, tee in self.streams.items():
            if self.uploaded[name] >= self.limit:
                continue
            text, self._positions[name] = tee.since(self._positions[name])
            if not text:
                continue
            text = text[: self.limit - self.uploaded[name]]
            self._seq[name] += 1
            blob = self.bucket.blob(self.objects.live_chunk(self.attempt, name, self._seq[name]))
            blob.upload_from_string(storable(text), content_type="text/plain; charset=utf-8", if_generation_match=0,
                                    timeout=LIVE_TIMEOUT_S)
            self.uploaded[name] += len(text)

    def stop(self) -> None:
        self.done.set()
        self.join(LIVE_TIMEOUT_S + 1)


class CancelWatch(threading.Thread):
    """In a pack: every ``interval`` seconds, whether the electron's cancel marker exists; once it
    does, SIGTERM to this process (the task unwinds as on any stop) and ``cancelled`` is set."""

    def __init__(self, bucket, objects: TaskObjects, interval: float = CANCEL_CHECK_S) -> None:
        super().__init__(name="cancel-watch", daemon=True)
        self.bucket, self.objects, self.interval = bucket, objects, interval
        self.done = threading.Event()
        self.cancelled = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                marked = self.bucket.blob(self.objects.cancelled).exists(timeout=LIVE_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - a failed check is retried; the task goes on
                print(f"covalent-gcpbatch worker: cancel check failed: {type(err).__name__}: {err}", file=sys.__stderr__)
                continue
            if marked and not self.done.is_set():
                self.cancelled.set()
                os.kill(os.getpid(), signal.SIGTERM)
                return


def electron_of_task(bucket) -> tuple[TaskObjects, str | None]:
    """(this task's electron, its pack id or None). A lone electron's job names it; a pack's task
    finds it in the pack's manifest (in ``bucket``, the task bucket) at its BATCH_TASK_INDEX."""
    pack_id = os.environ.get(ENV_PACK_ID, "")
    if not pack_id:
        return TaskObjects(os.environ[ENV_JOB_ID]), None
    manifest_name = PackObjects(pack_id).manifest
    blob = bucket.get_blob(manifest_name)
    if blob is None:
        raise WorkerError(f"pack manifest gs://{bucket.name}/{manifest_name} does not exist")
    try:
        manifest = PackManifest.loads(blob.download_as_bytes())
    except SpecError as err:
        raise WorkerError(f"gs://{bucket.name}/{manifest_name}: {err}") from None
    index = os.environ.get(ENV_TASK_INDEX, "")
    if not index.isdigit() or int(index) >= len(manifest.members):
        raise WorkerError(f"{ENV_TASK_INDEX}={index!r} names no electron of pack {pack_id} ({len(manifest.members)} tasks)")
    return TaskObjects(manifest.members[int(index)]), pack_id


def running_versions() -> tuple[str, str]:
    import covalent

    return f"{sys.version_info.major}.{sys.version_info.minor}", covalent.__version__


def check_versions(spec: JobSpec, python: str, covalent_version: str) -> None:
    """Unpickling across Python minor versions or Covalent versions fails in obscure ways: refuse."""
    if (spec.python_version, spec.covalent_version) != (python, covalent_version):
        raise WorkerError(
            f"version mismatch: the task was dispatched from Python {spec.python_version} with covalent "
            f"{spec.covalent_version}, but this worker image has Python {python} with covalent {covalent_version}; "
            "build the worker image with the dispatching environment's versions "
            "(worker_image/Dockerfile build args PYTHON_VERSION and COVALENT_VERSION)"
        )


def check_start_deadline(spec: JobSpec, created) -> None:
    """Refuse (TooLate) an electron starting after ``spec.start_within_s`` from its task object's
    creation, by GCS's clock (``created``: the object's timeCreated)."""
    if spec.start_within_s is None or created is None:
        return
    late = time.time() - created.timestamp() - spec.start_within_s
    if late > 0:
        raise TooLate(f"the electron's start deadline passed {late:.0f} s ago (it had to start within "
                      f"{spec.start_within_s:g} s of its upload: submit_timeout + queue_timeout, by when its executor "
                      "had stopped waiting): not run")


def error_record(exc: BaseException, phase: str) -> ErrorRecord:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return ErrorRecord(
        type=_clean(name),
        message=_clean(str(exc)),
        traceback=_clean("".join(traceback.TracebackException.from_exception(exc).format())),
        phase=phase,  # type: ignore[arg-type]
    )


def load_task(bucket, objects: TaskObjects, workdir: Path, pack_id: str | None = None, budget: StoreBudget | None = None):
    """(function, args, kwargs) of the task, after checking the spec's versions against ours (and,
    in a pack, that the task object belongs to it); ``budget`` learns the task's time limit."""
    blob = bucket.get_blob(objects.task)
    if blob is None:
        raise WorkerError(f"task object gs://{bucket.name}/{objects.task} does not exist")
    if pack_id is not None and (blob.metadata or {}).get(PACK_METADATA_KEY) != pack_id:
        raise WorkerError(f"task object gs://{bucket.name}/{objects.task} does not belong to pack {pack_id}")
    try:
        spec = JobSpec.from_metadata(blob.metadata)
    except SpecError as err:
        raise WorkerError(str(err)) from None
    if budget is not None:
        budget.time_limit_s = spec.time_limit_s
    check_start_deadline(spec, blob.time_created)
    check_versions(spec, *running_versions())
    path = workdir / "task.pkl"
    blob.download_to_filename(path)
    try:
        with path.open("rb") as f:
            function, args, kwargs = cloudpickle.load(f)
    except Exception as err:
        raise WorkerError(f"task object gs://{bucket.name}/{objects.task} is not a readable task pickle: {err!r}") from err
    finally:
        path.unlink(missing_ok=True)
    return function, args, kwargs


def stored_by_this_job(bucket, objects: TaskObjects) -> tuple[int, str] | None:
    """(the exit code it stands for, the attempt that wrote it) of an outcome that an earlier
    attempt of this job stored, or None: Batch retries an attempt whose VM died after the write
    and before the attempt was recorded, and the task must not run twice. Only an outcome tagged
    with this job's UID counts; anything else is another writer's (refused when storing)."""
    uid = os.environ.get(ENV_JOB_UID, "")
    if not uid or attempt() == 0:  # a first attempt has no earlier one: no reads on every task's start
        return None
    retry = clients.transient_retry(STORE_TIMEOUT_S)
    for name in (objects.result, objects.error):
        blob = bucket.get_blob(name, retry=retry, timeout=60)
        if blob is None or (blob.metadata or {}).get(OUTCOME_JOB_UID_KEY) != uid:
            continue
        code = 0
        if name == objects.error:
            record = loads_error(blob.download_as_bytes(retry=retry, timeout=60))
            code = EXIT_TASK_FAILED if record.phase == "task" else EXIT_WORKER_ERROR
        return code, (blob.metadata or {}).get(OUTCOME_ATTEMPT_KEY, "?")
    return None


def run(bucket, objects: TaskObjects, workdir: Path, pack_id: str | None = None, task_bucket=None) -> int:
    """Run the electron whose task object is in ``task_bucket`` (default ``bucket``); its outputs
    go to ``bucket``."""
    earlier = stored_by_this_job(bucket, objects)
    if earlier is not None:
        code, by = earlier
        print(f"covalent-gcpbatch worker: attempt {attempt()}: attempt {by} of this job stored the task's outcome "
              f"already (exit {code}); not running the task again", file=sys.stderr)
        return code
    budget = StoreBudget()
    stdout, stderr = Tee(sys.stdout), Tee(sys.stderr)
    outcome: tuple[str, bytes | Path] | None = None
    exit_code = 0
    live = LiveOutput(bucket, objects, attempt(), {"stdout": stdout, "stderr": stderr})
    try:
        try:
            function, args, kwargs = load_task(task_bucket or bucket, objects, workdir, pack_id, budget)
        except Exception:
            # A cancel races the load: the executor removes a cancelled electron's objects.
            if pack_id is not None and bucket.blob(objects.cancelled).exists(timeout=LIVE_TIMEOUT_S):
                raise ElectronCancelled(objects.job_id) from None
            raise
        live.start()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                result = function(*args, **kwargs)
            except Terminated:
                raise
            except BaseException as exc:  # noqa: BLE001 - the task's failure is reported, not raised
                record = error_record(exc, "task")
                outcome, exit_code = (objects.error, dumps_error(record)), EXIT_TASK_FAILED
            finally:
                live.done.set()
        if exit_code:
            # To the container's log only; the executor appends it to Covalent's stderr once.
            print(record.traceback, end="", file=stderr.passthrough)
        if outcome is None:
            result_path = workdir / "result.pkl"
            with result_path.open("wb") as f:
                cloudpickle.dump(result, f)
            outcome = (objects.result, result_path)
    except ElectronCancelled:
        raise
    except TooLate as exc:
        print(f"covalent-gcpbatch worker: {exc}", file=stderr)
        outcome, exit_code = (objects.error, dumps_error(error_record(exc, "worker"))), EXIT_TOO_LATE
    except WorkerError as exc:
        print(f"covalent-gcpbatch worker: {exc}", file=stderr)
        outcome, exit_code = (objects.error, dumps_error(error_record(exc, "worker"))), EXIT_WORKER_ERROR
    except Exception as exc:  # noqa: BLE001 - anything else the worker hits is a worker error
        print(f"covalent-gcpbatch worker: {exc!r}", file=stderr)
        outcome, exit_code = (objects.error, dumps_error(error_record(exc, "worker"))), EXIT_WORKER_ERROR

    if live.ident is not None:
        live.stop()  # before the final log: nothing live is written after it
    try:
        store_outcome(bucket, objects, outcome, budget.retry())
    except Exception as exc:  # noqa: BLE001 - any failure to store is the same failure for the user
        print(
            f"covalent-gcpbatch worker: the task ended (exit code {exit_code}) but its outcome could not be "
            f"stored in gs://{bucket.name}/{objects.prefix}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_UPLOAD_FAILED
    try:
        store_output(bucket, objects, stdout.getvalue(), stderr.getvalue(), budget.retry())
    except PreconditionFailed:
        # Another writer's object where this attempt's output goes: its output cannot be shown as
        # the task's. Refused as any foreign object is (the outcome stays stored, and kept).
        print(f"covalent-gcpbatch worker: gs://{bucket.name}/{objects.prefix}: this attempt's output exists already and "
              "this worker did not write it; refusing to replace it", file=sys.stderr)
        return EXIT_UPLOAD_FAILED
    except Exception as exc:  # noqa: BLE001 - the outcome is stored: output is reported, not the task's failure
        print(f"covalent-gcpbatch worker: the task's output could not be stored in gs://{bucket.name}/{objects.prefix} "
              f"(its outcome is): {type(exc).__name__}: {exc}", file=sys.stderr)
    return exit_code


def attempt() -> int:
    """This attempt's number (Batch's BATCH_TASK_RETRY_ATTEMPT; 0 if unset)."""
    value = os.environ.get(ENV_RETRY_ATTEMPT, "0")
    return int(value) if value.isdigit() else 0


def store_outcome(bucket, objects: TaskObjects, outcome: tuple[str, bytes | Path], retry) -> None:
    """The result or error record, first: it is the user's work, the output only its account.

    Every object is written only if none of its name exists (generation 0): the worker's account
    may create objects, never replace them, and the executor unpickles the result, so the worker
    never replaces one it did not write (``clients.create_object``: a 412 on a write of its own
    whose answer was lost is success)."""
    name, payload = outcome
    content_type = "application/octet-stream" if isinstance(payload, Path) else "application/json"
    uid = os.environ.get(ENV_JOB_UID, "")
    tag = {OUTCOME_JOB_UID_KEY: uid, OUTCOME_ATTEMPT_KEY: str(attempt())} if uid else None
    try:
        clients.create_object(bucket, name, payload, content_type=content_type, retry=retry, metadata=tag)
    except PreconditionFailed:
        raise WorkerError(f"gs://{bucket.name}/{name} already exists: refusing to replace an outcome this worker did "
                          "not write (another writer in the bucket, or an earlier attempt of this task)") from None


def store_output(bucket, objects: TaskObjects, stdout: str, stderr: str, retry) -> None:
    """This attempt's stdout and stderr, each its own object, bad bytes escaped (``storable``)."""
    number = attempt()
    for name, text in ((objects.stdout(number), stdout), (objects.stderr(number), stderr)):
        clients.create_object(bucket, name, storable(text), content_type="text/plain; charset=utf-8", retry=retry)


def main() -> int:
    missing = [name for name in (ENV_BUCKET,) if not os.environ.get(name)]
    if not (os.environ.get(ENV_JOB_ID) or os.environ.get(ENV_PACK_ID)):
        missing.append(ENV_JOB_ID)
    if missing:
        print(f"covalent-gcpbatch worker: {', '.join(missing)} not set; the Batch job sets them", file=sys.stderr)
        return EXIT_WORKER_ERROR
    signal.signal(signal.SIGTERM, _raise_terminated)
    for stream in (sys.stdout, sys.stderr):  # the container's log takes any text the task prints
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        client = clients.storage_client(project=None)
        bucket = client.bucket(os.environ[ENV_BUCKET])
        task_bucket = client.bucket(os.environ.get(ENV_TASK_BUCKET) or os.environ[ENV_BUCKET])
    except Exception as exc:  # noqa: BLE001 - nothing of the worker's may end in an exit code Batch retries
        print(f"covalent-gcpbatch worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_WORKER_ERROR
    if os.environ.get(ENV_WARM_SUBSCRIPTION) and not os.environ.get(ENV_PACK_ID):
        from . import warm_worker  # imports Pub/Sub: only a job whose VM is kept warm needs it

        try:
            return warm_worker.serve(bucket, task_bucket, TaskObjects(os.environ[ENV_JOB_ID]))
        except Terminated:
            print("covalent-gcpbatch worker: stopped by SIGTERM (cancel, preemption or time limit)", file=sys.stderr)
            return EXIT_TERMINATED
    return run_electron(bucket, task_bucket)


def run_electron(bucket, task_bucket, objects: TaskObjects | None = None, *, watch_cancel: bool = False) -> int:
    """Run one electron: ``objects``' (a warm VM's child), or this task's (``electron_of_task``).
    Its cancel marker is watched in a pack, or with ``watch_cancel`` (Batch cannot cancel one
    task of a job, nor one electron of a warm VM)."""
    watch: CancelWatch | None = None
    pack_id: str | None = None
    try:
        if objects is None:
            try:
                objects, pack_id = electron_of_task(task_bucket)
            except WorkerError as err:  # no electron to write an error record for: the job's log says it
                print(f"covalent-gcpbatch worker: {err}", file=sys.stderr)
                return EXIT_WORKER_ERROR
        if pack_id is not None or watch_cancel:
            if bucket.blob(objects.cancelled).exists(timeout=LIVE_TIMEOUT_S):
                print(f"covalent-gcpbatch worker: {objects.job_id} was cancelled; skipped", file=sys.stderr)
                return EXIT_CANCELLED
            watch = CancelWatch(bucket, objects)
            watch.start()
        with tempfile.TemporaryDirectory(prefix="gcpbatch-worker-") as workdir:
            return run(bucket, objects, Path(workdir), pack_id, task_bucket)
    except ElectronCancelled:
        print("covalent-gcpbatch worker: the electron was cancelled before it started", file=sys.stderr)
        return EXIT_CANCELLED
    except Terminated:
        if watch is not None and watch.cancelled.is_set():
            print("covalent-gcpbatch worker: stopped: the electron was cancelled", file=sys.stderr)
            return EXIT_CANCELLED
        print("covalent-gcpbatch worker: stopped by SIGTERM (cancel, preemption or time limit)", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:  # noqa: BLE001 - nothing of the worker's may end in an exit code Batch retries
        print(f"covalent-gcpbatch worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        if objects is not None:
            try:
                store_outcome(bucket, objects, (objects.error, dumps_error(error_record(exc, "worker"))),
                              clients.transient_retry(STORE_TIMEOUT_S))
            except Exception as err:  # noqa: BLE001 - the container's log has said it
                print(f"covalent-gcpbatch worker: its error record could not be stored: {err!r}", file=sys.stderr)
        return EXIT_WORKER_ERROR
    finally:
        if watch is not None:
            watch.done.set()


def exit_now(code: int) -> None:
    """Exit with ``code`` once ``main()`` has returned: everything is stored and the temporary
    directory is gone, so the interpreter's teardown (finalising covalent's modules, about 0.2 s
    here) is skipped rather than paid by every task."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
