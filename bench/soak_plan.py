"""The soak's plan and its judge, pure: what to dispatch and which faults to fire (both from one
seed), and whether what happened to each electron is what should have happened (bench/soak.py
does the I/O).

Everything random comes from ``random.Random(seed)`` streams of its own (workload, faults), so a
seed names one soak exactly: ``python -m bench.soak --seed S`` replays it (the faults' moments are
the same; what they hit depends on the machine's timing, which the report records per electron).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

#: What an electron does, and so what it must end as.
VALUE, RAISES, ODD, OVER_TIME, SLOW = "value", "raises", "odd", "over_time", "slow"
#: Dispatch shapes: a fan-out that packs, a chain, a fan-out with failures and odd output, one cancelled.
FAN_OUT, CHAIN, MIXED, CANCELLED = "fan_out", "chain", "mixed", "cancelled"
SHAPE_WEIGHTS = {FAN_OUT: 4, CHAIN: 3, MIXED: 3, CANCELLED: 2}
#: An over-time electron's time_limit (s) and how long it would run without one.
OVER_TIME_LIMIT_S, OVER_TIME_RUN_S = 3, 60
#: What Batch reports for an over-time task, as the executor words it (protocol.INFRASTRUCTURE_EXIT_CODES).
OVER_TIME_WORDS = "max run duration"
#: How the executor says no job was created for a task within submit_timeout.
SUBMIT_TIMEOUT_WORDS = "was created within submit_timeout"
#: Exit codes that say the infrastructure (not the electron) ended an attempt: Batch's 5000x and a
#: SIGKILL's 137 (the soak's worker kills).
KILLED = 137


@dataclass(frozen=True)
class Electron:
    key: str  #: unique in the soak; the electron's function is named ``e_<key>`` (its Covalent node name)
    kind: str
    sleep_s: float = 0.0
    #: VALUE: the value it returns; ODD: the sha256 of the bytes it returns
    value: object = None
    depends_on: str | None = None  #: in a chain, the previous electron's key (its value is an argument)

    @property
    def node_name(self) -> str:
        return f"e_{self.key}"

    @property
    def error_words(self) -> str:
        """The text its own failure must carry (RAISES, OVER_TIME)."""
        return f"SoakError: planned failure of {self.key}" if self.kind == RAISES else OVER_TIME_WORDS


@dataclass(frozen=True)
class Dispatch:
    index: int
    shape: str
    electrons: tuple[Electron, ...]
    wait_mode: str
    start_s: float  #: seconds after the soak starts dispatching
    cancel_after_s: float | None = None  #: CANCELLED: ct.cancel this long after dispatch

    @property
    def name(self) -> str:
        return f"d{self.index:03d}"


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    params: dict = field(default_factory=dict)
    #: window faults (notifications dropped, duplicated, delayed) are switched off after this long
    lasts_s: float = 0.0


#: Fault kinds, by where they strike, with their weights in the schedule.
FAULT_WEIGHTS = {
    "batch_read_errors": 3,       # 429/5xx on get_job/get_task
    "batch_create_errors": 2,     # 429/503 on create_job (the function's retry)
    "function_fails_before_create": 1,  # an unexpected create error: the function answers 500, redelivery
    "create_ack_lost": 2,         # create committed, its answer lost: the retry meets ALREADY_EXISTS
    "notifications_dropped": 2,
    "notifications_duplicated": 1,
    "notifications_delayed": 2,   # late and out of order
    "preemption": 3,              # exit 50001 at an attempt's start, retried by Batch
    "preempted_after_outcome": 2,  # the VM goes after the worker stored its outcome
    "worker_killed": 2,           # SIGKILL of a running worker: exit 137, not retried
    "gcs_lost_ack": 2,            # the executor's upload commits, its answer is lost
    "gcs_errors": 2,              # 429/503 from GCS to the executor
    "pubsub_restart": 1,
    "gcs_restart": 1,
}


def value_of(key: str, salt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}/{salt}".encode()).digest()[:6], "big")


def odd_payload(key: str, size: int) -> bytes:
    """An ODD electron's result: ``size`` bytes that are not text, derived from its key."""
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def plan_workload(seed: int, electrons: int, dispatches: int, spread_s: float) -> list[Dispatch]:
    """``dispatches`` dispatches (at least) holding ``electrons`` electrons (at least), their start
    times spread over ``spread_s`` seconds."""
    rng = random.Random(f"workload/{seed}")
    mean = max(2, electrons // max(1, dispatches))
    plan: list[Dispatch] = []
    total = 0
    every_shape = rng.sample(list(SHAPE_WEIGHTS), len(SHAPE_WEIGHTS))  # each shape at least once
    while total < electrons or len(plan) < dispatches:
        index = len(plan)
        shape = every_shape[index] if index < len(every_shape) else rng.choices(
            list(SHAPE_WEIGHTS), weights=list(SHAPE_WEIGHTS.values()))[0]
        size = max(3, min(electrons - total if len(plan) >= dispatches - 1 else 10**6,
                          rng.randint(max(3, mean // 2), mean * 3 // 2 + 1)))
        if shape == CHAIN:
            size = min(size, 6)
        prefix = f"d{index:03d}"
        members = _electrons(rng, shape, prefix, size, seed)
        plan.append(Dispatch(
            index=index, shape=shape, electrons=tuple(members), wait_mode=rng.choice(("events", "events", "poll")),
            start_s=round(rng.uniform(0, spread_s), 2),
            cancel_after_s=round(rng.uniform(1.0, 15.0), 2) if shape == CANCELLED else None))
        total += len(members)
    return sorted(plan, key=lambda d: d.start_s)


def _electrons(rng: random.Random, shape: str, prefix: str, size: int, seed: int) -> list[Electron]:
    keys = [f"{prefix}e{i:02d}" for i in range(size)]
    if shape == CHAIN:
        return [Electron(k, VALUE, round(rng.uniform(0, 1), 2), value_of(k, seed), keys[i - 1] if i else None)
                for i, k in enumerate(keys)]
    if shape == CANCELLED:
        return [Electron(k, SLOW, round(rng.uniform(2, 8), 2), value_of(k, seed)) for k in keys]
    if shape == FAN_OUT:
        return [Electron(k, VALUE, round(rng.uniform(0, 2), 2), value_of(k, seed)) for k in keys]
    kinds = [RAISES, ODD, OVER_TIME] + [rng.choice((VALUE, VALUE, RAISES, ODD)) for _ in keys[3:]]
    rng.shuffle(kinds)
    out = []
    for k, kind in zip(keys, kinds):
        if kind == ODD:
            size_bytes = rng.randint(1, 3 * 2**20)
            out.append(Electron(k, ODD, 0.0, (size_bytes, hashlib.sha256(odd_payload(k, size_bytes)).hexdigest())))
        else:
            out.append(Electron(k, kind, round(rng.uniform(0, 1), 2), value_of(k, seed) if kind == VALUE else None))
    return out


def plan_faults(seed: int, horizon_s: float, every_s: float) -> list[Fault]:
    """Faults at random moments over ``horizon_s`` seconds, one per ``every_s`` on average
    (exponential gaps), each of a kind drawn by FAULT_WEIGHTS with its own parameters."""
    rng = random.Random(f"faults/{seed}")
    faults, at = [], rng.expovariate(1 / every_s)
    while at < horizon_s:
        kind = rng.choices(list(FAULT_WEIGHTS), weights=list(FAULT_WEIGHTS.values()))[0]
        faults.append(Fault(round(at, 2), kind, *_parameters(rng, kind)))
        at += rng.expovariate(1 / every_s)
    return faults


def plan_server_kill(seed: int, horizon_s: float) -> float:
    """The one moment the Covalent server is SIGKILLed and started again: in the middle third of
    the faults' horizon, so that dispatches are in flight and more come after it."""
    return round(random.Random(f"server/{seed}").uniform(horizon_s / 3, 2 * horizon_s / 3), 2)


def _parameters(rng: random.Random, kind: str) -> tuple[dict, float]:
    if kind == "batch_read_errors":
        return {"count": rng.randint(1, 6), "status": rng.choice((429, 500, 503))}, 0.0
    if kind == "batch_create_errors":
        return {"count": rng.randint(1, 3), "status": rng.choice((429, 503))}, 0.0
    if kind == "gcs_errors":
        return {"count": rng.randint(1, 4), "status": rng.choice((429, 503))}, 0.0
    if kind.startswith("notifications_"):
        return {}, round(rng.uniform(2, 10), 2)
    return {}, 0.0


# -- the judge -------------------------------------------------------------------------------------


@dataclass
class Observed:
    """What happened to one electron: Covalent's node, the runs its code logged, Batch's record."""

    status: str  # Covalent's node status ("" if the node is missing)
    output: object = None
    error: str = ""  # the node's error and stderr, together
    runs: int = 0  # times its code started (its run log)
    finished_runs: int = 0  # times its code returned or raised (its run log)
    jobs: tuple[str, ...] = ()  # the Batch job uids (and task index) its runs were in
    #: exit codes of its task's attempts that the infrastructure ended (5000x, 137)
    infra_exits: tuple[int, ...] = ()
    #: its dispatch's server was killed while it was in flight: nobody waits for it any more
    interrupted: bool = False
    #: runs that started after its leftover jobs were cancelled (``jobs --cancel``): must be 0
    late_runs: int = 0
    result_kept: bool = False  #: a result object is under its prefix in the bucket
    #: the electron it depends on (in a chain) ended COMPLETED (Covalent runs it only then)
    upstream_done: bool = True
    #: an emulator restart overlapped its submission: the upload's finalize event may be lost,
    #: which real GCS and Pub/Sub do not do (the emulators keep no undelivered message)
    submitted_across_restart: bool = False


def judge(electron: Electron, dispatch: Dispatch, seen: Observed, *, retries: int) -> list[str]:
    """What is wrong with ``seen`` (empty: it is one of the outcomes ``electron`` may have)."""
    problems = []
    infra_failed = bool([c for c in seen.infra_exits if c == KILLED]) or len(seen.infra_exits) > retries
    allowed_runs = 1 + len(seen.infra_exits)
    if seen.runs > allowed_runs:
        problems.append(f"its code ran {seen.runs} times, over 1 + {len(seen.infra_exits)} infrastructure retries")
    if len(set(seen.jobs)) > 1:
        problems.append(f"its code ran in more than one Batch task: {sorted(set(seen.jobs))}")
    if seen.status == "FAILED" and not seen.error.strip():
        problems.append("FAILED with an empty error")
    if seen.late_runs:
        problems.append(f"its code started {seen.late_runs} times after its jobs were cancelled")
    cancelled = dispatch.cancel_after_s is not None
    if seen.interrupted and seen.status != "COMPLETED":
        return problems  # no server waits for it: what ran must be within the rules above, no more
    if not seen.upstream_done and seen.status not in ("COMPLETED", "FAILED"):
        if seen.runs:
            problems.append(f"its code ran though its input never came ({seen.status or 'missing'})")
        return problems
    if seen.status == "FAILED" and seen.submitted_across_restart and SUBMIT_TIMEOUT_WORDS in seen.error:
        return problems  # the emulator lost its trigger event; the executor's bound ended it, saying why
    if seen.status == "COMPLETED":
        if electron.kind in (RAISES, OVER_TIME):
            problems.append(f"COMPLETED, but it {'raises' if electron.kind == RAISES else 'runs over its time limit'}")
        elif electron.kind == ODD:
            size, digest = electron.value
            got = seen.output if isinstance(seen.output, bytes) else b""
            if (len(got), hashlib.sha256(got).hexdigest()) != (size, digest):
                problems.append(f"COMPLETED with the wrong bytes ({len(got)} bytes, expected {size})")
        elif seen.output != electron.value:
            problems.append(f"COMPLETED with {seen.output!r}, expected {electron.value!r}")
    elif seen.status == "FAILED":
        if infra_failed:
            pass  # the infrastructure ended it for good (killed, or preempted past its retries): any explained failure
        elif electron.kind in (RAISES, OVER_TIME):
            if electron.error_words not in seen.error:
                problems.append(f"FAILED without its own error ({electron.error_words!r}): {seen.error[-300:]!r}")
        else:
            problems.append(f"FAILED, expected COMPLETED: {seen.error[-300:]!r}")
    elif seen.status == "CANCELLED":
        if not cancelled:
            problems.append("CANCELLED, but its dispatch was not")
    elif not (cancelled and seen.runs == 0):
        problems.append(f"ended {seen.status or 'missing'}")
    return problems


def lost_result(electron: Electron, seen: Observed) -> bool:
    """Its code returned a value and no infrastructure failure explains why Covalent has none; or
    its server died, and the value it returned is not kept in the bucket either."""
    returns = electron.kind in (VALUE, ODD, SLOW)
    if not returns or seen.finished_runs == 0 or seen.status in ("COMPLETED", "CANCELLED") or seen.infra_exits:
        return False
    return not (seen.interrupted and seen.result_kept)
