"""GCPBatchExecutor: runs Covalent tasks as Google Cloud Batch jobs, event-driven.

This module is Covalent's lifecycle only; the hops it drives have modules of their own: the
task's objects in GCS (task_objects.py), the Batch calls (batch_calls.py), the decisions of a
wait (waiting.py) and of an attempt's end (attempts.py), packing (packing.py).

Lifecycle of one electron (``run``), as one or more attempts, each its own Batch job:
  1. choose the attempt's job id and hand it to Covalent as the job handle;
  2. register the job id with the process's Pub/Sub subscriber (events.py), BEFORE uploading;
  3. upload the pickled task to GCS with its job spec as object metadata (the Cloud Function
     creates the Batch job from that metadata; see functions/main.py);
  4. wait for the job's terminal state from Pub/Sub, reconciling with one ``get_job`` only when an
     expected notification is overdue (waiting.py); give up (and cancel the job) at a bound;
  5. decide what the attempt's end means (attempts.py): most often the electron's outcome, or a
     next attempt on other terms (a standard VM after Spot preemptions, more memory after an
     out-of-memory end), from step 1 again;
  6. read the result, or the error record, and the task's stdout/stderr back from GCS.

With packing on (``pack_window``), an electron's first attempt waits in step 3 up to the window
for other electrons of the same job spec: together they are uploaded as one pack, one Batch job
with a task each (packing.py), and each waits for its own task from step 4 on.

Its settings are declared once, in settings.py; its errors in errors.py.
"""

from __future__ import annotations

import asyncio
import collections
import time
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal  # Literal: the constructor's annotations

from covalent._shared_files import logger
from covalent._shared_files.config import get_config
from covalent._shared_files.exceptions import TaskCancelledError, TaskRuntimeError
from covalent._shared_files.util_classes import RESULT_STATUS
from covalent.executor.base import AsyncBaseExecutor
from covalent.executor.schemas import TaskUpdate
from google.api_core import exceptions as api_exceptions

