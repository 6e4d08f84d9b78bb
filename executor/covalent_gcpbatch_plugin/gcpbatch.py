"""GCPBatchExecutor: runs Covalent tasks as Google Cloud Batch jobs, event-driven.

Lifecycle of one task (``run``):
  1. choose the job id and hand it to Covalent as the job handle;
  2. register the job id with the process's Pub/Sub subscriber (events.py), BEFORE uploading;
  3. upload the pickled task to GCS with its job spec as object metadata (the Cloud Function
     creates the Batch job from that metadata; see functions/main.py);
  4. wait for the job's terminal state from Pub/Sub, reconciling with one ``get_job`` only when an
     expected notification is overdue (the decisions: waiting.py); give up (and cancel the job) at a bound;
  5. read the result, or the error record, and the task's stdout/stderr back from GCS.

With packing on (``pack_window``), step 3 waits up to the window for other electrons of the same
job spec: together they are uploaded as one pack, one Batch job with a task each (packing.py), and
each waits for its own task from step 4 on.

Its settings are declared once, in settings.py; its errors in errors.py.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal  # Literal: the constructor's annotations

import cloudpickle
from covalent._shared_files import logger
from covalent._shared_files.config import get_config
from covalent._shared_files.exceptions import TaskCancelledError, TaskRuntimeError
from covalent._shared_files.util_classes import RESULT_STATUS
from covalent.executor.base import AsyncBaseExecutor
from covalent.executor.schemas import TaskUpdate
from google.api_core import exceptions

from . import clients, localfiles, packing, settings, usage
from .errors import ConfigError, GCPBatchError  # noqa: F401 - ConfigError re-exported: users catch it from here
from .protocol import (
    JOB_ID_PATTERN,
    PACK_METADATA_KEY,
    JobEvent,
    JobSpec,
    JobState,
    PackManifest,
    PackObjects,
    TaskObjects,
    objects_of,
    job_console_url,
    state_name,
    job_name,
    loads_error,
    loads_not_created,
    make_job_id,
    make_pack_id,
    member_event,
    new_attempt_token,
    task_name,
)
from .waiting import (
    GIVE_UP,
    CancelRequested,
    Inboxes,
    JobWait,
    Outcome,
    PackEvent,
    WaitPlan,
    explain_job_failure,
    give_up_reason,
)

app_log = logger.app_log

EXECUTOR_PLUGIN_NAME = "GCPBatchExecutor"

#: Covalent merges these into [executors.gcpbatch]; every key is declared once, in settings.py.
_EXECUTOR_PLUGIN_DEFAULTS = settings.PLUGIN_DEFAULTS
#: `covalent deploy up gcpbatch` validates its options against these two models (infra.py).
ExecutorPluginDefaults = settings.ExecutorPluginDefaults


def __getattr__(name: str):
    # Loaded on first use only: infra.py needs pydantic-settings (deployment.py), which the worker
    # image (where every `import covalent` loads this module) does not have.
    if name == "ExecutorInfraDefaults":
        from .infra import ExecutorInfraDefaults

        return ExecutorInfraDefaults
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: cancel() reaches a waiting run() of this process through its inbox.
_waiting = Inboxes()
#: The packs of this process: which run() calls share one (per event loop), and who is in which.
_packer: packing.Packer[PackMember] = packing.Packer()
_packs = packing.PackRegistry()


@dataclass(frozen=True)
class PackMember:
    """An electron waiting to be packed: its id, its spec and its pickled task on local disk."""

    job_id: str
    spec: JobSpec
    pickle: Path


@dataclass
class Step:
    """What ``run()`` is doing, for the message of a failure nobody foresaw, and whether Covalent
    has been handed the task's stored outcome (only then may its objects be removed)."""

    now: str
    delivered: bool = False


