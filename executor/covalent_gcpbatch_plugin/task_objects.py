"""The objects of an electron's attempts in GCS: upload, collect, keep, clean.

One hop's I/O, the way redun's ``scratch.py`` sits beside its client calls: the names are
``protocol.layout``'s (pure), the calls are here, and the executor (gcpbatch.py) decides when each
is made. Every call retries transient errors for a bounded time (``retry``); what must be written
once is written at generation 0 (``clients.create_object``).

Nothing here deletes an outcome Covalent was not handed: a result or error record is the user's
work, kept until the bucket's lifecycle rule removes it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cloudpickle
from covalent._shared_files import logger
from google.api_core import exceptions

from . import clients, localfiles
from .protocol import (
    MAX_WARM_LISTING,
    PACK_METADATA_KEY,
    WARM_PREFIX,
    Claim,
    ErrorRecord,
    JobEvent,
    JobSpec,
    PackManifest,
    PackObjects,
    TaskObjects,
    loads_error,
    live_from,
    loads_not_created,
    objects_of,
    waiting_of_key,
)

app_log = logger.app_log

#: A retry for transient errors; ``within`` bounds it by what is left of a wait's phase.
RetryFor = Callable[..., Any]


def pickle_task(workdir: Path, task: tuple) -> Path:
    """The pickle is the user's code and data: readable by this user only (and removed once
    uploaded, or with the task's directory)."""
    with localfiles.create_file(workdir, "task.pkl") as f:  # new, 0600, never through a link
        cloudpickle.dump(task, f)
    return workdir / "task.pkl"


