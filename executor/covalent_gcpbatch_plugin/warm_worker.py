"""The worker of a job whose VM is kept warm: it runs its own electron, then waits a bounded time
for the next electron of the same job spec, as often as its job's life allows (protocol/warm.py
has the contract; functions/main.py routes the uploads).

One process per VM, prepared once: this parent holds the clients and a fork server that imported
Covalent, cloudpickle and the storage client before any electron ran. Each electron runs in a
fresh child of that server (``worker.run_electron``), so an electron costs a fork, not an
interpreter and its imports, and sees nothing another electron left behind: not its modules (the
child is a copy of the server, which never runs a task), its environment variables (set per
electron in the child), its working directory or its files (a temporary directory of its own).

Exactly one runner per electron: the parent creates the electron's claim at generation 0 before
anything runs, and a claim it did not write means another runner has the electron (the loser
runs nothing). The parent tells each electron's states on the notification topic (Batch tells
only the job's), bounds each by its own ``time_limit`` (the job's max run duration is the VM's
life), and writes an error record for an electron it had to stop, or that died under it.

Waiting is event-driven: an idle record in the bucket, a streaming pull on the deployment's offer
subscription, and a queue this thread blocks on until the record's time is up. It exits 0 then,
or when the deployment's ``max_warm_vms`` VMs wait already, and the job ends SUCCEEDED.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

from google.api_core.exceptions import PreconditionFailed

from . import clients, worker
from .protocol import (
    ENV_JOB_ID,
    ENV_JOB_UID,
    ENV_MAX_WARM_VMS,
    ENV_RETRY_ATTEMPT,
    ENV_TOPIC,
    ENV_WARM_LIFETIME_S,
    ENV_WARM_SUBSCRIPTION,
    EXIT_CANCELLED,
    OFFER_MARGIN_S,
    WARM_PREFIX,
    Claim,
    ErrorRecord,
    IdleVM,
    JobSpec,
    JobState,
    Offer,
    SpecError,
    TaskObjects,
    dumps_error,
    electron_state_message,
    live_from,
    parse_offer,
    untaken_idle,
    warm_key,
)

#: Modules the fork server imports once, so that no electron pays for them.
PRELOAD = ("cloudpickle", "covalent", "google.cloud.storage", "covalent_gcpbatch_plugin.worker")
#: Seconds between SIGTERM and SIGKILL of an electron stopped at its time limit.
KILL_GRACE_S = 5.0
PUBLISH_TIMEOUT_S = 30.0


def log(message: str) -> None:
    print(f"covalent-gcpbatch warm worker: {message}", file=sys.stderr, flush=True)


@dataclass
class Runner:
    """This VM: its job (the runner's name in claims and offers), the electrons' spec key, and
    until when its job lives."""

    runner: str
    job_uid: str
    key: str
    keep_warm: int
    ends: float
    max_vms: int
    seq: int = 0


def serve(bucket, task_bucket, first: TaskObjects) -> int:
    """Run the job's own electron, then each electron offered to this VM, until none comes."""
    started = time.time()
    spec = read_spec(task_bucket, first)
    if spec is None:  # no readable task: run_electron says why, as in any job
        return worker.run_electron(bucket, task_bucket, first)
    lifetime = float(os.environ.get(ENV_WARM_LIFETIME_S, "0") or 0) or spec.time_limit_s
    me = Runner(runner=first.job_id, job_uid=os.environ.get(ENV_JOB_UID, ""), key=warm_key(spec),
                keep_warm=spec.options.keep_warm, ends=started + lifetime,
                max_vms=int(os.environ.get(ENV_MAX_WARM_VMS, "0") or 0))
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    publisher = clients.publisher_client()
    offers = Offers(me.runner)
    try:
        offered: tuple[TaskObjects, JobSpec] | None = (first, spec)
        attempt = os.environ.get(ENV_RETRY_ATTEMPT, "0")
        while offered is not None:
            electron, electron_spec = offered
            ended = run_claimed(context, bucket, me, electron, electron_spec, attempt, publisher)
            me.seq += 1
            attempt = "0"  # an offered electron's first run: its own job id, its own attempt-0 objects
            # Waiting before the end is told: the next electron of a chain is uploaded only once its
            # executor has heard it, and must find this VM's idle record then.
            idle = go_idle(bucket, me)
            if ended is not None:
                tell(publisher, electron.job_id, me, *ended)
            offered = None if idle is None else next_electron(bucket, task_bucket, me, offers, idle)
        return 0
    finally:
        offers.close()


def read_spec(task_bucket, objects: TaskObjects) -> JobSpec | None:
    blob = task_bucket.get_blob(objects.task, retry=clients.transient_retry(worker.STORE_TIMEOUT_S), timeout=60)
    if blob is None:
        return None
    try:
        return JobSpec.from_metadata(blob.metadata)
    except SpecError:
        return None


def claim(bucket, me: Runner, objects: TaskObjects) -> bool:
    """Whether this VM runs the electron: it created the claim, or the claim is its own already
    (a retry of its own write, or Batch re-running this job's task after a VM loss)."""
    body = Claim(runner=me.runner, job_uid=me.job_uid).dumps()
    try:
        clients.create_object(bucket, objects.claim, body, content_type="application/json",
                              retry=clients.transient_retry(worker.STORE_TIMEOUT_S))
        return True
    except PreconditionFailed:
        stored = bucket.get_blob(objects.claim, timeout=60)
        held = None if stored is None else Claim.loads(stored.download_as_bytes(timeout=60))
        return held is not None and held.runner == me.runner and held.job_uid == me.job_uid


def run_claimed(context, bucket, me: Runner, objects: TaskObjects, spec: JobSpec, attempt: str,
                publisher) -> tuple[JobState, str] | None:
    """Claim the electron and run it in a fresh child within its time limit: its end (state,
    detail), still to be told; None if another runner has it."""
    if not claim(bucket, me, objects):
        log(f"{objects.job_id} is another runner's (its claim): not run here")
        return None
    time_limit = spec.time_limit_s
    tell(publisher, objects.job_id, me, JobState.RUNNING, f"running on warm VM {me.runner}")
    child = context.Process(target=child_main, args=(objects.job_id, {ENV_JOB_ID: objects.job_id, ENV_RETRY_ATTEMPT: attempt}),
                            name=f"electron-{objects.job_id}")
    child.start()
    child.join(time_limit)
    stopped = child.is_alive()
    if stopped:
        child.terminate()
        child.join(KILL_GRACE_S)
        if child.is_alive():
            child.kill()
            child.join()
    state, detail = state_of_exit(child.exitcode, stopped, time_limit, me)
    if state is not JobState.SUCCEEDED and state is not JobState.CANCELLED:
        store_error(bucket, objects, detail, me, error_type_of_exit(child.exitcode, stopped))
    return state, detail


def state_of_exit(code: int | None, stopped: bool, time_limit: int, me: Runner) -> tuple[JobState, str]:
    if stopped:
        return JobState.FAILED, (f"the electron ran longer than its time_limit of {time_limit} s on warm VM {me.runner} "
                                 "and was stopped")
    if code == 0:
        return JobState.SUCCEEDED, ""
    if code == EXIT_CANCELLED:
        return JobState.CANCELLED, "cancelled: its marker"
    if code is not None and code < 0:
        return JobState.FAILED, (f"the electron's process on warm VM {me.runner} was killed by signal {-code}"
                                 + (" (on Batch, usually the out-of-memory killer)" if -code == signal.SIGKILL else ""))
    return JobState.FAILED, f"exit code {code}"


#: The error record's type for an electron this VM stopped, or whose process died of anything but SIGKILL.
STOPPED_TYPE = "covalent_gcpbatch_plugin.WarmRunStopped"


def error_type_of_exit(code: int | None, stopped: bool) -> str:
    """The error record's type for a child that stored no outcome: killed by a SIGKILL this VM
    did not send, it ran out of memory as far as anyone can tell (on Batch, the kernel's OOM
    killer), like a job's worker that exits 137 (attempts.out_of_memory), so memory_retry_factor
    follows it; anything else is STOPPED_TYPE."""
    if not stopped and code == -signal.SIGKILL:
        return MemoryError.__name__
    return STOPPED_TYPE


def store_error(bucket, objects: TaskObjects, detail: str, me: Runner, error_type: str) -> None:
    """The electron's error record, unless its child stored its outcome itself (the usual case: a
    task that raised): a record this VM writes for a child it stopped or that died."""
    record = ErrorRecord(type=error_type, message=detail, phase="worker")
    try:
        clients.create_object(bucket, objects.error, dumps_error(record), content_type="application/json",
                              retry=clients.transient_retry(worker.STORE_TIMEOUT_S),
                              metadata={worker.OUTCOME_JOB_UID_KEY: me.job_uid, worker.OUTCOME_ATTEMPT_KEY: "0"})
    except PreconditionFailed:
        pass  # the child stored the outcome (result or error) before it ended: that one stands
    except Exception as err:  # noqa: BLE001 - its state message still says why
        log(f"error record of {objects.job_id} not stored: {type(err).__name__}: {err}")


def tell(publisher, job_id: str, me: Runner, state: JobState, detail: str) -> None:
    """The electron's state on the notification topic (best effort: its executor also reads the
    claim and the stored outcome when it hears nothing)."""
    data, attributes = electron_state_message(job_id, me.runner, state, detail)
    try:
        publisher.publish(os.environ[ENV_TOPIC], data, **attributes).result(timeout=PUBLISH_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - see above
        log(f"state {state.value} of {job_id} not published: {type(err).__name__}: {err}")


def child_main(job_id: str, environment: dict[str, str]) -> None:
    """In the fork server's fresh child: one electron, as a job's worker runs it."""
    signal.signal(signal.SIGTERM, worker._raise_terminated)
    home = tempfile.mkdtemp(prefix=f"electron-{job_id}-")
    # A directory of its own, as a fresh container's: its working directory and its temporary files.
    os.environ.update(environment, TMPDIR=home)
    tempfile.tempdir = None
    os.chdir(home)
    try:
        client = clients.storage_client(project=None)
        bucket = client.bucket(os.environ[worker.ENV_BUCKET])
        task_bucket = client.bucket(os.environ.get(worker.ENV_TASK_BUCKET) or os.environ[worker.ENV_BUCKET])
        code = worker.run_electron(bucket, task_bucket, TaskObjects(job_id), watch_cancel=True)
    finally:
        os.chdir("/")
        shutil.rmtree(home, ignore_errors=True)
    worker.exit_now(code)


def waiting_vms(bucket, now: float) -> int:
    """How many VMs of the deployment wait for an electron now (their idle records not taken)."""
    names = [blob.name for blob in bucket.list_blobs(prefix=WARM_PREFIX, start_offset=live_from(now), timeout=60)]
    return len(untaken_idle(names))


def go_idle(bucket, me: Runner) -> IdleVM | None:
    """This VM's idle record, written; None if it may not wait: no time left in its job's life,
    or ``max_warm_vms`` VMs wait already."""
    now = time.time()
    until = min(now + me.keep_warm, me.ends - OFFER_MARGIN_S)
    if until - now <= 2 * OFFER_MARGIN_S:
        return None
    try:
        if waiting_vms(bucket, now) >= me.max_vms:
            log(f"{me.max_vms} warm VMs wait already (max_warm_vms): exiting")
            return None
        idle = IdleVM(key=me.key, runner=me.runner, seq=me.seq, until=until, ends=me.ends)
        clients.create_object(bucket, idle.name, idle.model_dump_json().encode(), content_type="application/json",
                              retry=clients.transient_retry(worker.STORE_TIMEOUT_S))
    except Exception as err:  # noqa: BLE001 - the electron's end is told all the same; the VM just leaves
        log(f"cannot wait for another electron: {type(err).__name__}: {err}")
        return None
    return idle


def next_electron(bucket, task_bucket, me: Runner, offers: Offers, idle: IdleVM) -> tuple[TaskObjects, JobSpec] | None:
    """Wait on the offer queue until the idle record's time is up, for an electron offered to
    this VM; None if none came (or the one offered is not this VM's to run)."""
    offers.open()
    log(f"waiting up to {idle.until - time.time():.0f} s for the next electron ({idle.name})")
    offer = None
    while offer is None and (left := idle.until - time.time()) > 0:
        try:
            offer = offers.queue.get(timeout=left)
        except queue.Empty:
            break
        if offer.seq != me.seq or offer.key != me.key:
            log(f"ignored an offer of {offer.job_id} for another idle period or spec")
            offer = None
    if offer is None:
        # The offer's message may be late or lost; its record is not: the take of this idle period.
        offer = taken_offer(bucket, idle, me)
    if offer is None:
        log("no electron came: exiting")
        return None
    spec = read_spec(task_bucket, TaskObjects(offer.job_id))
    if spec is None or warm_key(spec) != me.key or time.time() + spec.time_limit_s + OFFER_MARGIN_S > me.ends:
        log(f"offer of {offer.job_id} refused: its task is gone, of another spec, or longer than this VM's life")
        return None  # its executor asks for its job at the offer's take_by
    return TaskObjects(offer.job_id), spec


def taken_offer(bucket, idle: IdleVM, me: Runner) -> Offer | None:
    """The offer recorded on this idle period's ``taken`` object, if an upload took it."""
    try:
        blob = bucket.get_blob(idle.taken, timeout=30)
        offer = None if blob is None else Offer.loads(blob.download_as_bytes(timeout=30))
    except Exception as err:  # noqa: BLE001 - then none: its executor asks for its job at take_by
        log(f"cannot read {idle.taken}: {type(err).__name__}: {err}")
        return None
    return offer if offer is not None and offer.runner == me.runner and offer.key == me.key else None


class Offers:
    """The offer subscription's streaming pull: this VM's offers into ``queue``; any other VM's
    left to it (nacked), and what nobody can take any more (malformed, past its take_by) dropped."""

    def __init__(self, runner: str) -> None:
        self.runner = runner
        self.queue: queue.Queue[Offer] = queue.Queue()
        self._subscriber = None
        self._future = None

    def open(self) -> None:
        if self._future is not None:
            return
        self._subscriber = clients.subscriber_client()
        self._future = self._subscriber.subscribe(os.environ[ENV_WARM_SUBSCRIPTION], callback=self._on_message)

    def _on_message(self, message) -> None:
        offer = parse_offer(dict(message.attributes), message.data)
        if offer is None or offer.take_by < time.time():
            message.ack()
        elif offer.runner != self.runner:
            message.nack()
        else:
            message.ack()
            self.queue.put(offer)

    def close(self) -> None:
        if self._future is not None:
            self._future.cancel()
            try:
                self._future.result(timeout=10)
            except Exception:  # noqa: BLE001 - cancelled: it says so by raising
                pass
        if self._subscriber is not None:
            self._subscriber.close()