class GCPBatchExecutor(AsyncBaseExecutor):
    """Run each electron as a Google Cloud Batch job; see the README for every setting."""

    # The header is generated from settings.py (`python -m covalent_gcpbatch_plugin.settings constructor`;
    # a test keeps it equal): 0.15's positional order, every newer key keyword-only, None = "from the config".
    def __init__(
        self,
        bucket_name: str | None = None,
        container_image_uri: str | None = None,
        service_account_email: str | None = None,
        project_id: str | None = None,
        region: str | None = None,
        vcpus: float | None = None,
        memory: int | None = None,
        time_limit: int | None = None,
        poll_freq: float | None = None,
        retries: int | None = None,
        cache_dir: str | None = None,
        *,
        wait_mode: Literal["events", "poll"] | None = None,
        pubsub_topic: str | None = None,
        submit_timeout: float | None = None,
        queue_timeout: float | None = None,
        reconcile_interval: float | None = None,
        pack_window: float | None = None,
        pack_parallelism: int | None = None,
        keep_artifacts: bool | None = None,
        machine_type: str | None = None,
        provisioning: Literal["STANDARD", "SPOT"] | None = None,
        accelerator_type: str | None = None,
        accelerator_count: int | None = None,
        install_gpu_drivers: bool | None = None,
        boot_disk_size_gb: int | None = None,
        labels: dict[str, str] | None = None,
        network: str | None = None,
        subnetwork: str | None = None,
        no_external_ip: bool | None = None,
        allowed_locations: list[str] | tuple[str, ...] | None = None,
        gcs_volumes: dict[str, str | dict[str, Any]] | None = None,
        secrets: dict[str, str] | None = None,
        task_bucket_name: str | None = None,
        pubsub_emulator_host: str | None = None,
        storage_emulator_host: str | None = None,
        batch_api_endpoint: str | None = None,
        **kwargs: Any,
    ) -> None:
        given = {key: value for key, value in locals().items() if key in settings.SETTING_KEYS}
        # `is None`, never `or`: an explicit 0 or False must not be replaced by the config value.
        values = {key: given[key] if given[key] is not None else _configured(key) for key in settings.SETTING_KEYS}
        checked = settings.validate(values)
        super().__init__(cache_dir=checked.cache_dir, time_limit=checked.time_limit, retries=checked.retries, **kwargs)
        # Attributes in JSON form: Covalent ships the executor to its server as to_dict() (JSON).
        for key, value in checked.model_dump(mode="json").items():
            setattr(self, key, value)

    # -- Covalent's lifecycle ------------------------------------------------------------------

    async def run(self, function: Callable, args: list, kwargs: dict, task_metadata: dict) -> Any:
        self._check_required()
        dispatch_id, node_id = task_metadata["dispatch_id"], int(task_metadata["node_id"])
        job_id = make_job_id(dispatch_id, node_id, new_attempt_token())
        objects = TaskObjects(job_id)
        await self.set_job_handle(job_id)
        if await self.get_cancel_requested():
            raise TaskCancelledError(f"task {dispatch_id}:{node_id} was cancelled before it was submitted")

        try:
            # Private to this user (localfiles.py): a task's pickles are its code, data and result.
            workdir = localfiles.private_dir(self.cache_dir) / job_id
        except ConfigError as err:
            self._fail(f"task {dispatch_id}:{node_id} was not submitted: {err}")
        step = Step("preparing the task")
        ended = False  # the task (not just this wait) is over: Batch said it succeeded or failed
        try:
            outcome = await self._submit_and_wait(job_id, objects, workdir, (function, args, kwargs), task_metadata, step)
            ended = not outcome.gave_up and outcome.state in (JobState.SUCCEEDED, JobState.FAILED)
            step.now = "reading the task's outcome from the bucket"
            return await asyncio.to_thread(self._collect, job_id, objects, outcome, workdir, step)
        except (TaskCancelledError, TaskRuntimeError):
            raise
        except asyncio.CancelledError:
            # The server is abandoning the task (shutdown): the job must not run on unattended.
            await asyncio.shield(self._stop_job(job_id))
            raise
        except Exception as err:  # noqa: BLE001 - every other failure is explained, and its job stopped
            await asyncio.shield(self._stop_job(job_id))
            kept = await asyncio.shield(asyncio.to_thread(self._stored_outcome, objects))
            self._fail(
                f"task {dispatch_id}:{node_id} failed while {step.now} (Batch job {job_id}): "
                f"{type(err).__name__}: {err}; the job, if it was created, was cancelled{kept}"
            )
        finally:
            await asyncio.shield(asyncio.to_thread(self._clean_up, objects, workdir, step.delivered))
            settled = _packs.settle(job_id, abandoned=not ended)
            if settled is not None and settled.last:
                await asyncio.shield(asyncio.to_thread(self._pack_over, settled))

    async def _submit_and_wait(self, job_id: str, objects: TaskObjects, workdir: Path, task: tuple,
                               task_metadata: dict, step: Step) -> Outcome:
        """Register for the job's events, upload the task, wait for the job to end."""
        spec = self._job_spec(task_metadata["dispatch_id"], int(task_metadata["node_id"]), await self.get_version_info())
        events = None
        inbox: asyncio.Queue = asyncio.Queue()
        try:
            if self.wait_mode == "events":
                step.now = f"subscribing to the job notifications of topic {self.pubsub_topic!r}"
                events = self._job_events()
                inbox = await asyncio.to_thread(events.register, job_id, asyncio.get_running_loop())
            _waiting.register(job_id, asyncio.get_running_loop(), inbox)
            step.now = f"uploading the task to gs://{self._task_bucket().name}/{objects.task}"
            if self.pack_window > 0:
                pickle = await asyncio.to_thread(self._pickle_task, workdir, task)
                placement = await _packer.join(packing.pack_key(spec, self.__dict__), PackMember(job_id, spec, pickle),
                                               window=self.pack_window,
                                               submit=lambda members: self._submit_pack(members, events))
            else:
                await asyncio.to_thread(self._upload_task, objects, spec, workdir, task)
                placement = packing.ALONE
            if placement.packed:
                app_log.info(f"gcpbatch: task runs as task {placement.index} of Batch job "
                             f"{self._job_name(placement.pack_id)}: {self._job_link(placement.pack_id)}")
            else:
                app_log.info(f"gcpbatch: task runs as Batch job {self._job_name(job_id)}: {self._job_link(job_id)}")
            step.now = "waiting for the Batch job"
            return await self._wait(job_id, inbox, listening=events is not None, plan=self._wait_plan(spec, placement))
        finally:
            _waiting.unregister(job_id)
            if events is not None:
                events.unregister(job_id)

    async def receive(self, task_group_metadata: dict, data: Any) -> list[TaskUpdate]:
        """Covalent's runner calls this with ``data`` None for tasks cancelled before they were
        handed to the executor: they end CANCELLED, and nothing was submitted for them."""
        dispatch_id, node_ids = task_group_metadata["dispatch_id"], task_group_metadata["node_ids"]
        if data is not None:
            raise GCPBatchError(
                f"GCPBatchExecutor runs tasks through run(), not send/poll/receive; it cannot receive "
                f"results for {dispatch_id}:{node_ids} (got {type(data).__name__})"
            )
        app_log.debug(f"gcpbatch: {dispatch_id}:{node_ids} cancelled before submission")
        return [TaskUpdate(dispatch_id=dispatch_id, node_id=node_id, status=RESULT_STATUS.CANCELLED, assets={})
                for node_id in node_ids]

    async def cancel(self, task_metadata: dict, job_handle: Any) -> bool:
        """Cancel the task's job wherever it is. The marker object comes first: if the function
        has not created the job yet, it sees the marker and creates nothing.

        Without a job handle the task has not reached ``run()``'s upload: nothing to cancel here
        (False), and ``run()`` sees the cancel request before it uploads.
        """
        job_id = "" if job_handle is None else str(job_handle)
        if not JOB_ID_PATTERN.fullmatch(job_id):
            app_log.info(
                f"gcpbatch: nothing to cancel for task {task_metadata.get('dispatch_id')}:{task_metadata.get('node_id')}: "
                f"it has no Batch job handle yet ({job_handle!r}); it will not be submitted"
            )
            return False
        await asyncio.to_thread(self._mark_cancelled, job_id)
        await asyncio.to_thread(self._cancel_job, job_id)
        _waiting.put(job_id, CancelRequested(job_id))
        return True

    async def _stop_job(self, job_id: str) -> None:
        """Best effort, for paths that are already failing: mark the task cancelled and cancel its
        job, each tried even if the other fails (GCS may be what failed), logging what went wrong."""
        for step in (self._mark_cancelled, self._cancel_job):
            try:
                await asyncio.to_thread(step, job_id)
            except Exception as err:  # noqa: BLE001 - the caller's failure is the one to report
                app_log.warning(f"gcpbatch: stopping job {job_id}: {step.__name__} failed: {type(err).__name__}: {err}")

    def _mark_cancelled(self, job_id: str) -> None:
        """The cancel marker, written once: cancel, give-up and stop may each write it within a
        second, and GCS takes about one mutation a second per object (412: it is there already)."""
        try:
            self._bucket().blob(objects_of(job_id).cancelled).upload_from_string(
                b"", content_type="text/plain", timeout=30, if_generation_match=0, retry=self._retry())
        except exceptions.PreconditionFailed:
            pass

    def _cancel_job(self, job_id: str) -> None:
        if _packs.placement(job_id).packed:
            return  # one task of a pack: its worker honours the marker; the pack's job goes on
        try:
            # A cancel applies once however often it is sent: transient errors are retried too.
            self._batch().cancel_job(name=self._job_name(job_id), timeout=30, retry=self._retry())
        except exceptions.NotFound:
            app_log.debug(f"gcpbatch: cancel of {job_id}: no such job (yet); the marker stops its creation")
        except exceptions.FailedPrecondition as err:
            app_log.debug(f"gcpbatch: cancel of {job_id}: {err.message} (already over)")

    def _pack_over(self, settled: packing.Settled) -> None:
        """No electron of the pack waits any more. If one stopped waiting before its task ended
        (cancelled, given up on), the job may still run work nobody waits for: it is cancelled (the
        marker first, as for a task) and its manifest stays for the workers it may still start (the
        bucket's lifecycle rule removes it). Otherwise every task has ended: the job's VM time is
        logged (once Batch has it ended) and the pack's objects removed."""
        pack_id = settled.pack_id
        if self.wait_mode == "events":
            self._job_events().unregister_pack(pack_id)
        try:
            if settled.abandoned:
                self._mark_cancelled(pack_id)
                self._cancel_job(pack_id)
                app_log.info(f"gcpbatch: cancelled pack {pack_id}: none of its electrons is waited for any more")
                return
            job = self._get_job(pack_id)
            if JobState.of(job.status.state).is_terminal:
                self._log_usage(job)
            if not self.keep_artifacts:
                objects = PackObjects(pack_id)
                self._delete_all(self._task_bucket(), [objects.manifest])
                # The function's records of a delayed (or refused) create, as a task's are removed with it.
                self._delete_all(self._bucket(), [objects.create_delayed, objects.not_created])
        except Exception as err:  # noqa: BLE001 - every electron already has its outcome
            app_log.warning(f"gcpbatch: closing pack {pack_id}: {type(err).__name__}: {err}")

    # -- steps ---------------------------------------------------------------------------------

    def _check_required(self) -> None:
        settings.check_required(self.__dict__)

    def _job_spec(self, dispatch_id: str, node_id: int, versions: dict) -> JobSpec:
        python = ".".join(str(versions["python"]).split(".")[:2])
        return JobSpec(
            dispatch_id=dispatch_id,
            node_id=node_id,
            project_id=self.project_id,
            region=self.region,
            container_image_uri=self.container_image_uri,
            service_account_email=self.service_account_email or None,
            vcpus=self.vcpus,
            memory_mb=self.memory,
            time_limit_s=self.time_limit,
            retries=self.retries,
            python_version=python,
            covalent_version=str(versions["covalent"]),
            start_within_s=float(self.submit_timeout + self.queue_timeout),
            options=settings.job_options(self.__dict__),
        )

    def _upload_task(self, objects: TaskObjects, spec: JobSpec, workdir: Path, task: tuple) -> None:
        self._upload_pickle(objects, spec, self._pickle_task(workdir, task))

    @staticmethod
    def _pickle_task(workdir: Path, task: tuple) -> Path:
        """The pickle is the user's code and data: readable by this user only (and removed once
        uploaded, or with the task's directory)."""
        with localfiles.create_file(workdir, "task.pkl") as f:  # new, 0600, never through a link
            cloudpickle.dump(task, f)
        return workdir / "task.pkl"

    def _upload_pickle(self, objects: TaskObjects, spec: JobSpec, path: Path, pack_id: str | None = None) -> None:
        """Upload the task object: its spec as metadata (and, in a pack, the pack's id, so the
        function leaves it to the pack's manifest)."""
        try:
            # Written once (generation 0): a duplicate never re-fires the function; a lost answer is no failure.
            clients.create_object(self._task_bucket(), objects.task, path, content_type="application/octet-stream",
                                  metadata=spec.to_metadata() | ({PACK_METADATA_KEY: pack_id} if pack_id else {}),
                                  retry=self._retry())
        finally:
            path.unlink(missing_ok=True)

    async def _submit_pack(self, members: list[PackMember], events) -> list[packing.Placement]:
        """Submit what the packer collected: a lone electron as its own job; several as a pack,
        their task objects first, routed before the manifest (whose upload creates the job)."""
        if len(members) == 1:
            member = members[0]
            await asyncio.to_thread(self._upload_pickle, TaskObjects(member.job_id), member.spec, member.pickle)
            return [packing.ALONE]
        first = members[0].spec
        pack_id = make_pack_id(first.dispatch_id, new_attempt_token())
        ids = tuple(member.job_id for member in members)
        manifest = PackManifest(members=ids, parallelism=self.pack_parallelism)
        placements = _packs.add(pack_id, ids)
        if events is not None:
            events.register_pack(pack_id, ids)
        limit = asyncio.Semaphore(UPLOAD_CONCURRENCY)

        async def upload(member: PackMember) -> None:
            async with limit:
                await asyncio.to_thread(self._upload_pickle, TaskObjects(member.job_id), member.spec, member.pickle, pack_id)

        await asyncio.gather(*(upload(member) for member in members))
        await asyncio.to_thread(self._upload_manifest, pack_id, first, manifest)
        app_log.debug(f"gcpbatch: uploaded pack {pack_id} of {len(ids)} electrons")
        return placements

    def _upload_manifest(self, pack_id: str, spec: JobSpec, manifest: PackManifest) -> None:
        clients.create_object(self._task_bucket(), PackObjects(pack_id).manifest, manifest.dumps(), content_type="application/json",
                              metadata=spec.to_metadata(), retry=self._retry())

    def _wait_plan(self, spec: JobSpec | None = None, placement: packing.Placement = packing.ALONE) -> WaitPlan:
        # Imported here: jobs.py needs google-cloud-batch, which the worker image (where `import
        # covalent` loads this module) does not have.
        from .jobs import has_gpus

        return WaitPlan.for_task(submit_timeout=self.submit_timeout, queue_timeout=self.queue_timeout,
                                 time_limit=self.time_limit, retries=self.retries,
                                 reconcile_interval=self.reconcile_interval,
                                 gpus=spec is not None and has_gpus(spec.options),
                                 pack_index=placement.index if placement.packed else None,
                                 pack_parallelism=self.pack_parallelism)

    async def _wait(self, job_id: str, inbox: asyncio.Queue, *, listening: bool, plan: WaitPlan) -> Outcome:
        """Until the job ends or a phase bound passes (the decisions: waiting.JobWait). Listening
        (events mode), Pub/Sub pushes events into ``inbox``; otherwise (poll mode) the job is read
        every poll_freq seconds. Either way ``cancel()`` wakes the wait through ``inbox``."""
        loop = asyncio.get_running_loop()
        wait = JobWait(plan, listening=listening, poll_interval=self.poll_freq, now=loop.time())
        while True:
            try:
                item = await asyncio.wait_for(inbox.get(), wait.timeout(loop.time()))
                if isinstance(item, PackEvent):
                    # The pack's job moved: it exists (the electron is queued at least); once it has
                    # ended, the electron's own task says how the electron did.
                    if item.event.state.is_terminal:
                        item = await asyncio.to_thread(self._reconcile, job_id, within=wait.left(loop.time()))
                    else:
                        if item.event.state is JobState.RUNNING:
                            wait.pack_progressing(loop.time())
                        item = JobEvent(job_id, JobState.QUEUED, item.event.detail)
                elif isinstance(item, JobEvent) and item.state.is_terminal:
                    item = await asyncio.to_thread(self._confirm_terminal, item)
            except asyncio.TimeoutError:
                wait.silence()
                item = await asyncio.to_thread(self._reconcile, job_id, within=wait.left(loop.time()))
            if isinstance(item, CancelRequested):
                settled = wait.cancel_requested()
                if settled is None and _packs.placement(job_id).packed:
                    # Batch cannot cancel one task: the worker sees the marker and stops (or skips) it.
                    settled = Outcome(JobState.CANCELLED, "cancelled; its task in the pack stops on its own")
                if settled is not None:
                    return settled
                continue
            decision = wait.observe(item, loop.time())
            if isinstance(decision, Outcome):
                return decision
            if decision == GIVE_UP:
                if wait.awaits_pack() and await asyncio.to_thread(self._pack_running, job_id):
                    wait.pack_progressing(loop.time())  # its RUNNING message was lost: once, from now
                    continue
                return await self._give_up(job_id, wait.state, plan, pack_progress=wait.pack_progress is not None)
            if item is not None and not wait.cancel_sent and await self.get_cancel_requested():
                # Cancelled while the function was creating the job: cancel it now that it exists.
                await asyncio.to_thread(self._cancel_job, job_id)
                wait.cancel_sent = True

    def _confirm_terminal(self, event: JobEvent) -> JobEvent | None:
        """Pub/Sub does not say who published a message, and more than Batch can publish to the
        topic (any job's account can); Batch itself may say FAILED of a task attempt it is about to
        retry, or UNEXECUTED of a task it has yet to run. So a message that would settle the
        electron is confirmed with one read (get_job, or get_task in a pack) first: a SUCCEEDED
        before result.pkl is unpickled (a job SUCCEEDED only if its worker wrote result.pkl itself,
        generation 0), a FAILED or CANCELLED before the electron fails. What Batch says replaces
        the message when they differ. The same read gives the job's VM time, logged."""
        confirmed = self._reconcile(event.job_id, log_usage=event.state is JobState.SUCCEEDED)
        if confirmed is None or confirmed.state is not event.state:
            app_log.warning(f"gcpbatch: ignored a {event.state.value} message for {event.job_id}: Batch says "
                            f"{confirmed.state.value if confirmed else 'there is no such job'}")
            return confirmed
        return event

    def _reconcile(self, job_id: str, *, log_usage: bool = False, within: float | None = None) -> JobEvent | None:
        """One read of the job's state: a notification is overdue. None if the job does not exist.
        An electron of a pack reads its own task instead. ``within``: what is left of the wait's
        phase, which transient errors are retried for (at least ``MIN_RETRY_S``)."""
        placement = _packs.placement(job_id)
        if placement.packed:
            return self._reconcile_member(job_id, placement, within)
        try:
            job = self._get_job(job_id, within)
        except exceptions.NotFound:
            return self._not_created(job_id, within)
        state = JobState.of(job.status.state)
        if log_usage and state is JobState.SUCCEEDED:
            self._log_usage(job)
        app_log.debug(f"gcpbatch: reconciled {job_id}: {state.value}")
        return JobEvent(job_id, state, "reconciled by get_job")

    def _reconcile_member(self, job_id: str, placement: packing.Placement, within: float | None = None) -> JobEvent | None:
        """One get_task of the electron's task in its pack (None: the pack's job does not exist yet).
        Batch creates a job's tasks after the job, sometimes minutes after, and a job may end
        without ever having had them: a task not found is read from its pack's job."""
        try:
            task = self._batch().get_task(name=task_name(self._job_name(placement.pack_id), placement.index), timeout=30,
                                          retry=self._retry(within))
        except exceptions.NotFound:
            return self._member_without_task(job_id, placement, within)
        event = member_event(job_id, state_name(task.status.state), "reconciled by get_task")
        app_log.debug(f"gcpbatch: reconciled {job_id} (task {placement.index} of {placement.pack_id}): "
                      f"{event.state.value if event else state_name(task.status.state)}")
        return event

    def _member_without_task(self, job_id: str, placement: packing.Placement, within: float | None) -> JobEvent | None:
        """The electron's task does not exist (yet): its pack's job says what that means. No job:
        not created (yet, or refused); a job still going: queued; a job over: the electron's end
        too (a job that ended without creating the task never ran it)."""
        try:
            job = self._get_job(placement.pack_id, within)
        except exceptions.NotFound:
            refused = self._not_created(placement.pack_id, within)
            return None if refused is None else JobEvent(job_id, refused.state, refused.detail)
        state = JobState.of(job.status.state)
        if not state.is_terminal:
            return JobEvent(job_id, JobState.QUEUED, f"its pack's job {placement.pack_id} is {state.value}; its task is not created yet")
        ended = JobState.FAILED if state is JobState.SUCCEEDED else state  # a job cannot succeed without it
        return JobEvent(job_id, ended, f"its pack's job {placement.pack_id} ended {state.value} without creating its task")

    def _pack_running(self, job_id: str) -> bool:
        """Whether the electron's pack's job runs (some of its tasks do): read once, before an
        electron queued in it gives up."""
        pack_id = _packs.placement(job_id).pack_id
        if pack_id is None:
            return False
        try:
            job = self._get_job(pack_id, self.MIN_RETRY_S)
        except exceptions.GoogleAPICallError as err:
            app_log.warning(f"gcpbatch: reading pack {pack_id} before giving up on {job_id}: {err.message}")
            return False
        return JobState.of(job.status.state) is JobState.RUNNING

    def _not_created(self, job_id: str, within: float | None = None) -> JobEvent | None:
        """The function's record of a task (or pack) it created no job for (refused or cancelled), if any."""
        retry = self._retry(within)
        blob = self._bucket().get_blob(objects_of(job_id).not_created, timeout=30, retry=retry)
        if blob is None:
            return None
        return loads_not_created(blob.download_as_bytes(timeout=30, retry=retry)).event(job_id)

    def _create_delay(self, job_id: str) -> str:
        """What Batch answered the function's create with, if it recorded a transient error."""
        pack_id = _packs.placement(job_id).pack_id
        name = objects_of(pack_id or job_id).create_delayed
        try:
            blob = self._bucket().get_blob(name, timeout=30, retry=self._retry())
            text = "" if blob is None else blob.download_as_bytes(timeout=30, retry=self._retry()).decode("utf-8", "replace")
        except Exception as err:  # noqa: BLE001 - the give-up message says what it can
            return f" (its create-delay record could not be read: {type(err).__name__})"
        return f"; Batch answered the function's create with {text.strip()}" if text.strip() else ""

    async def _give_up(self, job_id: str, state: JobState | None, plan: WaitPlan, *, pack_progress: bool = False) -> Outcome:
        if await self.get_cancel_requested():
            # The user cancelled it (e.g. before its job existed, so no CANCELLED event came): that
            # is the outcome, not the bound we hit waiting.
            await self.cancel({}, job_id)
            return Outcome(JobState.CANCELLED, "cancelled before the job reached a terminal state")
        reason = give_up_reason(job_id, state, plan, time_limit=self.time_limit, retries=self.retries,
                                pack_progress=pack_progress, task_bucket=self._task_bucket().name)
        if state is None:
            reason += await asyncio.to_thread(self._create_delay, job_id)
        await self.cancel({}, job_id)
        return Outcome(JobState.FAILED, gave_up=reason + "; the job was cancelled")

    def _collect(self, job_id: str, objects: TaskObjects, outcome: Outcome, workdir: Path, step: Step) -> Any:
        """The task's result (or its error record, raised), its output printed to Covalent's
        streams; ``step.delivered`` once Covalent is handed the stored outcome itself."""
        if outcome.gave_up:
            self._fail(outcome.gave_up)
        if outcome.state is JobState.REJECTED:
            self._fail(f"the deployment refused the task: {outcome.detail}")
        if outcome.state is JobState.CANCELLED:
            placement = _packs.placement(job_id)
            if not placement.packed:
                raise TaskCancelledError(f"Batch job {job_id} was cancelled")
            # Cancelled (its marker), or its task never ran (UNEXECUTED): cancelled only if its
            # pack's job was; a job that failed first (no VM to be had...) fails the electron.
            marked = self._bucket().get_blob(objects.cancelled, timeout=30, retry=self._retry()) is not None
            why = None if marked else self._why_unexecuted(placement)
            if why is None:
                raise TaskCancelledError(f"task {placement.index} of Batch job {placement.pack_id} was cancelled")
            self._fail(why)
        bucket, retry = self._bucket(), self._retry()
        last = objects.last_attempt(blob.name for blob in bucket.list_blobs(prefix=objects.prefix, timeout=30, retry=retry))
        if last is not None:
            for name, stream in ((objects.stdout(last), self.task_stdout), (objects.stderr(last), self.task_stderr)):
                blob = bucket.get_blob(name, timeout=30, retry=retry)
                if blob is not None:
                    # The task's own bytes: what is not UTF-8 shows escaped, never fails the task.
                    text = blob.download_as_bytes(timeout=60, retry=retry).decode("utf-8", errors="backslashreplace")
                    print(text, end="", file=stream)
        if outcome.state is JobState.SUCCEEDED:
            blob = bucket.get_blob(objects.result, timeout=30, retry=retry)
            if blob is not None:
                # On disk (a result may be large), in a file this process created (new, 0600, never
                # through a link) and reads back through the same descriptor: nobody can swap it.
                with localfiles.create_file(workdir, "result.pkl") as f:
                    blob.download_to_file(f, timeout=60, retry=retry)
                    f.seek(0)
                    result = cloudpickle.load(f)
                step.delivered = True
                return result
        error = bucket.get_blob(objects.error, timeout=30, retry=retry)
        if error is not None:
            record = loads_error(error.download_as_bytes(timeout=30, retry=retry))
            if record.traceback:
                print(record.traceback, end="", file=self.task_stderr)
            step.delivered = True
            raise TaskRuntimeError(f"{record.type}: {record.message}")
        if bucket.get_blob(objects.cancelled, timeout=30, retry=retry) is not None:
            # Ended without an outcome after its cancel (its worker honoured the marker): the
            # task's FAILED message may reach the wait before cancel()'s own wake-up does.
            raise TaskCancelledError(f"Batch job {job_id} was cancelled")
        self._fail(self._explain_failure(job_id, outcome.state))

    def _why_unexecuted(self, placement: packing.Placement) -> str | None:
        """Why an electron's task in a pack never ran: None if the pack's job was cancelled, else
        the job's state and status events."""
        job = self._get_job(placement.pack_id)
        state = JobState.of(job.status.state)
        if state in (JobState.CANCELLED, JobState.CANCELLATION_IN_PROGRESS):
            return None
        self._log_usage(job)
        return (f"task {placement.index} of Batch job {placement.pack_id} never ran: "
                + explain_job_failure(placement.pack_id, state, job))

    def _fail(self, message: str) -> None:
        """Covalent keeps a failed node's stderr, not the exception's message: write it there too."""
        print(f"GCPBatchExecutor: {message}", file=self.task_stderr)
        raise TaskRuntimeError(message)

    def _explain_failure(self, job_id: str, state: JobState) -> str:
        """Why a job ended without an error record (killed, preempted, out of memory, image pull...)."""
        placement = _packs.placement(job_id)
        if placement.packed:
            name = task_name(self._job_name(placement.pack_id), placement.index)
            try:
                task = self._batch().get_task(name=name, timeout=30, retry=self._retry())
            except exceptions.NotFound:  # the job ended without creating it (no VM to be had...)
                return self._why_unexecuted(placement) or f"task {placement.index} of Batch job {placement.pack_id} was cancelled"
            except exceptions.GoogleAPICallError as err:
                return f"Batch task {name} ended {state.value} without a result or error record ({err.message})"
            return explain_job_failure(f"{placement.pack_id} task {placement.index}", state, task)
        try:
            job = self._get_job(job_id)
        except exceptions.GoogleAPICallError as err:
            return f"Batch job {job_id} ended {state.value} without a result or error record ({err.message})"
        self._log_usage(job)
        return explain_job_failure(job_id, state, job)

    def _log_usage(self, job) -> None:
        """The job's VM time and an on-demand estimate (usage.py), once, when it has ended."""
        try:
            app_log.info(f"gcpbatch: {usage.summary(usage.usage_of(job))}")
        except Exception as err:  # noqa: BLE001 - a report, never the task's outcome
            app_log.debug(f"gcpbatch: no usage for {job.name}: {err!r}")

    def _job_link(self, job_id: str) -> str:
        if self.batch_api_endpoint:
            return f"local Batch service {self.batch_api_endpoint}"
        return job_console_url(self.project_id, self.region, job_id)

    def _stored_outcome(self, objects: TaskObjects) -> str:
        """For the message of a task that failed after its worker may have stored its outcome:
        where the kept result or error record is, and how to read it ("" if none is stored)."""
        try:
            names = {blob.name for blob in self._bucket().list_blobs(prefix=objects.prefix, timeout=30, retry=self._retry())}
        except Exception as err:  # noqa: BLE001 - the message says what is known
            return (f"; its objects under gs://{self.bucket_name}/{objects.prefix} are kept (they could not be listed: "
                    f"{type(err).__name__})")
        if objects.result in names:
            return (f"; its result is stored and kept at gs://{self.bucket_name}/{objects.result}: fetch it with "
                    f"`gcloud storage cp gs://{self.bucket_name}/{objects.result} .` and load it with cloudpickle "
                    "where the modules it needs are installed")
        if objects.error in names:
            return f"; its error record is kept at gs://{self.bucket_name}/{objects.error}"
        return ""

    def _clean_up(self, objects: TaskObjects, workdir: Path, delivered: bool) -> None:
        """Remove the task's local and bucket files, best effort. A result or error record that
        Covalent was not handed (``delivered`` False) is never removed: it is the user's work, and
        the node's error says where it is. The cancel marker stays (the bucket's lifecycle rule
        removes it): a create retry or a redelivered event may come later."""
        shutil.rmtree(workdir, ignore_errors=True)
        if self.keep_artifacts:
            return
        bucket, tasks = self._bucket(), self._task_bucket()
        try:
            blobs = list(bucket.list_blobs(prefix=objects.prefix, timeout=30, retry=self._retry()))
            if not delivered and {objects.result, objects.error} & {blob.name for blob in blobs}:
                app_log.warning(f"gcpbatch: kept gs://{self.bucket_name}/{objects.prefix}: its outcome was not handed to Covalent")
                return
            self._delete_all(bucket, [blob.name for blob in blobs if objects.disposable(blob.name)])
            if tasks.name != bucket.name:
                self._delete_all(tasks, [objects.task])
        except Exception as err:  # noqa: BLE001 - clean-up never hides the task's outcome
            app_log.warning(f"gcpbatch: could not delete gs://{self.bucket_name}/{objects.prefix}: {type(err).__name__}: {err}")

    def _delete_all(self, bucket, names: list[str]) -> None:
        for name in names:
            try:
                bucket.delete_blob(name, timeout=30, retry=self._retry())
            except exceptions.NotFound:
                pass

    # -- clients (lazy: Covalent rebuilds the executor from its attributes inside its server) --

    def _job_name(self, job_id: str) -> str:
        return job_name(self.project_id, self.region, job_id)

    def _get_job(self, job_id: str, within: float | None = None):
        """One get_job of a job of this executor's (a task's or a pack's), transient errors retried
        (``within``: what is left of a wait's phase, as for ``_retry``)."""
        return self._batch().get_job(name=self._job_name(job_id), timeout=30, retry=self._retry(within))

    #: How long one call (a read, a cancel, a delete, a write made once) retries transient errors
    #: (clients.TRANSIENT_ERRORS) before its error is the answer. A read made while waiting retries
    #: for what is left of the wait's phase instead (at least MIN_RETRY_S), so the phase's bound
    #: holds.
    RETRY_S = 120.0
    MIN_RETRY_S = 10.0

    def _retry(self, within: float | None = None):
        bound = self.RETRY_S if within is None else min(self.RETRY_S, max(self.MIN_RETRY_S, within))
        return clients.transient_retry(bound)

    def _job_events(self):
        """The process's subscriber to this executor's notification topic (events.py). Imported here:
        `import covalent` loads every executor plugin in every process, the worker's too, and
        google-cloud-pubsub costs 0.15 s there and a package in the image."""
        from .events import Endpoint, job_events

        return job_events(Endpoint(self.project_id, self.pubsub_topic, self.pubsub_emulator_host or None))

    def _batch(self):
        return _cached_client("batch", self.batch_api_endpoint, lambda: clients.batch_client(self.batch_api_endpoint or None))

    def _bucket(self):
        client = _cached_client(
            "storage",
            (self.project_id, self.storage_emulator_host),
            lambda: clients.storage_client(self.project_id, self.storage_emulator_host or None),
        )
        return client.bucket(self.bucket_name)

    def _task_bucket(self):
        """Where task objects and pack manifests go: the function's trigger bucket."""
        return self._bucket().client.bucket(self.task_bucket_name or self.bucket_name)


#: Task objects of one pack uploaded at once (each upload is a thread).
UPLOAD_CONCURRENCY = 16

_clients: dict[tuple, Any] = {}


def _cached_client(kind: str, key: Any, make: Callable[[], Any]) -> Any:
    """Clients are thread-safe and costly to build: one per kind and endpoint per process."""
    client = _clients.get((kind, key))
    if client is None:
        client = _clients[(kind, key)] = make()
    return client


def _configured(key: str) -> Any:
    try:
        return get_config(f"executors.gcpbatch.{key}")
    except KeyError:
        return _EXECUTOR_PLUGIN_DEFAULTS[key]


GCPBatchExecutor.__doc__ = f"{GCPBatchExecutor.__doc__}\n\n{settings.parameters_doc()}\n"