@dataclass(frozen=True)
class TaskStore:
    """The deployment's two buckets as one electron's attempts use them: ``tasks`` (the function's
    trigger: task objects and pack manifests) and ``data`` (outcomes, output, markers, records)."""

    data: Any  # google.cloud.storage.Bucket
    tasks: Any
    retry: RetryFor
    keep_artifacts: bool = False

    # -- writes ---------------------------------------------------------------------------------

    def upload_task(self, objects: TaskObjects, spec: JobSpec, path: Path, pack_id: str | None = None) -> None:
        """The task object: its spec as metadata (and, in a pack, the pack's id, so that the
        function leaves it to the pack's manifest). Written once (generation 0): a duplicate never
        re-fires the function, and a lost answer is no failure."""
        try:
            clients.create_object(self.tasks, objects.task, path, content_type="application/octet-stream",
                                  metadata=spec.to_metadata() | ({PACK_METADATA_KEY: pack_id} if pack_id else {}),
                                  retry=self.retry())
        finally:
            path.unlink(missing_ok=True)

    def upload_manifest(self, pack_id: str, spec: JobSpec, manifest: PackManifest) -> None:
        """The pack's manifest, whose upload creates its job."""
        clients.create_object(self.tasks, PackObjects(pack_id).manifest, manifest.dumps(), content_type="application/json",
                              metadata=spec.to_metadata(), retry=self.retry())

    def mark_cancelled(self, job_id: str) -> None:
        """The cancel marker, written once: cancel, give-up and stop may each write it within a
        second, and GCS takes about one mutation a second per object (412: it is there already)."""
        try:
            self.data.blob(objects_of(job_id).cancelled).upload_from_string(
                b"", content_type="text/plain", timeout=30, if_generation_match=0, retry=self.retry())
        except exceptions.PreconditionFailed:
            pass

    def ask_for_job(self, objects: TaskObjects) -> None:
        """The cold object (its upload makes the function create the electron's own job): the
        warm VM it was offered to did not claim it in time. Written once; a 412 is an earlier write."""
        try:
            clients.create_object(self.tasks, objects.cold, b"", content_type="text/plain", retry=self.retry())
        except exceptions.PreconditionFailed:
            pass

    # -- reads ----------------------------------------------------------------------------------

    def load_claim(self, objects: TaskObjects) -> Claim | None:
        """Who runs the electron (a warm VM or its own job's worker), if anyone claimed it yet."""
        blob = self.data.get_blob(objects.claim, timeout=30, retry=self.retry())
        return None if blob is None else Claim.loads(blob.download_as_bytes(timeout=30, retry=self.retry()))

    def vms_waiting(self, key: str, now: float, within: float) -> int:
        """How many warm VMs of warm key ``key`` wait for an offer now, as the function's routing
        lists them (their idle records, untaken); transient errors retried ``within`` seconds."""
        names = [blob.name for blob in self.data.list_blobs(prefix=WARM_PREFIX, start_offset=live_from(now),
                                                            max_results=MAX_WARM_LISTING, timeout=within,
                                                            retry=self.retry(within))]
        return len(waiting_of_key(names, key))

    def is_cancelled(self, job_id: str) -> bool:
        return self.data.get_blob(objects_of(job_id).cancelled, timeout=30, retry=self.retry()) is not None

    def not_created(self, job_id: str, within: float | None = None) -> JobEvent | None:
        """The function's record of a task (or pack) it created no job for (refused or cancelled), if any."""
        retry = self.retry(within)
        blob = self.data.get_blob(objects_of(job_id).not_created, timeout=30, retry=retry)
        if blob is None:
            return None
        return loads_not_created(blob.download_as_bytes(timeout=30, retry=retry)).event(job_id)

    def create_delay(self, job_id: str) -> str:
        """What Batch answered the function's create of ``job_id`` (a task's or a pack's) with, if
        it recorded a transient error; for a give-up message, so never raising."""
        try:
            blob = self.data.get_blob(objects_of(job_id).create_delayed, timeout=30, retry=self.retry())
            text = "" if blob is None else blob.download_as_bytes(timeout=30, retry=self.retry()).decode("utf-8", "replace")
        except Exception as err:  # noqa: BLE001 - the give-up message says what it can
            return f" (its create-delay record could not be read: {type(err).__name__})"
        return f"; Batch answered the function's create with {text.strip()}" if text.strip() else ""

    def names(self, objects: TaskObjects) -> set[str]:
        return {blob.name for blob in self.data.list_blobs(prefix=objects.prefix, timeout=30, retry=self.retry())}

    def print_output(self, objects: TaskObjects, stdout: IO[str], stderr: IO[str]) -> None:
        """The last attempt's stdout and stderr, printed to Covalent's streams. The task's own
        bytes: what is not UTF-8 shows escaped, never fails the task."""
        last = objects.last_attempt(self.names(objects))
        if last is None:
            return
        for name, stream in ((objects.stdout(last), stdout), (objects.stderr(last), stderr)):
            blob = self.data.get_blob(name, timeout=30, retry=self.retry())
            if blob is not None:
                print(blob.download_as_bytes(timeout=60, retry=self.retry()).decode("utf-8", errors="backslashreplace"),
                      end="", file=stream)

    def has_result(self, objects: TaskObjects) -> bool:
        return self.data.get_blob(objects.result, timeout=30, retry=self.retry()) is not None

    def load_result(self, objects: TaskObjects, workdir: Path) -> tuple[bool, Any]:
        """(True, the result) if the worker stored one, else (False, None). On disk first (a result
        may be large), in a file this process created (new, 0600, never through a link) and reads
        back through the same descriptor: nobody can swap it."""
        blob = self.data.get_blob(objects.result, timeout=30, retry=self.retry())
        if blob is None:
            return False, None
        with localfiles.create_file(workdir, "result.pkl") as f:
            blob.download_to_file(f, timeout=60, retry=self.retry())
            f.seek(0)
            return True, cloudpickle.load(f)

    def load_error(self, objects: TaskObjects) -> ErrorRecord | None:
        """The worker's record of the task's own exception, if it stored one."""
        blob = self.data.get_blob(objects.error, timeout=30, retry=self.retry())
        return None if blob is None else loads_error(blob.download_as_bytes(timeout=30, retry=self.retry()))

    def stored_outcome(self, objects: TaskObjects) -> str:
        """For the message of a task that failed after its worker may have stored its outcome:
        where the kept result or error record is, and how to read it ("" if none is stored)."""
        bucket = self.data.name
        try:
            names = self.names(objects)
        except Exception as err:  # noqa: BLE001 - the message says what is known
            return f"; its objects under gs://{bucket}/{objects.prefix} are kept (they could not be listed: {type(err).__name__})"
        if objects.result in names:
            return (f"; its result is stored and kept at gs://{bucket}/{objects.result}: fetch it with "
                    f"`gcloud storage cp gs://{bucket}/{objects.result} .` and load it with cloudpickle "
                    "where the modules it needs are installed")
        if objects.error in names:
            return f"; its error record is kept at gs://{bucket}/{objects.error}"
        return ""

    # -- clean-up -------------------------------------------------------------------------------

    def clean_up(self, attempts: Iterable[TaskObjects], workdir: Path, delivered: TaskObjects | None,
                 replaced: Iterable[TaskObjects] = ()) -> None:
        """Remove the electron's local files and its attempts' bucket files, best effort. An
        attempt's result or error record that Covalent was not handed (it is not ``delivered``)
        is never removed, nor is the rest of that attempt's prefix: it is the user's work, and the
        node's error says where it is. An attempt ``replaced`` by a next one has no result (one
        with a result is never followed by another: attempts.py) and its error record (out of
        memory) was acted on: it goes. Cancel markers stay (the bucket's lifecycle rule removes
        them): a create retry or a redelivered event may come later."""
        replaced = list(replaced)
        shutil.rmtree(workdir, ignore_errors=True)
        if self.keep_artifacts:
            return
        for objects in attempts:
            try:
                blobs = [blob.name for blob in self.data.list_blobs(prefix=objects.prefix, timeout=30, retry=self.retry())]
                outcome_kept = objects.result in blobs or (objects.error in blobs and objects not in replaced)
                if objects != delivered and outcome_kept:
                    app_log.warning(f"gcpbatch: kept gs://{self.data.name}/{objects.prefix}: its outcome was not handed to Covalent")
                    continue
                gone = [name for name in blobs if objects.disposable(name) or (objects in replaced and name == objects.error)]
                self.delete_all(self.data, gone)
                if self.tasks.name != self.data.name:
                    self.delete_all(self.tasks, [objects.task])
            except Exception as err:  # noqa: BLE001 - clean-up never hides the task's outcome
                app_log.warning(f"gcpbatch: could not delete gs://{self.data.name}/{objects.prefix}: {type(err).__name__}: {err}")

    def remove_pack(self, pack_id: str) -> None:
        """A finished pack's manifest, and the function's records of a delayed (or refused) create,
        as a task's are removed with it."""
        if self.keep_artifacts:
            return
        objects = PackObjects(pack_id)
        self.delete_all(self.tasks, [objects.manifest])
        self.delete_all(self.data, [objects.create_delayed, objects.not_created])

    def delete_all(self, bucket, names: list[str]) -> None:
        for name in names:
            try:
                bucket.delete_blob(name, timeout=30, retry=self.retry())
            except exceptions.NotFound:
                pass