from . import attempts as attempt_rules
from . import clients, localfiles, packing, settings
from .attempts import AttemptEnd, NextAttempt
from .batch_calls import BatchJobs, log_usage_of, usage_line
from .errors import ConfigError, GCPBatchError  # noqa: F401 - ConfigError re-exported: users catch it from here
from .protocol import (
    JOB_ID_PATTERN,
    ElectronEvent,
    JobEvent,
    JobSpec,
    JobState,
    PackManifest,
    TaskEvent,
    TaskObjects,
    job_console_url,
    job_name,
    make_job_id,
    make_pack_id,
    new_attempt_token,
    warm_key,
)
from .task_objects import TaskStore, pickle_task
from .waiting import (
    GIVE_UP,
    CancelRequested,
    Inboxes,
    JobWait,
    Outcome,
    PackEvent,
    QueuedJob,
    RunnerEvent,
    WaitPlan,
    WarmWatch,
    give_up_reason,
    never_placeable,
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
_warm_takers = packing.WarmTakers()
#: Seconds the listing of waiting warm VMs may take, retries included: a hint, not worth a wait
#: longer than the pack window it may save.
WARM_HINT_S = 5.0


@dataclass(frozen=True)
class PackMember:
    """An electron waiting to be packed: its id, its spec and its pickled task on local disk."""

    job_id: str
    spec: JobSpec
    pickle: Path


@dataclass
class Step:
    """What ``run()`` is doing, for the message of a failure nobody foresaw, and the attempt whose
    stored outcome Covalent has been handed (only its outcome may be removed with its objects)."""

    now: str
    delivered: TaskObjects | None = None


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
        spot_fallback: int | None = None,
        spot_wait_s: float | None = None,
        memory_retry_factor: float | None = None,
        wait_mode: Literal["events", "poll"] | None = None,
        pubsub_topic: str | None = None,
        submit_timeout: float | None = None,
        queue_timeout: float | None = None,
        reconcile_interval: float | None = None,
        pack_window: float | None = None,
        pack_parallelism: int | None = None,
        keep_artifacts: bool | None = None,
        machine_type: str | None = None,
        provisioning: Literal["STANDARD", "SPOT", "FLEX_START"] | None = None,
        reservation: str | None = None,
        accelerator_type: str | None = None,
        accelerator_count: int | None = None,
        install_gpu_drivers: bool | None = None,
        boot_disk_size_gb: int | None = None,
        boot_disk_type: Literal["", "pd-balanced", "pd-ssd", "hyperdisk-balanced"] | None = None,
        scratch_disk_gb: int | None = None,
        scratch_disk_type: Literal["local-ssd", "pd-balanced", "pd-ssd", "hyperdisk-balanced"] | None = None,
        labels: dict[str, str] | None = None,
        network: str | None = None,
        subnetwork: str | None = None,
        no_external_ip: bool | None = None,
        allowed_locations: list[str] | tuple[str, ...] | None = None,
        image_streaming: bool | None = None,
        keep_warm: int | None = None,
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
        electron = (dispatch_id, node_id)
        policy = self._attempt_policy()
        terms = policy.first(self.provisioning, self.memory)
        first_id = make_job_id(dispatch_id, node_id, new_attempt_token())
        try:
            # Private to this user (localfiles.py): a task's pickles are its code, data and result.
            workdir = localfiles.private_dir(self.cache_dir) / first_id
        except ConfigError as err:
            self._fail(f"task {dispatch_id}:{node_id} was not submitted: {err}")
        step = Step("preparing the task")
        done: list[AttemptEnd] = []  # the attempts before the current one
        attempts: list[TaskObjects] = []
        replaced: list[TaskObjects] = []  # attempts a next one followed: no result, an error record at most
        job_id, ended = first_id, False  # ended: the attempt (not just this wait) is over
        versions = None
        try:
            while True:
                objects = TaskObjects(job_id)
                attempts.append(objects)
                _electrons.begin(electron, job_id)
                await self.set_job_handle(job_id)
                if await self.get_cancel_requested():
                    raise TaskCancelledError(f"task {dispatch_id}:{node_id} was cancelled before it was submitted")
                versions = versions or await self.get_version_info()
                queue_bound = policy.queue_bound(terms, self.queue_timeout)
                spec = attempt_spec(self._job_spec(dispatch_id, node_id, versions), terms, self.submit_timeout + queue_bound)
                ended = False
                outcome = await self._submit_and_wait(job_id, objects, workdir, (function, args, kwargs), spec, step,
                                                      packable=not done, queue_timeout=queue_bound)
                ended = not outcome.gave_up and outcome.state in (JobState.SUCCEEDED, JobState.FAILED)
                step.now = "deciding on the attempt's end"
                end = await asyncio.to_thread(self._attempt_end, job_id, objects, outcome, policy, terms)
                decision = attempt_rules.decide(end, terms, done, policy)
                if isinstance(decision, NextAttempt):
                    next_id = make_job_id(dispatch_id, node_id, new_attempt_token())
                    await asyncio.to_thread(self._attempt_over, job_id, objects, terms, decision, next_id, len(done) + 1)
                    await self._settle_pack(job_id, ended=True)
                    done.append(end)
                    replaced.append(objects)
                    job_id, terms = next_id, decision.terms
                    continue
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
            kept = "".join([await asyncio.shield(asyncio.to_thread(self._store().stored_outcome, objects)) for objects in attempts])
            self._fail(
                f"task {dispatch_id}:{node_id} failed while {step.now} (Batch job {job_id}): "
                f"{type(err).__name__}: {err}; the job, if it was created, was cancelled{kept}"
            )
        finally:
            _electrons.end(electron)
            await asyncio.shield(asyncio.to_thread(self._clean_up, attempts, workdir, step.delivered, replaced))
            await asyncio.shield(self._settle_pack(job_id, ended=ended))

    async def _submit_and_wait(self, job_id: str, objects: TaskObjects, workdir: Path, task: tuple, spec: JobSpec,
                               step: Step, *, packable: bool = True, queue_timeout: float | None = None) -> Outcome:
        """Register for the job's events, upload the task, wait for the job to end. Only an
        electron's first attempt joins a pack: a later one runs on terms of its own."""
        events = None
        inbox: asyncio.Queue = asyncio.Queue()
        try:
            if self.wait_mode == "events":
                step.now = f"subscribing to the job notifications of topic {self.pubsub_topic!r}"
                events = self._job_events()
                inbox = await asyncio.to_thread(events.register, job_id, asyncio.get_running_loop())
            _waiting.register(job_id, asyncio.get_running_loop(), inbox)
            step.now = f"uploading the task to gs://{self._task_bucket().name}/{objects.task}"
            if self.pack_window > 0 and packable and not await self._goes_to_warm_vm(job_id, spec):
                pickle = await asyncio.to_thread(pickle_task, workdir, task)
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
            plan = self._wait_plan(spec, placement, queue_timeout=queue_timeout)
            return await self._wait(job_id, inbox, listening=events is not None, plan=plan, spec=spec)
        finally:
            _warm_takers.release(job_id)
            _waiting.unregister(job_id)
            if events is not None:
                events.unregister(job_id)

    async def _goes_to_warm_vm(self, job_id: str, spec: JobSpec) -> bool:
        """Whether a ``keep_warm`` electron skips the pack window: a warm VM of its spec waits
        (packing.WarmTakers). The listing is a hint: if it fails, the electron packs as usual."""
        if spec.options.keep_warm <= 0:
            return False
        key = warm_key(spec)
        try:
            waiting = await asyncio.to_thread(self._store().vms_waiting, key, time.time(), WARM_HINT_S)
        except api_exceptions.GoogleAPIError as err:
            app_log.debug(f"gcpbatch: could not list the waiting warm VMs ({err}): packing as usual")
            return False
        return _warm_takers.take(key, job_id, waiting)

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
        has not created the job yet, it sees the marker and creates nothing. The handle Covalent
        holds may be an earlier attempt's: the electron's current attempt is cancelled too.

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
        current = _electrons.current(task_metadata.get("dispatch_id"), task_metadata.get("node_id"))
        if current is None and _electrons.finished(task_metadata.get("dispatch_id"), task_metadata.get("node_id")):
            # Covalent cancels a workflow's finished electrons too: their run() is over, their jobs
            # ended, or kept warm for other electrons, which a cancel of this one must not stop.
            app_log.info(f"gcpbatch: nothing to cancel for {task_metadata.get('dispatch_id')}:"
                         f"{task_metadata.get('node_id')}: its run is over (Batch job {job_id})")
            return False
        for attempt in dict.fromkeys(filter(None, (job_id, current))):
            await asyncio.to_thread(self._store().mark_cancelled, attempt)
            await asyncio.to_thread(self._cancel_job, attempt)
            _waiting.put(attempt, CancelRequested(attempt))
        return True

    async def _stop_job(self, job_id: str) -> None:
        """Best effort, for paths that are already failing: mark the task cancelled and cancel its
        job, each tried even if the other fails (GCS may be what failed), logging what went wrong."""
        for step in (self._store().mark_cancelled, self._cancel_job):
            try:
                await asyncio.to_thread(step, job_id)
            except Exception as err:  # noqa: BLE001 - the caller's failure is the one to report
                app_log.warning(f"gcpbatch: stopping job {job_id}: {step.__name__} failed: {type(err).__name__}: {err}")

    def _cancel_job(self, job_id: str) -> None:
        self._jobs().cancel(job_id)

    async def _settle_pack(self, job_id: str, *, ended: bool) -> None:
        settled = _packs.settle(job_id, abandoned=not ended)
        if settled is not None and settled.last:
            await asyncio.shield(asyncio.to_thread(self._pack_over, settled))

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
                self._store().mark_cancelled(pack_id)
                self._cancel_job(pack_id)
                app_log.info(f"gcpbatch: cancelled pack {pack_id}: none of its electrons is waited for any more")
                return
            job = self._jobs().get_job(pack_id)
            if JobState.of(job.status.state).is_terminal:
                log_usage_of(job)
            self._store().remove_pack(pack_id)
        except Exception as err:  # noqa: BLE001 - every electron already has its outcome
            app_log.warning(f"gcpbatch: closing pack {pack_id}: {type(err).__name__}: {err}")

    # -- attempts ------------------------------------------------------------------------------

    def _attempt_policy(self) -> attempt_rules.Policy:
        return attempt_rules.Policy(retries=self.retries, spot_fallback=self.spot_fallback, spot_wait_s=self.spot_wait_s,
                                    memory_retry_factor=self.memory_retry_factor)

    def _attempt_end(self, job_id: str, objects: TaskObjects, outcome: Outcome, policy: attempt_rules.Policy,
                     terms: attempt_rules.Terms) -> AttemptEnd:
        """What the attempt's end was, read as far as a new attempt could follow it: with neither
        spot fallback nor memory retry on (or after a success, a cancel, a refusal), no read."""
        end = AttemptEnd(outcome.state, gave_up=outcome.gave_up, queued=outcome.phase in (JobState.QUEUED, JobState.SCHEDULED),
                         memory_mb=terms.memory_mb, refusal=outcome.detail if outcome.state is JobState.REJECTED else "",
                         lost_runner=outcome.lost_runner)
        could_follow = policy.memory_retry_factor or policy.falls_back(terms)
        if not could_follow or outcome.state is not JobState.FAILED or outcome.gave_up:
            return end
        store = self._store()
        error = store.load_error(objects)
        if error is not None:
            return replace(end, error_type=error.type)
        if store.has_result(objects):
            return replace(end, has_result=True)
        if store.is_cancelled(job_id):
            return replace(end, cancelled=True)
        return replace(end, exit_codes=self._jobs().run_exit_codes(job_id))

    def _attempt_over(self, job_id: str, objects: TaskObjects, terms: attempt_rules.Terms, decision: NextAttempt,
                      next_id: str, number: int) -> None:
        """An attempt is followed by another: its output goes to the node's streams under a line
        saying what happened and what the attempt's VM cost, and its job is cancelled should it
        still hold a VM."""
        self._cancel_job(job_id)
        cost = ""
        if not _packs.placement(job_id).packed:
            try:
                cost = usage_line(self._jobs().get_job(job_id))
            except Exception as err:  # noqa: BLE001 - the next attempt matters more than this one's bill
                app_log.debug(f"gcpbatch: no usage for attempt {job_id}: {type(err).__name__}: {err}")
        print(f"GCPBatchExecutor: attempt {number} ({attempt_rules.describe(terms)}) as Batch job {job_id}: "
              f"{decision.why}; attempt {number + 1} ({attempt_rules.describe(decision.terms)}) is Batch job {next_id}"
              + (f" ({cost})" if cost else ""), file=self.task_stderr)
        app_log.warning(f"gcpbatch: {job_id}: {decision.why}; next attempt {next_id}")
        try:
            self._store().print_output(objects, self.task_stdout, self.task_stderr)
        except Exception as err:  # noqa: BLE001 - the next attempt matters more than this one's output
            app_log.warning(f"gcpbatch: output of attempt {job_id} not read: {type(err).__name__}: {err}")

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
            # A warm VM's electrons are told by messages only: an executor that polls takes no part.
            options=settings.job_options(self.__dict__ | ({"keep_warm": 0} if self.wait_mode == "poll" else {})),
        )

    def _upload_task(self, objects: TaskObjects, spec: JobSpec, workdir: Path, task: tuple) -> None:
        self._store().upload_task(objects, spec, pickle_task(workdir, task))

    async def _submit_pack(self, members: list[PackMember], events) -> list[packing.Placement]:
        """Submit what the packer collected: a lone electron as its own job; several as a pack,
        their task objects first, routed before the manifest (whose upload creates the job)."""
        store = self._store()
        if len(members) == 1:
            member = members[0]
            await asyncio.to_thread(store.upload_task, TaskObjects(member.job_id), member.spec, member.pickle)
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
                await asyncio.to_thread(store.upload_task, TaskObjects(member.job_id), member.spec, member.pickle, pack_id)

        await asyncio.gather(*(upload(member) for member in members))
        await asyncio.to_thread(store.upload_manifest, pack_id, first, manifest)
        app_log.debug(f"gcpbatch: uploaded pack {pack_id} of {len(ids)} electrons")
        return placements

    def _wait_plan(self, spec: JobSpec | None = None, placement: packing.Placement = packing.ALONE, *,
                   queue_timeout: float | None = None) -> WaitPlan:
        # Imported here: jobs.py needs google-cloud-batch, which the worker image (where `import
        # covalent` loads this module) does not have.
        from .jobs import has_gpus

        return WaitPlan.for_task(submit_timeout=self.submit_timeout,
                                 queue_timeout=self.queue_timeout if queue_timeout is None else queue_timeout,
                                 time_limit=self.time_limit, retries=self.retries if spec is None else spec.retries,
                                 reconcile_interval=self.reconcile_interval,
                                 gpus=spec is not None and has_gpus(spec.options),
                                 pack_index=placement.index if placement.packed else None,
                                 pack_parallelism=self.pack_parallelism)

    async def _wait(self, job_id: str, inbox: asyncio.Queue, *, listening: bool, plan: WaitPlan,
                    spec: JobSpec | None = None) -> Outcome:
        """Until the job ends or a phase bound passes (the decisions: waiting.JobWait). Listening
        (events mode), Pub/Sub pushes events into ``inbox``; otherwise (poll mode) the job is read
        every poll_freq seconds. Either way ``cancel()`` wakes the wait through ``inbox``. A read
        of a job waiting for a VM brings Batch's word on why (``_capacity``)."""
        loop = asyncio.get_running_loop()
        wait = JobWait(plan, listening=listening, poll_interval=self.poll_freq, now=loop.time())
        warm = WarmWatch()
        try:
            return await self._wait_for(job_id, inbox, wait, warm, plan, spec)
        finally:
            if warm.elsewhere(job_id) and self.wait_mode == "events":
                self._job_events().unwatch_runner(warm.runner, job_id)

    async def _wait_for(self, job_id: str, inbox: asyncio.Queue, wait: JobWait, warm: WarmWatch, plan: WaitPlan,
                        spec: JobSpec | None) -> Outcome:
        loop = asyncio.get_running_loop()
        heard: set[str] = set()
        while True:
            try:
                item = await asyncio.wait_for(inbox.get(), warm.timeout(loop.time(), wait.timeout(loop.time())))
                if isinstance(item, ElectronEvent):
                    item = await self._electron_event(job_id, item, warm)
                    if item is None:
                        continue
                elif isinstance(item, RunnerEvent):
                    item = await asyncio.to_thread(self._runner_event, job_id, item, warm)
                    if item is None:
                        continue
                elif isinstance(item, JobEvent) and warm.elsewhere(job_id) and not isinstance(item, QueuedJob):
                    continue  # its own job's worker lost the claim: that VM's states are not the electron's
                elif isinstance(item, PackEvent):
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
                if warm.cold_due(loop.time()):
                    await asyncio.to_thread(self._ask_for_job, job_id, warm)
                    continue
                wait.silence()
                item = await asyncio.to_thread(self._reconcile_electron, job_id, warm, wait.left(loop.time()))
            if isinstance(item, CancelRequested):
                settled = wait.cancel_requested()
                if settled is None and _packs.placement(job_id).packed:
                    # Batch cannot cancel one task: the worker sees the marker and stops (or skips) it.
                    settled = Outcome(JobState.CANCELLED, "cancelled; its task in the pack stops on its own")
                if settled is not None:
                    return settled
                continue
            if isinstance(item, QueuedJob) and item.capacity:
                stuck = await self._capacity(item, heard, spec)
                if stuck is not None:
                    return stuck
            decision = wait.observe(item, loop.time())
            if isinstance(decision, Outcome):
                return replace(decision, lost_runner=warm.lost) if warm.lost else decision
            if decision == GIVE_UP:
                if wait.awaits_pack() and await asyncio.to_thread(self._jobs().pack_running, job_id):
                    wait.pack_progressing(loop.time())  # its RUNNING message was lost: once, from now
                    continue
                return await self._give_up(job_id, wait.state, plan, pack_progress=wait.pack_progress is not None)
            if item is not None and not wait.cancel_sent and await self.get_cancel_requested():
                # Cancelled while the function was creating the job: cancel it now that it exists.
                await asyncio.to_thread(self._cancel_job, job_id)
                wait.cancel_sent = True

    # -- warm VMs (protocol/warm.py) ------------------------------------------------------------

    async def _electron_event(self, job_id: str, event: ElectronEvent, warm: WarmWatch) -> JobEvent | None:
        """A message about the electron from whoever routes or runs it: offered to a warm VM (the
        function), running, ended (its runner). An end is confirmed before it settles anything."""
        _warm_takers.release(job_id)  # routed: the VM it went for is no longer listed as waiting
        if event.state is JobState.QUEUED:
            warm.offered(event.runner, event.take_by, wall=time.time(), now=asyncio.get_running_loop().time())
            app_log.info(f"gcpbatch: {job_id} offered to the warm VM of Batch job {event.runner}")
            return JobEvent(job_id, JobState.QUEUED, event.detail)
        if event.state is JobState.RUNNING:
            if not warm.runner:
                self._runs_on(job_id, event.runner, warm)
            return JobEvent(job_id, JobState.RUNNING, event.detail)
        confirmed = await asyncio.to_thread(self._confirm_electron, job_id, event)
        if confirmed is not None and not warm.runner:
            self._runs_on(job_id, event.runner, warm)
        return confirmed

    def _runs_on(self, job_id: str, runner: str, warm: WarmWatch) -> None:
        warm.claimed(runner)
        if runner == job_id:
            return
        if self.wait_mode == "events":
            self._job_events().watch_runner(runner, job_id)
        print(f"GCPBatchExecutor: the electron runs on the warm VM of Batch job {runner} (no VM boot)", file=self.task_stderr)

    def _confirm_electron(self, job_id: str, event: ElectronEvent) -> JobEvent | None:
        """An electron's end, as its runner says it, if the bucket agrees: the claim is that
        runner's, and the outcome it names is stored (the result for SUCCEEDED, the error record
        for FAILED, the cancel marker for CANCELLED). Anything else is ignored (and logged)."""
        objects, store = TaskObjects(job_id), self._store()
        claim = store.load_claim(objects)
        if claim is None or claim.runner != event.runner:
            app_log.warning(f"gcpbatch: ignored a {event.state.value} message for {job_id} from {event.runner}: the "
                            f"electron's claim names {claim.runner if claim else 'no runner'}")
            return None
        stored = {JobState.SUCCEEDED: lambda: store.has_result(objects),
                  JobState.FAILED: lambda: store.load_error(objects) is not None,
                  JobState.CANCELLED: lambda: store.is_cancelled(job_id)}[event.state]()
        if not stored:
            app_log.warning(f"gcpbatch: ignored a {event.state.value} message for {job_id}: its outcome is not stored")
            return None
        return JobEvent(job_id, event.state, event.detail)

    def _stored_end(self, job_id: str) -> JobEvent | None:
        """The electron's end as its stored outcome says it (a runner's message may be lost)."""
        objects, store = TaskObjects(job_id), self._store()
        if store.has_result(objects):
            return JobEvent(job_id, JobState.SUCCEEDED)
        error = store.load_error(objects)
        return None if error is None else JobEvent(job_id, JobState.FAILED, error.message)

    def _runner_event(self, job_id: str, item: RunnerEvent, warm: WarmWatch) -> JobEvent | None:
        """The job of the warm VM running the electron moved: its task failed or the job ended
        while the electron had no stored outcome means the VM was lost with it."""
        event = item.event
        if not warm.elsewhere(job_id) or event.job_id != warm.runner:
            return None
        ended = event.state == "FAILED" if isinstance(event, TaskEvent) else event.state.is_terminal
        if not ended:
            return None
        return self._stored_end(job_id) or self._lost(job_id, warm, f"its task {'failed' if isinstance(event, TaskEvent) else event.state.value}")

    def _lost(self, job_id: str, warm: WarmWatch, why: str) -> JobEvent:
        warm.lost = warm.runner
        return JobEvent(job_id, JobState.FAILED, f"the warm VM of Batch job {warm.runner} was lost while it ran the electron ({why})")

    def _reconcile_electron(self, job_id: str, warm: WarmWatch, within: float) -> JobEvent | None:
        """One read after silence. An electron a runner claimed: its stored outcome first (the
        runner's message may be lost; its own job may be idle, RUNNING, after it), then, on
        another job's VM, that job's state."""
        if not (warm.runner or warm.offered_to):
            return self._reconcile(job_id, within=within)
        stored = self._stored_end(job_id)
        if stored is not None:
            return stored
        if warm.elsewhere(job_id):
            runner = self._jobs().reconcile(warm.runner, within=within)
            if runner is None or runner.state.is_terminal:
                return self._lost(job_id, warm, f"its job is {runner.state.value if runner else 'gone'}")
            return JobEvent(job_id, JobState.RUNNING)
        return self._reconcile(job_id, within=within)

    def _ask_for_job(self, job_id: str, warm: WarmWatch) -> None:
        """The warm VM offered the electron did not claim it in time (it died, or left): ask the
        function for the electron's own job. Should that VM claim it late after all, the claim
        decides, and the job's worker runs nothing."""
        warm.sent_cold()
        app_log.warning(f"gcpbatch: the warm VM of Batch job {warm.offered_to} did not take {job_id}: creating its own job")
        self._store().ask_for_job(TaskObjects(job_id))

    async def _capacity(self, read: QueuedJob, heard: set[str], spec: JobSpec | None) -> Outcome | None:
        """What Batch says keeps the job from its VM (quota, stockout...), each new text once, to
        the node's log and the server's; a job that can never be placed (waiting.never_placeable)
        is cancelled now, not at queue_timeout."""
        vcpus, gpus = (spec.vcpus, spec.options.accelerator_count) if spec is not None else (0.0, 0)
        for text in read.capacity:
            if text in heard:
                continue
            heard.add(text)
            print(f"GCPBatchExecutor: Batch job {read.job_id} is {read.state.value}, waiting for a VM: {text}",
                  file=self.task_stderr)
            app_log.warning(f"gcpbatch: {read.job_id} waits for a VM: {text}")
            if never_placeable(text, vcpus=vcpus, gpus=gpus):
                await self.cancel({}, read.job_id)
                return Outcome(JobState.FAILED, phase=read.state,
                               gave_up=f"Batch cannot place job {read.job_id}, so it was cancelled at once rather than at "
                                       f"queue_timeout: {text}")
        return None

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
        """One read of the job's (or, in a pack, its task's) state (batch_calls.py)."""
        return self._jobs().reconcile(job_id, log_usage=log_usage, within=within)

    async def _give_up(self, job_id: str, state: JobState | None, plan: WaitPlan, *, pack_progress: bool = False) -> Outcome:
        if await self.get_cancel_requested():
            # The user cancelled it (e.g. before its job existed, so no CANCELLED event came): that
            # is the outcome, not the bound we hit waiting.
            await self.cancel({}, job_id)
            return Outcome(JobState.CANCELLED, "cancelled before the job reached a terminal state")
        reason = give_up_reason(job_id, state, plan, time_limit=self.time_limit, retries=plan.retries,
                                pack_progress=pack_progress, task_bucket=self._task_bucket().name)
        if state is None:
            reason += await asyncio.to_thread(self._store().create_delay, _packs.placement(job_id).pack_id or job_id)
        await self.cancel({}, job_id)
        return Outcome(JobState.FAILED, gave_up=reason + "; the job was cancelled", phase=state)

    def _collect(self, job_id: str, objects: TaskObjects, outcome: Outcome, workdir: Path, step: Step) -> Any:
        """The task's result (or its error record, raised), its output printed to Covalent's
        streams; ``step.delivered`` names the attempt whose stored outcome Covalent was handed."""
        if outcome.gave_up:
            self._fail(outcome.gave_up)
        if outcome.state is JobState.REJECTED:
            self._fail(f"the deployment refused the task: {outcome.detail}")
        store = self._store()
        if outcome.state is JobState.CANCELLED:
            placement = _packs.placement(job_id)
            if not placement.packed:
                raise TaskCancelledError(f"Batch job {job_id} was cancelled")
            # Cancelled (its marker), or its task never ran (UNEXECUTED): cancelled only if its
            # pack's job was; a job that failed first (no VM to be had...) fails the electron.
            why = None if store.is_cancelled(job_id) else self._jobs().why_unexecuted(placement)
            if why is None:
                raise TaskCancelledError(f"task {placement.index} of Batch job {placement.pack_id} was cancelled")
            self._fail(why)
        store.print_output(objects, self.task_stdout, self.task_stderr)
        if outcome.state is JobState.SUCCEEDED:
            found, result = store.load_result(objects, workdir)
            if found:
                step.delivered = objects
                return result
        record = store.load_error(objects)
        if record is not None:
            if record.traceback:
                print(record.traceback, end="", file=self.task_stderr)
            else:  # a record the worker wrote for an electron it stopped: its message is all there is
                print(f"GCPBatchExecutor: {record.type}: {record.message}", file=self.task_stderr)
            step.delivered = objects
            raise TaskRuntimeError(f"{record.type}: {record.message}")
        if store.is_cancelled(job_id):
            # Ended without an outcome after its cancel (its worker honoured the marker): the
            # task's FAILED message may reach the wait before cancel()'s own wake-up does.
            raise TaskCancelledError(f"Batch job {job_id} was cancelled")
        self._fail(self._jobs().ended_without_outcome(job_id, outcome.state))

    def _fail(self, message: str) -> None:
        """Covalent keeps a failed node's stderr, not the exception's message: write it there too."""
        print(f"GCPBatchExecutor: {message}", file=self.task_stderr)
        raise TaskRuntimeError(message)

    def _job_link(self, job_id: str) -> str:
        if self.batch_api_endpoint:
            return f"local Batch service {self.batch_api_endpoint}"
        return job_console_url(self.project_id, self.region, job_id)

    def _clean_up(self, attempts: list[TaskObjects], workdir: Path, delivered: TaskObjects | None,
                  replaced: list[TaskObjects] = ()) -> None:
        self._store().clean_up(attempts, workdir, delivered, replaced)

    # -- clients (lazy: Covalent rebuilds the executor from its attributes inside its server) --

    def _job_name(self, job_id: str) -> str:
        return job_name(self.project_id, self.region, job_id)

    #: How long one call (a read, a cancel, a delete, a write made once) retries transient errors
    #: (clients.TRANSIENT_ERRORS) before its error is the answer. A read made while waiting retries
    #: for what is left of the wait's phase instead (at least MIN_RETRY_S), so the phase's bound
    #: holds.
    RETRY_S = 120.0
    MIN_RETRY_S = 10.0

    def _retry(self, within: float | None = None):
        bound = self.RETRY_S if within is None else min(self.RETRY_S, max(self.MIN_RETRY_S, within))
        return clients.transient_retry(bound)

    def _store(self) -> TaskStore:
        """The electron's objects in the deployment's buckets (task_objects.py)."""
        return TaskStore(data=self._bucket(), tasks=self._task_bucket(), retry=self._retry, keep_artifacts=self.keep_artifacts)

    def _jobs(self) -> BatchJobs:
        """Batch as this executor calls it (batch_calls.py)."""
        return BatchJobs(client=self._batch(), project_id=self.project_id, region=self.region, packs=_packs,
                         store=self._store(), retry=self._retry, min_retry_s=self.MIN_RETRY_S)

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


