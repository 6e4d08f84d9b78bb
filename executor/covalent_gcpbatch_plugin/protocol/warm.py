"""Warm VMs: what the worker, the function and the executor agree on. Pure; names, records and
messages only (the I/O is worker.py's ``warm`` loop, functions/main.py's routing, gcpbatch.py's wait).

A lone electron's job may keep its VM after its electron (``JobOptions.keep_warm`` seconds): its
worker then writes an **idle record** and waits on the deployment's offer subscription. The
function, given the upload of an electron of the same **warm key** (the job spec but for the
node), takes one idle record (``taken``, created at generation 0: exactly one upload gets each
idle period) and publishes an **offer** addressed to that VM. Whatever runs an electron (a warm
VM, or the worker of the electron's own job) first creates the electron's **claim** at generation
0: exactly one runner per electron, the loser runs nothing. The runner publishes the electron's
own **state messages** on the notification topic (Batch publishes its job's, not the electron's).

An offer nobody claims by its ``take_by`` (the VM died or left) is followed by the executor's
**cold** object in the task bucket: the function then creates the electron's job as for any upload.

Idle records sort by the time their VM stops waiting, so the function lists only live ones
(``start_offset``): the listing stays as small as the number of idle VMs, with nothing deleted.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .layout import JOB_ID_PATTERN, TASKS_PREFIX
from .messages import JobEvent, JobState
from .spec import JobSpec

#: Idle records and what took them: ``covalent-gcpbatch/warm/<until ms>-<key>-<runner>-<seq>``.
WARM_PREFIX = f"{TASKS_PREFIX}warm/"
#: Names one listing of the live idle records returns at most (one page): records still waiting
#: and their ``taken`` marks, a few per warm VM (``max_warm_vms``); more than this is not a deployment's.
MAX_WARM_LISTING = 1000
TAKEN_SUFFIX = ".taken"
#: Seconds an offered electron waits for its warm VM to claim it; then its executor writes ``cold``.
#: More than two ack deadlines of the offer subscription (10 s): an offer that went to a stream as
#: its VM left (or, on the Pub/Sub emulator, to a stream it failed to close) is redelivered in time.
OFFER_TAKE_S = 25.0
#: An idle VM is offered an electron only if it still waits this long, and only if the electron's
#: time limit ends this long before the VM's own end (its job's max run duration).
OFFER_MARGIN_S = 5.0
#: ``Type`` attributes: an offer (on the deployment's warm topic), and an electron's state as its
#: runner (or the function, for an offer) tells it on the notification topic.
WARM_OFFER = "COVALENT_GCPBATCH_WARM_OFFER"
ELECTRON_STATE = "COVALENT_GCPBATCH_ELECTRON_STATE"
#: The key's length in hex digits (of a SHA-256): enough that two specs never meet by chance.
KEY_LENGTH = 24

_IDLE_NAME = re.compile(
    rf"{re.escape(WARM_PREFIX)}(?P<until>\d{{15}})-(?P<key>[0-9a-f]{{{KEY_LENGTH}}})-(?P<runner>[a-z0-9-]+)-(?P<seq>\d+)")


def warm_key(spec: JobSpec) -> str:
    """Electrons may share a VM only if their job specs are equal but for the node (and its start
    deadline, which is the electron's, checked per electron): same image, resources, provisioning,
    network, account, labels, mounts, secrets, limits, versions."""
    same = spec.model_copy(update={"node_id": 0, "dispatch_id": "x", "start_within_s": None})
    return hashlib.sha256(same.model_dump_json().encode()).hexdigest()[:KEY_LENGTH]


class IdleVM(BaseModel):
    """A warm VM waiting for an electron (the idle record's body; its name says the same)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(pattern=rf"^[0-9a-f]{{{KEY_LENGTH}}}$")
    #: The Batch job whose VM waits (a lone electron's job: one task, index 0).
    runner: str = Field(pattern=JOB_ID_PATTERN.pattern)
    #: How many electrons it ran before this idle period (each period has its own record).
    seq: int = Field(ge=0)
    #: Epoch seconds: it stops waiting then; its job's max run duration ends at ``ends``.
    until: float = Field(gt=0)
    ends: float = Field(gt=0)

    @property
    def name(self) -> str:
        return f"{idle_offset(self.until)}-{self.key}-{self.runner}-{self.seq}"

    @property
    def taken(self) -> str:
        return self.name + TAKEN_SUFFIX

    def take_by(self, now: float) -> float:
        """By when an offer made to this VM at ``now`` must be claimed: ``OFFER_TAKE_S``, and never
        before the VM's wait ends plus the margin, since the VM reads its ``taken`` record then: an
        offer whose message is lost (or, on the emulator, stuck on a departed VM's stream) is still
        claimed by a live VM, and a dead VM's costs the electron at most its ``keep_warm``."""
        return max(now + OFFER_TAKE_S, self.until + OFFER_MARGIN_S)

    def takes(self, spec: JobSpec, now: float) -> bool:
        """Whether this VM may be offered ``spec``'s electron at ``now``: same key, still waiting
        long enough to claim it, and its job lives long enough for the electron's time limit."""
        return (self.key == warm_key(spec) and self.until - now >= OFFER_MARGIN_S
                and now + spec.time_limit_s + OFFER_MARGIN_S <= self.ends)


def idle_offset(until: float) -> str:
    """Where the idle records of VMs that stop waiting at ``until`` (epoch seconds) or later start
    in a listing (``start_offset``; as an ``end_offset``, those that stop before)."""
    return f"{WARM_PREFIX}{int(until * 1000):015d}"


def live_from(now: float) -> str:
    """``start_offset`` of a listing of the idle records still waiting at ``now`` + the margin."""
    return idle_offset(now + OFFER_MARGIN_S)


def idle_of_name(name: str) -> tuple[str, str, int] | None:
    """(key, runner, seq) of an idle record's name (None for anything else, a ``.taken`` too)."""
    found = _IDLE_NAME.fullmatch(name)
    return None if found is None else (found["key"], found["runner"], int(found["seq"]))


def taken_of(names: list[str], runner: str) -> list[str]:
    """The ``taken`` marks among ``names`` of ``runner``'s idle records: one per electron offered
    to its VM (an Offer each; the VM may still have missed it)."""
    return [name for name in names if name.endswith(TAKEN_SUFFIX)
            and (idle := idle_of_name(name.removesuffix(TAKEN_SUFFIX))) is not None and idle[1] == runner]


def untaken_idle(names: list[str]) -> list[tuple[str, str]]:
    """(name, key) of the idle records among ``names`` (a listing from ``live_from``) whose
    ``taken`` mark is not listed too, in listing order: the VMs that still wait for an offer."""
    taken = {name.removesuffix(TAKEN_SUFFIX) for name in names if name.endswith(TAKEN_SUFFIX)}
    return [(name, parsed[0]) for name in names
            if (parsed := idle_of_name(name)) is not None and name not in taken]


def waiting_of_key(names: list[str], key: str) -> list[str]:
    """The idle records among ``names`` (a listing from ``live_from``) of VMs that still wait for
    an offer and may run electrons of warm key ``key``, in listing order (soonest to stop first)."""
    return [name for name, of_key in untaken_idle(names) if of_key == key]


class Offer(BaseModel):
    """An electron offered to one idle VM (the ``taken`` record's body and the offer message's data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN.pattern)
    key: str = Field(pattern=rf"^[0-9a-f]{{{KEY_LENGTH}}}$")
    runner: str = Field(pattern=JOB_ID_PATTERN.pattern)
    seq: int = Field(ge=0)
    #: Epoch seconds by which the VM must have claimed it, or the executor asks for a job.
    take_by: float = Field(gt=0)

    def dumps(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def loads(cls, payload: bytes) -> Offer | None:
        try:
            return cls.model_validate_json(payload)
        except ValidationError:
            return None

    def message(self) -> tuple[bytes, dict[str, str]]:
        return self.dumps(), {"Type": WARM_OFFER, "Runner": self.runner, "JobId": self.job_id}


class Claim(BaseModel):
    """Who runs an electron: the runner's Batch job (and its UID, which a reused job id lacks)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    runner: str = Field(pattern=JOB_ID_PATTERN.pattern)
    job_uid: str = Field(default="", max_length=128)

    def dumps(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def loads(cls, payload: bytes) -> Claim | None:
        try:
            return cls.model_validate_json(payload)
        except ValidationError:
            return None


@dataclass(frozen=True)
class ElectronEvent(JobEvent):
    """An electron's state as its runner told it (or the function: QUEUED, offered to ``runner``
    until ``take_by``). Confirmed against the claim and the stored outcome before it settles
    anything: anyone who may publish to the topic could have sent it."""

    runner: str = ""
    take_by: float = 0.0


def electron_state_message(job_id: str, runner: str, state: JobState, detail: str = "",
                           take_by: float = 0.0) -> tuple[bytes, dict[str, str]]:
    attributes = {"Type": ELECTRON_STATE, "JobId": job_id, "Runner": runner, "NewJobState": state.value}
    if take_by:
        attributes["TakeBy"] = f"{take_by:.3f}"
    return detail.encode(), attributes


def parse_electron_event(attributes: Mapping[str, str], data: bytes) -> ElectronEvent | None:
    """The ElectronEvent of an ``ELECTRON_STATE`` message; None for anything else."""
    if attributes.get("Type") != ELECTRON_STATE:
        return None
    job_id, runner = attributes.get("JobId", ""), attributes.get("Runner", "")
    if not (JOB_ID_PATTERN.fullmatch(job_id) and JOB_ID_PATTERN.fullmatch(runner)):
        return None
    try:
        state = JobState(attributes.get("NewJobState", ""))
        take_by = float(attributes.get("TakeBy", "0") or 0)
    except ValueError:
        return None
    if state not in (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        return None
    return ElectronEvent(job_id, state, data.decode("utf-8", "replace")[:4000], runner=runner, take_by=take_by)


def parse_offer(attributes: Mapping[str, str], data: bytes) -> Offer | None:
    if attributes.get("Type") != WARM_OFFER:
        return None
    offer = Offer.loads(data)
    if offer is None or offer.runner != attributes.get("Runner") or offer.job_id != attributes.get("JobId"):
        return None
    return offer