def attempt_spec(spec: JobSpec, terms: attempt_rules.Terms, start_within_s: float) -> JobSpec:
    """The electron's job spec on an attempt's terms. Its start deadline is the attempt's own: a
    Spot attempt given up after spot_wait_s must not start its task after the next one was made."""
    if (spec.options.provisioning, spec.memory_mb, spec.retries, spec.start_within_s) == (
            terms.provisioning, terms.memory_mb, terms.retries, float(start_within_s)):
        return spec
    options = spec.options.model_copy(update={"provisioning": terms.provisioning})
    return spec.model_copy(update={"memory_mb": terms.memory_mb, "retries": terms.retries, "options": options,
                                   "start_within_s": float(start_within_s)})


class _Electrons:
    """Each running electron's current attempt (its job id), by (dispatch id, node id): Covalent
    holds one job handle per electron, which may be an earlier attempt's when cancel() comes."""

    #: Finished electrons remembered (cancel() of one is a no-op): a bound on the process's memory.
    FINISHED_KEPT = 100_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[tuple[str, int], str] = {}
        self._finished: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()

    def begin(self, electron: tuple[str, int], job_id: str) -> None:
        with self._lock:
            self._current[electron] = job_id
            self._finished.pop(electron, None)

    def end(self, electron: tuple[str, int]) -> None:
        with self._lock:
            self._current.pop(electron, None)
            self._finished[electron] = None
            while len(self._finished) > self.FINISHED_KEPT:
                self._finished.popitem(last=False)

    @staticmethod
    def _key(dispatch_id: Any, node_id: Any) -> tuple[str, int] | None:
        try:
            return (str(dispatch_id), int(node_id))
        except (TypeError, ValueError):
            return None

    def current(self, dispatch_id: Any, node_id: Any) -> str | None:
        with self._lock:
            return self._current.get(self._key(dispatch_id, node_id))

    def finished(self, dispatch_id: Any, node_id: Any) -> bool:
        """Whether the electron's run() ended in this process (and none runs now)."""
        with self._lock:
            key = self._key(dispatch_id, node_id)
            return key in self._finished and key not in self._current


_electrons = _Electrons()

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
